//! Smaller holes, tried as an attacker would: a grant with a critical JOSE extension, two
//! issuers using the same jti, secrets and commands typed into a recorded terminal, and a
//! recording written to hurt the reviewer who replays it.

use std::process::{Command, Stdio};
use std::time::Duration;
use usher::grant::KeyAlg;
use usher_tests::*;

/// A scratch directory of the test's, removed however the test ends.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("usher-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn a_grant_marking_a_header_parameter_critical_is_refused() {
    let agent = TestAgent::start();
    let login = agent.login("crit");
    // RFC 7515 §4.1.11: a `crit` this host does not understand (it understands none)
    // must refuse the token, at `usher grant install` and at the SSH password prompt.
    for crit in [
        serde_json::json!(["exp"]),
        serde_json::json!(["urn:example:must-understand"]),
        serde_json::json!([]),
        serde_json::json!(null),
    ] {
        let claims = agent.claims(&login, 600);
        let header = serde_json::json!({
            "alg": "EdDSA", "typ": "JWT", "kid": "k1", "crit": crit,
            "exp": claims.exp, "urn:example:must-understand": true,
        });
        let token = agent.sign_with_header(&header, &claims);
        let out = agent.install(&token);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "crit {crit} was installed");
        assert!(err.contains("critical"), "crit {crit}: {err}");
        let claims = agent.claims(&login, 600);
        let token = agent.sign_with_header(&header, &claims);
        let out = agent.ssh_with_password(&login, &token, "echo in");
        assert_eq!(
            out.status.code(),
            Some(255),
            "crit {crit} logged in: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    }
    assert!(!user_exists(&login), "a refused grant made an account");
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("grant_refused") && l.contains("as critical")),
        "no reason in the journal:\n{log}"
    );
    // The same header without `crit`, signed the same way, is let in: the refusals above
    // were for `crit` alone.
    let claims = agent.claims(&login, 600);
    let token = agent.sign_with_header(
        &serde_json::json!({"alg": "EdDSA", "typ": "JWT", "kid": "k1"}),
        &claims,
    );
    let out = agent.ssh_with_password(&login, &token, "echo in-$((40+2))");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("in-42"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
}

