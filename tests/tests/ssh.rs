//! The SSH slice end to end: real OpenSSH clients against `usherd` on loopback.

use std::process::{Command, Stdio};
use std::time::Duration;
use usher_tests::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn key_bound_login_runs_a_command_as_a_fresh_account_and_is_recorded() {
    let agent = TestAgent::start();
    let login = agent.login("alice");
    let out = agent.install(&agent.sign(&agent.claims(&login, 600)));
    assert!(out.status.success(), "{}", text(&out));

    let out = agent.ssh(&login, "id -un; id -u; pwd; echo 'héllo wörld'; exit 7");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(7),
        "{}\n{}",
        text(&out),
        agent.log()
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], login);
    let uid: u32 = lines[1].parse().unwrap();
    assert!(
        (agent.uid_min..=agent.uid_max).contains(&uid),
        "uid {uid} outside the range"
    );
    assert_eq!(lines[2], format!("/home/{login}"));
    assert_eq!(lines[3], "héllo wörld");

    // The account: locked password, an expiry date, made by useradd.
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let entry = shadow
        .lines()
        .find(|l| l.starts_with(&format!("{login}:")))
        .unwrap();
    let fields: Vec<&str> = entry.split(':').collect();
    assert!(fields[1].starts_with('!'), "password not locked: {entry}");
    assert!(!fields[7].is_empty(), "no account expiry: {entry}");

    // The recording: cast, audit stream, metadata, all 0600.
    let ids = agent.recorded_sessions();
    assert_eq!(ids.len(), 1);
    let meta = agent.meta(&ids[0]);
    assert_eq!(meta["login"], login.as_str());
    assert_eq!(meta["grant"]["sub"], "alice@example.test");
    assert_eq!(meta["grant"]["approved_by"], "bob@example.test");
    assert_eq!(meta["grant"]["reason"], "end-to-end test");
    assert_eq!(meta["exit_status"], 7);
    assert!(meta["ended_at"].is_string());
    use std::os::unix::fs::PermissionsExt;
    for ext in ["cast", "json", "audit.jsonl"] {
        let p = agent.spool().join(format!("{}.{ext}", ids[0]));
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", p.display());
    }
    let cast = std::fs::read_to_string(agent.spool().join(format!("{}.cast", ids[0]))).unwrap();
    assert!(cast.contains("héllo wörld"), "{cast}");
    // The real asciinema parses and prints it (it wants a terminal: give it one).
    let cast_path = agent.spool().join(format!("{}.cast", ids[0]));
    let out = Command::new("script")
        .args([
            "-qec",
            &format!("asciinema cat {}", cast_path.display()),
            "/dev/null",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("héllo wörld"),
        "{}",
        text(&out)
    );
    // And `usher play` replays it.
    let out = Command::new(bin("usher"))
        .args(["play", "--speed", "50"])
        .arg(&cast_path)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("héllo wörld"),
        "{}",
        text(&out)
    );
}

#[test]
fn second_login_on_the_same_grant_reuses_the_account() {
    let agent = TestAgent::start();
    let login = agent.login("bob");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let first = agent.ssh(&login, "id -u; touch marker");
    assert!(first.status.success(), "{}", text(&first));
    let second = agent.ssh(&login, "id -u; ls marker");
    assert!(second.status.success(), "{}", text(&second));
    let uid1 = String::from_utf8_lossy(&first.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    let uid2 = String::from_utf8_lossy(&second.stdout)
        .lines()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(uid1, uid2);
    assert_eq!(
        agent.log().matches("USHER_EVENT=account_created").count(),
        1,
        "{}",
        agent.log()
    );
}

#[test]
fn a_pty_session_driven_by_a_script_records_output_and_resizes() {
    let agent = TestAgent::start();
    let login = agent.login("carol");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    // A real terminal for ssh, from Python's pty module: type commands, resize the window
    // (ssh forwards SIGWINCH as window-change), read until the shell exits.
    let driver = r#"
import os, pty, sys, time, fcntl, termios, struct, select
args = sys.argv[1:]
pid, fd = pty.fork()
if pid == 0:
    os.execvp(args[0], args)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
out = b""
def pump(secs):
    global out
    end = time.time() + secs
    while time.time() < end:
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return False
            if not data:
                return False
            out += data
    return True
pump(1.5)
os.write(fd, b"stty size; echo MARK-$((6*7))\r")
pump(1.0)
fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
os.kill(pid, 28)
pump(1.0)
os.write(fd, b"stty size; exit 5\r")
pump(3.0)
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode("utf-8", "replace"))
sys.stdout.write("\nEXIT=%d\n" % os.waitstatus_to_exitcode(status))
"#;
    let mut cmd = Command::new("python3");
    cmd.arg("-c")
        .arg(driver)
        .arg("ssh")
        .args(agent.ssh_base_args());
    cmd.args(["-tt", "-o", "BatchMode=yes", "-i"])
        .arg(&agent.client_key)
        .args(["-p", &agent.port.to_string()])
        .arg(format!("{login}@127.0.0.1"));
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("MARK-42"),
        "{}\n{}",
        text(&out),
        agent.log()
    );
    assert!(stdout.contains("24 80"), "{stdout}");
    assert!(
        stdout.contains("40 100"),
        "resize did not reach the shell: {stdout}"
    );
    assert!(stdout.contains("EXIT=5"), "{stdout}");

    let ids = agent.recorded_sessions();
    let id = ids.last().unwrap();
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    let mut lines = cast.lines();
    let header: serde_json::Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["version"], 2);
    assert_eq!(header["width"], 80);
    assert_eq!(header["height"], 24);
    assert!(header["env"]["TERM"].is_string(), "{header}");
    let events: Vec<serde_json::Value> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(
        events.iter().any(|e| e[1] == "r" && e[2] == "100x40"),
        "no resize event: {cast}"
    );
    let output: String = events
        .iter()
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap())
        .collect();
    assert!(output.contains("MARK-42"), "{output}");
    // Input is not recorded unless the config asks for it.
    assert!(
        !events.iter().any(|e| e[1] == "i"),
        "input recorded without being asked"
    );
    let mut last = 0.0;
    for e in &events {
        let t = e[0].as_f64().unwrap();
        assert!(t >= last, "timestamps go backwards");
        last = t;
    }
    assert_eq!(agent.meta(id)["exit_status"], 5);
}

