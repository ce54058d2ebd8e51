//! The I/O relay of a running session: the process's output to the client (recorded
//! first), the client's input to the process, resizes and signals, the kernel's exec
//! notes, and the end of the grant. Waiting (`next_event`) is kept apart from acting
//! (`handle`), and every way of ending goes through one `Stop`.

use super::exec_notes::{exec_event, record_exec};
use super::masking::{mask_exec_note, record_full_screen, record_masked, MaskedStream};
use super::recorder::{Recorder, SharedRecorder, Stop};
use super::request::{ClientSink, Control, ExitOutcome};
use super::spawn::PtyMaster;
use crate::enforce::{ExecNote, ExecReceiver};
use crate::guard::approval::Notice;
use crate::guard::mask::{MaskRules, Masked, Masker};
use crate::record::Keystrokes;
use bytes::Bytes;
use std::process::ExitStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, ChildStderr, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};

/// How much of the process's output is read at a time.
const READ_BYTES: usize = 32 * 1024;

/// How long a terminal may stay quiet after the session's process exited before the
/// relay stops reading it (something the shell started still holds it), as sshd does.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(100);

/// How long the input task gets to record what its masker held when the relay ends.
const INPUT_FLUSH: Duration = Duration::from_millis(100);

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
    /// A desktop's recording lines, from the client's side (`usher-rdp`).
    pub desktop: Option<mpsc::Receiver<String>>,
    pub exec_notes: Option<ExecReceiver>,
    /// Says why when the grant ends.
    pub grant_end: watch::Receiver<Option<String>>,
    /// Told of every exec the session makes.
    pub counted: Box<dyn Fn() + Send + Sync>,
    /// What the approval of its commands says (guard/approval).
    pub notices: Option<mpsc::Receiver<Notice>>,
    /// The profile's masking rules: each output stream and the recorded input get a
    /// masker of their own. `None`: nothing is masked, and nothing is spent on it.
    pub mask: Option<Arc<MaskRules>>,
}

#[derive(Debug, Clone, Copy)]
enum Source {
    Terminal = 0,
    Stdout = 1,
    Stderr = 2,
}

impl Source {
    fn masked_stream(self) -> MaskedStream {
        match self {
            Source::Terminal => MaskedStream::Terminal,
            Source::Stdout => MaskedStream::Stdout,
            Source::Stderr => MaskedStream::Stderr,
        }
    }
}

const SOURCES: [Source; 3] = [Source::Terminal, Source::Stdout, Source::Stderr];

