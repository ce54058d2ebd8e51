//! The harness the just-in-time tests stand on, checked against the real parts: the npm
//! `oidc-provider` (HTTPS, workload JWTs, key rotation, the code and device flows), a real
//! PostgreSQL, and the webhook sink. If one of these tests fails, the tests built on the
//! part prove nothing.

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;
use usher_test_support::oidc::{
    default_accounts, query_param, random_token, ClientAuth, OidcError, OldKeys, Pkce, SigningAlg,
    CLI_CLIENT_ID, WEB_CLIENT_ID,
};
use usher_test_support::{
    Account, Browser, OidcOptions, OidcProvider, Postgres, WebhookSink, Workload,
};

const AUDIENCE: &str = "https://usher.test";
const REDIRECT_URI: &str = "https://127.0.0.1:9/callback";

fn web_job() -> Workload {
    Workload::github_actions(
        "gha-web-main",
        "acme/web",
        123456,
        "refs/heads/main",
        "deploy",
        Some("production"),
    )
}

fn provider_with(options: OidcOptions) -> OidcProvider {
    OidcProvider::start(options).unwrap_or_else(|e| panic!("the provider starts: {e}"))
}

fn provider() -> OidcProvider {
    provider_with(OidcOptions {
        web_redirect_uris: vec![REDIRECT_URI.to_string()],
        workloads: vec![
            web_job(),
            Workload::new("short-lived", json!({"repository": "acme/web"}))
                .with_ttl(Duration::from_secs(2)),
        ],
        ..OidcOptions::default()
    })
}

/// Verifies `token` with the key of its `kid` in `jwks`, as a relying party would.
fn verify(token: &str, jwks: &Value, audience: &str, issuer: &str) -> Result<Value, String> {
    let header = jsonwebtoken::decode_header(token).map_err(|e| format!("header: {e}"))?;
    let kid = header.kid.ok_or("no kid")?;
    let set: JwkSet = serde_json::from_value(jwks.clone()).map_err(|e| format!("jwks: {e}"))?;
    let jwk = set
        .find(&kid)
        .ok_or(format!("kid {kid} is not in the JWKS"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("jwk: {e}"))?;
    let mut validation = Validation::new(header.alg);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[issuer]);
    validation.leeway = 0;
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map(|data| data.claims)
        .map_err(|e| format!("{:?}", e.kind()))
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT header")
        .kid
        .expect("a kid")
}

fn kids(jwks: &Value) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["kid"].as_str().expect("kid").to_string())
        .collect()
}

#[test]
fn discovery_answers_over_https_to_a_client_that_trusts_the_test_ca_only() {
    let provider = provider();
    let discovery = provider.discovery().expect("discovery");
    assert_eq!(discovery["issuer"], provider.issuer());
    assert_eq!(discovery["jwks_uri"], provider.jwks_uri());
    assert!(discovery["grant_types_supported"]
        .as_array()
        .expect("grant types")
        .contains(&json!("urn:ietf:params:oauth:grant-type:device_code")));
    assert!(discovery["claims_supported"]
        .as_array()
        .expect("claims")
        .contains(&json!("groups")));

    // A client that does not trust the test CA refuses the certificate.
    let status = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "--max-time", "10"])
        .arg(format!(
            "{}/.well-known/openid-configuration",
            provider.issuer()
        ))
        .status()
        .expect("curl runs");
    assert!(
        !status.success(),
        "the provider's certificate is not publicly trusted"
    );
    let status = Command::new("curl")
        .args(["-sf", "-o", "/dev/null", "--max-time", "10", "--cacert"])
        .arg(provider.ca_path())
        .arg(format!(
            "{}/.well-known/openid-configuration",
            provider.issuer()
        ))
        .status()
        .expect("curl runs");
    assert!(status.success(), "with the test CA, curl trusts it");
}

