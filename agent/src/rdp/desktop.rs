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
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};

/// How long a client gets to hear why its desktop ends before the desktop is killed.
const TELL_THE_CLIENT: Duration = Duration::from_millis(300);

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
    session_id: String,
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
        &self.session_id
    }

    fn end(&self, why: &str) {
        if let Some((control, _stdin)) = lock(&self.hang_up).take() {
            let _ = control.try_send(Control::Stop(why.to_string()));
        }
    }
}

/// What the desktop session writes: first the display its X server took (`-displayfd`),
/// then nothing anyone needs but the journal. The last thing said before the end is why it
/// ended.
struct DesktopSink {
    session_id: Arc<OnceLock<String>>,
    /// The start of stdout, until its first line (the display number) is complete.
    first_line: Mutex<Option<Vec<u8>>>,
    display: watch::Sender<Option<u32>>,
    last_words: Mutex<Option<String>>,
    ended: watch::Sender<Option<String>>,
}

impl ClientSink for DesktopSink {
    fn opened(&self, session_id: &str) {
        let _ = self.session_id.set(session_id.to_string());
    }
    async fn stdout(&self, data: Bytes) -> bool {
        let mut first = lock(&self.first_line);
        if let Some(line) = first.as_mut() {
            line.extend_from_slice(&data);
            if let Some(end) = line.iter().position(|&b| b == b'\n') {
                let number = std::str::from_utf8(&line[..end])
                    .ok()
                    .and_then(|n| n.trim().parse::<u32>().ok());
                self.display.send_replace(number);
                *first = None;
            } else if line.len() > 32 {
                *first = None;
            }
        }
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
    async fn stopping(&self, why: &str) {
        // The worker tells its client why, then the desktop's processes are killed.
        let _ = self.ended.send(Some(why.to_string()));
        tokio::time::sleep(TELL_THE_CLIENT).await;
    }
    async fn finish(&self, outcome: ExitOutcome) {
        let why = lock(&self.last_words)
            .take()
            .unwrap_or_else(|| format!("the desktop ended ({outcome:?})"));
        self.ended.send_if_modified(|e| {
            let first = e.is_none();
            if first {
                *e = Some(why);
            }
            first
        });
    }
}

pub struct Desktops<C: Core> {
    core: Arc<C>,
    config: Arc<RdpConfig>,
    live: Mutex<HashMap<GrantId, Arc<Desktop>>>,
    connections: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum DesktopError {
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
            {
                let mut live = lock(&this.live);
                if live
                    .get(&watched.grant)
                    .is_some_and(|d| Arc::ptr_eq(d, &watched))
                {
                    live.remove(&watched.grant);
                }
            }
            let display = watched.display;
            let _ = tokio::task::spawn_blocking(move || remove_dead_x_files(display)).await;
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
        if *desktop.owner.borrow() != connection || desktop.ended.borrow().is_some() {
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
                desktop.end("no client came back to the desktop");
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
        let cookie: [u8; 16] = rand::random();
        let width = width.clamp(200, self.config.max_width);
        let height = height.clamp(200, self.config.max_height);
        let (lines_tx, lines_rx) = mpsc::channel(64);
        let (control_tx, control_rx) = mpsc::channel(session::CONTROL_QUEUE);
        let (stdin_tx, stdin_rx) = mpsc::channel(1);
        let (ended_tx, ended_rx) = watch::channel(None);
        let session_id = Arc::new(OnceLock::new());
        let (display_tx, display_rx) = watch::channel(None);
        let sink = Arc::new(DesktopSink {
            session_id: session_id.clone(),
            first_line: Mutex::new(Some(Vec::new())),
            display: display_tx,
            last_words: Mutex::new(None),
            ended: ended_tx,
        });
        let request = SessionRequest {
            kind: SessionKind::Rdp,
            command: SessionCommand::Desktop(DesktopSpec {
                xvfb: self.config.xvfb.clone(),
                cookie,
                auth_dir: self.config.runtime_dir.clone(),
                // Xvfb resizes (RandR) only up to the size it started at; with `grow` it
                // starts at the largest a client may have and the worker sets the client's.
                width: if self.config.grow {
                    self.config.max_width
                } else {
                    width
                },
                height: if self.config.grow {
                    self.config.max_height
                } else {
                    height
                },
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
        let display = match wait_for_x(display_rx, ended_rx.clone()).await {
            // The desktop command's cue: the shell reads the display number.
            Ok(n) if stdin_tx.send(Bytes::from(format!("{n}\n"))).await.is_ok() => n,
            Ok(_) => {
                return Err(DesktopError::NotStarted(
                    "the desktop's shell is gone".into(),
                ))
            }
            Err(why) => {
                drop((control_tx, stdin_tx));
                return Err(DesktopError::NotStarted(why));
            }
        };
        // The session opened before its X server could answer.
        let session_id = session_id.get().cloned().unwrap_or_default();
        Ok(Arc::new(Desktop {
            grant: grant.id(),
            profile: grant.profile.clone(),
            display,
            cookie,
            width,
            height,
            session_id,
            lines: lines_tx,
            hang_up: Mutex::new(Some((control_tx, stdin_tx))),
            ended: ended_rx,
            owner: watch::channel(0).0,
        }))
    }
}

/// Waits until the desktop's X server says its display (it listens then), or the session
/// ended.
async fn wait_for_x(
    mut display: watch::Receiver<Option<u32>>,
    mut ended: watch::Receiver<Option<String>>,
) -> Result<u32, String> {
    let said = async {
        loop {
            if let Some(n) = *display.borrow_and_update() {
                return Ok(n);
            }
            if let Some(why) = ended.borrow().clone() {
                return Err(why);
            }
            tokio::select! {
                r = display.changed() => if r.is_err() { return Err("the desktop ended".to_string()) },
                r = ended.changed() => if r.is_err() { return Err("the desktop ended".to_string()) },
            }
        }
    };
    match tokio::time::timeout(X_START, said).await {
        Ok(r) => r,
        Err(_) => Err(format!("no X server within {} s", X_START.as_secs())),
    }
}

/// An X server killed with its desktop leaves its lock file and socket behind (owned by
/// the account, in /tmp): they go once the server is seen dead (a new server may have taken
/// the number meanwhile: its lock names a live process, and stays).
fn remove_dead_x_files(display: u32) {
    let lock_path = format!("/tmp/.X{display}-lock");
    for _ in 0..50 {
        let pid = std::fs::read_to_string(&lock_path)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        match pid {
            Some(pid) if std::path::Path::new(&format!("/proc/{pid}")).exists() => {
                std::thread::sleep(Duration::from_millis(100))
            }
            Some(_) => {
                let _ = std::fs::remove_file(&lock_path);
                remove_socket(display);
                return;
            }
            None => return,
        }
    }
}

/// `/tmp/.X11-unix/XN`, through a descriptor of the directory that follows no link.
fn remove_socket(display: u32) {
    use std::os::unix::fs::OpenOptionsExt;
    let Ok(dir) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open("/tmp/.X11-unix")
    else {
        return;
    };
    let _ = nix::unistd::unlinkat(
        Some(std::os::fd::AsRawFd::as_raw_fd(&dir)),
        format!("X{display}").as_str(),
        nix::unistd::UnlinkatFlags::NoRemoveDir,
    );
}