/// One thing that happened, for `handle` to act on.
enum Event {
    /// What one read brought; `drained`: the read did not fill the buffer (nothing more
    /// was waiting).
    Output(Source, Bytes, bool),
    /// Text a masker held back is due.
    MaskDeadline,
    Closed(Source),
    Exited(std::io::Result<ExitStatus>),
    TerminalQuiet,
    InputFailed(Stop),
    InputDone,
    Control(Option<Control>),
    Desktop(Option<String>),
    Exec(Option<ExecNote>),
    Notice(Option<Notice>),
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
    desktop: Option<mpsc::Receiver<String>>,
    input_failed: Option<oneshot::Receiver<Stop>>,
    exec_notes: Option<ExecReceiver>,
    notices: Option<mpsc::Receiver<Notice>>,
    grant_end: Option<watch::Receiver<Option<String>>>,
    buffers: [Vec<u8>; 3],
    /// One masker per output source (by `Source`), while that source is open; none at all
    /// without masking rules.
    maskers: [Option<Masker>; 3],
    /// A full-screen program was reported (once per session).
    full_screen_said: bool,
    /// For the arguments of the session's execs.
    mask: Option<Arc<MaskRules>>,
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
    let input_masker = watched
        .mask
        .clone()
        .filter(|_| Recorder::lock(recorder).records_input())
        .map(Masker::new);
    let input_masked = input_masker.is_some();
    let (end_input, input_ended) = oneshot::channel::<()>();
    let (mut input, input_failed) = spawn_input(
        &mut process,
        stdin,
        recorder,
        &watched.session_id,
        (input_masker, input_ended),
    );
    let maskers = match &watched.mask {
        Some(rules) => SOURCES.map(|_| Some(Masker::new(rules.clone()))),
        None => [None, None, None],
    };
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
        desktop: watched.desktop,
        input_failed: Some(input_failed),
        exec_notes: watched.exec_notes,
        notices: watched.notices,
        grant_end: Some(watched.grant_end),
        buffers: [
            vec![0; READ_BYTES],
            vec![0; READ_BYTES],
            vec![0; READ_BYTES],
        ],
        maskers,
        full_screen_said: false,
        mask: watched.mask,
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
    // The input task records what its masker still holds, if it can do so at once (a
    // terminal that takes no more input keeps it waiting: it is ended then).
    if input_masked && end_input.send(()).is_ok() {
        let _ = tokio::time::timeout(INPUT_FLUSH, &mut input).await;
    }
    input.abort();
    if let Some(stop) = &stopped {
        sink.stopping(&stop.0).await;
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
/// With a masker, what is recorded of the input is masked (what the process gets is not);
/// `ended` says the relay is done, for the masker's last bytes to be recorded.
fn spawn_input(
    process: &mut Process,
    mut stdin: mpsc::Receiver<Bytes>,
    recorder: &SharedRecorder,
    session_id: &str,
    (masker, mut ended): (Option<Masker>, oneshot::Receiver<()>),
) -> (tokio::task::JoinHandle<()>, oneshot::Receiver<Stop>) {
    let (failed_tx, failed_rx) = oneshot::channel::<Stop>();
    let task = match &process.terminal {
        Some(terminal) => {
            let terminal = terminal.clone();
            let mut input = RecordedInput {
                recorder: recorder.clone(),
                session_id: session_id.to_string(),
                masker,
            };
            tokio::spawn(async move {
                let recorded = loop {
                    let deadline = input.masker.as_ref().and_then(Masker::deadline);
                    let data = tokio::select! {
                        data = stdin.recv() => data,
                        _ = &mut ended => break Ok(()),
                        _ = sleep_until(deadline), if deadline.is_some() => {
                            match input.release() {
                                Ok(()) => continue,
                                Err(stop) => break Err(stop),
                            }
                        }
                    };
                    let Some(data) = data else { break Ok(()) };
                    let keys = terminal.keystrokes();
                    if let Err(stop) = input.record(&data, keys) {
                        break Err(stop);
                    }
                    if terminal.write_all(&data).await.is_err() {
                        break Ok(());
                    }
                };
                // What the masker still holds was typed: it goes into the recording.
                match recorded.and_then(|()| input.finish()) {
                    Ok(()) => {}
                    Err(stop) => {
                        let _ = failed_tx.send(stop);
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

/// An approval notice: into the audit stream and the cast (a marker), and one line for
/// the client: on its terminal when it has one (a client shows a terminal session's
/// stderr apart, if at all), else on stderr.
pub(super) async fn notice<S: ClientSink>(
    recorder: &SharedRecorder,
    sink: &S,
    n: &Notice,
    on_terminal: bool,
) -> Result<(), Stop> {
    Recorder::lock(recorder).audit(|r| r.audit(&n.line, Some(&n.marker)))?;
    let line = Bytes::from(format!("\r\nusher: {}\r\n", n.say));
    if on_terminal {
        sink.stdout(line).await;
    } else {
        sink.stderr(line).await;
    }
    Ok(())
}

/// The terminal input as the recording keeps it, masked when the profile says so.
struct RecordedInput {
    recorder: SharedRecorder,
    session_id: String,
    masker: Option<Masker>,
}

impl RecordedInput {
    /// Records `data` (typed while the terminal was in mode `keys`). A password being
    /// typed is not recorded at all, so it never enters the masker either: what the
    /// masker holds is only ever recordable text.
    fn record(&mut self, data: &[u8], keys: Keystrokes) -> Result<(), Stop> {
        match (&mut self.masker, keys) {
            (Some(m), Keystrokes::Recordable) => {
                let masked = m.push(data, Instant::now(), true);
                self.keep(masked)
            }
            _ => Recorder::lock(&self.recorder).terminal(|r| r.input(data, keys)),
        }
    }

    fn release(&mut self) -> Result<(), Stop> {
        match &mut self.masker {
            Some(m) => {
                let masked = m.release(Instant::now());
                self.keep(masked)
            }
            None => Ok(()),
        }
    }

    fn finish(&mut self) -> Result<(), Stop> {
        match self.masker.take() {
            Some(mut m) => {
                let masked = m.finish();
                self.keep(masked)
            }
            None => Ok(()),
        }
    }

    fn keep(&mut self, masked: Masked) -> Result<(), Stop> {
        if !masked.hits.is_empty() {
            record_masked(
                &self.session_id,
                &self.recorder,
                MaskedStream::Input,
                &masked.hits,
            )?;
        }
        if masked.out.is_empty() {
            return Ok(());
        }
        Recorder::lock(&self.recorder).terminal(|r| r.input(&masked.out, Keystrokes::Recordable))
    }
}

/// Sleeps until `deadline`; never wakes without one (the branch is disabled then).
async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
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
            desktop,
            input_failed,
            exec_notes,
            notices,
            grant_end,
            buffers: [term_buf, out_buf, err_buf],
            maskers,
            ..
        } = self;
        let read = |source, n: std::io::Result<usize>, buf: &[u8]| match n {
            Ok(0) | Err(_) => Event::Closed(source),
            Ok(n) => Event::Output(source, Bytes::copy_from_slice(&buf[..n]), n < READ_BYTES),
        };
        let mask_deadline = maskers.iter().flatten().filter_map(Masker::deadline).min();
        tokio::select! {
            n = async { terminal.as_ref().expect("guarded").read(term_buf).await }, if terminal.is_some() =>
                read(Source::Terminal, n, term_buf),
            n = read_from(stdout, out_buf), if stdout.is_some() => read(Source::Stdout, n, out_buf),
            n = read_from(stderr, err_buf), if stderr.is_some() => read(Source::Stderr, n, err_buf),
            s = child.wait(), if status.is_none() => Event::Exited(s),
            _ = sleep_until(mask_deadline), if mask_deadline.is_some() => Event::MaskDeadline,
            _ = tokio::time::sleep(QUIET_AFTER_EXIT), if status.is_some() && terminal.is_some() =>
                Event::TerminalQuiet,
            r = async { input_failed.as_mut().expect("guarded").await }, if input_failed.is_some() =>
                match r {
                    Ok(stop) => Event::InputFailed(stop),
                    Err(_) => Event::InputDone,
                },
            c = async { control.as_mut().expect("guarded").recv().await }, if control.is_some() =>
                Event::Control(c),
            l = async { desktop.as_mut().expect("guarded").recv().await }, if desktop.is_some() =>
                Event::Desktop(l),
            n = async { exec_notes.as_mut().expect("guarded").recv().await }, if exec_notes.is_some() =>
                Event::Exec(n),
            n = async { notices.as_mut().expect("guarded").recv().await }, if notices.is_some() =>
                Event::Notice(n),
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
            Event::Output(source, data, drained) => self.deliver(source, data, drained).await,
            Event::MaskDeadline => self.release_held().await,
            Event::Closed(Source::Terminal) | Event::TerminalQuiet => {
                self.flush_masker(Source::Terminal).await?;
                self.terminal = None;
                Ok(())
            }
            Event::Closed(Source::Stdout) => {
                self.flush_masker(Source::Stdout).await?;
                self.stdout = None;
                Ok(())
            }
            Event::Closed(Source::Stderr) => {
                self.flush_masker(Source::Stderr).await?;
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
            Event::Desktop(Some(line)) => {
                let pause = {
                    let mut r = Recorder::lock(self.recorder);
                    r.terminal(|rec| rec.desktop(&line))?;
                    r.pause()
                };
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
                Ok(())
            }
            Event::Desktop(None) => {
                self.desktop = None;
                Ok(())
            }
            Event::Exec(Some(note)) => {
                let note = self.mask_exec(note)?;
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
            Event::Notice(Some(n)) => {
                notice(self.recorder, self.sink, &n, self.terminal.is_some()).await
            }
            Event::Notice(None) => {
                self.notices = None;
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

    /// What the session wrote, through the source's masker when there is one: only what
    /// the masker lets go is recorded and sent.
    async fn deliver(&mut self, source: Source, data: Bytes, drained: bool) -> Result<(), Stop> {
        match &mut self.maskers[source as usize] {
            Some(masker) => {
                let masked = masker.push(&data, Instant::now(), drained);
                self.emit(source, masked).await
            }
            None => self.send(source, data).await,
        }
    }

    /// Lets out what each masker held past its deadline.
    async fn release_held(&mut self) -> Result<(), Stop> {
        let now = Instant::now();
        for source in SOURCES {
            let released = match &mut self.maskers[source as usize] {
                Some(m) if m.deadline().is_some_and(|d| d <= now) => m.release(now),
                _ => continue,
            };
            self.emit(source, released).await?;
        }
        Ok(())
    }

    /// The end of a source: what its masker still holds goes out (masked where it
    /// matches) before the stream is dropped.
    async fn flush_masker(&mut self, source: Source) -> Result<(), Stop> {
        match self.maskers[source as usize].take() {
            Some(mut m) => {
                let rest = m.finish();
                self.emit(source, rest).await
            }
            None => Ok(()),
        }
    }

    /// A masker's answer: its findings into the audit trail, then its bytes to the
    /// recording and the client.
    async fn emit(&mut self, source: Source, masked: Masked) -> Result<(), Stop> {
        let Masked {
            out,
            hits,
            full_screen,
        } = masked;
        if !hits.is_empty() {
            record_masked(
                &self.session_id,
                self.recorder,
                source.masked_stream(),
                &hits,
            )?;
        }
        if full_screen && !self.full_screen_said {
            self.full_screen_said = true;
            record_full_screen(&self.session_id, self.recorder, source.masked_stream())?;
        }
        if out.is_empty() {
            return Ok(());
        }
        self.send(source, Bytes::from(out)).await
    }

    /// Sends what the session wrote to the client, once it is recorded; then waits if the
    /// recording's rate says so. While the client's window is full this waits too, and the
    /// session's output is not read meanwhile.
    async fn send(&mut self, source: Source, data: Bytes) -> Result<(), Stop> {
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
            Control::Stop(why) => Err(Stop(why)),
            Control::Signal(sig) => {
                if let (Some(pid), Ok(sig)) = (self.pid, nix::sys::signal::Signal::try_from(sig)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
                }
                Ok(())
            }
        }
    }

    /// An exec's arguments as the records keep them (masked), its maskings audited.
    fn mask_exec(&self, note: ExecNote) -> Result<ExecNote, Stop> {
        let (note, hits) = mask_exec_note(self.mask.as_ref(), note);
        record_masked(&self.session_id, self.recorder, MaskedStream::Exec, &hits)?;
        Ok(note)
    }

    /// The last execs of a session can reach the agent just after its process is reaped:
    /// they get a moment to land in the recording.
    async fn record_last_execs(&mut self) {
        let Some(rx) = self.exec_notes.as_mut() else {
            return;
        };
        while let Ok(Some(note)) = tokio::time::timeout(LAST_EXECS, rx.recv()).await {
            let (note, hits) = mask_exec_note(self.mask.as_ref(), note);
            let _ = record_masked(&self.session_id, self.recorder, MaskedStream::Exec, &hits);
            let _ = record_exec(&self.session_id, self.recorder, &note, &*self.counted);
        }
    }
}

#[cfg(test)]
mod tests {
    //! The relay with real processes (as the test's own user: no root), a real recording
    //! in a scratch spool, and a client that keeps what it is sent.
    use super::*;
    use crate::enforce::{ExecEvent, Verdict};
    use crate::record::{GrantInfo, Recording, SessionMeta};
    use crate::session::budget::{AtLimit, RecordingBudget, RecordingLimits, SpoolMeter};
    use std::process::Stdio;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[derive(Default)]
    struct Client {
        stdout: Mutex<Vec<u8>>,
        stderr: Mutex<Vec<u8>>,
    }

    impl ClientSink for Client {
        async fn stdout(&self, data: Bytes) -> bool {
            self.stdout.lock().unwrap().extend_from_slice(&data);
            true
        }
        async fn stderr(&self, data: Bytes) -> bool {
            self.stderr.lock().unwrap().extend_from_slice(&data);
            true
        }
        async fn finish(&self, _: ExitOutcome) {}
    }

    impl Client {
        fn stdout(&self) -> String {
            String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
        }
        fn stderr(&self) -> String {
            String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
        }
    }

    struct Scratch {
        dir: PathBuf,
    }

    use std::path::PathBuf;

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir = std::env::temp_dir().join(format!(
                "usher-relay-{name}-{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Scratch { dir }
        }

        fn recorder(&self, limits: RecordingLimits) -> SharedRecorder {
            self.recorder_with_input(limits, false)
        }

        fn recorder_with_input(&self, limits: RecordingLimits, input: bool) -> SharedRecorder {
            let meta = SessionMeta {
                session_id: "s1".into(),
                kind: "ssh".into(),
                host: "h".into(),
                login: "jit-test".into(),
                uid: 0,
                grant: GrantInfo {
                    iss: "i".into(),
                    sub: "s".into(),
                    jti: "j".into(),
                    profile: "default".into(),
                    approved_by: None,
                    reason: None,
                    request: None,
                    expires_at: 0,
                },
                peer: None,
                command: None,
                term: None,
                started_at: String::new(),
                ended_at: None,
                exit_status: None,
                exit_signal: None,
                enforcement: "off".into(),
                enforced: false,
                input_recorded: input,
                interrupted: false,
                truncated: None,
                limits: None,
            };
            let header = crate::record::CastHeader {
                version: 2,
                width: 80,
                height: 24,
                timestamp: 0,
                command: None,
                title: None,
                env: Default::default(),
            };
            let recording = Recording::create(&self.dir, meta, Some(header), input).unwrap();
            let spool = SpoolMeter::new(self.dir.clone(), 1 << 40);
            Recorder::new(Some(recording), true, RecordingBudget::new(limits, spool))
        }

        /// The output the cast holds, joined.
        fn cast_output(&self) -> String {
            let text = std::fs::read_to_string(self.dir.join("s1.cast")).unwrap();
            text.lines()
                .skip(1)
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v[1] == "o")
                .map(|v| v[2].as_str().unwrap_or_default().to_string())
                .collect()
        }

        /// The input the cast holds, joined.
        fn cast_input(&self) -> String {
            let text = std::fs::read_to_string(self.dir.join("s1.cast")).unwrap();
            text.lines()
                .skip(1)
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v[1] == "i")
                .map(|v| v[2].as_str().unwrap_or_default().to_string())
                .collect()
        }

        /// The `masked` events of the audit stream: (stream, rule, count).
        fn masked(&self) -> Vec<(String, String, u64)> {
            self.audit()
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|v| v["event"] == "masked")
                .map(|v| {
                    (
                        v["stream"].as_str().unwrap_or_default().to_string(),
                        v["rule"].as_str().unwrap_or_default().to_string(),
                        v["count"].as_u64().unwrap_or_default(),
                    )
                })
                .collect()
        }

        fn audit(&self) -> String {
            std::fs::read_to_string(self.dir.join("s1.audit.jsonl")).unwrap()
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn piped(script: &str) -> Child {
        tokio::process::Command::new("/bin/sh")
            .args(["-c", script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap()
    }

    /// A process on pipes; `killed` says whether the relay asked for everything to die.
    fn process(child: Child) -> (Process, Arc<AtomicBool>) {
        let killed = Arc::new(AtomicBool::new(false));
        let pid = child.id().unwrap() as i32;
        let flag = killed.clone();
        let kill_all = Box::new(move || {
            flag.store(true, Ordering::SeqCst);
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        });
        let p = Process {
            child,
            terminal: None,
            kill_all,
        };
        (p, killed)
    }

    struct Wires {
        stdin: mpsc::Sender<Bytes>,
        control: mpsc::Sender<Control>,
        exec: mpsc::Sender<ExecNote>,
        grant_end: watch::Sender<Option<String>>,
    }

    async fn run_relay(
        process: Process,
        recorder: &SharedRecorder,
        client: &Client,
        wired: impl FnOnce(Wires) + Send + 'static,
    ) -> Result<ExitOutcome, Stop> {
        run_masked_relay(process, recorder, client, None, wired).await
    }

    async fn run_masked_relay(
        process: Process,
        recorder: &SharedRecorder,
        client: &Client,
        mask: Option<Arc<MaskRules>>,
        wired: impl FnOnce(Wires) + Send + 'static,
    ) -> Result<ExitOutcome, Stop> {
        let (stdin_tx, stdin) = mpsc::channel(4);
        let (control_tx, control) = mpsc::channel(4);
        let (exec_tx, exec_notes) = mpsc::channel(4);
        let (end_tx, grant_end) = watch::channel(None);
        wired(Wires {
            stdin: stdin_tx,
            control: control_tx,
            exec: exec_tx,
            grant_end: end_tx,
        });
        let watched = Watched {
            session_id: "s1".into(),
            desktop: None,
            exec_notes: Some(exec_notes),
            grant_end,
            counted: Box::new(|| {}),
            notices: None,
            mask,
        };
        let relayed = relay(process, stdin, control, watched, recorder, client);
        tokio::time::timeout(Duration::from_secs(20), relayed)
            .await
            .expect("the relay ends")
            .0
    }

    /// Keeps the wires alive for a while (a client that stays connected).
    fn hold(w: Wires) {
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            drop(w);
        });
    }

    #[tokio::test]
    async fn output_reaches_the_client_after_the_recording_and_the_status_is_returned() {
        let scratch = Scratch::new("out");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, killed) = process(piped("printf hello; printf oops >&2; exit 3"));
        let outcome = run_relay(p, &recorder, &client, hold).await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(3));
        assert_eq!(client.stdout(), "hello");
        assert_eq!(client.stderr(), "oops");
        let cast = scratch.cast_output();
        assert!(cast.contains("hello") && cast.contains("oops"), "{cast}");
        assert!(!killed.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn client_input_reaches_the_process_and_eof_closes_its_stdin() {
        let scratch = Scratch::new("in");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped("tr a-z A-Z"));
        let outcome = run_relay(p, &recorder, &client, |w| {
            tokio::spawn(async move {
                w.stdin.send(Bytes::from_static(b"shout\n")).await.unwrap();
                let Wires {
                    stdin,
                    control,
                    exec,
                    grant_end,
                } = w;
                // Dropping stdin is the client's EOF; the rest stays connected.
                drop(stdin);
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop((control, exec, grant_end));
            });
        })
        .await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        assert_eq!(client.stdout(), "SHOUT\n");
    }

    #[tokio::test]
    async fn the_grant_ending_stops_the_session_at_once_and_kills_what_it_started() {
        let scratch = Scratch::new("end");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, killed) = process(piped("echo started; exec sleep 30"));
        let started = std::time::Instant::now();
        let outcome = run_relay(p, &recorder, &client, |w| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                w.grant_end.send_replace(Some("was revoked".into()));
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(w);
            });
        })
        .await;
        let Err(Stop(why)) = outcome else {
            panic!("the relay went on after the grant's end: {outcome:?}")
        };
        assert_eq!(why, "the grant was revoked; the session is closed");
        assert!(killed.load(Ordering::SeqCst), "kill_all was not called");
        assert!(started.elapsed() < Duration::from_secs(10));
        assert_eq!(client.stdout(), "started\n");
    }

    #[tokio::test]
    async fn a_session_at_its_recording_limit_ends_and_the_client_saw_nothing_unrecorded() {
        let scratch = Scratch::new("limit");
        let limits = RecordingLimits {
            max_bytes: 64 << 10,
            max_bytes_per_sec: 0,
            at_limit: AtLimit::End,
        };
        let recorder = scratch.recorder(limits);
        let client = Client::default();
        let (p, killed) = process(piped("exec yes usher-line"));
        let outcome = run_relay(p, &recorder, &client, hold).await;
        let Err(Stop(why)) = outcome else {
            panic!("no stop at the limit: {outcome:?}")
        };
        assert!(why.contains("the session is closed"), "{why}");
        assert!(killed.load(Ordering::SeqCst));
        let seen = client.stdout();
        let recorded = scratch.cast_output();
        assert!(!seen.is_empty());
        assert!(
            recorded.starts_with(&seen),
            "the client saw {} bytes, of which some were not recorded ({} recorded)",
            seen.len(),
            recorded.len()
        );
        assert!(scratch.audit().contains("recording_limit"));
    }

    #[tokio::test]
    async fn a_blocked_exec_is_recorded_and_said_on_the_clients_terminal() {
        let scratch = Scratch::new("exec");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped("sleep 0.5"));
        let event = |path: &str, verdict| ExecEvent {
            time: 0.0,
            cgroup_id: 1,
            pid: 2,
            ppid: 1,
            uid: 61000,
            path: path.into(),
            filename: path.into(),
            dev: "0:1".into(),
            ino: 3,
            argv: vec![path.into()],
            argv_truncated: false,
            verdict,
            rule: Some("deny /usr/bin/nc".into()),
        };
        let allowed = event("/usr/bin/id", Verdict::Allowed);
        let blocked = event("/usr/bin/nc", Verdict::Killed);
        let outcome = run_relay(p, &recorder, &client, move |w| {
            tokio::spawn(async move {
                w.exec.send(ExecNote::Exec(allowed)).await.unwrap();
                w.exec.send(ExecNote::Exec(blocked)).await.unwrap();
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(w);
            });
        })
        .await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        assert_eq!(
            client.stderr(),
            "\r\nusher: blocked /usr/bin/nc (deny /usr/bin/nc)\r\n"
        );
        let audit = scratch.audit();
        assert!(
            audit.contains("/usr/bin/id") && audit.contains("/usr/bin/nc"),
            "{audit}"
        );
    }

    #[tokio::test]
    async fn a_client_that_hangs_up_sends_the_session_sighup() {
        let scratch = Scratch::new("hup");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped(
            "trap 'echo hangup; exit 7' HUP; echo ready; while :; do sleep 0.05; done",
        ));
        let outcome = run_relay(p, &recorder, &client, |w| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let Wires {
                    stdin,
                    control,
                    exec,
                    grant_end,
                } = w;
                // The control channel closing is the client going away.
                drop(control);
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop((stdin, exec, grant_end));
            });
        })
        .await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(7));
        assert_eq!(client.stdout(), "ready\nhangup\n");
    }

    #[tokio::test]
    async fn a_terminal_session_is_relayed_and_resized() {
        let scratch = Scratch::new("pty");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (master, slave) = crate::session::spawn::open_pty(80, 24).unwrap();
        let io = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = tokio::process::Command::new("/bin/sh")
            .args(["-c", "sleep 0.3; stty size"])
            .stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        drop(slave);
        let (mut p, _) = process(child);
        p.terminal = Some(Arc::new(master));
        let outcome = run_relay(p, &recorder, &client, |w| {
            tokio::spawn(async move {
                w.control.send(Control::Resize(100, 40)).await.unwrap();
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(w);
            });
        })
        .await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        assert_eq!(client.stdout().trim(), "40 100");
        let cast = std::fs::read_to_string(scratch.dir.join("s1.cast")).unwrap();
        assert!(cast.contains(r#""r","100x40""#), "{cast}");
    }

    const AWS_KEY: &str = "AKIAIOSFODNN7EXAMPLE";

    fn aws_rules() -> Option<Arc<MaskRules>> {
        let config = crate::guard::mask::MaskConfig {
            detectors: vec!["aws_access_key".into(), "credit_card".into()],
            patterns: vec![],
        };
        Some(MaskRules::compile(&config).unwrap())
    }

    #[tokio::test]
    async fn a_secret_written_in_two_pieces_reaches_neither_the_client_nor_the_cast() {
        let scratch = Scratch::new("mask-split");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped(
            "printf 'key AKIA'; sleep 0.2; printf 'IOSFODNN7EXAMPLE done\\n'",
        ));
        let outcome = run_masked_relay(p, &recorder, &client, aws_rules(), hold).await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        let seen = client.stdout();
        assert!(
            seen.starts_with("key ") && seen.ends_with(" done\n"),
            "{seen:?}"
        );
        assert!(!seen.contains("IOSFODNN7EXAMPLE"), "{seen:?}");
        assert_eq!(seen.len(), "key  done\n".len() + AWS_KEY.len(), "{seen:?}");
        let cast = scratch.cast_output();
        assert!(!cast.contains("IOSFODNN7EXAMPLE"), "{cast}");
        assert_eq!(
            scratch.masked(),
            [("stdout".to_string(), "aws_access_key".to_string(), 1)]
        );
        assert!(!scratch.audit().contains("IOSFODNN7EXAMPLE"));
    }

    #[tokio::test]
    async fn what_a_masker_holds_at_the_end_of_the_stream_is_not_lost() {
        let scratch = Scratch::new("mask-end");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        // "AKIA" could still become a key: held, until the stream ends.
        let (p, _) = process(piped("printf 'ends with AKIA'; printf 'and 4111' >&2"));
        let outcome = run_masked_relay(p, &recorder, &client, aws_rules(), hold).await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        assert_eq!(client.stdout(), "ends with AKIA");
        assert_eq!(client.stderr(), "and 4111");
        assert!(scratch.masked().is_empty());
    }

    #[tokio::test]
    async fn stderr_is_masked_and_its_rule_and_count_are_audited() {
        let scratch = Scratch::new("mask-err");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped(
            "printf 'AKIAIOSFODNN7EXAMPLE and AKIAIOSFODNN7EXAMPLF\\n' >&2; echo 4111111111111111",
        ));
        let outcome = run_masked_relay(p, &recorder, &client, aws_rules(), hold).await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        let err = client.stderr();
        assert!(!err.contains("AKIA"), "{err:?}");
        assert_eq!(
            err.len(),
            "AKIAIOSFODNN7EXAMPLE and AKIAIOSFODNN7EXAMPLF\n".len()
        );
        assert_eq!(client.stdout(), "****************\n");
        let mut masked = scratch.masked();
        masked.sort();
        assert_eq!(
            masked,
            [
                ("stderr".to_string(), "aws_access_key".to_string(), 2),
                ("stdout".to_string(), "credit_card".to_string(), 1),
            ]
        );
        let audit = scratch.audit();
        assert!(!audit.contains("IOSFODNN7") && !audit.contains("4111111111111111"));
    }

    #[tokio::test]
    async fn typed_secrets_are_masked_in_the_recorded_input_but_the_process_gets_them() {
        let scratch = Scratch::new("mask-input");
        let recorder = scratch.recorder_with_input(RecordingLimits::default(), true);
        let client = Client::default();
        let (master, slave) = crate::session::spawn::open_pty(80, 24).unwrap();
        let io = |fd: &std::os::fd::OwnedFd| Stdio::from(fd.try_clone().unwrap());
        let child = tokio::process::Command::new("/bin/sh")
            .args(["-c", "read x; echo \"length ${#x}\""])
            .stdin(io(&slave))
            .stdout(io(&slave))
            .stderr(io(&slave))
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        drop(slave);
        let (mut p, _) = process(child);
        p.terminal = Some(Arc::new(master));
        let outcome = run_masked_relay(p, &recorder, &client, aws_rules(), |w| {
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let line = format!("{AWS_KEY}\n");
                w.stdin.send(Bytes::from(line)).await.unwrap();
                tokio::time::sleep(Duration::from_secs(30)).await;
                drop(w);
            });
        })
        .await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        let seen = client.stdout();
        // The shell read all 20 characters; the terminal's echo of them is masked.
        assert!(seen.contains("length 20"), "{seen:?}");
        assert!(!seen.contains(AWS_KEY), "{seen:?}");
        let typed = scratch.cast_input();
        assert!(!typed.contains("IOSFODNN7"), "{typed:?}");
        assert!(typed.contains(&"*".repeat(20)), "{typed:?}");
        let masked = scratch.masked();
        assert!(
            masked.contains(&("input".to_string(), "aws_access_key".to_string(), 1)),
            "{masked:?}"
        );
    }

    #[tokio::test]
    async fn without_rules_output_is_relayed_byte_for_byte() {
        let scratch = Scratch::new("mask-off");
        let recorder = scratch.recorder(RecordingLimits::default());
        let client = Client::default();
        let (p, _) = process(piped("printf 'AKIAIOSFODNN7EXAMPLE 4111111111111111'"));
        let outcome = run_relay(p, &recorder, &client, hold).await;
        assert_eq!(outcome.unwrap(), ExitOutcome::Status(0));
        assert_eq!(client.stdout(), "AKIAIOSFODNN7EXAMPLE 4111111111111111");
        assert!(scratch.masked().is_empty());
    }
}
