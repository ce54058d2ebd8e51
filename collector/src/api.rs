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
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use usher_wire::collector::{
    chunk_signed_text, meta_signed_text, sha256_hex, verify_write, ErrorCode, Refusal, HASH_HEADER,
    PREV_HASH_HEADER, SIGNATURE_HEADER,
};
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
    /// Requests per agent token (by its fingerprint).
    agent_limit: RateLimit,
    /// Requests without valid credentials to routes that need them, per client address.
    unauthenticated_limit: RateLimit,
    /// Searches and reads of recordings per person (`sub`).
    reader_limit: RateLimit,
    /// When each (viewer, session, stream) replay was last recorded in the audit trail.
    views: Mutex<HashMap<(String, String, String), i64>>,
}

/// A chunk's body as sent (before decoding) and a metadata or seal body: at most this.
pub const MAX_ENCODED_CHUNK: usize = MAX_CHUNK;
pub const MAX_SMALL_BODY: usize = 64 * 1024;

/// A replay is recorded once per viewer, session and stream in this many seconds.
const VIEW_DEDUP_SECS: i64 = 60;

/// The client certificate presented on a request's connection, as the TLS acceptor saw
/// it (only when `[tls] client_ca` is set; the chain is verified by then): the names it
/// is valid for (its DNS names, or its CN when it has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    pub names: Vec<String>,
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
        let agent_limit = RateLimit::new(config.limits.agent_burst, config.limits.agent_per_second);
        let unauthenticated_limit = RateLimit::new(
            config.limits.unauthenticated_burst,
            config.limits.unauthenticated_per_second,
        );
        let reader_limit =
            RateLimit::new(config.limits.reader_burst, config.limits.reader_per_second);
        let store = Store::open(&config)?;
        crate::store::forward_events(&store, workflow.clone());
        Ok(App {
            store,
            config,
            agent_limit,
            unauthenticated_limit,
            reader_limit,
            views: Mutex::new(HashMap::new()),
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

pub(crate) fn refused(r: Refused) -> Response {
    let status = match &r {
        Refused::BadRequest(_) => StatusCode::BAD_REQUEST,
        Refused::Forbidden(_) => StatusCode::FORBIDDEN,
        Refused::NotFound(_) => StatusCode::NOT_FOUND,
        Refused::Tampered(_) => StatusCode::UNPROCESSABLE_ENTITY,
        Refused::Gap { .. } | Refused::Rewritten { .. } | Refused::AfterSeal(_) => {
            StatusCode::CONFLICT
        }
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

/// Who makes an agent's write: its token's host, the token's fingerprint, the address
/// (`signed` is set once the write's signature is checked).
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
            addr: client_addr(extensions),
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
    auditor_for(app, headers, &Method::GET)
}

/// The person asking, if `auth::require` finds the auditor role, for a request of
/// `method` (a cookie's CSRF check depends on it).
pub(crate) fn auditor_for(
    app: &App,
    headers: &HeaderMap,
    method: &Method,
) -> Result<Principal, Response> {
    let p = principal(app, headers, method)?;
    auth::require(&p, Role::Auditor)
        .map_err(|e| error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, e.to_string()))?;
    Ok(p)
}

pub(crate) fn check_ids(id: &str, stream: Option<&str>) -> Result<(), Response> {
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
        .merge(crate::store::retention::routes())
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
        .layer(axum::middleware::from_fn_with_state(app.clone(), gate))
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

/// The request's client address, when the server was started with connection info.
fn client_addr(extensions: &axum::http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0)
}

/// Routes that answer nothing without credentials (an agent's token, or a person's).
fn needs_credentials(path: &str) -> bool {
    path.starts_with("/api/v1/sessions") || path.starts_with("/api/v1/agent/")
}

/// In front of every route, on headers only: an agent token is held to its rate and, with
/// `[tls] client_ca`, to a client certificate naming its host; an address that keeps
/// asking the credentialed routes without valid credentials is slowed to 429.
async fn gate(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(token) = bearer(req.headers()) {
        if let Some((host, _)) = app.agents.get(token) {
            let token_id = Writer::token_id(token);
            if !app.agent_limit.allow(&token_id) {
                return error(
                    StatusCode::TOO_MANY_REQUESTS,
                    ErrorCode::RateLimited,
                    "too many requests for this agent token",
                );
            }
            if let Err(why) = client_cert_names_host(&app, host, req.extensions()) {
                log::warn!(target: "usher", usher_event = "agent_refused", host = host.as_str(), token = token_id.as_str(); "agent request refused ({why}): host {host}, token {token_id}, from {}", client_addr(req.extensions()).map(|a| a.to_string()).unwrap_or_default());
                return error(StatusCode::FORBIDDEN, ErrorCode::Forbidden, why);
            }
            return next.run(req).await;
        }
    }
    if needs_credentials(req.uri().path()) {
        match principal(&app, req.headers(), &Method::GET) {
            Ok(who) => {
                if !app.reader_limit.allow(&who.sub) {
                    return error(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::RateLimited,
                        "too many requests from this reviewer",
                    );
                }
            }
            Err(_) => {
                let addr = client_addr(req.extensions())
                    .map(|a| a.ip().to_string())
                    .unwrap_or_default();
                if !app.unauthenticated_limit.allow(&addr) {
                    return error(
                        StatusCode::TOO_MANY_REQUESTS,
                        ErrorCode::RateLimited,
                        "too many requests without valid credentials from this address",
                    );
                }
            }
        }
    }
    next.run(req).await
}

/// With `[tls] client_ca`, an agent's certificate must name its token's host (and, with
/// `require_client_cert`, be there).
fn client_cert_names_host(
    app: &App,
    host: &str,
    extensions: &axum::http::Extensions,
) -> Result<(), String> {
    if app.config.tls.client_ca.is_none() {
        return Ok(());
    }
    match extensions.get::<ClientCert>() {
        Some(cert) if cert.names.iter().any(|n| n.eq_ignore_ascii_case(host)) => Ok(()),
        Some(cert) => Err(format!(
            "the client certificate names {:?}, not host {host}",
            cert.names
        )),
        None if app.config.tls.require_client_cert => {
            Err("a client certificate is required".to_string())
        }
        None => Ok(()),
    }
}

/// Why a body was not taken.
#[derive(Debug, thiserror::Error)]
enum BodyRefused {
    #[error("the body is over {0} bytes")]
    TooLarge(usize),
    #[error("the body did not arrive within {0} s")]
    Timeout(u64),
    #[error("the body broke off: {0}")]
    Broken(axum::Error),
}

impl BodyRefused {
    fn response(self) -> Response {
        let (status, code) = match &self {
            BodyRefused::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, ErrorCode::TooLarge),
            BodyRefused::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, ErrorCode::Timeout),
            BodyRefused::Broken(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        };
        error(status, code, self.to_string())
    }
}

/// Reads a body of at most `cap` bytes within the configured time: a declared length over
/// the cap is refused before anything is read, a chunked body as soon as it passes it.
async fn read_body(
    app: &App,
    headers: &HeaderMap,
    body: axum::body::Body,
    cap: usize,
) -> Result<bytes::Bytes, BodyRefused> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > cap as u64) {
        return Err(BodyRefused::TooLarge(cap));
    }
    let secs = app.config.limits.body_secs;
    let collect = async {
        use futures::StreamExt;
        let mut data = bytes::BytesMut::new();
        let mut frames = body.into_data_stream();
        while let Some(frame) = frames.next().await {
            let frame = frame.map_err(BodyRefused::Broken)?;
            if data.len() + frame.len() > cap {
                return Err(BodyRefused::TooLarge(cap));
            }
            data.extend_from_slice(&frame);
        }
        Ok(data.freeze())
    };
    tokio::time::timeout(Duration::from_secs(secs), collect)
        .await
        .map_err(|_| BodyRefused::Timeout(secs))?
}

