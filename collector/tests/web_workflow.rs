//! People on the service's page, against the real npm `oidc-provider` (tests/support/oidc):
//! sign-in with the authorization code flow (PKCE, state, nonce) in headless Chromium and
//! scripted over HTTP, the CLI's ID-token login, the session cookie's attributes, CSRF,
//! roles from groups, and the replay page showing the request a session came from.

mod support;

use reqwest::blocking::{Client, Response};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use serde_json::{json, Value};
use support::{host, Backend, Collector, Host};
use usher_collector::uploader::{openssh_public_line, Recording};
use usher_test_support::oidc::{
    default_accounts, Account, OidcOptions, OidcProvider, CLI_CLIENT_ID, WEB_CLIENT_ID,
    WEB_CLIENT_SECRET,
};
use usher_test_support::Browser;

/// The service, configured for the provider, and the provider.
struct Service {
    collector: Collector,
    provider: OidcProvider,
    web1: Host,
    http: Client,
}

/// alice, bob, carol, dave (tests/support's default accounts) and erin, whose only group
/// maps to no role.
fn accounts() -> Vec<Account> {
    let mut accounts = default_accounts();
    accounts.push(Account::new("erin", &["contractors"]));
    accounts
}

impl Service {
    fn start() -> Service {
        let web1 = host("web-1", 21);
        let mut collector = Collector::new(Backend::Local, &[&web1]);
        let url = collector.url();
        let provider = OidcProvider::start(OidcOptions {
            accounts: accounts(),
            web_redirect_uris: vec![format!("{url}/callback")],
            ..OidcOptions::default()
        })
        .unwrap_or_else(|e| panic!("the OpenID provider: {e}"));
        // Top-level keys before the tables the harness wrote.
        let config = std::fs::read_to_string(&collector.config).unwrap();
        let config = format!(
            "public_url = \"{url}\"\n{config}\n\
             [oidc]\nissuer = \"{iss}\"\nclient_id = \"{WEB_CLIENT_ID}\"\n\
             client_secret = \"{WEB_CLIENT_SECRET}\"\ncli_client_id = \"{CLI_CLIENT_ID}\"\n\
             roles_claim = \"groups\"\nca = \"{ca}\"\n\n\
             [roles]\nrequester = [\"eng\"]\napprover = [\"sre-leads\"]\n\
             auditor = [\"auditors\", \"sre-leads\"]\n\n\
             [[request_policy]]\nname = \"engineers\"\ngroups = [\"eng\"]\nhosts = [\"web-*\"]\n\
             logins = [\"jit-{{user}}\"]\nprofiles = [\"restricted\"]\nmax_duration = \"4h\"\n\
             approvals = 1\napprover_groups = [\"sre-leads\"]\n",
            iss = provider.issuer(),
            ca = provider.ca_path().display(),
        );
        std::fs::write(&collector.config, config).unwrap();
        collector.start();
        let http = Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&collector.ca).unwrap())
            .redirect(reqwest::redirect::Policy::none())
            .timeout(std::time::Duration::from_secs(30))
            .build()
            .unwrap();
        Service {
            collector,
            provider,
            web1,
            http,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.collector.url())
    }

    /// Signs in through `/login`, the provider's page (scripted) and `/callback`: the
    /// callback's answer, and the login cookie `/login` set.
    fn web_sign_in(&self, username: &str) -> (Response, String) {
        let start = self.http.get(self.url("/login")).send().unwrap();
        assert_eq!(start.status(), 303, "{}", self.collector.log());
        let login_cookie = set_cookie(&start, "usher_login").expect("/login sets its cookie");
        let to_provider = header(&start, LOCATION.as_str());
        assert!(
            to_provider.starts_with(&self.provider.issuer()),
            "{to_provider}"
        );
        for must in [
            "code_challenge_method=S256",
            "code_challenge=",
            "state=",
            "nonce=",
        ] {
            assert!(to_provider.contains(must), "{must} missing: {to_provider}");
        }
        let back = self
            .provider
            .sign_in(&to_provider, username)
            .unwrap_or_else(|e| panic!("sign-in at the provider: {e}\n{}", self.provider.log()));
        assert!(back.starts_with(&self.url("/callback?")), "{back}");
        let answer = self
            .http
            .get(&back)
            .header(
                COOKIE,
                format!("usher_login={}", cookie_value(&login_cookie)),
            )
            .send()
            .unwrap();
        (answer, login_cookie)
    }

    /// The session cookie's value after a web sign-in as `username`.
    fn session(&self, username: &str) -> String {
        let (answer, _) = self.web_sign_in(username);
        assert_eq!(answer.status(), 200, "{}", self.collector.log());
        cookie_value(&set_cookie(&answer, "usher_session").expect("a session cookie")).to_string()
    }

    /// An API token for `username` the way `usher login` gets one: the device flow at the
    /// provider for the CLI client, then the ID token at `/api/v1/login`.
    fn cli_token(&self, username: &str) -> String {
        let id_token = self.cli_id_token(username);
        let answer = self
            .http
            .post(self.url("/api/v1/login"))
            .json(&json!({ "id_token": id_token }))
            .send()
            .unwrap();
        assert_eq!(answer.status(), 200);
        let body: Value = answer.json().unwrap();
        assert_eq!(body["principal"]["name"], username);
        body["token"].as_str().unwrap().to_string()
    }

    fn cli_id_token(&self, username: &str) -> String {
        let config: Value = self
            .http
            .get(self.url("/api/v1/login/config"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        assert_eq!(config["issuer"], self.provider.issuer());
        assert_eq!(config["client_id"], CLI_CLIENT_ID);
        let scope = config["scopes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect::<Vec<_>>()
            .join(" ");
        let device = self.provider.device_authorization(&scope).unwrap();
        self.provider
            .approve_device(device["user_code"].as_str().unwrap(), username)
            .unwrap();
        let tokens = self
            .provider
            .device_token(device["device_code"].as_str().unwrap())
            .unwrap();
        tokens["id_token"].as_str().unwrap().to_string()
    }

    fn bearer_get(&self, token: &str, path: &str) -> Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .unwrap()
    }

    /// alice asks for web-1 with her API token.
    fn alice_requests(&self, alice: &str, reason: &str) -> Value {
        let key = openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[5; 32]));
        let answer = self
            .http
            .post(self.url("/api/v1/requests"))
            .bearer_auth(alice)
            .json(
                &json!({"host": "web-1", "login": "jit-alice", "profile": "restricted",
                          "duration_secs": 3600, "reason": reason, "ssh_key": key}),
            )
            .send()
            .unwrap();
        let status = answer.status();
        let body: Value = answer.json().unwrap();
        assert_eq!(status, 201, "{body}");
        assert_eq!(body["state"], "pending");
        body
    }
}

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

