//! What the session's maskers (guard/mask) found, into the journal and the session's
//! audit stream: the rule and how many, never the value.

use super::recorder::{Recorder, SharedRecorder, Stop};
use crate::enforce::ExecNote;
use crate::guard::mask::{MaskRules, Masker};
use crate::record::rfc3339_now;
use std::sync::Arc;
use std::time::Instant;

/// Which of the session's streams a masking happened in, as the audit trail names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MaskedStream {
    Terminal,
    Stdout,
    Stderr,
    /// What the client typed, as the recording keeps it (the process gets it unmasked).
    Input,
    /// The exec request's command line, as the metadata, the cast and the journal keep it.
    Command,
    /// The arguments of the session's execs, as the kernel reported them.
    Exec,
}

impl MaskedStream {
    pub(super) fn name(self) -> &'static str {
        match self {
            MaskedStream::Terminal => "terminal",
            MaskedStream::Stdout => "stdout",
            MaskedStream::Stderr => "stderr",
            MaskedStream::Input => "input",
            MaskedStream::Command => "command",
            MaskedStream::Exec => "exec",
        }
    }
}

/// One `masked` audit event per rule that matched, journal and recording alike, with a
/// marker in the cast where it happened.
pub(super) fn record_masked(
    session_id: &str,
    recorder: &SharedRecorder,
    stream: MaskedStream,
    hits: &[(String, u32)],
) -> Result<(), Stop> {
    for (rule, count) in hits {
        journal_masked(session_id, stream, rule, *count);
        let line = masked_line(stream, rule, *count);
        let marker = format!("masked {count} {rule} ({})", stream.name());
        Recorder::lock(recorder).audit(|r| r.audit(&line, Some(&marker)))?;
    }
    Ok(())
}

/// The session's output started drawing by cursor positioning: masking cannot promise
/// anything there (a secret can be drawn in pieces no stream matcher sees together), so
/// the audit trail says so, once per session.
pub(super) fn record_full_screen(
    session_id: &str,
    recorder: &SharedRecorder,
    stream: MaskedStream,
) -> Result<(), Stop> {
    let stream = stream.name();
    audit!("mask_fullscreen", session = session_id, stream = stream;
        "session {session_id}: a full-screen program draws on its {stream}; what it draws by cursor movement may escape masking");
    let line = serde_json::json!({
        "event": "mask_fullscreen",
        "time": rfc3339_now(),
        "stream": stream,
    });
    Recorder::lock(recorder)
        .audit(|r| r.audit(&line, Some("full-screen program: masking not guaranteed")))
}

/// `text` masked as a whole (a stream of its own that ends with it), and what was masked.
fn mask_text(rules: &Arc<MaskRules>, text: &str) -> (String, Vec<(String, u32)>) {
    let mut masker = Masker::new(rules.clone());
    let mut pushed = masker.push(text.as_bytes(), Instant::now(), true);
    let rest = masker.finish();
    pushed.out.extend_from_slice(&rest.out);
    let mut hits = pushed.hits;
    add_hits(&mut hits, rest.hits);
    (String::from_utf8_lossy(&pushed.out).into_owned(), hits)
}

fn add_hits(to: &mut Vec<(String, u32)>, more: Vec<(String, u32)>) {
    for (rule, count) in more {
        match to.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, n)) => *n += count,
            None => to.push((rule, count)),
        }
    }
}

/// The session's command line as the records keep it (metadata, cast header, journal),
/// masked like its output, and what was masked in it. The program gets it as it was sent.
pub(super) fn mask_command(
    rules: Option<&Arc<MaskRules>>,
    command: Option<String>,
) -> (Option<String>, Vec<(String, u32)>) {
    match (rules, command) {
        (Some(rules), Some(text)) => {
            let (masked, hits) = mask_text(rules, &text);
            (Some(masked), hits)
        }
        (_, command) => (command, Vec::new()),
    }
}

/// An exec as the records keep it: its arguments masked like the session's output (the
/// kernel reports them as the program got them), and what was masked in them.
pub(super) fn mask_exec_note(
    rules: Option<&Arc<MaskRules>>,
    note: ExecNote,
) -> (ExecNote, Vec<(String, u32)>) {
    let (Some(rules), ExecNote::Exec(mut event)) = (rules, note.clone()) else {
        return (note, Vec::new());
    };
    let mut hits = Vec::new();
    for arg in &mut event.argv {
        let (masked, found) = mask_text(rules, arg);
        if !found.is_empty() {
            *arg = masked;
            add_hits(&mut hits, found);
        }
    }
    (ExecNote::Exec(event), hits)
}

/// The audit line of one rule's maskings.
pub(super) fn masked_line(stream: MaskedStream, rule: &str, count: u32) -> serde_json::Value {
    serde_json::json!({
        "event": "masked",
        "time": rfc3339_now(),
        "stream": stream.name(),
        "rule": rule,
        "count": count,
    })
}

/// The journal's `masked` event.
pub(super) fn journal_masked(session_id: &str, stream: MaskedStream, rule: &str, count: u32) {
    let stream = stream.name();
    audit!("masked", session = session_id, stream = stream, rule = rule, count = count;
        "session {session_id}: {count} match(es) of {rule} masked in its {stream}");
}