/// A chunk's body as sent (`Content-Encoding: zstd` or none; at most 4 MiB, `read_body`
/// saw to it) → its decoded bytes, at most 4 MiB (collector/src/encoding.rs).
fn decode_chunk(headers: &HeaderMap, body: axum::body::Bytes) -> Result<ChunkBody, Response> {
    use crate::encoding::{decode, EncodingError};
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            "a chunk is at most 4 MiB",
        )
    };
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

fn text_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// Checks the host key's signature on a write (`X-Usher-Signature` over `text`); a write
/// without a valid one is refused and logged with its writer, and never reaches the store.
fn check_signature(
    writer: &mut Writer,
    key: &ed25519_dalek::VerifyingKey,
    headers: &HeaderMap,
    text: &str,
    what: &str,
) -> Result<(), Response> {
    let verdict = match text_header(headers, SIGNATURE_HEADER) {
        None => Err("no X-Usher-Signature".to_string()),
        Some(sig) => verify_write(key, text, &sig).map_err(|e| e.to_string()),
    };
    match verdict {
        Ok(()) => {
            writer.signed = true;
            Ok(())
        }
        Err(why) => {
            log::warn!(target: "usher", usher_event = "write_refused", host = writer.host.as_str(), token = writer.token_id.as_str(); "{what} refused, not signed by the host's key ({why}): {writer}");
            Err(error(
                StatusCode::FORBIDDEN,
                ErrorCode::Forbidden,
                format!("{what}: {why}"),
            ))
        }
    }
}

