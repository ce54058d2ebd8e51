//! Console sessions: the real `login` on a pseudo-terminal and `su - name`, through the
//! accounts' recording login shell, recorded and cgrouped like SSH sessions.

use std::process::{Command, Output, Stdio};
use std::time::Duration;
use usher_tests::*;

/// Console logins allowed; `id` is not.
const CONSOLE_PROFILE: &str =
    "name = \"console\"\nconsole = true\n[exec]\nmode = \"deny\"\npaths = [\"/usr/bin/id\"]\n";

fn console_agent() -> TestAgent {
    TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"console\"]\n".into(),
        profiles: vec![("console.toml".into(), CONSOLE_PROFILE.into())],
        ..Default::default()
    })
}

/// Installs a console grant for `login` with `secret`, `ttl` seconds long.
fn console_grant(agent: &TestAgent, login: &str, secret: &str, ttl: i64) -> usher::grant::Claims {
    let mut c = agent.claims(login, ttl);
    c.profile = Some("console".into());
    c.secret_hash = Some(usher::grant::console_secret_hash(secret).unwrap());
    let out = agent.install(&agent.sign(&c));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c
}

/// Drives the real /bin/login on a fresh pseudo-terminal: name, password, then each
/// command (or, for `@wait:TEXT`, waits until the terminal shows TEXT); returns everything
/// the terminal showed.
const LOGIN_DRIVER: &str = r#"
import os, pty, sys, time, select
user, secret, hold = sys.argv[1], sys.argv[2], float(sys.argv[3])
cmds = sys.argv[4:]
pid, fd = pty.fork()
if pid == 0:
    os.execv("/bin/login", ["login"])
out = b""
def until(pattern, secs):
    global out
    end = time.time() + secs
    while time.time() < end:
        if pattern and pattern.encode() in out:
            return True
        r, _, _ = select.select([fd], [], [], 0.05)
        if r:
            try:
                d = os.read(fd, 4096)
            except OSError:
                return False
            if not d:
                return False
            out += d
    return pattern is None
until("login:", 15)
os.write(fd, (user + "\n").encode())
until("assword:", 15)
os.write(fd, (secret + "\n").encode())
until(None, 2.0)
for c in cmds:
    if c.startswith("@wait:"):
        until(c[len("@wait:"):], 15)
        continue
    os.write(fd, (c + "\r").encode())
    until(None, 1.0)
until(None, hold)
try:
    os.kill(pid, 9)
except ProcessLookupError:
    pass
sys.stdout.write(out.decode("utf-8", "replace"))
"#;

fn login(user: &str, secret: &str, hold_secs: f64, cmds: &[&str]) -> String {
    let out = Command::new("timeout")
        .arg("90")
        .arg("python3")
        .arg("-c")
        .arg(LOGIN_DRIVER)
        .args([user, secret, &hold_secs.to_string()])
        .args(cmds)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn su(login: &str, cmd: &str) -> Output {
    Command::new("timeout")
        .args(["30", "su", "-", login, "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn login_with_the_one_time_secret_is_a_recorded_session_in_its_own_cgroup() {
    // Input recorded: what is typed at ECHO off must still stay out of the recording.
    let agent = TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config:
            "[policy]\nallowed_profiles = [\"default\", \"console\"]\n[recording]\ninput = true\n"
                .into(),
        profiles: vec![("console.toml".into(), CONSOLE_PROFILE.into())],
        ..Default::default()
    });
    let name = agent.login("con");
    console_grant(&agent, &name, "correct-horse-battery", 600);
    // Inside the session, a secret typed at getpass(3)'s prompt (canonical mode, ECHO
    // off); the answer comes back reversed, so that the secret itself never reaches the
    // screen. The prompt is spelt so that the echo of the command line does not show it.
    let shown = login(
        &name,
        "correct-horse-battery",
        0.5,
        &[
            "echo CONSOLE-$((6*7)); grep 0:: /proc/self/cgroup; id",
            "/usr/bin/python3 -c 'import getpass; print(\"got-\" + getpass.getpass(\"Sec\" + \"ret: \")[::-1])'",
            "@wait:Secret: ",
            "echo-off-secret-31",
            "@wait:got-13-terces-ffo-ohce",
            "exit",
        ],
    );
    assert!(shown.contains("usher: blocked /usr/bin/id"), "{shown}");
    assert!(shown.contains("CONSOLE-42"), "{shown}\n{}", agent.log());
    assert!(shown.contains("/usher-sessions/"), "{shown}");
    assert!(
        shown.contains("got-13-terces-ffo-ohce"),
        "the session did not read the secret: {shown}"
    );
    let ids = agent.recorded_sessions();
    let id = ids.last().expect("a recording");
    let meta = agent.meta(id);
    assert_eq!(meta["kind"], "console");
    assert_eq!(meta["login"], name.as_str());
    assert!(
        meta["peer"]
            .as_str()
            .unwrap()
            .starts_with("console /dev/pts/"),
        "{meta}"
    );
    agent.wait_for(10, "the session's end in its metadata", || {
        agent.meta(id)["ended_at"].is_string()
    });
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    assert!(cast.contains("CONSOLE-42"), "{cast}");
    // Input is recorded: what was typed at the shell is there...
    let input: String = cast
        .lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e[1] == "i")
        .filter_map(|e| e[2].as_str().map(String::from))
        .collect();
    assert!(
        input.contains("echo CONSOLE-$((6*7))") && input.contains("getpass.getpass"),
        "the typed commands are not in the cast's input: {input:?}"
    );
    // ...and neither the secret typed at ECHO off nor the one typed at login is.
    assert!(
        !cast.contains("echo-off-secret-31"),
        "a secret typed with ECHO off was recorded: {input:?}"
    );
    assert!(!cast.contains("correct-horse-battery"));
}

