//! The just-in-time workflow end to end (collector/WORKFLOW.md), with real parts only: the
//! npm oidc-provider as the people's identity provider, the service (`usher-collector`),
//! usherd fetching its grants from the service, `usher` as each person's CLI (signed in
//! with the device authorization grant), and the real `ssh`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use usher_test_support::oidc::{default_sub, Account, OidcOptions, OidcProvider};
use usher_test_support::TestCa;
use usher_tests::*;

/// The host the test agent is, in grants and at the service.
const HOST: &str = "usher-test-host";
/// A host the service knows that no agent of the test runs (for decisions alone).
const OTHER_HOST: &str = "usher-test-db";
const AGENT_TOKEN: &str = "workflow-test-agent-token";

/// The service in a directory of its own, on a loopback port fixed before it first
/// starts (the agent is configured for it).
struct Service {
    dir: PathBuf,
    port: u16,
    config: PathBuf,
    ca: TestCa,
    child: Option<Child>,
}

impl Service {
    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("service.log"))
            .unwrap();
        let child = Command::new(bin("usher-collector"))
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("usher-collector starts");
        self.child = Some(child);
        if let Err(e) = wait_for_port(self.port, Duration::from_secs(20)) {
            panic!("the service did not start ({e}):\n{}", self.log());
        }
    }

    /// `kill -9`: what it acknowledged must survive.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("service.log")).unwrap_or_default()
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "service dir kept: {}\n--- service log ---\n{}",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A person at their own terminal: `usher` with a home of their own (so their sign-in
/// is theirs), trusting the service's and the provider's CAs.
struct Person {
    name: &'static str,
    home: PathBuf,
}

impl Person {
    fn new(world_dir: &Path, name: &'static str) -> Person {
        let home = world_dir.join("home").join(name);
        std::fs::create_dir_all(&home).unwrap();
        Person { name, home }
    }

    fn command(&self) -> Command {
        let mut c = Command::new(bin("usher"));
        c.env("HOME", &self.home)
            .env("XDG_CONFIG_HOME", self.home.join(".config"))
            .stdin(Stdio::null());
        c
    }

    fn usher(&self, args: &[&str]) -> Output {
        self.command().args(args).output().unwrap()
    }

    /// `usher ARGS --json`, which must succeed, parsed.
    fn json(&self, args: &[&str]) -> serde_json::Value {
        let out = self.command().args(args).arg("--json").output().unwrap();
        assert!(
            out.status.success(),
            "{} ran `usher {}`: {}",
            self.name,
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "usher {}: not JSON ({e}): {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    fn credentials(&self) -> PathBuf {
        self.home.join(".config/usher/service.json")
    }
}

/// Everything one workflow test runs against.
struct World {
    dir: PathBuf,
    provider: OidcProvider,
    service: Service,
    agent: TestAgent,
    /// The service's CA and the provider's, in one file (`usher login --ca`).
    cas: PathBuf,
}

impl World {
    fn start() -> World {
        let dir = std::env::temp_dir().join(format!(
            "usher-workflow-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut accounts = vec![
            // alice is an approver too: holding the role never lets her approve her own.
            Account::new("alice", &["eng", "sre-leads"]),
            Account::new("bob", &["sre-leads", "eng"]),
            Account::new("carol", &["sre-leads"]),
            Account::new("dave", &["auditors"]),
        ];
        // alice again under another name (same `sub`), as an approver.
        accounts.push(Account::new("alice-admin", &["sre-leads"]).with_sub(&default_sub("alice")));
        let provider = OidcProvider::start(OidcOptions {
            accounts,
            ..Default::default()
        })
        .unwrap_or_else(|e| panic!("the OpenID provider: {e}"));
        // The agent's name prefix decides the logins the service may grant: the agent
        // comes first, its [service] and [[issuer]] pointing at a port chosen ahead.
        let host_key_dir = dir.join("hostkey");
        std::fs::create_dir_all(&host_key_dir).unwrap();
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(host_key_dir.join("key"))
            .status()
            .unwrap();
        assert!(st.success());
        let host_key = std::fs::read_to_string(host_key_dir.join("key.pub"))
            .unwrap()
            .trim()
            .to_string();
        let provider_ca = provider.ca_path();
        let issuer = provider.issuer();
        // The logins the service may grant carry the agent's name prefix, known once the
        // agent exists; the agent needs the service's port and CA. So: the port and the
        // CA first, then the agent, then the service with the agent's prefix.
        let service_port = free_port();
        let service_ca_dir = dir.join("service-ca");
        std::fs::create_dir_all(&service_ca_dir).unwrap();
        let service_ca =
            TestCa::create(&service_ca_dir).unwrap_or_else(|e| panic!("the service's CA: {e}"));
        // The agent trusts the service's issuer by discovery, as WORKFLOW.md says.
        let agent = TestAgent::start_with(Options {
            extra_config: format!(
                "[[issuer]]\niss = \"https://127.0.0.1:{service_port}\"\ndiscovery = true\nca = \"{ca}\"\nrefresh_min_secs = 5\n\n\
                 [service]\nurl = \"https://127.0.0.1:{service_port}\"\ntoken = \"{AGENT_TOKEN}\"\n\
                 ca = \"{ca}\"\nwait_secs = 20\n\n\
                 [policy]\nallowed_profiles = [\"default\", \"guarded\"]\n",
                ca = service_ca.ca_pem().display()
            ),
            // SSH exec requests that touch a "held" file wait for a person's approval.
            profiles: vec![(
                "guarded.toml".into(),
                "name = \"guarded\"\n[exec]\napprove_commands = [\"touch *held*\"]\n[approval]\ntimeout_secs = 60\n".into(),
            )],
            ..Default::default()
        });
        let prefix = agent.prefix.clone();
        let service_config = |s: &Service| {
            format!(
                r#"listen = "127.0.0.1:{port}"
tls_cert = "{cert}"
tls_key = "{key}"
data_dir = "{data}"
public_url = "https://127.0.0.1:{port}"

[roles]
requester = ["eng"]
approver = ["sre-leads"]
auditor = ["auditors"]

[[request_policy]]
name = "web"
groups = ["eng"]
hosts = ["{HOST}"]
logins = ["{prefix}{{user}}"]
profiles = ["guarded"]
max_duration = "1h"
approvals = 1
approver_groups = ["sre-leads"]

[[request_policy]]
name = "db-pairs"
groups = ["eng"]
hosts = ["{OTHER_HOST}"]
logins = ["{prefix}{{user}}"]
max_duration = "1h"
approvals = 2
approver_groups = ["sre-leads"]

[[agent]]
host = "{HOST}"
token = "{AGENT_TOKEN}"
host_key = "{host_key}"

[[agent]]
host = "{OTHER_HOST}"
token = "{AGENT_TOKEN}-db"
host_key = "{host_key}"

[oidc]
issuer = "{issuer}"
client_id = "{web}"
client_secret = "{secret}"
cli_client_id = "{cli}"
ca = "{provider_ca}"
"#,
                port = s.port,
                cert = s.ca.server_cert().display(),
                key = s.ca.server_key().display(),
                data = s.dir.join("data").display(),
                web = usher_test_support::oidc::WEB_CLIENT_ID,
                secret = usher_test_support::oidc::WEB_CLIENT_SECRET,
                cli = usher_test_support::oidc::CLI_CLIENT_ID,
                provider_ca = provider_ca.display(),
            )
        };
        let service = Service::on(service_port, service_ca, service_config);
        // The agent started while the service was not there yet: started again, it finds
        // the service's keys by discovery at once.
        let mut agent = agent;
        agent.stop();
        agent.launch();
        let cas = dir.join("cas.pem");
        let mut bundle = std::fs::read(service.ca.ca_pem()).unwrap();
        bundle.extend(std::fs::read(provider.ca_path()).unwrap());
        std::fs::write(&cas, bundle).unwrap();
        World {
            dir,
            provider,
            service,
            agent,
            cas,
        }
    }

    fn person(&self, name: &'static str) -> Person {
        Person::new(&self.dir, name)
    }

    /// `usher login` as `person`, the device code approved at the provider as they would
    /// in a browser.
    fn login(&self, person: &Person) {
        let mut child = person
            .command()
            .args(["login", "--service", &self.service.url(), "--ca"])
            .arg(&self.cas)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut said = Vec::new();
        let code = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(line) => {
                    let code = line
                        .split_once("enter the code ")
                        .map(|(_, c)| c.trim().to_string());
                    said.push(line);
                    if let Some(code) = code {
                        break code;
                    }
                }
                Err(_) => {
                    let _ = child.kill();
                    let out = child.wait_with_output().unwrap();
                    panic!(
                        "usher login showed no code: {said:?} {}\n--- service ---\n{}",
                        String::from_utf8_lossy(&out.stdout),
                        self.service.log()
                    );
                }
            }
        };
        self.provider
            .approve_device(&code, person.name)
            .unwrap_or_else(|e| panic!("the provider did not take the code: {e}"));
        let status = poll_until(
            "usher login to finish",
            Duration::from_secs(60),
            Duration::from_millis(100),
            || child.try_wait().unwrap(),
        );
        let rest: Vec<String> = rx.try_iter().collect();
        match status {
            Ok(st) if st.success() => {}
            other => {
                let _ = child.kill();
                panic!(
                    "usher login as {}: {other:?}: {said:?} {rest:?}\n--- service ---\n{}\n--- provider ---\n{}",
                    person.name,
                    self.service.log(),
                    self.provider.log()
                );
            }
        }
    }

    /// A pending request by `person` for the agent's host, bound to the agent's client key.
    fn request(&self, person: &Person, host: &str, ttl: &str, reason: &str) -> serde_json::Value {
        let key = self.agent.client_key.with_extension("pub");
        let login = self.agent.login(person.name);
        person.json(&[
            "request",
            "--host",
            host,
            "--login",
            &login,
            "--for",
            ttl,
            "--reason",
            reason,
            "--ssh-key",
            key.to_str().unwrap(),
        ])
    }

    /// Waits until the agent holds grant `jti` (from the feed).
    fn wait_for_grant(&self, jti: &str) {
        self.agent
            .wait_for(30, &format!("grant {jti} to reach the agent"), || {
                let out = self.agent.usher(&["grant", "list", "--json"]);
                String::from_utf8_lossy(&out.stdout).contains(jti)
            });
    }

    fn agent_grants(&self) -> String {
        String::from_utf8_lossy(&self.agent.usher(&["grant", "list", "--json"]).stdout).into_owned()
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- provider log ---\n{}", self.provider.log());
            eprintln!("--- usherd log ---\n{}", self.agent.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Service {
    /// `new`, on a port and with a CA directory chosen before (an agent is configured
    /// for both).
    fn on(port: u16, ca: TestCa, config: impl FnOnce(&Service) -> String) -> Service {
        let dir = ca.dir.parent().unwrap().join(format!("service-{port}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut service = Service {
            config: dir.join("service.toml"),
            dir,
            port,
            ca,
            child: None,
        };
        let text = config(&service);
        std::fs::write(&service.config, text).unwrap();
        service.start();
        service
    }
}

/// The id of the pending request with `reason`, as `approver` lists them.
fn pending_with_reason(approver: &Person, reason: &str) -> String {
    poll_until(
        &format!("a pending request for {reason:?}"),
        Duration::from_secs(20),
        Duration::from_millis(200),
        || {
            approver
                .json(&["requests", "--pending"])
                .as_array()?
                .iter()
                .find(|r| r["reason"] == reason)
                .and_then(|r| r["id"].as_str().map(String::from))
        },
    )
    .unwrap_or_else(|e| panic!("{e}"))
}

/// The claims of a compact JWT, unverified (the agent verifies; the test reads).
fn claims_of(jwt: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = jwt
        .split('.')
        .nth(1)
        .unwrap_or_else(|| panic!("not a JWT: {jwt:?}"));
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// alice signs in, asks for the web host with her key, bob approves, the grant reaches
/// the host through the feed, `ssh` with her key works; the grant outlives a restart of
/// the agent (with the service down) and of the service; `usher revoke` ends her live
/// session within seconds.
#[test]
fn alice_requests_bob_approves_alice_logs_in_and_a_revocation_ends_her_session() {
    let mut world = World::start();
    let alice = world.person("alice");
    let bob = world.person("bob");
    world.login(&alice);
    world.login(&bob);
    // The sign-in is kept private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(alice.credentials())
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let me = alice.json(&["whoami"]);
    assert_eq!(me["name"], "alice", "{me}");
    assert_eq!(me["sub"], default_sub("alice"), "{me}");
    assert!(
        me["roles"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r == "requester"),
        "{me}"
    );

    let login = world.agent.login("alice");
    let request = world.request(&alice, HOST, "15m", "INC-1234");
    let id = request["id"].as_str().unwrap().to_string();
    assert_eq!(request["state"], "pending", "{request}");
    // Nothing reaches the host before a decision.
    assert_eq!(world.agent.ssh(&login, "true").status.code(), Some(255));
    // bob sees it among the pending ones, and approves it.
    let pending = bob.json(&["requests", "--pending"]);
    assert!(
        pending
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["id"] == id.as_str()),
        "{pending}"
    );
    let reviewed = bob.json(&["review", &id, "--approve", "--comment", "go ahead"]);
    assert_eq!(reviewed["state"], "approved", "{reviewed}");
    let grant_id = reviewed["grant_id"].as_str().unwrap().to_string();
    // alice sees her request approved, and `usher wait` prints its grant at once.
    let mine = alice.json(&["requests"]);
    assert!(mine
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == id.as_str()));
    let out = alice.usher(&["wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let claims = claims_of(String::from_utf8_lossy(&out.stdout).trim());
    assert_eq!(claims["jti"], grant_id.as_str(), "{claims}");
    assert_eq!(claims["aud"], HOST, "{claims}");

    world.wait_for_grant(&grant_id);
    let out = world.agent.ssh(&login, "id -un");
    assert!(
        out.status.success(),
        "{}\n{}",
        stderr(&out),
        world.agent.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), login);
    assert!(
        world.agent.log().contains("service feed"),
        "the grant did not come by the feed: {}",
        world.agent.log()
    );

    // usherd restarts: the grant is still here (checked again at start, the service's
    // keys by discovery), and usable.
    world.agent.stop();
    world.agent.launch();
    assert!(world.agent_grants().contains(&grant_id));
    let out = world.agent.ssh(&login, "true");
    assert!(out.status.success(), "{}", stderr(&out));

    // The service goes down (kill -9) and usherd restarts meanwhile: the agent checks the
    // grant's signature with the copy of the service's keys it kept in its state
    // directory, so the grant stays usable through the outage...
    let back_before = world.agent.log().matches("answers again").count();
    world.service.kill();
    world.agent.stop();
    world.agent.launch();
    assert!(world.agent_grants().contains(&grant_id));
    let out = world.agent.ssh(&login, "true");
    assert!(
        out.status.success(),
        "the grant was lost in an outage of the service: {}\n{}",
        stderr(&out),
        world.agent.log()
    );
    // ... and the service comes back: its requests and grants are still there, the feed
    // finds it again and the grant is usable again.
    world.service.start();
    let listed = alice.json(&["requests"]);
    let again = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .unwrap_or_else(|| panic!("the request is gone after a restart: {listed}"))
        .clone();
    assert_eq!(again["state"], "approved", "{again}");
    assert_eq!(again["grant_id"], grant_id.as_str(), "{again}");
    world
        .agent
        .wait_for(60, "the feed to reach the service again", || {
            world.agent.log().matches("answers again").count() > back_before
        });
    world.wait_for_grant(&grant_id);
    let out = world.agent.ssh(&login, "true");
    assert!(out.status.success(), "{}", stderr(&out));

    // A live session, then `usher revoke` by alice herself (the grant's own `sub`).
    let listed = || {
        String::from_utf8_lossy(&world.agent.usher(&["sessions", "--json"]).stdout)
            .matches(login.as_str())
            .count()
    };
    let mut live = world
        .agent
        .ssh_command(&login)
        .arg("sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    world
        .agent
        .wait_for(15, "the live session to be listed", || listed() > 0);
    let revoked_at = Instant::now();
    let out = alice.usher(&["revoke", &id, "--reason", "done with INC-1234"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let ended = poll_until(
        "the live session to end",
        Duration::from_secs(30),
        Duration::from_millis(20),
        || live.try_wait().unwrap(),
    );
    let took = revoked_at.elapsed();
    if ended.is_err() {
        let _ = live.kill();
        panic!(
            "the session outlived the revocation:\n{}",
            world.agent.log()
        );
    }
    println!("revoke-to-session-end: {} ms", took.as_millis());
    assert!(
        took < Duration::from_secs(5),
        "revoke-to-session-end took {took:?}"
    );
    world
        .agent
        .wait_for(10, "the account to go", || !user_exists(&login));
    let after = alice.json(&["requests"]);
    let state = after
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == id.as_str())
        .map(|r| r["state"].clone());
    assert_eq!(state, Some(serde_json::json!("revoked")), "{after}");
    // The revocation holds across a restart of the agent.
    world.agent.stop();
    world.agent.launch();
    assert_eq!(world.agent.ssh(&login, "true").status.code(), Some(255));
}

/// N of M: a rule that needs two approvers is not satisfied by one; nobody approves their
/// own request (not with the approver role, not under another name); a denial ends a
/// request and nothing reaches the host.
#[test]
fn two_approvals_no_self_approval_and_a_denial() {
    let world = World::start();
    let alice = world.person("alice");
    let alice_admin = world.person("alice-admin");
    let bob = world.person("bob");
    let carol = world.person("carol");
    for p in [&alice, &alice_admin, &bob, &carol] {
        world.login(p);
    }
    let request = world.request(&alice, OTHER_HOST, "10m", "schema migration");
    let id = request["id"].as_str().unwrap().to_string();
    assert_eq!(request["approvals_needed"], 2, "{request}");

    // alice holds the approver role; her own request is still not hers to approve, under
    // either of her names.
    for who in [&alice, &alice_admin] {
        let out = who.usher(&["review", &id, "--approve"]);
        assert!(
            !out.status.success(),
            "{} approved their own request",
            who.name
        );
        assert!(
            stderr(&out).contains("403"),
            "{}: {}",
            who.name,
            stderr(&out)
        );
    }
    let one = bob.json(&["review", &id, "--approve", "--comment", "looks fine"]);
    assert_eq!(
        one["state"], "pending",
        "one approval of two issued a grant: {one}"
    );
    assert!(one["grant_id"].is_null(), "{one}");
    // The same approver twice is still one approval.
    let out = bob.usher(&["review", &id, "--approve"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("409"), "{}", stderr(&out));
    let two = carol.json(&["review", &id, "--approve", "--comment", "agreed"]);
    assert_eq!(two["state"], "approved", "{two}");
    assert!(two["grant_id"].is_string(), "{two}");
    // alice's wait ends at once, with the grant: bound to her key, for that host, naming
    // both approvers and the request.
    let out = alice.usher(&["wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jwt = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let claims = claims_of(&jwt);
    assert_eq!(claims["aud"], OTHER_HOST, "{claims}");
    assert_eq!(claims["sub"], default_sub("alice"), "{claims}");
    assert_eq!(claims["login"], world.agent.login("alice"), "{claims}");
    assert_eq!(claims["request"], id.as_str(), "{claims}");
    assert_eq!(claims["jti"], two["grant_id"], "{claims}");
    assert_eq!(
        claims["ssh_keys"][0].as_str().map(str::trim),
        Some(world.agent.client_public_key().as_str()),
        "{claims}"
    );
    let approved_by = claims["approved_by"].as_str().unwrap_or_default();
    assert!(
        approved_by.contains("bob") && approved_by.contains("carol"),
        "{claims}"
    );
    // Someone else's grant is not shown to them.
    let out = bob.usher(&["wait", &id]);
    assert!(
        out.stdout.is_empty() || !String::from_utf8_lossy(&out.stdout).contains(&jwt),
        "bob was shown alice's grant"
    );

    // A denial: bob says no, alice's --wait exits 2 with the reason; nothing reaches a
    // host.
    let mut waiting = alice
        .command()
        .args(["request", "--host", HOST, "--login"])
        .arg(world.agent.login("alice"))
        .args([
            "--for",
            "10m",
            "--reason",
            "INC-9",
            "--wait",
            "--timeout",
            "60s",
        ])
        .arg("--ssh-key")
        .arg(world.agent.client_key.with_extension("pub"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let denied_id = pending_with_reason(&bob, "INC-9");
    let denied = bob.json(&["review", &denied_id, "--deny", "--comment", "change freeze"]);
    assert_eq!(denied["state"], "denied", "{denied}");
    let status = poll_until(
        "alice's --wait to end",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || waiting.try_wait().unwrap(),
    )
    .unwrap();
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("change freeze"), "{}", stderr(&out));
    assert!(out.stdout.is_empty(), "a denied request printed a grant");
    // An approval after the denial changes nothing.
    let out = carol.usher(&["review", &denied_id, "--approve"]);
    assert!(!out.status.success());
    // No grant of the denied request reached the host, even after a full feed round.
    std::thread::sleep(Duration::from_secs(2));
    let grants = world.agent_grants();
    assert_eq!(
        grants.matches("\"jti\"").count(),
        0,
        "a grant reached the host without an approval: {grants}"
    );
    assert_eq!(
        world
            .agent
            .ssh(&world.agent.login("alice"), "true")
            .status
            .code(),
        Some(255)
    );
}

/// A short grant from the service ends on time: the session is cut and the account
/// removed at `exp`.
#[test]
fn a_short_grant_from_the_service_ends_its_session_and_account_at_expiry() {
    let world = World::start();
    let alice = world.person("alice");
    let bob = world.person("bob");
    world.login(&alice);
    world.login(&bob);
    let login = world.agent.login("alice");
    // alice waits for the decision, with a console secret made on her side.
    let waiting = alice
        .command()
        .args(["request", "--host", HOST, "--login", &login])
        .args([
            "--for",
            "12s",
            "--reason",
            "a quick look",
            "--console-secret",
        ])
        .args(["--wait", "--timeout", "60s", "--json", "--ssh-key"])
        .arg(world.agent.client_key.with_extension("pub"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let id = pending_with_reason(&bob, "a quick look");
    let reviewed = bob.json(&["review", &id, "--approve"]);
    let out = waiting.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let decided: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(decided["state"], "approved", "{decided}");
    // The secret is shown to her once; only its hash went to the service, into the grant.
    let secret = decided["console_secret"].as_str().unwrap_or_default();
    assert_eq!(secret.len(), 20, "{decided}");
    let claims = claims_of(decided["grant"].as_str().unwrap());
    let hash = claims["secret_hash"].as_str().unwrap_or_default();
    assert!(hash.starts_with('$') && !hash.contains(secret), "{claims}");
    let grant_id = reviewed["grant_id"].as_str().unwrap().to_string();
    let expires_at = reviewed["expires_at"].as_i64().unwrap();
    world.wait_for_grant(&grant_id);
    let mut live = world
        .agent
        .ssh_command(&login)
        .arg("sleep 600")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let ended = poll_until(
        "the session to end at expiry",
        Duration::from_secs(40),
        Duration::from_millis(100),
        || live.try_wait().unwrap(),
    );
    if ended.is_err() {
        let _ = live.kill();
        panic!("the session outlived its grant:\n{}", world.agent.log());
    }
    let late = now() - expires_at;
    assert!(
        (-2..=3).contains(&late),
        "the session ended {late}s after exp"
    );
    world
        .agent
        .wait_for(10, "the account to go at expiry", || !user_exists(&login));
    assert_eq!(world.agent.ssh(&login, "true").status.code(), Some(255));
}

/// A revocation made while the host's agent was down reaches it when it comes back: the
/// stored grant ends, and the grant presented at the password prompt is refused.
#[test]
fn a_revocation_made_while_the_agent_was_down_reaches_it_when_it_is_back() {
    let mut world = World::start();
    let alice = world.person("alice");
    let bob = world.person("bob");
    world.login(&alice);
    world.login(&bob);
    let login = world.agent.login("alice");
    let request = world.request(&alice, HOST, "30m", "INC-77");
    let id = request["id"].as_str().unwrap().to_string();
    let reviewed = bob.json(&["review", &id, "--approve"]);
    let grant_id = reviewed["grant_id"].as_str().unwrap().to_string();
    let out = alice.usher(&["wait", &id]);
    assert!(out.status.success(), "{}", stderr(&out));
    let jwt = String::from_utf8_lossy(&out.stdout).trim().to_string();
    world.wait_for_grant(&grant_id);
    assert!(world.agent.ssh(&login, "true").status.success());

    world.agent.stop();
    // Someone who is neither approver, admin nor the grant's holder (an auditor) may not
    // revoke it.
    let dave = world.person("dave");
    world.login(&dave);
    let out = dave.usher(&["revoke", &id]);
    assert!(!out.status.success(), "dave revoked a grant");
    assert!(stderr(&out).contains("403"), "{}", stderr(&out));
    // bob may (an approver), by the grant's id this time.
    let out = bob.usher(&["revoke", &grant_id, "--reason", "wrong host"]);
    assert!(out.status.success(), "{}", stderr(&out));
    world.agent.launch();
    world.agent.wait_for(30, "the revoked grant to go", || {
        !world.agent_grants().contains(&grant_id)
    });
    world
        .agent
        .wait_for(10, "the account to go", || !user_exists(&login));
    assert_eq!(world.agent.ssh(&login, "true").status.code(), Some(255));
    let out = world.agent.ssh_with_password(&login, &jwt, "true");
    assert_eq!(out.status.code(), Some(255), "{}", stderr(&out));
    assert!(
        world.agent.log().contains("revoked"),
        "{}",
        world.agent.log()
    );
}

/// `usher login`'s half at the provider, on its own: discovery, a device code, pending
/// until the person approves it, then an ID token for the CLI's client; a provider that
/// calls itself by another name than the service says is not followed.
#[test]
fn the_device_flow_gets_an_id_token_from_the_real_provider() {
    use usher::cli::device::{self, DeviceError};
    use usher_test_support::oidc::CLI_CLIENT_ID;
    let provider = OidcProvider::start(OidcOptions::default())
        .unwrap_or_else(|e| panic!("the OpenID provider: {e}"));
    let ca = provider.ca_path();
    let config = usher_wire::jit::LoginConfig {
        issuer: format!("{}/", provider.issuer()),
        client_id: CLI_CLIENT_ID.into(),
        scopes: vec!["openid".into(), "profile".into(), "groups".into()],
    };
    // `usher login`'s half, on a runtime of its own as in the CLI: it shows the code,
    // then polls (every 5 s, RFC 8628's default) and keeps waiting through
    // "authorization_pending" while the person is still at the page.
    let (shown, code_rx) = std::sync::mpsc::channel();
    let login = {
        let config = config.clone();
        let ca = ca.clone();
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let http = usher::service::http_client(Some(&ca), Duration::from_secs(30))
                    .expect("an HTTP client");
                let pending = device::start(&http, &config).await?;
                let _ = shown.send(pending.code.clone());
                pending.wait().await
            })
        })
    };
    let code = match code_rx.recv_timeout(Duration::from_secs(30)) {
        Ok(code) => code,
        Err(_) => panic!("no device code: {:?}", login.join().map(|r| r.err())),
    };
    assert!(!code.user_code.is_empty());
    assert!(code.verification_uri.starts_with(&provider.issuer()));
    std::thread::sleep(Duration::from_secs(7));
    assert!(
        !login.is_finished(),
        "the CLI stopped waiting before the sign-in"
    );
    provider.approve_device(&code.user_code, "bob").unwrap();
    let id_token = login
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("{e}\n{}", provider.log()));
    let claims = claims_of(&id_token);
    assert_eq!(claims["sub"], default_sub("bob"), "{claims}");
    assert_eq!(claims["aud"], CLI_CLIENT_ID, "{claims}");
    assert_eq!(claims["iss"], provider.issuer(), "{claims}");

    // The service says the provider is at "localhost"; the provider says 127.0.0.1.
    let elsewhere = usher_wire::jit::LoginConfig {
        issuer: provider.issuer().replace("127.0.0.1", "localhost"),
        ..config
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let http = usher::service::http_client(Some(&ca), Duration::from_secs(30)).unwrap();
    let refused = runtime.block_on(device::start(&http, &elsewhere));
    assert!(
        matches!(refused, Err(DeviceError::IssuerMismatch { .. })),
        "{:?}",
        refused.err()
    );
}

/// A person's API call to the service with their signed-in token.
fn api(
    world: &World,
    person: &Person,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(person.credentials()).unwrap()).unwrap();
    let token = stored["token"].as_str().unwrap().to_string();
    let ca =
        reqwest::Certificate::from_pem(&std::fs::read(world.service.ca.ca_pem()).unwrap()).unwrap();
    let client = reqwest::blocking::Client::builder()
        .add_root_certificate(ca)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    let url = format!("{}{path}", world.service.url());
    let request = match method {
        "POST" => client.post(&url).json(&body.unwrap_or_default()),
        _ => client.get(&url),
    };
    let response = request.bearer_auth(token).send().unwrap();
    let status = response.status().as_u16();
    let text = response.text().unwrap_or_default();
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

#[test]
fn a_command_held_in_a_session_waits_on_the_service_page_and_a_person_approves_it() {
    let world = World::start();
    let alice = world.person("alice");
    let bob = world.person("bob");
    world.login(&alice);
    world.login(&bob);
    let login = world.agent.login("alice");
    let key = world.agent.client_key.with_extension("pub");
    let request = alice.json(&[
        "request",
        "--host",
        HOST,
        "--login",
        &login,
        "--profile",
        "guarded",
        "--for",
        "15m",
        "--reason",
        "INC-77",
        "--ssh-key",
        key.to_str().unwrap(),
    ]);
    let id = request["id"].as_str().unwrap().to_string();
    let reviewed = bob.json(&["review", &id, "--approve"]);
    let grant_id = reviewed["grant_id"].as_str().unwrap().to_string();
    world.wait_for_grant(&grant_id);

    // alice's session asks to run a held command: it waits at the service.
    let mut client = world
        .agent
        .ssh_command(&login)
        .arg("touch ~/held-central && echo ran")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let command_id = poll_until(
        "the command to be pending at the service",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || {
            let (status, list) = api(&world, &bob, "GET", "/api/v1/commands?state=pending", None);
            assert_eq!(status, 200, "{list}");
            list.as_array()?
                .iter()
                .find(|c| {
                    c["request"]["session_id"].is_string()
                        && c["request"]["login"] == login.as_str()
                })
                .and_then(|c| c["request"]["id"].as_str().map(String::from))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", world.agent.log(), world.service.log()));
    let held = home_of(&login).join("held-central");
    assert!(!held.exists(), "nothing ran before the decision");
    let review =
        serde_json::json!({"decision": usher_wire::jit::Decision::Approve, "comment": "ok"});
    // alice may not approve her own command, though she is an approver.
    let (status, answer) = api(
        &world,
        &alice,
        "POST",
        &format!("/api/v1/commands/{command_id}/review"),
        Some(review.clone()),
    );
    assert!(
        status >= 400,
        "alice approved her own command: {status} {answer}"
    );
    let (status, answer) = api(
        &world,
        &bob,
        "POST",
        &format!("/api/v1/commands/{command_id}/review"),
        Some(review),
    );
    assert_eq!(status, 200, "{answer}");
    let done = poll_until(
        "the approved command to run",
        Duration::from_secs(30),
        Duration::from_millis(100),
        || client.try_wait().unwrap(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", world.agent.log()));
    let out = client.wait_with_output().unwrap();
    assert!(done.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("ran"));
    assert!(held.exists());
    // The host knows who approved it: the service's signed decision named bob.
    let listed = world.agent.usher(&["--json", "approvals"]);
    let listed: Vec<serde_json::Value> = serde_json::from_slice(&listed.stdout).unwrap();
    let decided = listed
        .iter()
        .find(|s| s["request"]["id"] == command_id.as_str())
        .unwrap();
    assert_eq!(decided["state"], "approved", "{decided}");
    assert!(
        decided["decisions"].to_string().contains("bob")
            || decided["decisions"]
                .to_string()
                .contains(&default_sub("bob")),
        "{decided}"
    );
}
