//! Approval of risky commands (see ../README.md): the requests of the host, the kernel's
//! hold on an exec (fanotify + the BPF permit), and the central service's decisions.
//!
//! `Approvals` is the host's one registry: the sessions whose profiles hold programs, the
//! requests waiting, and the last ones decided. A request ends exactly once (approved,
//! denied, expired, cancelled); whoever ends it answers the waiting exec.

pub mod central;
pub mod hold;
pub mod proc_info;

use crate::enforce::policy::file_key;
use crate::profile::ApprovalPolicy;
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use usher_ebpf_common::FileKey;
use usher_wire::approval::{
    CommandDecision, CommandKind, CommandRequest, CommandState, CommandStatus,
};

/// How many decided requests `usher approvals` still shows.
const RECENT: usize = 100;
/// How long an approved exec's permit waits for the exec to reach the kernel's check.
const PERMIT_TTL: Duration = Duration::from_secs(10);
/// Requests one session may have waiting: more are refused at once (a loop of held execs
/// must not grow the agent's memory or the approvers' list without bound).
const PENDING_PER_SESSION: usize = 8;
/// The longest command line kept in a request.
const COMMAND_MAX: usize = 4096;

/// What a session's relay is told: an audit line and cast marker, and what the client's
/// terminal is told.
#[derive(Debug, Clone)]
pub struct Notice {
    pub line: serde_json::Value,
    pub marker: String,
    pub say: String,
}

/// The session facts a request carries.
#[derive(Debug, Clone)]
pub struct SessionFacts {
    pub session_id: String,
    pub grant: String,
    pub sub: String,
    pub login: String,
    /// The profile's masking: a secret on a held command line is masked before the
    /// request is shown, audited or sent anywhere.
    pub mask: Option<Arc<crate::guard::mask::MaskRules>>,
}

struct SessionEntry {
    facts: SessionFacts,
    policy: ApprovalPolicy,
    /// The approval-class files, and the directories whose files are.
    files: HashSet<FileKey>,
    notices: mpsc::Sender<Notice>,
}

struct Pending {
    status: CommandStatus,
    cgroup_id: u64,
    /// Told the outcome once: true lets the command run.
    answer: Option<oneshot::Sender<bool>>,
}

#[derive(Default)]
struct Inner {
    sessions: HashMap<u64, SessionEntry>,
    pending: HashMap<String, Pending>,
    recent: VecDeque<CommandStatus>,
}

/// Writes the BPF permit of an approved exec (the enforcer's `permit`).
pub type PermitFn = Box<dyn Fn(u32, FileKey, Duration) -> Result<(), String> + Send + Sync>;

/// Who asks to decide, as the control socket knows them.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    pub pid: Option<i32>,
    /// `SUDO_USER` when root acts for someone, else the uid's name.
    pub name: String,
    /// The caller runs inside one of the host's sessions (any profile).
    pub inside_session: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecideError {
    #[error("no pending request {0}")]
    NotPending(String),
    #[error("a process inside a session may not decide approvals")]
    InsideSession,
    #[error("{0} may not decide a request of their own")]
    OwnRequest(String),
    #[error("{0} has already decided this request")]
    AlreadyDecided(String),
}

pub struct Approvals {
    host: String,
    inner: Mutex<Inner>,
    permit: OnceLock<PermitFn>,
    hold: OnceLock<Arc<hold::ExecHold>>,
    /// The central service, when `[service]` is configured: requests go to its page too.
    central: OnceLock<Arc<central::Central>>,
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn now() -> i64 {
    crate::grant::now()
}

/// The session guard of one session: its notices, and its entry in the registry while it
/// lives.
pub struct SessionGuard {
    approvals: Arc<Approvals>,
    cgroup_id: u64,
    pub notices: Option<mpsc::Receiver<Notice>>,
    commands: Vec<String>,
}

impl std::fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGuard")
            .field("cgroup_id", &self.cgroup_id)
            .finish()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.approvals.detach(self.cgroup_id);
    }
}

