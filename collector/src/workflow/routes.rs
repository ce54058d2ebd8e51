//! The workflow's HTTP routes (WORKFLOW.md's table, but for sign-in and the pages): thin
//! wrappers that find out who is asking and call [`Workflow`](super::Workflow).

// A refused request is answered with its Response: the handlers' idiom, on a cold path.
#![allow(clippy::result_large_err)]

use super::{now, WorkflowError};
use crate::api::{agent, error, principal, App};
use crate::workflow::commands::{CommandRefusal, MAX_BODY_BYTES};
use crate::workflow::policy::PolicyRefusal;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use usher_wire::approval::{CommandRequest, CommandState};
use usher_wire::collector::ErrorCode;
use usher_wire::jit::{NewRequest, RequestState, Review, RevokeBody};

type Shared = Arc<App>;

/// The longest a long-poll (`?wait=`) is held.
pub const MAX_WAIT_SECS: u64 = 60;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/jwks.json", get(jwks))
        .route("/api/v1/requests", post(create).get(list))
        .route("/api/v1/requests/{id}", get(one))
        .route("/api/v1/requests/{id}/review", post(review))
        .route("/api/v1/requests/{id}/cancel", post(cancel))
        .route("/api/v1/grants/{id}/revoke", post(revoke))
        .route("/api/v1/audit", get(audit))
        .route("/api/v1/agent/grants", get(agent_feed))
        .route("/api/v1/agent/commands", post(agent_submit_command))
        .route("/api/v1/agent/commands/{id}", get(agent_wait_command))
        .route(
            "/api/v1/agent/commands/{id}/cancel",
            post(agent_cancel_command),
        )
        .route("/api/v1/commands", get(list_commands))
        .route("/api/v1/commands/{id}/review", post(review_command))
        .route("/api/v1/token", post(super::exchange::token))
}

/// The answer to a refusal: its status, and `{"code", "error"}`.
pub fn refusal(e: WorkflowError) -> Response {
    use WorkflowError as W;
    let (status, code) = match &e {
        W::Policy(
            PolicyRefusal::NoPolicy
            | PolicyRefusal::HostNotAllowed(_)
            | PolicyRefusal::LoginNotAllowed { .. }
            | PolicyRefusal::ProfileNotAllowed { .. },
        ) => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        W::Policy(_) | W::TooLong(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
        W::MissingRole(_)
        | W::NotYours
        | W::SelfApproval
        | W::NotAnApproverHere(_)
        | W::MayNotRevoke => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
        W::NoSuchRequest(_) | W::NoSuchGrant(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
        W::Command(c) => match c {
            CommandRefusal::Invalid(_) => (StatusCode::BAD_REQUEST, ErrorCode::BadRequest),
            CommandRefusal::OtherHost(_)
            | CommandRefusal::OwnCommand
            | CommandRefusal::NotListed => (StatusCode::FORBIDDEN, ErrorCode::Forbidden),
            CommandRefusal::NoSuchCommand(_) => (StatusCode::NOT_FOUND, ErrorCode::NotFound),
            CommandRefusal::IdTaken(_)
            | CommandRefusal::NotPending(_)
            | CommandRefusal::AlreadyDecided => (StatusCode::CONFLICT, ErrorCode::Conflict),
        },
        W::AlreadyReviewed | W::NotPending(_) | W::NotLive(_) => {
            (StatusCode::CONFLICT, ErrorCode::Conflict)
        }
        W::Sign(_) | W::Db(_) | W::Retry => {
            log::error!(target: "usher", "workflow: {e}");
            return error(
                StatusCode::INTERNAL_SERVER_ERROR,
                ErrorCode::Internal,
                "internal error",
            );
        }
    };
    error(status, code, e.to_string())
}

fn bad_json(e: impl std::fmt::Display) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        ErrorCode::BadRequest,
        format!("bad JSON: {e}"),
    )
}

