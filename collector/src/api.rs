//! The HTTP API (see collector/API.md): agents ship with their token; viewers search and
//! replay with theirs.

// A refused request is answered with its Response: the handlers' idiom, on a cold path.
#![allow(clippy::result_large_err)]

use crate::config::Config;
use crate::store::{valid_id, OpenError, ReceivedMeta, Refused, Search, Store, MAX_CHUNK, STREAMS};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::Arc;
use usher_wire::collector::{ErrorCode, Refusal};
use usher_wire::seal::Seal;

pub struct App {
    pub store: Store,
    pub config: Config,
    agents: HashMap<String, (String, ed25519_dalek::VerifyingKey)>,
}

type Shared = Arc<App>;

/// Why the collector cannot start serving its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("agent {host}: {source}")]
    HostKey {
        host: String,
        source: crate::keys::KeyError,
    },
    #[error(transparent)]
    Store(#[from] OpenError),
}

impl App {
    pub fn new(config: Config) -> Result<App, AppError> {
        let mut agents = HashMap::new();
        for a in &config.agents {
            let key = crate::keys::parse_openssh_ed25519(&a.host_key).map_err(|source| {
                AppError::HostKey {
                    host: a.host.clone(),
                    source,
                }
            })?;
            agents.insert(a.token.clone(), (a.host.clone(), key));
        }
        Ok(App {
            store: Store::open(&config)?,
            config,
            agents,
        })
    }
}

/// A refusal's answer: its status, and a body with the code a program decides on and
/// the words a person reads.
fn error(status: StatusCode, code: ErrorCode, msg: impl Into<String>) -> Response {
    let body = Refusal {
        code,
        error: msg.into(),
        next_seq: None,
    };
    (status, Json(body)).into_response()
}

fn refused(r: Refused) -> Response {
    let status = match &r {
        Refused::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refused::Forbidden(_) => StatusCode::FORBIDDEN,
        Refused::NotFound(_) => StatusCode::NOT_FOUND,
        Refused::Tampered(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refused::Gap { .. } | Refused::Rewritten { .. } => StatusCode::CONFLICT,
        Refused::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let error = match &r {
        Refused::Internal(m) => {
            log::error!("internal error: {m}");
            "internal error".to_string()
        }
        other => other.to_string(),
    };
    let body = Refusal {
        code: r.code(),
        error,
        next_seq: r.next_seq(),
    };
    (status, Json(body)).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

/// The host a request speaks for, from its token.
fn agent<'a>(
    app: &'a App,
    headers: &HeaderMap,
) -> Result<&'a (String, ed25519_dalek::VerifyingKey), Response> {
    bearer(headers)
        .and_then(|t| app.agents.get(t))
        .ok_or_else(|| {
            error(
                StatusCode::UNAUTHORIZED,
                ErrorCode::Unauthorized,
                "unknown agent token",
            )
        })
}

fn viewer(app: &App, headers: &HeaderMap, query: &HashMap<String, String>) -> Result<(), Response> {
    let token = bearer(headers).or(query.get("token").map(String::as_str));
    match token {
        Some(t) if app.config.viewer_tokens.iter().any(|v| v == t) => Ok(()),
        _ => Err(error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            "a viewer token is needed",
        )),
    }
}

fn check_ids(id: &str, stream: Option<&str>) -> Result<(), Response> {
    if !valid_id(id) {
        return Err(bad_request("bad session id"));
    }
    if let Some(s) = stream {
        if !STREAMS.contains(&s) {
            return Err(bad_request("unknown stream"));
        }
    }
    Ok(())
}

fn bad_request(msg: impl Into<String>) -> Response {
    error(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, msg)
}

pub fn router(app: Shared) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/assets/{file}", get(asset))
        .route("/api/v1/sessions", get(search))
        .route("/api/v1/sessions/{id}", get(session))
        .route("/api/v1/sessions/{id}/cast", get(cast))
        .route("/api/v1/sessions/{id}/audit", get(audit))
        .route("/api/v1/sessions/{id}/meta", put(put_meta))
        .route("/api/v1/sessions/{id}/seal", post(seal))
        .route("/api/v1/sessions/{id}/streams/{stream}", get(stream_status))
        .route(
            "/api/v1/sessions/{id}/streams/{stream}/chunks/{seq}",
            put(put_chunk),
        )
        .layer(DefaultBodyLimit::max(MAX_CHUNK + 64 * 1024))
        .with_state(app)
}

