use serde::{Deserialize, Serialize};

/// Who, where, when: the file beside a recording.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionMeta {
    pub session_id: String,
    /// ssh, console, rdp.
    pub kind: String,
    pub host: String,
    pub login: String,
    pub uid: u32,
    pub grant: GrantInfo,
    pub peer: Option<String>,
    /// The command run, or null for an interactive shell.
    pub command: Option<String>,
    pub term: Option<String>,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub exit_status: Option<i32>,
    pub exit_signal: Option<String>,
    pub enforcement: String,
    pub enforced: bool,
    pub input_recorded: bool,
    /// The agent died before the session ended; `ended_at` is when it noticed.
    #[serde(default)]
    pub interrupted: bool,
    /// The recording stopped before the session did (its budget or the spool was full,
    /// and the profile says to go on): why, and when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub truncated: Option<String>,
    /// What the session's cgroup held it to (processes, memory, CPU), and any limit that
    /// could not be applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<crate::session::AppliedLimits>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub profile: String,
    pub approved_by: Option<String>,
    pub reason: Option<String>,
    pub expires_at: i64,
}

pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
