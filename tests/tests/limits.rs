//! One session cannot starve the host: its cgroup holds it to the profile's limits
//! (processes, memory, CPU weight), or to the defaults, and the agent keeps itself out of
//! the OOM killer's way. Driven through real SSH sessions on the real kernel: a fork bomb
//! and a memory hog, each started only once the test has seen the limit that contains it
//! (on an agent without limits the test fails there, before it could harm the host).

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};
use usher_tests::*;

const TIGHT: &str =
    "name = \"tight\"\n[limits]\npids_max = 64\nmemory_max = \"192M\"\ncpu_weight = 50\n";

fn agent_with_tight_profile() -> TestAgent {
    TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"tight\"]\n".into(),
        profiles: vec![("tight.toml".into(), TIGHT.into())],
        ..Default::default()
    })
}

/// A session driven line by line: the script prints markers, the test answers on stdin.
struct LiveSession {
    child: Child,
    stdin: Option<ChildStdin>,
    out: BufReader<ChildStdout>,
}

impl LiveSession {
    fn start(agent: &TestAgent, login: &str, script: &str) -> LiveSession {
        let mut child = agent
            .ssh_command(login)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        LiveSession {
            stdin: child.stdin.take(),
            out: BufReader::new(child.stdout.take().unwrap()),
            child,
        }
    }

    /// The lines printed before `marker`.
    fn until(&mut self, agent: &TestAgent, marker: &str) -> Vec<String> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.out.read_line(&mut line).unwrap();
            assert!(
                n > 0,
                "the session ended before {marker:?}; it printed {lines:?}\n--- usherd log ---\n{}",
                agent.log()
            );
            let line = line.trim_end().to_string();
            if line == marker {
                return lines;
            }
            lines.push(line);
        }
    }

    fn say(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        drop(self.stdin.take());
        hang_up(&mut self.child);
    }
}

fn cgroups_of(lines: &[String]) -> SessionCgroups {
    let text: String = lines
        .iter()
        .filter(|l| l.contains(":/"))
        .map(|l| format!("{l}\n"))
        .collect();
    let cg = SessionCgroups::from_proc_cgroup(&text);
    for dir in cg.all() {
        assert!(
            dir.to_string_lossy().contains("/usher-sessions/") && dir.is_dir(),
            "not a live session cgroup: {} (from {text})",
            dir.display()
        );
    }
    cg
}

fn wait_gone(agent: &TestAgent, cg: &SessionCgroups) {
    agent.wait_for(
        15,
        "every cgroup of the session (v2 and v1) to be removed",
        || cg.all().iter().all(|d| !d.exists()),
    );
}

fn uid_of(login: &str) -> u32 {
    passwd()
        .into_iter()
        .find(|(n, _)| n == login)
        .map(|(_, u)| u)
        .expect("the account exists")
}

/// The host's RAM in bytes, as the agent reads it.
fn ram_bytes() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    kib * 1024
}

/// Whether this host lets root lower an OOM score (CAP_SYS_RESOURCE in the bounding set).
fn can_lower_oom_scores() -> bool {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    // CAP_SYS_RESOURCE is capability 24.
    bounding & (1 << 24) != 0
}

const PROBE: &str =
    "cat /proc/self/cgroup; echo oom=$(cat /proc/self/oom_score_adj); echo ready; read x; echo bye";