/// The whole `Set-Cookie` line for cookie `name` (the last one, when it is set twice).
fn set_cookie(response: &Response, name: &str) -> Option<String> {
    response
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .rfind(|v| v.starts_with(&format!("{name}=")))
        .map(String::from)
}

fn cookie_value(line: &str) -> &str {
    line.split(';')
        .next()
        .and_then(|kv| kv.split_once('='))
        .map_or("", |(_, v)| v)
}

fn attributes(line: &str) -> Vec<String> {
    line.split(';')
        .skip(1)
        .map(|a| a.trim().to_string())
        .collect()
}

/// The CSRF token the page rendered (None when it rendered none).
fn csrf_in_page(html: &str) -> Option<String> {
    let start = html.find("<meta name=\"usher-csrf\" content=\"")? + 33;
    let end = html[start..].find('"')?;
    Some(html[start..start + end].to_string())
}

#[test]
fn the_session_cookie_is_httponly_secure_samesite_and_writes_need_the_csrf_header() {
    let s = Service::start();
    let (answer, login_cookie) = s.web_sign_in("alice");
    // The flow's own cookie crosses the provider's redirect: Lax, and only for /callback.
    let login_attrs = attributes(&login_cookie);
    for a in ["HttpOnly", "Secure", "SameSite=Lax", "Path=/callback"] {
        assert!(
            login_attrs.iter().any(|x| x == a),
            "{a} missing: {login_cookie}"
        );
    }
    assert_eq!(answer.status(), 200, "{}", s.collector.log());
    let session_line = set_cookie(&answer, "usher_session").expect("a session cookie");
    let attrs = attributes(&session_line);
    for a in ["HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(attrs.iter().any(|x| x == a), "{a} missing: {session_line}");
    }
    // The login cookie is spent.
    let spent = set_cookie(&answer, "usher_login").expect("the login cookie is cleared");
    assert!(spent.contains("Max-Age=0"), "{spent}");
    // The callback's page moves on by itself and runs no script.
    assert!(header(&answer, "content-security-policy").contains("script-src 'self'"));
    let body = answer.text().unwrap();
    assert!(
        body.contains("http-equiv=\"refresh\"") && !body.contains("<script"),
        "{body}"
    );
    // No token in the URL the browser ends on.
    assert!(!body.contains(cookie_value(&session_line)));

    let session = cookie_value(&session_line).to_string();
    let cookie = format!("usher_session={session}");
    // The page renders the CSRF token for a signed-in person only.
    let signed_out = s.http.get(s.url("/")).send().unwrap();
    let csp = header(&signed_out, "content-security-policy");
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("script-src 'self' 'unsafe-inline'"),
        "{csp}"
    );
    assert_eq!(csrf_in_page(&signed_out.text().unwrap()), None);
    let page = s
        .http
        .get(s.url("/"))
        .header(COOKIE, &cookie)
        .send()
        .unwrap()
        .text()
        .unwrap();
    let csrf = csrf_in_page(&page).expect("the page carries the CSRF token");
    assert!(
        !page.contains(&session),
        "the session token is never in the page"
    );
    // Who am I, with the cookie.
    let me: Value = s
        .http
        .get(s.url("/api/v1/me"))
        .header(COOKIE, &cookie)
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(me["name"], "alice");
    assert_eq!(me["roles"], json!(["requester"]));

    let key = openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[6; 32]));
    let request = json!({"host": "web-1", "login": "jit-alice", "profile": "restricted",
                         "duration_secs": 600, "reason": "INC-7", "ssh_key": key});
    // A write with the cookie and no CSRF header (what another site's form would send).
    let forged = s
        .http
        .post(s.url("/api/v1/requests"))
        .header(COOKIE, &cookie)
        .json(&request)
        .send()
        .unwrap();
    assert_eq!(forged.status(), 403);
    let wrong = s
        .http
        .post(s.url("/api/v1/requests"))
        .header(COOKIE, &cookie)
        .header("X-Usher-CSRF", "0".repeat(32))
        .json(&request)
        .send()
        .unwrap();
    assert_eq!(wrong.status(), 403);
    let made = s
        .http
        .post(s.url("/api/v1/requests"))
        .header(COOKIE, &cookie)
        .header("X-Usher-CSRF", &csrf)
        .json(&request)
        .send()
        .unwrap();
    assert_eq!(made.status(), 201, "{}", made.text().unwrap_or_default());
    // Signing out needs the header too, and then clears the cookie.
    let forged_logout = s
        .http
        .post(s.url("/logout"))
        .header(COOKIE, &cookie)
        .send()
        .unwrap();
    assert_eq!(forged_logout.status(), 403);
    let logout = s
        .http
        .post(s.url("/logout"))
        .header(COOKIE, &cookie)
        .header("X-Usher-CSRF", &csrf)
        .send()
        .unwrap();
    assert_eq!(logout.status(), 200);
    let cleared = set_cookie(&logout, "usher_session").expect("the cookie is cleared");
    assert!(
        cleared.starts_with("usher_session=;") && cleared.contains("Max-Age=0"),
        "{cleared}"
    );
}

