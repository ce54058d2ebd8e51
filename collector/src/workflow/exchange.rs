//! `POST /api/v1/token`: RFC 8693 token exchange for workloads (CI jobs, AI agents). A
//! workload presents an OIDC token of a `[[workload]]` issuer and the public key it made;
//! the first rule of that issuer that takes the token decides the host, login, profile and
//! longest lifetime, and whether a human approves first (then the answer is
//! `authorization_pending` with the request's id, and the workload asks again with it).
//! Every refusal says why, to the workload and in the audit log.

use super::{now, policy, random_id, StoredRequest, WorkflowError};
use crate::api::App;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use usher_trust::{Expect, Refusal, RuleMiss, WorkloadRule};
use usher_wire::jit::{
    AccessRequest, OAuthError, Person, RequestState, Role, TokenResponse, GRANT_TOKEN_TYPE,
    ID_TOKEN_TYPE, JWT_TOKEN_TYPE, TOKEN_EXCHANGE_GRANT_TYPE,
};

/// Clock skew tolerated on the workload token's times.
const LEEWAY_SECS: u64 = 60;
/// How long a workload's request waits for a human when its rule does not say.
const DEFAULT_PENDING_SECS: i64 = 15 * 60;
const MAX_FORM_BYTES: usize = 64 * 1024;

/// Why an exchange is refused; each maps to an OAuth error.
#[derive(Debug, thiserror::Error)]
pub enum ExchangeRefusal {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("the token is not accepted: {0}")]
    Token(#[from] Refusal),
    #[error("{0}")]
    NoRule(String),
    #[error("{0}")]
    Target(String),
    #[error("waiting for approval")]
    Pending { request_id: String },
    #[error("the request was denied")]
    Denied,
    #[error("the request {0:?} is over")]
    Over(RequestState),
    #[error("too many token exchanges from this address: at most 30 at once, then 10 a second")]
    RateLimited,
    #[error(transparent)]
    Workflow(#[from] WorkflowError),
}

impl ExchangeRefusal {
    fn answer(&self) -> Response {
        let (status, error) = match self {
            ExchangeRefusal::InvalidRequest(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
            ExchangeRefusal::Token(_) | ExchangeRefusal::NoRule(_) => {
                (StatusCode::BAD_REQUEST, "invalid_grant")
            }
            ExchangeRefusal::Target(_) => (StatusCode::BAD_REQUEST, "invalid_target"),
            ExchangeRefusal::Pending { .. } => (StatusCode::BAD_REQUEST, "authorization_pending"),
            ExchangeRefusal::Denied => (StatusCode::BAD_REQUEST, "access_denied"),
            ExchangeRefusal::Over(_) => (StatusCode::BAD_REQUEST, "expired_token"),
            ExchangeRefusal::RateLimited => (StatusCode::TOO_MANY_REQUESTS, "slow_down"),
            ExchangeRefusal::Workflow(WorkflowError::Policy(_))
            | ExchangeRefusal::Workflow(WorkflowError::NoSuchRequest(_)) => {
                (StatusCode::BAD_REQUEST, "invalid_request")
            }
            ExchangeRefusal::Workflow(e) => {
                log::error!(target: "usher", "token exchange: {e}");
                return oauth_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "server_error",
                    "internal error".into(),
                    None,
                );
            }
        };
        let request_id = match self {
            ExchangeRefusal::Pending { request_id } => Some(request_id.clone()),
            _ => None,
        };
        oauth_error(status, error, self.to_string(), request_id)
    }
}

pub(crate) fn oauth_error(
    status: StatusCode,
    error: &str,
    description: String,
    request_id: Option<String>,
) -> Response {
    (
        status,
        Json(OAuthError {
            error: error.to_string(),
            error_description: Some(description),
            request_id,
        }),
    )
        .into_response()
}

/// What the workload asked for.
struct Asked {
    subject_token: String,
    host: String,
    login: Option<String>,
    profile: Option<String>,
    ssh_key: String,
    duration: Option<u64>,
    request_id: Option<String>,
}

fn parse_form(body: &[u8]) -> Result<Asked, ExchangeRefusal> {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let field = |name: &str| form.get(name).filter(|v| !v.is_empty()).cloned();
    let need = |name: &str| {
        field(name).ok_or_else(|| ExchangeRefusal::InvalidRequest(format!("{name} is required")))
    };
    if need("grant_type")? != TOKEN_EXCHANGE_GRANT_TYPE {
        return Err(ExchangeRefusal::InvalidRequest(format!(
            "grant_type must be {TOKEN_EXCHANGE_GRANT_TYPE}"
        )));
    }
    let kind = need("subject_token_type")?;
    if kind != ID_TOKEN_TYPE && kind != JWT_TOKEN_TYPE {
        return Err(ExchangeRefusal::InvalidRequest(format!(
            "subject_token_type must be {ID_TOKEN_TYPE} or {JWT_TOKEN_TYPE}"
        )));
    }
    let duration = match field("duration") {
        None => None,
        Some(d) => Some(d.parse::<u64>().map_err(|_| {
            ExchangeRefusal::InvalidRequest("duration: a number of seconds".into())
        })?),
    };
    Ok(Asked {
        subject_token: need("subject_token")?,
        host: need("audience")?,
        login: field("login"),
        profile: field("profile"),
        ssh_key: need("ssh_key")?,
        duration,
        request_id: field("request_id"),
    })
}

pub async fn token(State(app): State<Arc<App>>, request: Request) -> Response {
    let peer = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string())
        .unwrap_or_else(|| "unknown".into());
    let body = match axum::body::to_bytes(request.into_body(), MAX_FORM_BYTES).await {
        Ok(b) => b,
        Err(_) => return ExchangeRefusal::InvalidRequest("the form is too large".into()).answer(),
    };
    if !app.exchange_limit.allow(&peer) {
        return ExchangeRefusal::RateLimited.answer();
    }
    let now = now();
    let mut who = String::from("workload");
    match exchange(&app, &body, now, &mut who).await {
        Ok(answer) => Json(answer).into_response(),
        Err(refusal) => {
            if !matches!(
                refusal,
                ExchangeRefusal::Pending { .. } | ExchangeRefusal::RateLimited
            ) {
                let detail = serde_json::json!({"reason": refusal.to_string(), "peer": peer});
                if let Err(e) = app
                    .workflow
                    .record("token.refused", &who, None, detail, now)
                    .await
                {
                    log::error!(target: "usher", "audit: {e}");
                }
            }
            refusal.answer()
        }
    }
}

