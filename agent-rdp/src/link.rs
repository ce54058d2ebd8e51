//! The socket to usherd (fd 3, `usher_wire::rdp`): one JSON object per line each way.
//! usherd's side: `Hello`, then one verdict on the login (`Desktop` or `Refused`), then at
//! most `End`. The worker's side: `Login` once, then recording lines and resizes.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot};
use usher_wire::rdp::{Desktop, FromWorker, LineError, ToWorker, MAX_LINE_BYTES, WORKER_SOCKET_FD};

/// What usherd sends at most before the login is settled is small; this bounds what a
/// confused peer can make the worker buffer while it has authenticated nobody.
const MAX_CONTROL_LINE_BYTES: usize = 1 << 20;

/// Lines waiting for the socket: enough to ride out a keyframe's write without making the
/// recorder wait, few enough that a stalled usherd stops the recording rather than memory.
const OUTGOING_QUEUE: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("fd {WORKER_SOCKET_FD} is not a socket to usherd: {0}")]
    NotASocket(std::io::Error),
    #[error("reading from usherd: {0}")]
    Read(std::io::Error),
    #[error("usherd closed the socket")]
    Closed,
    #[error("usherd sent a line the worker cannot read: {0}")]
    Malformed(#[from] LineError),
    #[error("usherd sent {got} where {expected} was due")]
    OutOfOrder {
        got: &'static str,
        expected: &'static str,
    },
    #[error("usherd sent no Hello within {0:?}")]
    HelloTimeout(Duration),
}

/// usherd's answer to the login.
#[derive(Debug)]
pub enum Verdict {
    Desktop(Box<Desktop>),
    Refused,
}

/// Why usherd wants the connection over.
#[derive(Debug)]
pub enum EndCause {
    /// `End`: the grant ended, the desktop exited…
    Ended { reason: String },
    /// The socket closed or broke: usherd is gone or gave up on this worker.
    Lost(LinkError),
}

/// The first message, whose fields say how to serve the connection.
pub struct Hello {
    pub cert_pem: String,
    pub key_pem: String,
    pub security: Vec<usher_wire::rdp::Security>,
    pub login_grace: Duration,
    pub max_width: u16,
    pub max_height: u16,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("security", &self.security)
            .field("login_grace", &self.login_grace)
            .field("max_width", &self.max_width)
            .field("max_height", &self.max_height)
            .finish_non_exhaustive()
    }
}

/// Sends lines to usherd, in order, from async code and from the recorder's thread.
#[derive(Clone)]
pub struct ToUsherd {
    queue: mpsc::Sender<FromWorker>,
}

impl ToUsherd {
    /// False when the socket is gone.
    pub async fn send(&self, message: FromWorker) -> bool {
        self.queue.send(message).await.is_ok()
    }

    /// For threads outside the runtime (the recorder's): waits while the queue is full.
    pub fn send_blocking(&self, message: FromWorker) -> bool {
        self.queue.blocking_send(message).is_ok()
    }

    /// For places that must not wait (inside a cancellable poll); false when full or gone.
    pub fn try_send(&self, message: FromWorker) -> bool {
        self.queue.try_send(message).is_ok()
    }
}

/// What usherd says after `Hello`, delivered where it is awaited.
pub struct FromUsherd {
    pub verdict: oneshot::Receiver<Verdict>,
    pub ended: oneshot::Receiver<EndCause>,
}

pub struct Link {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Link {
    /// Takes fd 3. Must run inside the runtime, once.
    pub fn from_inherited_fd() -> Result<Link, LinkError> {
        // Check before taking ownership: closing an fd that was never open would abort.
        // SAFETY: fstat writes into the zeroed struct it is given, nothing else.
        let mut status: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(WORKER_SOCKET_FD, &mut status) } != 0 {
            return Err(LinkError::NotASocket(std::io::Error::last_os_error()));
        }
        if status.st_mode & libc::S_IFMT != libc::S_IFSOCK {
            return Err(LinkError::NotASocket(std::io::Error::other("not a socket")));
        }
        // SAFETY: fd 3 is the socket usherd passed to this process (the contract in
        // usher_wire::rdp); nothing else in the process opens or owns it, and this function
        // runs once, at start.
        let fd = unsafe { OwnedFd::from_raw_fd(WORKER_SOCKET_FD) };
        let std_stream = std::os::unix::net::UnixStream::from(fd);
        std_stream
            .set_nonblocking(true)
            .map_err(LinkError::NotASocket)?;
        let stream = UnixStream::from_std(std_stream).map_err(LinkError::NotASocket)?;
        let (read, writer) = stream.into_split();
        Ok(Link {
            reader: BufReader::new(read),
            writer,
        })
    }

