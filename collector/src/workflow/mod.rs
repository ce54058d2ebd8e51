//! The just-in-time workflow (collector/WORKFLOW.md): requests, approvals, grants,
//! revocations, token exchange, and the audit trail of each step.
//!
//! [`Workflow`] is the in-process API: the HTTP routes (`routes.rs`), the page and the
//! tests call it with the principal and the time, and it decides, signs and records. Every
//! change is one transaction on the state store ([`db::Db`]) that also bumps the revision
//! counter, so agents' long-polls on any instance notice it.

pub mod commands;
pub mod db;
pub mod exchange;
pub mod issuer;
pub mod policy;
pub mod ratelimit;
pub mod routes;
pub mod webhook;

use crate::config::{AgentConfig, Config, RequestPolicy, Webhook};
use arc_swap::ArcSwap;
use db::{Db, DbError, Tx, Value};
use issuer::{Issuer, IssuerError};
use policy::PolicyRefusal;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use usher_wire::grant::{Audience, Claims};
use usher_wire::jit::{
    AccessRequest, AuditRecord, Decision, GrantFeed, NewRequest, Person, Principal, RecordedReview,
    RequestState, Review, Revocation, RevokedGrant, Role,
};

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Why the workflow refuses, or fails.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error(transparent)]
    Policy(#[from] PolicyRefusal),
    #[error("this needs the {0:?} role")]
    MissingRole(Role),
    #[error("no request {0}")]
    NoSuchRequest(String),
    #[error("no grant {0}")]
    NoSuchGrant(String),
    #[error("this is not your request")]
    NotYours,
    #[error("you cannot review your own request")]
    SelfApproval,
    #[error("you are not an approver for policy {0:?}")]
    NotAnApproverHere(String),
    #[error("you have already reviewed this request")]
    AlreadyReviewed,
    #[error("the request is {0:?}, not pending")]
    NotPending(RequestState),
    #[error("the grant is {0:?}, not live")]
    NotLive(RequestState),
    #[error("you may not revoke this grant")]
    MayNotRevoke,
    #[error("{0} is too long")]
    TooLong(&'static str),
    #[error("signing: {0}")]
    Sign(#[from] IssuerError),
    #[error("state store: {0}")]
    Db(#[from] DbError),
    #[error(transparent)]
    Command(#[from] commands::CommandRefusal),
    /// Another instance changed the request between read and write: read again.
    #[error("changed concurrently")]
    Retry,
}

/// A request as stored: what the API shows, and what deciding it later needs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredRequest {
    #[serde(flatten)]
    pub request: AccessRequest,
    /// The deciding rule's approver groups, as they were when it was requested.
    pub approver_groups: Vec<String>,
    pub secret_hash: Option<String>,
    /// Unix seconds after which a pending request has expired.
    pub pending_until: i64,
}

/// What a review's signature covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SignedReview {
    pub iss: String,
    pub request: String,
    pub sub: String,
    pub name: String,
    pub decision: Decision,
    pub comment: String,
    pub at: i64,
}

/// The parts of the configuration a reload replaces.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub roles: std::collections::BTreeMap<Role, Vec<String>>,
    pub request_policies: Vec<RequestPolicy>,
    pub hosts: Vec<AgentConfig>,
    pub webhooks: Vec<Webhook>,
    pub workloads: Vec<usher_trust::WorkloadRule>,
}

impl Policy {
    pub fn from_config(c: &Config) -> Policy {
        Policy {
            roles: c.roles.clone(),
            request_policies: c.request_policies.clone(),
            hosts: c.agents.clone(),
            webhooks: c.webhooks.clone(),
            workloads: c.workloads.clone(),
        }
    }
}

/// Something that happened, for the webhooks.
#[derive(Debug, Clone)]
pub struct Event {
    pub name: &'static str,
    pub subject: Subject,
}

/// What an event is about.
#[derive(Debug, Clone)]
pub enum Subject {
    Request(AccessRequest),
    /// A command waiting for approval inside a session (`commands.rs`).
    Command(usher_wire::approval::CommandStatus),
}

impl Subject {
    pub fn id(&self) -> &str {
        match self {
            Subject::Request(r) => &r.id,
            Subject::Command(c) => &c.request.id,
        }
    }
}

pub struct Workflow {
    pub db: Db,
    pub issuer: Arc<Issuer>,
    policy: ArcSwap<Policy>,
    /// The store's revision as this instance last saw it.
    revision: tokio::sync::watch::Sender<u64>,
    /// Bumped at each change to a command request made here: it wakes the agents' waits
    /// on their commands without waking every host's grant feed (`commands.rs`).
    command_changes: tokio::sync::watch::Sender<u64>,
    events: std::sync::Mutex<Option<tokio::sync::mpsc::Sender<Event>>>,
}

const MAX_COMMENT: usize = 2000;
const LIST_LIMIT: i64 = 500;

pub fn random_id(prefix: &str) -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{prefix}{}", hex::encode(bytes))
}

