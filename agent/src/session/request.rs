//! What a front end (SSH, console, RDP) hands the session core: the request, the client's
//! input and control messages, and a sink for what the session writes.

use bytes::Bytes;
use std::future::Future;
use std::path::PathBuf;

use super::SessionKind;

/// Where a session's output goes: an SSH channel, a console's terminal.
pub trait ClientSink: Send + Sync + 'static {
    /// The session is open, under this id (before its process starts).
    fn opened(&self, _session_id: &str) {}
    /// The session is being stopped (the grant ended, the recording failed), before its
    /// processes are killed: a client that is not fed through the sink (a desktop's)
    /// can be told why first.
    fn stopping(&self, _why: &str) -> impl Future<Output = ()> + Send {
        async {}
    }
    fn stdout(&self, data: Bytes) -> impl Future<Output = bool> + Send;
    fn stderr(&self, data: Bytes) -> impl Future<Output = bool> + Send;
    fn finish(&self, outcome: ExitOutcome) -> impl Future<Output = ()> + Send;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitOutcome {
    Status(i32),
    Signal(i32),
}

impl ExitOutcome {
    pub fn of(status: std::process::ExitStatus) -> ExitOutcome {
        use std::os::unix::process::ExitStatusExt;
        match (status.code(), status.signal()) {
            (Some(c), _) => ExitOutcome::Status(c),
            (None, Some(s)) => ExitOutcome::Signal(s),
            _ => ExitOutcome::Status(255),
        }
    }
}

/// Resizes and signals a session may have waiting; more are dropped.
pub const CONTROL_QUEUE: usize = 16;

#[derive(Debug)]
pub enum Control {
    Resize(u16, u16),
    Signal(i32),
    /// End the session, saying why (a desktop nobody came back to: there is no line to
    /// hang up).
    Stop(String),
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
    /// A desktop: an X server of its own and the desktop command on it. Everything the
    /// session started ends with it.
    Desktop(DesktopSpec),
}

#[derive(Debug, Clone)]
pub struct DesktopSpec {
    pub xvfb: PathBuf,
    /// MIT-MAGIC-COOKIE-1, written for the account in `auth_dir` before the X server starts.
    pub cookie: [u8; 16],
    pub auth_dir: PathBuf,
    pub width: u16,
    pub height: u16,
    /// A shell command line, run with `DISPLAY` set.
    pub command: String,
}

impl SessionCommand {
    /// The command line as the audit trail shows it; None for an interactive shell.
    pub fn text(&self) -> Option<String> {
        match self {
            SessionCommand::Shell => None,
            SessionCommand::Exec(c) => Some(c.clone()),
            SessionCommand::Subsystem(p) => Some(p.display().to_string()),
            SessionCommand::Desktop(d) => Some(format!("(desktop) {}", d.command)),
        }
    }
}

#[derive(Debug, Clone)]
pub struct SessionRequest {
    pub kind: SessionKind,
    pub command: SessionCommand,
    pub pty: Option<PtySpec>,
    pub env: Vec<(String, String)>,
    pub peer: Option<String>,
}

/// The client's side of a session: `stdin` closing means EOF from the client, `control`
/// closing means the client is gone.
pub struct ClientIo<S> {
    pub stdin: tokio::sync::mpsc::Receiver<Bytes>,
    pub control: tokio::sync::mpsc::Receiver<Control>,
    pub sink: std::sync::Arc<S>,
    /// A desktop's recording, a line at a time (`usher-rdp` encodes it).
    pub desktop: Option<tokio::sync::mpsc::Receiver<String>>,
}
