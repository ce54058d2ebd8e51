//! The I/O relay of a running session: the process's output to the client (recorded
//! first), the client's input to the process, resizes and signals, the kernel's exec
//! notes, and the end of the grant. Waiting (`next_event`) is kept apart from acting
//! (`handle`), and every way of ending goes through one `Stop`.

use super::exec_notes::{exec_event, record_exec};
use super::recorder::{Recorder, SharedRecorder, Stop};
use super::request::{ClientSink, Control, ExitOutcome};
use super::spawn::PtyMaster;
use crate::enforce::{ExecNote, ExecReceiver};
use bytes::Bytes;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};

/// How much of the process's output is read at a time.
const READ_BYTES: usize = 32 * 1024;

/// How long a terminal may stay quiet after the session's process exited before the
/// relay stops reading it (something the shell started still holds it), as sshd does.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);

/// How long the last exec notes get to arrive after the process is gone (bash execs its
/// last command just before it exits).
const LAST_EXECS: Duration = Duration::from_millis(50);

/// The session's process as the relay sees it.
pub(super) struct Process {
    pub child: Child,
    /// The terminal's master side, for a session with a PTY.
    pub terminal: Option<Arc<PtyMaster>>,
    /// Kills everything the session started (its cgroup), when the relay is stopped.
    pub kill_all: Box<dyn Fn() + Send + Sync>,
}

/// What the relay watches besides the process and the client.
pub(super) struct Watched {
    pub session_id: String,
    pub exec_notes: Option<ExecReceiver>,
    /// Says why when the grant ends.
    pub grant_end: watch::Receiver<Option<String>>,
    /// Told of every exec the session makes.
    pub counted: Box<dyn Fn() + Send + Sync>,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Terminal,
    Stdout,
    Stderr,
}

/// One thing that happened, for `handle` to act on.
enum Event {
    Output(Source, Bytes),
    Closed(Source),
    Exited(std::io::Result<ExitStatus>),
    TerminalQuiet,
    InputFailed(Stop),
    InputDone,
    Control(Option<Control>),
    Exec(Option<ExecNote>),
    GrantEnded(String),
    GrantWatchGone,
}

struct Relay<'a, S> {
    recorder: &'a SharedRecorder,
    sink: &'a S,
    session_id: String,
    counted: Box<dyn Fn() + Send + Sync>,
    child: Child,
    pid: Option<i32>,
    status: Option<ExitStatus>,
    // Each stream is `None` once it is closed (or was never there).
    terminal: Option<Arc<PtyMaster>>,
    stdout: Option<ChildStdout>,
    stderr: Option<ChildStderr>,
    control: Option<mpsc::Receiver<Control>>,
    input_failed: Option<oneshot::Receiver<Stop>>,
    exec_notes: Option<ExecReceiver>,
    grant_end: Option<watch::Receiver<Option<String>>>,
    buffers: [Vec<u8>; 3],
}

/// Relays until the process has exited and its output is drained, or until something
/// stops the session. Returns how it ended and the exec notes still to come (processes the
/// session left behind), for the audit stream.
pub(super) async fn relay<S: ClientSink>(
    mut process: Process,
    stdin: mpsc::Receiver<Bytes>,
    control: mpsc::Receiver<Control>,
    watched: Watched,
    recorder: &SharedRecorder,
    sink: &S,
) -> (Result<ExitOutcome, Stop>, Option<ExecReceiver>) {
    let (input, input_failed) = spawn_input(&mut process, stdin, recorder);
    let mut relay = Relay {
        recorder,
        sink,
        session_id: watched.session_id,
        counted: watched.counted,
        pid: process.child.id().map(|p| p as i32),
        stdout: process.child.stdout.take(),
        stderr: process.child.stderr.take(),
        child: process.child,
        status: None,
        terminal: process.terminal,
        control: Some(control),
        input_failed: Some(input_failed),
        exec_notes: watched.exec_notes,
        grant_end: Some(watched.grant_end),
        buffers: [vec![0; READ_BYTES], vec![0; READ_BYTES], vec![0; READ_BYTES]],
    };
    let stopped = loop {
        if relay.status.is_some()
            && relay.terminal.is_none()
            && relay.stdout.is_none()
            && relay.stderr.is_none()
        {
            break None;
        }
        let event = relay.next_event().await;
        if let Err(stop) = relay.handle(event).await {
            break Some(stop);
        }
    };
    input.abort();
    if stopped.is_some() {
        (process.kill_all)();
        // Reap the process; what it still writes goes nowhere.
        if relay.status.is_none() {
            relay.status = tokio::time::timeout(Duration::from_secs(5), relay.child.wait())
                .await
                .ok()
                .and_then(Result::ok);
        }
    }
    relay.record_last_execs().await;
    let outcome = match (stopped, relay.status) {
        (Some(stop), _) => Err(stop),
        (None, Some(status)) => Ok(ExitOutcome::of(status)),
        (None, None) => unreachable!("the relay ends on its own only after the process"),
    };
    (outcome, relay.exec_notes)
}

