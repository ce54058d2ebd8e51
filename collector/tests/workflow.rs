//! The workflow over HTTP against the real service (this package's binary): alice requests,
//! bob approves, the grant verifies against the service's `/jwks.json`, the agent feed gives
//! it to web-1 and not to web-2, a revocation reaches a waiting long-poll within a second,
//! the webhooks hear of it, and the state survives a restart; two instances on one
//! PostgreSQL share their state and each other's changes wake their long-polls.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use usher_collector::uploader::openssh_public_line;
use usher_test_support::{Collector, Postgres, TrustedAgent, WebhookSink};

const POLICY: &str = r#"
[roles]
requester = ["eng"]
approver = ["sre"]
auditor = ["audit"]

[[request_policy]]
name = "engineers"
groups = ["eng"]
hosts = ["web-*"]
logins = ["jit-{user}"]
profiles = ["restricted"]
max_duration = "4h"
approvals = 1
approver_groups = ["sre"]
pending_ttl = "1h"
"#;

fn agent(host: &str, seed: u8) -> TrustedAgent {
    TrustedAgent {
        host: host.into(),
        token: format!("agent-token-{host}"),
        host_key: openssh_public_line(&SigningKey::from_bytes(&[seed; 32])),
    }
}

fn user_key() -> String {
    openssh_public_line(&SigningKey::from_bytes(&[42; 32]))
}

/// One running service and a client that trusts its CA.
struct Service {
    collector: Collector,
    http: reqwest::Client,
}

impl Service {
    /// Configured with `top` (top-level keys and `[state]`) and `tables` (after the agents).
    fn new(top: &str, tables: &str) -> Service {
        let mut collector = Collector::new(&[agent("web-1", 1), agent("web-2", 2)], top);
        collector.binary = PathBuf::from(env!("CARGO_BIN_EXE_usher-collector"));
        let mut config = std::fs::read_to_string(&collector.config).unwrap();
        config.push_str(POLICY);
        config.push_str(tables);
        std::fs::write(&collector.config, config).unwrap();
        let ca = std::fs::read(collector.ca.ca_pem()).unwrap();
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(Duration::from_secs(90))
            .build()
            .unwrap();
        Service { collector, http }
    }

    /// An API token for a person in `groups`, minted by `usher-collector token`.
    fn token(&self, sub: &str, name: &str, groups: &str) -> String {
        let out = std::process::Command::new(&self.collector.binary)
            .arg("--config")
            .arg(&self.collector.config)
            .args(["token", "--sub", sub, "--name", name, "--groups", groups])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.collector.url()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_string());
        }
        let answer = req.send().await.unwrap();
        let status = answer.status().as_u16();
        let bytes = answer.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn get(&self, path: &str, token: &str) -> (u16, Value) {
        self.call(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: Value) -> (u16, Value) {
        self.call(reqwest::Method::POST, path, token, Some(body))
            .await
    }

    async fn request(&self, token: &str, login: &str) -> Value {
        let (status, r) = self
            .post(
                "/api/v1/requests",
                token,
                json!({"host": "web-1", "login": login, "profile": "restricted",
                       "duration_secs": 1800, "reason": "INC-1234", "ssh_key": user_key()}),
            )
            .await;
        assert_eq!(status, 201, "{r}");
        r
    }
}

