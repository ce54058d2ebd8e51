//! Commands inside sessions that wait for a person's approval (agent/src/guard/README.md,
//! "Requests and decisions"; the types are `usher_wire::approval`'s).
//!
//! An agent posts a `CommandRequest` for its own host (the host is its token's, never the
//! body's word); approvers decide on the page or through the API; the agent fetches the
//! outcome as a JWT signed with the service's issuer key (`typ` `usher-command+jwt`, `aud`
//! the host, `jti` the request id, a short `exp`) and verifies it as it verifies a grant. So
//! a stolen agent token can post and read requests of its host, but never approve one.
//!
//! Who decides: a principal with the approver role who matches the request's `approvers`
//! when the list is not empty (`group:NAME`: in that group; anything else: the principal's
//! `sub`, or its name, which is what the provider gave as `preferred_username` or `email`).
//! The request's own `sub` never decides it, and such an attempt is audited. `required`
//! distinct approvals approve; any denial denies; a request nobody decided by its
//! `expires_at` is expired (and expired is no decision: the agent denies).

use super::db::{Tx, Value};
use super::issuer::{Issuer, IssuerError};
use super::{
    audit, corrupt, has_role, Event, Subject, Workflow, WorkflowError, LIST_LIMIT, MAX_COMMENT,
};
use serde::{Deserialize, Serialize};
use usher_wire::approval::{
    CommandDecision, CommandRequest, CommandState, CommandStatus, DecisionAnswer, DecisionClaims,
    DECISION_JWT_TYPE,
};
use usher_wire::jit::{Decision, Principal, Review, Role};

/// The largest request body an agent may post.
pub const MAX_BODY_BYTES: usize = 32 * 1024;
/// How long a signed decision is good for: the agent is waiting for it as it is signed.
pub const DECISION_TTL_SECS: i64 = 60;
/// A command line, or the program's path, at most (the agent cuts longer ones).
const MAX_COMMAND_BYTES: usize = 4096;
/// A name (`sub`, login, grant id, an approver).
const MAX_NAME_BYTES: usize = 256;
const MAX_APPROVERS: usize = 64;
const MAX_REQUIRED: u32 = 16;
/// The longest a request may wait for a decision.
const MAX_PENDING_SECS: i64 = 24 * 3600;

/// Why a command request or a decision on one is refused.
#[derive(Debug, thiserror::Error)]
pub enum CommandRefusal {
    #[error("invalid command request: {0}")]
    Invalid(String),
    #[error("this host's token cannot speak for host {0:?}")]
    OtherHost(String),
    #[error("no command request {0}")]
    NoSuchCommand(String),
    #[error("command request {0} exists already")]
    IdTaken(String),
    #[error("the command request is {0:?}, not pending")]
    NotPending(CommandState),
    #[error("you cannot decide on a command of your own")]
    OwnCommand,
    #[error("you are not among this command's approvers")]
    NotListed,
    #[error("you have already decided on this command")]
    AlreadyDecided,
}

/// A command request as stored: the request, its state, and who decided what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCommand {
    pub request: CommandRequest,
    pub state: CommandState,
    #[serde(default)]
    pub reviews: Vec<CommandReview>,
    #[serde(default)]
    pub decided_at: Option<i64>,
}

/// One approver's decision, with the `sub` that makes approvers distinct.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReview {
    pub sub: String,
    #[serde(flatten)]
    pub decision: CommandDecision,
}

/// What a decision JWT carries: the decision's claims, and the requester as `sub` (every
/// Usher token verifier requires one).
#[derive(Debug, Serialize, Deserialize)]
pub struct SignedDecision {
    #[serde(flatten)]
    pub claims: DecisionClaims,
    pub sub: String,
}

impl StoredCommand {
    /// The state as of `now`, whether or not the sweeper has written it yet.
    pub fn effective_state(&self, now: i64) -> CommandState {
        match self.state {
            CommandState::Pending if now >= self.request.expires_at => CommandState::Expired,
            other => other,
        }
    }

    /// What people see: the request, its state now, the decisions.
    pub fn status(&self, now: i64) -> CommandStatus {
        CommandStatus {
            request: self.request.clone(),
            state: self.effective_state(now),
            decisions: self.reviews.iter().map(|r| r.decision.clone()).collect(),
        }
    }
}