#[test]
fn a_workload_token_is_a_jwt_with_its_claims_signed_by_the_current_key() {
    let provider = provider();
    let token = provider
        .workload_token("gha-web-main", AUDIENCE)
        .expect("a workload token");
    let header = jsonwebtoken::decode_header(&token).expect("a JWT");
    assert_eq!(header.alg, Algorithm::RS256);
    assert_eq!(header.typ.as_deref(), Some("JWT"));
    assert_eq!(header.kid, Some(provider.current_kid().expect("kid")));

    let jwks = provider.jwks().expect("jwks");
    let claims = verify(&token, &jwks, AUDIENCE, &provider.issuer()).expect("it verifies");
    assert_eq!(claims["sub"], "repo:acme/web:environment:production");
    assert_eq!(claims["repository"], "acme/web");
    assert_eq!(claims["repository_id"], "123456");
    assert_eq!(claims["ref"], "refs/heads/main");
    assert_eq!(claims["environment"], "production");
    assert_eq!(claims["workflow"], "deploy");
    assert_eq!(claims["aud"], AUDIENCE);

    // The same token fails for another audience, and with a byte of its signature changed.
    assert!(verify(&token, &jwks, "https://other.test", &provider.issuer()).is_err());
    let mut tampered = token.clone();
    let last = tampered.pop().expect("a signature");
    tampered.push(if last == 'A' { 'B' } else { 'A' });
    assert!(verify(&tampered, &jwks, AUDIENCE, &provider.issuer()).is_err());

    // A wrong secret gets nothing from the provider.
    match provider.token_request(&[
        ("grant_type", "client_credentials"),
        ("client_id", "gha-web-main"),
        ("client_secret", "not-the-secret"),
        ("resource", AUDIENCE),
    ]) {
        Err(OidcError::Status { status, body, .. }) => {
            assert_eq!(status.as_u16(), 401);
            assert!(body.contains("invalid_client"), "{body}");
        }
        other => panic!("a wrong secret got a token: {other:?}"),
    }
}

#[test]
fn a_short_lived_workload_token_expires_when_configured() {
    let provider = provider();
    let token = provider
        .workload_token("short-lived", AUDIENCE)
        .expect("a token");
    let jwks = provider.jwks().expect("jwks");
    let claims = verify(&token, &jwks, AUDIENCE, &provider.issuer()).expect("valid at first");
    assert_eq!(
        claims["exp"].as_u64().expect("exp") - claims["iat"].as_u64().expect("iat"),
        2
    );
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        verify(&token, &jwks, AUDIENCE, &provider.issuer()),
        Err("ExpiredSignature".to_string())
    );
}

#[test]
fn after_rotation_new_tokens_carry_a_new_kid_and_old_ones_verify_while_the_old_key_is_kept() {
    let mut provider = provider();
    let old_token = provider
        .workload_token("gha-web-main", AUDIENCE)
        .expect("a token");
    let old_kid = kid_of(&old_token);
    let port = provider.port();

    provider.rotate_keys(OldKeys::Keep).expect("rotation");
    assert_eq!(provider.port(), port, "the same port after the restart");
    let new_token = provider
        .workload_token("gha-web-main", AUDIENCE)
        .expect("a token after rotation");
    let new_kid = kid_of(&new_token);
    assert_ne!(new_kid, old_kid);
    let jwks = provider.jwks().expect("jwks");
    assert_eq!(kids(&jwks), vec![new_kid.clone(), old_kid.clone()]);
    verify(&old_token, &jwks, AUDIENCE, &provider.issuer()).expect("the old token verifies");
    verify(&new_token, &jwks, AUDIENCE, &provider.issuer()).expect("the new token verifies");

    provider.rotate_keys(OldKeys::Drop).expect("rotation");
    let jwks = provider.jwks().expect("jwks");
    assert_eq!(kids(&jwks).len(), 1);
    assert!(!kids(&jwks).contains(&old_kid) && !kids(&jwks).contains(&new_kid));
    assert!(verify(&old_token, &jwks, AUDIENCE, &provider.issuer()).is_err());
}

#[test]
fn a_stopped_provider_does_not_answer_until_started_again() {
    let mut provider = provider();
    let kid = provider.current_kid().expect("kid");
    provider.stop();
    assert!(matches!(provider.jwks(), Err(OidcError::Http(_))));
    provider.start_again().expect("started again");
    assert_eq!(kids(&provider.jwks().expect("jwks")), vec![kid]);
}

