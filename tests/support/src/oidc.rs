//! A real OpenID provider for the tests: the npm `oidc-provider` package under node
//! (tests/support/oidc/provider.mjs), on HTTPS on a loopback port with a certificate from a
//! [`TestCa`], and helpers that play the browser and the workload against it.
//!
//! What it knows, from [`OidcOptions`]:
//! - people ([`Account`]): alice, bob, carol and dave by default, each with a `sub` that is
//!   not their name, `preferred_username`, `email` and `groups` (in ID tokens whenever
//!   `openid` is asked for, and in the `groups` scope);
//! - the service's web client [`WEB_CLIENT_ID`] (confidential, `client_secret_basic`,
//!   authorization code with or without PKCE, redirect URIs from the test);
//! - the CLI's public client [`CLI_CLIENT_ID`] (device authorization grant, and the
//!   authorization code with a loopback redirect);
//! - workloads ([`Workload`]): `client_credentials` clients whose access tokens are JWTs
//!   (`typ: JWT`) for the audience asked for (`resource`), carrying GitHub Actions-like
//!   claims, with a lifetime of their own.
//!
//! The pages a browser goes through (plain HTML forms, stable ids):
//! - sign-in, `/interaction/<uid>`: `form#login` with `input[name=username]#username` and
//!   `button#sign-in`; `form#abort` with `button#abort-button` cancels (the client gets
//!   `error=access_denied`). Any user name of an account signs in, no password; an unknown
//!   one is refused (403, `p#error`). There is no consent page: every client is first-party.
//! - device, `/device`: `form#device-code` with `input[name=user_code]#user_code` and
//!   `button#device-continue`; then `form#device-confirm` with
//!   `button#device-confirm-continue` (or `button#device-abort`); then the sign-in page;
//!   then `p#success`.
//! - errors: `p.error`.

use crate::ca::{CaError, TestCa};
use crate::ports::free_port;
use crate::wait::{poll_until, TimedOut};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use reqwest::blocking::{Client, Response};
use reqwest::{StatusCode, Url};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The service's confidential web client.
pub const WEB_CLIENT_ID: &str = "usher-web";
pub const WEB_CLIENT_SECRET: &str = "usher-web-client-secret";
/// The CLI's public client (no secret).
pub const CLI_CLIENT_ID: &str = "usher-cli";

/// How long the provider gets to answer discovery after node starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the first node gets before it is replaced by a second.
const FIRST_TRY: Duration = Duration::from_secs(10);
/// How many pages one scripted sign-in may go through before it is called a loop.
const MAX_PAGES: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the test CA: {0}")]
    Ca(#[from] CaError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the npm oidc-provider package is not installed (looked in {looked_in:?}): run `cargo xtask setup`"
    )]
    NotInstalled { looked_in: Vec<PathBuf> },
    #[error("node does not run ({0}): `cargo xtask setup` installs it")]
    NoNode(std::io::Error),
    #[error("the provider exited ({status}); its log, {log}:\n{log_text}")]
    Exited {
        status: std::process::ExitStatus,
        log: PathBuf,
        log_text: String,
    },
    #[error("the provider did not answer discovery ({source}); its log, {log}:\n{log_text}")]
    NotReady {
        source: TimedOut,
        log: PathBuf,
        log_text: String,
    },
    #[error("HTTP to the provider: {0}")]
    Http(#[from] reqwest::Error),
    #[error("{url} answered {status}: {body}")]
    Status {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("the provider refused to sign in {username}: {page}")]
    UnknownUser { username: String, page: String },
    #[error("the provider refused the user code: {page}")]
    UserCodeRefused { page: String },
    #[error("the sign-in ended on an unexpected page {url} ({status}): {body}")]
    UnexpectedPage {
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("the sign-in went through more than {MAX_PAGES} pages")]
    TooManyPages,
    #[error("{what} is missing from the provider's answer: {answer}")]
    Missing { what: &'static str, answer: String },
}

/// The algorithm of the provider's signing key (ID tokens and workload tokens alike).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SigningAlg {
    RS256,
    ES256,
}

impl SigningAlg {
    fn name(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "RS256",
            SigningAlg::ES256 => "ES256",
        }
    }
}

/// A person who can sign in, by `username` (what the sign-in page asks for).
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    pub username: String,
    /// Stable and unlike the name, so code that confuses the two fails. Two accounts may
    /// share one (the same person under another name).
    pub sub: String,
    pub email: String,
    pub groups: Vec<String>,
}

