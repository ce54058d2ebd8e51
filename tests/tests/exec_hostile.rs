//! The exec policy, attacked from inside an approved session with the real `ssh`: code the
//! user wrote must not run without an exec (`LD_PRELOAD`, `enable -f`), enforcement must
//! not pause while the agent is down, and a session that executes faster than it is
//! recorded loses events visibly, never the agent's memory.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use usher_tests::*;

const ALLOW_FEW: &str = "name = \"few\"\n[exec]\nmode = \"allow\"\npaths = [\"/usr/bin/bash\", \"/usr/bin/ls\", \"/usr/bin/cat\"]\n";
const DENY_ID: &str = "name = \"no-id\"\n[exec]\nmode = \"deny\"\npaths = [\"/usr/bin/id\"]\n";

fn enforcing_agent() -> TestAgent {
    TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"few\", \"no-id\"]\n".into(),
        profiles: vec![
            ("few.toml".into(), ALLOW_FEW.into()),
            ("no-id.toml".into(), DENY_ID.into()),
        ],
        ..Default::default()
    })
}

/// Files the test makes outside the test's directory, removed however the test ends.
struct Scratch(Vec<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// What ran in one session: the lines it printed, and which markers its library left.
struct Attempt {
    stdout: String,
    stderr: String,
    ran: Vec<&'static str>,
}

const PLACES: [&str; 4] = ["home", "tmp", "shm", "enable"];

/// The user writes the library into their home, /tmp and /dev/shm (with `cat`, which
/// every profile here allows), then tries to run it without an exec of it.
fn try_library(agent: &TestAgent, login: &str, library: &Path, scratch: &mut Scratch) -> Attempt {
    let tag = format!("usher-{login}");
    let tmp = PathBuf::from(format!("/tmp/{tag}.so"));
    let shm = PathBuf::from(format!("/dev/shm/{tag}.so"));
    scratch.0.extend([tmp.clone(), shm.clone()]);
    let script = format!(
        r#"
cat > "$HOME/x.so"
cat "$HOME/x.so" > {tmp}
cat "$HOME/x.so" > {shm}
USHER_MARKER=$HOME/m-home LD_PRELOAD=$HOME/x.so /usr/bin/ls / > /dev/null; echo "home:$?"
USHER_MARKER=$HOME/m-tmp LD_PRELOAD={tmp} /usr/bin/ls / > /dev/null; echo "tmp:$?"
USHER_MARKER=$HOME/m-shm LD_PRELOAD={shm} /usr/bin/ls / > /dev/null; echo "shm:$?"
export USHER_MARKER=$HOME/m-enable; enable -f "$HOME/x.so" usher_marker; echo "enable:$?"
echo CONTROL-end
"#,
        tmp = tmp.display(),
        shm = shm.display()
    );
    let out = agent
        .ssh_command(login)
        .arg(script)
        .stdin(std::fs::File::open(library).unwrap())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stdout.contains("CONTROL-end"),
        "the session did not run its script:\n{stdout}\n{stderr}\n{}",
        agent.log()
    );
    let home = home_of(login);
    let ran = PLACES
        .iter()
        .copied()
        .filter(|p| home.join(format!("m-{p}")).exists())
        .collect();
    Attempt {
        stdout,
        stderr,
        ran,
    }
}

#[test]
fn a_library_the_user_wrote_does_not_run_in_an_enforced_session() {
    let agent = enforcing_agent();
    let library = marker_library(&agent.dir);
    let mut scratch = Scratch(vec![]);

    // The control: with enforcement off for the profile (audit), the library does run
    // everywhere: the test can see it when it happens.
    let open = agent.grant("audit", None).0;
    let control = try_library(&agent, &open, &library, &mut scratch);
    assert_eq!(
        control.ran,
        PLACES.to_vec(),
        "the control session did not run the library:\n{}\n{}",
        control.stdout,
        control.stderr
    );

    for (name, profile) in [("allow", "few"), ("deny", "no-id")] {
        let login = agent.grant(name, Some(profile)).0;
        let attempt = try_library(&agent, &login, &library, &mut scratch);
        assert!(
            attempt.ran.is_empty(),
            "profile {profile}: the user's library ran ({:?}):\n{}\n{}",
            attempt.ran,
            attempt.stdout,
            attempt.stderr
        );
        // The allowed program itself still runs, only without the library.
        for place in ["home", "tmp", "shm"] {
            assert!(
                attempt.stdout.contains(&format!("{place}:0")),
                "profile {profile}: ls did not run ({place}):\n{}\n{}",
                attempt.stdout,
                attempt.stderr
            );
        }
        assert!(
            !attempt.stdout.contains("enable:0"),
            "profile {profile}: enable -f succeeded:\n{}",
            attempt.stdout
        );
        // The session's noexec binds stay in its own mount namespace.
        let host_mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let home = home_of(&login);
        assert!(
            !host_mounts.contains(&format!(" {} ", home.display())),
            "a session's mount reached the host:\n{host_mounts}"
        );
    }
}

