//! `cargo xtask bench jit`: the just-in-time workflow's figures, on loopback, with the real
//! parts (the npm oidc-provider, the service, usherd fetching grants from the service, the
//! real `ssh`):
//!
//! - request to usable grant with automatic approval: from the API call that creates the
//!   request to (a) the grant installed on the host (seen on the agent's control socket)
//!   and (b) the first `ssh … true` with the bound key that succeeds (account creation
//!   included, as a person would see it);
//! - revoke to session end: a live `ssh` session, the grant revoked through the service's
//!   API, until the client sees its session end;
//! - token exchange: workload tokens (from the provider) exchanged for grants, requests per
//!   second with N concurrent clients, next to the service's cheapest authenticated read
//!   (`GET /api/v1/me`) as the ceiling of its HTTP stack.
//!
//! There is no peer on this machine doing the same work (Teleport's access requests, say),
//! so the figures stand alone; medians of `USHER_BENCH_RUNS` runs (default 15).

#![deny(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usher_test_support::oidc::{OidcOptions, OidcProvider, Workload};
use usher_test_support::TestCa;
use usher_tests::*;

const AGENT_TOKEN: &str = "bench-agent-token";
const WORKLOAD_CLIENT: &str = "bench-deploy";

fn main() {
    if let Err(e) = run() {
        eprintln!("bench jit: {e}");
        std::process::exit(1);
    }
}