fn state_name(s: RequestState) -> &'static str {
    match s {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Revoked => "revoked",
        RequestState::Cancelled => "cancelled",
    }
}

pub fn person(p: &Principal) -> Person {
    Person {
        sub: p.sub.clone(),
        name: p.name.clone(),
    }
}

fn corrupt(e: impl std::fmt::Display) -> WorkflowError {
    WorkflowError::Db(DbError::Corrupt(e.to_string()))
}

/// Whether `p` holds `role` (admins hold every role).
pub fn has_role(p: &Principal, role: Role) -> bool {
    p.roles.contains(&role) || p.roles.contains(&Role::Admin)
}

fn require(p: &Principal, role: Role) -> Result<(), WorkflowError> {
    if has_role(p, role) {
        Ok(())
    } else {
        Err(WorkflowError::MissingRole(role))
    }
}

// ---- statements shared by both dialects ----

fn audit(
    tx: &mut dyn Tx,
    now: i64,
    event: &str,
    actor: &str,
    request: Option<&str>,
    grant: Option<&str>,
    detail: serde_json::Value,
) -> Result<(), DbError> {
    tx.execute(
        "INSERT INTO audit (at, event, actor, request_id, grant_id, detail) VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            now.into(),
            event.into(),
            actor.into(),
            request.map(String::from).into(),
            grant.map(String::from).into(),
            detail.to_string().into(),
        ],
    )?;
    Ok(())
}

fn bump_revision(tx: &mut dyn Tx) -> Result<u64, DbError> {
    let rows = tx.query(
        "UPDATE meta SET int_value = int_value + 1 WHERE key = 'revision' RETURNING int_value",
        &[],
    )?;
    rows.first()
        .and_then(|r| r.first())
        .and_then(Value::int)
        .map(|v| v as u64)
        .ok_or_else(|| DbError::Corrupt("no revision counter".into()))
}

fn load(tx: &mut dyn Tx, id: &str) -> Result<(StoredRequest, i64), WorkflowError> {
    let rows = tx.query(
        "SELECT data, version FROM requests WHERE id = $1",
        &[id.into()],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| WorkflowError::NoSuchRequest(id.to_string()))?;
    let data = row
        .first()
        .and_then(Value::text)
        .ok_or_else(|| corrupt("data"))?;
    let version = row
        .get(1)
        .and_then(Value::int)
        .ok_or_else(|| corrupt("version"))?;
    let stored: StoredRequest = serde_json::from_str(data).map_err(corrupt)?;
    Ok((stored, version))
}

fn deadline(s: &StoredRequest) -> i64 {
    match s.request.state {
        RequestState::Pending => s.pending_until,
        RequestState::Approved => s.request.expires_at.unwrap_or(i64::MAX),
        _ => i64::MAX,
    }
}

