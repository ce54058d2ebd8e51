//! The HTTP API (see collector/API.md and WORKFLOW.md): agents ship with their token;
//! auditors search and replay with their API token; the workflow's routes are in
//! `workflow/routes.rs`.

// A refused request is answered with its Response: the handlers' idiom, on a cold path.
#![allow(clippy::result_large_err)]

use crate::auth;
use crate::config::Config;
use crate::store::{
    valid_id, ChunkBody, OpenError, ReceivedMeta, Refused, Search, Store, Writer, MAX_CHUNK,
    STREAMS,
};
use crate::workflow::ratelimit::RateLimit;
use crate::workflow::{Policy, Workflow, WorkflowError};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::Arc;
use usher_wire::collector::{ErrorCode, Refusal};
use usher_wire::jit::{Principal, Role};
use usher_wire::seal::Seal;

pub struct App {
    pub store: Store,
    /// The configuration the service started with (the listen address, TLS and storage are
    /// not reloadable; the workflow's policy is, through `reload`).
    pub config: Config,
    agents: HashMap<String, (String, ed25519_dalek::VerifyingKey)>,
    /// The access workflow: its state store, issuer key and (reloadable) policy.
    pub workflow: Arc<Workflow>,
    /// New requests per principal: 10 at once, then one every 6 s.
    pub request_limit: RateLimit,
    /// Token exchanges per client address: 30 at once, then 10 a second.
    pub exchange_limit: RateLimit,
    /// The workload issuers the `[[workload]]` rules name, with their key caches
    /// (replaced on reload).
    pub trusted: arc_swap::ArcSwap<usher_trust::TrustedIssuers>,
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
    #[error("workflow state: {0}")]
    Workflow(#[from] WorkflowError),
    #[error("configuration: {0}")]
    Config(String),
}

/// How often an instance reads the shared revision counter (so long-polls notice what
/// other instances changed), and how often it marks what ran out as expired.
const REVISION_POLL: std::time::Duration = std::time::Duration::from_millis(250);
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(2);

fn agent_map(
    config: &Config,
) -> Result<HashMap<String, (String, ed25519_dalek::VerifyingKey)>, AppError> {
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
    Ok(agents)
}

impl App {
    /// Opens the recordings store and the workflow's state, and starts the workflow's
    /// background work (revision polling, expiry, webhooks). Needs a tokio runtime.
    pub async fn new(config: Config) -> Result<App, AppError> {
        config.check().map_err(AppError::Config)?;
        let agents = agent_map(&config)?;
        let trusted = workload_issuers(&config)?;
        let workflow = Arc::new(Workflow::open(&config).await?);
        crate::workflow::webhook::spawn(&workflow, config.public_url(), None);
        spawn_background(&workflow);
        let request_limit = RateLimit::new(
            config.limits.requests_burst,
            config.limits.requests_per_minute / 60.0,
        );
        let exchange_limit = RateLimit::new(
            config.limits.exchanges_burst,
            config.limits.exchanges_per_second,
        );
        Ok(App {
            store: Store::open(&config)?,
            config,
            agents,
            workflow,
            request_limit,
            exchange_limit,
            trusted: arc_swap::ArcSwap::from_pointee(trusted),
        })
    }