fn state_name(s: CommandState) -> &'static str {
    match s {
        CommandState::Pending => "pending",
        CommandState::Approved => "approved",
        CommandState::Denied => "denied",
        CommandState::Expired => "expired",
        CommandState::Cancelled => "cancelled",
    }
}

fn invalid(why: impl Into<String>) -> CommandRefusal {
    CommandRefusal::Invalid(why.into())
}

fn check_name(field: &str, value: &str) -> Result<(), CommandRefusal> {
    if value.is_empty() || value.len() > MAX_NAME_BYTES || value.chars().any(char::is_control) {
        return Err(invalid(format!(
            "{field} must be 1-{MAX_NAME_BYTES} bytes without control characters"
        )));
    }
    Ok(())
}

/// Whether `request` may be stored for `host` at `now`: the host its token names, an id of
/// the agent's form, bounded texts, a sane count of approvers, a deadline still ahead.
pub fn validate(request: &CommandRequest, host: &str, now: i64) -> Result<(), CommandRefusal> {
    if request.host != host {
        return Err(CommandRefusal::OtherHost(request.host.clone()));
    }
    let hex = request.id.strip_prefix("apr-").unwrap_or("");
    if hex.len() != 32
        || !hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(invalid("id must be apr- and 32 lowercase hex digits"));
    }
    if !crate::store::valid_id(&request.session_id) {
        return Err(invalid("session_id is not a session id"));
    }
    check_name("grant", &request.grant)?;
    check_name("sub", &request.sub)?;
    check_name("login", &request.login)?;
    for (field, text) in [("program", &request.program), ("command", &request.command)] {
        if text.is_empty() || text.len() > MAX_COMMAND_BYTES || text.contains('\0') {
            return Err(invalid(format!(
                "{field} must be 1-{MAX_COMMAND_BYTES} bytes without NUL"
            )));
        }
    }
    if request.approvers.len() > MAX_APPROVERS {
        return Err(invalid(format!("at most {MAX_APPROVERS} approvers")));
    }
    for a in &request.approvers {
        check_name("an approver", a)?;
        if a.strip_prefix("group:").is_some_and(str::is_empty) {
            return Err(invalid("group: needs a group name"));
        }
    }
    if !(1..=MAX_REQUIRED).contains(&request.required) {
        return Err(invalid(format!("required must be 1-{MAX_REQUIRED}")));
    }
    if request.expires_at <= now {
        return Err(invalid("expires_at has passed"));
    }
    if request.expires_at > now + MAX_PENDING_SECS || request.requested_at > request.expires_at {
        return Err(invalid(
            "expires_at must be within a day, after requested_at",
        ));
    }
    Ok(())
}

/// Whether `who` is one of `approvers` (an empty list: anyone with the approver role).
pub fn is_listed(approvers: &[String], who: &Principal) -> bool {
    approvers.is_empty()
        || approvers.iter().any(|a| match a.strip_prefix("group:") {
            Some(group) => who.groups.iter().any(|g| g == group),
            // E-mail addresses compare without case; a `sub` exactly.
            None => *a == who.sub || (a.contains('@') && a.eq_ignore_ascii_case(&who.name)),
        })
}

/// Applies one review to a pending command (pure): whether it decided the command.
pub fn apply_review(
    c: &mut StoredCommand,
    who: &Principal,
    review: &Review,
    now: i64,
) -> Result<bool, WorkflowError> {
    if !has_role(who, Role::Approver) {
        return Err(WorkflowError::MissingRole(Role::Approver));
    }
    let state = c.effective_state(now);
    if state != CommandState::Pending {
        return Err(CommandRefusal::NotPending(state).into());
    }
    // Whatever name or role they hold now: the same `sub` is the same person.
    if c.request.sub == who.sub {
        return Err(CommandRefusal::OwnCommand.into());
    }
    if !is_listed(&c.request.approvers, who) {
        return Err(CommandRefusal::NotListed.into());
    }
    if c.reviews.iter().any(|r| r.sub == who.sub) {
        return Err(CommandRefusal::AlreadyDecided.into());
    }
    let approve = review.decision == Decision::Approve;
    c.reviews.push(CommandReview {
        sub: who.sub.clone(),
        decision: CommandDecision {
            by: who.name.clone(),
            approve,
            comment: review.comment.clone(),
            at: now,
        },
    });
    let approvals = c.reviews.iter().filter(|r| r.decision.approve).count() as u32;
    c.state = if !approve {
        CommandState::Denied
    } else if approvals >= c.request.required {
        CommandState::Approved
    } else {
        CommandState::Pending
    };
    let decided = c.state != CommandState::Pending;
    if decided {
        c.decided_at = Some(now);
    }
    Ok(decided)
}

