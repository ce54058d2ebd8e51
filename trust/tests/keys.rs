//! The key cache against a real HTTP(S) server on loopback serving discovery and JWKS:
//! refreshes on unknown kids and their rate limit, stale keys, headers that point at other
//! keys, algorithm confusion, hostile documents, an extra root CA.

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Router;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usher_trust::{
    Expect, FetchError, IssuerConfig, IssuerKeys, Malformed, RefreshNote, Refusal, TrustedIssuers,
};

const AUDIENCE: &str = "usher";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// An Ed25519 signing key with its kid.
struct Key {
    kid: String,
    pem: String,
    public: [u8; 32],
}

impl Key {
    fn new(kid: &str) -> Key {
        let signing = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
        Key {
            kid: kid.into(),
            pem: signing
                .to_pkcs8_pem(Default::default())
                .unwrap()
                .to_string(),
            public: signing.verifying_key().to_bytes(),
        }
    }

    fn jwk(&self) -> Value {
        json!({"kty": "OKP", "crv": "Ed25519", "x": b64(&self.public), "kid": self.kid, "use": "sig"})
    }

    fn sign_with_header(&self, header: Header, claims: &Value) -> String {
        jsonwebtoken::encode(
            &header,
            claims,
            &EncodingKey::from_ed_pem(self.pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        self.sign_with_header(header, claims)
    }
}

/// What the server answers and what it was asked.
#[derive(Default)]
struct Served {
    issuer: String,
    /// The discovery document's `issuer`, when it should lie.
    claimed_issuer: Option<String>,
    jwks: Value,
    /// Answer 503 to everything.
    down: bool,
    hits: BTreeMap<String, usize>,
}

#[derive(Clone)]
struct Provider {
    served: Arc<Mutex<Served>>,
    iss: String,
}

async fn answer(State(served): State<Arc<Mutex<Served>>>, uri: Uri) -> Response {
    let mut s = served.lock().unwrap();
    *s.hits.entry(uri.path().to_string()).or_default() += 1;
    if s.down {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    match uri.path() {
        "/.well-known/openid-configuration" => axum::Json(json!({
            "issuer": s.claimed_issuer.clone().unwrap_or_else(|| s.issuer.clone()),
            "jwks_uri": format!("{}/jwks.json", s.issuer),
        }))
        .into_response(),
        "/jwks.json" => axum::Json(s.jwks.clone()).into_response(),
        "/huge.json" => "x"
            .repeat(usher_trust::MAX_DOCUMENT_BYTES + 1)
            .into_response(),
        // Where hostile tokens point their `jku`/`x5u`: it must never be asked.
        _ => axum::Json(json!({"keys": []})).into_response(),
    }
}

impl Provider {
    async fn start(keys: &[&Key]) -> Provider {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let iss = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(Mutex::new(Served {
            issuer: iss.clone(),
            ..Served::default()
        }));
        let app = Router::new().fallback(answer).with_state(served.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let p = Provider { served, iss };
        p.publish(keys);
        p
    }

    fn publish(&self, keys: &[&Key]) {
        self.served.lock().unwrap().jwks =
            json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    }

    fn set_jwks(&self, jwks: Value) {
        self.served.lock().unwrap().jwks = jwks;
    }

    fn set_down(&self, down: bool) {
        self.served.lock().unwrap().down = down;
    }

    fn hits(&self, path: &str) -> usize {
        self.served
            .lock()
            .unwrap()
            .hits
            .get(path)
            .copied()
            .unwrap_or(0)
    }

    fn config(&self, refresh_min_secs: u64, max_stale_secs: u64) -> IssuerConfig {
        IssuerConfig {
            refresh_min_secs,
            max_stale_secs,
            ..IssuerConfig::discovery(&self.iss)
        }
    }

    fn claims(&self) -> Value {
        json!({"iss": self.iss, "aud": AUDIENCE, "sub": "repo:acme/web", "iat": now() - 5, "exp": now() + 300})
    }
}

fn expect(audiences: &[String]) -> Expect<'_> {
    Expect {
        audiences,
        leeway_secs: 5,
        now: now(),
    }
}

fn auds() -> Vec<String> {
    vec![AUDIENCE.to_string()]
}

#[tokio::test]
async fn discovery_then_an_unknown_kid_refreshes_once_and_accepts() {
    let a = Key::new("a");
    let b = Key::new("b");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    assert!(matches!(
        keys.current(),
        Err(Refusal::KeysUnavailable { .. })
    ));
    assert_eq!(keys.refresh().await.unwrap(), 1);
    assert_eq!(idp.hits("/.well-known/openid-configuration"), 1);
    assert_eq!(idp.hits("/jwks.json"), 1);
    let auds = auds();
    let claims = keys
        .verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap();
    assert_eq!(claims["sub"], "repo:acme/web");
    // Known kids ask nothing of the server.
    assert_eq!(idp.hits("/jwks.json"), 1);

    // The provider rotates; a token under the new kid is accepted after one refresh.
    idp.publish(&[&a, &b]);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    keys.verify(&b.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap();
    assert_eq!(idp.hits("/jwks.json"), 2);
}

#[tokio::test]
async fn unknown_kids_within_the_rate_limit_do_not_refetch() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    keys.refresh().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let auds = auds();
    let ghost = Key::new("ghost-1");
    let why = keys
        .verify(&ghost.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert_eq!(
        why,
        Refusal::UnknownKey {
            iss: idp.iss.clone(),
            kid: "ghost-1".into(),
            refresh: RefreshNote::Refreshed
        }
    );
    assert_eq!(idp.hits("/jwks.json"), 2);
    // A second unknown kid at once: no fetch, and the reason says why.
    for kid in ["ghost-2", "ghost-3", "ghost-1"] {
        let why = keys
            .verify(&Key::new(kid).sign(&idp.claims()), &expect(&auds))
            .await
            .unwrap_err();
        assert!(
            matches!(
                &why,
                Refusal::UnknownKey {
                    refresh: RefreshNote::RateLimited { min_secs: 1, .. },
                    ..
                }
            ),
            "{why}"
        );
        assert!(why.to_string().starts_with(&format!(
            "unknown kid {kid:?} for issuer {:?} (keys refreshed",
            idp.iss
        )));
    }
    assert_eq!(idp.hits("/jwks.json"), 2);
    // The default limit is 30 s.
    let slow = IssuerKeys::new(&idp.config(30, 3600)).unwrap();
    slow.refresh().await.unwrap();
    let why = slow
        .verify(&ghost.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(
        why,
        Refusal::UnknownKey {
            refresh: RefreshNote::RateLimited { min_secs: 30, .. },
            ..
        }
    ));
}

#[tokio::test]
async fn with_the_server_down_the_last_good_keys_last_max_stale_then_are_dropped() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3)).unwrap();
    keys.refresh().await.unwrap();
    idp.set_down(true);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let auds = auds();
    // A refresh fails; the kept keys still verify.
    assert!(matches!(
        keys.refresh().await,
        Err(FetchError::Status { status: 503, .. })
    ));
    keys.verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let why = keys
        .verify(&Key::new("new").sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert!(
        matches!(&why, Refusal::UnknownKey { refresh: RefreshNote::Failed(e), .. } if e.contains("503")),
        "{why}"
    );
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let why = keys
        .verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::KeysUnavailable { .. }), "{why}");
    assert!(why.to_string().contains("keys unavailable"), "{why}");
    assert!(keys.status().kids.is_empty());
    // Back up: the next token's refresh brings the keys back.
    idp.set_down(false);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    keys.verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_restart_while_the_issuer_is_down_starts_with_the_saved_keys_until_max_stale() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    let dir = std::env::temp_dir().join(format!("usher-trust-saved-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let first = IssuerKeys::new_saving(&idp.config(1, 3), Some(&dir)).unwrap();
    first.refresh().await.unwrap();
    drop(first);
    idp.set_down(true);
    let auds = auds();
    // "Restarted": a new cache, the issuer unreachable, the copy on disk.
    let again = IssuerKeys::new_saving(&idp.config(1, 3), Some(&dir)).unwrap();
    assert!(again.refresh().await.is_err());
    again
        .verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap();
    // Without the copy (another directory), nothing verifies.
    let elsewhere = dir.join("other");
    let bare = IssuerKeys::new_saving(&idp.config(1, 3), Some(&elsewhere)).unwrap();
    let why = bare
        .verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::KeysUnavailable { .. }), "{why}");
    // A copy older than max_stale is not used.
    tokio::time::sleep(Duration::from_millis(3100)).await;
    let late = IssuerKeys::new_saving(&idp.config(1, 3), Some(&dir)).unwrap();
    let why = late
        .verify(&a.sign(&idp.claims()), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::KeysUnavailable { .. }), "{why}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_server_that_was_never_reached_gives_keys_unavailable() {
    let port = usher_test_support::free_port();
    let iss = format!("http://127.0.0.1:{port}");
    let keys = IssuerKeys::new(&IssuerConfig {
        refresh_min_secs: 1,
        ..IssuerConfig::discovery(&iss)
    })
    .unwrap();
    assert!(keys.refresh().await.is_err());
    let claims = json!({"iss": iss, "aud": AUDIENCE, "sub": "x", "exp": now() + 60});
    let auds = auds();
    let why = keys
        .verify(&Key::new("a").sign(&claims), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::KeysUnavailable { .. }), "{why}");
}

