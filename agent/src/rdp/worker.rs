//! One RDP connection: its `usher-rdp` worker (unprivileged, one process per connection),
//! the login it reports, the desktop it shows, and its end.

use super::desktop::Attached;
use super::RdpServer;
use crate::admission::{Admission, Slot};
use crate::session::Core;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::OwnedFd;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UnixStream};
use usher_wire::rdp::{self as wire, FromWorker, ToWorker};

/// A refused login waits this long before the worker is told, to slow guessing.
const REFUSAL_DELAY: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("the worker closed its socket")]
    Closed,
    #[error("worker socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("worker message: {0}")]
    Line(#[from] wire::LineError),
}

struct Link {
    read: BufReader<OwnedReadHalf>,
    write: OwnedWriteHalf,
}

impl Link {
    async fn send(&mut self, message: &ToWorker) -> Result<(), LinkError> {
        self.write.write_all(&message.encode()).await?;
        Ok(())
    }

    async fn receive(&mut self, limit: usize) -> Result<FromWorker, LinkError> {
        let mut line = Vec::new();
        let mut limited = (&mut self.read).take(limit as u64 + 1);
        if limited.read_until(b'\n', &mut line).await? == 0 {
            return Err(LinkError::Closed);
        }
        Ok(FromWorker::decode(&line, limit)?)
    }
}

pub(super) async fn connection<C: Core>(
    server: Arc<RdpServer<C>>,
    stream: TcpStream,
    peer: SocketAddr,
    startup_slot: Slot<IpAddr>,
    connections: Arc<Admission<()>>,
) {
    let config = &server.config;
    let (ours, theirs) = match UnixStream::pair() {
        Ok(p) => p,
        Err(e) => {
            log::error!(target: "usher::rdp", "{peer}: cannot make the worker's socket: {e}");
            return;
        }
    };
    let mut worker = match spawn_worker(&server, stream, theirs) {
        Ok(w) => w,
        Err(e) => {
            log::error!(target: "usher::rdp", "{peer}: cannot start the RDP worker {}: {e}", config.worker_path().display());
            return;
        }
    };
    if let Some(stderr) = worker.stderr.take() {
        tokio::spawn(forward_log(stderr, peer));
    }
    let (read, write) = ours.into_split();
    let mut link = Link {
        read: BufReader::new(read),
        write,
    };
    // Not raced against the worker's exit: a worker that ends closes its socket, which
    // `serve` sees, and the desktop is let go of in order (left for its client to return).
    let served = serve(&server, &mut link, peer, startup_slot, connections).await;
    if let Err(e) = served {
        log::info!(target: "usher::rdp", "{peer}: {e}");
    }
    drop(link);
    // The worker sees its socket close and disconnects its client; one that does not
    // within seconds is killed.
    if tokio::time::timeout(Duration::from_secs(5), worker.wait())
        .await
        .is_err()
    {
        let _ = worker.kill().await;
    }
}

async fn serve<C: Core>(
    server: &Arc<RdpServer<C>>,
    link: &mut Link,
    peer: SocketAddr,
    startup_slot: Slot<IpAddr>,
    connections: Arc<Admission<()>>,
) -> Result<(), LinkError> {
    let config = &server.config;
    link.send(&ToWorker::Hello {
        cert_pem: server.identity.cert_pem.clone(),
        key_pem: server.identity.key_pem.clone(),
        security: vec![wire::Security::Tls],
        login_grace_secs: config.login_grace_secs,
        max_width: config.max_width,
        max_height: config.max_height,
    })
    .await?;
    let grace = Duration::from_secs(config.login_grace_secs);
    let login = match tokio::time::timeout(grace, link.receive(wire::MAX_LOGIN_LINE_BYTES)).await {
        Ok(r) => r?,
        Err(_) => {
            log::info!(target: "usher::rdp", "{peer}: no login within {} s; closed", grace.as_secs());
            return Ok(());
        }
    };
    let FromWorker::Login {
        username,
        password,
        domain: _,
        width,
        height,
    } = login
    else {
        log::warn!(target: "usher::rdp", "{peer}: the worker sent something before the login; closed");
        return Ok(());
    };
    let grant = match server.core.rdp_grant(&username, &password).await {
        Ok(g) => g,
        Err(why) => {
            let reason = why.to_string();
            audit!("rdp_refused", login = username.as_str(), peer = peer.to_string().as_str(), reason = reason.as_str(); "RDP login of {username:?} from {peer} refused: {reason}");
            tokio::time::sleep(REFUSAL_DELAY).await;
            return link.send(&ToWorker::Refused).await;
        }
    };
    drop(startup_slot);
    let _connection_slot = match connections.try_admit(()) {
        Ok(s) => s,
        Err(why) => {
            log::warn!(target: "usher::rdp", "{peer}: closed after login: {why}");
            return link.send(&ToWorker::Refused).await;
        }
    };
    let attached = match server
        .desktops
        .attach(&grant, width, height, &peer.to_string())
        .await
    {
        Ok(a) => a,
        Err(e) => {
            log::error!(target: "usher::rdp", "{peer}: login of {username} accepted, but {e}");
            return link.send(&ToWorker::Refused).await;
        }
    };
    let shown = show(server, link, &attached, peer).await;
    server.desktops.detach(&attached);
    shown
}

