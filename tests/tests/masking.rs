//! Inline masking (issue 13) with the real `ssh` client against usherd: what a profile's
//! `[mask]` names reaches neither the client, nor the cast in the spool, nor the recording
//! the collector receives; typed secrets are masked in the recorded input while the
//! program gets them; each masking is an audit event with the rule and the count, never
//! the value; and a profile without `[mask]` relays byte for byte as before.
//!
//! No secret is written whole on a command line: the exec request's text is in the
//! session's metadata, and the test must be able to tell a masked output from a value
//! that went past the masker some other way.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use usher_tests::*;

const MASKED_PROFILE: &str = "name = \"masked\"\n[mask]\ndetectors = [\"credit_card\", \"aws_access_key\", \"email\", \"jwt\", \"private_key\"]\n";

const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";
/// Visa's test number: passes the Luhn check.
const CARD: &str = "4111111111111111";
/// One digit off: fails the Luhn check, so it is no card number.
const NOT_A_CARD: &str = "4111111111111112";

fn masking_options(extra: &str) -> Options {
    Options {
        extra_config: format!(
            "[policy]\nallowed_profiles = [\"default\", \"masked\"]\n[recording]\ninput = true\n{extra}"
        ),
        profiles: vec![("masked.toml".into(), MASKED_PROFILE.into())],
        ..Default::default()
    }
}

/// The session ids recorded so far.
fn sessions(agent: &TestAgent) -> BTreeSet<String> {
    agent.recorded_sessions().into_iter().collect()
}

/// The one session recorded since `before`, once its recording is closed.
fn new_session(agent: &TestAgent, before: &BTreeSet<String>) -> String {
    let mut id = None;
    agent.wait_for(20, "a new session in the spool", || {
        id = sessions(agent).difference(before).next().cloned();
        id.is_some()
    });
    let id = id.unwrap();
    agent.wait_for(20, "the session's end in its metadata", || {
        agent.meta(&id)["ended_at"].is_string()
    });
    id
}

/// The cast's events of one kind ("o" or "i"), joined.
fn cast_events(cast: &str, kind: &str) -> String {
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e[1] == kind)
        .map(|e| e[2].as_str().unwrap_or_default().to_string())
        .collect()
}

fn spool_cast(agent: &TestAgent, id: &str) -> String {
    std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap()
}