/// Writes `s` over version `version`; `Retry` when another writer got there first.
fn save(tx: &mut dyn Tx, s: &StoredRequest, version: i64) -> Result<(), WorkflowError> {
    let data = serde_json::to_string(s).map_err(corrupt)?;
    let n = tx.execute(
        "UPDATE requests SET state = $1, pending_until = $2, data = $3, version = version + 1 WHERE id = $4 AND version = $5",
        &[
            state_name(s.request.state).into(),
            deadline(s).into(),
            data.into(),
            s.request.id.clone().into(),
            version.into(),
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(WorkflowError::Retry)
    }
}

fn insert(tx: &mut dyn Tx, s: &StoredRequest) -> Result<(), WorkflowError> {
    let data = serde_json::to_string(s).map_err(corrupt)?;
    tx.execute(
        "INSERT INTO requests (id, requester_sub, host, state, created_at, pending_until, version, data) VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
        &[
            s.request.id.clone().into(),
            s.request.requester.sub.clone().into(),
            s.request.host.clone().into(),
            state_name(s.request.state).into(),
            s.request.created_at.into(),
            deadline(s).into(),
            data.into(),
        ],
    )?;
    Ok(())
}

impl Workflow {
    /// Opens the state store, loads (or, first of all instances, makes) the issuer key.
    /// Blocking: call it from `spawn_blocking` or before the runtime.
    pub fn open_blocking(config: &Config) -> Result<Workflow, WorkflowError> {
        let db = Db::open(&config.state, &config.data_dir)?;
        let secret = db.transaction_blocking(|tx| -> Result<[u8; 32], WorkflowError> {
            let fresh = hex::encode(Issuer::generate_secret());
            tx.execute(
                "INSERT INTO meta (key, text_value) VALUES ('issuer_key', $1) ON CONFLICT (key) DO NOTHING",
                &[fresh.into()],
            )?;
            let rows = tx.query("SELECT text_value FROM meta WHERE key = 'issuer_key'", &[])?;
            let text = rows
                .first()
                .and_then(|r| r.first())
                .and_then(Value::text)
                .ok_or_else(|| corrupt("no issuer key"))?;
            let bytes = hex::decode(text).map_err(corrupt)?;
            bytes.try_into().map_err(|_| corrupt("issuer key length"))
        })?;
        let issuer = Issuer::new(&config.public_url(), &secret)?;
        let workflow = Workflow {
            db,
            issuer: Arc::new(issuer),
            policy: ArcSwap::from_pointee(Policy::from_config(config)),
            revision: tokio::sync::watch::channel(0).0,
            command_changes: tokio::sync::watch::channel(0).0,
            events: std::sync::Mutex::new(None),
        };
        let rev = workflow.db.transaction_blocking(|tx| read_revision(tx))?;
        workflow.revision.send_replace(rev);
        Ok(workflow)
    }

    /// `open_blocking` off the async threads.
    pub async fn open(config: &Config) -> Result<Workflow, WorkflowError> {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Workflow::open_blocking(&config))
            .await
            .map_err(|e| WorkflowError::Db(DbError::Join(e.to_string())))?
    }

    pub fn policy(&self) -> Arc<Policy> {
        self.policy.load_full()
    }

    /// Replaces the reloadable part of the configuration.
    pub fn reload(&self, policy: Policy) {
        self.policy.store(Arc::new(policy));
    }

    /// Where events for the webhooks go (set by `webhook::spawn`).
    pub fn set_event_sink(&self, sink: tokio::sync::mpsc::Sender<Event>) {
        *self.events.lock().unwrap_or_else(|e| e.into_inner()) = Some(sink);
    }

    fn emit(&self, name: &'static str, request: &AccessRequest) {
        self.emit_event(Event {
            name,
            subject: Subject::Request(request.clone()),
        });
    }

    fn emit_event(&self, event: Event) {
        let sink = self
            .events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if let Some(sink) = sink {
            let (name, id) = (event.name, event.subject.id().to_string());
            if sink.try_send(event).is_err() {
                log::warn!(target: "usher", "webhook queue full: {name} for {id} not sent");
            }
        }
    }

    /// The principal with its roles as the current `[roles]` gives them to its groups. A
    /// token without groups (minted by `usher-collector token`) keeps the roles it names.
    pub fn effective(&self, mut p: Principal) -> Principal {
        if !p.groups.is_empty() {
            let policy = self.policy.load();
            p.roles = policy
                .roles
                .iter()
                .filter(|(_, groups)| groups.iter().any(|g| p.groups.contains(g)))
                .map(|(role, _)| *role)
                .collect();
        }
        p
    }

    /// Subscribes to the revision as this instance sees it.
    pub fn watch_revision(&self) -> tokio::sync::watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn saw_revision(&self, rev: u64) {
        self.revision.send_if_modified(|cur| {
            if rev > *cur {
                *cur = rev;
                true
            } else {
                false
            }
        });
    }

    /// Reads the store's revision (other instances' changes included) and tells waiters.
    pub async fn poll_revision(&self) -> Result<u64, WorkflowError> {
        let rev = self
            .db
            .transaction(|tx| read_revision(tx).map_err(WorkflowError::from))
            .await?;
        self.saw_revision(rev);
        Ok(rev)
    }

    /// Runs `work` in a transaction, again when another writer raced it.
    async fn write<T: Send + 'static>(
        &self,
        work: impl FnMut(&mut dyn Tx) -> Result<T, WorkflowError> + Send + Clone + 'static,
    ) -> Result<T, WorkflowError> {
        for _ in 0..8 {
            match self.db.transaction(work.clone()).await {
                Err(WorkflowError::Retry) => continue,
                other => return other,
            }
        }
        Err(WorkflowError::Retry)
    }

    // ---- requests ----

    /// A new request by `who`; approved at once when its rule approves it automatically.
    pub async fn create_request(
        &self,
        who: &Principal,
        new: NewRequest,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        require(who, Role::Requester)?;
        let policy = self.policy();
        let admitted = policy::admit(&policy.request_policies, &policy.hosts, who, &new, now)?;
        let rule = admitted.rule;
        let stored = StoredRequest {
            request: AccessRequest {
                id: random_id("req-"),
                requester: person(who),
                host: new.host.clone(),
                login: new.login.clone(),
                profile: new.profile.clone(),
                duration_secs: new.duration_secs,
                reason: new.reason.clone(),
                ssh_key: new.ssh_key.clone(),
                secret_requested: new.secret_hash.is_some(),
                state: RequestState::Pending,
                policy: rule.name.clone(),
                approvals_needed: rule.approvals,
                created_at: now,
                decided_at: None,
                reviews: vec![],
                auto_approved: None,
                grant_id: None,
                expires_at: None,
                grant: None,
                revoked: None,
            },
            approver_groups: rule.approver_groups.clone(),
            secret_hash: new.secret_hash.clone(),
            pending_until: now + rule.pending_ttl as i64,
        };
        let auto = admitted.auto_approved.then(|| rule.name.clone());
        let detail = serde_json::json!({"host": new.host, "login": new.login, "profile": new.profile,
            "duration_secs": new.duration_secs, "reason": new.reason, "policy": rule.name});
        self.store_new(stored, auto, &who.sub, detail, now).await
    }

    /// Stores a new request (approved and its grant issued at once when `auto` names the
    /// rule that approves it), audits it, and tells the webhooks. The answer carries the
    /// grant when one was issued: it goes to the requester.
    pub async fn store_new(
        &self,
        stored: StoredRequest,
        auto: Option<String>,
        actor: &str,
        detail: serde_json::Value,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        let issuer = self.issuer.clone();
        let actor = actor.to_string();
        let (request, rev) = self
            .write(move |tx| {
                let mut s = stored.clone();
                audit(
                    tx,
                    now,
                    "request.created",
                    &actor,
                    Some(&s.request.id),
                    None,
                    detail.clone(),
                )?;
                if let Some(rule_name) = &auto {
                    s.request.auto_approved = Some(rule_name.clone());
                    issue(tx, &issuer, &mut s, now, &format!("auto ({rule_name})"))?;
                    audit(
                        tx,
                        now,
                        "request.approved",
                        "auto",
                        Some(&s.request.id),
                        s.request.grant_id.as_deref(),
                        serde_json::json!({"auto": rule_name}),
                    )?;
                }
                // The grant is kept in its own table, never in the request's record.
                let grant = s.request.grant.take();
                insert(tx, &s)?;
                if let Some(grant) = &grant {
                    insert_grant(tx, &s, grant)?;
                }
                let rev = bump_revision(tx)?;
                s.request.grant = grant;
                Ok((s.request, rev))
            })
            .await?;
        self.saw_revision(rev);
        let mut public = request.clone();
        public.grant = None;
        self.emit("request.created", &public);
        if public.state == RequestState::Approved {
            self.emit("request.decided", &public);
        }
        Ok(request)
    }

    /// An approver's decision on a pending request. The N-th approval issues the grant,
    /// once, whatever other instances do at the same moment.
    pub async fn review(
        &self,
        who: &Principal,
        id: &str,
        review: Review,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        require(who, Role::Approver)?;
        if review.comment.len() > MAX_COMMENT {
            return Err(WorkflowError::TooLong("comment"));
        }
        let issuer = self.issuer.clone();
        let who = who.clone();
        let id = id.to_string();
        let (request, rev) = self
            .write(move |tx| {
                let (mut s, version) = load(tx, &id)?;
                let decided = apply_review(&issuer, &mut s, &who, &review, now)?;
                let recorded = s.request.reviews.last().cloned().ok_or(WorkflowError::Retry)?;
                let inserted = tx.execute(
                    "INSERT INTO reviews (request_id, sub, decision, at, signature) VALUES ($1, $2, $3, $4, $5) ON CONFLICT (request_id, sub) DO NOTHING",
                    &[id.clone().into(), who.sub.clone().into(),
                      format!("{:?}", review.decision).to_lowercase().into(), now.into(),
                      recorded.signature.clone().into()],
                )?;
                if inserted != 1 {
                    return Err(WorkflowError::AlreadyReviewed);
                }
                let event = match review.decision {
                    Decision::Approve => "review.approve",
                    Decision::Deny => "review.deny",
                };
                audit(tx, now, event, &who.sub, Some(&id), None,
                    serde_json::json!({"name": who.name, "comment": review.comment, "signature": recorded.signature}))?;
                let mut grant = None;
                if decided && s.request.state == RequestState::Approved {
                    let names: Vec<&str> = s.request.reviews.iter()
                        .filter(|r| r.decision == Decision::Approve).map(|r| r.name.as_str()).collect();
                    let approved_by = names.join(", ");
                    issue(tx, &issuer, &mut s, now, &approved_by)?;
                    grant = s.request.grant.take();
                    audit(tx, now, "request.approved", &who.sub, Some(&id), s.request.grant_id.as_deref(), serde_json::json!({}))?;
                } else if decided {
                    audit(tx, now, "request.denied", &who.sub, Some(&id), None, serde_json::json!({}))?;
                }
                save(tx, &s, version)?;
                if let Some(grant) = grant {
                    insert_grant(tx, &s, &grant)?;
                }
                let rev = bump_revision(tx)?;
                Ok((s.request, rev))
            })
            .await?;
        self.saw_revision(rev);
        if request.state != RequestState::Pending {
            self.emit("request.decided", &request);
        }
        Ok(request)
    }

    /// The requester withdraws a pending request.
    pub async fn cancel(
        &self,
        who: &Principal,
        id: &str,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        let who = who.clone();
        let id = id.to_string();
        let (request, rev) = self
            .write(move |tx| {
                let (mut s, version) = load(tx, &id)?;
                if s.request.requester.sub != who.sub {
                    return Err(WorkflowError::NotYours);
                }
                if s.request.state != RequestState::Pending || now >= s.pending_until {
                    return Err(WorkflowError::NotPending(effective_state(&s, now)));
                }
                s.request.state = RequestState::Cancelled;
                s.request.decided_at = Some(now);
                save(tx, &s, version)?;
                audit(
                    tx,
                    now,
                    "request.cancelled",
                    &who.sub,
                    Some(&id),
                    None,
                    serde_json::json!({}),
                )?;
                let rev = bump_revision(tx)?;
                Ok((s.request, rev))
            })
            .await?;
        self.saw_revision(rev);
        self.emit("request.decided", &request);
        Ok(request)
    }

    /// Ends a live grant: by an admin, an approver, or the person it was issued to.
    pub async fn revoke(
        &self,
        who: &Principal,
        grant_id: &str,
        reason: &str,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        if reason.len() > MAX_COMMENT {
            return Err(WorkflowError::TooLong("reason"));
        }
        let who = who.clone();
        let grant_id = grant_id.to_string();
        let reason = reason.to_string();
        let (request, rev) = self
            .write(move |tx| {
                let rows = tx.query("SELECT request_id, host, exp FROM grants WHERE jti = $1", &[grant_id.clone().into()])?;
                let row = rows.first().ok_or_else(|| WorkflowError::NoSuchGrant(grant_id.clone()))?;
                let request_id = row.first().and_then(Value::text).ok_or_else(|| corrupt("request_id"))?.to_string();
                let host = row.get(1).and_then(Value::text).ok_or_else(|| corrupt("host"))?.to_string();
                let exp = row.get(2).and_then(Value::int).ok_or_else(|| corrupt("exp"))?;
                let (mut s, version) = load(tx, &request_id)?;
                let own = s.request.requester.sub == who.sub;
                if !(own || has_role(&who, Role::Approver)) {
                    return Err(WorkflowError::MayNotRevoke);
                }
                let state = effective_state(&s, now);
                if state != RequestState::Approved {
                    return Err(WorkflowError::NotLive(state));
                }
                s.request.state = RequestState::Revoked;
                s.request.revoked = Some(Revocation { by: person(&who), reason: reason.clone(), at: now });
                save(tx, &s, version)?;
                let n = tx.execute(
                    "INSERT INTO revocations (jti, host, exp, at, by_sub, reason) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (jti) DO NOTHING",
                    &[grant_id.clone().into(), host.into(), exp.into(), now.into(), who.sub.clone().into(), reason.clone().into()],
                )?;
                if n != 1 {
                    return Err(WorkflowError::NotLive(RequestState::Revoked));
                }
                audit(tx, now, "grant.revoked", &who.sub, Some(&request_id), Some(&grant_id),
                    serde_json::json!({"name": who.name, "reason": reason}))?;
                let rev = bump_revision(tx)?;
                Ok((s.request, rev))
            })
            .await?;
        self.saw_revision(rev);
        self.emit("grant.revoked", &request);
        Ok(request)
    }

    /// Marks pending requests past their `pending_ttl` and grants past their `exp` as
    /// expired; returns how many.
    pub async fn expire_due(&self, now: i64) -> Result<usize, WorkflowError> {
        let (changed, rev) = self
            .write(move |tx| {
                let rows = tx.query(
                    "SELECT id FROM requests WHERE state IN ('pending', 'approved') AND pending_until <= $1 LIMIT 500",
                    &[now.into()],
                )?;
                let mut changed = vec![];
                for row in rows {
                    let Some(id) = row.first().and_then(Value::text) else { continue };
                    let (mut s, version) = load(tx, id)?;
                    let was = s.request.state;
                    s.request.state = RequestState::Expired;
                    if was == RequestState::Pending {
                        s.request.decided_at = Some(now);
                    }
                    save(tx, &s, version)?;
                    let event = if was == RequestState::Pending { "request.expired" } else { "grant.expired" };
                    audit(tx, now, event, "service", Some(id), s.request.grant_id.as_deref(), serde_json::json!({}))?;
                    changed.push(s.request);
                }
                let rev = if changed.is_empty() { None } else { Some(bump_revision(tx)?) };
                Ok((changed, rev))
            })
            .await?;
        if let Some(rev) = rev {
            self.saw_revision(rev);
        }
        for r in &changed {
            if r.grant_id.is_none() {
                self.emit("request.decided", r);
            }
        }
        Ok(changed.len())
    }

    /// Request `id` as `who` may see it: the requester (with the grant once approved), or
    /// an approver, auditor or admin.
    pub async fn get(
        &self,
        who: &Principal,
        id: &str,
        now: i64,
    ) -> Result<AccessRequest, WorkflowError> {
        let s = self.stored(id).await?;
        let own = s.request.requester.sub == who.sub;
        if !(own || has_role(who, Role::Approver) || has_role(who, Role::Auditor)) {
            return Err(WorkflowError::NotYours);
        }
        let mut request = s.request.clone();
        request.state = effective_state(&s, now);
        if own && request.state == RequestState::Approved {
            request.grant = self.grant_token(id).await?;
        }
        Ok(request)
    }

    /// A request as stored, with no access check: for the page (e.g. the replay page's
    /// "who requested, who approved, why") after it has checked the viewer's role.
    pub async fn stored(&self, id: &str) -> Result<StoredRequest, WorkflowError> {
        let id = id.to_string();
        self.db
            .transaction(move |tx| load(tx, &id).map(|(s, _)| s))
            .await
    }

    /// The request a grant (`jti`) was issued for, with no access check.
    pub async fn request_for_grant(&self, jti: &str) -> Result<AccessRequest, WorkflowError> {
        let jti = jti.to_string();
        self.db
            .transaction(move |tx| {
                let rows = tx.query(
                    "SELECT request_id FROM grants WHERE jti = $1",
                    &[jti.clone().into()],
                )?;
                let id = rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(Value::text)
                    .ok_or_else(|| WorkflowError::NoSuchGrant(jti.clone()))?
                    .to_string();
                load(tx, &id).map(|(s, _)| s.request)
            })
            .await
    }

    /// The grant issued for a request, if any (no access check).
    pub async fn grant_token(&self, request_id: &str) -> Result<Option<String>, WorkflowError> {
        let id = request_id.to_string();
        self.db
            .transaction(move |tx| {
                let rows = tx.query(
                    "SELECT token FROM grants WHERE request_id = $1",
                    &[id.clone().into()],
                )?;
                Ok(rows
                    .first()
                    .and_then(|r| r.first())
                    .and_then(Value::text)
                    .map(String::from))
            })
            .await
    }

    /// Requests `who` may see, newest first (at most 500): all of them for approvers,
    /// auditors and admins unless `mine`; else the requester's own.
    pub async fn list(
        &self,
        who: &Principal,
        state: Option<RequestState>,
        mine: bool,
        now: i64,
    ) -> Result<Vec<AccessRequest>, WorkflowError> {
        let everyone = !mine && (has_role(who, Role::Approver) || has_role(who, Role::Auditor));
        let sub = who.sub.clone();
        let stored = self
            .db
            .transaction(move |tx| {
                let rows = if everyone {
                    tx.query("SELECT data FROM requests ORDER BY created_at DESC, id LIMIT $1", &[LIST_LIMIT.into()])?
                } else {
                    tx.query(
                        "SELECT data FROM requests WHERE requester_sub = $1 ORDER BY created_at DESC, id LIMIT $2",
                        &[sub.clone().into(), LIST_LIMIT.into()],
                    )?
                };
                rows.iter()
                    .map(|r| {
                        let text = r.first().and_then(Value::text).ok_or_else(|| corrupt("data"))?;
                        serde_json::from_str::<StoredRequest>(text).map_err(corrupt)
                    })
                    .collect::<Result<Vec<_>, WorkflowError>>()
            })
            .await?;
        Ok(stored
            .into_iter()
            .map(|s| {
                let mut r = s.request.clone();
                r.state = effective_state(&s, now);
                r
            })
            .filter(|r| state.is_none_or(|st| r.state == st))
            .collect())
    }

    /// Audit records after `since` (a `seq`), for one request or all; at most 1000.
    pub async fn audit(
        &self,
        who: &Principal,
        request: Option<String>,
        since: i64,
    ) -> Result<Vec<AuditRecord>, WorkflowError> {
        require(who, Role::Auditor)?;
        self.db
            .transaction(move |tx| {
                let rows = match &request {
                    Some(r) => tx.query(
                        "SELECT seq, at, event, actor, request_id, grant_id, detail FROM audit WHERE seq > $1 AND request_id = $2 ORDER BY seq LIMIT 1000",
                        &[since.into(), r.clone().into()],
                    )?,
                    None => tx.query(
                        "SELECT seq, at, event, actor, request_id, grant_id, detail FROM audit WHERE seq > $1 ORDER BY seq LIMIT 1000",
                        &[since.into()],
                    )?,
                };
                rows.iter()
                    .map(|r| {
                        Ok(AuditRecord {
                            seq: r[0].int().ok_or_else(|| corrupt("seq"))?,
                            at: r[1].int().ok_or_else(|| corrupt("at"))?,
                            event: r[2].text().unwrap_or_default().to_string(),
                            actor: r[3].text().unwrap_or_default().to_string(),
                            request: r[4].text().map(String::from),
                            grant: r[5].text().map(String::from),
                            detail: serde_json::from_str(r[6].text().unwrap_or("null"))
                                .unwrap_or(serde_json::Value::Null),
                        })
                    })
                    .collect()
            })
            .await
    }

    /// Records an audit event outside the request flow (sign-ins, token exchanges).
    pub async fn record(
        &self,
        event: &'static str,
        actor: &str,
        request: Option<&str>,
        detail: serde_json::Value,
        now: i64,
    ) -> Result<(), WorkflowError> {
        let actor = actor.to_string();
        let request = request.map(String::from);
        self.db
            .transaction(move |tx| {
                audit(
                    tx,
                    now,
                    event,
                    &actor,
                    request.as_deref(),
                    None,
                    detail.clone(),
                )
                .map_err(WorkflowError::from)
            })
            .await
    }

    /// What an agent needs for `host`: every live grant and every revoked, unexpired one.
    pub async fn feed(&self, host: &str, now: i64) -> Result<GrantFeed, WorkflowError> {
        let host = host.to_string();
        let iss = self.issuer.iss.clone();
        let feed = self
            .db
            .transaction(move |tx| {
                let revision = read_revision(tx)?;
                let grants = tx
                    .query(
                        "SELECT g.token FROM grants g JOIN requests r ON r.id = g.request_id \
                         WHERE g.host = $1 AND g.exp > $2 AND r.state = 'approved' ORDER BY g.jti",
                        &[host.clone().into(), now.into()],
                    )?
                    .into_iter()
                    .filter_map(|r| r.first().and_then(Value::text).map(String::from))
                    .collect();
                let revoked = tx
                    .query(
                        "SELECT jti, exp FROM revocations WHERE host = $1 AND exp > $2 ORDER BY jti",
                        &[host.clone().into(), now.into()],
                    )?
                    .into_iter()
                    .filter_map(|r| {
                        Some(RevokedGrant {
                            iss: iss.clone(),
                            jti: r.first()?.text()?.to_string(),
                            exp: r.get(1)?.int()?,
                        })
                    })
                    .collect();
                Ok::<_, WorkflowError>(GrantFeed { revision, grants, revoked })
            })
            .await?;
        self.saw_revision(feed.revision);
        Ok(feed)
    }
}

