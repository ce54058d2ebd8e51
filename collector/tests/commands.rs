//! Commands waiting for approval inside sessions (issue 13), over HTTP against the real
//! service (this package's binary): web-1 posts a request, an approver approves, and the
//! agent's long-poll gets a decision JWT that verifies against the service's `/jwks.json`
//! (typ, iss, aud, jti); two of M; a denial; expiry; and the hostile cases: the requester's
//! own `sub`, an approver not listed, another host's token, a body over the limit; and two
//! instances on one PostgreSQL, where a wait on one hears a decision made on the other.

use ed25519_dalek::SigningKey;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use usher_collector::uploader::openssh_public_line;
use usher_test_support::{Collector, Postgres, TrustedAgent, WebhookSink};

const POLICY: &str = r#"
[roles]
requester = ["eng"]
approver = ["sre", "leads"]
auditor = ["audit"]
"#;

const WEB1: &str = "agent-token-web-1";
const WEB2: &str = "agent-token-web-2";

fn agent(host: &str, seed: u8) -> TrustedAgent {
    TrustedAgent {
        host: host.into(),
        token: format!("agent-token-{host}"),
        host_key: openssh_public_line(&SigningKey::from_bytes(&[seed; 32])),
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn fresh_id() -> String {
    format!("apr-{}", hex::encode(rand::random::<[u8; 16]>()))
}

/// A request of `sub` on web-1 (session `s-1`), waiting up to `ttl` seconds.
fn command(sub: &str, approvers: &[&str], required: u32, ttl: i64) -> Value {
    let now = unix_now();
    json!({
        "id": fresh_id(), "host": "web-1", "session_id": "sess-web-1-0001",
        "grant": "g-0123", "sub": sub, "login": "jit-alice", "kind": "exec",
        "program": "/usr/bin/systemctl", "command": "systemctl restart nginx",
        "approvers": approvers, "required": required,
        "requested_at": now, "expires_at": now + ttl,
    })
}

struct Service {
    collector: Collector,
    http: reqwest::Client,
}

impl Service {
    fn start(tables: &str) -> Service {
        Service::start_with("", tables)
    }

    /// With `top` (top-level keys and `[state]`) before the harness's tables.
    fn start_with(top: &str, tables: &str) -> Service {
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
        collector.start();
        Service { collector, http }
    }

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

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
        body: Option<String>,
    ) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.collector.url()))
            .bearer_auth(token);
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
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
        self.send(reqwest::Method::GET, path, token, None).await
    }

    async fn post(&self, path: &str, token: &str, body: &Value) -> (u16, Value) {
        self.send(reqwest::Method::POST, path, token, Some(body.to_string()))
            .await
    }

    async fn submit(&self, agent_token: &str, c: &Value) -> String {
        let (status, answer) = self.post("/api/v1/agent/commands", agent_token, c).await;
        assert_eq!(status, 201, "{answer}");
        assert_eq!(answer["state"], "pending");
        c["id"].as_str().unwrap().to_string()
    }

    async fn review(&self, token: &str, id: &str, decision: &str) -> (u16, Value) {
        self.post(
            &format!("/api/v1/commands/{id}/review"),
            token,
            &json!({"decision": decision, "comment": format!("{decision} by test")}),
        )
        .await
    }

    /// The service's key for `kid`, from its published JWKS.
    async fn key(&self, kid: &str) -> jsonwebtoken::DecodingKey {
        let (status, jwks) = self.get("/jwks.json", "").await;
        assert_eq!(status, 200);
        let set: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
        jsonwebtoken::DecodingKey::from_jwk(set.find(kid).expect("the kid is published")).unwrap()
    }

    /// A decision JWT checked as an agent must: the service's key, typ, iss, aud, jti.
    async fn verify_decision(&self, token: &str, host: &str, id: &str) -> Value {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(
            header.typ.as_deref(),
            Some(usher_wire::approval::DECISION_JWT_TYPE)
        );
        let key = self.key(header.kid.as_deref().unwrap()).await;
        let (_, discovery) = self.get("/.well-known/openid-configuration", "").await;
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
        v.set_audience(&[host]);
        v.set_issuer(&[discovery["issuer"].as_str().unwrap()]);
        let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
            .unwrap_or_else(|e| panic!("the decision does not verify: {e}"))
            .claims;
        assert_eq!(claims["jti"], id);
        let ttl = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert!(
            (1..=120).contains(&ttl),
            "a decision is short-lived: {ttl} s"
        );
        // The agent's type reads it.
        let _: usher_wire::approval::DecisionClaims =
            serde_json::from_value(claims.clone()).unwrap();
        claims
    }

    async fn audit_events(&self, auditor: &str, id: &str) -> Vec<String> {
        let (status, records) = self
            .get(&format!("/api/v1/audit?request={id}"), auditor)
            .await;
        assert_eq!(status, 200, "{records}");
        records
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["event"].as_str().unwrap().to_string())
            .collect()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn web_1_asks_bob_approves_and_the_waiting_agent_gets_a_decision_that_verifies() {
    let sink = WebhookSink::start().unwrap();
    let svc = Service::start(&format!(
        "[[webhook]]\nurl = \"{}\"\nevents = [\"command.requested\", \"command.decided\"]\n",
        sink.url()
    ));
    let bob = svc.token("s-bob", "bob", "sre");
    let alice = svc.token("s-alice", "alice", "eng");
    let auditor = svc.token("s-audrey", "audrey", "audit");

    let c = command("s-alice", &[], 1, 120);
    let id = svc.submit(WEB1, &c).await;
    // The same request again (an agent retrying) is the same request, not a second one.
    let (status, again) = svc.post("/api/v1/agent/commands", WEB1, &c).await;
    assert_eq!(
        (status, again["state"].as_str()),
        (201, Some("pending")),
        "{again}"
    );
    sink.wait_for(
        |b| b["event"] == "command.requested" && b["command"]["request"]["id"] == id.as_str(),
        Duration::from_secs(10),
    )
    .unwrap();

    // People: approvers and auditors list it; a requester may not.
    let (status, pending) = svc.get("/api/v1/commands?state=pending", &bob).await;
    assert_eq!(status, 200);
    let listed: Vec<&Value> = pending
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["request"]["id"] == id.as_str())
        .collect();
    assert_eq!(listed.len(), 1, "{pending}");
    assert_eq!(listed[0]["request"]["session_id"], "sess-web-1-0001");
    assert_eq!(
        svc.get("/api/v1/commands?state=pending", &auditor).await.0,
        200
    );
    assert_eq!(
        svc.get("/api/v1/commands?state=pending", &alice).await.0,
        403
    );
    assert_eq!(
        svc.get("/api/v1/commands", WEB1).await.0,
        401,
        "an agent token is not a person"
    );

    // While pending: no decision, and a short wait answers at its deadline.
    let t = Instant::now();
    let (status, answer) = svc
        .get(&format!("/api/v1/agent/commands/{id}?wait=1"), WEB1)
        .await;
    assert_eq!(status, 200);
    assert_eq!(answer, json!({"state": "pending"}));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );

    // The agent waits; bob approves; the agent hears within a moment.
    let waiting = {
        let (http, url, id) = (svc.http.clone(), svc.collector.url(), id.clone());
        tokio::spawn(async move {
            let a = http
                .get(format!("{url}/api/v1/agent/commands/{id}?wait=30"))
                .bearer_auth(WEB1)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
            (v, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A person who is not an approver may not decide.
    let (status, e) = svc.review(&alice, &id, "approve").await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (status, approved) = svc.review(&bob, &id, "approve").await;
    let decided_at = Instant::now();
    assert_eq!(status, 200, "{approved}");
    assert_eq!(approved["state"], "approved");
    assert_eq!(approved["decisions"][0]["by"], "bob");
    let (answer, heard_at) = waiting.await.unwrap();
    assert!(
        heard_at.duration_since(decided_at) < Duration::from_secs(2),
        "the waiting agent heard late"
    );
    assert_eq!(answer["state"], "approved");
    let jwt = answer["decision"].as_str().expect("a signed decision");
    let claims = svc.verify_decision(jwt, "web-1", &id).await;
    assert_eq!(claims["decision"], "approved");
    assert_eq!(claims["by"], json!(["bob"]));
    assert_eq!(claims["sub"], "s-alice");
    // A decided request takes no more reviews.
    let (status, _) = svc
        .review(&svc.token("s-erin", "erin", "leads"), &id, "deny")
        .await;
    assert_eq!(status, 409);

    let events = svc.audit_events(&auditor, &id).await;
    for e in [
        "command.requested",
        "command.review.approve",
        "command.approved",
    ] {
        assert!(events.iter().any(|x| x == e), "{e} missing from {events:?}");
    }
    assert_eq!(
        events.iter().filter(|x| *x == "command.requested").count(),
        1,
        "the retried post is not a second request"
    );
    sink.wait_for(
        |b| {
            b["event"] == "command.decided"
                && b["command"]["request"]["id"] == id.as_str()
                && b["command"]["state"] == "approved"
        },
        Duration::from_secs(10),
    )
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_m_the_requester_and_the_unlisted_are_refused_and_a_denial_ends_it() {
    let svc = Service::start("");
    let auditor = svc.token("s-audrey", "audrey", "audit");
    // Carol is an approver, but the command is hers.
    let carol = svc.token("s-carol", "carol", "sre");
    // Bob is an approver, but not one this command lists.
    let bob = svc.token("s-bob", "bob", "sre");
    let erin = svc.token("s-erin", "erin", "leads");
    let dave = svc.token("s-dave", "Dave@Example.com", "sre");
    let listed = ["group:leads", "dave@example.com", "s-carol"];

    let id = svc.submit(WEB1, &command("s-carol", &listed, 2, 120)).await;
    let (status, e) = svc.review(&carol, &id, "approve").await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "own command: {e}"
    );
    let (status, e) = svc.review(&carol, &id, "deny").await;
    assert_eq!(status, 403, "nor may she deny it: {e}");
    let (status, e) = svc.review(&bob, &id, "approve").await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "not listed: {e}"
    );
    let events = svc.audit_events(&auditor, &id).await;
    assert_eq!(
        events
            .iter()
            .filter(|x| *x == "command.review.refused")
            .count(),
        3,
        "{events:?}"
    );

    // Two of them: erin (by group) then dave (by e-mail); erin twice does not count twice.
    let (status, one) = svc.review(&erin, &id, "approve").await;
    assert_eq!(
        (status, one["state"].as_str()),
        (200, Some("pending")),
        "{one}"
    );
    let (status, e) = svc.review(&erin, &id, "approve").await;
    assert_eq!((status, e["code"].as_str()), (409, Some("conflict")), "{e}");
    let (_, answer) = svc.get(&format!("/api/v1/agent/commands/{id}"), WEB1).await;
    assert_eq!(
        answer,
        json!({"state": "pending"}),
        "one of two is no decision"
    );
    let (status, two) = svc.review(&dave, &id, "approve").await;
    assert_eq!(
        (status, two["state"].as_str()),
        (200, Some("approved")),
        "{two}"
    );
    let (_, answer) = svc.get(&format!("/api/v1/agent/commands/{id}"), WEB1).await;
    let claims = svc
        .verify_decision(answer["decision"].as_str().unwrap(), "web-1", &id)
        .await;
    assert_eq!(claims["decision"], "approved");
    assert_eq!(claims["by"], json!(["erin", "Dave@Example.com"]));

    // A denial ends a request at once, and the agent gets it signed.
    let id = svc.submit(WEB1, &command("s-alice", &[], 2, 120)).await;
    let (status, _) = svc.review(&bob, &id, "approve").await;
    assert_eq!(status, 200);
    let (status, denied) = svc.review(&erin, &id, "deny").await;
    assert_eq!(
        (status, denied["state"].as_str()),
        (200, Some("denied")),
        "{denied}"
    );
    let (_, answer) = svc
        .get(&format!("/api/v1/agent/commands/{id}?wait=5"), WEB1)
        .await;
    assert_eq!(answer["state"], "denied");
    let claims = svc
        .verify_decision(answer["decision"].as_str().unwrap(), "web-1", &id)
        .await;
    assert_eq!(claims["decision"], "denied");
    assert_eq!(claims["by"], json!(["erin"]));
    assert_eq!(claims["comment"], "deny by test");
    assert!(svc
        .audit_events(&auditor, &id)
        .await
        .iter()
        .any(|e| e == "command.denied"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_hosts_token_an_oversized_or_invalid_body_and_expiry() {
    let svc = Service::start("");
    let bob = svc.token("s-bob", "bob", "sre");
    let auditor = svc.token("s-audrey", "audrey", "audit");
    let c = command("s-alice", &[], 1, 120);
    let id = svc.submit(WEB1, &c).await;

    // web-2's token: it cannot post for web-1, read web-1's request, cancel it, or take its id.
    let (status, e) = svc
        .post(
            "/api/v1/agent/commands",
            WEB2,
            &command("s-alice", &[], 1, 120),
        )
        .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (403, Some("forbidden")),
        "{e}"
    );
    let (status, e) = svc.get(&format!("/api/v1/agent/commands/{id}"), WEB2).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("not_found")),
        "{e}"
    );
    let (status, _) = svc
        .post(
            &format!("/api/v1/agent/commands/{id}/cancel"),
            WEB2,
            &json!({}),
        )
        .await;
    assert_eq!(status, 404);
    let mut stolen = c.clone();
    stolen["host"] = json!("web-2");
    let (status, e) = svc.post("/api/v1/agent/commands", WEB2, &stolen).await;
    assert_eq!((status, e["code"].as_str()), (409, Some("conflict")), "{e}");
    let (status, _) = svc
        .get(&format!("/api/v1/agent/commands/{id}"), "no-such-token")
        .await;
    assert_eq!(status, 401);
    let (status, _) = svc
        .post(
            "/api/v1/agent/commands",
            &bob,
            &command("s-alice", &[], 1, 120),
        )
        .await;
    assert_eq!(status, 401, "a person's token is not an agent's");
    // Still pending, untouched.
    let (_, answer) = svc.get(&format!("/api/v1/agent/commands/{id}"), WEB1).await;
    assert_eq!(answer, json!({"state": "pending"}));

    // Over the limit: refused before it is read; under it but invalid: refused as such.
    let mut big = command("s-alice", &[], 1, 120);
    big["command"] = json!("x".repeat(64 * 1024));
    let (status, e) = svc.post("/api/v1/agent/commands", WEB1, &big).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (413, Some("too_large")),
        "{e}"
    );
    let mut long = command("s-alice", &[], 1, 120);
    long["command"] = json!("x".repeat(5000));
    let (status, e) = svc.post("/api/v1/agent/commands", WEB1, &long).await;
    assert_eq!(
        (status, e["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    for (field, value) in [
        ("id", json!("apr-../../etc")),
        ("session_id", json!("../x")),
        ("required", json!(0)),
        ("expires_at", json!(unix_now() - 1)),
        ("sub", json!("")),
    ] {
        let mut bad = command("s-alice", &[], 1, 120);
        bad[field] = value;
        let (status, e) = svc.post("/api/v1/agent/commands", WEB1, &bad).await;
        assert_eq!(status, 400, "{field}: {e}");
    }
    let (status, _) = svc
        .send(
            reqwest::Method::POST,
            "/api/v1/agent/commands",
            WEB1,
            Some("{not json".into()),
        )
        .await;
    assert_eq!(status, 400);

    // Nobody decides within its time: expired, no decision, and no review after.
    let short = svc.submit(WEB1, &command("s-alice", &[], 1, 2)).await;
    let t = Instant::now();
    let (status, answer) = svc
        .get(&format!("/api/v1/agent/commands/{short}?wait=20"), WEB1)
        .await;
    assert_eq!(status, 200);
    assert_eq!(
        answer,
        json!({"state": "expired"}),
        "expired carries no decision"
    );
    assert!(
        t.elapsed() < Duration::from_secs(6),
        "the wait ended at expiry: {:?}",
        t.elapsed()
    );
    let (status, e) = svc.review(&bob, &short, "approve").await;
    assert_eq!((status, e["code"].as_str()), (409, Some("conflict")), "{e}");
    let (_, expired) = svc.get("/api/v1/commands?state=expired", &bob).await;
    assert!(expired
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["request"]["id"] == short.as_str()));
    // The sweep records it (every 2 s).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let events = svc.audit_events(&auditor, &short).await;
        if events.iter().any(|e| e == "command.expired") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no command.expired in {events:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // The agent cancels its own pending request.
    let (status, answer) = svc
        .post(
            &format!("/api/v1/agent/commands/{id}/cancel"),
            WEB1,
            &json!({}),
        )
        .await;
    assert_eq!((status, answer), (200, json!({"state": "cancelled"})));
    let (status, _) = svc.review(&bob, &id, "approve").await;
    assert_eq!(status, 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn on_postgres_a_wait_on_one_instance_hears_a_decision_made_on_another() {
    let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
    let top = format!(
        "public_url = \"https://usher.test\"\n[state]\nbackend = \"postgres\"\nurl = \"{}\"\n",
        pg.url()
    );
    let one = Service::start_with(&top, "");
    let two = Service::start_with(&top, "");
    let bob = one.token("s-bob", "bob", "sre");

    let id = one.submit(WEB1, &command("s-alice", &[], 1, 120)).await;
    let (status, listed) = two.get("/api/v1/commands?state=pending", &bob).await;
    assert_eq!(status, 200);
    assert!(listed
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["request"]["id"] == id.as_str()));
    let waiting = {
        let (http, url, id) = (two.http.clone(), two.collector.url(), id.clone());
        tokio::spawn(async move {
            let a = http
                .get(format!("{url}/api/v1/agent/commands/{id}?wait=30"))
                .bearer_auth(WEB1)
                .send()
                .await
                .unwrap();
            let v: Value = serde_json::from_slice(&a.bytes().await.unwrap()).unwrap();
            (v, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, approved) = one.review(&bob, &id, "approve").await;
    let decided_at = Instant::now();
    assert_eq!(
        (status, approved["state"].as_str()),
        (200, Some("approved")),
        "{approved}"
    );
    let (answer, heard_at) = waiting.await.unwrap();
    assert!(
        heard_at.duration_since(decided_at) < Duration::from_secs(3),
        "the other instance heard late"
    );
    assert_eq!(answer["state"], "approved");
    // Signed by the shared key: it verifies against either instance's JWKS.
    let jwt = answer["decision"].as_str().unwrap();
    one.verify_decision(jwt, "web-1", &id).await;
    two.verify_decision(jwt, "web-1", &id).await;
    // The same id from the other instance is the same request.
    let (status, e) = two.review(&bob, &id, "deny").await;
    assert_eq!((status, e["code"].as_str()), (409, Some("conflict")), "{e}");
}
