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

/// Whether the kernel blocks execs with EPERM (BPF-LSM) rather than a SIGKILL after the
/// exec (the tracepoint).
fn blocks_with_eperm(agent: &TestAgent) -> bool {
    let path = agent.status()["enforcement"]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        path.starts_with("bpf-lsm") || path.starts_with("tracepoint-sigkill"),
        "enforcement is not loaded: {path}"
    );
    path.starts_with("bpf-lsm")
}

/// The ways the session tries to run /usr/bin/id; each passes its own tag as an argument,
/// so that its exec event can be told from the others'. (name, how it is started by
/// python rather than a shell).
const ATTEMPTS: [(&str, bool); 11] = [
    ("path", false),
    ("symlink", false),
    ("hardlink", false),
    ("fexecve", true),
    ("memfd", true),
    ("sh-c", false),
    ("bash-script", false),
    ("shebang-sh", false),
    ("shebang-id", false),
    ("loader", false),
    ("exec-a", false),
];

fn tag(attempt: &str) -> String {
    format!("usher-attempt-{attempt}")
}

#[test]
fn a_denied_program_does_not_run_however_it_is_started() {
    let agent = enforcing_agent();
    let eperm = blocks_with_eperm(&agent);
    let login = agent.grant("deny", Some("no-id")).0;
    // A hard link and two scripts made by root (users may not link files they do not
    // own), outside the places the session can write (those are noexec in its mount
    // namespace, which would stop it before the kernel program is asked). /var/lib shares
    // /usr's file system here.
    let links = ScratchDir(std::path::PathBuf::from(format!(
        "/var/lib/usher-enforce-test-{}",
        std::process::id()
    )));
    std::fs::create_dir_all(&links.0).unwrap();
    let hard = links.0.join("hardlinked-id");
    std::fs::hard_link("/usr/bin/id", &hard).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let script = |name: &str, text: String| {
        let path = links.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    };
    let shebang_sh = script(
        "shebang-sh",
        format!("#!/bin/sh\nid {}\n", tag("shebang-sh")),
    );
    // The kernel runs /usr/bin/id with the script's path as its argument: the tag is in
    // the script's name.
    let shebang_id = script(&tag("shebang-id"), "#!/usr/bin/id\n".into());
    let script = format!(
        r#"
echo CONTROL-start
id {path}; echo "path:$?"
ln -s /usr/bin/id ~/symlinked; ~/symlinked {symlink}; echo "symlink:$?"
{hard} {hardlink}; echo "hardlink:$?"
python3 -c 'import os; fd = os.open("/usr/bin/id", os.O_RDONLY); os.execve(fd, ["id", "{fexecve}"], dict())'; echo "fexecve:$?"
python3 -c 'import os; fd = os.memfd_create("x"); os.write(fd, open("/usr/bin/id", "rb").read()); os.execve(fd, ["id", "{memfd}"], dict())'; echo "memfd:$?"
sh -c 'id {sh_c}'; echo "sh-c:$?"
printf 'id {bash_script}\n' > ~/script.sh; bash ~/script.sh; echo "bash-script:$?"
{shebang_sh}; echo "shebang-sh:$?"
{shebang_id}; echo "shebang-id:$?"
/lib64/ld-linux-x86-64.so.2 /usr/bin/id {loader}; echo "loader:$?"
bash -c 'exec -a innocent /usr/bin/id {exec_a}'; echo "exec-a:$?"
echo CONTROL-end
"#,
        path = tag("path"),
        symlink = tag("symlink"),
        hard = hard.display(),
        hardlink = tag("hardlink"),
        fexecve = tag("fexecve"),
        memfd = tag("memfd"),
        sh_c = tag("sh-c"),
        bash_script = tag("bash-script"),
        shebang_sh = shebang_sh.display(),
        shebang_id = shebang_id.display(),
        loader = tag("loader"),
        exec_a = tag("exec-a"),
    );
    let out = agent.ssh(&login, &script);
    let (stdout, stderr) = text(&out);
    assert!(
        stdout.contains("CONTROL-start") && stdout.contains("CONTROL-end"),
        "{stdout}\n{stderr}\n{}",
        agent.log()
    );
    // id, had it run, would have said so: its tags name no user.
    assert!(
        !stdout.contains("uid=") && !stderr.contains("no such user"),
        "a forbidden program ran:\n{stdout}\n{stderr}"
    );
    // Each attempt was blocked by the kernel: killed (137) on the tracepoint path, EPERM
    // from the exec on BPF-LSM (126 from a shell, a PermissionError from python).
    for (attempt, by_python) in ATTEMPTS {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{attempt}:")))
            .unwrap_or_else(|| panic!("no {attempt} line in {stdout}"));
        let expected = match (eperm, by_python) {
            (false, _) => "137",
            (true, false) => "126",
            (true, true) => "1",
        };
        assert_eq!(
            line,
            format!("{attempt}:{expected}"),
            "{attempt} was not blocked by the kernel:\n{stdout}\n{stderr}"
        );
    }
    if eperm {
        assert!(stderr.contains("Operation not permitted"), "{stderr}");
    }
    // The terminal says so, one line per block.
    assert!(stderr.contains("usher: blocked"), "{stderr}");

    let id = agent.recorded_sessions().pop().unwrap();
    let execs = agent.execs(&id);
    let blocked_verdict = if eperm { "denied" } else { "killed" };
    let killed: Vec<&serde_json::Value> = execs
        .iter()
        .filter(|e| e["verdict"] == blocked_verdict)
        .collect();
    // Each attempt has its own event: a block whose argv carries its tag.
    for (attempt, _) in ATTEMPTS {
        let tag = tag(attempt);
        let mine: Vec<&&serde_json::Value> = killed
            .iter()
            .filter(|e| {
                e["argv"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|v| v.as_str().is_some_and(|v| v.contains(&tag)))
                })
            })
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "{attempt}: {} blocks with its tag in the audit stream: {execs:#?}",
            mine.len()
        );
        assert!(
            mine[0]["rule"].is_string(),
            "{attempt}: a block without its rule"
        );
    }
    assert!(killed.iter().any(|e| e["rule"] == "deny /usr/bin/id"));
    let rule_of = |attempt: &str| {
        killed
            .iter()
            .find(|e| {
                e["argv"].as_array().is_some_and(|a| {
                    a.iter()
                        .any(|v| v.as_str().is_some_and(|v| v.contains(&tag(attempt))))
                })
            })
            .and_then(|e| e["rule"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    assert!(
        rule_of("memfd").contains("no file on disk"),
        "memfd not flagged: {}",
        rule_of("memfd")
    );
    assert!(
        rule_of("loader").contains("dynamic loader"),
        "loader not flagged: {}",
        rule_of("loader")
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
        .find(|e| {
            e["argv"] == serde_json::json!(["id", tag("path")]) && e["filename"] == "/usr/bin/id"
        })
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
    // A process left running in the session's cgroup tries id every 200 ms, and logs when
    // it tried and what id printed (nothing, when it was blocked).
    let out = agent.ssh(
        &login,
        "nohup sh -c 'for i in $(seq 1 100); do echo \"$(date +%s%N) $(id -u 2>/dev/null)\" >> ~/log; sleep 0.2; done' >/dev/null 2>&1 &",
    );
    assert!(out.status.success());
    let log_path = home_of(&login).join("log");
    let tries = || std::fs::read_to_string(&log_path).unwrap_or_default();
    agent.wait_for(10, "the loop to try id", || tries().lines().count() >= 2);
    // kill -9, as a crash would: the agent says nothing to the kernel on its way out. The
    // window while it is down counts as much as the time after it is back.
    let nanos = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    };
    let killed_at = nanos();
    agent.crash();
    let tried = |since: u128| {
        tries()
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .next()
                    .and_then(|t| t.parse::<u128>().ok())
                    .is_some_and(|t| t > since)
            })
            .count()
    };
    // The agent stays down while the loop tries id several times.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tried(killed_at) < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop stopped while the agent was down: {}",
            tries()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let relaunched_at = nanos();
    agent.launch();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while tried(relaunched_at) < 5 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop stopped after the restart: {}",
            tries()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = tries();
    let ran: Vec<&str> = log
        .lines()
        .filter(|l| l.split_whitespace().count() != 1)
        .collect();
    assert!(
        ran.is_empty(),
        "id ran (before, during or after the agent's down time):\n{log}"
    );
    assert!(
        log.lines().count() >= 12,
        "too few tries to prove anything:\n{log}"
    );
    assert!(agent.log().contains("tracepoint-sigkill") || agent.log().contains("bpf-lsm"));
}

