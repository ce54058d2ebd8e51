//! The session's recording, and the one rule every write to it follows: within the
//! session's budget and the spool's, and written before anything reaches the client.

use super::budget::{AtLimit, Exhausted, RecordingBudget};
use super::core::{Opened, RecordingContext};
use super::request::{SessionCommand, SessionRequest};
use crate::grant::Grant;
use crate::record::{rfc3339_now, CastHeader, GrantInfo, Recording, SessionMeta};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The session's recording and the rules every write to it follows: within the
/// session's budget and the spool's, and written before anything reaches the client.
pub(super) struct Recorder {
    recording: Option<Recording>,
    /// Terminal output and input are recorded (false once truncated at a limit).
    terminal: bool,
    required: bool,
    budget: RecordingBudget,
}

pub(super) type SharedRecorder = Arc<Mutex<Recorder>>;

/// The session must end, and nothing more may reach its client; says why.
#[derive(Debug)]
pub(super) struct Stop(pub(super) String);

impl Recorder {
    pub(super) fn lock(shared: &SharedRecorder) -> std::sync::MutexGuard<'_, Recorder> {
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records terminal data (output, input, a resize) of at most `len` bytes with `f`.
    /// Ok means the data may go on to the client.
    pub(super) fn terminal(
        &mut self,
        f: impl FnOnce(&mut Recording) -> std::io::Result<()>,
    ) -> Result<(), Stop> {
        if !self.terminal || self.recording.is_none() {
            return Ok(());
        }
        match self.budget.admit() {
            Ok(()) => self.write(f),
            Err(limit) => self.at_limit(limit),
        }
    }

    /// Records an audit line (an exec event). These are small and few next to terminal
    /// output, and the audit trail outlives a truncated cast: only the spool bounds them.
    pub(super) fn audit(
        &mut self,
        f: impl FnOnce(&mut Recording) -> std::io::Result<()>,
    ) -> Result<(), Stop> {
        if self.recording.is_none() {
            return Ok(());
        }
        match self.budget.admit_audit() {
            Ok(()) => self.write(f),
            Err(limit) => self.at_limit(limit),
        }
    }

    fn write(&mut self, f: impl FnOnce(&mut Recording) -> std::io::Result<()>) -> Result<(), Stop> {
        let rec = self.recording.as_mut().expect("checked by the caller");
        let before = rec.bytes();
        let result = f(rec);
        let written = rec.bytes().saturating_sub(before);
        self.budget.charge(written);
        match result {
            Ok(()) => Ok(()),
            Err(e) => {
                let id = rec.meta().session_id.clone();
                log::error!(target: "usher::record", "session {id}: recording failed: {e}");
                if self.required {
                    return Err(Stop(format!(
                        "recording failed ({e}); the session is closed"
                    )));
                }
                self.recording = None;
                Ok(())
            }
        }
    }

    /// The budget or the spool is used up: the profile decides between closing the
    /// session and cutting the recording, and the recording says which.
    fn at_limit(&mut self, why: Exhausted) -> Result<(), Stop> {
        let action = self.budget.limits().at_limit;
        let Some(rec) = self.recording.as_mut() else {
            return Ok(());
        };
        let id = rec.meta().session_id.clone();
        let reason = why.to_string();
        let action_name = match action {
            AtLimit::End => "session closed",
            AtLimit::Truncate => "recording truncated",
        };
        audit!("recording_limit", session = id.as_str(), reason = reason.as_str(), action = action_name; "session {id}: {why}; {action_name}");
        // These few hundred bytes go past the limit, like the chunk in flight: the
        // recording must say where and why it stops.
        let line = serde_json::json!({"event": "recording_limit", "time": rfc3339_now(), "reason": reason, "action": action_name});
        let marker = format!("{action_name}: {reason}");
        let said = rec.audit(&line, Some(&marker));
        match action {
            AtLimit::End => Err(Stop(format!("{why}; the session is closed"))),
            AtLimit::Truncate => {
                self.terminal = false;
                rec.meta_mut().truncated = Some(format!("{} at {}", reason, rfc3339_now()));
                let kept = said.and_then(|()| rec.write_meta());
                if kept.is_err() && self.required {
                    return Err(Stop(format!("{why}; the session is closed")));
                }
                Ok(())
            }
        }
    }

    /// Whether typed input goes into the recording (the host records keystrokes and the
    /// recording is still there).
    pub(super) fn records_input(&self) -> bool {
        self.terminal
            && self
                .recording
                .as_ref()
                .is_some_and(|r| r.meta().input_recorded)
    }

    /// How long to wait before reading more output, to keep to the recording's rate.
    pub(super) fn pause(&self) -> Option<Duration> {
        self.budget.pause()
    }
}

impl Recorder {
    /// `required`: a failed write ends the session (else the session goes on unrecorded).
    pub(super) fn new(
        recording: Option<Recording>,
        required: bool,
        budget: RecordingBudget,
    ) -> SharedRecorder {
        Arc::new(Mutex::new(Recorder {
            recording,
            terminal: true,
            required,
            budget,
        }))
    }

