//! The session's execs, as the kernel reports them, into its audit stream and cast; a
//! blocked one is also said on the client's terminal.

use super::masking::{journal_masked, mask_exec_note, masked_line, MaskedStream};
use super::recorder::{Recorder, SharedRecorder, Stop};
use super::request::ClientSink;
use crate::enforce::{ExecEvent, ExecNote, ExecReceiver, Verdict};
use crate::guard::mask::MaskRules;
use bytes::Bytes;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

/// The audit line of one exec, and the cast marker that goes with it.
pub fn exec_audit(event: &ExecEvent) -> (serde_json::Value, String) {
    let line = serde_json::json!({ "event": "exec", "exec": event });
    let marker = match event.verdict {
        Verdict::Allowed => format!("exec {}", event.path),
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
/// agent restart) still go to its audit stream, their arguments masked by the profile's
/// `mask` rules.
pub fn append_exec_events(
    path: PathBuf,
    session_id: String,
    mut rx: ExecReceiver,
    mask: Option<Arc<MaskRules>>,
) {
    tokio::spawn(async move {
        while let Some(note) = rx.recv().await {
            let (note, hits) = mask_exec_note(mask.as_ref(), note);
            let (line, _, _) = exec_note_audit(&session_id, &note);
            let opened = std::fs::OpenOptions::new().append(true).open(&path);
            if let Ok(mut f) = opened {
                for (rule, count) in &hits {
                    journal_masked(&session_id, MaskedStream::Exec, rule, *count);
                    let _ = writeln!(f, "{}", masked_line(MaskedStream::Exec, rule, *count));
                }
                let _ = writeln!(f, "{line}");
            }
        }
    });
}

/// One exec note into the recording; `counted` is told of each exec. Returns the marker
/// of a blocked exec, for the client to be told.
pub(super) fn record_exec(
    session_id: &str,
    recorder: &SharedRecorder,
    note: &ExecNote,
    counted: &(dyn Fn() + Send + Sync),
) -> Result<Option<String>, Stop> {
    let (line, marker, exec) = exec_note_audit(session_id, note);
    if exec.is_some() {
        counted();
    }
    Recorder::lock(recorder).audit(|r| r.audit(&line, Some(&marker)))?;
    let blocked = exec.is_some_and(|ev| ev.verdict != Verdict::Allowed);
    Ok(blocked.then_some(marker))
}

/// One exec note into the recording, then (for a blocked exec) a line to the client.
pub(super) async fn exec_event<S: ClientSink>(
    session_id: &str,
    recorder: &SharedRecorder,
    sink: &S,
    note: &ExecNote,
    counted: &(dyn Fn() + Send + Sync),
) -> Result<(), Stop> {
    if let Some(marker) = record_exec(session_id, recorder, note, counted)? {
        sink.stderr(Bytes::from(format!("\r\nusher: {marker}\r\n")))
            .await;
    }
    Ok(())
}