/// Where the agent of `agent` pins its programs made unusable, for as long as it lives: a
/// dangling symbolic link in its place (bpffs allows them), so that loading fails for this
/// agent alone.
struct BrokenPins(std::path::PathBuf);

impl BrokenPins {
    fn new(agent: &TestAgent) -> BrokenPins {
        let pins = usher::enforce::pin_dir(&agent.dir.join("state"));
        let _ = usher::enforce::unpin(&agent.dir.join("state"));
        std::os::unix::fs::symlink(agent.dir.join("no-such-pin-dir"), &pins)
            .unwrap_or_else(|e| panic!("cannot put a dangling link at {}: {e}", pins.display()));
        BrokenPins(pins)
    }
}

impl Drop for BrokenPins {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn required_enforcement_refuses_sessions_when_the_programs_do_not_load() {
    let mut agent = enforcing_agent();
    let login = agent.grant("refused", Some("no-id")).0;
    // The control: with the programs loaded, the session runs.
    let out = agent.ssh(&login, "echo RAN-$((40+2))");
    assert!(
        text(&out).0.contains("RAN-42"),
        "{:?}\n{}",
        text(&out),
        agent.log()
    );
    let sessions_before = agent.recorded_sessions().len();
    // The next start of this agent cannot load its programs.
    agent.stop();
    let broken = BrokenPins::new(&agent);
    agent.launch();
    let path = agent.status()["enforcement"]["path"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(path.starts_with("unavailable"), "{path}");
    assert!(
        agent.log().contains("eBPF programs not loaded"),
        "{}",
        agent.log()
    );
    // No session: the client is told why, and nothing runs or is recorded.
    let out = agent.ssh(&login, "echo RAN-$((40+2))");
    let (stdout, stderr) = text(&out);
    assert!(!stdout.contains("RAN-42"), "a session ran: {stdout}");
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains("exec enforcement is required on this host but is unavailable"),
        "{stderr}"
    );
    agent.wait_for(5, "the refusal in the journal", || {
        agent
            .log()
            .contains("session refused: enforcement is required but unavailable")
    });
    assert_eq!(agent.recorded_sessions().len(), sessions_before);
    // With enforcement back, sessions run again.
    agent.stop();
    drop(broken);
    agent.launch();
    let out = agent.ssh(&login, "echo RAN-$((40+2))");
    assert!(text(&out).0.contains("RAN-42"), "{:?}", text(&out));
}