/// The exchange proper; `who` learns the workload's identity once its token is verified.
async fn exchange(
    app: &App,
    body: &[u8],
    now: i64,
    who: &mut String,
) -> Result<TokenResponse, ExchangeRefusal> {
    let asked = parse_form(body)?;
    let policy = app.workflow.policy();
    let trusted = app.trusted.load_full();
    let iss = usher_trust::peek_issuer(&asked.subject_token)?;
    let audiences = usher_trust::audiences_for(&policy.workloads, &iss);
    let claims = trusted
        .verify(
            &asked.subject_token,
            &Expect {
                audiences: &audiences,
                leeway_secs: LEEWAY_SECS,
                now,
            },
        )
        .await?;
    let sub = claims
        .get("sub")
        .and_then(|s| s.as_str())
        .unwrap_or("")
        .to_string();
    if sub.is_empty() {
        return Err(ExchangeRefusal::InvalidRequest(
            "the token has no sub".into(),
        ));
    }
    *who = format!("{iss}#{sub}");
    let rule = usher_trust::match_rule(
        &policy.workloads,
        &iss,
        &claims,
        Some(&asked.host),
        asked.login.as_deref(),
    )
    .map_err(|none| {
        // A rule that takes the token's claims but not this host: the target is wrong.
        if none
            .misses
            .iter()
            .any(|m| matches!(m, RuleMiss::Host { .. }))
        {
            ExchangeRefusal::Target(none.to_string())
        } else {
            ExchangeRefusal::NoRule(none.to_string())
        }
    })?
    .clone();
    if !policy.hosts.iter().any(|h| h.host == asked.host) {
        return Err(ExchangeRefusal::Target(format!(
            "no host {:?} is known to this service",
            asked.host
        )));
    }
    if asked.profile.is_some() && asked.profile != rule.profile {
        return Err(ExchangeRefusal::Target(format!(
            "rule {} grants profile {:?}, not {:?}",
            rule.name, rule.profile, asked.profile
        )));
    }
    let max = rule.max_lifetime_secs();
    let duration = asked.duration.unwrap_or(max);
    if duration == 0 || duration > max {
        return Err(ExchangeRefusal::InvalidRequest(format!(
            "duration {duration} s: rule {} allows 1 to {max} s",
            rule.name
        )));
    }
    policy::check_ssh_key(&asked.ssh_key)
        .map_err(|e| ExchangeRefusal::InvalidRequest(e.to_string()))?;
    let requester = Person {
        sub: who.clone(),
        name: sub.clone(),
    };
    if let Some(id) = &asked.request_id {
        return collect(app, id, &requester, &rule, &asked, now).await;
    }
    let approvers = policy
        .roles
        .get(&Role::Approver)
        .cloned()
        .unwrap_or_default();
    let stored = StoredRequest {
        request: AccessRequest {
            id: random_id("req-"),
            requester,
            host: asked.host.clone(),
            login: rule.login.clone(),
            profile: rule.profile.clone(),
            duration_secs: duration,
            reason: format!("workload rule {}: {sub}", rule.name),
            ssh_key: Some(asked.ssh_key.clone()),
            secret_requested: false,
            state: RequestState::Pending,
            policy: format!("workload:{}", rule.name),
            approvals_needed: 1,
            created_at: now,
            decided_at: None,
            reviews: vec![],
            auto_approved: None,
            grant_id: None,
            expires_at: None,
            grant: None,
            revoked: None,
        },
        // Any approver may approve a workload's request.
        approver_groups: approvers,
        secret_hash: None,
        pending_until: now
            + rule
                .pending_ttl
                .map(|t| t.as_secs() as i64)
                .unwrap_or(DEFAULT_PENDING_SECS),
    };
    let auto = (!rule.approval).then(|| format!("workload:{}", rule.name));
    let detail = serde_json::json!({"iss": iss, "sub": sub, "rule": rule.name, "host": asked.host,
        "login": rule.login, "duration_secs": duration});
    let request = app
        .workflow
        .store_new(stored, auto, who, detail.clone(), now)
        .await?;
    match request.grant {
        Some(grant) => {
            app.workflow
                .record("token.exchanged", who, Some(&request.id), detail, now)
                .await?;
            Ok(TokenResponse {
                access_token: grant,
                issued_token_type: GRANT_TOKEN_TYPE.into(),
                token_type: "N_A".into(),
                expires_in: duration as i64,
            })
        }
        None => Err(ExchangeRefusal::Pending {
            request_id: request.id,
        }),
    }
}