#[test]
fn enforcement_does_not_pause_while_the_agent_is_down() {
    let mut agent = enforcing_agent();
    let login = agent.grant("crash", Some("no-id")).0;
    // A process that outlives the connection waits in the session's cgroup for the
    // signal, then tries the forbidden program.
    let out = agent.ssh(
        &login,
        r#"nohup bash -c 'while [ ! -e "$HOME/go" ]; do sleep 0.1; done; /usr/bin/id > "$HOME/id.out"; echo "status:$?" > "$HOME/result"' > /dev/null 2>&1 &
echo started"#,
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("started"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    let id = agent.recorded_sessions().pop().expect("a recorded session");
    let home = home_of(&login);

    agent.crash();
    std::fs::write(home.join("go"), "").unwrap();
    let result = wait_for_file(&home.join("result"), Duration::from_secs(20))
        .expect("the waiting process reported nothing");
    assert_eq!(
        result.trim(),
        "status:137",
        "the forbidden program was not killed while the agent was down (id printed: {:?})",
        std::fs::read_to_string(home.join("id.out")).unwrap_or_default()
    );

    // The next agent takes the pinned state over and reads the event that waited.
    agent.launch();
    agent.wait_for(20, "the down window's kill in the audit stream", || {
        agent.execs(&id).iter().any(|e| {
            e["verdict"] == "killed"
                && e["rule"] == "deny /usr/bin/id"
                && e["filename"] == "/usr/bin/id"
        })
    });
    assert!(
        agent
            .log()
            .contains("taking over the programs and maps pinned"),
        "{}",
        agent.log()
    );
}

#[test]
fn a_session_that_outruns_its_recording_loses_events_counted() {
    let agent = TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        ..Default::default()
    });
    let login = agent.grant("flood", None).0;
    let storm_done = |login: &str| user_exists(login) && home_of(login).join("storm-done").exists();
    const EXECS: usize = 4000;
    // The client reads nothing while the session floods its output: the session's relay
    // waits on the channel, and its exec events pile up behind it.
    let script = format!(
        r#"(for i in $(seq {EXECS}); do /bin/true; done; echo done > "$HOME/storm-done") &
head -c 50000000 /dev/zero
wait"#
    );
    let mut client = agent
        .ssh_command(&login)
        .arg(script)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdout = client.stdout.take().unwrap();
    agent.wait_for(60, "the exec storm to end", || storm_done(&login));
    // Now the client reads: the session drains and ends.
    let mut sink = Vec::new();
    std::io::copy(&mut stdout, &mut sink).unwrap();
    let _ = client.wait();

    let id = agent.recorded_sessions().pop().expect("a recorded session");
    let lost_total = |agent: &TestAgent| -> u64 {
        agent
            .audit(&id)
            .iter()
            .filter(|e| e["event"] == "exec_events_lost")
            .filter_map(|e| e["lost"].as_u64())
            .sum()
    };
    agent.wait_for(20, "the loss in the audit stream", || {
        lost_total(&agent) > 0
    });
    // Every exec is accounted for: recorded, or counted as lost (the kernel's own ring
    // could lose some too; those are counted in `usher status`).
    std::thread::sleep(Duration::from_millis(500));
    let trues = agent
        .execs(&id)
        .iter()
        .filter(|e| e["path"] == "/usr/bin/true" || e["filename"] == "/bin/true")
        .count() as u64;
    let lost = lost_total(&agent);
    let status = agent.usher(&["status", "--json"]);
    let kernel_lost = serde_json::from_slice::<serde_json::Value>(&status.stdout)
        .ok()
        .and_then(|v| v["enforcement"]["lost_events"].as_u64())
        .unwrap_or(0);
    eprintln!(
        "{EXECS} execs: {trues} recorded, {lost} lost (queue), {kernel_lost} lost (kernel ring)"
    );
    assert!(
        trues + lost + kernel_lost >= EXECS as u64,
        "{trues} recorded + {lost} lost + {kernel_lost} lost by the kernel < {EXECS} execs"
    );
    assert!(
        agent.log().contains("exec event(s) lost"),
        "the journal does not say so:\n{}",
        agent.log()
    );
}

#[test]
fn a_console_session_is_confined_like_an_ssh_one() {
    const CONSOLE_DENY: &str =
        "name = \"console\"\nconsole = true\n[exec]\nmode = \"deny\"\npaths = [\"/usr/bin/id\"]\n";
    let agent = TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"console\"]\n".into(),
        profiles: vec![("console.toml".into(), CONSOLE_DENY.into())],
        ..Default::default()
    });
    let login = agent.login("con");
    let mut c = agent.claims(&login, 600);
    c.profile = Some("console".into());
    c.secret_hash = Some(usher::grant::console_secret_hash("s3cret").unwrap());
    let out = agent.install(&agent.sign(&c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A console grant makes its account at once; the library goes into its home.
    let home = home_of(&login);
    let library = marker_library(&agent.dir);
    std::fs::copy(&library, home.join("x.so")).unwrap();
    // `su -` runs the account's login shell, which hands the terminal to the agent: a
    // console session, spawned by the same code as an SSH one.
    let out = std::process::Command::new("timeout")
        .args([
            "30",
            "su",
            "-",
            &login,
            "-c",
            "USHER_MARKER=$HOME/m-console LD_PRELOAD=$HOME/x.so /usr/bin/ls / > /dev/null; echo \"ls:$?\"",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("ls:0"),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(
        !home.join("m-console").exists(),
        "the library ran in a console session: {text}"
    );
    let id = agent.recorded_sessions().pop().unwrap();
    assert_eq!(agent.meta(&id)["kind"], "console");
}

#[test]
fn the_programs_outlive_a_stop_and_go_with_removal() {
    let mut agent = enforcing_agent();
    let pins = usher::enforce::pin_dir(&agent.dir.join("state"));
    assert!(pins.is_dir(), "nothing pinned in {}", pins.display());
    // An orderly stop (an upgrade's restart) leaves enforcement in place.
    agent.stop();
    let pinned: Vec<String> = std::fs::read_dir(&pins)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        pinned.iter().any(|n| n == "link-sched_process_exec"),
        "{pinned:?}"
    );
    // Removal takes it away.
    let out = std::process::Command::new(bin("usherd"))
        .arg("--config")
        .arg(&agent.config_path)
        .arg("--remove-accounts")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pins.exists(), "still pinned: {}", pins.display());
}
