//! Approval of risky commands on the real kernel (fanotify holds the exec, the BPF exec
//! program stands in when the agent is gone), with the real `ssh` client and the real
//! `usher approve`/`deny`.
//!
//! The approval-class programs are copies of `touch` in a directory the test makes, so
//! that no other test's (or the host's) execs are held.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};
use usher_tests::*;

/// A directory of approval-class programs, removed however the test ends.
struct Held {
    dir: PathBuf,
}

impl Held {
    fn new(tag: &str) -> Held {
        // /var/lib: root's, not noexec in the session's mount namespace.
        let dir = PathBuf::from(format!(
            "/var/lib/usher-approval-test-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("held")).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.join("held"), std::fs::Permissions::from_mode(0o755)).unwrap();
        for path in [
            dir.join("risky"),
            dir.join("held").join("also-risky"),
            dir.join("harmless"),
        ] {
            std::fs::copy("/usr/bin/touch", &path).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        Held { dir }
    }

    fn risky(&self) -> String {
        self.dir.join("risky").display().to_string()
    }

    fn in_dir(&self) -> String {
        self.dir
            .join("held")
            .join("also-risky")
            .display()
            .to_string()
    }

    fn harmless(&self) -> String {
        self.dir.join("harmless").display().to_string()
    }

    fn profile(&self, extra: &str) -> String {
        format!(
            "name = \"guarded\"\n[exec]\napprove = [\"{}\", \"{}\"]\napprove_commands = [\"touch *held-by-pattern*\"]\n[approval]\n{extra}\n",
            self.risky(),
            self.dir.join("held").display()
        )
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn agent_with(held: &Held, approval: &str) -> TestAgent {
    TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"guarded\"]\n".into(),
        profiles: vec![("guarded.toml".into(), held.profile(approval))],
        ..Default::default()
    })
}

/// The pending requests the host lists (JSON).
fn pending(agent: &TestAgent) -> Vec<serde_json::Value> {
    let out = agent.usher(&["--json", "approvals"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter()
        .filter(|s| s["state"] == "pending")
        .collect()
}

/// Waits for the one pending request and returns it.
fn wait_pending(agent: &TestAgent) -> serde_json::Value {
    let mut found = None;
    agent.wait_for(20, "a pending approval request", || {
        found = pending(agent).into_iter().next();
        found.is_some()
    });
    found.unwrap()
}

fn decide(agent: &TestAgent, verb: &str, id: &str, as_user: Option<&str>) -> std::process::Output {
    let mut c = std::process::Command::new(usher_test_support::built_binary("usher"));
    c.arg("--socket").arg(agent.dir.join("control.sock"));
    c.args([verb, id, "--comment", "from the test"]);
    match as_user {
        Some(u) => c.env("SUDO_USER", u),
        None => c.env_remove("SUDO_USER"),
    };
    c.output().unwrap()
}

fn home_file(login: &str, name: &str) -> PathBuf {
    home_of(login).join(name)
}

fn audit_events(agent: &TestAgent) -> Vec<String> {
    let mut events = Vec::new();
    for id in agent.recorded_sessions() {
        for line in agent.audit(&id) {
            if let Some(e) = line["event"].as_str() {
                events.push(e.to_string());
            }
        }
    }
    events
}

#[test]
fn an_approved_command_runs_in_the_foreground_and_a_denied_one_fails_with_eperm() {
    let held = Held::new("approve");
    let agent = agent_with(&held, "timeout_secs = 60");
    let login = agent.grant("ap", Some("guarded")).0;
    let mut term = agent.terminal(&login);
    term.send("echo READY\n");
    term.expect("READY", 20);
    // The shell's own job control: the held command is its foreground job.
    term.send(&format!("{} ~/approved; echo rc=$?\n", held.risky()));
    term.expect("waits for approval", 20);
    let request = wait_pending(&agent);
    let id = request["request"]["id"].as_str().unwrap().to_string();
    assert!(term.screen().contains(&id), "{}", term.screen());
    assert!(
        request["request"]["command"]
            .as_str()
            .unwrap()
            .contains("approved"),
        "the command line is the exec's: {request}"
    );
    assert!(
        !home_file(&login, "approved").exists(),
        "nothing ran before the approval"
    );
    let out = decide(&agent, "approve", &id, Some("bob"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    term.expect("rc=0", 20);
    assert!(home_file(&login, "approved").exists());

    // Denied: the exec fails (EPERM), the shell says so, nothing ran.
    term.send(&format!("{} ~/denied; echo rc=$?\n", held.in_dir()));
    term.expect("waits for approval", 20);
    let id = wait_pending(&agent)["request"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let out = decide(&agent, "deny", &id, None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    term.expect("rc=126", 20);
    assert!(
        term.screen().contains("Operation not permitted"),
        "{}",
        term.screen()
    );
    assert!(!home_file(&login, "denied").exists());

    // A copy of a held program in a place the session can write does not run (the
    // session is confined like a deny list's: noexec), nor from memory.
    term.send(&format!(
        "cp {} ~/copy && ~/copy ~/copied; echo copy-rc=$?\n",
        held.risky()
    ));
    term.expect("copy-rc=126", 10);
    assert!(!home_file(&login, "copied").exists());
    term.send(&format!(
        "python3 -c 'import os; fd = os.memfd_create(\"x\"); os.write(fd, open(\"{}\", \"rb\").read()); os.execve(fd, [\"t\", os.path.expanduser(\"~/from-memory\")], dict())'; echo memfd-rc=$?\n",
        held.risky()
    ));
    term.expect("memfd-rc=", 10);
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !home_file(&login, "from-memory").exists(),
        "{}",
        term.screen()
    );

    // A program the profile does not hold runs at once.
    let started = Instant::now();
    term.send(&format!("{} ~/free; echo free-rc=$?\n", held.harmless()));
    term.expect("free-rc=0", 10);
    assert!(started.elapsed() < Duration::from_secs(5));
    term.send("exit\n");
    term.wait(10);
    agent.wait_for(10, "the audit of the decisions", || {
        let events = audit_events(&agent);
        events.iter().filter(|e| *e == "approval_requested").count() == 2
            && events.iter().any(|e| e == "approval_granted")
            && events.iter().any(|e| e == "approval_denied")
    });
}

#[test]
fn no_decision_in_time_is_a_denial_and_ctrl_c_cancels_without_disturbing_the_shell() {
    let held = Held::new("timeout");
    let agent = agent_with(&held, "timeout_secs = 2");
    let login = agent.grant("to", Some("guarded")).0;
    let mut term = agent.terminal(&login);
    term.send("echo READY\n");
    term.expect("READY", 20);
    term.send(&format!("{} ~/late; echo rc=$?\n", held.risky()));
    term.expect("waits for approval", 20);
    term.expect("not approved in time", 10);
    term.expect("rc=126", 10);
    assert!(!home_file(&login, "late").exists());

    // Ctrl-C while it waits: the command is interrupted, the request cancelled, and the
    // shell goes on.
    term.send(&format!("{} ~/interrupted\n", held.risky()));
    term.expect("waits for approval", 20);
    let _ = wait_pending(&agent);
    term.send("\x03");
    term.expect("cancelled", 10);
    term.send("echo after-ctrl-c\n");
    term.expect("after-ctrl-c", 10);
    assert!(pending(&agent).is_empty());
    assert!(!home_file(&login, "interrupted").exists());
    term.send("exit\n");
    term.wait(10);
}

#[test]
fn the_requester_cannot_approve_and_two_approvers_are_two_people() {
    let held = Held::new("nofm");
    let agent = agent_with(&held, "required = 2\ntimeout_secs = 60");
    let login = agent.grant("nm", Some("guarded")).0;
    let mut client = agent
        .ssh_command(&login)
        .arg(format!("{} ~/two; echo rc=$?", held.risky()))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_pending(&agent)["request"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The grant's subject is alice@example.test: as "alice", or as the account, refused.
    for me in ["alice", "alice@example.test", login.as_str()] {
        let out = decide(&agent, "approve", &id, Some(me));
        assert!(!out.status.success(), "{me} approved their own command");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("own"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = decide(&agent, "approve", &id, Some("bob"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = decide(&agent, "approve", &id, Some("bob"));
    assert!(!out.status.success(), "bob counted twice");
    assert_eq!(
        pending(&agent).len(),
        1,
        "one approval of two is not enough"
    );
    assert!(!home_file(&login, "two").exists());
    let out = decide(&agent, "approve", &id, Some("carol"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = wait_output(&mut client, 20);
    assert!(String::from_utf8_lossy(&out.0).contains("rc=0"), "{out:?}");
    assert!(home_file(&login, "two").exists());
    // Unknown ids are refused with a clear error.
    let out = decide(&agent, "approve", "apr-nonexistent", Some("bob"));
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no pending request"));
}

#[test]
fn an_exec_request_matching_a_pattern_waits_before_anything_starts() {
    let held = Held::new("pattern");
    let agent = agent_with(&held, "timeout_secs = 60");
    let login = agent.grant("pt", Some("guarded")).0;
    // Approved: it starts, and says so on stderr first.
    let mut client = agent
        .ssh_command(&login)
        .arg("touch ~/held-by-pattern-yes")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let request = wait_pending(&agent);
    assert_eq!(request["request"]["kind"], "ssh_exec");
    assert!(!home_file(&login, "held-by-pattern-yes").exists());
    let id = request["request"]["id"].as_str().unwrap().to_string();
    assert!(decide(&agent, "approve", &id, Some("bob")).status.success());
    let (_, stderr, status) = wait_output(&mut client, 20);
    assert!(status.success(), "{}", String::from_utf8_lossy(&stderr));
    assert!(String::from_utf8_lossy(&stderr).contains("waits for approval"));
    assert!(home_file(&login, "held-by-pattern-yes").exists());
    // Denied: nothing starts, exit status 126.
    let mut client = agent
        .ssh_command(&login)
        .arg("touch ~/held-by-pattern-no")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = wait_pending(&agent)["request"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(decide(&agent, "deny", &id, None).status.success());
    let (_, stderr, status) = wait_output(&mut client, 20);
    assert_eq!(
        status.code(),
        Some(126),
        "{}",
        String::from_utf8_lossy(&stderr)
    );
    assert!(String::from_utf8_lossy(&stderr).contains("denied"));
    assert!(!home_file(&login, "held-by-pattern-no").exists());
    // A command the patterns do not name starts at once.
    let out = agent.ssh(&login, "touch ~/free && echo ok");
    assert!(String::from_utf8_lossy(&out.stdout).contains("ok"));
}

#[test]
fn a_killed_agent_with_a_request_pending_lets_nothing_run_and_others_are_unaffected() {
    let held = Held::new("crash");
    let mut agent = agent_with(&held, "timeout_secs = 60");
    let login = agent.grant("cr", Some("guarded")).0;
    // A process outside every session runs an approval-class program at once, while a
    // session that holds it is live.
    let outside = held.dir.join("outside-marker");
    let mut shell = agent.terminal(&login);
    shell.send("echo READY\n");
    shell.expect("READY", 20);
    let started = Instant::now();
    let st = std::process::Command::new(held.risky())
        .arg(&outside)
        .status()
        .unwrap();
    assert!(st.success() && outside.exists());
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(shell);

    // The held exec of a session whose agent dies: fanotify lets it go when its
    // descriptor closes, and the exec program kills it (no permit) before it runs.
    let marker = home_file(&login, "after-crash");
    let rc = home_file(&login, "rc");
    let mut client = agent
        .ssh_command(&login)
        .arg(format!(
            "setsid sh -c '{} {}; echo $? > {}' </dev/null >/dev/null 2>&1 & sleep 30",
            held.risky(),
            marker.display(),
            rc.display()
        ))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _ = wait_pending(&agent);
    agent.crash();
    let _ = client.kill();
    let _ = client.wait();
    wait_for_file(&rc, Duration::from_secs(10)).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let code = std::fs::read_to_string(&rc).unwrap();
    assert!(!marker.exists(), "the program ran without approval");
    // 128 + SIGKILL: killed before its first instruction.
    assert_eq!(code.trim(), "137", "exit status of the held program");
    // Restarted, the agent holds again.
    agent.launch();
    let out = agent.usher(&["approvals"]);
    assert!(out.status.success());
}

/// Waits for a client to exit: (stdout, stderr, status).
fn wait_output(
    child: &mut std::process::Child,
    secs: u64,
) -> (Vec<u8>, Vec<u8>, std::process::ExitStatus) {
    use std::io::Read;
    let status = poll_until(
        "the ssh client to exit",
        Duration::from_secs(secs),
        Duration::from_millis(50),
        || child.try_wait().unwrap(),
    )
    .unwrap_or_else(|e| {
        let _ = child.kill();
        panic!("{e}")
    });
    let mut out = Vec::new();
    let mut err = Vec::new();
    if let Some(mut s) = child.stdout.take() {
        let _ = s.read_to_end(&mut out);
    }
    if let Some(mut s) = child.stderr.take() {
        let _ = s.read_to_end(&mut err);
    }
    (out, err, status)
}
