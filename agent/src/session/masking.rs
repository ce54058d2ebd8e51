//! What the session's maskers (guard/mask) found, into the journal and the session's
//! audit stream: the rule and how many, never the value.

use super::recorder::{Recorder, SharedRecorder, Stop};
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
}

impl MaskedStream {
    pub(super) fn name(self) -> &'static str {
        match self {
            MaskedStream::Terminal => "terminal",
            MaskedStream::Stdout => "stdout",
            MaskedStream::Stderr => "stderr",
            MaskedStream::Input => "input",
            MaskedStream::Command => "command",
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
    let stream = stream.name();
    for (rule, count) in hits {
        audit!("masked", session = session_id, stream = stream, rule = rule.as_str(), count = *count;
            "session {session_id}: {count} match(es) of {rule} masked in its {stream}");
        let line = serde_json::json!({
            "event": "masked",
            "time": rfc3339_now(),
            "stream": stream,
            "rule": rule,
            "count": count,
        });
        let marker = format!("masked {count} {rule} ({stream})");
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

/// The session's command line as the records keep it (metadata, cast header, journal),
/// masked like its output, and what was masked in it. The program gets it as it was sent.
pub(super) fn mask_command(
    rules: Option<&Arc<MaskRules>>,
    command: Option<String>,
) -> (Option<String>, Vec<(String, u32)>) {
    let (Some(rules), Some(text)) = (rules, command.as_deref()) else {
        return (command, Vec::new());
    };
    let mut masker = Masker::new(rules.clone());
    let mut pushed = masker.push(text.as_bytes(), Instant::now(), true);
    let rest = masker.finish();
    pushed.out.extend_from_slice(&rest.out);
    let mut hits = pushed.hits;
    for (rule, count) in rest.hits {
        match hits.iter_mut().find(|(r, _)| *r == rule) {
            Some((_, n)) => *n += count,
            None => hits.push((rule, count)),
        }
    }
    let masked = String::from_utf8_lossy(&pushed.out).into_owned();
    (Some(masked), hits)
}