impl Account {
    /// `username` in `groups`, with the `sub` [`default_sub`] gives and
    /// `username@example.test`.
    pub fn new(username: &str, groups: &[&str]) -> Account {
        Account {
            username: username.to_string(),
            sub: default_sub(username),
            email: format!("{username}@example.test"),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    pub fn with_sub(mut self, sub: &str) -> Account {
        self.sub = sub.to_string();
        self
    }
}

/// The `sub` an [`Account::new`] gets: `user-<16 hex digits of a hash of the name>`, stable
/// across runs.
pub fn default_sub(username: &str) -> String {
    // FNV-1a: stable across Rust releases, unlike std's hasher.
    let hash = username.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    format!("user-{hash:016x}")
}

/// alice ["eng"], bob ["sre-leads", "eng"], carol ["sre-leads"], dave ["auditors"].
pub fn default_accounts() -> Vec<Account> {
    vec![
        Account::new("alice", &["eng"]),
        Account::new("bob", &["sre-leads", "eng"]),
        Account::new("carol", &["sre-leads"]),
        Account::new("dave", &["auditors"]),
    ]
}

/// A `client_credentials` client whose tokens stand for a CI job or an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct Workload {
    pub client_id: String,
    pub client_secret: String,
    /// Put into every token it gets, over the provider's own (so `sub` here wins).
    pub claims: serde_json::Map<String, Value>,
    /// How long its tokens live.
    pub token_ttl: Duration,
    /// The `typ` header of its tokens: "JWT" like GitHub's, or "at+jwt".
    pub typ: String,
}

impl Workload {
    /// A workload with exactly `claims` (an object).
    pub fn new(client_id: &str, claims: Value) -> Workload {
        Workload {
            client_id: client_id.to_string(),
            client_secret: format!("{client_id}-secret"),
            claims: match claims {
                Value::Object(map) => map,
                _ => serde_json::Map::new(),
            },
            token_ttl: Duration::from_secs(300),
            typ: "JWT".to_string(),
        }
    }

    /// A GitHub Actions job of `repository` (e.g. "acme/web") on `git_ref` (e.g.
    /// "refs/heads/main"): `repository`, `repository_id`, `repository_owner`, `ref`,
    /// `workflow`, `event_name`, `environment` when given, and `sub`
    /// `repo:acme/web:ref:refs/heads/main` (`repo:acme/web:environment:prod` with an
    /// environment, as GitHub does).
    pub fn github_actions(
        client_id: &str,
        repository: &str,
        repository_id: u64,
        git_ref: &str,
        workflow: &str,
        environment: Option<&str>,
    ) -> Workload {
        let owner = repository.split('/').next().unwrap_or(repository);
        let sub = match environment {
            Some(env) => format!("repo:{repository}:environment:{env}"),
            None => format!("repo:{repository}:ref:{git_ref}"),
        };
        let mut claims = json!({
            "sub": sub,
            "repository": repository,
            "repository_id": repository_id.to_string(),
            "repository_owner": owner,
            "ref": git_ref,
            "workflow": workflow,
            "event_name": "push",
        });
        if let Some(env) = environment {
            claims["environment"] = json!(env);
        }
        Workload::new(client_id, claims)
    }

    pub fn with_ttl(mut self, ttl: Duration) -> Workload {
        self.token_ttl = ttl;
        self
    }

    pub fn with_claim(mut self, name: &str, value: Value) -> Workload {
        self.claims.insert(name.to_string(), value);
        self
    }
}

/// What the provider is started with.
#[derive(Debug, Clone)]
pub struct OidcOptions {
    pub accounts: Vec<Account>,
    /// Where the web client may be sent back to (the service's callback).
    pub web_redirect_uris: Vec<String>,
    pub web_post_logout_redirect_uris: Vec<String>,
    /// How the web client authenticates at the token endpoint.
    pub web_client_auth: ClientAuth,
    /// Where the CLI client may be sent back to; loopback `http://127.0.0.1/...` URIs
    /// match any port (RFC 8252).
    pub cli_redirect_uris: Vec<String>,
    pub workloads: Vec<Workload>,
    pub alg: SigningAlg,
    pub id_token_ttl: Duration,
}

impl Default for OidcOptions {
    /// The default accounts, no workload, RS256, the web client allowed back to
    /// `https://127.0.0.1/callback` only (set `web_redirect_uris` to the service's).
    fn default() -> OidcOptions {
        OidcOptions {
            accounts: default_accounts(),
            web_redirect_uris: vec!["https://127.0.0.1/callback".to_string()],
            web_post_logout_redirect_uris: Vec::new(),
            web_client_auth: ClientAuth::SecretBasic,
            cli_redirect_uris: vec!["http://127.0.0.1/callback".to_string()],
            workloads: Vec::new(),
            alg: SigningAlg::RS256,
            id_token_ttl: Duration::from_secs(3600),
        }
    }
}

/// A confidential client's authentication at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// `client_secret_basic`: HTTP Basic with the id and secret.
    SecretBasic,
    /// `client_secret_post`: `client_id` and `client_secret` in the form.
    SecretPost,
}

