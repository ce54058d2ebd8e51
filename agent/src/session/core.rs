//! The session core as the front ends see it. SSH, the console and (next) RDP each
//! authenticate a grant, hand the core a request and the client's I/O, and hear when the
//! session ends; the core owns the account, the cgroup, the exec profile, the recording
//! and the end of the grant. `daemon::Agent` is the one implementation; front ends and the
//! session runner know only this trait, so neither reaches into the agent's state.

use super::budget::SpoolMeter;
use super::{Cgroup, SessionKind};
use crate::account::Account;
use crate::config::RecordingConfig;
use crate::enforce::ExecReceiver;
use crate::grant::{Grant, GrantId, Refusal};
use crate::guard::mask::MaskRules;
use crate::profile::Profile;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

pub trait Core: Send + Sync + 'static {
    /// Verifies a token presented at a login prompt by a client logging in as `login` (a
    /// grant, or a workload's OIDC token that a `[[workload]]` rule for `login` takes),
    /// checks it against revocations and keeps it. `how` says where it came from, for the
    /// audit trail.
    fn admit_presented(
        &self,
        login: &str,
        token: &str,
        how: &str,
    ) -> impl Future<Output = Result<Grant, Refusal>> + Send;

    /// The live grant for `login` bound to this SSH key, if any.
    fn grant_for_key(&self, login: &str, key: &russh::keys::PublicKey) -> Option<Grant>;

    /// The live grant that lets the account with this UID open a console session.
    fn console_grant(&self, uid: u32) -> Result<Grant, ConsoleRefused>;

    /// The live grant that lets `login` open a desktop with `password`: the one-time
    /// secret whose hash the grant carries, or a token as at the SSH password prompt.
    fn rdp_grant(
        &self,
        login: &str,
        password: &str,
    ) -> impl Future<Output = Result<Grant, RdpRefused>> + Send;

    fn is_live(&self, grant: &GrantId) -> bool;

    /// Every grant that ends, for whatever holds access under it (connections, forwards)
    /// to close.
    fn grant_ends(&self) -> tokio::sync::broadcast::Receiver<GrantId>;

    fn profile(&self, name: &str) -> Profile;

    /// Everything a session needs before its process starts: the account (made on first
    /// use), a cgroup, and the exec profile loaded in the kernel.
    fn open(
        self: &Arc<Self>,
        grant: &Grant,
        kind: SessionKind,
    ) -> impl Future<Output = Result<Opened, Refused>> + Send;

    /// The session's main process has ended (or it never started).
    fn finished(&self, session_id: &str);

    /// One more exec in this session, for `usher sessions`.
    fn count_command(&self, session_id: &str);

    /// Where and how this host records sessions.
    fn recording(&self) -> RecordingContext;
}

/// A session the core has opened: its process may start.
pub struct Opened {
    pub session_id: String,
    pub account: Account,
    pub cgroup: Arc<Cgroup>,
    pub profile: Profile,
    /// The profile's compiled `[mask]`; `None` when it masks nothing.
    pub mask: Option<Arc<MaskRules>>,
    pub exec_events: Option<ExecReceiver>,
    pub enforced: bool,
    /// Says why, when the grant ends while the session runs.
    pub ended: tokio::sync::watch::Receiver<Option<String>>,
    /// Commands of this session held for approval; `None` when its profile holds none.
    pub guard: Option<crate::guard::approval::SessionGuard>,
}

/// What the recording of every session on this host shares.
#[derive(Clone)]
pub struct RecordingContext {
    pub host: String,
    pub spool_dir: PathBuf,
    pub settings: RecordingConfig,
    /// The enforcement path, as the session's metadata names it.
    pub enforcement: String,
    pub spool: Arc<SpoolMeter>,
}

/// Why the core would not open a session. The text is said to the client as it is.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("the grant has ended")]
    GrantEnded,
    #[error("exec enforcement is required on this host but is {0}")]
    EnforcementUnavailable(String),
    #[error("exec enforcement could not be set up: {0}")]
    EnforcementFailed(String),
    #[error(
        "the recording spool is full (recordings are not reaching the collector); try again later"
    )]
    SpoolFull,
    /// The account could not be made; says why when the client may know.
    #[error("{0}")]
    Account(String),
    #[error("the session's cgroup could not be created: {0}")]
    Cgroup(String),
}

/// Why an RDP login gets no desktop. Said in the journal, never to the client.
#[derive(Debug, thiserror::Error)]
pub enum RdpRefused {
    #[error("no live grant for this login")]
    NoLiveGrant,
    #[error("no live grant for this login allows RDP")]
    NotAllowed,
    #[error("the password is not the one-time secret of a live grant")]
    WrongSecret,
    #[error("the token presented as password is refused: {0}")]
    Token(Refusal),
}

/// Why a console login gets no session. The text is said on the login's terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ConsoleRefused {
    #[error("this account is not managed by usher")]
    NotManaged,
    #[error("no live grant for this account")]
    NoLiveGrant,
    #[error("the grant does not allow console logins")]
    NotAllowed,
}
