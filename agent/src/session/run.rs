//! Running one session from its request to its end: the core opens it, its recording
//! starts, its process starts, the relay runs, and the recording and the core hear how it
//! ended.

use super::budget::RecordingBudget;
use super::core::{Core, Opened};
use super::exec_notes::append_exec_events;
use super::launch::launch_for;
use super::masking::{mask_command, record_masked, MaskedStream};
use super::recorder::{start_recording, Recorder, Stop};
use super::relay::{relay, Process, Watched};
use super::request::{ClientIo, ClientSink, ExitOutcome, SessionCommand, SessionRequest};
use super::spawn::{self, Streams};
use crate::grant::Grant;
use bytes::Bytes;
use std::sync::Arc;

/// Runs the session to its end, telling the client's sink how it ended.
pub async fn run<C: Core, S: ClientSink>(
    core: Arc<C>,
    grant: Grant,
    request: SessionRequest,
    io: ClientIo<S>,
) {
    let ClientIo {
        stdin,
        control,
        sink,
        desktop,
    } = io;
    let opened = match core.open(&grant, request.kind).await {
        Ok(o) => o,
        Err(refused) => return refuse(&*sink, &refused.to_string()).await,
    };
    let id = opened.session_id.clone();
    sink.opened(&id);
    let opened_cgroup = opened.cgroup.clone();
    let ctx = core.recording();
    let mask = text_to_mask(&request, &opened);
    let (command_text, command_masked) = mask_command(mask.as_ref(), request.command.text());
    let recording = match start_recording(&ctx, &grant, &request, &opened, command_text.clone()) {
        Ok(r) => Some(r),
        Err(e) if ctx.settings.required => {
            log::error!(target: "usher::record", "session {id} refused: recording failed: {e}");
            core.finished(&id);
            return refuse(
                &*sink,
                "the session cannot be recorded, and recording is required",
            )
            .await;
        }
        Err(e) => {
            log::warn!(target: "usher::record", "session {id} is not recorded: {e}");
            None
        }
    };
    let recorder = Recorder::new(
        recording,
        ctx.settings.required,
        RecordingBudget::new(opened.profile.recording.clone(), ctx.spool.clone()),
    );
    if !command_masked.is_empty() {
        // A recording that cannot take this fails the session at its first output.
        let _ = record_masked(&id, &recorder, MaskedStream::Command, &command_masked);
    }
    audit!("session_started", session = id.as_str(), jti = grant.jti(), sub = grant.claims.sub.as_str(), login = grant.login(), peer = request.peer.as_deref().unwrap_or("-"), command = command_text.as_deref().unwrap_or("(shell)");
        "session {id} started: {} as {} from {}", grant.claims.sub, grant.login(), request.peer.as_deref().unwrap_or("?"));

    let (outcome, leftover_notes) = {
        let mut opened = opened;
        let mut control = control;
        let notes = opened.exec_events.take();
        let mut notices = opened.guard.as_mut().and_then(|g| g.notices.take());
        let gate = match (&opened.guard, &request.command) {
            (Some(guard), SessionCommand::Exec(command)) => {
                wait_for_approval(
                    guard,
                    command,
                    &mut notices,
                    &mut control,
                    &recorder,
                    &*sink,
                )
                .await
            }
            _ => Ok(true),
        };
        let started = match gate {
            Ok(true) => start_process(&opened, &request).map(Some),
            Ok(false) => Ok(None),
            Err(stop) => Err(stop),
        };
        match started {
            // Not approved: nothing started; 126, as a shell's "cannot execute".
            Ok(None) => (Ok(ExitOutcome::Status(126)), notes),
            Ok(Some(process)) => {
                let counter = core.clone();
                let counted_id = id.clone();
                let watched = Watched {
                    session_id: id.clone(),
                    desktop,
                    exec_notes: notes,
                    grant_end: opened.ended.clone(),
                    counted: Box::new(move || counter.count_command(&counted_id)),
                    notices,
                    mask: mask.clone(),
                };
                relay(process, stdin, control, watched, &recorder, &*sink).await
            }
            Err(stop) => (Err(stop), notes),
        }
    };
    // Processes the session left behind (`sleep 1000 &`) still have their execs audited.
    if let Some(rx) = leftover_notes {
        let path = ctx.spool_dir.join(format!("{id}.audit.jsonl"));
        append_exec_events(path, id.clone(), rx, mask);
    }
    let outcome = match outcome {
        Ok(o) => o,
        Err(Stop(msg)) => {
            let _ = sink
                .stderr(Bytes::from(format!("\r\nusher: {msg}\r\n")))
                .await;
            ExitOutcome::Status(1)
        }
    };
    Recorder::finish(&recorder, outcome);
    core.finished(&id);
    audit!("session_ended", session = id.as_str(), jti = grant.jti(), login = grant.login(), outcome = format!("{outcome:?}").as_str(); "session {id} ended: {outcome:?}");
    sink.finish(outcome).await;
    // A desktop's processes all end with it (an X server outliving its session would
    // keep the account's desktop open to nobody's audit).
    if let SessionCommand::Desktop(spec) = &request.command {
        let cgroup = opened_cgroup.clone();
        let _ = tokio::task::spawn_blocking(move || cgroup.kill_all()).await;
        let _ = std::fs::remove_file(super::launch::xauthority_path(&spec.auth_dir, &id));
    }
}