#[test]
fn a_callback_with_another_state_or_without_its_cookie_is_refused() {
    let s = Service::start();
    let start = s.http.get(s.url("/login")).send().unwrap();
    let login_cookie = set_cookie(&start, "usher_login").unwrap();
    let back = s
        .provider
        .sign_in(&header(&start, "location"), "bob")
        .unwrap();
    let url = reqwest::Url::parse(&back).unwrap();
    let code = url
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.to_string())
        .unwrap();
    // Another state with this sign-in's cookie (an attacker's answer planted in bob's
    // browser): refused, no session.
    let forged = s
        .http
        .get(s.url("/callback"))
        .query(&[("code", code.as_str()), ("state", "not-the-state")])
        .header(
            COOKIE,
            format!("usher_login={}", cookie_value(&login_cookie)),
        )
        .send()
        .unwrap();
    assert_eq!(forged.status(), 400);
    assert!(set_cookie(&forged, "usher_session").is_none());
    // The right answer without the cookie that started it: refused.
    let no_cookie = s.http.get(&back).send().unwrap();
    assert_eq!(no_cookie.status(), 400);
    assert!(set_cookie(&no_cookie, "usher_session").is_none());
    // A cookie someone made up: refused.
    let made_up = s
        .http
        .get(&back)
        .header(COOKIE, "usher_login=eyJhbGciOiJub25lIn0.e30.")
        .send()
        .unwrap();
    assert_eq!(made_up.status(), 400);
    // The provider's error, with the right state, is shown, not acted on.
    let cancel_start = s.http.get(s.url("/login")).send().unwrap();
    let cancel_cookie = set_cookie(&cancel_start, "usher_login").unwrap();
    let cancelled = s
        .provider
        .cancel_sign_in(&header(&cancel_start, "location"))
        .unwrap();
    let answer = s
        .http
        .get(&cancelled)
        .header(
            COOKIE,
            format!("usher_login={}", cookie_value(&cancel_cookie)),
        )
        .send()
        .unwrap();
    assert_eq!(answer.status(), 400);
    assert!(answer.text().unwrap().contains("access_denied"));
    // Both refusals are in the audit trail.
    let dave = s.cli_token("dave");
    let audit: Value = s.bearer_get(&dave, "/api/v1/audit").json().unwrap();
    let refused = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["event"] == "login.refused")
        .count();
    assert!(refused >= 3, "{audit}");
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["event"] == "login" && r["actor"] == "dave"));
}