impl Approvals {
    pub fn new(host: &str) -> Arc<Approvals> {
        Arc::new(Approvals {
            host: host.to_string(),
            inner: Mutex::new(Inner::default()),
            permit: OnceLock::new(),
            hold: OnceLock::new(),
            central: OnceLock::new(),
        })
    }

    /// Starts holding execs in the kernel (fanotify). Without it, approval-class programs
    /// are killed by the exec tracepoint (no permit): closed, never open.
    pub fn start_hold(self: &Arc<Self>, permit: PermitFn) -> Result<(), String> {
        let _ = self.permit.set(permit);
        let hold = hold::ExecHold::start(Arc::downgrade(self))?;
        let _ = self.hold.set(hold);
        Ok(())
    }

    /// Requests are posted to the central service, whose signed decisions count.
    pub fn use_central(&self, central: central::Central) {
        let _ = self.central.set(Arc::new(central));
    }

    fn is_pending(&self, id: &str) -> bool {
        lock(&self.inner).pending.contains_key(id)
    }

    /// Posts the request to the central service and waits for its signed decision while
    /// the request is pending here; a request that ended here first is withdrawn there.
    async fn follow_central(
        self: Arc<Self>,
        central: Arc<central::Central>,
        request: CommandRequest,
    ) {
        const RETRY: Duration = Duration::from_secs(2);
        let id = request.id.clone();
        while self.is_pending(&id) {
            match central.submit(&request).await {
                Ok(()) => break,
                Err(e) => {
                    log::warn!(target: "usher::approval", "request {id}: the central service did not take it ({e}); retrying");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        while self.is_pending(&id) {
            match central.wait(&id).await {
                Ok(None) => {}
                Ok(Some(claims)) => {
                    let approve = claims.decision == CommandState::Approved;
                    let decisions = claims
                        .by
                        .iter()
                        .map(|by| CommandDecision {
                            by: by.clone(),
                            approve,
                            comment: claims.comment.clone(),
                            at: claims.iat,
                        })
                        .collect();
                    let why = if approve { "approved" } else { "denied" };
                    self.end(&id, claims.decision, decisions, why);
                    return;
                }
                Err(central::Error::NoDecision(state)) => {
                    log::info!(target: "usher::approval", "request {id}: ended at the central service without a decision ({state:?})");
                    break;
                }
                Err(e) => {
                    // Never an approval: the request waits on (and times out here).
                    log::warn!(target: "usher::approval", "request {id}: no decision from the central service: {e}");
                    tokio::time::sleep(RETRY).await;
                }
            }
        }
        if let Err(e) = central.cancel(&id).await {
            log::debug!(target: "usher::approval", "request {id}: withdrawing it at the central service: {e}");
        }
    }

    pub fn is_holding(&self) -> bool {
        self.hold.get().is_some()
    }

    /// A session starts: its approval-class files are marked, and its relay gets the
    /// notices. `None` when the profile holds nothing.
    pub fn attach(
        self: &Arc<Self>,
        cgroup_id: u64,
        facts: SessionFacts,
        approve: &[PathBuf],
        commands: &[String],
        policy: &ApprovalPolicy,
    ) -> Option<SessionGuard> {
        if approve.is_empty() && commands.is_empty() {
            return None;
        }
        let (tx, rx) = mpsc::channel(64);
        let mut files = HashSet::new();
        let mut marked = Vec::new();
        for path in approve {
            let Ok(meta) = std::fs::metadata(path) else {
                continue;
            };
            if let Ok(key) = file_key(path) {
                files.insert(key);
            }
            marked.push((path.clone(), meta.is_dir()));
        }
        if let Some(hold) = self.hold.get() {
            hold.mark(cgroup_id, &marked);
        }
        lock(&self.inner).sessions.insert(
            cgroup_id,
            SessionEntry {
                facts,
                policy: policy.clone(),
                files,
                notices: tx,
            },
        );
        Some(SessionGuard {
            approvals: self.clone(),
            cgroup_id,
            notices: Some(rx),
            commands: commands.to_vec(),
        })
    }

    fn detach(&self, cgroup_id: u64) {
        if let Some(hold) = self.hold.get() {
            hold.unmark(cgroup_id);
        }
        let ids: Vec<String> = {
            let mut inner = lock(&self.inner);
            inner.sessions.remove(&cgroup_id);
            inner
                .pending
                .iter()
                .filter(|(_, p)| p.cgroup_id == cgroup_id)
                .map(|(id, _)| id.clone())
                .collect()
        };
        for id in ids {
            self.end(
                &id,
                CommandState::Cancelled,
                Vec::new(),
                "the session ended",
            );
        }
    }

    /// Whether `file` (or the directory it is in) is held for approval in the session of
    /// `cgroup_id`.
    fn holds(&self, cgroup_id: u64, file: FileKey, dir: Option<FileKey>) -> bool {
        let inner = lock(&self.inner);
        inner
            .sessions
            .get(&cgroup_id)
            .is_some_and(|s| s.files.contains(&file) || dir.is_some_and(|d| s.files.contains(&d)))
    }

    /// Opens a request for a command of the session in `cgroup_id`; the receiver says
    /// whether it may run. `None` when the session is not (or no longer) known.
    fn open(
        self: &Arc<Self>,
        cgroup_id: u64,
        kind: CommandKind,
        program: String,
        command: String,
    ) -> Option<(String, oneshot::Receiver<bool>)> {
        let (tx, rx) = oneshot::channel();
        let id = new_request_id();
        let (status, notices, too_many) = {
            let mut inner = lock(&self.inner);
            let waiting = inner
                .pending
                .values()
                .filter(|p| p.cgroup_id == cgroup_id)
                .count();
            let session = inner.sessions.get(&cgroup_id)?;
            let command = masked(session.facts.mask.as_ref(), command);
            let program = masked(session.facts.mask.as_ref(), program);
            let requested_at = now();
            let status = CommandStatus {
                request: CommandRequest {
                    id: id.clone(),
                    host: self.host.clone(),
                    session_id: session.facts.session_id.clone(),
                    grant: session.facts.grant.clone(),
                    sub: session.facts.sub.clone(),
                    login: session.facts.login.clone(),
                    kind,
                    program,
                    command: truncate(command, COMMAND_MAX),
                    approvers: session.policy.approvers.clone(),
                    required: session.policy.required.max(1),
                    requested_at,
                    expires_at: requested_at + session.policy.timeout_secs as i64,
                },
                state: CommandState::Pending,
                decisions: Vec::new(),
            };
            let notices = session.notices.clone();
            inner.pending.insert(
                id.clone(),
                Pending {
                    status: status.clone(),
                    cgroup_id,
                    answer: Some(tx),
                },
            );
            (status, notices, waiting >= PENDING_PER_SESSION)
        };
        let r = &status.request;
        let who = if r.approvers.is_empty() {
            "an approver, or root on this host (usher approve)".to_string()
        } else {
            format!(
                "{} (or root on this host: usher approve)",
                r.approvers.join(", ")
            )
        };
        audit!("approval_requested", request = r.id.as_str(), session = r.session_id.as_str(), sub = r.sub.as_str(), program = r.program.as_str(), command = r.command.as_str();
            "request {}: {} in session {} waits for approval", r.id, r.command, r.session_id);
        let _ = notices.try_send(Notice {
            line: serde_json::json!({"event": "approval_requested", "time": crate::record::rfc3339_now(), "request": r}),
            marker: format!("approval requested {}: {}", r.id, r.command),
            say: format!(
                "request {} waits for approval: {}\r\n       approvers: {who}; {} of them; Ctrl-C cancels; denied after {} s",
                r.id,
                r.command,
                r.required,
                r.expires_at - r.requested_at
            ),
        });
        if too_many {
            self.end(
                &id,
                CommandState::Denied,
                Vec::new(),
                "too many commands of this session already wait",
            );
            return Some((id, rx));
        }
        if let Some(central) = self.central.get() {
            tokio::spawn(self.clone().follow_central(central.clone(), r.clone()));
        }
        // No decision in time is a denial.
        let me = self.clone();
        let timeout_id = id.clone();
        let timeout = Duration::from_secs((r.expires_at - r.requested_at).max(0) as u64);
        tokio::spawn(async move {
            tokio::time::sleep(timeout).await;
            me.end(
                &timeout_id,
                CommandState::Expired,
                Vec::new(),
                "no decision in time",
            );
        });
        Some((id, rx))
    }

    /// Ends a request once: the exec (or exec request) is answered, the session told, the
    /// audit written. Later calls for the same request do nothing.
    fn end(
        &self,
        id: &str,
        state: CommandState,
        decisions: Vec<CommandDecision>,
        why: &str,
    ) -> Option<CommandStatus> {
        let (status, answer, notices) = {
            let mut inner = lock(&self.inner);
            let mut pending = inner.pending.remove(id)?;
            pending.status.state = state;
            pending.status.decisions.extend(decisions);
            let notices = inner
                .sessions
                .get(&pending.cgroup_id)
                .map(|s| s.notices.clone());
            inner.recent.push_front(pending.status.clone());
            inner.recent.truncate(RECENT);
            (pending.status, pending.answer.take(), notices)
        };
        let r = &status.request;
        let by: Vec<&str> = status.decisions.iter().map(|d| d.by.as_str()).collect();
        let by = by.join(", ");
        let (event, say) = match state {
            CommandState::Approved => (
                "approval_granted",
                format!("request {} approved by {by}", r.id),
            ),
            CommandState::Denied => (
                "approval_denied",
                format!("request {} denied by {by}: {} was not run", r.id, r.command),
            ),
            CommandState::Expired => (
                "approval_expired",
                format!(
                    "request {} not approved in time: {} was not run",
                    r.id, r.command
                ),
            ),
            _ => (
                "approval_cancelled",
                format!(
                    "request {} cancelled ({why}): {} was not run",
                    r.id, r.command
                ),
            ),
        };
        audit!("approval_decided", request = r.id.as_str(), session = r.session_id.as_str(), outcome = event, by = by.as_str(), reason = why;
            "request {}: {event} ({why})", r.id);
        if let Some(n) = notices {
            let _ = n.try_send(Notice {
                line: serde_json::json!({"event": event, "time": crate::record::rfc3339_now(), "request": r.id, "state": state, "decisions": status.decisions, "reason": why}),
                marker: format!("{event} {}", r.id),
                say,
            });
        }
        if let Some(answer) = answer {
            let _ = answer.send(state == CommandState::Approved);
        }
        Some(status)
    }

    /// Pending requests first (oldest first), then the last ones decided.
    pub fn list(&self) -> Vec<CommandStatus> {
        let inner = lock(&self.inner);
        let mut pending: Vec<CommandStatus> =
            inner.pending.values().map(|p| p.status.clone()).collect();
        pending.sort_by_key(|s| s.request.requested_at);
        pending.extend(inner.recent.iter().cloned());
        pending
    }

    /// A decision by someone on this host (root, over the control socket).
    pub fn decide_on_host(
        &self,
        id: &str,
        approve: bool,
        comment: &str,
        caller: &Caller,
    ) -> Result<CommandStatus, DecideError> {
        if let Some(pid) = caller.pid {
            if caller.inside_session
                || proc_info::cgroup_id_of(pid)
                    .is_some_and(|cg| lock(&self.inner).sessions.contains_key(&cg))
            {
                audit!("approval_refused", request = id, by = caller.name.as_str(), reason = "inside a session"; "request {id}: a caller inside a session tried to decide it");
                return Err(DecideError::InsideSession);
            }
        }
        let by = format!("{}@{}", caller.name, self.host);
        self.decide(id, approve, comment, &caller.name, by)
    }

    /// Records one approver's answer; ends the request when it is a denial or the last
    /// approval needed. `name` is checked against the request's own subject and login.
    fn decide(
        &self,
        id: &str,
        approve: bool,
        comment: &str,
        name: &str,
        by: String,
    ) -> Result<CommandStatus, DecideError> {
        let decision = CommandDecision {
            by: by.clone(),
            approve,
            comment: comment.to_string(),
            at: now(),
        };
        let enough = {
            let mut inner = lock(&self.inner);
            let pending = inner
                .pending
                .get_mut(id)
                .ok_or_else(|| DecideError::NotPending(id.to_string()))?;
            let r = &pending.status.request;
            if is_own(name, &r.sub, &r.login) {
                audit!("approval_refused", request = id, by = by.as_str(), reason = "own request"; "request {id}: {by} may not decide their own command");
                return Err(DecideError::OwnRequest(name.to_string()));
            }
            if pending.status.decisions.iter().any(|d| d.by == by) {
                return Err(DecideError::AlreadyDecided(by));
            }
            if !approve {
                None
            } else {
                pending.status.decisions.push(decision.clone());
                let approvals = pending
                    .status
                    .decisions
                    .iter()
                    .filter(|d| d.approve)
                    .count();
                Some(approvals as u32 >= pending.status.request.required)
            }
        };
        let ended = match enough {
            None => self.end(id, CommandState::Denied, vec![decision], "denied"),
            Some(true) => self.end(id, CommandState::Approved, Vec::new(), "approved"),
            Some(false) => {
                audit!("approval_given", request = id, by = by.as_str(); "request {id}: approved by {by}, more approvals needed");
                return lock(&self.inner)
                    .pending
                    .get(id)
                    .map(|p| p.status.clone())
                    .ok_or_else(|| DecideError::NotPending(id.to_string()));
            }
        };
        ended.ok_or_else(|| DecideError::NotPending(id.to_string()))
    }

    /// A held exec from the kernel: `Some(true)` to let it run at once (not ours to hold),
    /// otherwise the request's receiver.
    fn held_exec(
        self: &Arc<Self>,
        pid: i32,
        file: FileKey,
        dir: Option<FileKey>,
        program: String,
    ) -> Option<(String, oneshot::Receiver<bool>)> {
        let cgroup_id = proc_info::cgroup_id_of(pid)?;
        if !self.holds(cgroup_id, file, dir) {
            return None;
        }
        let command = proc_info::exec_command_line(pid).unwrap_or_else(|| program.clone());
        self.open(cgroup_id, CommandKind::Exec, program, command)
    }

    /// Cancels the request of a process that went away while it waited (Ctrl-C).
    fn process_gone(&self, id: &str) {
        self.end(
            id,
            CommandState::Cancelled,
            Vec::new(),
            "the process was interrupted",
        );
    }

    fn write_permit(&self, tgid: u32, file: FileKey) -> Result<(), String> {
        match self.permit.get() {
            Some(p) => p(tgid, file, PERMIT_TTL),
            None => Err("no permit writer".into()),
        }
    }
}

/// What becomes of an SSH exec request under the profile's `approve_commands`.
pub enum SshExecGate {
    /// No pattern matches: it starts.
    Free,
    /// It waits for this request: true when it may start.
    Held(String, oneshot::Receiver<bool>),
}

impl SessionGuard {
    /// An SSH exec request is matched before anything starts.
    pub fn ssh_exec_gate(&self, command: &str) -> SshExecGate {
        if !self.commands.iter().any(|p| glob_match(p, command)) {
            return SshExecGate::Free;
        }
        match self.approvals.open(
            self.cgroup_id,
            CommandKind::SshExec,
            command.to_string(),
            command.to_string(),
        ) {
            Some((id, rx)) => SshExecGate::Held(id, rx),
            None => {
                // The session is not in the registry: nobody could approve it.
                let (tx, rx) = oneshot::channel();
                let _ = tx.send(false);
                SshExecGate::Held(String::new(), rx)
            }
        }
    }

    /// The client went away (or pressed Ctrl-C) while its request waited.
    pub fn cancel(&self, id: &str, why: &str) {
        self.approvals
            .end(id, CommandState::Cancelled, Vec::new(), why);
    }
}

/// Whether `name` (an approver) is the requester: the grant's subject (or its local part)
/// or the session's account.
fn is_own(name: &str, sub: &str, login: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    let sub = sub.trim().to_ascii_lowercase();
    let local = sub.split('@').next().unwrap_or(&sub);
    name == sub || name == local || name == login.to_ascii_lowercase()
}

pub use usher_wire::glob_match;

/// `text` as the profile's masking shows it.
fn masked(rules: Option<&Arc<crate::guard::mask::MaskRules>>, text: String) -> String {
    let Some(rules) = rules else { return text };
    let mut masker = crate::guard::mask::Masker::new(rules.clone());
    let mut out = masker
        .push(text.as_bytes(), std::time::Instant::now(), true)
        .out;
    out.extend(masker.finish().out);
    String::from_utf8_lossy(&out).into_owned()
}

fn new_request_id() -> String {
    let bytes: [u8; 16] = rand::random();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("apr-{hex}")
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_whole_command_lines() {
        assert!(glob_match("systemctl *", "systemctl restart nginx"));
        assert!(glob_match("reboot*", "reboot"));
        assert!(!glob_match("systemctl *", "sudo systemctl restart"));
        assert!(glob_match("*rm -rf*", "cd /; rm -rf /tmp/x"));
        assert!(!glob_match("ls", "ls -la"));
    }

    #[test]
    fn the_requester_is_recognised_by_subject_local_part_and_login() {
        assert!(is_own(
            "alice@example.com",
            "alice@example.com",
            "jit-alice"
        ));
        assert!(is_own("Alice", "alice@example.com", "jit-alice"));
        assert!(is_own("jit-alice", "alice@example.com", "jit-alice"));
        assert!(!is_own("bob", "alice@example.com", "jit-alice"));
    }

    fn facts() -> SessionFacts {
        SessionFacts {
            session_id: "s1".into(),
            grant: "g1".into(),
            sub: "alice@example.com".into(),
            login: "jit-alice".into(),
            mask: None,
        }
    }

    #[tokio::test]
    async fn n_of_m_distinct_approvers_and_never_the_requester() {
        let approvals = Approvals::new("host1");
        let policy = ApprovalPolicy {
            approvers: vec![],
            required: 2,
            timeout_secs: 60,
        };
        let guard = approvals
            .attach(7, facts(), &[], &["systemctl *".into()], &policy)
            .expect("the profile holds a command");
        let (id, rx) = approvals
            .open(
                7,
                CommandKind::SshExec,
                "systemctl".into(),
                "systemctl stop x".into(),
            )
            .unwrap();
        let caller = |name: &str| Caller {
            uid: 0,
            pid: None,
            name: name.into(),
            inside_session: false,
        };
        assert_eq!(
            approvals.decide_on_host(&id, true, "", &caller("alice")),
            Err(DecideError::OwnRequest("alice".into()))
        );
        let s = approvals
            .decide_on_host(&id, true, "ok", &caller("bob"))
            .unwrap();
        assert_eq!(s.state, CommandState::Pending);
        assert_eq!(
            approvals.decide_on_host(&id, true, "", &caller("bob")),
            Err(DecideError::AlreadyDecided("bob@host1".into()))
        );
        let s = approvals
            .decide_on_host(&id, true, "", &caller("carol"))
            .unwrap();
        assert_eq!(s.state, CommandState::Approved);
        assert!(rx.await.unwrap());
        assert_eq!(
            approvals.decide_on_host(&id, false, "", &caller("dave")),
            Err(DecideError::NotPending(id.clone()))
        );
        drop(guard);
    }

    #[tokio::test]
    async fn a_denial_ends_at_once_and_the_end_of_the_session_cancels() {
        let approvals = Approvals::new("h");
        let policy = ApprovalPolicy::default();
        let guard = approvals
            .attach(8, facts(), &[], &["*".into()], &policy)
            .unwrap();
        let (id, rx) = approvals
            .open(8, CommandKind::SshExec, "x".into(), "x".into())
            .unwrap();
        let caller = Caller {
            uid: 0,
            pid: None,
            name: "root".into(),
            inside_session: false,
        };
        let s = approvals.decide_on_host(&id, false, "no", &caller).unwrap();
        assert_eq!(s.state, CommandState::Denied);
        assert!(!rx.await.unwrap());
        let (id2, rx2) = approvals
            .open(8, CommandKind::SshExec, "y".into(), "y".into())
            .unwrap();
        drop(guard);
        assert!(!rx2.await.unwrap());
        let listed = approvals.list();
        assert_eq!(listed[0].request.id, id2);
        assert_eq!(listed[0].state, CommandState::Cancelled);
        assert_eq!(listed[1].request.id, id);
    }

    #[tokio::test]
    async fn a_secret_on_a_held_command_line_is_masked_in_the_request() {
        let approvals = Approvals::new("h");
        let rules = crate::guard::mask::MaskRules::compile(&crate::guard::mask::MaskConfig {
            detectors: vec!["aws_access_key".into()],
            patterns: vec![],
        })
        .unwrap();
        let mut f = facts();
        f.mask = Some(rules);
        let _guard = approvals
            .attach(12, f, &[], &["*".into()], &ApprovalPolicy::default())
            .unwrap();
        let (_, _rx) = approvals
            .open(
                12,
                CommandKind::SshExec,
                "aws".into(),
                "aws --key AKIAIOSFODNN7EXAMPLE s3 ls".into(),
            )
            .unwrap();
        let listed = approvals.list();
        assert!(!listed[0].request.command.contains("AKIAIOSFODNN7EXAMPLE"));
        assert!(
            listed[0].request.command.starts_with("aws --key ****"),
            "{}",
            listed[0].request.command
        );
    }

    #[tokio::test]
    async fn a_caller_inside_a_session_never_decides() {
        let approvals = Approvals::new("h");
        let _guard = approvals
            .attach(10, facts(), &[], &["*".into()], &ApprovalPolicy::default())
            .unwrap();
        let (id, _rx) = approvals
            .open(10, CommandKind::SshExec, "x".into(), "x".into())
            .unwrap();
        let caller = Caller {
            uid: 0,
            pid: Some(std::process::id() as i32),
            name: "root".into(),
            inside_session: true,
        };
        assert_eq!(
            approvals.decide_on_host(&id, true, "", &caller),
            Err(DecideError::InsideSession)
        );
        assert_eq!(approvals.list()[0].state, CommandState::Pending);
    }

    #[tokio::test]
    async fn a_session_has_a_bounded_number_of_requests_waiting() {
        let approvals = Approvals::new("h");
        let _guard = approvals
            .attach(11, facts(), &[], &["*".into()], &ApprovalPolicy::default())
            .unwrap();
        let mut waiting = Vec::new();
        for _ in 0..PENDING_PER_SESSION {
            waiting.push(
                approvals
                    .open(11, CommandKind::SshExec, "x".into(), "x".into())
                    .unwrap(),
            );
        }
        let (_, refused) = approvals
            .open(11, CommandKind::SshExec, "x".into(), "x".into())
            .unwrap();
        assert!(!refused.await.unwrap());
        assert_eq!(
            approvals
                .list()
                .iter()
                .filter(|s| s.state == CommandState::Pending)
                .count(),
            PENDING_PER_SESSION
        );
    }

    #[tokio::test]
    async fn no_answer_in_time_is_a_denial() {
        let approvals = Approvals::new("h");
        let policy = ApprovalPolicy {
            approvers: vec![],
            required: 1,
            timeout_secs: 1,
        };
        let _guard = approvals
            .attach(9, facts(), &[], &["*".into()], &policy)
            .unwrap();
        let (_, rx) = approvals
            .open(9, CommandKind::SshExec, "x".into(), "x".into())
            .unwrap();
        assert!(!rx.await.unwrap());
        assert_eq!(approvals.list()[0].state, CommandState::Expired);
    }
}
