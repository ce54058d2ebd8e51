//! Stage 3: sessions. Each SSH channel (later: console login, RDP connection) gets its own
//! cgroup, a process running as the ephemeral user, and a recording.

pub mod budget;
mod cgroup;
mod run;
pub mod spawn;
mod table;

pub use cgroup::{v2_mount, AppliedLimits, Cgroup, JoinFiles, Layout};
pub use run::{
    run, ClientSink, Control, ExitOutcome, PtySpec, SessionCommand, SessionRequest, CONTROL_QUEUE,
};
pub use table::{SessionInfo, SessionRecord, SessionTable};

use crate::enforce::{ExecEvent, ExecNote, ExecReceiver};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Ssh,
    Console,
}

/// A session id that sorts by start time and names its files and cgroup.
pub fn new_session_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:08x}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        rand::random::<u32>()
    )
}

/// The audit line of one exec, and the cast marker that goes with it.
pub fn exec_audit(event: &ExecEvent) -> (serde_json::Value, String) {
    let line = serde_json::json!({ "event": "exec", "exec": event });
    let marker = match event.verdict {
        crate::enforce::Verdict::Allowed => format!("exec {}", event.path),
        _ => format!(
            "blocked {} ({})",
            event.path,
            event.rule.as_deref().unwrap_or("profile")
        ),
    };
    (line, marker)
}

/// The audit line of what a session's exec channel brought, and the cast marker that goes
/// with it. A loss is also said in the journal; `Some(event)` for an exec.
pub fn exec_note_audit<'a>(
    session_id: &str,
    note: &'a ExecNote,
) -> (serde_json::Value, String, Option<&'a ExecEvent>) {
    match note {
        ExecNote::Exec(ev) => {
            let (line, marker) = exec_audit(ev);
            (line, marker, Some(ev))
        }
        ExecNote::Lost { count, total } => {
            audit!("exec_events_lost", session = session_id, lost = *count, total = *total;
                "session {session_id}: {count} exec event(s) lost ({total} in all): the session executed faster than its recording took them");
            let line = serde_json::json!({
                "event": "exec_events_lost",
                "time": crate::record::rfc3339_now(),
                "lost": count,
                "total": total,
            });
            (line, format!("{count} exec event(s) lost"), None)
        }
    }
}

/// Exec events of a session whose connection is gone (processes left running, or an
/// agent restart) still go to its audit stream.
pub fn append_exec_events(path: PathBuf, session_id: String, mut rx: ExecReceiver) {
    tokio::spawn(async move {
        while let Some(note) = rx.recv().await {
            let (line, _, _) = exec_note_audit(&session_id, &note);
            let opened = std::fs::OpenOptions::new().append(true).open(&path);
            if let Ok(mut f) = opened {
                let _ = writeln!(f, "{line}");
            }
        }
    });
}

/// A recording whose session was cut by an agent crash: its metadata says so.
pub fn mark_interrupted(spool: &Path, session_id: &str) {
    let path = spool.join(format!("{session_id}.json"));
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let Ok(mut meta) = serde_json::from_slice::<crate::record::SessionMeta>(&bytes) else {
        return;
    };
    if meta.ended_at.is_none() {
        meta.ended_at = Some(crate::record::rfc3339_now());
        meta.interrupted = true;
        if let Ok(bytes) = serde_json::to_vec_pretty(&meta) {
            let _ = crate::fsutil::write_atomic(&path, &bytes, 0o600);
        }
    }
}