async fn put_chunk(
    State(app): State<Shared>,
    Path((id, stream, seq)): Path<(String, String, u64)>,
    req: Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let (mut writer, key) = match writer(&app, headers, &parts.extensions) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, Some(&stream)) {
        return r;
    }
    let (Some(prev), Some(hash)) = (
        text_header(headers, PREV_HASH_HEADER),
        text_header(headers, HASH_HEADER),
    ) else {
        return bad_request("X-Usher-Prev-Hash and X-Usher-Hash are required");
    };
    // The chain link commits to the body: the signature is checked before reading it.
    let signed = chunk_signed_text(&id, &stream, seq, &prev, &hash);
    if let Err(r) = check_signature(&mut writer, key, headers, &signed, "the chunk") {
        return r;
    }
    let encoded = match read_body(&app, headers, body, MAX_ENCODED_CHUNK).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    // At most MAX_ENCODED_CHUNK as sent (read_body), MAX_CHUNK decoded (decode_chunk).
    let chunk = match decode_chunk(headers, encoded) {
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

async fn put_meta(State(app): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let (mut writer, key) = match writer(&app, headers, &parts.extensions) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, None) {
        return r;
    }
    let Some(declared_hash) = text_header(headers, HASH_HEADER) else {
        return bad_request("X-Usher-Hash (the SHA-256 of the metadata) is required");
    };
    let signed = meta_signed_text(&id, &declared_hash);
    if let Err(r) = check_signature(&mut writer, key, headers, &signed, "the metadata") {
        return r;
    }
    let body = match read_body(&app, headers, body, MAX_SMALL_BODY).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    if sha256_hex(&body) != declared_hash.to_ascii_lowercase() {
        log::warn!(target: "usher", usher_event = "write_refused", host = writer.host.as_str(), token = writer.token_id.as_str(); "metadata of {id} refused, its body is not what was signed: {writer}");
        return error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            "the metadata's SHA-256 is not its signed X-Usher-Hash",
        );
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

async fn seal(State(app): State<Shared>, Path(id): Path<String>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let headers = &parts.headers;
    let (mut writer, key) = match writer(&app, headers, &parts.extensions) {
        Ok(a) => a,
        Err(r) => return r,
    };
    if let Err(r) = check_ids(&id, None) {
        return r;
    }
    let body = match read_body(&app, headers, body, MAX_SMALL_BODY).await {
        Ok(b) => b,
        Err(e) => return e.response(),
    };
    let seal = match serde_json::from_slice::<Seal>(&body) {
        Ok(s) => s,
        Err(e) => return bad_request(format!("the seal is not a seal: {e}")),
    };
    if seal.meta.is_none() {
        return bad_request(
            "the seal does not cover the metadata (usher-seal-v1): send usher-seal-v2",
        );
    }
    // The seal is its own signature: one not by the host's key is refused like an
    // unsigned write (a stolen token cannot flag a session with a bad seal).
    if let Err(e) = seal.verify(&id, key) {
        log::warn!(target: "usher", usher_event = "write_refused", host = writer.host.as_str(), token = writer.token_id.as_str(); "seal of {id} refused ({e}): {writer}");
        return error(
            StatusCode::FORBIDDEN,
            ErrorCode::Forbidden,
            format!("the seal: {e}"),
        );
    }
    writer.signed = true;
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
    let limit = match q.get("limit").filter(|v| !v.is_empty()) {
        None => crate::store::DEFAULT_PAGE,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=crate::store::MAX_PAGE).contains(&n) => n,
            _ => return bad_request("limit is a number from 1 to 500"),
        },
    };
    let cursor = q.get("cursor").filter(|v| !v.is_empty());
    match app.store.search(&s, limit, cursor.map(String::as_str)) {
        Ok(page) => Json(page).into_response(),
        Err(e) => refused(e),
    }
}