    /// Takes a changed configuration's request policy, roles, webhooks, workload rules and
    /// hosts' labels. The listen address, TLS, storage, state store and agent tokens stay
    /// as they were started.
    pub fn reload(&self, config: Config) -> Result<(), AppError> {
        config.check().map_err(AppError::Config)?;
        let trusted = workload_issuers(&config)?;
        self.trusted.store(Arc::new(trusted));
        self.workflow.reload(Policy::from_config(&config));
        log::info!(target: "usher", "workflow policy reloaded");
        Ok(())
    }
}

/// Key caches for the issuers the workload rules name, refreshing in the background (each
/// refresher ends when its cache is dropped, e.g. replaced by a reload). Needs a runtime.
fn workload_issuers(config: &Config) -> Result<usher_trust::TrustedIssuers, AppError> {
    let configs = usher_trust::workload_issuers(&config.workloads, &config.workload_issuers);
    let trusted = usher_trust::TrustedIssuers::from_configs(&configs)
        .map_err(|e| AppError::Config(format!("workload issuers: {e}")))?;
    trusted.spawn_refreshers();
    Ok(trusted)
}

fn spawn_background(workflow: &Arc<Workflow>) {
    let weak = Arc::downgrade(workflow);
    tokio::spawn(async move {
        let mut last_sweep = std::time::Instant::now();
        loop {
            tokio::time::sleep(REVISION_POLL).await;
            let Some(workflow) = weak.upgrade() else {
                return;
            };
            if let Err(e) = workflow.poll_revision().await {
                log::warn!(target: "usher", "state store: {e}");
            }
            if last_sweep.elapsed() >= EXPIRY_SWEEP {
                last_sweep = std::time::Instant::now();
                if let Err(e) = workflow.expire_due(crate::workflow::now()).await {
                    log::warn!(target: "usher", "expiry: {e}");
                }
                if let Err(e) = workflow.expire_due_commands(crate::workflow::now()).await {
                    log::warn!(target: "usher", "expiry of commands: {e}");
                }
            }
        }
    });
}

/// A refusal's answer: its status, and a body with the code a program decides on and
/// the words a person reads.
pub(crate) fn error(status: StatusCode, code: ErrorCode, msg: impl Into<String>) -> Response {
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
pub(crate) fn agent<'a>(
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

/// Who makes an agent's write: its token's host, the token's fingerprint, the address.
/// (Signatures are not checked yet: see FLEET.md.)
fn writer<'a>(
    app: &'a App,
    headers: &HeaderMap,
    extensions: &axum::http::Extensions,
) -> Result<(Writer, &'a ed25519_dalek::VerifyingKey), Response> {
    let (host, key) = agent(app, headers)?;
    let token = bearer(headers).unwrap_or_default();
    Ok((
        Writer {
            host: host.clone(),
            token_id: Writer::token_id(token),
            addr: extensions
                .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
                .map(|c| c.0),
            signed: false,
        },
        key,
    ))
}

/// The person behind a request, with the roles the current configuration gives them.
pub(crate) fn principal(
    app: &App,
    headers: &HeaderMap,
    method: &Method,
) -> Result<Principal, Response> {
    auth::principal(
        &app.workflow.issuer,
        headers,
        method,
        crate::workflow::now(),
    )
    .map(|p| app.workflow.effective(p))
    .map_err(|e| match e {
        // Signed in, but the write did not come from the page: refused, not unknown.
        auth::AuthError::Csrf => error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, e.to_string()),
        _ => error(
            StatusCode::UNAUTHORIZED,
            ErrorCode::Unauthorized,
            e.to_string(),
        ),
    })
}

/// Reading recordings needs the auditor role (admins hold it too).
fn auditor(app: &App, headers: &HeaderMap) -> Result<Principal, Response> {
    let p = principal(app, headers, &Method::GET)?;
    auth::require(&p, Role::Auditor)
        .map_err(|e| error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, e.to_string()))?;
    Ok(p)
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
    crate::workflow::routes::routes()
        .merge(crate::web::routes())
        .route("/assets/{file}", get(asset))
        .route("/api/v1/sessions", get(search))
        .route("/api/v1/sessions/{id}", get(session))
        .route("/api/v1/sessions/{id}/cast", get(cast))
        .route("/api/v1/sessions/{id}/audit", get(audit))
        .route("/api/v1/sessions/{id}/desktop", get(desktop))
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
    let (host, _) = match agent(&app, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, Some(&stream)) {
        return r;
    }
    match app.store.stream_status_for(host, &id, &stream) {
        Ok(s) => Json(s).into_response(),
        Err(e) => refused(e),
    }
}