/// `text` without its ANSI escape sequences (CSI and OSC), what a terminal shows.
fn visible(text: &str) -> String {
    let mut out = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('[') => {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            Some(']') => {
                while let Some(c) = chars.next() {
                    if c == '\u{7}' || (c == '\u{1b}' && chars.peek() == Some(&'\\')) {
                        break;
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// The `masked` events of a session's audit stream: (stream, rule, count).
fn masked_events(agent: &TestAgent, id: &str) -> Vec<(String, String, u64)> {
    agent
        .audit(id)
        .into_iter()
        .filter(|e| e["event"] == "masked")
        .map(|e| {
            (
                e["stream"].as_str().unwrap_or_default().to_string(),
                e["rule"].as_str().unwrap_or_default().to_string(),
                e["count"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn audit_text(agent: &TestAgent, id: &str) -> String {
    std::fs::read_to_string(agent.spool().join(format!("{id}.audit.jsonl"))).unwrap()
}

/// An agent that ships to `port` (where the collector is not running yet), with its
/// token and its host key, for the collector to trust.
fn shipping_agent(port: u16, ca: &Path) -> (TestAgent, TrustedAgent) {
    let token = format!("token-{}", free_port());
    let token_file = std::env::temp_dir().join(format!("usher-token-{token}"));
    std::fs::write(&token_file, &token).unwrap();
    let agent = TestAgent::start_with(masking_options(&format!(
        "[collector]\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\ninterval_secs = 1\n",
        token_file.display(),
        ca.display()
    )));
    let key = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(agent.dir.join("state/ssh_host_ed25519_key"))
        .output()
        .unwrap();
    let trusted = TrustedAgent {
        host: agent.host.clone(),
        token,
        host_key: String::from_utf8_lossy(&key.stdout).trim().to_string(),
    };
    let _ = std::fs::remove_file(token_file);
    (agent, trusted)
}

#[test]
fn a_key_written_in_two_pieces_reaches_neither_the_client_nor_the_cast_nor_the_collector() {
    let port = free_port();
    let mut collector = Collector::new_on(port, &[], "");
    let (agent, trusted) = shipping_agent(port, &collector.dir.join("ca.pem"));
    let (login, _) = agent.grant("exec", Some("masked"));

    let before = sessions(&agent);
    let out = agent.ssh(
        &login,
        "printf 'key AKIA'; sleep 0.2; printf 'IOSFODNN7EXAMPLE done\\n'",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !seen.contains("IOSFODNN7EXAMPLE"),
        "the client saw {seen:?}"
    );
    assert!(
        seen.starts_with("key ") && seen.ends_with(" done\n"),
        "the text around the key is lost: {seen:?}"
    );
    // The replacement keeps the width: cursor positions stay right.
    assert_eq!(seen.len(), "key  done\n".len() + AWS_KEY.len(), "{seen:?}");

    let id = new_session(&agent, &before);
    // (The command line in the cast's header has the two pieces, apart.)
    let cast = spool_cast(&agent, &id);
    let output = cast_events(&cast, "o");
    assert!(!cast.contains(AWS_KEY), "the cast holds the key: {cast}");
    assert!(
        !output.contains("IOSFODNN7EXAMPLE"),
        "the cast holds the key: {cast}"
    );
    assert!(output.contains(" done"), "{cast}");

    // The audit event: the rule and the count, never the value.
    assert_eq!(
        masked_events(&agent, &id),
        [("stdout".to_string(), "aws_access_key".to_string(), 1)]
    );
    assert!(!audit_text(&agent, &id).contains(AWS_KEY));
    for event in agent.audit(&id).iter().filter(|e| e["event"] == "masked") {
        let mut fields: Vec<&String> = event.as_object().unwrap().keys().collect();
        fields.sort();
        assert_eq!(
            fields,
            ["count", "event", "rule", "stream", "time"],
            "{event}"
        );
    }
    let log = agent.log();
    let journal_line = log
        .lines()
        .find(|l| l.contains("USHER_EVENT=masked"))
        .unwrap_or_else(|| panic!("no masked event in the agent's log:\n{log}"));
    assert!(
        journal_line.contains("RULE=aws_access_key") && journal_line.contains("COUNT=1"),
        "{journal_line}"
    );
    assert!(!log.contains(AWS_KEY), "the agent's log holds the key");

    // What the collector receives is the masked recording.
    collector.trust(&trusted);
    collector.start();
    collector.wait_complete(&id, 60, &agent);
    let (code, shipped) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    assert_eq!(code, 200, "{shipped}");
    let shipped_output = cast_events(&shipped, "o");
    assert!(shipped_output.contains(" done"), "{shipped}");
    assert!(
        !shipped.contains(AWS_KEY) && !shipped_output.contains("IOSFODNN7EXAMPLE"),
        "the shipped cast holds the key: {shipped}"
    );
}

#[test]
fn on_a_terminal_cards_inside_colours_are_masked_and_other_numbers_left_alone() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("pty", Some("masked"));
    let before = sessions(&agent);
    // Colour codes before, inside and after each number; the card is split by them.
    let script = "printf 'card \\033[1;31m41111111\\033[0m\\033[32m11111111\\033[0m end\\n'; \
                  printf 'other \\033[33m%s%s\\033[0m end\\n' 41111111 11111112";
    let out = agent
        .ssh_command(&login)
        .arg("-tt")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    let screen = visible(&raw);
    assert!(
        !screen.contains(CARD),
        "the client shows the card: {screen:?}"
    );
    assert!(
        screen.contains(&format!("card {} end", "*".repeat(16))),
        "{screen:?} ({raw:?})"
    );
    // The colours are still there.
    assert!(
        raw.contains("\u{1b}[1;31m") && raw.contains("\u{1b}[32m"),
        "{raw:?}"
    );
    assert!(
        screen.contains(&format!("other {NOT_A_CARD} end")),
        "a Luhn-invalid number was touched: {screen:?}"
    );

    let id = new_session(&agent, &before);
    let recorded = visible(&cast_events(&spool_cast(&agent, &id), "o"));
    assert!(
        !recorded.contains(CARD),
        "the cast holds the card: {recorded:?}"
    );
    assert!(recorded.contains(NOT_A_CARD), "{recorded:?}");
    assert_eq!(
        masked_events(&agent, &id),
        [("terminal".to_string(), "credit_card".to_string(), 1)]
    );
}

#[test]
fn stderr_is_masked() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("err", Some("masked"));
    let before = sessions(&agent);
    let out = agent.ssh(
        &login,
        "printf 'to stderr %s%s\\n' 41111111 11111111 >&2; echo fine",
    );
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!err.contains(CARD), "stderr: {err:?}");
    assert!(
        err.contains(&format!("to stderr {}", "*".repeat(16))),
        "{err:?}"
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "fine\n");
    let id = new_session(&agent, &before);
    assert!(!spool_cast(&agent, &id).contains(CARD));
    assert_eq!(
        masked_events(&agent, &id),
        [("stderr".to_string(), "credit_card".to_string(), 1)]
    );
}

#[test]
fn a_typed_secret_is_masked_in_the_recorded_input_and_the_program_still_gets_it() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("typist", Some("masked"));
    let before = sessions(&agent);
    let mut term = agent.terminal(&login);
    term.expect("$ ", 20);
    std::thread::sleep(Duration::from_millis(300));
    term.send("read x; echo \"length=${#x} tail=${x#AKIAIOSFODNN7EXAMP}\"\r");
    std::thread::sleep(Duration::from_millis(500));
    term.send(&format!("{AWS_KEY}\r"));
    // The program got all 20 characters, and the right ones.
    term.expect("length=20 tail=LE", 10);
    term.expect("$ ", 10);
    std::thread::sleep(Duration::from_millis(300));
    term.send("exit\r");
    assert!(term.wait(20).is_some(), "{}", term.screen());
    let screen = term.screen();
    assert!(
        !screen.contains(AWS_KEY),
        "the echo shows the key: {screen:?}"
    );

    let id = new_session(&agent, &before);
    let cast = spool_cast(&agent, &id);
    let typed = cast_events(&cast, "i");
    assert!(typed.contains("read x"), "input is not recorded: {typed:?}");
    assert!(
        !typed.contains(AWS_KEY),
        "the recorded input holds the key: {typed:?}"
    );
    assert!(typed.contains(&"*".repeat(20)), "{typed:?}");
    assert!(!cast.contains(AWS_KEY), "the cast holds the key");
    let masked = masked_events(&agent, &id);
    assert!(
        masked.contains(&("input".to_string(), "aws_access_key".to_string(), 1)),
        "{masked:?}"
    );
}

#[test]
fn without_mask_rules_the_output_is_relayed_byte_for_byte() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("plain", None);
    let script = "printf 'AKIA%s 4111%s \\033[31mred\\033[0m\\n' IOSFODNN7EXAMPLE 111111111111";
    let want = format!("{AWS_KEY} {CARD} \u{1b}[31mred\u{1b}[0m");

    let before = sessions(&agent);
    let out = agent.ssh(&login, script);
    assert!(out.status.success());
    assert_eq!(out.stdout, format!("{want}\n").as_bytes());
    let id = new_session(&agent, &before);
    assert!(masked_events(&agent, &id).is_empty());
    assert!(cast_events(&spool_cast(&agent, &id), "o").contains(&want));

    let out = agent
        .ssh_command(&login)
        .arg("-tt")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout, format!("{want}\r\n").as_bytes());
}

#[test]
fn the_command_line_and_the_arguments_of_execs_are_masked_in_the_records() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("argv", Some("masked"));
    let before = sessions(&agent);
    let out = agent.ssh(&login, &format!("/bin/echo card {CARD}; /bin/true"));
    assert!(out.status.success());
    // The program got the number (its output is masked like any other).
    let seen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(seen, format!("card {}\n", "*".repeat(16)));
    let id = new_session(&agent, &before);
    let meta = agent.meta(&id);
    assert_eq!(
        meta["command"],
        format!("/bin/echo card {}; /bin/true", "*".repeat(16))
    );
    let audit = audit_text(&agent, &id);
    assert!(
        !audit.contains(CARD),
        "the audit stream holds the card: {audit}"
    );
    assert!(!spool_cast(&agent, &id).contains(CARD));
    let execs = agent.execs(&id);
    let echo = execs
        .iter()
        .find(|e| e["path"] == "/usr/bin/echo" || e["path"] == "/bin/echo")
        .unwrap_or_else(|| panic!("no exec of echo: {execs:?}"));
    assert_eq!(
        echo["argv"],
        serde_json::json!(["/bin/echo", "card", "*".repeat(16)])
    );
    let masked = masked_events(&agent, &id);
    for stream in ["command", "exec", "stdout"] {
        assert!(
            masked
                .iter()
                .any(|(s, rule, _)| s == stream && rule == "credit_card"),
            "no masking in {stream}: {masked:?}"
        );
    }
    assert!(
        !agent.log().contains(CARD),
        "the agent's log holds the card"
    );
}

#[test]
fn a_full_screen_program_is_reported_once_per_session() {
    let agent = TestAgent::start_with(masking_options(""));
    let (login, _) = agent.grant("vim", Some("masked"));
    let before = sessions(&agent);
    // What an editor does: the alternate screen, then drawing by cursor positioning,
    // twice.
    let script = "printf '\\033[?1049h\\033[1;1Hone\\033[5;5Htwo\\033[?1049l'; sleep 0.1; \
                  printf '\\033[?1049h\\033[2;2Hthree\\033[?1049l\\n'";
    let out = agent
        .ssh_command(&login)
        .arg("-tt")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success());
    // The drawing reaches the client as the program wrote it.
    let raw = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        raw.contains("\u{1b}[?1049h\u{1b}[1;1Hone\u{1b}[5;5Htwo"),
        "{raw:?}"
    );
    let id = new_session(&agent, &before);
    let alerts: Vec<_> = agent
        .audit(&id)
        .into_iter()
        .filter(|e| e["event"] == "mask_fullscreen")
        .collect();
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!(alerts[0]["stream"], "terminal");
    assert_eq!(
        agent.log().matches("USHER_EVENT=mask_fullscreen").count(),
        1
    );

    // A session that draws nothing by position is not reported.
    let before = sessions(&agent);
    assert!(agent.ssh(&login, "echo plain").status.success());
    let id = new_session(&agent, &before);
    assert!(!agent
        .audit(&id)
        .iter()
        .any(|e| e["event"] == "mask_fullscreen"));
}