/// The signed decision on `c`, once there is one (approved or denied), good from `now` for
/// [`DECISION_TTL_SECS`].
pub fn sign_decision(
    issuer: &Issuer,
    c: &StoredCommand,
    now: i64,
) -> Result<Option<String>, IssuerError> {
    let decided_by = |approve: bool| -> Vec<&CommandReview> {
        c.reviews
            .iter()
            .filter(|r| r.decision.approve == approve)
            .collect()
    };
    let reviews = match c.state {
        CommandState::Approved => decided_by(true),
        CommandState::Denied => decided_by(false),
        _ => return Ok(None),
    };
    let claims = SignedDecision {
        claims: DecisionClaims {
            iss: issuer.iss.clone(),
            aud: c.request.host.clone(),
            jti: c.request.id.clone(),
            iat: now,
            exp: now + DECISION_TTL_SECS,
            decision: c.state,
            by: reviews.iter().map(|r| r.decision.by.clone()).collect(),
            comment: reviews
                .last()
                .map(|r| r.decision.comment.clone())
                .unwrap_or_default(),
        },
        sub: c.request.sub.clone(),
    };
    issuer.sign_typed(DECISION_JWT_TYPE, &claims).map(Some)
}

fn load(tx: &mut dyn Tx, id: &str) -> Result<Option<(StoredCommand, String, i64)>, WorkflowError> {
    let rows = tx.query(
        "SELECT data, host, version FROM commands WHERE id = $1",
        &[id.into()],
    )?;
    let Some(row) = rows.first() else {
        return Ok(None);
    };
    let data = row
        .first()
        .and_then(Value::text)
        .ok_or_else(|| corrupt("data"))?;
    let host = row
        .get(1)
        .and_then(Value::text)
        .ok_or_else(|| corrupt("host"))?;
    let version = row
        .get(2)
        .and_then(Value::int)
        .ok_or_else(|| corrupt("version"))?;
    let stored: StoredCommand = serde_json::from_str(data).map_err(corrupt)?;
    Ok(Some((stored, host.to_string(), version)))
}

fn load_existing(tx: &mut dyn Tx, id: &str) -> Result<(StoredCommand, i64), WorkflowError> {
    load(tx, id)?
        .map(|(c, _, version)| (c, version))
        .ok_or_else(|| CommandRefusal::NoSuchCommand(id.to_string()).into())
}

/// Writes `c` over version `version`; `Retry` when another writer got there first.
fn save(tx: &mut dyn Tx, c: &StoredCommand, version: i64) -> Result<(), WorkflowError> {
    let data = serde_json::to_string(c).map_err(corrupt)?;
    let n = tx.execute(
        "UPDATE commands SET state = $1, data = $2, version = version + 1 WHERE id = $3 AND version = $4",
        &[
            state_name(c.state).into(),
            data.into(),
            c.request.id.clone().into(),
            version.into(),
        ],
    )?;
    if n == 1 {
        Ok(())
    } else {
        Err(WorkflowError::Retry)
    }
}

fn agent_actor(host: &str) -> String {
    format!("agent:{host}")
}

impl Workflow {
    /// Subscribes to changes of command requests made by this instance.
    pub fn watch_commands(&self) -> tokio::sync::watch::Receiver<u64> {
        self.command_changes.subscribe()
    }

