//! How a session's process starts: which program, as whom, with which environment.
//! Nothing is inherited from the agent.

use super::core::Opened;
use super::request::{SessionCommand, SessionRequest};
use super::spawn::Launch;

fn login_env(sg: &Opened, request: &SessionRequest) -> Vec<(String, String)> {
    let a = &sg.account;
    let mut env = vec![
        ("HOME".to_string(), a.home.display().to_string()),
        ("USER".to_string(), a.name.clone()),
        ("LOGNAME".to_string(), a.name.clone()),
        ("SHELL".to_string(), a.shell.display().to_string()),
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("MAIL".to_string(), format!("/var/mail/{}", a.name)),
        ("USHER_SESSION".to_string(), sg.session_id.clone()),
    ];
    if let Some(p) = &request.pty {
        env.push(("TERM".to_string(), p.term.clone()));
    }
    if let Some(peer) = &request.peer {
        env.push(("SSH_CLIENT".to_string(), peer.clone()));
    }
    for (k, v) in &request.env {
        if !env.iter().any(|(e, _)| e == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

pub(super) fn launch_for(sg: &Opened, request: &SessionRequest) -> std::io::Result<Launch> {
    let a = &sg.account;
    let shell_name = a
        .shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    let (program, argv0, args) = match &request.command {
        SessionCommand::Shell => (a.shell.clone(), format!("-{shell_name}"), vec![]),
        SessionCommand::Exec(cmd) => (
            a.shell.clone(),
            shell_name,
            vec!["-c".to_string(), cmd.clone()],
        ),
        SessionCommand::Subsystem(p) => (
            p.clone(),
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vec![],
        ),
    };
    let mut groups = vec![a.gid];
    groups.extend(&a.groups);
    Ok(Launch {
        program,
        argv0,
        args,
        env: login_env(sg, request),
        cwd: if a.home.is_dir() {
            a.home.clone()
        } else {
            "/".into()
        },
        uid: a.uid,
        gid: a.gid,
        groups,
        cgroup_procs: sg.cgroup.procs_file()?,
        exec_mode: sg.profile.exec.mode,
        home: a.home.clone(),
    })
}