#[test]
fn the_limits_are_in_the_session_cgroups_with_defaults_and_the_agent_shields_itself_from_oom() {
    let agent = agent_with_tight_profile();
    let (tight, _) = agent.grant("tight", Some("tight"));
    let (plain, _) = agent.grant("plain", None);

    let mut s = LiveSession::start(&agent, &tight, PROBE);
    let lines = s.until(&agent, "ready");
    let cg = cgroups_of(&lines);
    assert_eq!(cg.pids_max(), Some(64), "pids limit of {cg:?}");
    assert_eq!(cg.memory_max(), Some(192 << 20), "memory limit of {cg:?}");
    assert_eq!(cg.cpu_weight(), Some(50), "CPU weight of {cg:?}");
    println!(
        "hybrid host: {}; session cgroups: {:?}",
        cg.hybrid(),
        cg.all()
    );

    // The agent is the last thing the OOM killer picks; a session the first.
    let agent_score: i32 = read_trimmed(std::path::Path::new(&format!(
        "/proc/{}/oom_score_adj",
        agent.pid()
    )))
    .parse()
    .unwrap();
    let session_score: i32 = lines
        .iter()
        .find_map(|l| l.strip_prefix("oom="))
        .and_then(|v| v.parse().ok())
        .expect("the session printed its OOM score");
    println!("oom_score_adj: usherd {agent_score}, session {session_score}");
    if can_lower_oom_scores() {
        assert!(
            agent_score <= -500,
            "usherd's oom_score_adj is {agent_score}"
        );
        assert_eq!(session_score, 0, "the session kept the agent's shield");
    } else {
        // Without CAP_SYS_RESOURCE (some sandboxes) nobody may go below 0: the sessions
        // go above the agent instead, and the journal says why.
        assert!(
            session_score >= agent_score + 500,
            "usherd {agent_score}, session {session_score}"
        );
        assert!(agent.log().contains("cannot lower usherd's OOM score"));
    }

    // Without [limits], the defaults.
    let mut d = LiveSession::start(&agent, &plain, PROBE);
    let dcg = cgroups_of(&d.until(&agent, "ready"));
    assert_eq!(dcg.pids_max(), Some(4096));
    let want = ram_bytes() / 100 * 25;
    let got = dcg.memory_max().expect("a default memory limit");
    // The kernel keeps whole pages; the agent rounds to whole MiB.
    assert!(
        got <= want && want - got < (1 << 20),
        "default memory limit {got}, want about {want}"
    );
    assert_eq!(dcg.cpu_weight(), Some(100));

    // The metadata says what the session was held to.
    s.say("");
    assert!(s.until(&agent, "bye").is_empty());
    d.say("");
    d.until(&agent, "bye");
    wait_gone(&agent, &cg);
    wait_gone(&agent, &dcg);
    let metas: Vec<serde_json::Value> = agent
        .recorded_sessions()
        .iter()
        .map(|id| agent.meta(id))
        .collect();
    let tight_meta = metas
        .iter()
        .find(|m| m["login"] == tight.as_str())
        .expect("the tight session's metadata");
    assert_eq!(tight_meta["limits"]["pids_max"], 64, "{tight_meta}");
    assert_eq!(tight_meta["limits"]["memory_max"], 192u64 << 20);
    assert_eq!(tight_meta["limits"]["cpu_weight"], 50);
    assert!(tight_meta["limits"].get("not_applied").is_none());
}

