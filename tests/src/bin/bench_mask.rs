//! `cargo xtask bench mask`: what inline masking (issue 13) costs, with the real `ssh`
//! client against usherd on loopback, one profile masking with every built-in detector and
//! one masking nothing, on the same agent:
//!
//! - relay throughput: `USHER_BENCH_MASK_MIB` (default 256) MiB of text out of a command
//!   (`base64 /dev/urandom`: letters and digits, the worst case for detectors that look for
//!   digit runs and key prefixes), recorded as usual; runs interleaved between the two
//!   profiles, medians of `USHER_BENCH_RUNS` (default 3). Goal: masked / unmasked ≥ 0.8.
//! - echo latency: one byte written into a terminal session (`ssh -tt`, the terminal
//!   echoing), timed until it comes back; keystrokes alternate between a masked and an
//!   unmasked session. Goal: median added latency ≤ 1 ms.

#![deny(unsafe_code)]

use std::io::{Read, Write};
use std::process::{Child, ChildStdout, Stdio};
use std::time::{Duration, Instant};
use usher_test_support::SshClient;
use usher_tests::*;

const ALL_DETECTORS: &str = r#"name = "masked"
[mask]
detectors = ["credit_card", "aws_access_key", "aws_secret_key", "gcp_api_key", "azure_key",
             "github_token", "slack_token", "private_key", "jwt", "bearer_token", "email", "iban"]
"#;

const KEYSTROKES: usize = 300;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench mask: {e}");
        std::process::exit(1);
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn run() -> Result<(), String> {
    let bytes = env_or("USHER_BENCH_MASK_MIB", 256) << 20;
    let runs = env_or("USHER_BENCH_RUNS", 3).max(1) as usize;
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"masked\"]\n".into(),
        profiles: vec![("masked.toml".into(), ALL_DETECTORS.into())],
        ..Default::default()
    });
    let (masked, _) = agent.grant("masked", Some("masked"));
    let (plain, _) = agent.grant("plain", None);
    let ssh = SshClient::new(&agent.client_key, agent.port);
    // First use of each grant makes its account: not part of any figure.
    for login in [&masked, &plain] {
        let out = ssh
            .command(login)
            .arg("true")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "ssh {login} true: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                agent.log()
            ));
        }
    }
    println!(
        "inline masking, usherd (recording on) on loopback, the real ssh client; masked: every built-in detector"
    );

    let (mut off, mut on) = (vec![], vec![]);
    for _ in 0..runs {
        off.push(throughput(&agent, &ssh, &plain, bytes)?);
        on.push(throughput(&agent, &ssh, &masked, bytes)?);
    }
    let mb = |secs: f64| bytes as f64 / 1e6 / secs;
    let (off_s, on_s) = (median(off), median(on));

    let (off_echo, on_echo) = echo_latency(&ssh, &plain, &masked)?;
    let added_ms = (on_echo - off_echo) * 1e3;

    println!();
    println!("| figure | masking off | masking on | on vs off | goal |");
    println!("|---|---|---|---|---|");
    println!(
        "| {} MiB of text out of a command, median of {runs} | {:.0} MB/s | {:.0} MB/s | {:.2} | ≥ 0.80 |",
        bytes >> 20,
        mb(off_s),
        mb(on_s),
        off_s / on_s
    );
    println!(
        "| echo of one keystroke (ssh -tt), median of {KEYSTROKES} | {:.3} ms | {:.3} ms | {:+.3} ms | ≤ +1 ms |",
        off_echo * 1e3,
        on_echo * 1e3,
        added_ms
    );
    Ok(())
}

/// Seconds to bring `bytes` of text out of `ssh login cmd`; the session's recording is
/// removed afterwards (the spool would fill up).
fn throughput(agent: &TestAgent, ssh: &SshClient, login: &str, bytes: u64) -> Result<f64, String> {
    let before: std::collections::BTreeSet<String> =
        agent.recorded_sessions().into_iter().collect();
    let start = Instant::now();
    let mut child = ssh
        .command(login)
        .arg(format!("base64 /dev/urandom | head -c {bytes}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let r = stdout.read(&mut buf).map_err(|e| e.to_string())?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let _ = child.wait();
    if n != bytes {
        return Err(format!(
            "{login}: got {n} of {bytes} bytes\n{}",
            agent.log()
        ));
    }
    // Its recording is closed once the metadata says it ended.
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in agent.recorded_sessions() {
        if before.contains(&id) {
            continue;
        }
        while agent.meta(&id)["ended_at"].is_null() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        for ext in ["cast", "json", "audit.jsonl"] {
            let _ = std::fs::remove_file(agent.spool().join(format!("{id}.{ext}")));
        }
    }
    Ok(elapsed)
}

/// A terminal session whose terminal echoes what is typed and whose program reads it
/// without waiting for a line.
struct Typist {
    child: Child,
    out: ChildStdout,
}

impl Typist {
    fn start(ssh: &SshClient, login: &str) -> Result<Typist, String> {
        let mut child = ssh
            .command(login)
            .arg("-tt")
            .arg("stty -icanon min 1 time 0; echo ready; exec cat >/dev/null")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut t = Typist { child, out };
        t.read_until(b"ready\r\n")?;
        // The shell's exec of cat: a moment for it to be reading.
        std::thread::sleep(Duration::from_millis(300));
        Ok(t)
    }

    fn read_until(&mut self, want: &[u8]) -> Result<(), String> {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        while !seen.windows(want.len()).any(|w| w == want) {
            let n = self.out.read(&mut buf).map_err(|e| e.to_string())?;
            if n == 0 {
                return Err(format!(
                    "the session ended before {:?}; it showed {:?}",
                    String::from_utf8_lossy(want),
                    String::from_utf8_lossy(&seen)
                ));
            }
            seen.extend_from_slice(&buf[..n]);
        }
        Ok(())
    }

    /// Seconds from writing `key` to seeing its echo.
    fn keystroke(&mut self, key: u8) -> Result<f64, String> {
        let stdin = self.child.stdin.as_mut().ok_or("no stdin")?;
        let start = Instant::now();
        stdin.write_all(&[key]).map_err(|e| e.to_string())?;
        stdin.flush().map_err(|e| e.to_string())?;
        self.read_until(&[key])?;
        Ok(start.elapsed().as_secs_f64())
    }
}

impl Drop for Typist {
    fn drop(&mut self) {
        hang_up(&mut self.child);
    }
}

/// Median echo time of an unmasked and a masked terminal session, keystrokes alternating
/// between them.
fn echo_latency(ssh: &SshClient, plain: &str, masked: &str) -> Result<(f64, f64), String> {
    let mut off = Typist::start(ssh, plain)?;
    let mut on = Typist::start(ssh, masked)?;
    let (mut off_t, mut on_t) = (vec![], vec![]);
    // Letters and a space, as typed at a prompt.
    let keys = b"the quick brown fox jumps over the lazy dog ";
    for i in 0..KEYSTROKES + 20 {
        let key = keys[i % keys.len()];
        // Each goes first every other time: neither gains from the other's warm path.
        let (a, b) = if i % 2 == 0 {
            let a = off.keystroke(key)?;
            (a, on.keystroke(key)?)
        } else {
            let b = on.keystroke(key)?;
            (off.keystroke(key)?, b)
        };
        // The first few warm the path up.
        if i >= 20 {
            off_t.push(a);
            on_t.push(b);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok((median(off_t), median(on_t)))
}
