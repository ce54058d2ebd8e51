//! `usher-rdp`: one process per RDP connection, started by usherd (see
//! `usher_wire::rdp`). stdin is the client's TCP connection, fd 3 the socket to usherd;
//! logs go to stderr, which usherd forwards to its journal.

mod link;
mod record;
mod screen;
mod server;
mod transport;

use std::os::fd::AsFd as _;
use std::process::ExitCode;
use std::time::Duration;

/// usherd writes `Hello` as soon as it has started the worker.
const HELLO_WAIT: Duration = Duration::from_secs(10);

/// How long the last lines to usherd (the recording's end) may take to leave.
const FLUSH_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
enum WorkerError {
    #[error("stdin is not the client's TCP connection: {0}")]
    Stdin(std::io::Error),
    #[error("cannot start the async runtime: {0}")]
    Runtime(std::io::Error),
    #[error(transparent)]
    Link(#[from] link::LinkError),
    #[error(transparent)]
    Serve(#[from] server::ServeError),
}

fn main() -> ExitCode {
    forbid_ptrace();
    StderrLog::install();
    match run() {
        Ok(outcome) => {
            log::info!("connection over: {outcome:?}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            log::error!("{error}");
            ExitCode::FAILURE
        }
    }
}

/// The worker runs as an unprivileged user shared by all workers; without this, another
/// worker (or anything else running as that user) could ptrace this one and read its
/// client's password and desktop.
fn forbid_ptrace() {
    // SAFETY: prctl(PR_SET_DUMPABLE) takes integer arguments and touches no memory of ours.
    let result = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if result != 0 {
        eprintln!(
            "usher-rdp: PR_SET_DUMPABLE failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn run() -> Result<server::Outcome, WorkerError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(WorkerError::Runtime)?;
    runtime.block_on(async {
        let client = client_connection()?;
        let mut link = link::Link::from_inherited_fd()?;
        let hello = link.hello(HELLO_WAIT).await?;
        log::info!(
            "serving {} ({hello:?})",
            client
                .peer_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "a client".into())
        );
        let (to_usherd, from_usherd, writer) = link.start();
        let outcome = server::serve(client, hello, to_usherd, from_usherd).await;
        // Every sender is gone with `serve`; the writer ends once the queue is written.
        if tokio::time::timeout(FLUSH_WAIT, writer).await.is_err() {
            log::warn!("the last lines to usherd did not leave within {FLUSH_WAIT:?}");
        }
        Ok(outcome?)
    })
}

/// stdin, which usherd made the accepted TCP connection.
fn client_connection() -> Result<tokio::net::TcpStream, WorkerError> {
    // Take stdin's socket onto a descriptor of its own and put /dev/null in its place, so
    // nothing that reads stdin by habit reads the client's bytes.
    let stdin = std::io::stdin();
    let socket = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(WorkerError::Stdin)?;
    if let Ok(null) = std::fs::File::open("/dev/null") {
        use std::os::fd::AsRawFd as _;
        // SAFETY: dup2 onto fd 0 replaces stdin with /dev/null; both descriptors are valid.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
    let socket = std::net::TcpStream::from(socket);
    // A TCP socket has a peer address; a pipe or a file does not.
    socket.peer_addr().map_err(WorkerError::Stdin)?;
    socket.set_nonblocking(true).map_err(WorkerError::Stdin)?;
    socket.set_nodelay(true).map_err(WorkerError::Stdin)?;
    tokio::net::TcpStream::from_std(socket).map_err(WorkerError::Stdin)
}

/// Logs to stderr: this crate's at info and above, the libraries' at warn and above
/// (IronRDP's debug output includes the client's PDUs). `USHER_RDP_LOG=debug` raises this
/// crate's level only, `debug-all` the libraries' too.
struct StderrLog {
    own_level: log::LevelFilter,
    libraries_level: log::LevelFilter,
}

impl StderrLog {
    fn install() {
        let setting = std::env::var("USHER_RDP_LOG").unwrap_or_default();
        let (own_level, libraries_level) = match setting.as_str() {
            "debug" => (log::LevelFilter::Debug, log::LevelFilter::Warn),
            // For a developer: IronRDP's own debug output (PDUs; passwords are redacted).
            "debug-all" => (log::LevelFilter::Debug, log::LevelFilter::Debug),
            "warn" => (log::LevelFilter::Warn, log::LevelFilter::Warn),
            _ => (log::LevelFilter::Info, log::LevelFilter::Warn),
        };
        let logger = StderrLog {
            own_level,
            libraries_level,
        };
        if log::set_logger(Box::leak(Box::new(logger))).is_ok() {
            log::set_max_level(own_level.max(libraries_level));
        }
    }
}

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        if metadata.target().starts_with("usher_rdp") {
            metadata.level() <= self.own_level
        } else {
            metadata.level() <= self.libraries_level
        }
    }

    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            eprintln!(
                "usher-rdp[{}] {} {}: {}",
                std::process::id(),
                record.level(),
                record.target(),
                record.args()
            );
        }
    }

    fn flush(&self) {}
}
