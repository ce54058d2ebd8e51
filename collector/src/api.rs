//! The HTTP API (see collector/API.md): agents ship with their token; viewers search and
//! replay with theirs.

// A refused request is answered with its Response: the handlers' idiom, on a cold path.
#![allow(clippy::result_large_err)]

use crate::config::Config;
use crate::store::{valid_id, Refused, Search, Store, MAX_CHUNK, STREAMS};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::Arc;

pub struct App {
    pub store: Store,
    pub config: Config,
    agents: HashMap<String, (String, ed25519_dalek::VerifyingKey)>,
}

type Shared = Arc<App>;

impl App {
    pub fn new(config: Config) -> Result<App, String> {
        let mut agents = HashMap::new();
        for a in &config.agents {
            let key = crate::keys::parse_openssh_ed25519(&a.host_key)
                .map_err(|e| format!("agent {}: {e}", a.host))?;
            agents.insert(a.token.clone(), (a.host.clone(), key));
        }
        Ok(App {
            store: Store::open(&config)?,
            config,
            agents,
        })
    }
}

fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"error": msg.into()}))).into_response()
}

fn refused(r: Refused) -> Response {
    match r {
        Refused::BadRequest(m) => error(StatusCode::BAD_REQUEST, m),
        Refused::Forbidden(m) => error(StatusCode::FORBIDDEN, m),
        Refused::NotFound(m) => error(StatusCode::NOT_FOUND, m),
        Refused::Tampered(m) => error(StatusCode::UNPROCESSABLE_ENTITY, format!("tampered: {m}")),
        Refused::Conflict(v) => (StatusCode::CONFLICT, Json(v)).into_response(),
        Refused::Internal(m) => {
            log::error!("internal error: {m}");
            error(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
        }
    }
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
        .ok_or_else(|| error(StatusCode::UNAUTHORIZED, "unknown agent token"))
}

fn viewer(app: &App, headers: &HeaderMap, query: &HashMap<String, String>) -> Result<(), Response> {
    let token = bearer(headers).or(query.get("token").map(String::as_str));
    match token {
        Some(t) if app.config.viewer_tokens.iter().any(|v| v == t) => Ok(()),
        _ => Err(error(StatusCode::UNAUTHORIZED, "a viewer token is needed")),
    }
}

fn check_ids(id: &str, stream: Option<&str>) -> Result<(), Response> {
    if !valid_id(id) {
        return Err(error(StatusCode::BAD_REQUEST, "bad session id"));
    }
    if let Some(s) = stream {
        if !STREAMS.contains(&s) {
            return Err(error(StatusCode::BAD_REQUEST, "unknown stream"));
        }
    }
    Ok(())
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
        return error(
            StatusCode::BAD_REQUEST,
            "X-Usher-Prev-Hash and X-Usher-Hash are required",
        );
    };
    if body.len() > MAX_CHUNK {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "a chunk is at most 4 MiB");
    }
    match app
        .store
        .put_chunk(host, &id, &stream, seq, &prev, &hash, body)
        .await
    {
        Ok(v) if v["stored"] == true => (StatusCode::CREATED, Json(v)).into_response(),
        Ok(v) => Json(v).into_response(),
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
    let Ok(meta) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the metadata is not JSON");
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
    let Ok(seal) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the seal is not JSON");
    };
    match app.store.seal(host, key, &id, seal).await {
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
        return error(StatusCode::NOT_FOUND, "no such asset");
    }
    let Some(dir) = &app.config.assets_dir else {
        return error(StatusCode::NOT_FOUND, "assets_dir is not configured");
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
            "asset missing: run `cargo xtask setup`",
        ),
    }
}