/// Client → process, in a task of its own so that a process that does not read cannot
/// stall its output. Terminal input is recorded (as the terminal's mode allows) before it
/// is written; a recording that must stop the session says so through the receiver.
fn spawn_input(
    process: &mut Process,
    mut stdin: mpsc::Receiver<Bytes>,
    recorder: &SharedRecorder,
) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<Stop>) {
    let (failed_tx, failed_rx) = oneshot::channel::<Stop>();
    let task = match &process.terminal {
        Some(terminal) => {
            let terminal = terminal.clone();
            let recorder = recorder.clone();
            tokio::spawn(async move {
                while let Some(data) = stdin.recv().await {
                    let keys = terminal.keystrokes();
                    let recorded = Recorder::lock(&recorder).terminal(|r| r.input(&data, keys));
                    if let Err(stop) = recorded {
                        let _ = failed_tx.send(stop);
                        break;
                    }
                    if terminal.write_all(&data).await.is_err() {
                        break;
                    }
                }
            })
        }
        None => {
            let mut child_stdin = process.child.stdin.take();
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
    (task, failed_rx)
}

/// Reads into `buf` from a stream that may be closed.
async fn read_from(
    stream: &mut Option<impl tokio::io::AsyncRead + Unpin>,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    stream.as_mut().expect("guarded by is_some").read(buf).await
}

impl<S: ClientSink> Relay<'_, S> {
    async fn next_event(&mut self) -> Event {
        let Relay {
            child,
            status,
            terminal,
            stdout,
            stderr,
            control,
            input_failed,
            exec_notes,
            grant_end,
            buffers: [term_buf, out_buf, err_buf],
            ..
        } = self;
        let read = |source, n: std::io::Result<usize>, buf: &[u8]| match n {
            Ok(0) | Err(_) => Event::Closed(source),
            Ok(n) => Event::Output(source, Bytes::copy_from_slice(&buf[..n])),
        };
        tokio::select! {
            n = async { terminal.as_ref().expect("guarded").read(term_buf).await }, if terminal.is_some() =>
                read(Source::Terminal, n, term_buf),
            n = read_from(stdout, out_buf), if stdout.is_some() => read(Source::Stdout, n, out_buf),
            n = read_from(stderr, err_buf), if stderr.is_some() => read(Source::Stderr, n, err_buf),
            s = child.wait(), if status.is_none() => Event::Exited(s),
            _ = tokio::time::sleep(QUIET_AFTER_EXIT), if status.is_some() && terminal.is_some() =>
                Event::TerminalQuiet,
            r = async { input_failed.as_mut().expect("guarded").await }, if input_failed.is_some() =>
                match r {
                    Ok(stop) => Event::InputFailed(stop),
                    Err(_) => Event::InputDone,
                },
            c = async { control.as_mut().expect("guarded").recv().await }, if control.is_some() =>
                Event::Control(c),
            n = async { exec_notes.as_mut().expect("guarded").recv().await }, if exec_notes.is_some() =>
                Event::Exec(n),
            r = async { grant_end.as_mut().expect("guarded").changed().await }, if grant_end.is_some() =>
                match r {
                    Ok(()) => Event::GrantEnded(
                        grant_end.as_ref().and_then(|g| g.borrow().clone()).unwrap_or_else(|| "ended".into()),
                    ),
                    Err(_) => Event::GrantWatchGone,
                },
        }
    }

    /// Acts on one event. Output is recorded before it is sent; an `Err` ends the relay at
    /// once, so nothing unrecorded (or past the end of the grant) reaches the client.
    async fn handle(&mut self, event: Event) -> Result<(), Stop> {
        match event {
            Event::Output(source, data) => self.deliver(source, data).await,
            Event::Closed(Source::Terminal) | Event::TerminalQuiet => {
                self.terminal = None;
                Ok(())
            }
            Event::Closed(Source::Stdout) => {
                self.stdout = None;
                Ok(())
            }
            Event::Closed(Source::Stderr) => {
                self.stderr = None;
                Ok(())
            }
            Event::Exited(Ok(status)) => {
                self.status = Some(status);
                Ok(())
            }
            Event::Exited(Err(e)) => Err(Stop(format!("lost the session's process: {e}"))),
            Event::InputFailed(stop) => Err(stop),
            Event::InputDone => {
                self.input_failed = None;
                Ok(())
            }
            Event::Control(Some(c)) => self.control(c),
            Event::Control(None) => {
                // The client hung up: like a modem line dropping, the session gets SIGHUP.
                self.control = None;
                if let Some(pid) = self.pid {
                    let hup = nix::sys::signal::Signal::SIGHUP;
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(-pid), hup);
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), hup);
                }
                Ok(())
            }
            Event::Exec(Some(note)) => {
                exec_event(
                    &self.session_id,
                    self.recorder,
                    self.sink,
                    &note,
                    &*self.counted,
                )
                .await
            }
            Event::Exec(None) => {
                self.exec_notes = None;
                Ok(())
            }
            Event::GrantEnded(why) => Err(Stop(format!("the grant {why}; the session is closed"))),
            // The table dropped its end of the watch: the session is being forgotten.
            Event::GrantWatchGone => {
                self.grant_end = None;
                Ok(())
            }
        }
    }

    /// Sends what the session wrote to the client, once it is recorded; then waits if the
    /// recording's rate says so. While the client's window is full this waits too, and the
    /// session's output is not read meanwhile.
    async fn deliver(&mut self, source: Source, data: Bytes) -> Result<(), Stop> {
        let pause = {
            let mut r = Recorder::lock(self.recorder);
            r.terminal(|rec| rec.output(&data))?;
            r.pause()
        };
        match source {
            Source::Stderr => self.sink.stderr(data).await,
            Source::Terminal | Source::Stdout => self.sink.stdout(data).await,
        };
        if let Some(p) = pause {
            tokio::time::sleep(p).await;
        }
        Ok(())
    }

    fn control(&mut self, control: Control) -> Result<(), Stop> {
        match control {
            Control::Resize(cols, rows) => match &self.terminal {
                Some(t) => {
                    let _ = t.resize(cols, rows);
                    Recorder::lock(self.recorder).terminal(|r| r.resize(cols, rows))
                }
                None => Ok(()),
            },
            Control::Signal(sig) => {
                if let (Some(pid), Ok(sig)) = (self.pid, nix::sys::signal::Signal::try_from(sig)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                }
                Ok(())
            }
        }
    }

    /// The last execs of a session can reach the agent just after its process is reaped:
    /// they get a moment to land in the recording.
    async fn record_last_execs(&mut self) {
        let Some(rx) = self.exec_notes.as_mut() else {
            return;
        };
        while let Ok(Some(note)) = tokio::time::timeout(LAST_EXECS, rx.recv()).await {
            let _ = record_exec(&self.session_id, self.recorder, &note, &*self.counted);
        }
    }
}