#[tokio::test]
async fn headers_that_point_at_keys_are_never_followed() {
    let a = Key::new("a");
    let attacker = Key::new("evil");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    keys.refresh().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let auds = auds();
    let jku = format!("{}/attacker-jwks.json", idp.iss);
    // An unknown kid with jku/x5u: the cache refreshes from its own source only.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("evil".into());
    header.jku = Some(jku.clone());
    header.x5u = Some(format!("{}/attacker-cert.pem", idp.iss));
    let why = keys
        .verify(
            &attacker.sign_with_header(header, &idp.claims()),
            &expect(&auds),
        )
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::UnknownKey { .. }), "{why}");
    // The trusted kid, an embedded `jwk` of the attacker's key: the signature is checked
    // against the trusted key and fails.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("a".into());
    header.jku = Some(jku.clone());
    header.jwk = Some(serde_json::from_value(attacker.jwk()).unwrap());
    let why = keys
        .verify(
            &attacker.sign_with_header(header, &idp.claims()),
            &expect(&auds),
        )
        .await
        .unwrap_err();
    assert_eq!(why, Refusal::BadSignature);
    assert_eq!(idp.hits("/attacker-jwks.json"), 0);
    assert_eq!(idp.hits("/attacker-cert.pem"), 0);
}

#[tokio::test]
async fn algorithm_confusion_is_refused() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    keys.refresh().await.unwrap();
    let auds = auds();
    // HMAC keyed with the public key's bytes, under its kid.
    for secret in [a.public.to_vec(), b64(&a.public).into_bytes()] {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("a".into());
        let token =
            jsonwebtoken::encode(&header, &idp.claims(), &EncodingKey::from_secret(&secret))
                .unwrap();
        assert_eq!(
            keys.verify(&token, &expect(&auds)).await.unwrap_err(),
            Refusal::AlgorithmMismatch {
                got: Algorithm::HS256,
                want: Algorithm::EdDSA
            }
        );
    }
    // alg none, unsigned.
    let token = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","kid":"a"}"#),
        b64(idp.claims().to_string().as_bytes())
    );
    assert_eq!(
        keys.verify(&token, &expect(&auds)).await.unwrap_err(),
        Refusal::Malformed(Malformed::UnsupportedAlgorithm("none".into()))
    );
    // A symmetric key published by the issuer is left out, so nothing verifies with it.
    idp.set_jwks(json!({"keys": [{"kty": "oct", "k": b64(b"secret"), "kid": "hs"}]}));
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(matches!(
        keys.refresh().await,
        Err(FetchError::NoUsableKeys { .. })
    ));
    idp.set_jwks(json!({"keys": [a.jwk(), {"kty": "oct", "k": b64(b"secret"), "kid": "hs"}]}));
    keys.refresh().await.unwrap();
    assert_eq!(keys.status().kids, vec!["a".to_string()]);
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("hs".into());
    let token =
        jsonwebtoken::encode(&header, &idp.claims(), &EncodingKey::from_secret(b"secret")).unwrap();
    assert!(matches!(
        keys.verify(&token, &expect(&auds)).await.unwrap_err(),
        Refusal::UnknownKey { .. }
    ));
}