/// `?state=NAME` of a listing (absent or empty: any state); an unknown name is refused.
fn query_state<T: serde::de::DeserializeOwned>(
    q: &HashMap<String, String>,
) -> Result<Option<T>, Response> {
    match q.get("state").filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => serde_json::from_value::<T>(serde_json::Value::String(s.clone()))
            .map(Some)
            .map_err(|_| {
                error(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadRequest,
                    "unknown state",
                )
            }),
    }
}

fn wait_secs(q: &HashMap<String, String>) -> Result<u64, Response> {
    query_number::<u64>(q, "wait", "seconds").map(|w| w.min(MAX_WAIT_SECS))
}

/// A number in the query: absent or empty is 0, anything else not a `T` is a 400 saying
/// what `name` should be.
fn query_number<T: std::str::FromStr + Default>(
    q: &HashMap<String, String>,
    name: &str,
    what: &str,
) -> Result<T, Response> {
    match q.get(name).filter(|v| !v.is_empty()) {
        None => Ok(T::default()),
        Some(v) => v.parse::<T>().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                format!("{name}: {what}"),
            )
        }),
    }
}

async fn discovery(State(app): State<Shared>) -> Response {
    Json(app.workflow.issuer.discovery_document()).into_response()
}

async fn jwks(State(app): State<Shared>) -> Response {
    Json(app.workflow.issuer.jwks()).into_response()
}

async fn create(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let new: NewRequest = match serde_json::from_slice(&body) {
        Ok(n) => n,
        Err(e) => return bad_json(e),
    };
    if !app.request_limit.allow(&who.sub) {
        return error(
            StatusCode::TOO_MANY_REQUESTS,
            ErrorCode::RateLimited,
            "too many requests: at most 10 at once, then one every 6 s",
        );
    }
    match app.workflow.create_request(&who, new, now()).await {
        Ok(r) => (StatusCode::CREATED, Json(r)).into_response(),
        Err(e) => refusal(e),
    }
}