    /// Closes the recording with how the session ended.
    pub(super) fn finish(shared: &SharedRecorder, outcome: super::ExitOutcome) {
        let Some(mut rec) = Recorder::lock(shared).recording.take() else {
            return;
        };
        let meta = rec.meta_mut();
        meta.ended_at = Some(rfc3339_now());
        match outcome {
            super::ExitOutcome::Status(s) => meta.exit_status = Some(s),
            super::ExitOutcome::Signal(s) => {
                let name = crate::system::signal::ssh_name(s).unwrap_or("UNKNOWN");
                meta.exit_signal = Some(name.to_string())
            }
        }
        let _ = rec.audit(&serde_json::json!({"event": "session_ended", "time": rfc3339_now(), "outcome": format!("{outcome:?}")}), None);
        let id = rec.meta().session_id.clone();
        if let Err(e) = rec.finish() {
            log::error!(target: "usher::record", "session {id}: finishing the recording failed: {e}");
        }
    }
}

/// Creates the session's recording: metadata, audit stream and (for what has a terminal
/// stream to record) the cast. `command`: the session's command line as it may be kept
/// (masked).
pub(super) fn start_recording(
    ctx: &RecordingContext,
    grant: &Grant,
    request: &SessionRequest,
    opened: &Opened,
    command: Option<String>,
) -> std::io::Result<Recording> {
    let term = match &request.command {
        SessionCommand::Subsystem(_) => None,
        _ => request.pty.as_ref().map(|p| p.term.clone()),
    };
    let meta = SessionMeta {
        session_id: opened.session_id.clone(),
        kind: match request.kind {
            super::SessionKind::Ssh => "ssh".into(),
            super::SessionKind::Console => "console".into(),
            super::SessionKind::Rdp => "rdp".into(),
        },
        host: ctx.host.clone(),
        login: grant.login().into(),
        uid: opened.account.uid,
        grant: GrantInfo {
            iss: grant.claims.iss.clone(),
            sub: grant.claims.sub.clone(),
            jti: grant.jti().into(),
            profile: grant.profile.clone(),
            approved_by: grant.claims.approved_by.clone(),
            reason: grant.claims.reason.clone(),
            request: grant.claims.request.clone(),
            expires_at: grant.expires_at(),
        },
        peer: request.peer.clone(),
        command: command.clone(),
        term: term.clone(),
        started_at: rfc3339_now(),
        ended_at: None,
        exit_status: None,
        exit_signal: None,
        enforcement: ctx.enforcement.clone(),
        enforced: opened.enforced,
        input_recorded: ctx.settings.input,
        interrupted: false,
        truncated: None,
        limits: Some(opened.cgroup.limits().clone()),
    };
    let records_stream = match &request.command {
        SessionCommand::Subsystem(_) | SessionCommand::Desktop(_) => false,
        SessionCommand::Exec(_) if request.pty.is_none() => ctx.settings.exec_output,
        _ => true,
    };
    let header = records_stream.then(|| {
        let (cols, rows) = request
            .pty
            .as_ref()
            .map(|p| (p.cols, p.rows))
            .unwrap_or((80, 24));
        let mut env = std::collections::BTreeMap::new();
        env.insert(
            "SHELL".to_string(),
            opened.account.shell.display().to_string(),
        );
        if let Some(t) = &term {
            env.insert("TERM".to_string(), t.clone());
        }
        CastHeader {
            version: 2,
            width: cols,
            height: rows,
            timestamp: crate::grant::now(),
            command: command.clone(),
            title: Some(format!(
                "{}@{} ({})",
                grant.login(),
                ctx.host,
                grant.claims.sub
            )),
            env,
        }
    });
    let mut rec = Recording::create(&ctx.spool_dir, meta, header, ctx.settings.input)?;
    if matches!(request.command, SessionCommand::Desktop(_)) {
        rec.add_desktop()?;
    }
    rec.audit(
        &serde_json::json!({"event": "session_started", "time": rfc3339_now(), "meta": rec.meta()}),
        None,
    )?;
    Ok(rec)
}

/// A recording whose session was cut by an agent crash: its metadata says so.
pub fn mark_interrupted(spool: &Path, session_id: &str) {
    let path = spool.join(format!("{session_id}.json"));
    let Ok(bytes) = std::fs::read(&path) else {
        return;
    };
    let Ok(mut meta) = serde_json::from_slice::<SessionMeta>(&bytes) else {
        return;
    };
    if meta.ended_at.is_none() {
        meta.ended_at = Some(rfc3339_now());
        meta.interrupted = true;
        if let Ok(bytes) = serde_json::to_vec_pretty(&meta) {
            let _ = crate::fsutil::write_atomic(&path, &bytes, 0o600);
        }
    }
}