impl ClientAuth {
    fn name(self) -> &'static str {
        match self {
            ClientAuth::SecretBasic => "client_secret_basic",
            ClientAuth::SecretPost => "client_secret_post",
        }
    }
}

/// What `rotate_keys` does with the keys published before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OldKeys {
    /// Still published, after the new one: tokens they signed still verify.
    Keep,
    /// Gone from the JWKS.
    Drop,
}

/// A PKCE pair (S256).
#[derive(Debug, Clone)]
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        use sha2::Digest;
        let verifier = random_token();
        let challenge = URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()));
        Pkce {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// 32 random bytes, base64url: for states, nonces and PKCE verifiers.
pub fn random_token() -> String {
    let mut bytes = [0u8; 32];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .expect("/dev/urandom is readable");
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The provider: node running provider.mjs in a directory of its own (CA, config, keys,
/// log). Dropping it kills node and removes the directory (kept, with the log printed,
/// when the test is failing).
pub struct OidcProvider {
    dir: PathBuf,
    port: u16,
    ca: TestCa,
    config: PathBuf,
    log: PathBuf,
    modules: PathBuf,
    web_client_auth: ClientAuth,
    alg: SigningAlg,
    child: Option<Child>,
}

impl OidcProvider {
    /// Starts it on a free port and waits (bounded) until discovery answers.
    pub fn start(options: OidcOptions) -> Result<OidcProvider, OidcError> {
        let modules = provider_modules()?;
        let port = free_port();
        let dir =
            std::env::temp_dir().join(format!("usher-oidc-test-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| OidcError::Io {
            path: dir.clone(),
            source,
        })?;
        let ca = TestCa::create(&dir)?;
        let config = dir.join("provider.json");
        let issuer = format!("https://127.0.0.1:{port}");
        let text = json!({
            "port": port,
            "issuer": issuer,
            "tls": { "cert": ca.server_cert(), "key": ca.server_key() },
            "keys_file": dir.join("keys.json"),
            "alg": options.alg.name(),
            "cookie_secret": random_token(),
            "id_token_ttl_secs": options.id_token_ttl.as_secs().max(1),
            "accounts": options.accounts.iter().map(|a| json!({
                "username": a.username, "sub": a.sub, "email": a.email, "groups": a.groups,
            })).collect::<Vec<_>>(),
            "web_client": {
                "client_id": WEB_CLIENT_ID,
                "client_secret": WEB_CLIENT_SECRET,
                "redirect_uris": options.web_redirect_uris,
                "post_logout_redirect_uris": options.web_post_logout_redirect_uris,
                "token_endpoint_auth_method": options.web_client_auth.name(),
            },
            "cli_client": { "client_id": CLI_CLIENT_ID, "redirect_uris": options.cli_redirect_uris },
            "workloads": options.workloads.iter().map(|w| json!({
                "client_id": w.client_id,
                "client_secret": w.client_secret,
                "claims": w.claims,
                "token_ttl_secs": w.token_ttl.as_secs().max(1),
                "typ": w.typ,
            })).collect::<Vec<_>>(),
        });
        std::fs::write(&config, text.to_string()).map_err(|source| OidcError::Io {
            path: config.clone(),
            source,
        })?;
        let mut provider = OidcProvider {
            log: dir.join("provider.log"),
            dir,
            port,
            ca,
            config,
            modules,
            web_client_auth: options.web_client_auth,
            alg: options.alg,
            child: None,
        };
        provider.write_keys(&[new_signing_key(options.alg)?])?;
        provider.spawn()?;
        Ok(provider)
    }

    /// `https://127.0.0.1:PORT` (no trailing slash), as in its discovery document.
    pub fn issuer(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA certificate (PEM) its HTTPS certificate chains to: what clients trust.
    pub fn ca_path(&self) -> PathBuf {
        self.ca.ca_pem()
    }

    pub fn ca(&self) -> &TestCa {
        &self.ca
    }

    /// Its log (node's output, every request line, sign-ins): print it when a test fails.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `issuer` + "/jwks".
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.issuer())
    }

    /// The `kid` that signs now (the first of its keys).
    pub fn current_kid(&self) -> Result<String, OidcError> {
        let path = self.keys_file();
        let keys = self.read_keys()?;
        keys.first()
            .and_then(|key| key["kid"].as_str().map(str::to_string))
            .ok_or(OidcError::Missing {
                what: "a signing key",
                answer: path.display().to_string(),
            })
    }

    /// A client that trusts the test CA (and nothing else), keeps cookies, and does not
    /// follow redirects.
    pub fn http_client(&self) -> Result<Client, OidcError> {
        http_client(&self.ca_path())
    }

    /// `http_client`, on the calling thread (already off any async runtime).
    fn client(&self) -> Result<Client, OidcError> {
        http_client_here(&self.ca_path())
    }

    /// The discovery document.
    pub fn discovery(&self) -> Result<Value, OidcError> {
        let url = format!("{}/.well-known/openid-configuration", self.issuer());
        blocking(|| get_json(&self.client()?, &url))
    }

    /// The JWKS it publishes now.
    pub fn jwks(&self) -> Result<Value, OidcError> {
        let url = self.jwks_uri();
        blocking(|| get_json(&self.client()?, &url))
    }

    /// A token for workload `client_id` with audience `audience` (an absolute URI, e.g.
    /// `https://usher.test` or `urn:usher`): a JWT signed by the current key, with the
    /// workload's claims.
    pub fn workload_token(&self, client_id: &str, audience: &str) -> Result<String, OidcError> {
        let secret = self.workload_secret(client_id)?;
        let url = format!("{}/token", self.issuer());
        let answer = blocking(|| {
            let response = self
                .client()?
                .post(&url)
                .form(&[
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id),
                    ("client_secret", secret.as_str()),
                    ("resource", audience),
                ])
                .send()?;
            json_of(response, &url)
        })?;
        answer["access_token"]
            .as_str()
            .map(str::to_string)
            .ok_or(OidcError::Missing {
                what: "access_token",
                answer: answer.to_string(),
            })
    }

    /// An authorization request URL for `client_id` (code flow, S256 PKCE).
    pub fn authorize_url(
        &self,
        client_id: &str,
        redirect_uri: &str,
        scope: &str,
        state: &str,
        nonce: &str,
        pkce: &Pkce,
    ) -> String {
        let mut url = Url::parse(&format!("{}/auth", self.issuer())).expect("the issuer is a URL");
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", scope)
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &pkce.challenge)
            .append_pair("code_challenge_method", "S256");
        url.to_string()
    }

    /// Plays the browser: opens `authorize_url` (the provider's authorization endpoint with
    /// its query), signs in as `username` on the sign-in page, and returns the URL the
    /// provider then sends the browser to (the client's redirect URI with `code` and
    /// `state`, or with `error`), without following it.
    pub fn sign_in(&self, authorize_url: &str, username: &str) -> Result<String, OidcError> {
        blocking(
            || match self.browse(self.client()?, authorize_url, username)? {
                Browsed::LeftProvider(url) => Ok(url),
                Browsed::Page { url, status, body } => {
                    Err(OidcError::UnexpectedPage { url, status, body })
                }
            },
        )
    }

    /// Plays the browser on the sign-in page, but cancels: returns where the provider then
    /// sends the browser (the redirect URI with `error=access_denied`).
    pub fn cancel_sign_in(&self, authorize_url: &str) -> Result<String, OidcError> {
        blocking(|| {
            let client = self.client()?;
            let mut response = client.get(authorize_url).send()?;
            for _ in 0..MAX_PAGES {
                let url = response.url().to_string();
                match self.redirect_target(&response)? {
                    Some(next) if self.is_provider(&next) => {
                        response = client.get(next.as_str()).send()?;
                    }
                    Some(next) => return Ok(next.to_string()),
                    None => {
                        let status = response.status();
                        let body = response.text()?;
                        if !body.contains("id=\"abort\"") {
                            return Err(OidcError::UnexpectedPage { url, status, body });
                        }
                        response = client.post(format!("{url}/abort")).send()?;
                    }
                }
            }
            Err(OidcError::TooManyPages)
        })
    }

    /// Plays the person at the device page: enters `user_code`, confirms, and signs in as
    /// `username`. The CLI polling the token endpoint then gets its tokens.
    pub fn approve_device(&self, user_code: &str, username: &str) -> Result<(), OidcError> {
        blocking(|| {
            let client = self.client()?;
            let device = format!("{}/device", self.issuer());
            let input = text_of(client.get(&device).send()?, &device)?;
            let xsrf = hidden_field(&input, "xsrf").ok_or(OidcError::Missing {
                what: "the device page's xsrf field",
                answer: input.clone(),
            })?;
            let confirm = client
                .post(&device)
                .form(&[("xsrf", xsrf.as_str()), ("user_code", user_code)])
                .send()?;
            let confirm = text_of(confirm, &device)?;
            if !confirm.contains("id=\"device-confirm\"") {
                return Err(OidcError::UserCodeRefused { page: confirm });
            }
            let xsrf = hidden_field(&confirm, "xsrf").ok_or(OidcError::Missing {
                what: "the confirm page's xsrf field",
                answer: confirm.clone(),
            })?;
            let code = hidden_field(&confirm, "user_code").unwrap_or_else(|| user_code.into());
            let confirmed = client
                .post(&device)
                .form(&[
                    ("xsrf", xsrf.as_str()),
                    ("user_code", code.as_str()),
                    ("confirm", "yes"),
                ])
                .send()?;
            let target =
                self.redirect_target(&confirmed)?
                    .ok_or_else(|| OidcError::UnexpectedPage {
                        url: device.clone(),
                        status: confirmed.status(),
                        body: String::new(),
                    })?;
            match self.browse(client, target.as_str(), username)? {
                Browsed::Page { body, .. } if body.contains("id=\"success\"") => Ok(()),
                Browsed::Page { url, status, body } => {
                    Err(OidcError::UnexpectedPage { url, status, body })
                }
                Browsed::LeftProvider(url) => Err(OidcError::UnexpectedPage {
                    url,
                    status: StatusCode::SEE_OTHER,
                    body: String::new(),
                }),
            }
        })
    }

    /// Starts a device authorization for the CLI client: the provider's answer
    /// (`device_code`, `user_code`, `verification_uri`, `interval`, ...).
    pub fn device_authorization(&self, scope: &str) -> Result<Value, OidcError> {
        let url = format!("{}/device/auth", self.issuer());
        blocking(|| {
            let response = self
                .client()?
                .post(&url)
                .form(&[("client_id", CLI_CLIENT_ID), ("scope", scope)])
                .send()?;
            json_of(response, &url)
        })
    }

    /// One poll of the token endpoint for `device_code` (CLI client): the tokens, or
    /// `OidcError::Status` with `authorization_pending` and the like.
    pub fn device_token(&self, device_code: &str) -> Result<Value, OidcError> {
        self.token_request(&[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", device_code),
            ("client_id", CLI_CLIENT_ID),
        ])
    }

    /// Redeems `code` as the web client (with its secret, as `web_client_auth` says): the
    /// token response (`id_token`, `access_token`, ...).
    pub fn redeem_code(
        &self,
        code: &str,
        redirect_uri: &str,
        code_verifier: &str,
    ) -> Result<Value, OidcError> {
        let url = format!("{}/token", self.issuer());
        let basic = self.web_client_auth == ClientAuth::SecretBasic;
        blocking(|| {
            let mut form = vec![
                ("grant_type", "authorization_code"),
                ("code", code),
                ("redirect_uri", redirect_uri),
                ("code_verifier", code_verifier),
            ];
            let mut request = self.client()?.post(&url);
            if basic {
                request = request.basic_auth(WEB_CLIENT_ID, Some(WEB_CLIENT_SECRET));
            } else {
                form.extend([
                    ("client_id", WEB_CLIENT_ID),
                    ("client_secret", WEB_CLIENT_SECRET),
                ]);
            }
            json_of(request.form(&form).send()?, &url)
        })
    }

    /// The userinfo endpoint's answer for `access_token`.
    pub fn userinfo(&self, access_token: &str) -> Result<Value, OidcError> {
        let url = format!("{}/me", self.issuer());
        blocking(|| {
            json_of(
                self.client()?.get(&url).bearer_auth(access_token).send()?,
                &url,
            )
        })
    }

    /// The base64 SHA-256 of its certificate's public key: for Chromium's
    /// `--ignore-certificate-errors-spki-list`, which makes it trust this certificate.
    pub fn certificate_spki_sha256(&self) -> Result<String, OidcError> {
        spki_sha256(&self.ca.server_cert())
    }

    /// Restarts it on the same port with a new signing key (a new `kid`) first in its JWKS.
    pub fn rotate_keys(&mut self, old_keys: OldKeys) -> Result<(), OidcError> {
        let mut keys = match old_keys {
            OldKeys::Keep => self.read_keys()?,
            OldKeys::Drop => Vec::new(),
        };
        keys.insert(0, new_signing_key(self.alg)?);
        self.write_keys(&keys)?;
        self.stop();
        self.spawn()
    }

    fn keys_file(&self) -> PathBuf {
        self.dir.join("keys.json")
    }

    fn read_keys(&self) -> Result<Vec<Value>, OidcError> {
        let path = self.keys_file();
        let text = std::fs::read_to_string(&path).map_err(|source| OidcError::Io {
            path: path.clone(),
            source,
        })?;
        match serde_json::from_str::<Value>(&text) {
            Ok(Value::Array(keys)) => Ok(keys),
            _ => Err(OidcError::Missing {
                what: "the list of signing keys",
                answer: text,
            }),
        }
    }

    fn write_keys(&self, keys: &[Value]) -> Result<(), OidcError> {
        let path = self.keys_file();
        std::fs::write(&path, Value::Array(keys.to_vec()).to_string())
            .map_err(|source| OidcError::Io { path, source })
    }

    /// Kills node: discovery and the JWKS stop answering (connection refused).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again after `stop`, same port, same keys. Sessions, codes and device
    /// codes in flight are gone (the provider keeps them in memory); issued JWTs still
    /// verify.
    pub fn start_again(&mut self) -> Result<(), OidcError> {
        self.stop();
        self.spawn()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Starts node and waits until discovery answers. A node that has not answered in
    /// `FIRST_TRY` is killed and started once more (seen here, rarely, under load: node
    /// stalling before it listens), so a test waits `FIRST_TRY + START_TIMEOUT` at most.
    fn spawn(&mut self) -> Result<(), OidcError> {
        match self.spawn_and_wait(FIRST_TRY) {
            Err(OidcError::NotReady { .. }) => {
                self.stop();
                self.note("provider.mjs did not answer in time: killed, starting it again");
                self.spawn_and_wait(START_TIMEOUT)
            }
            other => other,
        }
    }

    fn note(&self, line: &str) {
        use std::io::Write;
        if let Ok(mut log) = std::fs::OpenOptions::new().append(true).open(&self.log) {
            let _ = writeln!(log, "(harness) {line}");
        }
    }

    fn spawn_and_wait(&mut self, timeout: Duration) -> Result<(), OidcError> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(|source| OidcError::Io {
                path: self.log.clone(),
                source,
            })?;
        let log_err = log.try_clone().map_err(|source| OidcError::Io {
            path: self.log.clone(),
            source,
        })?;
        let mut command = Command::new("node");
        command
            .arg(provider_script())
            .arg(&self.config)
            .env("USHER_OIDC_PROVIDER_MODULES", &self.modules)
            .env("NODE_ENV", "test")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        self.child = Some(command.spawn().map_err(OidcError::NoNode)?);
        let url = format!("{}/.well-known/openid-configuration", self.issuer());
        let ca = self.ca_path();
        let child = &mut self.child;
        let (ready, exited) = blocking(move || {
            let client = http_client_here(&ca)?;
            let mut exited = None;
            let ready = poll_until(
                "the provider's discovery document",
                timeout,
                Duration::from_millis(100),
                || {
                    if let Some(Ok(Some(status))) = child.as_mut().map(|c| c.try_wait()) {
                        exited = Some(status);
                        return Some(());
                    }
                    get_json(&client, &url).ok().map(|_| ())
                },
            );
            Ok::<_, OidcError>((ready, exited))
        })?;
        if let Some(status) = exited {
            self.child = None;
            return Err(OidcError::Exited {
                status,
                log: self.log.clone(),
                log_text: self.log(),
            });
        }
        ready.map_err(|source| OidcError::NotReady {
            source,
            log: self.log.clone(),
            log_text: self.log(),
        })
    }

    fn workload_secret(&self, client_id: &str) -> Result<String, OidcError> {
        let text = std::fs::read_to_string(&self.config).map_err(|source| OidcError::Io {
            path: self.config.clone(),
            source,
        })?;
        let config: Value = serde_json::from_str(&text).unwrap_or_default();
        config["workloads"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|w| w["client_id"] == client_id)
            .and_then(|w| w["client_secret"].as_str().map(str::to_string))
            .ok_or(OidcError::Missing {
                what: "a workload of that client_id",
                answer: client_id.to_string(),
            })
    }

    /// POSTs `form` to the token endpoint as is (no client authentication added): the
    /// JSON answer, or `OidcError::Status` with the provider's error body.
    pub fn token_request(&self, form: &[(&str, &str)]) -> Result<Value, OidcError> {
        let url = format!("{}/token", self.issuer());
        blocking(|| json_of(self.client()?.post(&url).form(form).send()?, &url))
    }

    fn is_provider(&self, url: &Url) -> bool {
        url.scheme() == "https"
            && url.host_str() == Some("127.0.0.1")
            && url.port() == Some(self.port)
    }

    /// Where a redirect response points, resolved against its own URL.
    fn redirect_target(&self, response: &Response) -> Result<Option<Url>, OidcError> {
        if !response.status().is_redirection() {
            return Ok(None);
        }
        let location = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or(OidcError::Missing {
                what: "the redirect's Location",
                answer: response.url().to_string(),
            })?;
        response
            .url()
            .join(location)
            .map(Some)
            .map_err(|_| OidcError::Missing {
                what: "a valid Location",
                answer: location.to_string(),
            })
    }

    /// Follows the provider's redirects from `start`, signing in as `username` on the
    /// sign-in page, until the provider sends the browser elsewhere or shows a page that
    /// is not the sign-in page.
    fn browse(&self, client: Client, start: &str, username: &str) -> Result<Browsed, OidcError> {
        let mut response = client.get(start).send()?;
        let mut signed_in = false;
        for _ in 0..MAX_PAGES {
            let url = response.url().to_string();
            if let Some(next) = self.redirect_target(&response)? {
                if !self.is_provider(&next) {
                    return Ok(Browsed::LeftProvider(next.to_string()));
                }
                response = client.get(next.as_str()).send()?;
                continue;
            }
            let status = response.status();
            let body = response.text()?;
            let login_page = body.contains("id=\"login\"");
            if status == StatusCode::FORBIDDEN && login_page {
                return Err(OidcError::UnknownUser {
                    username: username.to_string(),
                    page: body,
                });
            }
            if !login_page || signed_in {
                return Ok(Browsed::Page { url, status, body });
            }
            signed_in = true;
            response = client
                .post(format!("{url}/login"))
                .form(&[("username", username)])
                .send()?;
        }
        Err(OidcError::TooManyPages)
    }
}