    fn commands_changed(&self) {
        self.command_changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn emit_command(&self, name: &'static str, status: CommandStatus) {
        self.emit_event(Event {
            name,
            subject: Subject::Command(status),
        });
    }

    /// Stores a pending command request of `host` (the host its token names). The same
    /// request posted again (an agent retrying after a lost answer) is answered as stored.
    pub async fn submit_command(
        &self,
        host: &str,
        request: CommandRequest,
        now: i64,
    ) -> Result<CommandStatus, WorkflowError> {
        validate(&request, host, now)?;
        let host = host.to_string();
        let (status, fresh) = self
            .write(move |tx| {
                if let Some((stored, stored_host, _)) = load(tx, &request.id)? {
                    if stored_host == host && stored.request == request {
                        return Ok((stored.status(now), false));
                    }
                    return Err(CommandRefusal::IdTaken(request.id.clone()).into());
                }
                let c = StoredCommand {
                    request: request.clone(),
                    state: CommandState::Pending,
                    reviews: vec![],
                    decided_at: None,
                };
                let data = serde_json::to_string(&c).map_err(corrupt)?;
                tx.execute(
                    "INSERT INTO commands (id, host, sub, state, created_at, expires_at, version, data) VALUES ($1, $2, $3, $4, $5, $6, 0, $7)",
                    &[
                        request.id.clone().into(),
                        host.clone().into(),
                        request.sub.clone().into(),
                        state_name(c.state).into(),
                        now.into(),
                        request.expires_at.into(),
                        data.into(),
                    ],
                )?;
                audit(
                    tx,
                    now,
                    "command.requested",
                    &agent_actor(&host),
                    Some(&request.id),
                    Some(&request.grant),
                    serde_json::json!({"host": host, "session": request.session_id,
                        "sub": request.sub, "login": request.login, "kind": request.kind,
                        "program": request.program, "command": request.command,
                        "approvers": request.approvers, "required": request.required,
                        "expires_at": request.expires_at}),
                )?;
                Ok((c.status(now), true))
            })
            .await?;
        if fresh {
            self.commands_changed();
            self.emit_command("command.requested", status.clone());
        }
        Ok(status)
    }

    /// Command request `id` of `host` (another host's, or none: `NoSuchCommand`).
    pub async fn command_of_host(
        &self,
        host: &str,
        id: &str,
    ) -> Result<StoredCommand, WorkflowError> {
        let (host, id) = (host.to_string(), id.to_string());
        self.db
            .transaction(move |tx| match load(tx, &id)? {
                Some((c, stored_host, _)) if stored_host == host => Ok(c),
                _ => Err(CommandRefusal::NoSuchCommand(id.clone()).into()),
            })
            .await
    }

    /// What the agent gets for `c`: its state, and the signed decision once there is one.
    pub fn decision_answer(
        &self,
        c: &StoredCommand,
        now: i64,
    ) -> Result<DecisionAnswer, WorkflowError> {
        let state = c.effective_state(now);
        let decision = match state {
            CommandState::Approved | CommandState::Denied => sign_decision(&self.issuer, c, now)?,
            _ => None,
        };
        Ok(DecisionAnswer { state, decision })
    }

    /// The agent gave up on its request (the user pressed Ctrl-C, the session ended): a
    /// pending request is cancelled; a decided one stays as it is.
    pub async fn cancel_command(
        &self,
        host: &str,
        id: &str,
        now: i64,
    ) -> Result<StoredCommand, WorkflowError> {
        let (host, id) = (host.to_string(), id.to_string());
        let (c, changed) = self
            .write(move |tx| {
                let (mut c, version) = match load(tx, &id)? {
                    Some((c, stored_host, version)) if stored_host == host => (c, version),
                    _ => return Err(CommandRefusal::NoSuchCommand(id.clone()).into()),
                };
                if c.effective_state(now) != CommandState::Pending {
                    return Ok((c, false));
                }
                c.state = CommandState::Cancelled;
                c.decided_at = Some(now);
                save(tx, &c, version)?;
                audit(
                    tx,
                    now,
                    "command.cancelled",
                    &agent_actor(&host),
                    Some(&id),
                    Some(&c.request.grant),
                    serde_json::json!({"host": host}),
                )?;
                Ok((c, true))
            })
            .await?;
        if changed {
            self.commands_changed();
            self.emit_command("command.decided", c.status(now));
        }
        Ok(c)
    }

    /// Command requests for people: approvers, auditors and admins see all (newest first,
    /// at most 500), in `state` when given.
    pub async fn list_commands(
        &self,
        who: &Principal,
        state: Option<CommandState>,
        now: i64,
    ) -> Result<Vec<CommandStatus>, WorkflowError> {
        if !(has_role(who, Role::Approver) || has_role(who, Role::Auditor)) {
            return Err(WorkflowError::MissingRole(Role::Approver));
        }
        let only_pending = state == Some(CommandState::Pending);
        let stored = self
            .db
            .transaction(move |tx| {
                let rows = if only_pending {
                    tx.query(
                        "SELECT data FROM commands WHERE state = 'pending' ORDER BY created_at DESC, id LIMIT $1",
                        &[LIST_LIMIT.into()],
                    )?
                } else {
                    tx.query(
                        "SELECT data FROM commands ORDER BY created_at DESC, id LIMIT $1",
                        &[LIST_LIMIT.into()],
                    )?
                };
                rows.iter()
                    .map(|r| {
                        let text = r.first().and_then(Value::text).ok_or_else(|| corrupt("data"))?;
                        serde_json::from_str::<StoredCommand>(text).map_err(corrupt)
                    })
                    .collect::<Result<Vec<_>, WorkflowError>>()
            })
            .await?;
        Ok(stored
            .iter()
            .map(|c| c.status(now))
            .filter(|s| state.is_none_or(|st| s.state == st))
            .collect())
    }

    /// An approver's decision on a pending command. A refusal because of who is asking (the
    /// requester, someone not listed) is audited too.
    pub async fn review_command(
        &self,
        who: &Principal,
        id: &str,
        review: Review,
        now: i64,
    ) -> Result<CommandStatus, WorkflowError> {
        if review.comment.len() > MAX_COMMENT {
            return Err(WorkflowError::TooLong("comment"));
        }
        let (who_c, id_c) = (who.clone(), id.to_string());
        let attempted = review.decision;
        let result = self
            .write(move |tx| {
                let (mut c, version) = load_existing(tx, &id_c)?;
                let decided = apply_review(&mut c, &who_c, &review, now)?;
                save(tx, &c, version)?;
                let event = match review.decision {
                    Decision::Approve => "command.review.approve",
                    Decision::Deny => "command.review.deny",
                };
                audit(
                    tx,
                    now,
                    event,
                    &who_c.sub,
                    Some(&id_c),
                    Some(&c.request.grant),
                    serde_json::json!({"name": who_c.name, "comment": review.comment,
                        "host": c.request.host, "session": c.request.session_id}),
                )?;
                if decided {
                    let event = match c.state {
                        CommandState::Approved => "command.approved",
                        _ => "command.denied",
                    };
                    let by: Vec<&str> = c.reviews.iter().map(|r| r.decision.by.as_str()).collect();
                    audit(
                        tx,
                        now,
                        event,
                        &who_c.sub,
                        Some(&id_c),
                        Some(&c.request.grant),
                        serde_json::json!({"by": by, "host": c.request.host,
                            "command": c.request.command}),
                    )?;
                }
                Ok((c.status(now), decided))
            })
            .await;
        match result {
            Ok((status, decided)) => {
                self.commands_changed();
                if decided {
                    self.emit_command("command.decided", status.clone());
                }
                Ok(status)
            }
            Err(WorkflowError::Command(
                why @ (CommandRefusal::OwnCommand | CommandRefusal::NotListed),
            )) => {
                let detail = serde_json::json!({"name": who.name, "decision": attempted, "why": why.to_string()});
                if let Err(e) = self
                    .record("command.review.refused", &who.sub, Some(id), detail, now)
                    .await
                {
                    log::error!(target: "usher", "audit of a refused command review: {e}");
                }
                Err(why.into())
            }
            Err(e) => Err(e),
        }
    }

    /// Marks pending command requests past their `expires_at` as expired; returns how many.
    pub async fn expire_due_commands(&self, now: i64) -> Result<usize, WorkflowError> {
        let changed = self
            .write(move |tx| {
                let rows = tx.query(
                    "SELECT id FROM commands WHERE state = 'pending' AND expires_at <= $1 LIMIT 500",
                    &[now.into()],
                )?;
                let mut changed = vec![];
                for row in rows {
                    let Some(id) = row.first().and_then(Value::text) else { continue };
                    let (mut c, version) = load_existing(tx, id)?;
                    c.state = CommandState::Expired;
                    c.decided_at = Some(now);
                    save(tx, &c, version)?;
                    audit(tx, now, "command.expired", "service", Some(id), Some(&c.request.grant),
                        serde_json::json!({"host": c.request.host}))?;
                    changed.push(c.status(now));
                }
                Ok(changed)
            })
            .await?;
        if !changed.is_empty() {
            self.commands_changed();
        }
        let count = changed.len();
        for status in changed {
            self.emit_command("command.decided", status);
        }
        Ok(count)
    }
}