async fn list(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let state = match query_state::<RequestState>(&q) {
        Ok(s) => s,
        Err(r) => return r,
    };
    let mine = q.get("mine").is_some_and(|v| v == "1" || v == "true");
    match app.workflow.list(&who, state, mine, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

async fn one(
    State(app): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let wait = match wait_secs(&q) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut revisions = app.workflow.watch_revision();
    loop {
        revisions.borrow_and_update();
        let answer = app.workflow.get(&who, &id, now()).await;
        match answer {
            Ok(r) if r.state == RequestState::Pending && tokio::time::Instant::now() < deadline => {
                // Woken by any change (here or, through the revision poll, elsewhere), or
                // once a second for the pending request's own expiry.
                let next = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
                let _ = tokio::time::timeout_at(next, revisions.changed()).await;
            }
            Ok(r) => return Json(r).into_response(),
            Err(e) => return refusal(e),
        }
    }
}

async fn review(
    State(app): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let review: Review = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    match app.workflow.review(&who, &id, review, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

async fn cancel(
    State(app): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    match app.workflow.cancel(&who, &id, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

async fn revoke(
    State(app): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let body: RevokeBody = if body.is_empty() {
        RevokeBody {
            reason: String::new(),
        }
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => return bad_json(e),
        }
    };
    match app.workflow.revoke(&who, &id, &body.reason, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

async fn audit(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let since = match query_number::<i64>(&q, "since", "a sequence number") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let request = q.get("request").filter(|v| !v.is_empty()).cloned();
    match app.workflow.audit(&who, request, since).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

/// `GET /api/v1/agent/grants?since=REV&wait=N`: the host's grants and revocations, at once
/// when the revision has moved past `since`, else when it does (or at the deadline).
async fn agent_feed(
    State(app): State<Shared>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let host = match agent(&app, &headers) {
        Ok((host, _)) => host.clone(),
        Err(r) => return r,
    };
    let since = match query_number::<u64>(&q, "since", "a revision") {
        Ok(s) => s,
        Err(r) => return r,
    };
    let wait = match wait_secs(&q) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut revisions = app.workflow.watch_revision();
    loop {
        let seen = *revisions.borrow_and_update();
        if seen > since || tokio::time::Instant::now() >= deadline {
            break;
        }
        if tokio::time::timeout_at(deadline, revisions.changed())
            .await
            .is_err()
        {
            break;
        }
    }
    match app.workflow.feed(&host, now()).await {
        Ok(f) => Json(f).into_response(),
        Err(e) => refusal(e),
    }
}

// ---- commands waiting for approval inside sessions (commands.rs) ----

/// `POST /api/v1/agent/commands`: a pending command of the token's host. The body is read
/// only up to [`MAX_BODY_BYTES`].
async fn agent_submit_command(
    State(app): State<Shared>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Response {
    let host = match agent(&app, &headers) {
        Ok((host, _)) => host.clone(),
        Err(r) => return r,
    };
    let too_large = || {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::TooLarge,
            format!("a command request is at most {MAX_BODY_BYTES} bytes"),
        )
    };
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY_BYTES) {
        return too_large();
    }
    let body = match axum::body::to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => return too_large(),
    };
    let request: CommandRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    match app.workflow.submit_command(&host, request, now()).await {
        Ok(status) => (StatusCode::CREATED, Json(status)).into_response(),
        Err(e) => refusal(e),
    }
}

/// `GET /api/v1/agent/commands/{id}?wait=N`: the state of the host's own request, and the
/// signed decision once there is one; while pending, waits up to N s for a change.
async fn agent_wait_command(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let host = match agent(&app, &headers) {
        Ok((host, _)) => host.clone(),
        Err(r) => return r,
    };
    let wait = match wait_secs(&q) {
        Ok(w) => w,
        Err(r) => return r,
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut changes = app.workflow.watch_commands();
    loop {
        changes.borrow_and_update();
        let c = match app.workflow.command_of_host(&host, &id).await {
            Ok(c) => c,
            Err(e) => return refusal(e),
        };
        let at = now();
        if c.effective_state(at) == CommandState::Pending && tokio::time::Instant::now() < deadline
        {
            // Woken by a change here, or once a second for the request's own expiry and
            // for what other instances decided.
            let next = deadline.min(tokio::time::Instant::now() + Duration::from_secs(1));
            let _ = tokio::time::timeout_at(next, changes.changed()).await;
            continue;
        }
        return match app.workflow.decision_answer(&c, at) {
            Ok(answer) => Json(answer).into_response(),
            Err(e) => refusal(e),
        };
    }
}

/// `POST /api/v1/agent/commands/{id}/cancel`: the host gave up waiting.
async fn agent_cancel_command(
    State(app): State<Shared>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let host = match agent(&app, &headers) {
        Ok((host, _)) => host.clone(),
        Err(r) => return r,
    };
    let at = now();
    let answer = match app.workflow.cancel_command(&host, &id, at).await {
        Ok(c) => app.workflow.decision_answer(&c, at),
        Err(e) => Err(e),
    };
    match answer {
        Ok(a) => Json(a).into_response(),
        Err(e) => refusal(e),
    }
}

/// `GET /api/v1/commands?state=pending`: for approvers, auditors and admins.
async fn list_commands(
    State(app): State<Shared>,
    method: Method,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let state = match query_state::<CommandState>(&q) {
        Ok(s) => s,
        Err(r) => return r,
    };
    match app.workflow.list_commands(&who, state, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}

/// `POST /api/v1/commands/{id}/review` `{decision, comment}`: an approver decides.
async fn review_command(
    State(app): State<Shared>,
    Path(id): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let who = match principal(&app, &headers, &method) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let review: Review = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_json(e),
    };
    match app.workflow.review_command(&who, &id, review, now()).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => refusal(e),
    }
}
