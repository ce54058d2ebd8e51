//! The people's side of the service: signing in with OpenID Connect (`signin`, `oidc`) and
//! the page (`/`, its script and style), which does everything else through the JSON API
//! with the session cookie and the CSRF header.
//!
//! Every HTML answer carries a Content-Security-Policy without inline script: the page's
//! code is `/web/app.js`, and the CSRF token reaches it as a `<meta>` tag, rendered only
//! for a signed-in person.

pub mod oidc;
pub mod signin;

use crate::api::App;
use crate::auth;
use crate::config::OidcConfig;
use crate::workflow::issuer::Issuer;
use crate::workflow::ratelimit::RateLimit;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub type Shared = Arc<App>;

/// Sign-in attempts per client address (`/login`, `/callback` and `/api/v1/login`
/// together): 20 at once, then one every 2 s.
const SIGN_IN_BURST: u32 = 20;
const SIGN_INS_PER_SECOND: f64 = 0.5;
/// After a failed discovery, the provider is asked again at most this often.
const DISCOVERY_RETRY: Duration = Duration::from_secs(5);

const INDEX_HTML: &str = include_str!("../../web/index.html");
const APP_JS: &str = include_str!("../../web/app.js");
const APP_CSS: &str = include_str!("../../web/app.css");
/// Where the CSRF meta tag goes in `index.html`.
const CSRF_SLOT: &str = "<!-- usher:csrf -->";

/// The page's script is a file, never inline; asciinema-player compiles its terminal
/// emulator from WebAssembly and sets style attributes.
pub const CONTENT_SECURITY_POLICY: &str =
    "default-src 'none'; script-src 'self' 'wasm-unsafe-eval'; \
     style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; \
     connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// What the sign-in keeps between requests: the discovered provider and the limiter.
pub struct Web {
    provider: tokio::sync::Mutex<ProviderSlot>,
    pub limiter: RateLimit,
}

#[derive(Default)]
struct ProviderSlot {
    provider: Option<Arc<oidc::Provider>>,
    last_failure: Option<std::time::Instant>,
}

impl Web {
    pub fn new() -> Web {
        Web {
            provider: tokio::sync::Mutex::new(ProviderSlot::default()),
            limiter: RateLimit::new(SIGN_IN_BURST, SIGN_INS_PER_SECOND),
        }
    }

    /// The provider, discovered on first use (so the service starts while the provider is
    /// down) and kept.
    pub async fn provider(
        &self,
        config: &OidcConfig,
    ) -> Result<Arc<oidc::Provider>, oidc::OidcError> {
        let mut slot = self.provider.lock().await;
        if let Some(p) = &slot.provider {
            return Ok(p.clone());
        }
        if slot
            .last_failure
            .is_some_and(|at| at.elapsed() < DISCOVERY_RETRY)
        {
            return Err(oidc::OidcError::Unreachable(
                "the last discovery failed a moment ago".into(),
            ));
        }
        let http = oidc::http_client(config.ca.as_deref())?;
        match oidc::Provider::discover(&config.issuer, config.ca.as_deref(), http).await {
            Ok(p) => {
                let p = Arc::new(p);
                slot.provider = Some(p.clone());
                Ok(p)
            }
            Err(e) => {
                slot.last_failure = Some(std::time::Instant::now());
                Err(e)
            }
        }
    }
}

impl Default for Web {
    fn default() -> Self {
        Web::new()
    }
}

/// The page and sign-in routes, for the service's router to merge.
pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/", get(page))
        .route("/web/app.js", get(script))
        .route("/web/app.css", get(style))
        .route("/login", get(signin::login))
        .route("/callback", get(signin::callback))
        .route("/logout", post(signin::logout))
        .route("/api/v1/login/config", get(signin::login_config))
        .route("/api/v1/login", post(signin::login_with_id_token))
        .route("/api/v1/me", get(signin::me))
        .layer(Extension(Arc::new(Web::new())))
}

/// The service's issuer: it signs API tokens and the sign-in cookie.
pub(crate) fn issuer(app: &App) -> &Issuer {
    &app.workflow.issuer
}

/// Records a sign-in event in the audit trail; a failure to record is logged (the
/// sign-in's answer does not wait on it).
pub(crate) async fn audit(app: &App, event: &'static str, actor: &str, detail: serde_json::Value) {
    let now = crate::workflow::now();
    if let Err(e) = app.workflow.record(event, actor, None, detail, now).await {
        log::error!(target: "usher", "audit {event} by {actor}: {e}");
    }
}

/// The client's address, when the server was started with connection info.
pub(crate) fn client_ip(extensions: &axum::http::Extensions) -> Option<IpAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip())
}

pub(crate) fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The headers every HTML answer carries.
fn protect(headers: &mut HeaderMap) {
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

/// A small HTML page (sign-in answers).
pub(crate) fn html_page(status: StatusCode, title: &str, body: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">{refresh}<title>{t}</title>\
         <link rel=\"stylesheet\" href=\"/web/app.css\"></head><body>{body}</body></html>",
        refresh = if status == StatusCode::OK {
            "<meta http-equiv=\"refresh\" content=\"0; url=/\">"
        } else {
            ""
        },
        t = escape_html(title),
    );
    let mut response = (
        status,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response();
    protect(response.headers_mut());
    response
}

/// An API refusal, `{"code", "error"}` as everywhere in the API.
pub(crate) fn json_error(status: StatusCode, code: &str, error: &str) -> Response {
    (
        status,
        axum::Json(serde_json::json!({"code": code, "error": error})),
    )
        .into_response()
}

/// `GET /`: the page, with the CSRF token when the visitor is signed in.
async fn page(
    axum::extract::State(app): axum::extract::State<Shared>,
    headers: HeaderMap,
) -> Response {
    let now = crate::workflow::now();
    let csrf = auth::cookie(&headers, auth::SESSION_COOKIE)
        .filter(|token| issuer(&app).principal(token, now).is_ok())
        .map(auth::csrf_token);
    let html = match csrf {
        Some(t) => INDEX_HTML.replacen(
            CSRF_SLOT,
            &format!("<meta name=\"usher-csrf\" content=\"{}\">", escape_html(&t)),
            1,
        ),
        None => INDEX_HTML.to_string(),
    };
    let mut response = ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], html).into_response();
    protect(response.headers_mut());
    response
}

async fn script() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_JS,
    )
        .into_response()
}

async fn style() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        APP_CSS,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_is_escaped_and_the_page_has_its_csrf_slot() {
        assert_eq!(
            escape_html("<a href=\"x\">'&"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;"
        );
        assert!(INDEX_HTML.contains(CSRF_SLOT));
        assert!(
            !INDEX_HTML.contains("<script>"),
            "no inline script in the page"
        );
        let script_src = CONTENT_SECURITY_POLICY
            .split(';')
            .find(|d| d.trim().starts_with("script-src"))
            .unwrap();
        assert!(!script_src.contains("unsafe-inline"), "{script_src}");
    }
}
