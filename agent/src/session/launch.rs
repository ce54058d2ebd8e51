//! How a session's process starts: which program, as whom, with which environment.
//! Nothing is inherited from the agent.

use super::core::Opened;
use super::request::{DesktopSpec, SessionCommand, SessionRequest};
use super::spawn::Launch;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// A desktop session's shell: its X server in the background (gone with the shell), the
/// desktop command once the server listens. The X server picks a free display itself
/// (its lock files make that atomic between agents and anything else on the host) and
/// says which on the session's stdout once it accepts connections (`-displayfd`); the
/// agent reads it there and hands it back on stdin, the shell's cue to go on.
const DESKTOP_SCRIPT: &str = r#"
exec 3>&1
"$USHER_XVFB" -displayfd 3 -screen 0 "${USHER_GEOMETRY}x24" -nolisten tcp -auth "$XAUTHORITY" -noreset >/dev/null 2>&1 &
x=$!
exec 3>&-
trap 'kill $x 2>/dev/null' EXIT HUP TERM
read -r n || exit 1
export DISPLAY=":$n"
unset USHER_XVFB USHER_GEOMETRY
eval "$USHER_DESKTOP"
"#;

/// Writes the desktop's X cookie where only the account can read it (a root-owned
/// directory, so the account cannot swap the file for a link), in Xauthority format.
fn write_xauthority(
    spec: &DesktopSpec,
    session_id: &str,
    uid: u32,
    gid: u32,
) -> std::io::Result<PathBuf> {
    crate::fsutil::private_dir(&spec.auth_dir, 0o711)?;
    let path = spec.auth_dir.join(format!("{session_id}.xauth"));
    let _ = std::fs::remove_file(&path);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&path)?;
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid))?;
    file.write_all(&xauthority_entry(&spec.cookie))?;
    Ok(path)
}

/// One entry: any address (FamilyWild), any display (an empty number: the X server picks
/// it later), MIT-MAGIC-COOKIE-1.
fn xauthority_entry(cookie: &[u8]) -> Vec<u8> {
    fn field(out: &mut Vec<u8>, bytes: &[u8]) {
        out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        out.extend_from_slice(bytes);
    }
    let mut out = 0xffffu16.to_be_bytes().to_vec();
    field(&mut out, b"");
    field(&mut out, b"");
    field(&mut out, b"MIT-MAGIC-COOKIE-1");
    field(&mut out, cookie);
    out
}

/// The Xauthority file of a desktop session, removed when the session ends.
pub fn xauthority_path(auth_dir: &Path, session_id: &str) -> PathBuf {
    auth_dir.join(format!("{session_id}.xauth"))
}

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
        SessionCommand::Desktop(_) => (
            a.shell.clone(),
            shell_name,
            vec!["-c".to_string(), DESKTOP_SCRIPT.to_string()],
        ),
    };
    let mut env = login_env(sg, request);
    if let SessionCommand::Desktop(spec) = &request.command {
        let auth = write_xauthority(spec, &sg.session_id, a.uid, a.gid)?;
        env.extend([
            ("XAUTHORITY".to_string(), auth.display().to_string()),
            ("USHER_XVFB".to_string(), spec.xvfb.display().to_string()),
            (
                "USHER_GEOMETRY".to_string(),
                format!("{}x{}", spec.width, spec.height),
            ),
            ("USHER_DESKTOP".to_string(), spec.command.clone()),
        ]);
    }
    let mut groups = vec![a.gid];
    groups.extend(&a.groups);
    Ok(Launch {
        program,
        argv0,
        args,
        env,
        cwd: if a.home.is_dir() {
            a.home.clone()
        } else {
            "/".into()
        },
        uid: a.uid,
        gid: a.gid,
        groups,
        cgroup_procs: sg.cgroup.procs_file()?,
        exec_mode: sg.profile.exec.effective_mode(),
        home: a.home.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout libXau reads: family, address, number, name, data, each u16-prefixed.
    #[test]
    fn an_xauthority_entry_is_what_libxau_reads() {
        let e = xauthority_entry(&[0xab; 16]);
        assert_eq!(&e[..2], &[0xff, 0xff]);
        assert_eq!(&e[2..4], &[0, 0]);
        assert_eq!(&e[4..6], &[0, 0]);
        assert_eq!(&e[6..8], &[0, 18]);
        assert_eq!(&e[8..26], b"MIT-MAGIC-COOKIE-1");
        assert_eq!(&e[26..28], &[0, 16]);
        assert_eq!(&e[28..], &[0xab; 16]);
    }
}
