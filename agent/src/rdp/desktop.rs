//! The desktops: one per grant, made at its first RDP login, kept for `reconnect_secs`
//! when its client drops, taken over by a new login of the same grant, and ended with the
//! grant. Each is an ordinary session of the core (account, cgroup, exec profile,
//! recording) whose command is an X server and the desktop command.

use crate::config::RdpConfig;
use crate::grant::{Grant, GrantId};
use crate::session::{
    self, ClientIo, ClientSink, Control, Core, DesktopSpec, ExitOutcome, SessionCommand,
    SessionKind, SessionRequest,
};
use crate::sync::lock;
use bytes::Bytes;
use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// The lowest display number a desktop gets (below are the console's and test rigs').
const FIRST_DISPLAY: u32 = 20;

/// How long an X server may take to start.
const X_START: Duration = Duration::from_secs(15);

pub struct Desktop {
    pub grant: GrantId,
    /// The grant's profile.
    pub profile: String,
    pub display: u32,
    pub cookie: [u8; 16],
    pub width: u16,
    pub height: u16,
    session_id: OnceLock<String>,
    /// Recording lines to the session's relay; every connection's worker feeds it.
    pub lines: mpsc::Sender<String>,
    /// Held while the desktop lives; dropping it hangs the session up (SIGHUP).
    hang_up: Mutex<Option<(mpsc::Sender<Control>, mpsc::Sender<Bytes>)>>,
    /// Says why once the session has ended.
    pub ended: watch::Receiver<Option<String>>,
    /// The connection showing the desktop (0: none); a new login bumps it.
    pub owner: watch::Sender<u64>,
}

impl Desktop {
    pub fn session_id(&self) -> &str {
        self.session_id.get().map(String::as_str).unwrap_or("-")
    }

    fn end(&self) {
        lock(&self.hang_up).take();
    }
}

/// What the desktop session writes: an X server and a desktop have nobody to tell but the
/// journal. The last thing said before the end is why it ended.
struct DesktopSink {
    session_id: Arc<OnceLock<String>>,
    last_words: Mutex<Option<String>>,
    ended: watch::Sender<Option<String>>,
}

impl ClientSink for DesktopSink {
    fn opened(&self, session_id: &str) {
        let _ = self.session_id.set(session_id.to_string());
    }
    async fn stdout(&self, _data: Bytes) -> bool {
        true
    }
    async fn stderr(&self, data: Bytes) -> bool {
        let text = String::from_utf8_lossy(&data);
        let text = text.trim().trim_start_matches("usher: ").to_string();
        if !text.is_empty() {
            *lock(&self.last_words) = Some(text);
        }
        true
    }
    async fn finish(&self, outcome: ExitOutcome) {
        let why = lock(&self.last_words)
            .take()
            .unwrap_or_else(|| format!("the desktop ended ({outcome:?})"));
        let _ = self.ended.send(Some(why));
    }
}

pub struct Desktops<C: Core> {
    core: Arc<C>,
    config: Arc<RdpConfig>,
    live: Mutex<HashMap<GrantId, Arc<Desktop>>>,
    /// Display numbers picked whose X server may not be listening yet.
    reserved: Arc<Mutex<BTreeSet<u32>>>,
    connections: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
    #[error("no free X display number")]
    NoDisplay,
    #[error("the desktop did not start: {0}")]
    NotStarted(String),
}

/// A login's hold on a desktop.
pub struct Attached {
    pub desktop: Arc<Desktop>,
    pub connection: u64,
    pub reconnected: bool,
}

