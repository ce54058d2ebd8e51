//! The local control socket: `usher grant install|list|revoke`, `usher status`,
//! `usher sessions`. The messages are [`usher_wire::control`]'s, one per line. Only root
//! (checked with SO_PEERCRED, not with file modes) may use it.

use crate::daemon::Agent;
use serde::de::DeserializeOwned;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use usher_wire::control::{self as wire, Answer, Refusal, RefusalKind, Reply, Request};

#[derive(Debug, thiserror::Error)]
#[error("{}: {source}", path.display())]
pub struct BindError {
    path: PathBuf,
    source: std::io::Error,
}

/// A Unix socket anyone may connect to: who the peer is comes from SO_PEERCRED, checked
/// per request, not from the file's mode.
pub fn bind_open_socket(path: &Path) -> Result<UnixListener, BindError> {
    let at = |path: &Path| {
        let path = path.to_owned();
        move |source| BindError { path, source }
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(at(dir))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(at(path))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(listener)
}

/// Serves the control socket for as long as the agent lives. Only root is answered: any
/// other peer is told so and dropped before anything it sends is read. Root's
/// connections are capped and must send a request within [`IDLE`].
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let slots = crate::admission::Admission::new(32, 32);
    let not_root = wire::encode_answer(&Err(Refusal::not_root()));
    accept_forever(listener, "control", move |stream, uid| {
        if uid != 0 {
            let _ = stream.try_write(&not_root);
            return;
        }
        let Ok(slot) = slots.try_admit(uid) else {
            return;
        };
        let agent = agent.clone();
        tokio::spawn(async move {
            let _ = handle(agent, stream).await;
            drop(slot);
        });
    })
    .await
}

