//! The central service's workflow API (collector/WORKFLOW.md), client side: the agent's
//! grant feed asks it as a host, the `usher` CLI as a person. Requests and answers are
//! `usher_wire::jit`'s.

use reqwest::StatusCode;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::time::Duration;
use usher_wire::jit;

/// Why a call to the service (or the identity provider) gave nothing usable.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No answer: down, unreachable, or the TLS handshake failed.
    #[error("{url}: unreachable: {source}")]
    Transport {
        url: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// An answer that says no; `code` and `message` from the service's error body when it
    /// sent one.
    #[error("{}", refusal_text(*status, code.as_deref(), message))]
    Refused {
        status: u16,
        code: Option<String>,
        message: String,
    },
    #[error("{url}: answered {status} with something unreadable: {detail}")]
    Unreadable {
        url: String,
        status: u16,
        detail: String,
    },
    #[error("{}: {source}", path.display())]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate: {source}", path.display())]
    Certificate {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("{url}: only https:// (or http:// on loopback) is allowed")]
    Insecure { url: String },
    #[error("HTTP client: {0}")]
    Build(#[source] reqwest::Error),
}

fn refusal_text(status: u16, code: Option<&str>, message: &str) -> String {
    match (code, message.is_empty()) {
        (_, false) => format!("{message} ({status})"),
        (Some(code), true) => format!("{code} ({status})"),
        (None, true) => format!("refused ({status})"),
    }
}

impl ServiceError {
    /// Whether nobody answered (as opposed to an answer that refuses).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ServiceError::Transport { .. })
    }

    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            ServiceError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The service's error body, `{"code", "error"}`; the code is kept as text, so that a
/// code this side does not know yet still reaches the person.
#[derive(serde::Deserialize)]
struct ErrorBody {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    error: Option<String>,
    /// OAuth's error bodies (the provider's token endpoint).
    #[serde(default)]
    error_description: Option<String>,
}

/// An HTTP client that trusts `ca` (PEM, one or more certificates) besides the built-in
/// roots, and refuses plain HTTP except to a loopback address.
pub fn http_client(ca: Option<&Path>, timeout: Duration) -> Result<reqwest::Client, ServiceError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .connect_timeout(Duration::from_secs(10))
        .timeout(timeout)
        // A redirect would carry the bearer token to wherever it points.
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = ca {
        let pem = std::fs::read(ca).map_err(|source| ServiceError::ReadFile {
            path: ca.to_owned(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|source| {
            ServiceError::Certificate {
                path: ca.to_owned(),
                source,
            }
        })?;
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder.build().map_err(ServiceError::Build)
}

/// Whether `url` may be asked: HTTPS anywhere, plain HTTP only on this machine (a test's
/// identity provider).
pub fn check_scheme(url: &str) -> Result<(), ServiceError> {
    let insecure = || ServiceError::Insecure {
        url: url.to_string(),
    };
    if url.starts_with("https://") {
        return Ok(());
    }
    let rest = url.strip_prefix("http://").ok_or_else(insecure)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .map(|ip| ip.is_loopback())
            .unwrap_or(false);
    if loopback {
        Ok(())
    } else {
        Err(insecure())
    }
}

/// Sends `request` and reads a JSON answer; any status but a success is a refusal.
pub async fn call<T: DeserializeOwned>(
    url: &str,
    request: reqwest::RequestBuilder,
) -> Result<T, ServiceError> {
    let transport = |e: reqwest::Error| ServiceError::Transport {
        url: url.to_string(),
        source: Box::new(e),
    };
    let response = request.send().await.map_err(transport)?;
    let status = response.status();
    let body = response.text().await.map_err(transport)?;
    if !status.is_success() {
        return Err(refusal(status, &body));
    }
    serde_json::from_str(&body).map_err(|e| ServiceError::Unreadable {
        url: url.to_string(),
        status: status.as_u16(),
        detail: format!("{e}: {}", excerpt(&body)),
    })
}

fn refusal(status: StatusCode, body: &str) -> ServiceError {
    match serde_json::from_str::<ErrorBody>(body) {
        Ok(e) => ServiceError::Refused {
            status: status.as_u16(),
            message: e
                .error_description
                .or(e.error.clone().filter(|_| e.code.is_some()))
                .unwrap_or_default(),
            code: e.code.or(e.error),
        },
        Err(_) => ServiceError::Refused {
            status: status.as_u16(),
            code: None,
            message: excerpt(body),
        },
    }
}

/// The start of a body, for an error message.
fn excerpt(body: &str) -> String {
    let mut end = body.len().min(200);
    while !body.is_char_boundary(end) {
        end -= 1;
    }
    body[..end].trim().to_string()
}

/// The service as one host sees it: its grants and their revocations.
pub struct HostClient {
    http: reqwest::Client,
    base: String,
    token: String,
}

impl HostClient {
    /// `wait_secs` is the longest long-poll: the client's timeout leaves room for it.
    pub fn new(
        base: &str,
        token: String,
        ca: Option<&Path>,
        wait_secs: u64,
    ) -> Result<HostClient, ServiceError> {
        check_scheme(base)?;
        Ok(HostClient {
            http: http_client(ca, Duration::from_secs(wait_secs + 20))?,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The grants for this host once the service's revision passes `since`, or the same
    /// picture after `wait_secs` without a change.
    pub async fn grants(&self, since: u64, wait_secs: u64) -> Result<jit::GrantFeed, ServiceError> {
        let url = format!("{}/api/v1/agent/grants", self.base);
        let request = self
            .http
            .get(&url)
            .query(&[("since", since), ("wait", wait_secs)])
            .bearer_auth(&self.token);
        call(&url, request).await
    }
}

/// The service as a signed-in person (or a script with their API token) sees it.
pub struct PersonClient {
    http: reqwest::Client,
    base: String,
    token: Option<String>,
}

/// Longest a person's call may take: the longest `?wait=` the service honours, and room.
const PERSON_TIMEOUT: Duration = Duration::from_secs(60 + 20);

impl PersonClient {
    /// `token`: the API token from `usher login`; `None` before signing in.
    pub fn new(
        base: &str,
        token: Option<String>,
        ca: Option<&Path>,
    ) -> Result<PersonClient, ServiceError> {
        check_scheme(base)?;
        Ok(PersonClient {
            http: http_client(ca, PERSON_TIMEOUT)?,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    /// The same HTTP client, for the identity provider during `usher login`.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }

    async fn get<T: DeserializeOwned>(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ServiceError> {
        let url = self.url(path);
        let mut request = self.http.get(&url).query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        call(&url, request).await
    }

    async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ServiceError> {
        let url = self.url(path);
        let mut request = self.http.post(&url).json(body);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        call(&url, request).await
    }

    pub async fn login_config(&self) -> Result<jit::LoginConfig, ServiceError> {
        self.get("login/config", &[]).await
    }

    /// Trades the provider's ID token for the service's API token.
    pub async fn login(&self, id_token: String) -> Result<jit::ApiToken, ServiceError> {
        self.post("login", &jit::IdToken { id_token }).await
    }

    pub async fn me(&self) -> Result<jit::Principal, ServiceError> {
        self.get("me", &[]).await
    }

    pub async fn create_request(
        &self,
        request: &jit::NewRequest,
    ) -> Result<jit::AccessRequest, ServiceError> {
        self.post("requests", request).await
    }

    pub async fn requests(
        &self,
        pending_only: bool,
    ) -> Result<Vec<jit::AccessRequest>, ServiceError> {
        let query = if pending_only {
            vec![("state", "pending".to_string())]
        } else {
            Vec::new()
        };
        self.get("requests", &query).await
    }

    /// One request; with `wait_secs`, once it is no longer pending or after that long.
    pub async fn request(
        &self,
        id: &str,
        wait_secs: Option<u64>,
    ) -> Result<jit::AccessRequest, ServiceError> {
        let query: Vec<(&str, String)> = wait_secs
            .map(|w| vec![("wait", w.to_string())])
            .unwrap_or_default();
        self.get(&format!("requests/{}", path_segment(id)), &query)
            .await
    }

    pub async fn review(
        &self,
        id: &str,
        review: &jit::Review,
    ) -> Result<jit::AccessRequest, ServiceError> {
        self.post(&format!("requests/{}/review", path_segment(id)), review)
            .await
    }

    pub async fn revoke_grant(
        &self,
        grant_id: &str,
        reason: String,
    ) -> Result<jit::AccessRequest, ServiceError> {
        self.post(
            &format!("grants/{}/revoke", path_segment(grant_id)),
            &jit::RevokeBody { reason },
        )
        .await
    }
}

/// An id as one path segment: anything but unreserved characters is percent-encoded, so
/// an id cannot reach another route (`../`, `?`).
fn path_segment(id: &str) -> String {
    // `.` and `..` alone would be read as the path's own steps.
    let dots_only = id == "." || id == "..";
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || (!dots_only && matches!(b, b'-' | b'_' | b'.' | b'~')) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback() {
        for ok in [
            "https://usher.example:8443",
            "http://127.0.0.1:3000/oidc",
            "http://[::1]:3000",
            "http://localhost:3000",
        ] {
            assert!(check_scheme(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://usher.example",
            "http://127.0.0.1.evil.test/",
            "ftp://127.0.0.1",
            "127.0.0.1",
        ] {
            assert!(
                matches!(check_scheme(bad), Err(ServiceError::Insecure { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn ids_stay_one_path_segment() {
        assert_eq!(path_segment("req-01HX_a.b~"), "req-01HX_a.b~");
        assert_eq!(path_segment("../admin"), "..%2Fadmin");
        assert_eq!(path_segment(".."), "%2E%2E");
        assert_eq!(path_segment("a?b#c d"), "a%3Fb%23c%20d");
    }

    #[test]
    fn refusals_carry_the_services_words_or_the_providers() {
        let e = refusal(
            StatusCode::FORBIDDEN,
            r#"{"code":"forbidden","error":"you cannot approve your own request"}"#,
        );
        assert_eq!(e.status(), Some(403));
        assert!(
            matches!(&e, ServiceError::Refused { code: Some(c), message, .. }
            if c == "forbidden" && message == "you cannot approve your own request")
        );
        let e = refusal(
            StatusCode::BAD_REQUEST,
            r#"{"error":"authorization_pending","error_description":"not yet"}"#,
        );
        assert!(
            matches!(&e, ServiceError::Refused { code: Some(c), message, .. }
            if c == "authorization_pending" && message == "not yet")
        );
        let e = refusal(StatusCode::BAD_REQUEST, r#"{"error":"slow_down"}"#);
        assert!(matches!(&e, ServiceError::Refused { code: Some(c), .. } if c == "slow_down"));
        let e = refusal(StatusCode::BAD_GATEWAY, "<html>bad gateway</html>");
        assert!(
            matches!(&e, ServiceError::Refused { code: None, message, .. }
            if message == "<html>bad gateway</html>")
        );
    }
}