#[test]
fn the_cli_login_takes_only_id_tokens_issued_to_the_cli_client() {
    let s = Service::start();
    // An ID token the same provider issued to the web client (another client id).
    let pkce = usher_test_support::oidc::Pkce::new();
    let redirect = s.url("/callback");
    let authorize = s.provider.authorize_url(
        WEB_CLIENT_ID,
        &redirect,
        "openid profile groups",
        "st",
        "nonce-1",
        &pkce,
    );
    let back = s.provider.sign_in(&authorize, "alice").unwrap();
    let code = reqwest::Url::parse(&back)
        .unwrap()
        .query_pairs()
        .find(|(k, _)| k == "code")
        .map(|(_, v)| v.to_string())
        .unwrap();
    let tokens = s
        .provider
        .redeem_code(&code, &redirect, &pkce.verifier)
        .unwrap();
    let web_id_token = tokens["id_token"].as_str().unwrap();
    let refused = s
        .http
        .post(s.url("/api/v1/login"))
        .json(&json!({ "id_token": web_id_token }))
        .send()
        .unwrap();
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("another client"),
        "{body}"
    );
    // Tampered: the CLI's own token with its signature broken.
    let cli = s.cli_id_token("alice");
    let mut broken = cli.clone();
    broken.push('A');
    let answer = s
        .http
        .post(s.url("/api/v1/login"))
        .json(&json!({ "id_token": broken }))
        .send()
        .unwrap();
    assert_eq!(answer.status(), 401);
    assert_eq!(
        s.http
            .post(s.url("/api/v1/login"))
            .body("{}")
            .send()
            .unwrap()
            .status(),
        400
    );
    // The real one works, and says who and what.
    let ok: Value = s
        .http
        .post(s.url("/api/v1/login"))
        .json(&json!({ "id_token": cli }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(ok["principal"]["name"], "alice");
    assert_eq!(ok["principal"]["roles"], json!(["requester"]));
    assert!(ok["expires_at"].as_i64().unwrap() > 0);
}

#[test]
fn roles_come_from_groups_and_only_auditors_read_recordings() {
    let s = Service::start();
    let alice = s.cli_token("alice");
    let dave = s.cli_token("dave");
    let erin = s.cli_token("erin");
    // A requester is not an auditor.
    assert_eq!(s.bearer_get(&alice, "/api/v1/sessions").status(), 403);
    assert_eq!(
        s.bearer_get(&alice, "/api/v1/sessions/x1/cast").status(),
        403
    );
    assert_eq!(s.bearer_get(&dave, "/api/v1/sessions").status(), 200);
    assert_eq!(
        s.http
            .get(s.url("/api/v1/sessions"))
            .send()
            .unwrap()
            .status(),
        401
    );
    // erin's only group maps to no role: signed in, allowed nothing.
    let me: Value = s.bearer_get(&erin, "/api/v1/me").json().unwrap();
    assert_eq!(me["name"], "erin");
    assert_eq!(me["groups"], json!(["contractors"]));
    assert_eq!(me["roles"], json!([]));
    assert_eq!(s.bearer_get(&erin, "/api/v1/sessions").status(), 403);
    let key = openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[7; 32]));
    let asked = s
        .http
        .post(s.url("/api/v1/requests"))
        .bearer_auth(&erin)
        .json(
            &json!({"host": "web-1", "login": "jit-erin", "duration_secs": 600,
                      "reason": "x", "ssh_key": key}),
        )
        .send()
        .unwrap();
    assert_eq!(asked.status(), 403);
    // The same through the page's sign-in.
    let session = s.session("erin");
    let me: Value = s
        .http
        .get(s.url("/api/v1/me"))
        .header(COOKIE, format!("usher_session={session}"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(me["roles"], json!([]));
}

#[test]
fn sign_in_attempts_are_rate_limited_per_address() {
    let s = Service::start();
    let statuses: Vec<u16> = (0..40)
        .map(|_| {
            s.http
                .post(s.url("/api/v1/login"))
                .json(&json!({"id_token": "not.a.jwt"}))
                .send()
                .unwrap()
                .status()
                .as_u16()
        })
        .collect();
    assert!(statuses.iter().take(10).all(|s| *s == 401), "{statuses:?}");
    assert!(statuses.contains(&429), "{statuses:?}");
    assert_eq!(s.http.get(s.url("/login")).send().unwrap().status(), 429);
}

/// What a page element shows: `selector`'s text, or "" when it is not there.
fn shown(selector: &str) -> String {
    format!(
        "const e = document.querySelector({}); return e ? e.textContent : ''",
        serde_json::to_string(selector).unwrap()
    )
}

#[test]
fn in_chromium_bob_approves_the_replay_shows_who_and_why_alice_revokes_carol_denies() {
    let s = Service::start();
    let alice = s.cli_token("alice");
    let request = s.alice_requests(&alice, "INC-1234: the disk is full");
    let id = request["id"].as_str().unwrap().to_string();

    let browser = Browser::start();
    // Through the provider's own sign-in page, and back.
    sign_in_in_browser(&browser, &s, "bob");
    let url = browser.js("return location.href");
    assert_eq!(
        url,
        json!(s.url("/")),
        "no code, state or token left in the address"
    );
    // The session cookie is not readable by script.
    assert_eq!(browser.js("return document.cookie"), json!(""));
    let row = format!("#pending tr[data-id='{id}']");
    browser.wait_for(
        "alice's request among the pending",
        &shown(&format!("{row} td:nth-child(2)")),
        |v| v == "alice",
    );
    assert_eq!(
        browser.js(&shown(&format!("{row} td:nth-child(7)"))),
        json!("INC-1234: the disk is full")
    );
    browser.js(&format!(
        "document.querySelector(\"{row} input.comment\").value = 'ok, clean /var/log only'; return true"
    ));
    browser.click(&format!("{row} button.approve"));
    browser.wait_for(
        "the approval",
        "return document.body.dataset.reviewed || ''",
        |v| *v == json!(format!("{id} approved")),
    );

    // alice sees it approved, with her grant.
    let approved: Value = s
        .bearer_get(&alice, &format!("/api/v1/requests/{id}"))
        .json()
        .unwrap();
    assert_eq!(approved["state"], "approved", "{approved}");
    assert!(approved["grant"]
        .as_str()
        .is_some_and(|g| g.split('.').count() == 3));
    assert_eq!(approved["reviews"][0]["name"], "bob");
    assert_eq!(approved["reviews"][0]["comment"], "ok, clean /var/log only");
    let grant_id = approved["grant_id"].as_str().unwrap().to_string();

    // A session under that grant reaches the service (the agent's upload protocol), its
    // metadata naming the grant and the request.
    let mut recording = Recording::fake(
        "jit-session-1",
        "web-1",
        approved["requester"]["sub"].as_str().unwrap(),
        "jit-alice",
        &["df -h", "rm /var/log/old.log"],
        "RECORDED-UNDER-THE-GRANT",
        256,
        4 << 10,
    );
    recording.meta["grant"]["jti"] = json!(grant_id);
    recording.meta["grant"]["request"] = json!(id);
    recording.meta["grant"]["iss"] = json!(s.collector.url());
    recording.meta["grant"]["approved_by"] = json!("bob");
    recording.meta["grant"]["reason"] = json!("INC-1234: the disk is full");
    let uploader = s.collector.uploader(&s.web1);
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(uploader.ship(&recording))
        .unwrap();

    // bob (an auditor through sre-leads) replays it: who requested, who approved, why.
    browser.open(&s.url("/?play=jit-session-1"));
    browser.wait_for(
        "the session's request",
        "return document.body.dataset.request || ''",
        |v| *v == json!(id),
    );
    assert_eq!(
        browser.js(&shown("#session-request .requester")),
        json!("alice")
    );
    assert_eq!(
        browser.js(&shown("#session-request .approver")),
        json!("bob")
    );
    assert_eq!(
        browser.js(&shown("#session-request .reason")),
        json!("INC-1234: the disk is full")
    );
    assert_eq!(
        browser.js(&shown("#session-request .comment")),
        json!("ok, clean /var/log only")
    );
    browser.wait_for("the recording in the player", "const p = document.querySelector('#player .ap-player, #player .ap-wrapper'); return p ? p.innerText : ''", |v| {
        v.as_str().unwrap_or("").contains("RECORDED-UNDER-THE-GRANT")
    });
    // The request links to its sessions: the live grants list has the link.
    let link = browser.js(&format!(
        "const a = document.querySelector(\"#grants tr[data-id='{id}'] a.sessions-link\"); return a ? a.getAttribute('href') : ''"
    ));
    assert!(
        link.as_str()
            .is_some_and(|l| l.contains("host=web-1") && l.contains("login=jit-alice")),
        "{link}"
    );

    // Signing out from the page ends it.
    browser.click("#sign-out");
    browser.wait_for(
        "signed out",
        &shown("#signed-out:not([hidden]) #sign-in"),
        |v| v == "Sign in",
    );
    drop(browser);

    // alice, in a browser of her own: her grant is on the page to paste at the password
    // prompt; she asks again through the form, and revokes the first grant.
    let browser = Browser::start();
    sign_in_in_browser(&browser, &s, "alice");
    let mine = format!("#mine tr[data-id='{id}']");
    browser.wait_for(
        "alice's grant on the page",
        &format!(
            "const t = document.querySelector(\"{mine} textarea.grant\"); return t ? t.value : ''"
        ),
        |v| *v == approved["grant"],
    );
    assert_eq!(
        browser.js(&shown(&format!("{mine} td.state"))),
        json!("approved")
    );
    assert_eq!(
        browser.js("return document.getElementById('recordings-section').hidden"),
        json!(true),
        "a requester has no recordings to read"
    );
    let key = openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[8; 32]));
    browser.js(&format!(
        "const f = document.getElementById('request-form');\n\
         f.host.value = 'web-1'; f.login.value = 'jit-alice'; f.profile.value = 'restricted';\n\
         f.duration.value = '30m'; f.reason.value = 'INC-99'; f.ssh_key.value = {};\n\
         return true",
        serde_json::to_string(&key).unwrap()
    ));
    browser.click("#request-submit");
    let second = browser.wait_for(
        "the second request",
        "return document.body.dataset.requested || ''",
        |v| v.as_str().is_some_and(|v| !v.is_empty()),
    );
    let second = second.as_str().unwrap().to_string();
    let asked: Value = s
        .bearer_get(&alice, &format!("/api/v1/requests/{second}"))
        .json()
        .unwrap();
    assert_eq!(asked["state"], "pending", "{asked}");
    assert_eq!(asked["duration_secs"], 1800);
    assert_eq!(asked["reason"], "INC-99");
    browser.click(&format!("{mine} button.revoke"));
    browser.wait_for(
        "the grant revoked",
        &shown(&format!("{mine} td.state")),
        |v| v == "revoked",
    );
    let revoked: Value = s
        .bearer_get(&alice, &format!("/api/v1/requests/{id}"))
        .json()
        .unwrap();
    assert_eq!(revoked["state"], "revoked", "{revoked}");
    assert_eq!(revoked["revoked"]["by"]["name"], "alice");
    drop(browser);

    // carol denies the second request from the page, saying why.
    let browser = Browser::start();
    sign_in_in_browser(&browser, &s, "carol");
    let row = format!("#pending tr[data-id='{second}']");
    browser.wait_for(
        "the second request among the pending",
        &shown(&format!("{row} td:nth-child(7)")),
        |v| v == "INC-99",
    );
    browser.js(&format!(
        "document.querySelector(\"{row} input.comment\").value = 'not during the freeze'; return true"
    ));
    browser.click(&format!("{row} button.deny"));
    browser.wait_for(
        "the denial",
        "return document.body.dataset.reviewed || ''",
        |v| *v == json!(format!("{second} denied")),
    );
    let denied: Value = s
        .bearer_get(&alice, &format!("/api/v1/requests/{second}"))
        .json()
        .unwrap();
    assert_eq!(denied["state"], "denied", "{denied}");
    assert_eq!(denied["reviews"][0]["name"], "carol");
    assert_eq!(denied["reviews"][0]["comment"], "not during the freeze");
    assert!(denied.get("grant").is_none(), "{denied}");
}

/// Signs `username` in on the page through the provider's own sign-in page.
fn sign_in_in_browser(browser: &Browser, s: &Service, username: &str) {
    browser.open(&s.url("/"));
    browser.wait_for(
        "the sign-in link",
        &shown("#signed-out:not([hidden]) #sign-in"),
        |v| v == "Sign in",
    );
    browser.click("#sign-in");
    browser.wait_for("the provider's sign-in page", "return location.href", |v| {
        v.as_str().is_some_and(|u| u.contains("/interaction/"))
    });
    browser.js(&format!(
        "document.getElementById('username').value = {}; return true",
        serde_json::to_string(username).unwrap()
    ));
    browser.click("#sign-in");
    browser.wait_for(
        &format!("{username} signed in"),
        "return document.body.dataset.me || ''",
        |v| v == username,
    );
}
