//! Stage 4: exec attribution and enforcement in the kernel (eBPF).
//!
//! Interface used by the rest of the agent; the implementation behind it is owned by the
//! eBPF work (issue 3). Until the programs exist, `Enforcer::start` reports the path as
//! unavailable and `required` enforcement refuses every session.

use serde::{Deserialize, Serialize};
use std::fmt;
use tokio::sync::mpsc::UnboundedSender;

/// `enforcement = "required" | "best-effort" | "off"` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    Required,
    #[default]
    BestEffort,
    Off,
}

/// Which kernel mechanism blocks forbidden execs on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnforcementPath {
    /// BPF-LSM `bprm_check_security`: the exec fails with EPERM.
    BpfLsm,
    /// `sched:sched_process_exec` + `bpf_send_signal(SIGKILL)`.
    TracepointKill,
    /// Nothing loaded; the string says why.
    Unavailable(String),
}

impl fmt::Display for EnforcementPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnforcementPath::BpfLsm => f.write_str("bpf-lsm"),
            EnforcementPath::TracepointKill => f.write_str("tracepoint-sigkill"),
            EnforcementPath::Unavailable(why) => write!(f, "unavailable ({why})"),
        }
    }
}

/// The exec part of a profile (`policies/*.toml`, `[exec]` table).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct ExecPolicy {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Killed,
    Denied,
}

/// One exec seen in a session's cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct ExecEvent {
    /// Unix time in seconds (fractional).
    pub time: f64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub path: String,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
    pub verdict: Verdict,
    /// The profile rule that decided a block, in words.
    pub rule: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("exec enforcement is not loaded: {0}")]
    NotLoaded(String),
    #[error("could not load the profile into the kernel: {0}")]
    Map(String),
}

pub struct Enforcer {
    mode: Enforcement,
    path: EnforcementPath,
}

impl Enforcer {
    /// Probes the kernel and loads the programs. Never fails: the outcome is in `path()`.
    pub fn start(mode: Enforcement) -> Enforcer {
        let path = match mode {
            Enforcement::Off => EnforcementPath::Unavailable("enforcement = off".into()),
            _ => EnforcementPath::Unavailable("built without eBPF programs".into()),
        };
        Enforcer { mode, path }
    }

    pub fn mode(&self) -> Enforcement {
        self.mode
    }

    pub fn path(&self) -> &EnforcementPath {
        &self.path
    }

    pub fn is_enforcing(&self) -> bool {
        !matches!(self.path, EnforcementPath::Unavailable(_))
    }

    /// Loads `policy` for the session whose cgroup has inode `cgroup_id`; its exec events
    /// are sent to `events` until `detach`.
    pub fn attach(
        &self,
        _cgroup_id: u64,
        _policy: &ExecPolicy,
        _events: UnboundedSender<ExecEvent>,
    ) -> Result<(), EnforceError> {
        match &self.path {
            EnforcementPath::Unavailable(why) => Err(EnforceError::NotLoaded(why.clone())),
            _ => Ok(()),
        }
    }

    pub fn detach(&self, _cgroup_id: u64) {}
}
