//! A session's metadata: the file beside its recording in the agent's spool, and what the
//! collector indexes and shows (`PUT /api/v1/sessions/{id}/meta`).
//!
//! The agent writes exactly these fields. The collector also reads what older senders
//! stored: `grant.expires_at` as an RFC 3339 string rather than Unix seconds.

use serde::{Deserialize, Deserializer, Serialize};

/// Who, where, when: the file beside a recording.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// RFC 3339.
    pub started_at: String,
    pub ended_at: Option<String>,
    pub exit_status: Option<i32>,
    pub exit_signal: Option<String>,
    /// How execs were enforced, in words for a reader: the agent writes its enforcement
    /// path (`bpf-lsm (…)`, `tracepoint-sigkill (…)`, `unavailable (…)`); older senders
    /// wrote a bare `tracepoint`. Nothing decides on it, so any text is kept as it came.
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
    pub limits: Option<AppliedLimits>,
}

/// The grant a session ran under.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantInfo {
    pub iss: String,
    pub sub: String,
    pub jti: String,
    pub profile: String,
    pub approved_by: Option<String>,
    pub reason: Option<String>,
    /// The central service's request the grant answers, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    /// Unix seconds (the grant's `exp`); an RFC 3339 string is read too (older senders).
    #[serde(deserialize_with = "unix_seconds_or_rfc3339")]
    pub expires_at: i64,
}

/// What a session's cgroup holds it to, as its metadata records it. `null` is no limit.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedLimits {
    pub pids_max: Option<u64>,
    pub memory_max: Option<u64>,
    pub cpu_weight: Option<u32>,
    /// The limits that could not be applied, each with its reason (the value beside it
    /// was asked for, not enforced).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_applied: Vec<String>,
}

fn unix_seconds_or_rfc3339<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        UnixSeconds(i64),
        Rfc3339(String),
    }
    match Stored::deserialize(d)? {
        Stored::UnixSeconds(t) => Ok(t),
        Stored::Rfc3339(text) => {
            time::OffsetDateTime::parse(&text, &time::format_description::well_known::Rfc3339)
                .map(|t| t.unix_timestamp())
                .map_err(|e| {
                    serde::de::Error::custom(format!(
                        "expires_at {text:?} is neither Unix seconds nor RFC 3339: {e}"
                    ))
                })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an agent writes (record/meta.rs before the move, and usherd today).
    fn agent_written() -> serde_json::Value {
        serde_json::json!({
            "session_id": "20261122T120000Z-0a1b2c3d", "kind": "ssh", "host": "web-1",
            "login": "usher-alice", "uid": 61000,
            "grant": {"iss": "idp", "sub": "alice@example.org", "jti": "j1", "profile": "default",
                      "approved_by": "lead", "reason": "incident 7", "expires_at": 1795003600},
            "peer": "10.0.0.1:50000", "command": null, "term": "xterm",
            "started_at": "2026-11-22T12:00:00Z", "ended_at": null,
            "exit_status": null, "exit_signal": null,
            "enforcement": "tracepoint-sigkill (no BPF-LSM: lsm=; executable mappings are left to the sessions' noexec mounts)",
            "enforced": true, "input_recorded": false, "interrupted": false,
            "limits": {"pids_max": 512, "memory_max": null, "cpu_weight": 100}
        })
    }

    #[test]
    fn what_the_agent_writes_reads_back_unchanged() {
        let meta: SessionMeta = serde_json::from_value(agent_written()).unwrap();
        assert_eq!(meta.grant.expires_at, 1795003600);
        assert_eq!(
            meta.limits,
            Some(AppliedLimits {
                pids_max: Some(512),
                memory_max: None,
                cpu_weight: Some(100),
                not_applied: vec![],
            })
        );
        assert_eq!(serde_json::to_value(&meta).unwrap(), agent_written());
    }

    #[test]
    fn an_rfc3339_expiry_stored_by_older_senders_is_read_as_unix_seconds() {
        let mut old = agent_written();
        old["grant"]["expires_at"] = "2030-01-01T00:00:00Z".into();
        let meta: SessionMeta = serde_json::from_value(old).unwrap();
        assert_eq!(meta.grant.expires_at, 1893456000);
        // Written again, it is in the agent's form.
        assert_eq!(
            serde_json::to_value(&meta).unwrap()["grant"]["expires_at"],
            1893456000
        );
        let mut offset = agent_written();
        offset["grant"]["expires_at"] = "2030-01-01T02:00:00+02:00".into();
        let meta: SessionMeta = serde_json::from_value(offset).unwrap();
        assert_eq!(meta.grant.expires_at, 1893456000);
    }

    #[test]
    fn an_expiry_that_is_neither_form_is_refused() {
        for bad in [
            serde_json::json!("tomorrow"),
            serde_json::json!(null),
            serde_json::json!(1.5),
            serde_json::json!({"at": 1}),
        ] {
            let mut meta = agent_written();
            meta["grant"]["expires_at"] = bad.clone();
            assert!(
                serde_json::from_value::<SessionMeta>(meta).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn the_older_bare_tracepoint_enforcement_is_read() {
        let mut old = agent_written();
        old["enforcement"] = "tracepoint".into();
        let meta: SessionMeta = serde_json::from_value(old).unwrap();
        assert_eq!(meta.enforcement, "tracepoint");
    }

    #[test]
    fn fields_added_after_the_first_agents_may_be_absent() {
        let mut old = agent_written();
        let map = old.as_object_mut().unwrap();
        map.remove("interrupted");
        map.remove("limits");
        let meta: SessionMeta = serde_json::from_value(old).unwrap();
        assert!(!meta.interrupted);
        assert_eq!(meta.limits, None);
        assert_eq!(meta.truncated, None);
    }
}