#[tokio::test]
async fn claims_are_checked_with_reasons() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    keys.refresh().await.unwrap();
    let auds = auds();
    let with = |change: Value| {
        let mut c = idp.claims();
        for (k, v) in change.as_object().unwrap() {
            c[k] = v.clone();
        }
        a.sign(&c)
    };
    let why = keys
        .verify(&with(json!({"aud": "someone-else"})), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::WrongAudience { .. }));
    assert!(why.to_string().starts_with("wrong audience"), "{why}");
    let why = keys
        .verify(&with(json!({"exp": now() - 60})), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::Expired { .. }));
    assert!(why.to_string().starts_with("expired"), "{why}");
    assert_eq!(
        keys.verify(&with(json!({"nbf": now() + 600})), &expect(&auds))
            .await
            .unwrap_err(),
        Refusal::NotYetValid
    );
    assert_eq!(
        keys.verify(&with(json!({"iat": now() + 600})), &expect(&auds))
            .await
            .unwrap_err(),
        Refusal::NotYetValid
    );
    // Another issuer's name on a token signed by this issuer's key.
    let why = keys
        .verify(&with(json!({"iss": "https://other"})), &expect(&auds))
        .await
        .unwrap_err();
    assert!(matches!(why, Refusal::UnknownIssuer(_)));
    // Through the set of issuers, the token's iss picks.
    let trusted = TrustedIssuers::new(vec![keys.clone()]);
    trusted
        .verify(&with(json!({})), &expect(&auds))
        .await
        .unwrap();
    assert!(matches!(
        trusted
            .verify(&with(json!({"iss": "https://other"})), &expect(&auds))
            .await,
        Err(Refusal::UnknownIssuer(_))
    ));
    assert_eq!(
        keys.verify(&"a".repeat(20_000), &expect(&auds)).await,
        Err(Refusal::Malformed(Malformed::TooLong))
    );
}