impl Drop for OidcProvider {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "oidc provider dir kept: {}\n--- {} ---\n{}",
                self.dir.display(),
                self.log.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

enum Browsed {
    LeftProvider(String),
    Page {
        url: String,
        status: StatusCode,
        body: String,
    },
}

/// A new private signing key for `alg`, as provider.mjs reads it: `{kid, alg, pem}`.
/// Made with the `openssl` command, like the test CA.
fn new_signing_key(alg: SigningAlg) -> Result<Value, OidcError> {
    let algorithm: &[&str] = match alg {
        SigningAlg::RS256 => &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        SigningAlg::ES256 => &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
    };
    let output = Command::new("openssl")
        .arg("genpkey")
        .args(algorithm)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| OidcError::Ca(CaError::NoOpenssl(source)))?;
    let pem = String::from_utf8_lossy(&output.stdout).into_owned();
    if !output.status.success() || !pem.contains("PRIVATE KEY") {
        return Err(OidcError::Missing {
            what: "a private key from openssl genpkey",
            answer: String::from_utf8_lossy(&output.stderr).into_owned(),
        });
    }
    Ok(json!({ "kid": random_token()[..22].to_string(), "alg": alg.name(), "pem": pem }))
}

/// tests/support/oidc/provider.mjs.
pub fn provider_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("oidc/provider.mjs")
}