#[test]
fn the_code_flow_with_pkce_signs_alice_in_and_her_id_token_has_her_groups() {
    let provider = provider();
    let pkce = Pkce::new();
    let (state, nonce) = (random_token(), random_token());
    let authorize = provider.authorize_url(
        WEB_CLIENT_ID,
        REDIRECT_URI,
        "openid profile email groups",
        &state,
        &nonce,
        &pkce,
    );
    let back = provider
        .sign_in(&authorize, "alice")
        .expect("alice signs in");
    assert!(back.starts_with(REDIRECT_URI), "{back}");
    assert_eq!(query_param(&back, "state").as_deref(), Some(state.as_str()));
    let code = query_param(&back, "code").expect("a code");

    // The code does not redeem without the right verifier...
    assert!(matches!(
        provider.redeem_code(
            &code,
            REDIRECT_URI,
            "a-wrong-verifier-that-is-long-enough-to-be-valid-43"
        ),
        Err(OidcError::Status { .. })
    ));
    // ...and a code that failed once is spent: sign in again for a fresh one.
    let pkce = Pkce::new();
    let authorize = provider.authorize_url(
        WEB_CLIENT_ID,
        REDIRECT_URI,
        "openid profile email groups",
        &state,
        &nonce,
        &pkce,
    );
    let back = provider
        .sign_in(&authorize, "alice")
        .expect("alice signs in");
    let code = query_param(&back, "code").expect("a code");
    let tokens = provider
        .redeem_code(&code, REDIRECT_URI, &pkce.verifier)
        .expect("the code redeems");
    let id_token = tokens["id_token"].as_str().expect("an ID token");
    let claims = verify(
        id_token,
        &provider.jwks().expect("jwks"),
        WEB_CLIENT_ID,
        &provider.issuer(),
    )
    .expect("the ID token verifies");
    let alice = &default_accounts()[0];
    assert_eq!(claims["sub"], alice.sub.as_str());
    assert_ne!(claims["sub"], "alice");
    assert_eq!(claims["preferred_username"], "alice");
    assert_eq!(claims["email"], alice.email.as_str());
    assert_eq!(claims["groups"], json!(["eng"]));
    assert_eq!(claims["nonce"], nonce.as_str());

    // Userinfo says the same about her.
    let userinfo = provider
        .userinfo(tokens["access_token"].as_str().expect("an access token"))
        .expect("userinfo");
    assert_eq!(userinfo["sub"], alice.sub.as_str());
    assert_eq!(userinfo["groups"], json!(["eng"]));
}

#[test]
fn an_unknown_user_cannot_sign_in_and_cancelling_sends_access_denied() {
    let provider = provider();
    let authorize = provider.authorize_url(
        WEB_CLIENT_ID,
        REDIRECT_URI,
        "openid",
        "s",
        "n",
        &Pkce::new(),
    );
    match provider.sign_in(&authorize, "mallory") {
        Err(OidcError::UnknownUser { username, .. }) => assert_eq!(username, "mallory"),
        other => panic!("mallory signed in: {other:?}"),
    }
    let back = provider.cancel_sign_in(&authorize).expect("cancelled");
    assert!(back.starts_with(REDIRECT_URI), "{back}");
    assert_eq!(
        query_param(&back, "error").as_deref(),
        Some("access_denied")
    );
    assert_eq!(query_param(&back, "code"), None);

    // A redirect URI the client does not have is refused at the provider.
    let elsewhere = provider.authorize_url(
        WEB_CLIENT_ID,
        "https://evil.test/callback",
        "openid",
        "s",
        "n",
        &Pkce::new(),
    );
    match provider.sign_in(&elsewhere, "alice") {
        Err(OidcError::UnexpectedPage { status, body, .. }) => {
            assert_eq!(status.as_u16(), 400);
            assert!(body.contains("redirect_uri"), "{body}");
        }
        other => panic!("a foreign redirect URI was accepted: {other:?}"),
    }
}

