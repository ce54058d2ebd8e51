//! The local control socket: `usher grant install|list|revoke`, `usher status`,
//! `usher sessions`. One JSON request per line, one JSON answer per line. Only root
//! (checked with SO_PEERCRED, not with file modes) may use it.

use crate::daemon::Agent;
use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Install {
        token: String,
    },
    List,
    /// `iss` picks among grants of several issuers that share the jti.
    Revoke {
        jti: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iss: Option<String>,
    },
    Status,
    Sessions,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub data: serde_json::Value,
}

impl Answer {
    fn ok(data: serde_json::Value) -> Answer {
        Answer {
            ok: true,
            error: None,
            data,
        }
    }
    fn err(e: impl Into<String>) -> Answer {
        Answer {
            ok: false,
            error: Some(e.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// A Unix socket anyone may connect to: who the peer is comes from SO_PEERCRED, checked
/// per request, not from the file's mode.
pub fn bind_open_socket(path: &Path) -> Result<UnixListener, String> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let _ = std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666));
    Ok(listener)
}

/// Serves the control socket for as long as the agent lives. Only root is answered: any
/// other peer is told so and dropped before anything it sends is read. Root's
/// connections are capped and must send a request within [`IDLE`].
pub async fn serve(agent: Arc<Agent>, listener: UnixListener) {
    let slots = crate::admission::Admission::new(32, 32);
    accept_forever(listener, "control", move |stream, uid| {
        if uid != 0 {
            let _ = stream
                .try_write(b"{\"ok\":false,\"error\":\"only root may use the control socket\"}\n");
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
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read.take(1024 * 1024)).lines();
    while let Ok(Some(line)) = tokio::time::timeout(IDLE, lines.next_line()).await? {
        let answer = match serde_json::from_str::<Request>(&line) {
            Ok(req) => answer(&agent, req).await,
            Err(e) => Answer::err(format!("bad request: {e}")),
        };
        let mut out = serde_json::to_vec(&answer).unwrap_or_default();
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

use tokio::io::AsyncReadExt as _;

async fn answer(agent: &Arc<Agent>, req: Request) -> Answer {
    match req {
        Request::Install { token } => match agent.admit(&token, "usher grant install") {
            Ok(g) => match agent.prepare_console(&g).await {
                Ok(()) => Answer::ok(
                    serde_json::json!({"jti": g.jti(), "iss": g.claims.iss, "login": g.login(), "expires_at": g.expires_at()}),
                ),
                Err(e) => Answer::err(format!(
                    "grant accepted, but its console account is not ready: {e}"
                )),
            },
            Err(why) => Answer::err(format!("grant refused: {why}")),
        },
        Request::List => {
            let now = crate::grant::now();
            let grants: Vec<_> = agent
                .grants()
                .iter()
                .map(|g| {
                    serde_json::json!({
                        "jti": g.jti(), "iss": g.claims.iss, "sub": g.claims.sub, "login": g.login(),
                        "profile": g.profile, "expires_at": g.expires_at(),
                        "remaining_secs": (g.expires_at() - now).max(0),
                        "ssh_keys": g.claims.ssh_keys.len(),
                    })
                })
                .collect();
            Answer::ok(serde_json::json!(grants))
        }
        Request::Revoke { jti, iss } => match agent.revoke(&jti, iss.as_deref()).await {
            Ok((id, known)) => {
                Answer::ok(serde_json::json!({"jti": id.jti, "iss": id.iss, "was_live": known}))
            }
            Err(e) => Answer::err(e),
        },
        Request::Status => Answer::ok(status(agent)),
        Request::Sessions => Answer::ok(serde_json::json!(agent.sessions.list())),
    }
}

fn status(agent: &Arc<Agent>) -> serde_json::Value {
    let spool_bytes = crate::ship::spool_bytes(&agent.spool_dir());
    let spooled = crate::ship::spooled_sessions(&agent.spool_dir()).len();
    let collector = match agent.shipper.get() {
        Some(s) => serde_json::json!(s.status()),
        None => serde_json::json!({"configured": false}),
    };
    serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "host": agent.host,
        "enforcement": {
            "mode": agent.config.enforcement,
            "path": agent.enforcer.path().to_string(),
            "lost_events": agent.enforcer.lost_events(),
        },
        "grants": agent.grants().len(),
        "sessions": agent.sessions.list().len(),
        "accounts": agent.account_names(),
        // In usher's fence (prefix and UID range) but not made by it: left alone, and no
        // grant opens them. An administrator should look at each.
        "unmanaged_accounts": agent
            .unmanaged_accounts()
            .iter()
            .map(|e| serde_json::json!({"name": e.name, "uid": e.uid, "home": e.home}))
            .collect::<Vec<_>>(),
        "spool": {"bytes": spool_bytes, "sessions": spooled, "max_bytes": agent.config.spool.max_bytes},
        "collector": collector,
        "up_since": agent.started_at,
    })
}

/// The client side, for the `usher` tool.
pub fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket)
        .map_err(|e| format!("cannot reach usherd at {}: {e}", socket.display()))?;
    let mut line = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    line.push(b'\n');
    // The agent answers a peer it refuses before reading, and closes: the refusal may be
    // waiting even when the request could not be written.
    let written = stream.write_all(&line);
    let mut reader = std::io::BufReader::new(stream);
    let mut answer = String::new();
    let read = reader.read_line(&mut answer);
    if answer.is_empty() {
        written.map_err(|e| format!("usherd closed the connection: {e}"))?;
        read.map_err(|e| e.to_string())?;
    }
    let answer: Answer =
        serde_json::from_str(&answer).map_err(|e| format!("bad answer from usherd: {e}"))?;
    if answer.ok {
        Ok(answer.data)
    } else {
        Err(answer.error.unwrap_or_else(|| "usherd refused".into()))
    }
}
