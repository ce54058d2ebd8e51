//! Console sessions: a local login (`login` on a tty, a serial console, `su - name`) of an
//! ephemeral account starts its login shell, `usher-shell`, which hands its terminal to the
//! agent over `console.sock`. The agent then runs the session exactly as it runs an SSH
//! one — its own cgroup, the exec profile, a recording — relaying between the login's
//! terminal and a PTY of its own. The account's identity comes from SO_PEERCRED, never
//! from what the client says.

use crate::session::{
    self, ClientIo, ClientSink, Control, Core, ExitOutcome, PtySpec, SessionCommand, SessionKind,
    SessionRequest,
};
use bytes::Bytes;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Mutex};
use usher_wire::console::{
    LineError, OpenRequest, ShellControl, ShellEvent, MAX_CONTROL_LINE_BYTES,
    MAX_OPEN_REQUEST_BYTES,
};

/// Serves console logins for as long as the agent lives. Every account's login shell
/// connects here; who it is comes from the kernel. A peer outside the agent's UID range
/// (root excepted) is dropped before anything is read; each UID holds a few connections
/// at most, and a request must arrive within seconds.
pub async fn serve<C: Core>(
    core: Arc<C>,
    range: std::ops::RangeInclusive<u32>,
    listener: UnixListener,
) {
    let slots = crate::admission::Admission::new(256, 8);
    crate::control::accept_forever(listener, "console", move |stream, uid| {
        if uid != 0 && !range.contains(&uid) {
            return;
        }
        let slot = match slots.try_admit(uid) {
            Ok(s) => s,
            Err(why) => {
                log::warn!(target: "usher::console", "console connection of uid {uid} dropped: {why}");
                return;
            }
        };
        let core = core.clone();
        tokio::spawn(async move {
            if let Err(e) = handle(core, stream).await {
                log::warn!(target: "usher::console", "console request failed: {e}");
            }
            drop(slot);
        });
    })
    .await
}

async fn handle<C: Core>(core: Arc<C>, stream: UnixStream) -> Result<(), String> {
    let cred = stream.peer_cred().map_err(|e| e.to_string())?;
    let uid = cred.uid();
    let std_stream = stream.into_std().map_err(|e| e.to_string())?;
    let (std_stream, payload, fds) =
        tokio::task::spawn_blocking(move || receive_with_fds(std_stream))
            .await
            .map_err(|e| e.to_string())??;
    std_stream
        .set_nonblocking(true)
        .map_err(|e| e.to_string())?;
    let stream = UnixStream::from_std(std_stream).map_err(|e| e.to_string())?;
    let (read, write) = stream.into_split();
    let write = Arc::new(Mutex::new(write));

    let request = match OpenRequest::decode(&payload) {
        Ok(r) if fds.len() == 3 => r,
        refused => {
            if let Err(e) = refused {
                log::warn!(target: "usher::console", "console request of uid {uid} refused: {e}");
            }
            return say(
                &write,
                &ShellEvent::Refused {
                    reason: "bad request".into(),
                },
            )
            .await;
        }
    };
    let grant = match core.console_grant(uid) {
        Ok(g) => g,
        Err(why) => {
            let reason = why.to_string();
            audit!("console_refused", uid = uid, reason = reason.as_str(); "console login of uid {uid} refused: {reason}");
            return say(&write, &ShellEvent::Refused { reason }).await;
        }
    };
    let mut fds = fds.into_iter();
    let (fd_in, fd_out, fd_err) = (
        fds.next().unwrap(),
        fds.next().unwrap(),
        fds.next().unwrap(),
    );
    let is_tty = std::io::IsTerminal::is_terminal(&fd_in);
    let pty = is_tty.then(|| {
        let (cols, rows) = session::spawn::terminal_size(fd_in.as_fd()).unwrap_or((80, 24));
        PtySpec {
            term: request
                .term
                .filter(|t| t.len() <= 64 && t.chars().all(|c| c.is_ascii_graphic()))
                .unwrap_or_else(|| "linux".into()),
            cols,
            rows,
        }
    });
    let tty = nix::unistd::ttyname(fd_in.as_fd())
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "no terminal".into());
    let session_request = SessionRequest {
        kind: SessionKind::Console,
        command: match request.command {
            Some(c) if !c.contains('\0') => SessionCommand::Exec(c),
            _ => SessionCommand::Shell,
        },
        pty,
        env: Vec::new(),
        peer: Some(format!("console {tty} (pid {})", cred.pid().unwrap_or(0))),
    };

    // The client's descriptors may be a terminal, a pipe or /dev/null (not all can be
    // polled by epoll): a thread reads with poll(2) and a short timeout, so that it stops
    // when the session does and never steals input from whoever reads the terminal next.
    let (stdin_tx, stdin_rx) = mpsc::channel::<Bytes>(64);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let stop = stop.clone();
        let file = std::fs::File::from(fd_in);
        std::thread::spawn(move || read_until_stopped(file, stdin_tx, stop))
    };
    let (control_tx, control_rx) = mpsc::channel(crate::session::CONTROL_QUEUE);
    let controller = tokio::spawn(async move {
        let mut reader = BufReader::new(read);
        let mut line = Vec::new();
        loop {
            line.clear();
            // One byte over the limit is enough to know a line is too long.
            let mut limited = (&mut reader).take(MAX_CONTROL_LINE_BYTES as u64 + 1);
            match limited.read_until(b'\n', &mut line).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            match ShellControl::decode(&line) {
                Ok(ShellControl::Resize(size)) => {
                    let _ = control_tx.try_send(Control::Resize(
                        size.cols.clamp(1, 1000),
                        size.rows.clamp(1, 1000),
                    ));
                }
                Err(e @ LineError::TooLarge { .. }) => {
                    log::warn!(target: "usher::console", "console session of uid {uid} hung up: {e}");
                    break;
                }
                // A message a newer shell sends: nothing to do with it here.
                Err(LineError::Malformed(_)) => {}
            }
        }
        // The login shell is gone (or speaks nonsense): the session is hung up.
    });
    let sink = Arc::new(ConsoleSink {
        out: Arc::new(std::fs::File::from(fd_out)),
        err: Arc::new(std::fs::File::from(fd_err)),
        socket: write.clone(),
    });
    session::run(
        core,
        grant,
        session_request,
        ClientIo {
            stdin: stdin_rx,
            control: control_rx,
            sink,
            desktop: None,
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    controller.abort();
    let _ = tokio::task::spawn_blocking(move || reader.join()).await;
    Ok(())
}

fn read_until_stopped(
    mut file: std::fs::File,
    tx: mpsc::Sender<Bytes>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::io::Read;
    let mut buf = vec![0u8; 4096];
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        let ready = {
            let mut fds = [PollFd::new(file.as_fd(), PollFlags::POLLIN)];
            match poll(&mut fds, PollTimeout::from(100u16)) {
                Ok(n) => n > 0,
                Err(nix::errno::Errno::EINTR) => false,
                Err(_) => break,
            }
        };
        if !ready {
            continue;
        }
        match file.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if tx.blocking_send(Bytes::copy_from_slice(&buf[..n])).is_err() {
                    break;
                }
            }
        }
    }
}