/// Records a replay (`recording_viewed`) in the audit trail, once per viewer, session and
/// stream a minute. A failure to record is logged; the reader is still answered.
async fn record_view(app: &App, who: &Principal, id: &str, stream: &str) {
    let now = crate::workflow::now();
    let key = (who.sub.clone(), id.to_string(), stream.to_string());
    {
        let mut views = app.views.lock().unwrap_or_else(|e| e.into_inner());
        if views.len() > 10_000 {
            views.retain(|_, at| now - *at < VIEW_DEDUP_SECS);
        }
        match views.get(&key) {
            Some(at) if now - *at < VIEW_DEDUP_SECS => return,
            _ => {
                views.insert(key, now);
            }
        }
    }
    let detail = serde_json::json!({"session": id, "stream": stream, "name": who.name});
    if let Err(e) = app
        .workflow
        .record("recording_viewed", &who.sub, None, detail, now)
        .await
    {
        log::error!(target: "usher", "audit recording_viewed by {}: {e}", who.sub);
    }
}

async fn session(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let who = match auditor(&app, &headers).and_then(|p| check_ids(&id, None).map(|()| p)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match app.store.session(&id) {
        Ok(v) => {
            record_view(&app, &who, &id, "detail").await;
            Json(v).into_response()
        }
        Err(e) => refused(e),
    }
}

pub const NEXT_CHUNK_HEADER: &str = "x-usher-next-chunk";
pub const SESSION_STATUS_HEADER: &str = "x-usher-session-status";

/// A stream from chunk `?from=K` (default 0) on, chunk by chunk from storage, with where
/// the next read resumes (`X-Usher-Next-Chunk`) and the session's status
/// (`X-Usher-Session-Status`: once it is not `live`, nothing more arrives).
async fn raw_stream(
    app: Shared,
    id: String,
    stream: &str,
    headers: HeaderMap,
    q: HashMap<String, String>,
) -> Response {
    let who = match auditor(&app, &headers).and_then(|p| check_ids(&id, None).map(|()| p)) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let from = match q.get("from").map(|v| v.parse::<u64>()) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => return bad_request("from: not a chunk number"),
    };
    match app.store.stream(&id, stream, from) {
        Ok(crate::store::StoredStream {
            status,
            next,
            chunks,
        }) => {
            if from == 0 {
                record_view(&app, &who, &id, stream).await;
            }
            use futures::StreamExt;
            // A chunk that cannot be read after the answer started cuts it short: the
            // reader sees a broken transfer, never a shorter recording taken for whole.
            let body = axum::body::Body::from_stream(
                chunks.map(|c| c.map_err(|e| std::io::Error::other(e.to_string()))),
            );
            let mut response =
                ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response();
            let h = response.headers_mut();
            h.insert(NEXT_CHUNK_HEADER, header::HeaderValue::from(next));
            if let Ok(v) = header::HeaderValue::from_str(&status) {
                h.insert(SESSION_STATUS_HEADER, v);
            }
            h.insert(
                header::CACHE_CONTROL,
                header::HeaderValue::from_static("no-store"),
            );
            response
        }
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

async fn desktop(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    raw_stream(app, id, "desktop", headers, q).await
}

async fn audit(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    raw_stream(app, id, "audit", headers, q).await
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
