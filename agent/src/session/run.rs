//! Running one session: start its process, relay its terminal or pipes, record what
//! happens, and say how it ended.

use super::budget::{AtLimit, Exhausted, RecordingBudget};
use super::spawn::{self, Launch, Streams};
use super::SessionKind;
use crate::daemon::{Agent, SessionGrant};
use crate::grant::Grant;
use crate::record::{rfc3339_now, CastHeader, GrantInfo, Recording, SessionMeta};
use bytes::Bytes;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;

/// Where a session's output goes: an SSH channel, a console's terminal.
pub trait ClientSink: Send + Sync + 'static {
    fn stdout(&self, data: Bytes) -> impl Future<Output = bool> + Send;
    fn stderr(&self, data: Bytes) -> impl Future<Output = bool> + Send;
    fn finish(&self, outcome: ExitOutcome) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    Status(i32),
    Signal(i32),
}

/// Resizes and signals a session may have waiting; more are dropped.
pub const CONTROL_QUEUE: usize = 16;

#[derive(Debug)]
pub enum Control {
    Resize(u16, u16),
    Signal(i32),
}

#[derive(Debug, Clone)]
pub struct PtySpec {
    pub term: String,
    pub cols: u16,
    pub rows: u16,
}

#[derive(Debug, Clone)]
pub enum SessionCommand {
    Shell,
    Exec(String),
    /// A subsystem program (sftp-server): audited, its binary stream not recorded.
    Subsystem(PathBuf),
}

#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub kind: SessionKind,
    pub command: SessionCommand,
    pub pty: Option<PtySpec>,
    pub env: Vec<(String, String)>,
    pub peer: Option<String>,
}

/// The session's recording and the rules every write to it follows: within the
/// session's budget and the spool's, and written before anything reaches the client.
struct Recorder {
    recording: Option<Recording>,
    /// Terminal output and input are recorded (false once truncated at a limit).
    terminal: bool,
    required: bool,
    budget: RecordingBudget,
}

type SharedRecorder = Arc<Mutex<Recorder>>;

/// The session must end, and nothing more may reach its client; says why.
#[derive(Debug)]
struct Stop(String);