#[test]
fn input_is_recorded_when_asked_but_never_with_echo_off() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[recording]\ninput = true\n".into(),
        ..Default::default()
    });
    let login = agent.login("dave");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    // `read -s` turns ECHO off while the secret is typed.
    let script = "echo visible-typing\nread -s SECRET\nhunter2-secret\necho done-$SECRET\nexit\n";
    let mut child = agent
        .ssh_command(&login)
        .arg("-tt")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = child.stdin.as_mut().unwrap();
        for line in script.lines() {
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.write_all(b"\n").unwrap();
            stdin.flush().unwrap();
            std::thread::sleep(Duration::from_millis(400));
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("done-hunter2-secret"),
        "{}",
        text(&out)
    );
    let id = agent.recorded_sessions().pop().unwrap();
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    let input: String = cast
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e[1] == "i")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    assert!(
        input.contains("echo visible-typing"),
        "input not recorded: {input:?}"
    );
    assert!(
        !input.contains("hunter2"),
        "a secret typed with ECHO off was recorded: {input:?}"
    );
}

#[test]
fn scp_and_sftp_move_files_as_the_account() {
    let agent = TestAgent::start();
    let login = agent.login("erin");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let local = agent.dir.join("payload.bin");
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&local, &payload).unwrap();
    let port = agent.port.to_string();
    let scp = |extra: &[&str], from: &str, to: &str| {
        Command::new("timeout")
            .arg("60")
            .arg("scp")
            .args(agent.ssh_base_args())
            .args(["-o", "BatchMode=yes", "-i"])
            .arg(&agent.client_key)
            .args(["-P", &port])
            .args(extra)
            .args([from, to])
            .output()
            .unwrap()
    };
    let out = scp(
        &[],
        local.to_str().unwrap(),
        &format!("{login}@127.0.0.1:up.bin"),
    );
    assert!(
        out.status.success(),
        "scp (sftp protocol): {}\n{}",
        text(&out),
        agent.log()
    );
    // The legacy protocol runs `scp -t` through the shell.
    let out = scp(
        &["-O"],
        local.to_str().unwrap(),
        &format!("{login}@127.0.0.1:legacy.bin"),
    );
    assert!(out.status.success(), "scp -O: {}", text(&out));
    let out = agent.ssh(&login, "stat -c '%U %s' up.bin legacy.bin");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{login} 200000\n{login} 200000\n"),
        "{}",
        text(&out)
    );
    let back = agent.dir.join("back.bin");
    let batch = agent.dir.join("batch");
    std::fs::write(&batch, format!("get up.bin {}\nls -l\n", back.display())).unwrap();
    let out = Command::new("timeout")
        .arg("60")
        .arg("sftp")
        .args(agent.ssh_base_args())
        .args(["-o", "BatchMode=yes", "-i"])
        .arg(&agent.client_key)
        .args(["-P", &port, "-b"])
        .arg(&batch)
        .arg(format!("{login}@127.0.0.1"))
        .output()
        .unwrap();
    assert!(out.status.success(), "sftp: {}", text(&out));
    assert_eq!(std::fs::read(&back).unwrap(), payload);
}

#[test]
fn a_grant_presented_at_the_password_prompt_logs_in_without_a_key() {
    let agent = TestAgent::start();
    let login = agent.login("ci");
    let mut claims = agent.claims(&login, 600);
    claims.ssh_keys.clear();
    claims.sub = "ci-job-42".into();
    let token = agent.sign(&claims);
    let out = agent.ssh_with_password(&login, &token, "id -un");
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), login);
    // A grant for another login does not open this one.
    let other = agent.login("other");
    let out = agent.ssh_with_password(&other, &token, "true");
    assert!(!out.status.success());
    assert!(!user_exists(&other));
    // Keyboard-interactive: the same grant at the "Grant:" prompt.
    let out = agent.ssh_with_keyboard_interactive(&login, &token, "echo via-kbd");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("via-kbd"),
        "{}",
        text(&out)
    );
}