/// An SSH exec request that `approve_commands` holds waits here, before anything starts,
/// saying so on the channel's stderr; the client hanging up cancels it. False when it may
/// not run (the session then ends with exit status 126, as a shell's "cannot execute").
async fn wait_for_approval<S: ClientSink>(
    guard: &crate::guard::approval::SessionGuard,
    command: &str,
    notices: &mut Option<tokio::sync::mpsc::Receiver<crate::guard::approval::Notice>>,
    control: &mut tokio::sync::mpsc::Receiver<super::request::Control>,
    recorder: &super::recorder::SharedRecorder,
    sink: &S,
) -> Result<bool, Stop> {
    use crate::guard::approval::SshExecGate;
    let (id, mut decided) = match guard.ssh_exec_gate(command) {
        SshExecGate::Free => return Ok(true),
        SshExecGate::Held(id, rx) => (id, rx),
    };
    let mut hung_up = false;
    let approved = loop {
        tokio::select! {
            r = &mut decided => break r.unwrap_or(false),
            n = async { notices.as_mut().expect("guarded").recv().await }, if notices.is_some() => match n {
                Some(n) => { super::relay::notice(recorder, sink, &n, false).await?; }
                None => *notices = None,
            },
            c = control.recv(), if !hung_up => if c.is_none() {
                hung_up = true;
                guard.cancel(&id, "the client hung up");
            },
        }
    };
    // The outcome's own notice.
    if let Some(rx) = notices.as_mut() {
        while let Ok(n) = rx.try_recv() {
            super::relay::notice(recorder, sink, &n, false).await?;
        }
    }
    Ok(approved)
}

/// The masking rules for a session whose streams are text for a person: not a subsystem's
/// protocol (sftp) nor a desktop's plumbing (its pixels are not text).
fn text_to_mask(
    request: &SessionRequest,
    opened: &Opened,
) -> Option<Arc<crate::guard::mask::MaskRules>> {
    match request.command {
        SessionCommand::Shell | SessionCommand::Exec(_) => opened.mask.clone(),
        SessionCommand::Subsystem(_) | SessionCommand::Desktop(_) => None,
    }
}

async fn refuse<S: ClientSink>(sink: &S, msg: &str) {
    let _ = sink.stderr(Bytes::from(format!("usher: {msg}\r\n"))).await;
    sink.finish(ExitOutcome::Status(1)).await;
}

/// Starts the session's process as its account, in its cgroup, on a new terminal or on
/// pipes.
fn start_process(opened: &Opened, request: &SessionRequest) -> Result<Process, Stop> {
    let launch =
        launch_for(opened, request).map_err(|e| Stop(format!("cannot start the session: {e}")))?;
    let cgroup = opened.cgroup.clone();
    let kill_all = Box::new(move || {
        let cg = cgroup.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::write(cg.path().join("cgroup.kill"), "1");
        });
    });
    let (child, terminal) = match &request.pty {
        Some(p) => {
            let (master, slave) = spawn::open_pty(p.cols.max(1), p.rows.max(1))
                .map_err(|e| Stop(format!("cannot open a terminal: {e}")))?;
            let child = spawn::spawn(launch, Streams::Pty(slave))
                .map_err(|e| Stop(format!("cannot start the shell: {e}")))?;
            (child, Some(Arc::new(master)))
        }
        None => (
            spawn::spawn(launch, Streams::Pipes)
                .map_err(|e| Stop(format!("cannot start the command: {e}")))?,
            None,
        ),
    };
    Ok(Process {
        child,
        terminal,
        kill_all,
    })
}