struct Service {
    child: Child,
    dir: PathBuf,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

fn run() -> Result<(), String> {
    let runs: usize = std::env::var("USHER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let exchange_secs: u64 = std::env::var("USHER_BENCH_EXCHANGE_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let clients: usize = 8;

    let provider = OidcProvider::start(OidcOptions {
        workloads: vec![Workload::github_actions(
            WORKLOAD_CLIENT,
            "acme/web",
            4242,
            "refs/heads/main",
            "deploy",
            None,
        )],
        ..Default::default()
    })
    .map_err(|e| format!("the OpenID provider: {e}"))?;

    let dir = std::env::temp_dir().join(format!("usher-bench-jit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let service_port = free_port();
    let service_url = format!("https://127.0.0.1:{service_port}");
    let ca_dir = dir.join("service-ca");
    std::fs::create_dir_all(&ca_dir).map_err(|e| e.to_string())?;
    let ca = TestCa::create(&ca_dir).map_err(|e| format!("the service's CA: {e}"))?;
    let jwks = dir.join("service.jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).map_err(|e| e.to_string())?;
    let mut agent = TestAgent::start_with(Options {
        extra_config: format!(
            "[[issuer]]\niss = \"{service_url}\"\njwks = \"{}\"\n\n\
             [service]\nurl = \"{service_url}\"\ntoken = \"{AGENT_TOKEN}\"\nca = \"{}\"\nwait_secs = 25\n",
            jwks.display(),
            ca.ca_pem().display()
        ),
        ..Default::default()
    });
    // The service wants the host's key line; the bench ships nothing, any Ed25519 key does.
    let key_file = dir.join("hostkey");
    Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key_file)
        .status()
        .map_err(|e| e.to_string())?;
    let host_key = std::fs::read_to_string(key_file.with_extension("pub"))
        .map_err(|e| e.to_string())?
        .trim()
        .to_string();
    let host = agent.host.clone();
    let prefix = agent.prefix.clone();
    let config = format!(
        r#"listen = "127.0.0.1:{service_port}"
tls_cert = "{cert}"
tls_key = "{key}"
data_dir = "{data}"
public_url = "{service_url}"

# The bench measures the service, not its flood protection.
[limits]
requests_burst = 100000
requests_per_minute = 6000000
exchanges_burst = 100000
exchanges_per_second = 100000

[roles]
requester = ["eng"]
approver = ["sre-leads"]

[[request_policy]]
name = "auto"
groups = ["eng"]
hosts = ["{host}"]
logins = ["{prefix}{{user}}"]
max_duration = "1h"
approvals = 1
approver_groups = ["sre-leads"]
auto_approve_groups = ["eng"]

[[agent]]
host = "{host}"
token = "{AGENT_TOKEN}"
host_key = "{host_key}"

[[workload]]
name = "deploy"
issuer = "{issuer}"
audience = "https://usher.bench"
claims = {{ repository = "acme/web", ref = "refs/heads/main" }}
hosts = ["{host}"]
login = "{prefix}deploy"
max_lifetime = "15m"

[[workload_issuer]]
iss = "{issuer}"
discovery = true
ca = "{provider_ca}"
"#,
        cert = ca.server_cert().display(),
        key = ca.server_key().display(),
        data = dir.join("data").display(),
        issuer = provider.issuer(),
        provider_ca = provider.ca_path().display(),
    );
    let config_path = dir.join("service.toml");
    std::fs::write(&config_path, config).map_err(|e| e.to_string())?;
    let log = std::fs::File::create(dir.join("service.log")).map_err(|e| e.to_string())?;
    let child = Command::new(bin("usher-collector"))
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("usher-collector: {e}"))?;
    let _service = Service {
        child,
        dir: dir.clone(),
    };
    wait_for_port(service_port, Duration::from_secs(20)).map_err(|e| e.to_string())?;

    let http = reqwest::blocking::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca.ca_pem()).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
        )
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let body = http
        .get(format!("{service_url}/jwks.json"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.bytes())
        .map_err(|e| format!("the service's JWKS: {e}"))?;
    std::fs::write(&jwks, &body).map_err(|e| e.to_string())?;
    agent.stop();
    agent.launch();

    let token = mint(&config_path, "bench-alice", "alice", "eng")?;
    let auth = format!("Bearer {token}");
    let login = format!("{prefix}alice");

    // Request → usable grant, then revoke → session end, `runs` times.
    let (mut installed, mut usable, mut revoke_end) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let t0 = Instant::now();
        let made: serde_json::Value = http
            .post(format!("{service_url}/api/v1/requests"))
            .header("authorization", &auth)
            .json(&serde_json::json!({
                "host": host, "login": login, "duration_secs": 600,
                "reason": "bench", "ssh_key": agent.client_public_key(),
            }))
            .send()
            .and_then(|r| r.error_for_status())
            .and_then(|r| r.json())
            .map_err(|e| format!("POST /api/v1/requests: {e}"))?;
        let grant_id = made["grant_id"]
            .as_str()
            .ok_or_else(|| format!("the request was not approved at once: {made}"))?
            .to_string();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let out = agent.usher(&["grant", "list", "--json"]);
            let list: serde_json::Value =
                serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
            let found = list
                .as_array()
                .is_some_and(|l| l.iter().any(|g| g["jti"] == grant_id.as_str()));
            if found {
                installed.push(t0.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("grant {grant_id} never reached the agent"));
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let ok = agent.ssh(&login, "true");
        if !ok.status.success() {
            return Err(format!(
                "ssh with the granted key failed: {}",
                String::from_utf8_lossy(&ok.stderr)
            ));
        }
        usable.push(t0.elapsed().as_secs_f64() * 1000.0);

        // A live session, then the revocation.
        let mut session = agent
            .ssh_command(&login)
            .arg("echo up; exec sleep 300")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| e.to_string())?;
        {
            use std::io::Read;
            let mut buf = [0u8; 3];
            session
                .stdout
                .as_mut()
                .ok_or("no stdout")?
                .read_exact(&mut buf)
                .map_err(|e| format!("the session did not start: {e}"))?;
        }
        let t1 = Instant::now();
        http.post(format!("{service_url}/api/v1/grants/{grant_id}/revoke"))
            .header("authorization", &auth)
            .json(&serde_json::json!({"reason": "bench"}))
            .send()
            .and_then(|r| r.error_for_status())
            .map_err(|e| format!("revoke: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if session.try_wait().map_err(|e| e.to_string())?.is_some() {
                revoke_end.push(t1.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            if Instant::now() > deadline {
                let _ = session.kill();
                return Err("a revoked session was still alive after 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        // The account goes with its last grant; the next run starts from nothing.
        agent.wait_for(30, "the account to go", || !user_exists(&login));
    }

    // Token exchange, against the cheapest authenticated read as the ceiling.
    let workload_token = provider
        .workload_token(WORKLOAD_CLIENT, "https://usher.bench")
        .map_err(|e| format!("workload token: {e}"))?;
    let key = agent.client_public_key();
    let deploy_login = format!("{prefix}deploy");
    let exchange = |http: &reqwest::blocking::Client| {
        http.post(format!("{service_url}/api/v1/token"))
            .form(&[
                ("grant_type", usher_wire::jit::TOKEN_EXCHANGE_GRANT_TYPE),
                ("subject_token", workload_token.as_str()),
                ("subject_token_type", usher_wire::jit::JWT_TOKEN_TYPE),
                ("audience", host.as_str()),
                ("login", deploy_login.as_str()),
                ("ssh_key", key.as_str()),
                ("duration", "300"),
            ])
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    };
    if !exchange(&http) {
        return Err(format!(
            "a token exchange failed; service log:\n{}",
            std::fs::read_to_string(dir.join("service.log")).unwrap_or_default()
        ));
    }
    let me = |http: &reqwest::blocking::Client| {
        http.get(format!("{service_url}/api/v1/me"))
            .header("authorization", &auth)
            .send()
            .map(|r| r.status().is_success())
            .unwrap_or(false)
    };
    let exchange_rps = throughput(&http, clients, exchange_secs, &exchange);
    let me_rps = throughput(&http, clients, exchange_secs, &me);

    println!("usher bench jit ({runs} runs, medians; loopback; service on SQLite)");
    println!(
        "  request → grant on the host (auto-approved):  {:8.1} ms",
        median(installed)
    );
    println!(
        "  request → first ssh login with the grant:     {:8.1} ms",
        median(usable)
    );
    println!(
        "  revoke → live ssh session ended:              {:8.1} ms",
        median(revoke_end)
    );
    println!(
        "  token exchange ({clients} clients, {exchange_secs} s):           {:8.1} req/s",
        exchange_rps
    );
    println!(
        "  GET /api/v1/me (same clients, the ceiling):   {:8.1} req/s  (exchange = {:.2}x of it)",
        me_rps,
        exchange_rps / me_rps
    );
    Ok(())
}

/// Successful requests per second with `clients` threads for `secs` seconds.
fn throughput(
    http: &reqwest::blocking::Client,
    clients: usize,
    secs: u64,
    call: &(dyn Fn(&reqwest::blocking::Client) -> bool + Sync),
) -> f64 {
    let ok = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs(secs);
    std::thread::scope(|s| {
        for _ in 0..clients {
            let ok = ok.clone();
            let http = http.clone();
            s.spawn(move || {
                while Instant::now() < end {
                    if call(&http) {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    ok.load(Ordering::Relaxed) as f64 / secs as f64
}

/// An API token for `sub` from the service's own `token` subcommand.
fn mint(config: &Path, sub: &str, name: &str, groups: &str) -> Result<String, String> {
    let out = Command::new(bin("usher-collector"))
        .arg("--config")
        .arg(config)
        .args(["token", "--sub", sub, "--name", name, "--groups", groups])
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(format!(
            "usher-collector token: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}