#[test]
fn the_device_flow_signs_bob_in_with_his_groups() {
    let provider = provider();
    let started = provider
        .device_authorization("openid profile groups")
        .expect("a device authorization");
    let device_code = started["device_code"].as_str().expect("device_code");
    let user_code = started["user_code"].as_str().expect("user_code");
    assert!(matches!(
        provider.device_token(device_code),
        Err(OidcError::Status { ref body, .. }) if body.contains("authorization_pending")
    ));
    assert!(matches!(
        provider.approve_device("WRONG-CODE", "bob"),
        Err(OidcError::UserCodeRefused { .. })
    ));
    provider
        .approve_device(user_code, "bob")
        .expect("bob approves the device");
    let tokens = provider
        .device_token(device_code)
        .expect("the CLI's tokens");
    let id_token = tokens["id_token"].as_str().expect("an ID token");
    let claims = verify(
        id_token,
        &provider.jwks().expect("jwks"),
        CLI_CLIENT_ID,
        &provider.issuer(),
    )
    .expect("the ID token verifies");
    assert_eq!(claims["preferred_username"], "bob");
    assert_eq!(claims["sub"], default_accounts()[1].sub.as_str());
    assert_eq!(claims["groups"], json!(["sre-leads", "eng"]));
}

#[test]
fn es256_keys_and_configured_accounts_are_used() {
    let provider = provider_with(OidcOptions {
        alg: SigningAlg::ES256,
        web_redirect_uris: vec![REDIRECT_URI.to_string()],
        web_client_auth: ClientAuth::SecretPost,
        accounts: vec![
            Account::new("erin", &["approvers"]),
            Account::new("erin-alt", &["eng"]).with_sub(&Account::new("erin", &[]).sub),
        ],
        ..OidcOptions::default()
    });
    let started = provider
        .device_authorization("openid profile")
        .expect("started");
    provider
        .approve_device(
            started["user_code"].as_str().expect("user_code"),
            "erin-alt",
        )
        .expect("approved");
    let tokens = provider
        .device_token(started["device_code"].as_str().expect("device_code"))
        .expect("tokens");
    let id_token = tokens["id_token"].as_str().expect("an ID token");
    assert_eq!(
        jsonwebtoken::decode_header(id_token).expect("header").alg,
        Algorithm::ES256
    );
    let claims = verify(
        id_token,
        &provider.jwks().expect("jwks"),
        CLI_CLIENT_ID,
        &provider.issuer(),
    )
    .expect("verifies");
    assert_eq!(claims["preferred_username"], "erin-alt");
    assert_eq!(claims["sub"], Account::new("erin", &[]).sub.as_str());
    assert_eq!(claims["groups"], json!(["eng"]));

    // The web client authenticates with client_secret_post here.
    let pkce = Pkce::new();
    let authorize = provider.authorize_url(WEB_CLIENT_ID, REDIRECT_URI, "openid", "s", "n", &pkce);
    let back = provider.sign_in(&authorize, "erin").expect("erin signs in");
    let code = query_param(&back, "code").expect("a code");
    let tokens = provider
        .redeem_code(&code, REDIRECT_URI, &pkce.verifier)
        .expect("redeemed with client_secret_post");
    let claims = verify(
        tokens["id_token"].as_str().expect("an ID token"),
        &provider.jwks().expect("jwks"),
        WEB_CLIENT_ID,
        &provider.issuer(),
    )
    .expect("verifies");
    assert_eq!(claims["groups"], json!(["approvers"]));
}

#[test]
fn the_spki_pin_for_chromium_is_the_certificates_key_hash() {
    let provider = provider();
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "openssl x509 -pubkey -noout -in \"$1\" | openssl pkey -pubin -outform der \
             | openssl dgst -sha256 -binary | base64",
        )
        .arg("sh")
        .arg(provider.ca().server_cert())
        .output()
        .expect("openssl runs");
    assert_eq!(
        provider.certificate_spki_sha256().expect("the pin"),
        String::from_utf8_lossy(&out.stdout).trim()
    );
}