async fn put_chunk(
    State(app): State<Shared>,
    Path((id, stream, seq)): Path<(String, String, u64)>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: axum::body::Bytes,
) -> Response {
    let (writer, _) = match writer(&app, &headers, &extensions) {
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
    let chunk = match decode_chunk(&headers, body) {
        Ok(c) => c,
        Err(r) => return r,
    };
    match app
        .store
        .put_chunk(&writer, &id, &stream, seq, &prev, &hash, chunk)
        .await
    {
        Ok(a) if a.stored => (StatusCode::CREATED, Json(a)).into_response(),
        Ok(a) => Json(a).into_response(),
        Err(e) => refused(e),
    }
}

/// A chunk's body as sent (`Content-Encoding: zstd` or none) → its decoded bytes, at most
/// 4 MiB either way (collector/src/encoding.rs).
fn decode_chunk(headers: &HeaderMap, body: axum::body::Bytes) -> Result<ChunkBody, Response> {
    use crate::encoding::{decode, EncodingError};
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            "a chunk is at most 4 MiB",
        )
    };
    if body.len() > MAX_CHUNK {
        return Err(too_large());
    }
    let header = match headers.get(axum::http::header::CONTENT_ENCODING) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .map_err(|_| bad_request("Content-Encoding is not text"))?,
        ),
    };
    match decode(header, body.clone(), MAX_CHUNK) {
        Ok((raw, encoding)) => Ok(ChunkBody {
            raw,
            encoded: body,
            encoding,
        }),
        Err(EncodingError::TooLarge { .. }) => Err(too_large()),
        Err(e @ EncodingError::NotZstd) => Err(bad_request(e.to_string())),
        Err(e @ EncodingError::Unsupported(_)) => Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadRequest,
            e.to_string(),
        )),
    }
}

async fn put_meta(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: axum::body::Bytes,
) -> Response {
    let (writer, _) = match writer(&app, &headers, &extensions) {
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
    match app.store.put_meta(&writer, &id, meta, &body).await {
        Ok(()) => Json(serde_json::json!({"ok": true})).into_response(),
        Err(e) => refused(e),
    }
}

async fn seal(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    extensions: axum::http::Extensions,
    body: axum::body::Bytes,
) -> Response {
    let (writer, key) = match writer(&app, &headers, &extensions) {
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
    match app.store.seal(&writer, key, &id, &seal).await {
        Ok(()) => Json(serde_json::json!({"ok": true, "status": "complete"})).into_response(),
        Err(e) => refused(e),
    }
}

async fn search(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    if let Err(r) = auditor(&app, &headers) {
        return r;
    }
    let s = Search {
        sub: q.get("sub").cloned().filter(|v| !v.is_empty()),
        host: q.get("host").cloned().filter(|v| !v.is_empty()),
        login: q.get("login").cloned().filter(|v| !v.is_empty()),
        from: q.get("from").cloned().filter(|v| !v.is_empty()),
        to: q.get("to").cloned().filter(|v| !v.is_empty()),
        command: q.get("command").cloned().filter(|v| !v.is_empty()),
        recording: q.get("recording").cloned().filter(|v| !v.is_empty()),
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
) -> Response {
    if let Err(r) = auditor(&app, &headers).and_then(|_| check_ids(&id, None)) {
        return r;
    }
    match app.store.session(&id) {
        Ok(v) => Json(v).into_response(),
        Err(e) => refused(e),
    }
}

async fn raw_stream(app: Shared, id: String, stream: &str, headers: HeaderMap) -> Response {
    if let Err(r) = auditor(&app, &headers).and_then(|_| check_ids(&id, None)) {
        return r;
    }
    match app.store.stream(&id, stream, 0) {
        Ok((_, chunks)) => {
            use futures::StreamExt;
            // A chunk that cannot be read after the answer started cuts it short: the
            // reader sees a broken transfer, never a shorter recording taken for whole.
            let body = axum::body::Body::from_stream(
                chunks.map(|c| c.map_err(|e| std::io::Error::other(e.to_string()))),
            );
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
        }
        Err(e) => refused(e),
    }
}

async fn cast(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    raw_stream(app, id, "cast", headers).await
}

async fn desktop(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    raw_stream(app, id, "desktop", headers).await
}

async fn audit(State(app): State<Shared>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    raw_stream(app, id, "audit", headers).await
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