    pub async fn hello(&mut self, wait: Duration) -> Result<Hello, LinkError> {
        let line = tokio::time::timeout(wait, read_line(&mut self.reader, MAX_CONTROL_LINE_BYTES))
            .await
            .map_err(|_| LinkError::HelloTimeout(wait))??;
        match ToWorker::decode(&line)? {
            ToWorker::Hello {
                cert_pem,
                key_pem,
                security,
                login_grace_secs,
                max_width,
                max_height,
            } => Ok(Hello {
                cert_pem,
                key_pem,
                security,
                login_grace: Duration::from_secs(login_grace_secs),
                max_width,
                max_height,
            }),
            other => Err(LinkError::OutOfOrder {
                got: name(&other),
                expected: "Hello",
            }),
        }
    }

    /// Starts the reader and the writer tasks. The writer task's handle ends when every
    /// [`ToUsherd`] is dropped and what they queued is written.
    pub fn start(self) -> (ToUsherd, FromUsherd, tokio::task::JoinHandle<()>) {
        let (queue, outgoing) = mpsc::channel(OUTGOING_QUEUE);
        let writer = tokio::spawn(write_lines(self.writer, outgoing));
        let (verdict_tx, verdict) = oneshot::channel();
        let (ended_tx, ended) = oneshot::channel();
        tokio::spawn(async move {
            let cause = read_messages(self.reader, verdict_tx).await;
            let _ = ended_tx.send(cause);
        });
        (ToUsherd { queue }, FromUsherd { verdict, ended }, writer)
    }
}

async fn write_lines(mut socket: OwnedWriteHalf, mut outgoing: mpsc::Receiver<FromWorker>) {
    while let Some(message) = outgoing.recv().await {
        if let Err(error) = socket.write_all(&message.encode()).await {
            log::warn!("writing to usherd: {error}");
            // Dropping the receiver makes every later send fail: the recorder sees its
            // output closed and the session ends.
            return;
        }
    }
    let _ = socket.shutdown().await;
}

/// Reads until `End` or the socket's end; hands the verdict over on the way.
async fn read_messages(
    mut reader: BufReader<OwnedReadHalf>,
    verdict_tx: oneshot::Sender<Verdict>,
) -> EndCause {
    let mut verdict_tx = Some(verdict_tx);
    loop {
        let line = match read_line(&mut reader, MAX_LINE_BYTES).await {
            Ok(line) => line,
            Err(error) => return EndCause::Lost(error),
        };
        let message = match ToWorker::decode(&line) {
            Ok(message) => message,
            Err(error) => return EndCause::Lost(error.into()),
        };
        match message {
            ToWorker::End { reason } => return EndCause::Ended { reason },
            ToWorker::Desktop(desktop) => match verdict_tx.take() {
                Some(tx) => {
                    let _ = tx.send(Verdict::Desktop(Box::new(desktop)));
                }
                None => return out_of_order("Desktop"),
            },
            ToWorker::Refused => match verdict_tx.take() {
                Some(tx) => {
                    let _ = tx.send(Verdict::Refused);
                }
                None => return out_of_order("Refused"),
            },
            ToWorker::Hello { .. } => return out_of_order("Hello"),
        }
    }
}

fn out_of_order(got: &'static str) -> EndCause {
    EndCause::Lost(LinkError::OutOfOrder {
        got,
        expected: "End",
    })
}

fn name(message: &ToWorker) -> &'static str {
    match message {
        ToWorker::Hello { .. } => "Hello",
        ToWorker::Desktop(_) => "Desktop",
        ToWorker::Refused => "Refused",
        ToWorker::End { .. } => "End",
    }
}

/// One line, newline included, refused past `limit` bytes without buffering more.
async fn read_line(
    reader: &mut BufReader<OwnedReadHalf>,
    limit: usize,
) -> Result<Vec<u8>, LinkError> {
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(limit as u64 + 1)
        .read_until(b'\n', &mut line)
        .await
        .map_err(LinkError::Read)?;
    if read == 0 {
        return Err(LinkError::Closed);
    }
    if line.last() != Some(&b'\n') {
        if line.len() > limit {
            return Err(LineError::TooLarge { limit }.into());
        }
        return Err(LinkError::Closed);
    }
    Ok(line)
}