#[test]
fn a_fork_bomb_is_held_by_pids_max_while_another_grant_logs_in_and_works() {
    let agent = agent_with_tight_profile();
    let (bomber, bomber_jti) = agent.grant("bomber", Some("tight"));
    let (other, _) = agent.grant("other", None);

    let started = Instant::now();
    assert!(agent.ssh(&other, "true").status.success());
    let idle = started.elapsed();

    // The classic bomb, in a subshell so the session's shell needs no fork afterwards.
    let mut b = LiveSession::start(
        &agent,
        &bomber,
        "cat /proc/self/cgroup; echo ready; read x; (f(){ f | f & }; f) 2>/dev/null; echo bombed; read y",
    );
    let bcg = cgroups_of(&b.until(&agent, "ready"));
    assert_eq!(
        bcg.pids_max(),
        Some(64),
        "no pids limit on the session: the fork bomb is not started on an unprotected host"
    );
    let uid = uid_of(&bomber);
    b.say("go");
    b.until(&agent, "bombed");
    std::thread::sleep(Duration::from_secs(3));
    let current: u64 = read_trimmed(&bcg.pids.join("pids.current"))
        .parse()
        .unwrap();
    assert!(current <= 64, "{current} processes in the session");
    assert!(
        bcg.pids_refused() > 0,
        "the bomb never met the limit (pids.current {current})"
    );

    // Another grant's session logs in and runs a command while the bomb goes on.
    let started = Instant::now();
    let out = agent.ssh(&other, "echo still-served");
    let during = started.elapsed();
    println!(
        "login + command of another session: idle {:.2} s, during the fork bomb {:.2} s",
        idle.as_secs_f64(),
        during.as_secs_f64()
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("still-served"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(
        during < Duration::from_secs(8),
        "the second session took {during:?}"
    );
    assert!(
        read_trimmed(&bcg.pids.join("pids.current"))
            .parse::<u64>()
            .unwrap()
            > 8,
        "the bomb was gone before the second login was measured"
    );

    // The grant's end takes the bomb and every cgroup with it.
    assert!(agent
        .usher(&["grant", "revoke", &bomber_jti])
        .status
        .success());
    wait_gone(&agent, &bcg);
    agent.wait_for(10, "the bomb's processes to be gone", || {
        pids_of_uid(uid).is_empty()
    });
    drop(b);
}

#[test]
fn a_memory_hog_is_oom_killed_in_its_session_and_the_agent_survives() {
    let agent = agent_with_tight_profile();
    let (hog, _) = agent.grant("hog", Some("tight"));
    let (other, _) = agent.grant("calm", None);

    // 64 chunks of 16 MiB, each written: 1 GiB at most, even where nothing limits it.
    let script = "cat /proc/self/cgroup; echo ready; read x; \
        python3 -c 'k = [b\"x\" * (16 << 20) for _ in range(64)]; print(\"survived\")'; \
        echo exit=$?; echo done; read y";
    let mut s = LiveSession::start(&agent, &hog, script);
    let cg = cgroups_of(&s.until(&agent, "ready"));
    assert_eq!(
        cg.memory_max(),
        Some(192 << 20),
        "no memory limit on the session: the hog is not started on an unprotected host"
    );
    s.say("go");
    let said = s.until(&agent, "done");
    assert!(
        said.iter().any(|l| l == "exit=137") && !said.iter().any(|l| l == "survived"),
        "the hog was not killed: {said:?}"
    );
    assert!(
        cg.oom_kills() >= 1,
        "no OOM kill in {}",
        cg.memory.display()
    );

    // The agent lives, and serves: another session, and the control socket.
    let status = read_trimmed(std::path::Path::new(&format!(
        "/proc/{}/status",
        agent.pid()
    )));
    assert!(
        status.contains("usherd") && !status.contains("State:\tZ"),
        "usherd is gone:\n{}",
        agent.log()
    );
    let started = Instant::now();
    let out = agent.ssh(&other, "echo alive");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("alive"),
        "{}",
        agent.log()
    );
    assert!(started.elapsed() < Duration::from_secs(8));
    assert!(agent.usher(&["status"]).status.success());

    // The hog's shell outlived its child; it ends, and its cgroups go.
    s.say("");
    wait_gone(&agent, &cg);
}

#[test]
fn a_restarted_agent_removes_the_v1_groups_of_sessions_whose_grant_ended() {
    let mut agent = agent_with_tight_profile();
    let login = agent.login("gone");
    let mut c = agent.claims(&login, 8);
    c.profile = Some("tight".into());
    assert!(agent.install(&agent.sign(&c)).status.success());
    // A process left behind keeps the session's cgroups alive past its shell.
    let mut s = LiveSession::start(
        &agent,
        &login,
        "cat /proc/self/cgroup; (sleep 600 >/dev/null 2>&1 &); echo ready; read x",
    );
    let cg = cgroups_of(&s.until(&agent, "ready"));
    agent.crash();
    drop(s);
    std::thread::sleep(Duration::from_secs(9));
    assert!(
        cg.all().iter().all(|d| d.exists()),
        "nothing should have removed them while the agent was down"
    );
    agent.launch();
    wait_gone(&agent, &cg);
}

#[test]
fn a_limit_the_profile_sets_that_the_host_cannot_apply_refuses_the_session() {
    // pids.max takes at most PID_MAX_LIMIT (4194304): the kernel refuses this one.
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"huge\"]\n".into(),
        profiles: vec![(
            "huge.toml".into(),
            "name = \"huge\"\n[limits]\npids_max = 99999999\n".into(),
        )],
        ..Default::default()
    });
    let (login, _) = agent.grant("huge", Some("huge"));
    let out = agent.ssh(&login, "echo should-not-run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));
    assert!(
        stderr.contains("limits cannot be applied") && stderr.contains("pids"),
        "the client is not told why: {stderr}"
    );
    let log = agent.log();
    let line = log
        .lines()
        .find(|l| l.contains("the profile's pids limit cannot be applied"))
        .unwrap_or_else(|| panic!("the journal does not say why:\n{log}"));
    // Nothing of the refused session is left in any hierarchy.
    let id = line
        .split("session ")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .expect("the session id in the log line");
    let found = std::process::Command::new("find")
        .args([
            "/sys/fs/cgroup",
            "-maxdepth",
            "7",
            "-type",
            "d",
            "-name",
            id,
        ])
        .output()
        .unwrap();
    assert!(
        found.stdout.is_empty(),
        "cgroups of the refused session remain: {}",
        String::from_utf8_lossy(&found.stdout)
    );
    // The defaults are no promise: a default profile's session on the same host runs.
    let (plain, _) = agent.grant("plain", None);
    assert!(
        agent.ssh(&plain, "true").status.success(),
        "{}",
        agent.log()
    );
}