/// The node_modules holding oidc-provider: `$USHER_OIDC_PROVIDER_MODULES`, else
/// `$CARGO_TARGET_DIR/oidc-provider/node_modules`, else the workspace's
/// `target/oidc-provider/node_modules` (where `cargo xtask setup` puts it).
pub fn provider_modules() -> Result<PathBuf, OidcError> {
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::var_os("USHER_OIDC_PROVIDER_MODULES") {
        candidates.push(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let dir = PathBuf::from(dir);
        let dir = if dir.is_absolute() {
            dir
        } else {
            crate::workspace_root().join(dir)
        };
        candidates.push(dir.join("oidc-provider/node_modules"));
    }
    candidates.push(crate::workspace_root().join("target/oidc-provider/node_modules"));
    candidates
        .iter()
        .find(|dir| dir.join("oidc-provider/package.json").exists())
        .cloned()
        .ok_or(OidcError::NotInstalled {
            looked_in: candidates,
        })
}

/// A blocking client that trusts `ca` only, keeps cookies and does not follow redirects.
/// Made on a thread of its own; use it off any async runtime's threads.
pub fn http_client(ca: &Path) -> Result<Client, OidcError> {
    blocking(|| http_client_here(ca))
}

fn http_client_here(ca: &Path) -> Result<Client, OidcError> {
    let pem = std::fs::read(ca).map_err(|source| OidcError::Io {
        path: ca.to_path_buf(),
        source,
    })?;
    let certificate = reqwest::Certificate::from_pem(&pem)?;
    Ok(Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(certificate)
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(10))
        .build()?)
}

