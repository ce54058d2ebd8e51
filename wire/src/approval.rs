//! Approval of risky commands inside sessions (agent/src/guard/README.md): what a pending
//! request says, what was decided, and the claims of a decision the central service signs.

use serde::{Deserialize, Serialize};

/// How a command came to need approval.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandKind {
    /// An exec inside the session of a file the profile's `[exec] approve` lists.
    Exec,
    /// An SSH exec request (`ssh host 'cmd'`) matching `[exec] approve_commands`.
    SshExec,
}

/// One command waiting for (or past) a decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandRequest {
    /// `apr-` and 32 hex digits, unique on the host.
    pub id: String,
    pub host: String,
    pub session_id: String,
    /// The grant's jti and subject, and the account the session runs as.
    pub grant: String,
    pub sub: String,
    pub login: String,
    pub kind: CommandKind,
    /// The file being executed (for `SshExec`, the command line again).
    pub program: String,
    /// The command line as the process passed it (arguments joined by spaces, at most
    /// 4 KiB).
    pub command: String,
    /// Who may approve (the profile's `[approval] approvers`; empty: any approver).
    #[serde(default)]
    pub approvers: Vec<String>,
    /// How many distinct approvers it takes.
    pub required: u32,
    /// Unix seconds.
    pub requested_at: i64,
    /// Unix seconds: no decision by then is a denial.
    pub expires_at: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommandState {
    Pending,
    Approved,
    Denied,
    /// Nobody decided in time.
    Expired,
    /// The session's user cancelled (Ctrl-C), the process or session went away, or the
    /// agent restarted.
    Cancelled,
}

impl CommandState {
    pub fn is_final(self) -> bool {
        self != CommandState::Pending
    }
}

/// One approver's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandDecision {
    /// Who decided: `alice@example.com` (service) or `root@host` / `bob@host` (on the host).
    pub by: String,
    pub approve: bool,
    #[serde(default)]
    pub comment: String,
    /// Unix seconds.
    pub at: i64,
}

/// A request with what has happened to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandStatus {
    pub request: CommandRequest,
    pub state: CommandState,
    #[serde(default)]
    pub decisions: Vec<CommandDecision>,
}

/// The JWT `typ` of a decision the central service signs.
pub const DECISION_JWT_TYPE: &str = "usher-command+jwt";

/// The claims of a signed decision (service -> agent). `jti` is the request's id, `aud`
/// the host: a decision for another host or request does not apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionClaims {
    pub iss: String,
    pub aud: String,
    pub jti: String,
    pub iat: i64,
    pub exp: i64,
    /// `Approved` or `Denied` (a service never signs another state).
    pub decision: CommandState,
    /// Who approved (or who denied).
    pub by: Vec<String>,
    #[serde(default)]
    pub comment: String,
}

/// What `GET /api/v1/agent/commands/{id}` answers: the signed decision once there is one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DecisionAnswer {
    pub state: CommandState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
}

/// What the central service's webhooks receive about a command (events `command.requested`
/// and `command.decided`), beside `jit::WebhookEvent` for access requests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandWebhookEvent {
    pub event: String,
    pub command: CommandStatus,
    /// The page's address for the pending commands.
    pub url: String,
}