impl<C: Core> Desktops<C> {
    pub fn new(core: Arc<C>, config: Arc<RdpConfig>) -> Arc<Self> {
        Arc::new(Desktops {
            core,
            config,
            live: Mutex::new(HashMap::new()),
            reserved: Arc::new(Mutex::new(BTreeSet::new())),
            connections: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// The grant's desktop, started if it has none (or its last one ended), now shown by
    /// a new connection: any other connection showing it is told to go.
    pub async fn attach(
        self: &Arc<Self>,
        grant: &Grant,
        width: u16,
        height: u16,
        peer: &str,
    ) -> Result<Attached, DesktopError> {
        let connection = self
            .connections
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let existing = lock(&self.live)
            .get(&grant.id())
            .filter(|d| d.ended.borrow().is_none())
            .cloned();
        if let Some(desktop) = existing {
            desktop.owner.send_replace(connection);
            return Ok(Attached {
                desktop,
                connection,
                reconnected: true,
            });
        }
        let desktop = self.start(grant, width, height, peer).await?;
        desktop.owner.send_replace(connection);
        lock(&self.live).insert(grant.id(), desktop.clone());
        let this = self.clone();
        let watched = desktop.clone();
        tokio::spawn(async move {
            let mut ended = watched.ended.clone();
            let _ = ended.wait_for(|e| e.is_some()).await;
            let mut live = lock(&this.live);
            if live
                .get(&watched.grant)
                .is_some_and(|d| Arc::ptr_eq(d, &watched))
            {
                live.remove(&watched.grant);
            }
        });
        Ok(Attached {
            desktop,
            connection,
            reconnected: false,
        })
    }

    /// The connection showing the desktop went away: unless another took it over, the
    /// desktop waits `reconnect_secs` for a login of its grant, then ends.
    pub fn detach(self: &Arc<Self>, attached: &Attached) {
        let desktop = attached.desktop.clone();
        let connection = attached.connection;
        if *desktop.owner.borrow() != connection {
            return;
        }
        desktop.owner.send_replace(0);
        let wait = Duration::from_secs(self.config.reconnect_secs);
        log::info!(target: "usher::rdp", "session {}: the client left; the desktop waits {} s for it", desktop.session_id(), wait.as_secs());
        tokio::spawn(async move {
            let mut owner = desktop.owner.subscribe();
            let came_back = tokio::time::timeout(wait, owner.wait_for(|o| *o != 0)).await;
            if came_back.is_err() {
                audit!("rdp_abandoned", session = desktop.session_id(), jti = desktop.grant.jti.as_str(); "session {}: no client came back within {} s; the desktop ends", desktop.session_id(), wait.as_secs());
                desktop.end();
            }
        });
    }

    async fn start(
        self: &Arc<Self>,
        grant: &Grant,
        width: u16,
        height: u16,
        peer: &str,
    ) -> Result<Arc<Desktop>, DesktopError> {
        let display = self.pick_display().ok_or(DesktopError::NoDisplay)?;
        let cookie: [u8; 16] = rand::random();
        let width = width.clamp(200, self.config.max_width);
        let height = height.clamp(200, self.config.max_height);
        let (lines_tx, lines_rx) = mpsc::channel(64);
        let (control_tx, control_rx) = mpsc::channel(session::CONTROL_QUEUE);
        let (stdin_tx, stdin_rx) = mpsc::channel(1);
        let (ended_tx, ended_rx) = watch::channel(None);
        let session_id = Arc::new(OnceLock::new());
        let sink = Arc::new(DesktopSink {
            session_id: session_id.clone(),
            last_words: Mutex::new(None),
            ended: ended_tx,
        });
        let request = SessionRequest {
            kind: SessionKind::Rdp,
            command: SessionCommand::Desktop(DesktopSpec {
                xvfb: self.config.xvfb.clone(),
                display,
                cookie,
                auth_dir: self.config.runtime_dir.clone(),
                width,
                height,
                command: self.config.desktop.clone(),
            }),
            pty: None,
            env: Vec::new(),
            peer: Some(peer.to_string()),
        };
        tokio::spawn(session::run(
            self.core.clone(),
            grant.clone(),
            request,
            ClientIo {
                stdin: stdin_rx,
                control: control_rx,
                sink: sink.clone(),
                desktop: Some(lines_rx),
            },
        ));
        let reserved = self.reserved.clone();
        let started = wait_for_x(display, ended_rx.clone()).await;
        lock(&reserved).remove(&display);
        if let Err(why) = started {
            drop((control_tx, stdin_tx));
            return Err(DesktopError::NotStarted(why));
        }
        let session_id = session_id.get().cloned().unwrap_or_default();
        let ids = OnceLock::new();
        let _ = ids.set(session_id);
        Ok(Arc::new(Desktop {
            grant: grant.id(),
            profile: grant.profile.clone(),
            display,
            cookie,
            width,
            height,
            session_id: ids,
            lines: lines_tx,
            hang_up: Mutex::new(Some((control_tx, stdin_tx))),
            ended: ended_rx,
            owner: watch::channel(0).0,
        }))
    }

    /// A display number no X server listens on (abstract sockets are per network
    /// namespace, so they are seen whatever mount namespace a desktop has) and no other
    /// desktop is starting on.
    fn pick_display(&self) -> Option<u32> {
        let used = listening_displays();
        let mut reserved = lock(&self.reserved);
        let n = (FIRST_DISPLAY..FIRST_DISPLAY + 10_000).find(|n| {
            !used.contains(n)
                && !reserved.contains(n)
                && !std::path::Path::new(&format!("/tmp/.X{n}-lock")).exists()
        })?;
        reserved.insert(n);
        Some(n)
    }
}

/// The displays X servers listen on, from their abstract sockets.
fn listening_displays() -> BTreeSet<u32> {
    std::fs::read_to_string("/proc/net/unix")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|p| p.strip_prefix("@/tmp/.X11-unix/X"))
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// Waits until the desktop's X server listens, or its session ended.
async fn wait_for_x(
    display: u32,
    mut ended: watch::Receiver<Option<String>>,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + X_START;
    loop {
        if let Some(why) = ended.borrow().clone() {
            return Err(why);
        }
        if listening_displays().contains(&display) {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!(
                "no X server on :{display} within {} s",
                X_START.as_secs()
            ));
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = ended.changed() => {}
        }
    }
}