#[tokio::test]
async fn hostile_documents_are_refused() {
    let a = Key::new("a");
    let idp = Provider::start(&[&a]).await;
    // Discovery that names another issuer.
    idp.served.lock().unwrap().claimed_issuer = Some("https://evil.example".into());
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    assert!(matches!(
        keys.refresh().await,
        Err(FetchError::IssuerMismatch { .. })
    ));
    assert_eq!(idp.hits("/jwks.json"), 0);
    // Oversized answers.
    let huge = IssuerKeys::new(&IssuerConfig {
        jwks_url: Some(format!("{}/huge.json", idp.iss)),
        discovery: false,
        ..idp.config(1, 3600)
    })
    .unwrap();
    assert!(matches!(
        huge.refresh().await,
        Err(FetchError::TooLarge { .. })
    ));
    // Not a JWKS.
    idp.served.lock().unwrap().claimed_issuer = None;
    idp.set_jwks(json!({"not": "keys"}));
    assert!(matches!(
        keys.refresh().await,
        Err(FetchError::NotJwks { .. })
    ));
}

#[tokio::test]
async fn https_with_an_extra_root_ca() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let dir = std::env::temp_dir().join(format!("usher-trust-ca-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = usher_test_support::TestCa::create(&dir).unwrap();
    let a = Key::new("a");
    let port = usher_test_support::free_port();
    let iss = format!("https://127.0.0.1:{port}");
    let served = Arc::new(Mutex::new(Served {
        issuer: iss.clone(),
        jwks: json!({"keys": [a.jwk()]}),
        ..Served::default()
    }));
    let tls =
        axum_server::tls_rustls::RustlsConfig::from_pem_file(ca.server_cert(), ca.server_key())
            .await
            .unwrap();
    let app = Router::new().fallback(answer).with_state(served.clone());
    let server = tokio::spawn(
        axum_server::bind_rustls(format!("127.0.0.1:{port}").parse().unwrap(), tls)
            .serve(app.into_make_service()),
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let with_ca = IssuerKeys::new(&IssuerConfig {
        ca: Some(ca.ca_pem()),
        ..IssuerConfig::discovery(&iss)
    })
    .unwrap();
    assert_eq!(with_ca.refresh().await.unwrap(), 1);
    let auds = auds();
    let claims = json!({"iss": iss, "aud": AUDIENCE, "sub": "x", "exp": now() + 60});
    with_ca
        .verify(&a.sign(&claims), &expect(&auds))
        .await
        .unwrap();
    // Without the CA the server is a stranger.
    let without = IssuerKeys::new(&IssuerConfig::discovery(&iss)).unwrap();
    assert!(matches!(
        without.refresh().await,
        Err(FetchError::Transport { .. })
    ));
    // A CA file that is not one is an error at set-up.
    assert!(matches!(
        IssuerKeys::new(&IssuerConfig {
            ca: Some(dir.join("ext.cnf")),
            ..IssuerConfig::discovery(&iss)
        }),
        Err(usher_trust::SetupError::Ca { .. })
    ));
    server.abort();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_static_file_is_read_at_set_up_and_must_be_good() {
    let dir = std::env::temp_dir().join(format!("usher-trust-file-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("idp.jwks");
    let a = Key::new("a");
    std::fs::write(&path, json!({"keys": [a.jwk()]}).to_string()).unwrap();
    let config = IssuerConfig {
        iss: "https://idp".into(),
        jwks: Some(path.clone()),
        discovery: false,
        ..IssuerConfig::discovery("https://idp")
    };
    let keys = IssuerKeys::new(&config).unwrap();
    assert_eq!(keys.current().unwrap().keys.len(), 1);
    assert!(!keys.is_fetched());
    std::fs::write(&path, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
    assert!(matches!(
        IssuerKeys::new(&config),
        Err(usher_trust::SetupError::File(
            FetchError::UnusableKeyInFile { .. }
        ))
    ));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn load_blocking_fetches_outside_a_runtime() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let a = Key::new("a");
    let idp = runtime.block_on(Provider::start(&[&a]));
    let keys = IssuerKeys::new(&idp.config(1, 3600)).unwrap();
    assert_eq!(keys.load_blocking().unwrap(), 1);
    assert_eq!(keys.status().kids, vec!["a".to_string()]);
    // And the same client keeps working on another runtime afterwards.
    let auds = auds();
    runtime
        .block_on(keys.verify(&a.sign(&idp.claims()), &expect(&auds)))
        .unwrap();
}