fn read_revision(tx: &mut dyn Tx) -> Result<u64, DbError> {
    let rows = tx.query("SELECT int_value FROM meta WHERE key = 'revision'", &[])?;
    Ok(rows
        .first()
        .and_then(|r| r.first())
        .and_then(Value::int)
        .unwrap_or(0) as u64)
}

/// The state as of `now`, whether or not the sweeper has written it yet.
pub fn effective_state(s: &StoredRequest, now: i64) -> RequestState {
    match s.request.state {
        RequestState::Pending if now >= s.pending_until => RequestState::Expired,
        RequestState::Approved if s.request.expires_at.is_some_and(|e| now >= e) => {
            RequestState::Expired
        }
        other => other,
    }
}

/// Applies one review to a pending request (pure but for the signature). Returns whether
/// it decided the request (a denial, or the last approval needed).
pub fn apply_review(
    issuer: &Issuer,
    s: &mut StoredRequest,
    who: &Principal,
    review: &Review,
    now: i64,
) -> Result<bool, WorkflowError> {
    let state = effective_state(s, now);
    if state != RequestState::Pending {
        return Err(WorkflowError::NotPending(state));
    }
    // Whatever name or role they use now: the same `sub` is the same person.
    if s.request.requester.sub == who.sub {
        return Err(WorkflowError::SelfApproval);
    }
    if !has_role(who, Role::Approver) || !s.approver_groups.iter().any(|g| who.groups.contains(g)) {
        return Err(WorkflowError::NotAnApproverHere(s.request.policy.clone()));
    }
    if s.request.reviews.iter().any(|r| r.sub == who.sub) {
        return Err(WorkflowError::AlreadyReviewed);
    }
    let signed = SignedReview {
        iss: issuer.iss.clone(),
        request: s.request.id.clone(),
        sub: who.sub.clone(),
        name: who.name.clone(),
        decision: review.decision,
        comment: review.comment.clone(),
        at: now,
    };
    let signature = issuer.sign(&signed)?;
    s.request.reviews.push(RecordedReview {
        sub: who.sub.clone(),
        name: who.name.clone(),
        decision: review.decision,
        comment: review.comment.clone(),
        at: now,
        signature,
    });
    let approvals = s
        .request
        .reviews
        .iter()
        .filter(|r| r.decision == Decision::Approve)
        .count() as u32;
    let decided = match review.decision {
        Decision::Deny => {
            s.request.state = RequestState::Denied;
            true
        }
        Decision::Approve if approvals >= s.request.approvals_needed => {
            s.request.state = RequestState::Approved;
            true
        }
        Decision::Approve => false,
    };
    if decided {
        s.request.decided_at = Some(now);
    }
    Ok(decided)
}