async fn say(write: &Mutex<OwnedWriteHalf>, event: &ShellEvent) -> Result<(), String> {
    write
        .lock()
        .await
        .write_all(&event.encode())
        .await
        .map_err(|e| e.to_string())
}

struct ConsoleSink {
    out: Arc<std::fs::File>,
    err: Arc<std::fs::File>,
    socket: Arc<Mutex<OwnedWriteHalf>>,
}

async fn write_blocking(file: &Arc<std::fs::File>, data: Bytes) -> bool {
    let file = file.clone();
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        (&*file).write_all(&data).is_ok()
    })
    .await
    .unwrap_or(false)
}

impl ClientSink for ConsoleSink {
    async fn stdout(&self, data: Bytes) -> bool {
        write_blocking(&self.out, data).await
    }

    async fn stderr(&self, data: Bytes) -> bool {
        write_blocking(&self.err, data).await
    }

    async fn finish(&self, outcome: ExitOutcome) {
        let event = match outcome {
            ExitOutcome::Status(status) => ShellEvent::Exited { status },
            ExitOutcome::Signal(signal) => ShellEvent::Killed { signal },
        };
        let _ = say(&self.socket, &event).await;
    }
}

/// Reads the first message and the descriptors that came with it (SCM_RIGHTS), waiting
/// at most a few seconds.
fn receive_with_fds(
    stream: std::os::unix::net::UnixStream,
) -> Result<(std::os::unix::net::UnixStream, Vec<u8>, Vec<OwnedFd>), String> {
    stream.set_nonblocking(false).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    // One byte more than a request may hold: a longer one is seen, not cut.
    let mut buf = vec![0u8; MAX_OPEN_REQUEST_BYTES + 1];
    let (n, fds) = crate::system::socket::receive_with_fds(&stream, &mut buf)
        .map_err(|e| format!("receiving the console request: {e}"))?;
    buf.truncate(n);
    stream.set_read_timeout(None).map_err(|e| e.to_string())?;
    Ok((stream, buf, fds))
}