#[test]
fn a_key_not_bound_to_a_live_grant_is_refused() {
    let agent = TestAgent::start();
    let login = agent.login("frank");
    let mut claims = agent.claims(&login, 600);
    // Bound to some other key.
    claims.ssh_keys = vec![
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHJw3l0dH9wYhYdDq0jW3pXk5dW6Jm0iCz2cSfSxJt5R other"
            .into(),
    ];
    assert!(agent.install(&agent.sign(&claims)).status.success());
    let out = agent.ssh(&login, "true");
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Permission denied"),
        "{}",
        text(&out)
    );
    assert!(!user_exists(&login));
}

#[test]
fn an_existing_account_with_the_name_is_never_taken_over() {
    let agent = TestAgent::start();
    let login = agent.login("taken");
    // A local account with that name, outside the agent's UID range: useradd picks its
    // UID among the host's regular ones (no fixed number another run could hold), and it
    // goes however the test ends.
    struct HostAccount(String);
    impl Drop for HostAccount {
        fn drop(&mut self) {
            let _ = Command::new("userdel").args(["--", &self.0]).output();
        }
    }
    let st = Command::new("useradd")
        .args(["--no-create-home", "--", &login])
        .status()
        .unwrap();
    assert!(st.success());
    let _cleanup = HostAccount(login.clone());
    let uid = passwd()
        .into_iter()
        .find(|(name, _)| *name == login)
        .map(|(_, uid)| uid)
        .unwrap();
    assert!(
        !(agent.uid_min..=agent.uid_max).contains(&uid),
        "useradd gave {uid}, inside the agent's range"
    );
    let before = std::fs::read_to_string("/etc/passwd").unwrap();
    // A grant naming an account usher did not make is refused, and the journal says why.
    let out = agent.install(&agent.sign(&agent.claims(&login, 600)));
    assert!(!out.status.success(), "{}", text(&out));
    let out = agent.ssh(&login, "id");
    assert_ne!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        agent.log().contains("was not made by usher"),
        "{}",
        agent.log()
    );
    let after = std::fs::read_to_string("/etc/passwd").unwrap();
    let line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with(&format!("{login}:")))
            .map(String::from)
    };
    assert_eq!(line(&before), line(&after));
}

#[test]
fn a_full_disk_ends_the_session_with_a_reason_and_leaves_a_valid_recording() {
    let agent = TestAgent::start_with(Options {
        spool_tmpfs_kib: Some(256),
        ..Default::default()
    });
    let login = agent.login("disk");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    // About 2 MB of output into a 256 KiB spool.
    let out = agent.ssh(
        &login,
        "for i in $(seq 1 40000); do echo line-$i-of-output-to-fill-the-spool; done",
    );
    assert_ne!(
        out.status.code(),
        Some(0),
        "the session went on without its recording"
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("recording failed"), "{stderr}");
    let id = agent.recorded_sessions().pop().unwrap();
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    assert!(cast.len() > 1000);
    for (n, line) in cast.lines().enumerate() {
        serde_json::from_str::<serde_json::Value>(line)
            .unwrap_or_else(|e| panic!("line {n} of the cast is broken ({e}): {line:?}"));
    }
    // While the spool is full, new sessions are refused with the reason, and nothing is
    // left behind.
    let _ = Command::new("dd")
        .arg("if=/dev/zero")
        .arg(format!("of={}/filler", agent.spool().display()))
        .arg("bs=4k")
        .stderr(Stdio::null())
        .status();
    let before = std::fs::read_dir(agent.spool()).unwrap().count();
    let out = agent.ssh(&login, "echo should-not-run");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("should-not-run"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be recorded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_dir(agent.spool()).unwrap().count(),
        before,
        "half-made files left"
    );
}

#[test]
fn a_full_spool_refuses_new_sessions_with_the_reason_and_keeps_what_it_has() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[spool]\nmax_bytes = 40000\nwhen_full = \"refuse\"\n".into(),
        ..Default::default()
    });
    let login = agent.login("spool");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    // The limit holds while the first session writes, not only when the next one starts.
    let first = agent.ssh(
        &login,
        "for i in $(seq 1 20000); do echo filling-the-spool-$i; done",
    );
    assert!(!first.status.success());
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("spool reached its limit"),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    let kept = agent.recorded_sessions();
    let out = agent.ssh(&login, "echo should-not-run");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("should-not-run"),
        "ran with the spool at {} bytes",
        std::fs::read_dir(agent.spool())
            .unwrap()
            .flatten()
            .map(|e| e.metadata().unwrap().len())
            .sum::<u64>()
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("recording spool is full"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(agent.recorded_sessions(), kept, "the spool changed");
    let status: serde_json::Value =
        serde_json::from_slice(&agent.usher(&["status", "--json"]).stdout).unwrap();
    assert!(
        status["spool"]["bytes"].as_u64().unwrap() >= 40000 - 16384,
        "{status}"
    );
    assert!(agent.log().contains("USHER_EVENT=session_refused"));
}