/// Signs the grant for an approved request; leaves the JWT in `request.grant` for the
/// caller to store, and audits it.
fn issue(
    tx: &mut dyn Tx,
    issuer: &Issuer,
    s: &mut StoredRequest,
    now: i64,
    approved_by: &str,
) -> Result<(), WorkflowError> {
    let jti = random_id("g-");
    let exp = now + s.request.duration_secs as i64;
    let claims = Claims {
        iss: issuer.iss.clone(),
        aud: Audience::One(s.request.host.clone()),
        sub: s.request.requester.sub.clone(),
        login: s.request.login.clone(),
        jti: jti.clone(),
        iat: now,
        exp,
        ssh_keys: s.request.ssh_key.iter().cloned().collect(),
        secret_hash: s.secret_hash.clone(),
        profile: s.request.profile.clone(),
        approved_by: Some(approved_by.to_string()),
        reason: Some(s.request.reason.clone()),
        request: Some(s.request.id.clone()),
        nbf: None,
        groups: Vec::new(),
    };
    let token = issuer.sign(&claims)?;
    s.request.state = RequestState::Approved;
    s.request.decided_at = Some(now);
    s.request.grant_id = Some(jti.clone());
    s.request.expires_at = Some(exp);
    s.request.grant = Some(token);
    audit(
        tx,
        now,
        "grant.issued",
        "service",
        Some(&s.request.id),
        Some(&jti),
        serde_json::json!({"host": claims.aud, "login": claims.login, "exp": exp, "approved_by": approved_by}),
    )?;
    Ok(())
}

/// Stores an issued grant; the request id is unique in `grants`, so a second issue for
/// the same request fails the transaction instead of making two grants.
fn insert_grant(tx: &mut dyn Tx, s: &StoredRequest, token: &str) -> Result<(), WorkflowError> {
    let jti = s
        .request
        .grant_id
        .clone()
        .ok_or_else(|| corrupt("grant without id"))?;
    let n = tx.execute(
        "INSERT INTO grants (jti, request_id, host, sub, exp, token) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (request_id) DO NOTHING",
        &[
            jti.into(),
            s.request.id.clone().into(),
            s.request.host.clone().into(),
            s.request.requester.sub.clone().into(),
            s.request.expires_at.unwrap_or(0).into(),
            token.into(),
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(WorkflowError::Retry)
    }
}