/// A workload asking again for the grant its earlier exchange left pending: only the same
/// workload (issuer and subject), for the same host and key, under the same rule.
async fn collect(
    app: &App,
    id: &str,
    requester: &Person,
    rule: &WorkloadRule,
    asked: &Asked,
    now: i64,
) -> Result<TokenResponse, ExchangeRefusal> {
    let stored = app.workflow.stored(id).await?;
    let r = &stored.request;
    let same = r.requester.sub == requester.sub
        && r.policy == format!("workload:{}", rule.name)
        && r.host == asked.host
        && r.ssh_key.as_deref() == Some(asked.ssh_key.as_str());
    if !same {
        return Err(ExchangeRefusal::InvalidRequest(format!(
            "request {id} is not this workload's request for this host and key"
        )));
    }
    match super::effective_state(&stored, now) {
        RequestState::Pending => Err(ExchangeRefusal::Pending {
            request_id: id.to_string(),
        }),
        RequestState::Approved => {
            let grant = app.workflow.grant_token(id).await?.ok_or_else(|| {
                ExchangeRefusal::Workflow(WorkflowError::NoSuchGrant(id.to_string()))
            })?;
            app.workflow
                .record(
                    "token.exchanged",
                    &requester.sub,
                    Some(id),
                    serde_json::json!({"collected": true}),
                    now,
                )
                .await?;
            Ok(TokenResponse {
                access_token: grant,
                issued_token_type: GRANT_TOKEN_TYPE.into(),
                token_type: "N_A".into(),
                expires_in: r.expires_at.unwrap_or(now) - now,
            })
        }
        RequestState::Denied => Err(ExchangeRefusal::Denied),
        other => Err(ExchangeRefusal::Over(other)),
    }
}