#[test]
fn su_to_the_account_is_recorded_and_exit_status_kept() {
    let agent = console_agent();
    let name = agent.login("sudo");
    console_grant(&agent, &name, "s3cret", 600);
    let out = su(
        &name,
        "whoami; grep 0:: /proc/self/cgroup; id; echo \"id:$?\"; exit 3",
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(3),
        "{text}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert!(text.starts_with(&name), "{text}");
    assert!(text.contains("/usher-sessions/"), "{text}");
    // The console profile denies id: enforced and attributed like an SSH session.
    assert!(text.contains("id:137"), "{text}");
    assert!(!text.contains("uid="), "{text}");
    let id = agent.recorded_sessions().pop().unwrap();
    assert_eq!(agent.meta(&id)["kind"], "console");
    assert_eq!(agent.meta(&id)["exit_status"], 3);
    assert_eq!(agent.meta(&id)["enforced"], true);
    let execs = agent.execs(&id);
    assert!(
        execs
            .iter()
            .any(|e| e["path"] == "/usr/bin/whoami" && e["verdict"] == "allowed"),
        "{execs:#?}"
    );
    assert!(
        execs
            .iter()
            .any(|e| e["filename"] == "/usr/bin/id" && e["verdict"] == "killed"),
        "{execs:#?}"
    );
}

#[test]
fn without_the_agent_or_console_rights_or_the_right_secret_there_is_no_session() {
    let mut agent = console_agent();
    let name = agent.login("fail");
    let c = console_grant(&agent, &name, "right-secret", 600);
    // Wrong secret: PAM says no.
    // (The command computes its marker, so the terminal's echo of what was typed does not
    // count as having run it.)
    let shown = login(&name, "wrong-secret", 5.0, &["echo RAN-$((40+2))"]);
    assert!(shown.contains("Login incorrect"), "{shown}");
    assert!(!shown.contains("RAN-42"), "{shown}");
    // The agent stopped: the login shell refuses, with the reason.
    agent.stop();
    let out = su(&name, "echo SHOULD-NOT-RUN");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SHOULD-NOT-RUN"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot reach usherd"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(out.status.code(), Some(0));
    agent.launch();
    // A grant without console rights: its account keeps a locked password, and the login
    // shell refuses it even from root's `su`.
    let other = agent.login("sshonly");
    assert!(agent
        .install(&agent.sign(&agent.claims(&other, 600)))
        .status
        .success());
    assert!(agent.ssh(&other, "true").status.success());
    let shadow = std::fs::read_to_string("/etc/shadow").unwrap();
    let entry = shadow
        .lines()
        .find(|l| l.starts_with(&format!("{other}:")))
        .unwrap();
    assert!(entry.split(':').nth(1).unwrap().starts_with('!'), "{entry}");
    let out = su(&other, "echo SHOULD-NOT-RUN");
    assert!(!String::from_utf8_lossy(&out.stdout).contains("SHOULD-NOT-RUN"));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("does not allow console"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A revoked grant: the account and its secret are gone.
    assert!(agent.usher(&["grant", "revoke", &c.jti]).status.success());
    agent.wait_for(10, "the account to go", || !user_exists(&name));
    let shown = login(&name, "right-secret", 5.0, &["echo RAN-$((40+2))"]);
    assert!(shown.contains("Login incorrect"), "{shown}");
    assert!(!shown.contains("RAN-42"), "{shown}");
}

#[test]
fn the_grant_ending_ends_the_console_session_and_a_changed_shell_is_put_back() {
    let agent = console_agent();
    let name = agent.login("end");
    let c = console_grant(&agent, &name, "bye", 600);
    // chsh, as the user could with the secret, changes the login shell: the agent puts
    // the recording shell back.
    let before = passwd_shell(&name);
    assert!(Command::new("usermod")
        .args(["-s", "/bin/bash", &name])
        .status()
        .unwrap()
        .success());
    agent.wait_for(10, "the login shell to be restored", || {
        passwd_shell(&name) == before
    });
    agent.wait_for(5, "the restoration to be logged", || {
        agent.log().contains("USHER_EVENT=shell_restored")
    });

    let handle = std::thread::spawn({
        let name = name.clone();
        move || login(&name, "bye", 8.0, &["sleep 300"])
    });
    agent.wait_for(15, "the console session to start", || {
        String::from_utf8_lossy(&agent.usher(&["sessions", "--json"]).stdout)
            .contains("\"console\"")
    });
    assert!(agent.usher(&["grant", "revoke", &c.jti]).status.success());
    agent.wait_for(15, "the account to go", || !user_exists(&name));
    let shown = handle.join().unwrap();
    assert!(shown.contains("the session is closed"), "{shown}");
    std::thread::sleep(Duration::from_millis(200));
    assert!(String::from_utf8_lossy(&agent.usher(&["sessions", "--json"]).stdout).trim() == "[]");
}

fn passwd_shell(name: &str) -> String {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find(|l| l.starts_with(&format!("{name}:")))
        .and_then(|l| l.rsplit(':').next().map(String::from))
        .unwrap_or_default()
}