#[test]
fn postgres_accepts_connections_and_keeps_its_data_across_a_restart() {
    let mut postgres = Postgres::start().unwrap_or_else(|e| panic!("postgres starts: {e}"));
    assert!(postgres.url().starts_with("postgres://postgres@127.0.0.1:"));
    assert!(postgres.url().ends_with("/usher"));
    assert_eq!(
        postgres
            .psql("SELECT current_database()")
            .expect("psql")
            .trim(),
        "usher"
    );
    postgres
        .psql("CREATE TABLE requests (id int PRIMARY KEY, reason text); INSERT INTO requests VALUES (1, 'INC-1234')")
        .expect("a table");

    postgres.stop().expect("stopped");
    assert!(
        postgres.psql("SELECT 1").is_err(),
        "a stopped server refuses"
    );
    postgres.start_again().expect("started again");
    assert_eq!(
        postgres
            .psql("SELECT reason FROM requests WHERE id = 1")
            .expect("psql")
            .trim(),
        "INC-1234"
    );

    postgres.kill().expect("killed");
    postgres.start_again().expect("recovered");
    assert_eq!(
        postgres
            .psql("SELECT count(*) FROM requests")
            .expect("psql")
            .trim(),
        "1"
    );
    // It listens on loopback only.
    assert_eq!(
        postgres.psql("SHOW listen_addresses").expect("psql").trim(),
        "127.0.0.1"
    );
}

#[test]
fn the_webhook_sink_records_json_posts_and_answers_as_told() {
    let sink = WebhookSink::start().expect("the sink starts");
    let post = |body: &str| {
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "10",
            ])
            .args(["-H", "content-type: application/json", "-d", body])
            .arg(sink.url())
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(post(r#"{"event":"request.created","id":"r1"}"#), "204");
    let got = sink
        .wait_for(|b| b["event"] == "request.created", Duration::from_secs(5))
        .expect("the POST is recorded");
    assert_eq!(got["id"], "r1");
    sink.respond_with(500);
    assert_eq!(post(r#"{"event":"request.approved"}"#), "500");
    assert_eq!(sink.received().len(), 2);
    assert!(sink
        .wait_for(|b| b["event"] == "never", Duration::from_millis(200))
        .is_err());
}

#[test]
fn chromium_signs_in_and_approves_a_device_through_the_provider_pages() {
    let relying_party = WebhookSink::start().expect("a stand-in for the service's callback");
    let callback = format!("http://127.0.0.1:{}/callback", relying_party.port());
    let provider = provider_with(OidcOptions {
        web_redirect_uris: vec![callback.clone()],
        ..OidcOptions::default()
    });
    let browser = Browser::start();

    let authorize = provider.authorize_url(
        WEB_CLIENT_ID,
        &callback,
        "openid groups",
        "browser-state",
        "n",
        &Pkce::new(),
    );
    browser.open(&authorize);
    browser.wait_for(
        "the sign-in page",
        "return !!document.querySelector('form#login input[name=username]#username')",
        |v| v == &json!(true),
    );
    browser.js("document.querySelector('#username').value = 'carol'; return true");
    browser.click("#sign-in");
    let landed = browser.wait_for(
        "the redirect back to the client",
        "return location.href",
        |v| v.as_str().is_some_and(|url| url.starts_with(&callback)),
    );
    let landed = landed.as_str().expect("a URL");
    assert_eq!(
        query_param(landed, "state").as_deref(),
        Some("browser-state")
    );
    assert!(query_param(landed, "code").is_some(), "{landed}");

    let started = provider
        .device_authorization("openid profile")
        .expect("a device authorization");
    browser.open(&format!("{}/device", provider.issuer()));
    browser.wait_for(
        "the device page",
        "return !!document.querySelector('form#device-code input[name=user_code]#user_code')",
        |v| v == &json!(true),
    );
    browser.js(&format!(
        "document.querySelector('#user_code').value = {}; return true",
        started["user_code"]
    ));
    browser.click("#device-continue");
    browser.wait_for(
        "the confirm page",
        "return !!document.querySelector('#device-confirm-continue')",
        |v| v == &json!(true),
    );
    browser.click("#device-confirm-continue");
    // Carol is still signed in at the provider from the code flow: no sign-in page.
    browser.wait_for(
        "the device success page",
        "return !!document.querySelector('#success')",
        |v| v == &json!(true),
    );
    let tokens = provider
        .device_token(started["device_code"].as_str().expect("device_code"))
        .expect("the device's tokens");
    let claims = verify(
        tokens["id_token"].as_str().expect("an ID token"),
        &provider.jwks().expect("jwks"),
        CLI_CLIENT_ID,
        &provider.issuer(),
    )
    .expect("verifies");
    assert_eq!(claims["preferred_username"], "carol");
}