async fn stream_status(
    State(app): State<Shared>,
    Path((id, stream)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Err(r) = agent(&app, &headers)
        .map(|_| ())
        .and_then(|_| check_ids(&id, Some(&stream)))
    {
        return r;
    }
    match app.store.stream_status(&id, &stream) {
        Ok(s) => Json(s).into_response(),
        Err(e) => refused(e),
    }
}

async fn put_chunk(
    State(app): State<Shared>,
    Path((id, stream, seq)): Path<(String, String, u64)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (host, _) = match agent(&app, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, Some(&stream)) {
        return r;
    }
    let hdr = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(String::from)
    };
    let (Some(prev), Some(hash)) = (hdr("x-usher-prev-hash"), hdr("x-usher-hash")) else {
        return bad_request("X-Usher-Prev-Hash and X-Usher-Hash are required");
    };
    if body.len() > MAX_CHUNK {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            "a chunk is at most 4 MiB",
        );
    }
    match app
        .store
        .put_chunk(host, &id, &stream, seq, &prev, &hash, body)
        .await
    {
        Ok(a) if a.stored => (StatusCode::CREATED, Json(a)).into_response(),
        Ok(a) => Json(a).into_response(),
        Err(e) => refused(e),
    }
}

async fn put_meta(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (host, _) = match agent(&app, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, None) {
        return r;
    }
    let meta = match serde_json::from_slice::<ReceivedMeta>(&body) {
        Ok(m) => m,
        Err(e) => return bad_request(format!("the metadata is not session metadata: {e}")),
    };
    match app.store.put_meta(host, &id, meta).await {
        Ok(()) => Json(serde_json::json!({"ok": true})).into_response(),
        Err(e) => refused(e),
    }
}

async fn seal(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let (host, key) = match agent(&app, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, None) {
        return r;
    }
    let seal = match serde_json::from_slice::<Seal>(&body) {
        Ok(s) => s,
        Err(e) => return bad_request(format!("the seal is not a seal: {e}")),
    };
    match app.store.seal(host, key, &id, &seal).await {
        Ok(()) => Json(serde_json::json!({"ok": true, "status": "complete"})).into_response(),
        Err(e) => refused(e),
    }
}

async fn search(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = viewer(&app, &headers, &q) {
        return r;
    }
    let s = Search {
        sub: q.get("sub").cloned().filter(|v| !v.is_empty()),
        host: q.get("host").cloned().filter(|v| !v.is_empty()),
        login: q.get("login").cloned().filter(|v| !v.is_empty()),
        from: q.get("from").cloned().filter(|v| !v.is_empty()),
        to: q.get("to").cloned().filter(|v| !v.is_empty()),
        command: q.get("command").cloned().filter(|v| !v.is_empty()),
    };
    match app.store.search(&s) {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => refused(e),
    }
}

async fn session(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = viewer(&app, &headers, &q).and_then(|_| check_ids(&id, None)) {
        return r;
    }
    match app.store.session(&id) {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(e),
    }
}

async fn raw_stream(
    app: Shared,
    id: String,
    stream: &str,
    headers: HeaderMap,
    q: HashMap<String, String>,
) -> Response {
    if let Err(r) = viewer(&app, &headers, &q).and_then(|_| check_ids(&id, None)) {
        return r;
    }
    match app.store.stream(&id, stream).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], bytes).into_response(),
        Err(e) => refused(e),
    }
}

async fn cast(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    raw_stream(app, id, "cast", headers, q).await
}

async fn audit(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    raw_stream(app, id, "audit", headers, q).await
}

async fn page() -> Html<&'static str> {
    Html(include_str!("../web/index.html"))
}

async fn asset(State(app): State<Shared>, Path(file): Path<String>) -> Response {
    let allowed = file.starts_with("asciinema-player")
        && (file.ends_with(".js") || file.ends_with(".css"))
        && file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c));
    if !allowed {
        return error(StatusCode::NOT_FOUND, ErrorCode::NotFound, "no such asset");
    }
    let Some(dir) = &app.config.assets_dir else {
        return error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "assets_dir is not configured",
        );
    };
    match tokio::fs::read(dir.join(&file)).await {
        Ok(bytes) => {
            let ct = if file.ends_with(".js") {
                "text/javascript"
            } else {
                "text/css"
            };
            ([(header::CONTENT_TYPE, ct)], bytes).into_response()
        }
        Err(_) => error(
            StatusCode::NOT_FOUND,
            ErrorCode::NotFound,
            "asset missing: run `cargo xtask setup`",
        ),
    }
}