/// Shows the desktop until the client goes, the session ends or another login takes it.
async fn show<C: Core>(
    server: &Arc<RdpServer<C>>,
    link: &mut Link,
    attached: &Attached,
    peer: SocketAddr,
) -> Result<(), LinkError> {
    let desktop = &attached.desktop;
    let config = &server.config;
    let recording = server.core.recording();
    audit!("rdp_attached", session = desktop.session_id(), jti = desktop.grant.jti.as_str(), peer = peer.to_string().as_str(), reconnected = attached.reconnected; "session {}: desktop :{} shown to {peer}{}", desktop.session_id(), desktop.display, if attached.reconnected { " (reconnected)" } else { "" });
    let profile = server.core.profile(&desktop.profile);
    link.send(&ToWorker::Desktop(wire::Desktop {
        session_id: desktop.session_id().to_string(),
        display: format!(":{}", desktop.display),
        cookie: hex::encode(desktop.cookie),
        width: desktop.width,
        height: desktop.height,
        reconnected: attached.reconnected,
        max_fps: config.max_fps,
        recording: Some(wire::RecordingSettings {
            max_fps: config.record_fps,
            keyframe_secs: config.keyframe_secs,
            input: recording.settings.input,
        }),
        clipboard: profile.rdp_clipboard,
        drives: profile.rdp_drives,
    }))
    .await?;
    let mut ended = desktop.ended.clone();
    let mut owner = desktop.owner.subscribe();
    loop {
        tokio::select! {
            message = link.receive(wire::MAX_LINE_BYTES) => match message? {
                FromWorker::Record { line } => {
                    if desktop.lines.send(line).await.is_err() {
                        // The session's relay is gone: its end is on its way.
                        continue;
                    }
                }
                FromWorker::RecordFailed { reason } => {
                    log::error!(target: "usher::record", "session {}: the desktop's recording failed: {reason}", desktop.session_id());
                    if recording.settings.required {
                        link.send(&ToWorker::End { reason: "the session cannot be recorded".into() }).await?;
                        return Ok(());
                    }
                }
                FromWorker::Resized { width, height } => {
                    log::debug!(target: "usher::rdp", "session {}: the client resized to {width}x{height}", desktop.session_id());
                }
                FromWorker::Login { .. } => {
                    log::warn!(target: "usher::rdp", "{peer}: a second login on one connection; closed");
                    return Ok(());
                }
            },
            r = async { ended.wait_for(|e| e.is_some()).await.ok().and_then(|e| e.clone()) } => {
                let reason = r.unwrap_or_else(|| "the session ended".into());
                audit!("rdp_disconnected", session = desktop.session_id(), peer = peer.to_string().as_str(), reason = reason.as_str(); "session {}: {peer} disconnected: {reason}", desktop.session_id());
                return link.send(&ToWorker::End { reason }).await;
            }
            _ = async { let _ = owner.wait_for(|o| *o != attached.connection).await; } => {
                log::info!(target: "usher::rdp", "session {}: another login took the desktop from {peer}", desktop.session_id());
                return link.send(&ToWorker::End { reason: "another client took over this desktop".into() }).await;
            }
        }
    }
}

fn spawn_worker<C: Core>(
    server: &RdpServer<C>,
    stream: TcpStream,
    socket: UnixStream,
) -> std::io::Result<tokio::process::Child> {
    let tcp: OwnedFd = stream.into_std()?.into();
    // The worker sets its own descriptors non-blocking.
    let socket: OwnedFd = socket.into_std()?.into();
    let mut cmd = tokio::process::Command::new(server.config.worker_path());
    cmd.stdin(Stdio::from(tcp))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .kill_on_drop(true);
    if let Ok(level) = std::env::var("USHER_RDP_LOG") {
        cmd.env("RUST_LOG", level);
    }
    crate::system::process::prepare_worker(&mut cmd, socket, server.worker_uid, server.worker_gid);
    cmd.spawn()
}

/// The worker's log lines, into the journal under usherd's name.
async fn forward_log(stderr: tokio::process::ChildStderr, peer: SocketAddr) {
    let mut reader = BufReader::new(stderr);
    loop {
        let mut line = Vec::new();
        // A longer line is cut into pieces, never held whole.
        match (&mut reader).take(2000).read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                log::info!(target: "usher::rdp", "worker for {peer}: {}", text.trim_end());
            }
        }
    }
}