/// Runs `work` on a thread of its own: reqwest's blocking client must not be made, used or
/// dropped on an async runtime's thread, and a test may well be on one.
fn blocking<T: Send>(work: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| match scope.spawn(work).join() {
        Ok(value) => value,
        Err(panic) => std::panic::resume_unwind(panic),
    })
}

fn get_json(client: &Client, url: &str) -> Result<Value, OidcError> {
    json_of(client.get(url).send()?, url)
}

fn text_of(response: Response, url: &str) -> Result<String, OidcError> {
    let status = response.status();
    let body = response.text()?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(OidcError::Status {
            url: url.to_string(),
            status,
            body,
        })
    }
}

fn json_of(response: Response, url: &str) -> Result<Value, OidcError> {
    let body = text_of(response, url)?;
    serde_json::from_str(&body).map_err(|_| OidcError::Missing {
        what: "a JSON body",
        answer: body,
    })
}

/// The value of `<input type="hidden" name="NAME" value="...">` in a page of the provider.
fn hidden_field(page: &str, name: &str) -> Option<String> {
    let start = page.find(&format!("name=\"{name}\" value=\""))? + name.len() + 15;
    let end = page[start..].find('"')?;
    Some(page[start..start + end].to_string())
}

/// The base64 SHA-256 of the public key (SubjectPublicKeyInfo, DER) of the PEM certificate
/// at `cert`, with the `openssl` command.
pub fn spki_sha256(cert: &Path) -> Result<String, OidcError> {
    use sha2::Digest;
    let io = |source| OidcError::Io {
        path: cert.to_path_buf(),
        source,
    };
    let output = Command::new("openssl")
        .args(["x509", "-noout", "-pubkey", "-in"])
        .arg(cert)
        .output()
        .map_err(io)?;
    let pem = String::from_utf8_lossy(&output.stdout);
    let der: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(der.trim())
        .map_err(|_| OidcError::Missing {
            what: "a public key in the certificate",
            answer: pem.to_string(),
        })?;
    Ok(base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(&der)))
}

