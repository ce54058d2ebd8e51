//! Exec attribution and enforcement on the real kernel, through real SSH sessions: a
//! program a profile forbids does not run, however it is started; every exec is
//! attributed to its session and its parent.

use std::process::{Command, Stdio};
use std::time::Duration;
use usher_tests::*;

const DENY_ID: &str = "name = \"no-id\"\n[exec]\nmode = \"deny\"\npaths = [\"/usr/bin/id\"]\n";
const ALLOW_FEW: &str = "name = \"few\"\n[exec]\nmode = \"allow\"\npaths = [\"/usr/bin/bash\", \"/usr/bin/echo\", \"/usr/bin/cp\", \"/usr/bin/sleep\"]\n";

fn enforcing_agent() -> TestAgent {
    TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"no-id\", \"few\"]\n".into(),
        profiles: vec![
            ("no-id.toml".into(), DENY_ID.into()),
            ("few.toml".into(), ALLOW_FEW.into()),
        ],
        ..Default::default()
    })
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A directory the test made outside its own, removed however the test ends.
struct ScratchDir(std::path::PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_denied_program_does_not_run_however_it_is_started() {
    let agent = enforcing_agent();
    let login = agent.grant("deny", Some("no-id")).0;
    // A hard link made by root (users may not link files they do not own), outside the
    // places the session can write (those are noexec in its mount namespace, which would
    // stop it before the kernel program is asked). /var/lib shares /usr's file system here.
    let links = ScratchDir(std::path::PathBuf::from(format!(
        "/var/lib/usher-enforce-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&links.0).unwrap();
    let hard = links.0.join("hardlinked-id");
    std::fs::hard_link("/usr/bin/id", &hard).unwrap();
    let script = format!(
        r#"
echo CONTROL-start
id; echo "path:$?"
ln -s /usr/bin/id ~/symlinked; ~/symlinked; echo "symlink:$?"
{hard}; echo "hardlink:$?"
python3 -c 'import os; fd = os.open("/usr/bin/id", os.O_RDONLY); os.execve(fd, ["id"], dict())'; echo "fexecve:$?"
python3 -c 'import os; fd = os.memfd_create("x"); os.write(fd, open("/usr/bin/id", "rb").read()); os.execve(fd, ["id"], dict())'; echo "memfd:$?"
sh -c id; echo "sh-c:$?"
printf 'id\n' > ~/script.sh; bash ~/script.sh; echo "bash-script:$?"
printf '#!/bin/sh\nid\n' > ~/shebang; chmod +x ~/shebang; ~/shebang; echo "shebang-sh:$?"
printf '#!/usr/bin/id\n' > ~/shebang2; chmod +x ~/shebang2; ~/shebang2; echo "shebang-id:$?"
/lib64/ld-linux-x86-64.so.2 /usr/bin/id; echo "loader:$?"
bash -c 'exec -a innocent /usr/bin/id'; echo "exec-a:$?"
echo CONTROL-end
"#,
        hard = hard.display()
    );
    let out = agent.ssh(&login, &script);
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains("CONTROL-start") && stdout.contains("CONTROL-end"),
        "{stdout}\n{stderr}\n{}",
        agent.log()
    );
    assert!(
        !stdout.contains("uid="),
        "a forbidden program ran:\n{stdout}"
    );
    for attempt in [
        "path",
        "symlink",
        "hardlink",
        "fexecve",
        "memfd",
        "sh-c",
        "bash-script",
        "shebang-sh",
        "shebang-id",
        "loader",
        "exec-a",
    ] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{attempt}:")))
            .unwrap_or_else(|| panic!("no {attempt} line in {stdout}"));
        assert_ne!(
            line,
            format!("{attempt}:0"),
            "{attempt} succeeded:\n{stdout}"
        );
    }
    // The terminal says so, one line per block.
    assert!(stderr.contains("usher: blocked"), "{stderr}");

    let id = agent.recorded_sessions().pop().unwrap();
    let execs = agent.execs(&id);
    let killed: Vec<&serde_json::Value> =
        execs.iter().filter(|e| e["verdict"] == "killed").collect();
    // Nine are kills; the two scripts in the home fail earlier, at its noexec mount.
    assert!(
        killed.len() >= 9,
        "only {} kills recorded: {execs:#?}",
        killed.len()
    );
    assert!(
        killed.iter().all(|e| e["rule"].is_string()),
        "a block without its rule"
    );
    assert!(killed.iter().any(|e| e["rule"] == "deny /usr/bin/id"));
    assert!(
        killed
            .iter()
            .any(|e| e["rule"].as_str().unwrap().contains("no file on disk")),
        "memfd not flagged"
    );
    assert!(
        killed
            .iter()
            .any(|e| e["rule"].as_str().unwrap().contains("dynamic loader")),
        "loader not flagged"
    );
    // The fexecve shows the name the caller used, and the file it really was.
    let id_meta = std::fs::metadata("/usr/bin/id").unwrap();
    use std::os::unix::fs::MetadataExt;
    assert!(
        killed
            .iter()
            .any(|e| e["filename"].as_str().unwrap().starts_with("/dev/fd/")
                && e["ino"] == id_meta.ino()),
        "{killed:#?}"
    );
    // Attribution: the direct `id` is a child of the session's shell.
    let shell = execs
        .iter()
        .find(|e| e["argv"][0] == "bash" && e["argv"][1] == "-c")
        .expect("the session's shell");
    let direct = killed
        .iter()
        .find(|e| e["argv"] == serde_json::json!(["id"]) && e["filename"] == "/usr/bin/id")
        .expect("the direct id");
    assert_eq!(direct["ppid"], shell["pid"], "wrong parent");
    assert!(execs.iter().all(|e| e["cgroup_id"] == shell["cgroup_id"]));
    // The cast shows them as markers.
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    assert!(
        cast.contains("\"m\",\"blocked /usr/bin/id (deny /usr/bin/id)\""),
        "{cast}"
    );
    assert!(cast.contains("\"m\",\"exec "), "{cast}");
    assert_eq!(agent.meta(&id)["enforced"], true);
}

#[test]
fn an_allow_list_runs_only_what_it_lists_and_copies_are_strangers() {
    let agent = enforcing_agent();
    let login = agent.grant("allow", Some("few")).0;
    // A copy where the session may execute (root's, outside its noexec places): only the
    // file's identity can refuse it there.
    let copies = ScratchDir(std::path::PathBuf::from(format!(
        "/var/lib/usher-allow-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&copies.0).unwrap();
    std::fs::copy("/usr/bin/echo", copies.0.join("root-copy-of-echo")).unwrap();
    let out = agent.ssh(
        &login,
        &format!(
            "echo listed; cp /usr/bin/echo ~/renamed-echo; ~/renamed-echo copy-ran; echo \"copy:$?\"; \
             {}/root-copy-of-echo root-copy-ran; echo \"root-copy:$?\"; /usr/bin/true; echo \"unlisted:$?\"",
            copies.0.display()
        ),
    );
    let (stdout, stderr) = text(&out);
    assert!(stdout.contains("listed"), "{stdout}{stderr}");
    assert!(
        !stdout.contains("copy-ran"),
        "a renamed copy of an allowed program ran: {stdout}"
    );
    // Refused by the home's noexec mount (126), or killed by identity (137).
    assert!(
        stdout.contains("copy:126") || stdout.contains("copy:137"),
        "{stdout}"
    );
    assert!(!stdout.contains("root-copy-ran"), "{stdout}");
    assert!(stdout.contains("root-copy:137"), "{stdout}");
    assert!(stdout.contains("unlisted:137"), "{stdout}");
    let id = agent.recorded_sessions().pop().unwrap();
    assert!(agent
        .execs(&id)
        .iter()
        .any(|e| e["rule"] == "not in the profile's allow list"));
}

#[test]
fn sessions_do_not_affect_each_other_or_anything_outside() {
    let agent = enforcing_agent();
    let denied = agent.grant("deny2", Some("no-id")).0;
    let free = agent.grant("free", None).0;
    // A live restricted session while the others run.
    let live = agent
        .ssh_command(&denied)
        .arg("sleep 5; id; echo \"late:$?\"")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let out = agent.ssh(&free, "id -un");
    assert_eq!(
        text(&out).0.trim(),
        free,
        "the default profile blocked id: {:?}",
        text(&out)
    );
    // Outside every session: the test itself runs id.
    let out = Command::new("/usr/bin/id").arg("-u").output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0");
    let late = live.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&late.stdout).contains("late:137"),
        "{:?}",
        text(&late)
    );
}

#[test]
fn a_restarted_agent_enforces_the_profiles_of_live_sessions_again() {
    let mut agent = enforcing_agent();
    let login = agent.grant("linger", Some("no-id")).0;
    // A process left running in the session's cgroup tries id every 200 ms.
    let out = agent.ssh(
        &login,
        "nohup sh -c 'for i in $(seq 1 60); do echo \"$(date +%s%N) $(id -u 2>/dev/null)\" >> ~/log; sleep 0.2; done' >/dev/null 2>&1 &",
    );
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(1000));
    agent.stop();
    agent.launch();
    let restarted = (now() as u128 + 1) * 1_000_000_000;
    std::thread::sleep(Duration::from_secs(3));
    let home = format!("/home/{login}/log");
    let log = std::fs::read_to_string(&home).unwrap();
    let after: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .next()
                .and_then(|t| t.parse::<u128>().ok())
                .is_some_and(|t| t > restarted)
        })
        .collect();
    assert!(after.len() >= 5, "the loop stopped: {log}");
    assert!(
        after.iter().all(|l| l.split_whitespace().count() == 1),
        "id ran after the restart:\n{log}"
    );
    assert!(agent.log().contains("tracepoint-sigkill") || agent.log().contains("bpf-lsm"));
}
