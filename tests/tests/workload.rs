//! Workload tokens presented directly at usherd's SSH prompt (`[[workload]]` in usherd.toml),
//! from the real npm `oidc-provider` over HTTPS: the right token logs in as the rule's login;
//! a wrong repository, branch, audience, login, an expired token, an unknown kid and a kid
//! that appears while the provider is down are refused, each with its reason in usherd's
//! log; a key rotation at the provider is followed without restarting usherd.

use serde_json::json;
use std::process::Output;
use std::time::Duration;
use usher::grant::KeyAlg;
use usher_test_support::oidc::OldKeys;
use usher_test_support::{OidcOptions, OidcProvider, Workload};
use usher_tests::*;

const AUDIENCE: &str = "urn:usher:test-host";

/// A GitHub Actions-like job of acme/web on main: what the rule wants.
const GOOD: &str = "gha-web-main";
const OTHER_REPO: &str = "gha-other-main";
const OTHER_BRANCH: &str = "gha-web-feature";
const SHORT_LIVED: &str = "gha-web-short";

fn provider() -> OidcProvider {
    let job = |id: &str, repo: &str, git_ref: &str| {
        Workload::github_actions(id, repo, 4242, git_ref, "deploy", None)
    };
    OidcProvider::start(OidcOptions {
        workloads: vec![
            job(GOOD, "acme/web", "refs/heads/main"),
            job(OTHER_REPO, "acme/other", "refs/heads/main"),
            job(OTHER_BRANCH, "acme/web", "refs/heads/feature"),
            job(SHORT_LIVED, "acme/web", "refs/heads/main").with_ttl(Duration::from_secs(2)),
        ],
        ..OidcOptions::default()
    })
    .expect("the OpenID provider starts (cargo xtask setup installs oidc-provider)")
}

/// usherd with one workload rule for the provider's tokens, its keys by discovery over the
/// provider's HTTPS (its test CA), refreshed at most once a second.
fn agent_trusting(provider: &OidcProvider) -> TestAgent {
    let mut agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nleeway_secs = 1\n".into(),
        ..Options::default()
    });
    // The rule's login carries the agent's prefix, known only once it started: write the
    // rule, then start it again.
    let rule = format!(
        r#"
[[workload]]
name = "deploy"
issuer = "{iss}"
audience = "{AUDIENCE}"
claims = {{ repository = "acme/web", ref = "refs/heads/main" }}
login = "{login}"
max_lifetime = "10m"

[[workload_issuer]]
iss = "{iss}"
discovery = true
ca = "{ca}"
refresh_min_secs = 1
"#,
        iss = provider.issuer(),
        login = agent.login("deploy"),
        ca = provider.ca_path().display(),
    );
    let mut config = std::fs::read_to_string(&agent.config_path).unwrap();
    config.push_str(&rule);
    std::fs::write(&agent.config_path, config).unwrap();
    agent.stop();
    agent.launch();
    agent
}

fn token(provider: &OidcProvider, workload: &str, audience: &str) -> String {
    provider
        .workload_token(workload, audience)
        .unwrap_or_else(|e| panic!("a token for {workload}: {e}\n{}", provider.log()))
}

fn kid_of(token: &str) -> String {
    jsonwebtoken::decode_header(token)
        .expect("a JWT")
        .kid
        .expect("a kid")
}