/// The query parameter `name` of `url`.
pub fn query_param(url: &str, name: &str) -> Option<String> {
    Url::parse(url)
        .ok()?
        .query_pairs()
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_default_sub_is_stable_and_not_the_name() {
        assert_eq!(default_sub("alice"), default_sub("alice"));
        assert_ne!(default_sub("alice"), default_sub("bob"));
        assert!(!default_sub("alice").contains("alice"));
    }

    #[test]
    fn a_hidden_field_is_found_by_name() {
        let page = r#"<input type="hidden" name="xsrf" value="abc123"/><input type="hidden" name="user_code" value="WXYZ"/>"#;
        assert_eq!(hidden_field(page, "xsrf").as_deref(), Some("abc123"));
        assert_eq!(hidden_field(page, "user_code").as_deref(), Some("WXYZ"));
        assert_eq!(hidden_field(page, "other"), None);
    }

    #[test]
    fn a_github_workload_has_the_claims_github_gives() {
        let w = Workload::github_actions("ci", "acme/web", 42, "refs/heads/main", "deploy", None);
        assert_eq!(w.claims["sub"], "repo:acme/web:ref:refs/heads/main");
        assert_eq!(w.claims["repository_owner"], "acme");
        assert!(!w.claims.contains_key("environment"));
        let w = Workload::github_actions(
            "ci",
            "acme/web",
            42,
            "refs/heads/main",
            "deploy",
            Some("prod"),
        );
        assert_eq!(w.claims["sub"], "repo:acme/web:environment:prod");
        assert_eq!(w.claims["environment"], "prod");
    }
}