/// A login holding its session open until the test ends it.
fn hold_session(agent: &TestAgent, login: &str) -> std::process::Child {
    agent
        .ssh_command(login)
        .arg("echo held; exec sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap()
}

fn sessions_of(agent: &TestAgent, login: &str) -> usize {
    let out = agent.usher(&["sessions", "--json"]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["login"] == login)
        .count()
}

#[test]
fn two_issuers_may_use_the_same_jti_and_revoking_one_leaves_the_other() {
    let (second_key, second_jwks) = usher::grant::keygen(KeyAlg::Ed25519, "b1").unwrap();
    let scratch = Scratch::new("second-issuer");
    let dir = &scratch.0;
    std::fs::write(dir.join("jwks.json"), second_jwks).unwrap();
    let second = "https://second-issuer.test";
    let mut agent = TestAgent::start_with(Options {
        extra_config: format!(
            "[[issuer]]\niss = \"{second}\"\njwks = \"{}/jwks.json\"\n",
            dir.display()
        ),
        ..Default::default()
    });
    let (login_a, login_b) = (agent.login("ann"), agent.login("ben"));
    let mut a = agent.claims(&login_a, 600);
    a.jti = "shared-42".into();
    let mut b = agent.claims(&login_b, 600);
    b.jti = "shared-42".into();
    b.iss = second.into();
    let token_b = usher::grant::sign(&second_key, "b1", &b).unwrap();
    for token in [agent.sign(&a), token_b.clone()] {
        let out = agent.install(&token);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let list: serde_json::Value =
        serde_json::from_slice(&agent.usher(&["grant", "list", "--json"]).stdout).unwrap();
    assert_eq!(
        list.as_array().unwrap().len(),
        2,
        "both grants are kept: {list}"
    );

    // Both grants let their holder in.
    let mut held_a = hold_session(&agent, &login_a);
    let mut held_b = hold_session(&agent, &login_b);
    agent.wait_for(20, "a session for each grant", || {
        sessions_of(&agent, &login_a) == 1 && sessions_of(&agent, &login_b) == 1
    });

    // The jti alone does not say which grant: a clear error, and nothing is revoked.
    let out = agent.usher(&["grant", "revoke", "shared-42"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an ambiguous revoke went through");
    assert!(err.contains("--iss") && err.contains(second), "{err}");
    assert_eq!(sessions_of(&agent, &login_b), 1);

    let out = agent.usher(&["grant", "revoke", "shared-42", "--iss", second]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    agent.wait_for(15, "the revoked grant's session to end", || {
        held_b.try_wait().unwrap().is_some() && !user_exists(&login_b)
    });
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        held_a.try_wait().unwrap().is_none(),
        "the other issuer's session ended too"
    );
    assert_eq!(sessions_of(&agent, &login_a), 1);
    assert!(user_exists(&login_a));

    // After a restart: the revocation still names one issuer's grant only.
    hang_up(&mut held_a);
    agent.stop();
    agent.launch();
    let out = agent.install(&token_b);
    assert!(String::from_utf8_lossy(&out.stderr).contains("revoked"));
    let out = agent.ssh(&login_a, "echo still-$((6*7))");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("still-42"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    // A grant of a third issuer's jti not seen yet, with two issuers trusted: --iss needed.
    let out = agent.usher(&["grant", "revoke", "never-seen"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--iss"));
}

#[test]
fn commands_typed_at_the_shell_are_recorded_and_passwords_are_not() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[recording]\ninput = true\n".into(),
        ..Default::default()
    });
    let login = agent.login("typist");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let mut term = agent.terminal(&login);
    // Each line is typed only once the shell's prompt is up: readline then has the
    // terminal in its own mode (non-canonical, ECHO off), as for a person typing.
    let prompt = |term: &mut Terminal| {
        term.expect("$ ", 20);
        std::thread::sleep(Duration::from_millis(300));
    };
    prompt(&mut term);
    term.send("echo typed-at-prompt-$((40+2))\r");
    term.expect("typed-at-prompt-42", 10);
    prompt(&mut term);
    // A PAM password prompt (canonical mode, ECHO off): su to root.
    term.send("su -c true root\r");
    term.expect("assword: ", 10);
    std::thread::sleep(Duration::from_millis(300));
    term.send("hunter2-su-secret\r");
    term.expect("su: Authentication failure", 20);
    prompt(&mut term);
    // getpass(3), as Python's getpass module calls it; the answer is shown reversed so
    // that the secret itself never reaches the screen. The prompt is spelt so that the
    // echo of the command line does not already show it.
    term.send("/usr/bin/python3 -c 'import getpass; print(\"got-\" + getpass.getpass(\"Sec\" + \"ret: \")[::-1])'\r");
    term.expect("Secret: ", 10);
    std::thread::sleep(Duration::from_millis(300));
    term.send("py-secret-77\r");
    term.expect("got-77-terces-yp", 10);
    prompt(&mut term);
    term.send("exit\r");
    assert!(term.wait(20).is_some(), "{}", term.screen());

    let id = agent.recorded_sessions().pop().unwrap();
    agent.wait_for(10, "the session's end in its metadata", || {
        agent.meta(&id)["ended_at"].is_string()
    });
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    let input: String = cast
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e[1] == "i")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    for typed in [
        "echo typed-at-prompt-$((40+2))",
        "su -c true root",
        "getpass.getpass",
        "exit",
    ] {
        assert!(
            input.contains(typed),
            "{typed:?} typed at the prompt is not in the cast's input: {input:?}"
        );
    }
    for secret in ["hunter2-su-secret", "py-secret-77"] {
        assert!(
            !cast.contains(secret),
            "the password {secret:?} is in the recording: {input:?}"
        );
    }
}

#[test]
fn usher_play_shows_the_session_but_not_what_would_take_over_the_reviewers_terminal() {
    let scratch = Scratch::new("play");
    let path = scratch.0.join("hostile.cast");
    let events = [
        "visible-1 \x1b[31mred\x1b[0m\r\n",
        // The clipboard, ended by BEL and by ST.
        "\x1b]52;c;Y2xpcGJvYXJkLWhpamFjaw==\x07",
        "\x1b]52;p;Y2xpcGJvYXJkLWhpamFjaw==\x1b\\",
        // The window title, and a query of it.
        "\x1b]0;owned-title\x07\x1b[21t",
        // Device queries: the cursor position, DA, a terminfo capability (DCS).
        "\x1b[6n\x1b[c\x1bP+q544e\x1b\\",
        // The same in 8-bit C1 form.
        "\u{9d}52;c;Y2xpcGJvYXJkLWhpamFjaw==\u{9c}\u{9b}6n\u{90}+q544e\u{9c}",
        // Cut across events.
        "\x1b]5",
        "2;c;Y2xpcGJvYXJkLWhpamFjaw==",
        "\x07\x1b[?1000;1049h\x1b[?25lvisible-2",
    ];
    let mut cast = String::from(
        "{\"version\": 2, \"width\": 80, \"height\": 24, \"timestamp\": 1, \"env\": {}}\n",
    );
    for (n, e) in events.iter().enumerate() {
        cast.push_str(&serde_json::json!([n as f64 * 0.01, "o", e]).to_string());
        cast.push('\n');
    }
    std::fs::write(&path, cast).unwrap();
    let out = Command::new(bin("usher"))
        .args(["play", "--speed", "100"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    for wanted in [
        "visible-1 \x1b[31mred\x1b[0m\r\n",
        "\x1b[?1049h\x1b[?25lvisible-2",
    ] {
        assert!(shown.contains(wanted), "{wanted:?} missing from {shown:?}");
    }
    for hostile in [
        "\x1b]",
        "\x1bP",
        "\x1b\\",
        "\x07",
        "\x1b[6n",
        "\x1b[c",
        "\x1b[21t",
        "1000",
        "\u{9d}",
        "\u{9b}",
        "\u{90}",
        "\u{9c}",
        "Y2xpcGJvYXJk",
        "owned-title",
        "544e",
    ] {
        assert!(
            !shown.contains(hostile),
            "{hostile:?} reached the reviewer's terminal: {shown:?}"
        );
    }
    // The player leaves the terminal as it found it.
    assert!(shown.ends_with("\x1b[?1049l\x1b[?25h"), "{shown:?}");
}