impl Recorder {
    fn lock(shared: &SharedRecorder) -> std::sync::MutexGuard<'_, Recorder> {
        shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records terminal data (output, input, a resize) of at most `len` bytes with `f`.
    /// Ok means the data may go on to the client.
    fn terminal(
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
    fn audit(&mut self, f: impl FnOnce(&mut Recording) -> std::io::Result<()>) -> Result<(), Stop> {
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

    /// How long to wait before reading more output, to keep to the recording's rate.
    fn pause(&self) -> Option<Duration> {
        self.budget.pause()
    }
}

/// Runs the session to its end. `stdin` closing means EOF from the client; `control`
/// closing means the client is gone.
pub async fn run<S: ClientSink>(
    agent: Arc<Agent>,
    grant: Grant,
    request: SessionRequest,
    stdin: mpsc::Receiver<Bytes>,
    control: mpsc::Receiver<Control>,
    sink: Arc<S>,
) {
    let sg = match agent.open_session(&grant, request.kind).await {
        Ok(sg) => sg,
        Err(msg) => return refuse(&*sink, &msg).await,
    };
    let id = sg.session_id.clone();
    let recording = match start_recording(&agent, &grant, &request, &sg) {
        Ok(r) => Some(r),
        Err(e) if agent.config.recording.required => {
            log::error!(target: "usher::record", "session {id} refused: recording failed: {e}");
            agent.session_finished(&id);
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
    let recorder: SharedRecorder = Arc::new(Mutex::new(Recorder {
        recording,
        terminal: true,
        required: agent.config.recording.required,
        budget: RecordingBudget::new(sg.profile.recording.clone(), agent.spool_meter()),
    }));
    let command_text = match &request.command {
        SessionCommand::Shell => None,
        SessionCommand::Exec(c) => Some(c.clone()),
        SessionCommand::Subsystem(p) => Some(p.display().to_string()),
    };
    audit!("session_started", session = id.as_str(), jti = grant.jti(), sub = grant.claims.sub.as_str(), login = grant.login(), peer = request.peer.as_deref().unwrap_or("-"), command = command_text.as_deref().unwrap_or("(shell)");
        "session {id} started: {} as {} from {}", grant.claims.sub, grant.login(), request.peer.as_deref().unwrap_or("?"));

    let outcome = match relay(&agent, &request, sg, stdin, control, &sink, &recorder).await {
        Ok(o) => o,
        Err(Stop(msg)) => {
            let _ = sink
                .stderr(Bytes::from(format!("\r\nusher: {msg}\r\n")))
                .await;
            ExitOutcome::Status(1)
        }
    };
    let recording = Recorder::lock(&recorder).recording.take();
    if let Some(mut rec) = recording {
        let meta = rec.meta_mut();
        meta.ended_at = Some(rfc3339_now());
        match outcome {
            ExitOutcome::Status(s) => meta.exit_status = Some(s),
            ExitOutcome::Signal(s) => {
                let name = crate::system::signal::ssh_name(s).unwrap_or("UNKNOWN");
                meta.exit_signal = Some(name.to_string())
            }
        }
        let _ = rec.audit(&serde_json::json!({"event": "session_ended", "time": rfc3339_now(), "outcome": format!("{outcome:?}")}), None);
        if let Err(e) = rec.finish() {
            log::error!(target: "usher::record", "session {id}: finishing the recording failed: {e}");
        }
    }
    agent.session_finished(&id);
    audit!("session_ended", session = id.as_str(), jti = grant.jti(), login = grant.login(), outcome = format!("{outcome:?}").as_str(); "session {id} ended: {outcome:?}");
    sink.finish(outcome).await;
}

async fn refuse<S: ClientSink>(sink: &S, msg: &str) {
    let _ = sink.stderr(Bytes::from(format!("usher: {msg}\r\n"))).await;
    sink.finish(ExitOutcome::Status(1)).await;
}

fn start_recording(
    agent: &Agent,
    grant: &Grant,
    request: &SessionRequest,
    sg: &SessionGrant,
) -> std::io::Result<Recording> {
    let (command, term) = match &request.command {
        SessionCommand::Shell => (None, request.pty.as_ref().map(|p| p.term.clone())),
        SessionCommand::Exec(c) => (
            Some(c.clone()),
            request.pty.as_ref().map(|p| p.term.clone()),
        ),
        SessionCommand::Subsystem(p) => (Some(p.display().to_string()), None),
    };
    let meta = SessionMeta {
        session_id: sg.session_id.clone(),
        kind: match request.kind {
            SessionKind::Ssh => "ssh".into(),
            SessionKind::Console => "console".into(),
        },
        host: agent.host.clone(),
        login: grant.login().into(),
        uid: sg.account.uid,
        grant: GrantInfo {
            iss: grant.claims.iss.clone(),
            sub: grant.claims.sub.clone(),
            jti: grant.jti().into(),
            profile: grant.profile.clone(),
            approved_by: grant.claims.approved_by.clone(),
            reason: grant.claims.reason.clone(),
            expires_at: grant.expires_at(),
        },
        peer: request.peer.clone(),
        command: command.clone(),
        term: term.clone(),
        started_at: rfc3339_now(),
        ended_at: None,
        exit_status: None,
        exit_signal: None,
        enforcement: agent.enforcer.path().to_string(),
        enforced: sg.enforced,
        input_recorded: agent.config.recording.input,
        interrupted: false,
        truncated: None,
        limits: Some(sg.cgroup.limits().clone()),
    };
    let records_stream = match &request.command {
        SessionCommand::Subsystem(_) => false,
        SessionCommand::Exec(_) if request.pty.is_none() => agent.config.recording.exec_output,
        _ => true,
    };
    let header = records_stream.then(|| {
        let (cols, rows) = request
            .pty
            .as_ref()
            .map(|p| (p.cols, p.rows))
            .unwrap_or((80, 24));
        let mut env = std::collections::BTreeMap::new();
        env.insert("SHELL".to_string(), sg.account.shell.display().to_string());
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
                agent.host,
                grant.claims.sub
            )),
            env,
        }
    });
    let mut rec = Recording::create(
        &agent.spool_dir(),
        meta,
        header,
        agent.config.recording.input,
    )?;
    rec.audit(
        &serde_json::json!({"event": "session_started", "time": rfc3339_now(), "meta": rec.meta()}),
        None,
    )?;
    Ok(rec)
}

fn login_env(sg: &SessionGrant, request: &SessionRequest) -> Vec<(String, String)> {
    let a = &sg.account;
    let mut env = vec![
        ("HOME".to_string(), a.home.display().to_string()),
        ("USER".to_string(), a.name.clone()),
        ("LOGNAME".to_string(), a.name.clone()),
        ("SHELL".to_string(), a.shell.display().to_string()),
        (
            "PATH".to_string(),
            "/usr/local/bin:/usr/bin:/bin".to_string(),
        ),
        ("MAIL".to_string(), format!("/var/mail/{}", a.name)),
        ("USHER_SESSION".to_string(), sg.session_id.clone()),
    ];
    if let Some(p) = &request.pty {
        env.push(("TERM".to_string(), p.term.clone()));
    }
    if let Some(peer) = &request.peer {
        env.push(("SSH_CLIENT".to_string(), peer.clone()));
    }
    for (k, v) in &request.env {
        if !env.iter().any(|(e, _)| e == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

fn launch_for(sg: &SessionGrant, request: &SessionRequest) -> std::io::Result<Launch> {
    let a = &sg.account;
    let shell_name = a
        .shell
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "sh".into());
    let (program, argv0, args) = match &request.command {
        SessionCommand::Shell => (a.shell.clone(), format!("-{shell_name}"), vec![]),
        SessionCommand::Exec(cmd) => (
            a.shell.clone(),
            shell_name,
            vec!["-c".to_string(), cmd.clone()],
        ),
        SessionCommand::Subsystem(p) => (
            p.clone(),
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            vec![],
        ),
    };
    let mut groups = vec![a.gid];
    groups.extend(&a.groups);
    Ok(Launch {
        program,
        argv0,
        args,
        env: login_env(sg, request),
        cwd: if a.home.is_dir() {
            a.home.clone()
        } else {
            "/".into()
        },
        uid: a.uid,
        gid: a.gid,
        groups,
        cgroup_procs: sg.cgroup.procs_file()?,
        exec_mode: sg.profile.exec.mode,
        home: a.home.clone(),
    })
}

/// Sends what the session wrote to the client, once it is recorded; then waits if the
/// recording's rate says so. While the client's window is full this waits too, and the
/// session's terminal is not read meanwhile.
async fn deliver<S: ClientSink>(
    recorder: &SharedRecorder,
    sink: &S,
    data: &[u8],
    to_stderr: bool,
) -> Result<(), Stop> {
    let pause = {
        let mut r = Recorder::lock(recorder);
        r.terminal(|rec| rec.output(data))?;
        r.pause()
    };
    let bytes = Bytes::copy_from_slice(data);
    if to_stderr {
        sink.stderr(bytes).await;
    } else {
        sink.stdout(bytes).await;
    }
    if let Some(p) = pause {
        tokio::time::sleep(p).await;
    }
    Ok(())
}

/// One exec event (or a count of lost ones) into the recording, then (for a blocked exec)
/// a line to the client.
/// One exec note into the recording (and the session's command count). Returns the
/// marker of a blocked exec, for the client to be told.
fn record_exec(
    agent: &Agent,
    session_id: &str,
    recorder: &SharedRecorder,
    note: &crate::enforce::ExecNote,
) -> Result<Option<String>, Stop> {
    let (line, marker, exec) = super::exec_note_audit(session_id, note);
    if exec.is_some() {
        agent.sessions.count_command(session_id);
    }
    Recorder::lock(recorder).audit(|r| r.audit(&line, Some(&marker)))?;
    let blocked = exec.is_some_and(|ev| ev.verdict != crate::enforce::Verdict::Allowed);
    Ok(blocked.then_some(marker))
}

/// One exec note into the recording, then (for a blocked exec) a line to the client.
async fn exec_event<S: ClientSink>(
    agent: &Agent,
    session_id: &str,
    recorder: &SharedRecorder,
    sink: &S,
    note: &crate::enforce::ExecNote,
) -> Result<(), Stop> {
    if let Some(marker) = record_exec(agent, session_id, recorder, note)? {
        sink.stderr(Bytes::from(format!("\r\nusher: {marker}\r\n")))
            .await;
    }
    Ok(())
}

async fn relay<S: ClientSink>(
    agent: &Arc<Agent>,
    request: &SessionRequest,
    mut sg: SessionGrant,
    mut stdin: mpsc::Receiver<Bytes>,
    mut control: mpsc::Receiver<Control>,
    sink: &Arc<S>,
    recorder: &SharedRecorder,
) -> Result<ExitOutcome, Stop> {
    let launch =
        launch_for(&sg, request).map_err(|e| Stop(format!("cannot start the session: {e}")))?;
    let mut exec_events = sg.exec_events.take();
    let mut ended = sg.ended.clone();
    let cgroup = sg.cgroup.clone();
    let session_id = sg.session_id.clone();
    let kill_all = move || {
        let cg = cgroup.clone();
        tokio::task::spawn_blocking(move || {
            let _ = std::fs::write(cg.path().join("cgroup.kill"), "1");
        });
    };

    let pty = match &request.pty {
        Some(p) => Some(
            spawn::open_pty(p.cols.max(1), p.rows.max(1))
                .map_err(|e| Stop(format!("cannot open a terminal: {e}")))?,
        ),
        None => None,
    };
    let (master, mut child) = match pty {
        Some((master, slave)) => {
            let child = spawn::spawn(launch, Streams::Pty(slave))
                .map_err(|e| Stop(format!("cannot start the shell: {e}")))?;
            (Some(Arc::new(master)), child)
        }
        None => (
            None,
            spawn::spawn(launch, Streams::Pipes)
                .map_err(|e| Stop(format!("cannot start the command: {e}")))?,
        ),
    };
    let pid = child.id().map(|p| p as i32);

    // Client → process, in its own task so a process that does not read cannot stall
    // its output.
    let (input_failed_tx, mut input_failed) = tokio::sync::oneshot::channel::<Stop>();
    let writer = match &master {
        Some(m) => {
            let m = m.clone();
            let recorder = recorder.clone();
            tokio::spawn(async move {
                while let Some(data) = stdin.recv().await {
                    let keys = m.keystrokes();
                    let recorded = Recorder::lock(&recorder).terminal(|r| r.input(&data, keys));
                    if let Err(stop) = recorded {
                        let _ = input_failed_tx.send(stop);
                        break;
                    }
                    if m.write_all(&data).await.is_err() {
                        break;
                    }
                }
            })
        }
        None => {
            let mut child_stdin = child.stdin.take();
            tokio::spawn(async move {
                while let Some(data) = stdin.recv().await {
                    let Some(w) = child_stdin.as_mut() else { break };
                    if w.write_all(&data).await.is_err() {
                        break;
                    }
                }
                // EOF from the client closes the process's stdin.
                drop(child_stdin);
            })
        }
    };

    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let mut pty_buf = vec![0u8; 32 * 1024];
    let mut out_buf = vec![0u8; 32 * 1024];
    let mut err_buf = vec![0u8; 32 * 1024];
    let mut status = None;
    let mut control_open = true;
    let mut pty_open = master.is_some();
    let mut input_open = true;
    let mut watching_end = true;
    let drain = Duration::from_millis(100);

    // Each arm records before it sends; an arm that returns Stop ends the relay at once,
    // so nothing unrecorded (or past the end of the grant) reaches the client.
    let stopped: Option<Stop> = loop {
        let done = status.is_some()
            && (!pty_open || master.is_none())
            && stdout.is_none()
            && stderr.is_none();
        if done {
            break None;
        }
        let step: Result<(), Stop> = tokio::select! {
            n = async { master.as_ref().unwrap().read(&mut pty_buf).await }, if pty_open => {
                match n {
                    Ok(0) | Err(_) => { pty_open = false; Ok(()) }
                    Ok(n) => deliver(recorder, &**sink, &pty_buf[..n], false).await,
                }
            }
            n = async { stdout.as_mut().unwrap().read(&mut out_buf).await }, if stdout.is_some() => {
                match n {
                    Ok(0) | Err(_) => { stdout = None; Ok(()) }
                    Ok(n) => deliver(recorder, &**sink, &out_buf[..n], false).await,
                }
            }
            n = async { stderr.as_mut().unwrap().read(&mut err_buf).await }, if stderr.is_some() => {
                match n {
                    Ok(0) | Err(_) => { stderr = None; Ok(()) }
                    Ok(n) => deliver(recorder, &**sink, &err_buf[..n], true).await,
                }
            }
            s = child.wait(), if status.is_none() => match s {
                Ok(s) => { status = Some(s); Ok(()) }
                Err(e) => Err(Stop(format!("lost the session's process: {e}"))),
            },
            // The shell is gone but something it started still holds the terminal: stop
            // relaying once it has been quiet for a moment, as sshd does.
            _ = tokio::time::sleep(drain), if status.is_some() && pty_open => { pty_open = false; Ok(()) }
            stop = &mut input_failed, if input_open => match stop {
                Ok(stop) => Err(stop),
                Err(_) => { input_open = false; Ok(()) }
            },
            c = control.recv(), if control_open => match c {
                Some(Control::Resize(cols, rows)) => match &master {
                    Some(m) => {
                        let _ = m.resize(cols, rows);
                        Recorder::lock(recorder).terminal(|r| r.resize(cols, rows))
                    }
                    None => Ok(()),
                },
                Some(Control::Signal(sig)) => {
                    if let (Some(pid), Ok(sig)) = (pid, nix::sys::signal::Signal::try_from(sig)) {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                    }
                    Ok(())
                }
                None => {
                    // The client hung up: like a modem line dropping, the session gets SIGHUP.
                    control_open = false;
                    if let Some(pid) = pid {
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), nix::sys::signal::Signal::SIGHUP);
                        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGHUP);
                    }
                    Ok(())
                }
            },
            ev = async { exec_events.as_mut().unwrap().recv().await }, if exec_events.is_some() => match ev {
                Some(ev) => exec_event(agent, &session_id, recorder, &**sink, &ev).await,
                None => { exec_events = None; Ok(()) }
            },
            r = ended.changed(), if watching_end => match r {
                Ok(()) => {
                    let why = ended.borrow().clone().unwrap_or_else(|| "ended".into());
                    Err(Stop(format!("the grant {why}; the session is closed")))
                }
                // The table dropped its end of the watch: the session is being forgotten.
                Err(_) => { watching_end = false; Ok(()) }
            },
        };
        if let Err(stop) = step {
            break Some(stop);
        }
    };
    writer.abort();
    if stopped.is_some() {
        kill_all();
        // Reap the process; what it still writes goes nowhere.
        if status.is_none() {
            status = tokio::time::timeout(Duration::from_secs(5), child.wait())
                .await
                .ok()
                .and_then(Result::ok);
        }
    }
    // The last execs of a session (bash execs its last command) can reach the agent just
    // after the process is reaped: give them a moment to land in the recording.
    if let Some(rx) = exec_events.as_mut() {
        while let Ok(Some(note)) = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await
        {
            let _ = record_exec(agent, &session_id, recorder, &note);
        }
    }
    if let Some(rx) = exec_events {
        let path = agent.spool_dir().join(format!("{session_id}.audit.jsonl"));
        super::append_exec_events(path, session_id.clone(), rx);
    }
    if let Some(stop) = stopped {
        return Err(stop);
    }
    let status = status.expect("loop ends after the process");
    use std::os::unix::process::ExitStatusExt;
    Ok(match (status.code(), status.signal()) {
        (Some(c), _) => ExitOutcome::Status(c),
        (None, Some(s)) => ExitOutcome::Signal(s),
        _ => ExitOutcome::Status(255),
    })
}