fn logs_in_as(agent: &TestAgent, out: &Output, login: &str) {
    assert!(
        out.status.success(),
        "refused: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), login);
}

/// The login fails for the client (generically) and usherd's log says why.
fn refused_because(agent: &TestAgent, out: &Output, reason: &str) {
    assert!(
        !out.status.success(),
        "accepted: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("grant refused") && l.contains(reason)),
        "no refusal saying {reason:?} in usherd's log:\n{log}"
    );
    // The client learns nothing but the failure.
    assert!(!String::from_utf8_lossy(&out.stderr).contains(reason));
}

#[test]
fn a_workload_token_logs_in_as_its_rule_and_wrong_tokens_are_refused_with_the_reason() {
    let provider = provider();
    let agent = agent_trusting(&provider);
    let login = agent.login("deploy");

    let good = token(&provider, GOOD, AUDIENCE);
    let out = agent.ssh_with_password(&login, &good, "id -un");
    logs_in_as(&agent, &out, &login);
    // At the keyboard-interactive prompt too.
    let out = agent.ssh_with_keyboard_interactive(&login, &good, "id -un");
    logs_in_as(&agent, &out, &login);
    // The session's grant is the workload's: its sub and issuer, the rule named.
    let ids = agent.recorded_sessions();
    let meta = agent.meta(ids.last().expect("a recorded session"));
    assert_eq!(meta["grant"]["iss"], provider.issuer().as_str());
    assert_eq!(meta["grant"]["sub"], "repo:acme/web:ref:refs/heads/main");
    assert_eq!(meta["grant"]["reason"], "workload rule deploy");

    // The right token, another login than the rule's.
    let other_login = agent.login("root2");
    let out = agent.ssh_with_password(&other_login, &good, "id -un");
    refused_because(&agent, &out, &format!("rule deploy grants login {login:?}"));
    assert!(!user_exists(&other_login));

    let out = agent.ssh_with_password(&login, &token(&provider, OTHER_REPO, AUDIENCE), "true");
    refused_because(
        &agent,
        &out,
        r#"claim repository is "acme/other", rule deploy wants "acme/web""#,
    );

    let out = agent.ssh_with_password(&login, &token(&provider, OTHER_BRANCH, AUDIENCE), "true");
    refused_because(
        &agent,
        &out,
        r#"claim ref is "refs/heads/feature", rule deploy wants "refs/heads/main""#,
    );

    let out = agent.ssh_with_password(
        &login,
        &token(&provider, GOOD, "urn:usher:another-host"),
        "true",
    );
    refused_because(
        &agent,
        &out,
        r#"wrong audience: the token is for "urn:usher:another-host""#,
    );

    let short = token(&provider, SHORT_LIVED, AUDIENCE);
    std::thread::sleep(Duration::from_secs(4));
    let out = agent.ssh_with_password(&login, &short, "true");
    refused_because(&agent, &out, "workload token: expired");

    // The provider's issuer and claims, signed by a key it never published: usherd asks
    // the provider once more, and the kid is still unknown.
    std::thread::sleep(Duration::from_millis(1100));
    let (stranger_pem, _) = usher::grant::keygen(KeyAlg::Es256, "stranger-1").unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("stranger-1".into());
    let forged = jsonwebtoken::encode(
        &header,
        &json!({
            "iss": provider.issuer(), "aud": AUDIENCE, "sub": "repo:acme/web:ref:refs/heads/main",
            "repository": "acme/web", "ref": "refs/heads/main",
            "iat": now(), "exp": now() + 300, "jti": "forged-1",
        }),
        &jsonwebtoken::EncodingKey::from_ec_pem(stranger_pem.as_bytes()).unwrap(),
    )
    .unwrap();
    let out = agent.ssh_with_password(&login, &forged, "true");
    refused_because(
        &agent,
        &out,
        &format!(
            "unknown kid \"stranger-1\" for issuer {:?} (keys refreshed just now)",
            provider.issuer()
        ),
    );

    // A workload token is not a grant anywhere else: `usher grant install` refuses it.
    let out = agent.install(&good);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("accepted only at the SSH prompt"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn key_rotation_is_followed_and_a_new_key_is_refused_while_the_provider_is_down() {
    let mut provider = provider();
    let agent = agent_trusting(&provider);
    let pid = agent.pid();
    let login = agent.login("deploy");

    let first = token(&provider, GOOD, AUDIENCE);
    logs_in_as(
        &agent,
        &agent.ssh_with_password(&login, &first, "id -un"),
        &login,
    );

    // A new signing key at the provider: usherd learns it from the token's unknown kid.
    provider.rotate_keys(OldKeys::Keep).expect("rotation");
    let rotated = token(&provider, GOOD, AUDIENCE);
    assert_ne!(kid_of(&rotated), kid_of(&first));
    std::thread::sleep(Duration::from_millis(1100));
    logs_in_as(
        &agent,
        &agent.ssh_with_password(&login, &rotated, "id -un"),
        &login,
    );

    // Another new key, and the provider goes down before usherd has seen it.
    provider.rotate_keys(OldKeys::Keep).expect("rotation");
    let unseen = token(&provider, GOOD, AUDIENCE);
    provider.stop();
    std::thread::sleep(Duration::from_millis(1100));
    let out = agent.ssh_with_password(&login, &unseen, "true");
    refused_because(
        &agent,
        &out,
        &format!(
            "unknown kid {:?} for issuer {:?} (refreshing the keys failed",
            kid_of(&unseen),
            provider.issuer()
        ),
    );
    // The keys usherd already has still verify.
    logs_in_as(
        &agent,
        &agent.ssh_with_password(&login, &rotated, "id -un"),
        &login,
    );

    // Back up: the same token now verifies. usherd never restarted.
    provider.start_again().expect("the provider starts again");
    std::thread::sleep(Duration::from_millis(1100));
    logs_in_as(
        &agent,
        &agent.ssh_with_password(&login, &unseen, "id -un"),
        &login,
    );
    assert_eq!(agent.pid(), pid);
}

#[test]
fn a_grants_request_id_reaches_the_sessions_metadata() {
    let agent = TestAgent::start();
    let login = agent.login("req");
    let mut claims = agent.claims(&login, 600);
    claims.request = Some("req-0042".into());
    let out = agent.install(&agent.sign(&claims));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = agent.ssh(&login, "true");
    assert!(out.status.success(), "{}", agent.log());
    let ids = agent.recorded_sessions();
    let meta = agent.meta(ids.last().expect("a recorded session"));
    assert_eq!(meta["grant"]["request"], "req-0042");
    // A grant without one has none in its metadata (not even null).
    let other = agent.login("plain");
    agent.install(&agent.sign(&agent.claims(&other, 600)));
    assert!(agent.ssh(&other, "true").status.success());
    let ids = agent.recorded_sessions();
    let metas: Vec<_> = ids.iter().map(|id| agent.meta(id)).collect();
    let plain = metas
        .iter()
        .find(|m| {
            m["grant"]["jti"]
                .as_str()
                .is_some_and(|j| j.contains("plain"))
        })
        .expect("the second session's metadata");
    assert!(plain["grant"].get("request").is_none(), "{plain}");
}