/// Verifies a grant with the service's published keys, as an agent would.
async fn verify_with_jwks(svc: &Service, grant: &str, host: &str) -> Value {
    let (status, discovery) = svc.get("/.well-known/openid-configuration", "").await;
    assert_eq!(status, 200);
    assert_eq!(
        discovery["jwks_uri"],
        format!("{}/jwks.json", discovery["issuer"].as_str().unwrap())
    );
    let (status, jwks) = svc.get("/jwks.json", "").await;
    assert_eq!(status, 200);
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
    let header = jsonwebtoken::decode_header(grant).unwrap();
    let jwk = set
        .find(header.kid.as_deref().unwrap())
        .expect("the grant's kid is published");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&[host]);
    v.set_issuer(&[discovery["issuer"].as_str().unwrap()]);
    jsonwebtoken::decode::<Value>(grant, &key, &v)
        .unwrap_or_else(|e| panic!("the grant does not verify: {e}"))
        .claims
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn alice_requests_bob_approves_web_1_gets_the_grant_and_hears_its_revocation() {
    let sink = WebhookSink::start().unwrap();
    let mut svc = Service::new(
        "",
        &format!(
            "[[webhook]]\nurl = \"{}\"\nevents = [\"request.created\", \"grant.revoked\"]\n",
            sink.url()
        ),
    );
    svc.collector.start();
    let alice = svc.token("s-alice", "alice", "eng");
    let bob = svc.token("s-bob", "bob", "sre");
    let auditor = svc.token("s-audrey", "audrey", "audit");
    let web1 = "agent-token-web-1";
    let web2 = "agent-token-web-2";

    let r = svc.request(&alice, "jit-alice").await;
    let id = r["id"].as_str().unwrap().to_string();
    assert_eq!(r["state"], "pending");
    sink.wait_for(
        |b| b["event"] == "request.created" && b["request"]["id"] == id.as_str(),
        Duration::from_secs(10),
    )
    .unwrap();
    // Hostile and refused cases, each with its code.
    let (status, e) = svc
        .post(
            &format!("/api/v1/requests/{id}/review"),
            &alice,
            json!({"decision": "approve"}),
        )
        .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (status, e) = svc.post("/api/v1/requests", &alice,
        json!({"host": "web-1", "login": "root", "duration_secs": 60, "reason": "x", "ssh_key": user_key()})).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (status, e) = svc.post("/api/v1/requests", &alice,
        json!({"host": "web-1", "login": "jit-alice", "duration_secs": 99999, "reason": "x", "ssh_key": user_key()})).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let (status, _) = svc.get("/api/v1/requests", "not-a-token").await;
    assert_eq!(status, 401);
    let (status, _) = svc.get("/api/v1/sessions", &alice).await;
    assert_eq!(status, 403, "reading recordings needs the auditor role");
    let (status, _) = svc.get("/api/v1/sessions", &auditor).await;
    assert_eq!(status, 200);

    // Bob sees it pending and approves; alice, waiting, hears at once.
    let (_, pending) = svc.get("/api/v1/requests?state=pending", &bob).await;
    assert!(
        pending
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["id"] == id.as_str()),
        "{pending}"
    );
    let waiting = {
        let (http, url, alice) = (svc.http.clone(), svc.collector.url(), alice.clone());
        let id = id.clone();
        tokio::spawn(async move {
            let t = Instant::now();
            let a = http
                .get(format!("{url}/api/v1/requests/{id}?wait=30"))
                .bearer_auth(alice)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
            (v, t.elapsed())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, approved) = svc
        .post(
            &format!("/api/v1/requests/{id}/review"),
            &bob,
            json!({"decision": "approve", "comment": "go ahead"}),
        )
        .await;
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["state"], "approved");
    assert!(
        approved.get("grant").is_none(),
        "the approver does not get alice's grant"
    );
    let (status, again) = svc
        .post(
            &format!("/api/v1/requests/{id}/review"),
            &bob,
            json!({"decision": "approve"}),
        )
        .await;
    assert_eq!((status, again["code"].as_str()), (409, Some("conflict")));
    let (waited, took) = waiting.await.unwrap();
    assert_eq!(waited["state"], "approved");
    assert!(took < Duration::from_secs(5), "the wait took {took:?}");
    let grant = waited["grant"]
        .as_str()
        .expect("alice gets her grant")
        .to_string();
    let claims = verify_with_jwks(&svc, &grant, "web-1").await;
    assert_eq!(claims["sub"], "s-alice");
    assert_eq!(claims["login"], "jit-alice");
    assert_eq!(claims["approved_by"], "bob");
    assert_eq!(claims["request"], id.as_str());
    assert_eq!(claims["ssh_keys"], json!([user_key()]));
    let jti = claims["jti"].as_str().unwrap().to_string();

    // The feed: web-1 gets it, web-2 does not, no token gets nothing.
    let (status, feed1) = svc.get("/api/v1/agent/grants", web1).await;
    assert_eq!(status, 200);
    assert_eq!(feed1["grants"], json!([grant]));
    let (_, feed2) = svc.get("/api/v1/agent/grants", web2).await;
    assert_eq!(feed2["grants"], json!([]));
    assert_eq!(svc.get("/api/v1/agent/grants", &alice).await.0, 401);

    // A long-poll waiting on web-1 hears the revocation within a second.
    let rev = feed1["revision"].as_u64().unwrap();
    let (status, quick) = svc
        .get(&format!("/api/v1/agent/grants?since={rev}&wait=1"), web1)
        .await;
    assert_eq!(
        (status, quick["revision"].as_u64()),
        (200, Some(rev)),
        "nothing changed: answered at the deadline"
    );
    let poll = {
        let (http, url) = (svc.http.clone(), svc.collector.url());
        tokio::spawn(async move {
            let a = http
                .get(format!("{url}/api/v1/agent/grants?since={rev}&wait=30"))
                .bearer_auth(web1)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
            (v, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    let eve = svc.token("s-eve", "eve", "eng");
    let (status, _) = svc
        .post(
            &format!("/api/v1/grants/{jti}/revoke"),
            &eve,
            json!({"reason": "mine"}),
        )
        .await;
    assert_eq!(
        status, 403,
        "another requester may not revoke alice's grant"
    );
    let revoked_at = Instant::now();
    let (status, r) = svc
        .post(
            &format!("/api/v1/grants/{jti}/revoke"),
            &alice,
            json!({"reason": "done early"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["state"], "revoked");
    let (heard, heard_at) = poll.await.unwrap();
    let latency = heard_at.saturating_duration_since(revoked_at);
    assert!(
        latency < Duration::from_secs(1),
        "the long-poll heard after {latency:?}"
    );
    assert!(heard["revision"].as_u64().unwrap() > rev);
    assert_eq!(heard["grants"], json!([]));
    assert_eq!(heard["revoked"][0]["jti"], jti.as_str());
    sink.wait_for(
        |b| b["event"] == "grant.revoked" && b["request"]["id"] == id.as_str(),
        Duration::from_secs(10),
    )
    .unwrap();

    // The audit trail, for auditors only.
    assert_eq!(svc.get("/api/v1/audit", &alice).await.0, 403);
    let (_, trail) = svc
        .get(&format!("/api/v1/audit?request={id}"), &auditor)
        .await;
    let events: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["event"].as_str().unwrap())
        .collect();
    assert_eq!(
        events,
        [
            "request.created",
            "review.approve",
            "grant.issued",
            "request.approved",
            "grant.revoked"
        ]
    );

    // Rate limit on new requests: ten at once, then refused.
    let carol = svc.token("s-carol", "carol", "eng");
    for _ in 0..10 {
        svc.request(&carol, "jit-carol").await;
    }
    let (status, e) = svc.post("/api/v1/requests", &carol,
        json!({"host": "web-1", "login": "jit-carol", "duration_secs": 60, "reason": "x", "ssh_key": user_key()})).await;
    assert_eq!((status, e["code"].as_str()), (429, Some("rate_limited")));

    // A restart keeps everything, and the same key.
    let (_, jwks_before) = svc.get("/jwks.json", "").await;
    svc.collector.kill();
    svc.collector.start();
    let (_, jwks_after) = svc.get("/jwks.json", "").await;
    assert_eq!(jwks_before, jwks_after);
    let (status, after) = svc.get(&format!("/api/v1/requests/{id}"), &alice).await;
    assert_eq!(status, 200, "{after}");
    assert_eq!(after["state"], "revoked");
    assert_eq!(after["reviews"][0]["name"], "bob");
    let (_, feed) = svc.get("/api/v1/agent/grants", web1).await;
    assert_eq!(feed["revoked"][0]["jti"], jti.as_str());
    assert!(feed["revision"].as_u64().unwrap() >= heard["revision"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_postgres_share_requests_and_wake_each_others_long_polls() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let top = format!(
        "public_url = \"https://usher.test\"\n[state]\nbackend = \"postgres\"\nurl = \"{}\"\n",
        pg.url()
    );
    let mut one = Service::new(&top, "");
    let mut two = Service::new(&top, "");
    one.collector.start();
    two.collector.start();
    let alice = one.token("s-alice", "alice", "eng");
    let bob = two.token("s-bob", "bob", "sre");
    let (_, jwks_one) = one.get("/jwks.json", "").await;
    let (_, jwks_two) = two.get("/jwks.json", "").await;
    assert_eq!(jwks_one, jwks_two, "one issuer key for both");

    let r = one.request(&alice, "jit-alice").await;
    let id = r["id"].as_str().unwrap().to_string();
    let (_, feed) = two.get("/api/v1/agent/grants", "agent-token-web-1").await;
    let rev = feed["revision"].as_u64().unwrap();
    assert_eq!(feed["grants"], json!([]));
    // web-1's agent waits on instance two; bob approves on instance one.
    let poll = {
        let (http, url) = (two.http.clone(), two.collector.url());
        tokio::spawn(async move {
            let a = http
                .get(format!("{url}/api/v1/agent/grants?since={rev}&wait=30"))
                .bearer_auth("agent-token-web-1")
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
            (v, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let approved_at = Instant::now();
    let (status, approved) = one
        .post(
            &format!("/api/v1/requests/{id}/review"),
            &bob,
            json!({"decision": "approve"}),
        )
        .await;
    assert_eq!(status, 200, "{approved}");
    let (heard, heard_at) = poll.await.unwrap();
    let latency = heard_at.saturating_duration_since(approved_at);
    assert!(
        latency < Duration::from_secs(1),
        "instance two heard after {latency:?}"
    );
    assert_eq!(heard["grants"].as_array().unwrap().len(), 1, "{heard}");
    // Alice reads her grant from the other instance; a second review there is refused.
    let (_, mine) = two.get(&format!("/api/v1/requests/{id}"), &alice).await;
    assert_eq!(mine["state"], "approved");
    assert_eq!(mine["grant"], heard["grants"][0]);
    let carol = one.token("s-carol", "carol", "sre");
    let (status, _) = two
        .post(
            &format!("/api/v1/requests/{id}/review"),
            &carol,
            json!({"decision": "deny"}),
        )
        .await;
    assert_eq!(status, 409);
    // Instance one stopped: two still serves everything.
    one.collector.kill();
    let (_, list) = two.get("/api/v1/requests", &bob).await;
    assert!(list
        .as_array()
        .unwrap()
        .iter()
        .any(|x| x["id"] == id.as_str()));
}

/// The exchange's form, as a workload sends it.
async fn exchange(svc: &Service, fields: &[(&str, &str)]) -> (u16, Value) {
    let body: String = url::form_urlencoded::Serializer::new(String::new())
        .extend_pairs(fields)
        .finish();
    let answer = svc
        .http
        .post(format!("{}/api/v1/token", svc.collector.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (
        status,
        serde_json::from_slice(&answer.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

fn exchange_form<'a>(token: &'a str, host: &'a str, key: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", usher_wire::jit::TOKEN_EXCHANGE_GRANT_TYPE),
        ("subject_token", token),
        ("subject_token_type", usher_wire::jit::JWT_TOKEN_TYPE),
        ("audience", host),
        ("ssh_key", key),
    ]
}

/// Workloads of a real OpenID provider (npm `oidc-provider`, GitHub Actions-like claims)
/// exchange their tokens: the right repository and branch get a grant bound to their key;
/// the wrong repository, branch, audience or host are refused with the reason (and
/// audited); a rule that needs approval leaves the job waiting until an approver approves.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workloads_exchange_their_tokens_for_grants() {
    use usher_test_support::{OidcOptions, OidcProvider, Workload};
    let main = Workload::github_actions(
        "deploy-main",
        "acme/web",
        42,
        "refs/heads/main",
        "deploy",
        None,
    );
    let branch = Workload::github_actions(
        "deploy-branch",
        "acme/web",
        42,
        "refs/heads/feature",
        "deploy",
        None,
    );
    let other = Workload::github_actions(
        "other-repo",
        "acme/other",
        43,
        "refs/heads/main",
        "deploy",
        None,
    );
    let prod = Workload::github_actions(
        "deploy-prod",
        "acme/web",
        42,
        "refs/heads/main",
        "deploy",
        Some("prod"),
    );
    let idp = tokio::task::spawn_blocking(move || {
        OidcProvider::start(OidcOptions {
            workloads: vec![main, branch, other, prod],
            ..OidcOptions::default()
        })
    })
    .await
    .unwrap()
    .unwrap();
    let iss = idp.issuer();
    let rules = format!(
        r#"
[[workload]]
name = "gated"
issuer = "{iss}"
audience = "urn:usher"
claims = {{ repository = "acme/web", environment = "prod" }}
hosts = ["web-*"]
login = "jit-prod"
max_lifetime = "10m"
approval = true
pending_ttl = "5m"

[[workload]]
name = "deploy"
issuer = "{iss}"
audience = "urn:usher"
claims = {{ repository = "acme/web", ref = "refs/heads/main" }}
hosts = ["web-1"]
login = "jit-deploy"
profile = "restricted"
max_lifetime = "15m"

[[workload_issuer]]
iss = "{iss}"
discovery = true
ca = "{ca}"
"#,
        ca = idp.ca_path().display()
    );
    let mut svc = Service::new("", &rules);
    svc.collector.start();
    let key = openssh_public_line(&SigningKey::from_bytes(&[77; 32]));
    let token_of = |client: &'static str, aud: &'static str| {
        let idp = &idp;
        std::thread::scope(|s| {
            s.spawn(move || idp.workload_token(client, aud).unwrap())
                .join()
                .unwrap()
        })
    };

    let good = token_of("deploy-main", "urn:usher");
    let (status, answer) = exchange(&svc, &exchange_form(&good, "web-1", &key)).await;
    assert_eq!(status, 200, "{answer}\n{}", svc.collector.log());
    assert_eq!(
        answer["issued_token_type"],
        usher_wire::jit::GRANT_TOKEN_TYPE
    );
    assert_eq!(answer["expires_in"], 900);
    let claims = verify_with_jwks(&svc, answer["access_token"].as_str().unwrap(), "web-1").await;
    assert_eq!(claims["login"], "jit-deploy");
    assert_eq!(claims["profile"], "restricted");
    assert_eq!(claims["ssh_keys"], json!([key]));
    assert_eq!(
        claims["sub"],
        format!("{iss}#repo:acme/web:ref:refs/heads/main")
    );
    let (_, feed) = svc.get("/api/v1/agent/grants", "agent-token-web-1").await;
    assert_eq!(feed["grants"][0], answer["access_token"]);

    // Refusals, each with its reason.
    let refused = |answer: &Value, error: &str, says: &str| {
        assert_eq!(answer["error"], error, "{answer}");
        let why = answer["error_description"].as_str().unwrap_or("");
        assert!(why.contains(says), "{why:?} does not say {says:?}");
    };
    let wrong_repo = token_of("other-repo", "urn:usher");
    let (status, a) = exchange(&svc, &exchange_form(&wrong_repo, "web-1", &key)).await;
    assert_eq!(status, 400);
    refused(&a, "invalid_grant", "acme/other");
    let wrong_branch = token_of("deploy-branch", "urn:usher");
    let (_, a) = exchange(&svc, &exchange_form(&wrong_branch, "web-1", &key)).await;
    refused(&a, "invalid_grant", "refs/heads/feature");
    let wrong_audience = token_of("deploy-main", "urn:someone-else");
    let (_, a) = exchange(&svc, &exchange_form(&wrong_audience, "web-1", &key)).await;
    refused(&a, "invalid_grant", "audience");
    let (_, a) = exchange(&svc, &exchange_form(&good, "web-2", &key)).await;
    refused(&a, "invalid_target", "web-2");
    let mut too_long = exchange_form(&good, "web-1", &key);
    too_long.push(("duration", "3600"));
    let (_, a) = exchange(&svc, &too_long).await;
    refused(&a, "invalid_request", "900");
    let (_, a) = exchange(&svc, &exchange_form(&good, "web-1", "ssh-ed25519 garbage")).await;
    refused(&a, "invalid_request", "OpenSSH");
    let mut forged = good.clone();
    forged.pop();
    forged.push(if good.ends_with('A') { 'B' } else { 'A' });
    let (_, a) = exchange(&svc, &exchange_form(&forged, "web-1", &key)).await;
    assert_eq!(a["error"], "invalid_grant", "{a}");
    let (_, a) = exchange(&svc, &[("grant_type", "password")]).await;
    refused(&a, "invalid_request", "grant_type");

    // A rule that needs a human: the job waits, bob approves, the job collects.
    let gated = token_of("deploy-prod", "urn:usher");
    let (status, a) = exchange(&svc, &exchange_form(&gated, "web-2", &key)).await;
    assert_eq!(
        (status, a["error"].as_str()),
        (400, Some("authorization_pending")),
        "{a}"
    );
    let request_id = a["request_id"].as_str().unwrap().to_string();
    let mut again = exchange_form(&gated, "web-2", &key);
    again.push(("request_id", &request_id));
    let (_, a) = exchange(&svc, &again).await;
    assert_eq!(a["error"], "authorization_pending");
    // Another workload cannot collect it.
    let mut stolen = exchange_form(&good, "web-2", &key);
    stolen.push(("request_id", &request_id));
    let (_, a) = exchange(&svc, &stolen).await;
    assert_ne!(a["error"], "authorization_pending", "{a}");
    assert!(a.get("access_token").is_none());
    let bob = svc.token("s-bob", "bob", "sre");
    let (status, r) = svc
        .post(
            &format!("/api/v1/requests/{request_id}/review"),
            &bob,
            json!({"decision": "approve", "comment": "release 1.2"}),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let (status, a) = exchange(&svc, &again).await;
    assert_eq!(status, 200, "{a}");
    let claims = verify_with_jwks(&svc, a["access_token"].as_str().unwrap(), "web-2").await;
    assert_eq!(claims["login"], "jit-prod");
    assert_eq!(claims["approved_by"], "bob");

    // The refusals are in the audit trail with their reasons.
    let auditor = svc.token("s-audrey", "audrey", "audit");
    let (_, trail) = svc.get("/api/v1/audit", &auditor).await;
    let refusals: Vec<&Value> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["event"] == "token.refused")
        .collect();
    assert!(refusals.len() >= 7, "{trail}");
    assert!(refusals.iter().any(|r| r["detail"]["reason"]
        .as_str()
        .unwrap_or("")
        .contains("acme/other")));
    assert!(trail
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["event"] == "token.exchanged"));
}
