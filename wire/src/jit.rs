//! The just-in-time workflow's API (collector/WORKFLOW.md): what the `usher` CLI, the page,
//! the agents and workloads send the service, and what it answers.

use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

/// What a principal may do, from the groups the identity provider says they are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Requester,
    Approver,
    Auditor,
    Admin,
}

/// A signed-in person (or a script with their API token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Principal {
    pub sub: String,
    pub name: String,
    #[serde(default)]
    pub groups: Vec<String>,
    #[serde(default)]
    pub roles: BTreeSet<Role>,
}

/// What `usher login` needs to run the device authorization grant against the provider.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoginConfig {
    pub issuer: String,
    pub client_id: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IdToken {
    pub id_token: String,
}

/// The service's own bearer token for a principal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApiToken {
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub principal: Principal,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewRequest {
    pub host: String,
    pub login: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub duration_secs: u64,
    #[serde(default)]
    pub reason: String,
    /// The OpenSSH public key the grant is bound to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_key: Option<String>,
    /// crypt(3) hash of a one-time secret the requester made, for console or RDP logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RequestState {
    Pending,
    Approved,
    Denied,
    Expired,
    Revoked,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    Approve,
    Deny,
}

/// An approver's decision, as they send it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Review {
    pub decision: Decision,
    #[serde(default)]
    pub comment: String,
}

/// A decision as recorded: who, when, why, signed by the service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedReview {
    pub sub: String,
    pub name: String,
    pub decision: Decision,
    pub comment: String,
    /// Unix seconds.
    pub at: i64,
    /// Compact JWS by the service's issuer key over this review (without `signature`).
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Person {
    pub sub: String,
    pub name: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AccessRequest {
    pub id: String,
    pub requester: Person,
    pub host: String,
    pub login: String,
    pub profile: Option<String>,
    pub duration_secs: u64,
    pub reason: String,
    pub ssh_key: Option<String>,
    #[serde(default)]
    pub secret_requested: bool,
    pub state: RequestState,
    /// The policy rule that decided who may approve.
    pub policy: String,
    pub approvals_needed: u32,
    /// Unix seconds.
    pub created_at: i64,
    pub decided_at: Option<i64>,
    #[serde(default)]
    pub reviews: Vec<RecordedReview>,
    /// Set when a reviewer's approval was automatic (which rule).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_approved: Option<String>,
    pub grant_id: Option<String>,
    pub expires_at: Option<i64>,
    /// The compact JWT, only for the requester and only once approved.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked: Option<Revocation>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Revocation {
    pub by: Person,
    pub reason: String,
    pub at: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RevokeBody {
    #[serde(default)]
    pub reason: String,
}

/// A revoked grant an agent must end, until it would have expired anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedGrant {
    pub iss: String,
    pub jti: String,
    /// The grant's `exp`: after it, the agent may forget the revocation.
    pub exp: i64,
}

/// `GET /api/v1/agent/grants`: the whole picture for one host, so a missed answer loses
/// nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantFeed {
    pub revision: u64,
    /// Compact JWTs of every live grant for the host.
    pub grants: Vec<String>,
    pub revoked: Vec<RevokedGrant>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: i64,
    /// Unix seconds.
    pub at: i64,
    /// `request.created`, `request.approved`, `review.approve`, `review.deny`,
    /// `request.denied`, `grant.issued`, `grant.revoked`, `token.exchanged`,
    /// `token.refused`, `login`, `login.refused`, ...
    pub event: String,
    pub actor: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grant: Option<String>,
    #[serde(default)]
    pub detail: serde_json::Value,
}

/// RFC 8693's answer when a grant is issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    pub issued_token_type: String,
    pub token_type: String,
    pub expires_in: i64,
}

/// The token type of a grant issued by exchange.
pub const GRANT_TOKEN_TYPE: &str = "urn:usher:token-type:grant";
pub const TOKEN_EXCHANGE_GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const ID_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:id_token";
pub const JWT_TOKEN_TYPE: &str = "urn:ietf:params:oauth:token-type:jwt";

/// RFC 6749's error answer, with the pending request when a human must approve first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OAuthError {
    pub error: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// What a webhook receives.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookEvent {
    /// `request.created`, `request.decided`, `grant.revoked`
    pub event: String,
    pub request: AccessRequest,
    /// The page's address for this request.
    pub url: String,
}