/// How long a control connection may sit between requests.
const IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// Accepts on a local socket until the process ends, handing each peer and its UID (from
/// SO_PEERCRED) to `admit`. Accept errors (out of descriptors) are waited out, not fatal.
pub async fn accept_forever(
    listener: UnixListener,
    what: &'static str,
    mut admit: impl FnMut(UnixStream, u32),
) {
    let mut failing = false;
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                failing = false;
                if let Ok(cred) = stream.peer_cred() {
                    admit(stream, cred.uid());
                }
            }
            Err(e) => {
                if !failing {
                    log::error!(target: "usher", "{what} socket: accepting failed: {e}; retrying");
                    failing = true;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(agent: Arc<Agent>, stream: UnixStream) -> std::io::Result<()> {
    let peer_pid = stream.peer_cred().ok().and_then(|c| c.pid());
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte over the limit is enough to know a line is too long.
        let mut limited = (&mut reader).take(wire::MAX_REQUEST_BYTES as u64 + 1);
        match tokio::time::timeout(IDLE, limited.read_until(b'\n', &mut line)).await? {
            Ok(0) | Err(_) => return Ok(()),
            Ok(_) => {}
        }
        let (answer, more) = match Request::decode(&line) {
            Ok(request) => (answer(&agent, request, peer_pid).await, true),
            // The rest of an oversized line is unread: what follows is not a request.
            Err(e @ wire::LineError::TooLarge { .. }) => (Err(Refusal::bad_request(&e)), false),
            Err(e) => (Err(Refusal::bad_request(&e)), true),
        };
        write.write_all(&wire::encode_answer(&answer)).await?;
        if !more {
            return Ok(());
        }
    }
}

async fn answer(agent: &Arc<Agent>, request: Request, peer_pid: Option<i32>) -> Answer {
    match request {
        Request::Install { token } => install(agent, &token).await.map(Reply::Installed),
        Request::List => Ok(Reply::Grants(grants(agent))),
        Request::Revoke { jti, iss } => match agent.revoke(&jti, iss.as_deref()).await {
            Ok((id, was_live)) => Ok(Reply::Revoked(wire::Revoked {
                jti: id.jti,
                iss: id.iss,
                was_live,
            })),
            Err(e) => Err(Refusal::new(RefusalKind::RevokeFailed, e.to_string())),
        },
        Request::Status => Ok(Reply::Status(Box::new(status(agent)))),
        Request::Sessions => Ok(Reply::Sessions(sessions(agent))),
        Request::Approvals => Ok(Reply::Approvals(agent.approvals.list())),
        Request::Decide {
            id,
            approve,
            comment,
            as_user,
        } => {
            // Root acting through sudo decides as the person who ran it.
            let name = as_user
                .filter(|n| !n.is_empty() && n.len() <= 64)
                .unwrap_or_else(|| "root".to_string());
            let caller = crate::guard::approval::Caller {
                uid: 0,
                pid: peer_pid,
                name,
                inside_session: peer_pid.is_some_and(|pid| agent.sessions.holds_process(pid)),
            };
            agent
                .approvals
                .decide_on_host(&id, approve, &comment, &caller)
                .map(|s| Reply::Decided(Box::new(s)))
                .map_err(|e| Refusal::new(RefusalKind::ApprovalRefused, e.to_string()))
        }
    }
}

async fn install(agent: &Arc<Agent>, token: &str) -> Result<wire::Installed, Refusal> {
    let grant = agent
        .admit_refreshing(token, "usher grant install")
        .await
        .map_err(|why| Refusal::new(RefusalKind::GrantRefused, format!("grant refused: {why}")))?;
    agent.prepare_console(&grant).await.map_err(|e| {
        Refusal::new(
            RefusalKind::ConsoleNotReady,
            format!("grant accepted, but its console account is not ready: {e}"),
        )
    })?;
    Ok(wire::Installed {
        jti: grant.jti().to_string(),
        iss: grant.claims.iss.clone(),
        login: grant.login().to_string(),
        expires_at: grant.expires_at(),
    })
}

fn grants(agent: &Arc<Agent>) -> Vec<wire::GrantSummary> {
    let now = crate::grant::now();
    agent
        .grants()
        .into_iter()
        .map(|g| wire::GrantSummary {
            jti: g.jti().to_string(),
            iss: g.claims.iss.clone(),
            sub: g.claims.sub.clone(),
            login: g.login().to_string(),
            expires_at: g.expires_at(),
            remaining_secs: (g.expires_at() - now).max(0),
            ssh_keys: g.claims.ssh_keys.len(),
            profile: g.profile,
        })
        .collect()
}

fn sessions(agent: &Arc<Agent>) -> Vec<wire::SessionSummary> {
    agent.sessions.list()
}

fn status(agent: &Arc<Agent>) -> wire::Status {
    use crate::enforce::Enforcement;
    let collector = match agent.shipper.get() {
        Some(shipper) => {
            let shipping = shipper.status();
            wire::CollectorStatus {
                configured: shipping.configured,
                shipping: Some(wire::Shipping {
                    reachable: shipping.reachable,
                    backlog_sessions: shipping.backlog_sessions,
                    last_error: shipping.last_error,
                }),
            }
        }
        None => wire::CollectorStatus {
            configured: false,
            shipping: None,
        },
    };
    wire::Status {
        version: env!("CARGO_PKG_VERSION").to_string(),
        host: agent.host.clone(),
        enforcement: wire::EnforcementStatus {
            mode: match agent.config.enforcement {
                Enforcement::Required => wire::EnforcementMode::Required,
                Enforcement::BestEffort => wire::EnforcementMode::BestEffort,
                Enforcement::Off => wire::EnforcementMode::Off,
            },
            path: agent.enforcer.path().to_string(),
            lost_events: agent.enforcer.lost_events(),
        },
        grants: agent.grants().len(),
        sessions: agent.sessions.list().len(),
        accounts: agent.account_names(),
        unmanaged_accounts: agent
            .unmanaged_accounts()
            .into_iter()
            .map(|e| wire::UnmanagedAccount {
                name: e.name,
                uid: e.uid,
                home: e.home.display().to_string(),
            })
            .collect(),
        spool: wire::SpoolStatus {
            bytes: crate::ship::spool_bytes(&agent.spool_dir()),
            sessions: crate::ship::spooled_sessions(&agent.spool_dir()).len(),
            max_bytes: agent.config.spool.max_bytes,
        },
        collector,
        up_since: agent.started_at,
        rdp_certificate: agent.rdp_certificate.get().cloned(),
    }
}

/// Why `usher` got no answer it can use.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("cannot reach usherd at {}: {source}", socket.display())]
    Unreachable {
        socket: PathBuf,
        source: std::io::Error,
    },
    #[error("usherd closed the connection: {0}")]
    Closed(std::io::Error),
    #[error("lost usherd: {0}")]
    Read(std::io::Error),
    #[error("bad answer from usherd: {0}")]
    BadAnswer(#[from] wire::LineError),
    #[error(transparent)]
    Refused(#[from] Refusal),
}

/// The client side, for the `usher` tool: one method per request, each returning that
/// request's answer.
pub struct Client {
    socket: PathBuf,
}

impl Client {
    pub fn new(socket: &Path) -> Client {
        Client {
            socket: socket.to_owned(),
        }
    }

    pub fn install(&self, token: String) -> Result<wire::Installed, CallError> {
        self.call(&Request::Install { token })
    }

    pub fn list(&self) -> Result<Vec<wire::GrantSummary>, CallError> {
        self.call(&Request::List)
    }

    pub fn revoke(&self, jti: String, iss: Option<String>) -> Result<wire::Revoked, CallError> {
        self.call(&Request::Revoke { jti, iss })
    }

    pub fn status(&self) -> Result<wire::Status, CallError> {
        self.call(&Request::Status)
    }

    pub fn sessions(&self) -> Result<Vec<wire::SessionSummary>, CallError> {
        self.call(&Request::Sessions)
    }

    pub fn approvals(&self) -> Result<Vec<usher_wire::approval::CommandStatus>, CallError> {
        self.call(&Request::Approvals)
    }

    pub fn decide(
        &self,
        id: String,
        approve: bool,
        comment: String,
        as_user: Option<String>,
    ) -> Result<usher_wire::approval::CommandStatus, CallError> {
        self.call(&Request::Decide {
            id,
            approve,
            comment,
            as_user,
        })
    }

    fn call<T: DeserializeOwned>(&self, request: &Request) -> Result<T, CallError> {
        use std::io::{BufRead, Read, Write};
        let mut stream =
            std::os::unix::net::UnixStream::connect(&self.socket).map_err(|source| {
                CallError::Unreachable {
                    socket: self.socket.clone(),
                    source,
                }
            })?;
        // The agent answers a peer it refuses before reading, and closes: the refusal may be
        // waiting even when the request could not be written.
        let written = stream.write_all(&request.encode());
        let mut reader = std::io::BufReader::new(stream).take(wire::MAX_ANSWER_BYTES as u64 + 1);
        let mut answer = Vec::new();
        let read = reader.read_until(b'\n', &mut answer);
        if answer.is_empty() {
            written.map_err(CallError::Closed)?;
            read.map_err(CallError::Read)?;
        }
        Ok(wire::decode_answer::<T>(&answer)??)
    }
}
