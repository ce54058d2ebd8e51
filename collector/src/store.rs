//! Recordings in an object store (a local directory, or S3-compatible), and an index in
//! SQLite that says what is stored, whether its chain holds, and what ran in it.
//!
//! A chunk is acknowledged only after its object is stored and its index row committed.

use crate::config::{Config, Storage};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use usher_wire::chain;
use usher_wire::collector::{ChunkAccepted, ErrorCode, StreamStatus};
use usher_wire::meta::SessionMeta;
use usher_wire::seal::Seal;

/// A session's streams: `audit` always, `cast` for a terminal, `desktop` for an RDP
/// desktop (agent-rdp/README.md, "Recording format").
pub const STREAMS: [&str; 3] = ["audit", "cast", "desktop"];
pub const MAX_CHUNK: usize = 4 << 20;

pub struct Store {
    objects: Arc<dyn ObjectStore>,
    /// With the local backend, its directory: objects are fsync'd there before they are
    /// acknowledged (object_store's LocalFileSystem renames into place without fsync).
    local_root: Option<std::path::PathBuf>,
    db: Mutex<Connection>,
    /// One writer per session at a time: a chunk's checks and its write are one step.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A session's turn to write; its lock leaves the map when nobody else wants it, so the
/// map holds only the sessions being written to.
struct SessionTurn<'a> {
    store: &'a Store,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for SessionTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self
            .store
            .session_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody holds or awaits it, and nobody can take
        // it from the map while the map is locked.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.id);
        }
    }
}

/// Why a request is refused; its text is what the requester reads.
#[derive(Debug, thiserror::Error)]
pub enum Refused {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The chain does not hold, or the seal does not match: the session is flagged.
    #[error("tampered: {0}")]
    Tampered(String),
    /// A chunk number past the stored end of its stream.
    #[error("gap")]
    Gap { next_seq: u64 },
    /// A chunk number already taken (with other content), or any chunk once the session
    /// is sealed: the session is flagged.
    #[error("tampered: {why}")]
    Rewritten { why: String, next_seq: u64 },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Refused {
    /// What the answer's `code` says.
    pub fn code(&self) -> ErrorCode {
        match self {
            Refused::BadRequest(_) => ErrorCode::BadRequest,
            Refused::Forbidden(_) => ErrorCode::Forbidden,
            Refused::NotFound(_) => ErrorCode::NotFound,
            Refused::Tampered(_) | Refused::Rewritten { .. } => ErrorCode::Tampered,
            Refused::Gap { .. } => ErrorCode::Gap,
            Refused::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Where the stored stream ends, when the refusal is about a chunk's number.
    pub fn next_seq(&self) -> Option<u64> {
        match self {
            Refused::Gap { next_seq } | Refused::Rewritten { next_seq, .. } => Some(*next_seq),
            _ => None,
        }
    }
}

/// Why the store cannot be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{path}: {source}")]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Objects(#[from] object_store::Error),
    #[error("index: {0}")]
    Index(#[from] rusqlite::Error),
}

/// Session metadata as a sender sent it: the fields Usher defines, typed, and any other
/// top-level field kept as it came (a newer agent's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReceivedMeta {
    #[serde(flatten)]
    pub meta: SessionMeta,
    #[serde(flatten)]
    pub unknown: serde_json::Map<String, serde_json::Value>,
}

#[derive(Debug, Serialize)]
pub struct SessionRow {
    pub id: String,
    pub host: String,
    pub login: Option<String>,
    pub sub: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// live, complete, or tampered.
    pub status: String,
    pub problem: Option<String>,
    pub commands: u64,
    /// The session has a desktop recording (RDP) rather than, or beside, a terminal cast.
    pub desktop: bool,
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct Search {
    pub sub: Option<String>,
    pub host: Option<String>,
    pub login: Option<String>,
    /// RFC 3339 bounds on the start time.
    pub from: Option<String>,
    pub to: Option<String>,
    /// A substring of an executed path or its arguments.
    pub command: Option<String>,
    /// Only sessions holding this stream (`desktop`, `cast`).
    pub recording: Option<String>,
}

/// Who made a write: the host its token names, which token (a fingerprint, never the
/// token), and from where. Flags and refusals say this, so a flag raised with a stolen
/// token points at the token and the address that used it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Writer {
    pub host: String,
    /// The first 12 hex digits of the token's SHA-256.
    pub token_id: String,
    pub addr: Option<std::net::SocketAddr>,
    /// The write carried a valid signature of the host's key (`X-Usher-Signature`): it
    /// verifiably comes from the host. Only such writes may flag a session.
    pub signed: bool,
}

impl Writer {
    pub fn token_id(token: &str) -> String {
        usher_wire::collector::sha256_hex(token.as_bytes())[..12].to_string()
    }
}

impl std::fmt::Display for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host {} (token {}", self.host, self.token_id)?;
        if let Some(a) = self.addr {
            write!(f, ", from {a}")?;
        }
        write!(f, ")")
    }
}

/// How a chunk's body came over the wire and is kept in storage. The chain hash is always
/// over the decoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Encoding {
    #[default]
    Identity,
    /// `Content-Encoding: zstd`.
    Zstd,
}

/// A chunk as received: its decoded bytes (hashed, indexed) and the bytes as sent (what
/// storage keeps, in `encoding`).
#[derive(Debug, Clone)]
pub struct ChunkBody {
    pub raw: bytes::Bytes,
    pub encoded: bytes::Bytes,
    pub encoding: Encoding,
}

impl ChunkBody {
    pub fn identity(raw: bytes::Bytes) -> ChunkBody {
        ChunkBody {
            encoded: raw.clone(),
            raw,
            encoding: Encoding::Identity,
        }
    }
}

pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn internal(e: impl std::fmt::Display) -> Refused {
    Refused::Internal(e.to_string())
}

impl Store {
    pub fn open(config: &Config) -> Result<Store, OpenError> {
        let create = |path: PathBuf| {
            std::fs::create_dir_all(&path).map_err(|source| OpenError::Directory { path, source })
        };
        create(config.data_dir.clone())?;
        let local_root =
            matches!(config.storage, Storage::Local).then(|| config.data_dir.join("objects"));
        let objects: Arc<dyn ObjectStore> = match &config.storage {
            Storage::Local => {
                let dir = config.data_dir.join("objects");
                create(dir.clone())?;
                Arc::new(object_store::local::LocalFileSystem::new_with_prefix(&dir)?)
            }
            Storage::S3 {
                bucket,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                allow_http,
            } => {
                let mut b = object_store::aws::AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region.clone().unwrap_or_else(|| "us-east-1".into()))
                    .with_access_key_id(access_key_id)
                    .with_secret_access_key(secret_access_key)
                    .with_allow_http(*allow_http);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e).with_virtual_hosted_style_request(false);
                }
                Arc::new(b.build()?)
            }
        };
        let db = Connection::open(config.data_dir.join("index.sqlite"))?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;
             CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, host TEXT NOT NULL, login TEXT, sub TEXT,
                 started_at TEXT, ended_at TEXT, status TEXT NOT NULL DEFAULT 'live', problem TEXT, meta TEXT);
             CREATE TABLE IF NOT EXISTS chunks (session TEXT NOT NULL, stream TEXT NOT NULL, seq INTEGER NOT NULL,
                 hash TEXT NOT NULL, size INTEGER NOT NULL, PRIMARY KEY (session, stream, seq));
             CREATE TABLE IF NOT EXISTS commands (session TEXT NOT NULL, time REAL, path TEXT, argv TEXT,
                 verdict TEXT, rule TEXT);
             CREATE INDEX IF NOT EXISTS commands_session ON commands(session);
             CREATE INDEX IF NOT EXISTS sessions_started ON sessions(started_at);",
        )?;
        Ok(Store {
            objects,
            local_root,
            db: Mutex::new(db),
            session_locks: Mutex::new(HashMap::new()),
        })
    }

    /// Stores an object so that it survives a crash of the machine, not only of the process.
    async fn put_durably(&self, path: &ObjectPath, payload: PutPayload) -> Result<(), Refused> {
        self.objects.put(path, payload).await.map_err(internal)?;
        if let Some(root) = &self.local_root {
            let file = root.join(path.as_ref());
            tokio::task::spawn_blocking(move || -> std::io::Result<()> {
                std::fs::File::open(&file)?.sync_all()?;
                // The rename that put the file in place lives in its directory.
                if let Some(dir) = file.parent() {
                    std::fs::File::open(dir)?.sync_all()?;
                }
                Ok(())
            })
            .await
            .map_err(internal)?
            .map_err(internal)?;
        }
        Ok(())
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for this session's turn: one write per session at a time.
    async fn session_turn(&self, id: &str) -> SessionTurn<'_> {
        let lock = self
            .session_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        SessionTurn {
            store: self,
            id: id.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    /// The session's row, made on first contact; another host's session is refused.
    fn claim(&self, id: &str, host: &str) -> Result<(), Refused> {
        let db = self.db();
        let owner: Option<String> = db
            .query_row("SELECT host FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(internal)?;
        match owner {
            Some(h) if h != host => Err(Refused::Forbidden(format!(
                "session {id} belongs to another host"
            ))),
            Some(_) => Ok(()),
            None => {
                db.execute(
                    "INSERT INTO sessions (id, host) VALUES (?1, ?2)",
                    params![id, host],
                )
                .map_err(internal)?;
                Ok(())
            }
        }
    }

    fn session_status(&self, id: &str) -> Result<String, Refused> {
        self.db()
            .query_row("SELECT status FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .map_err(internal)
    }

    fn flag(&self, id: &str, problem: &str) {
        log::warn!("session {id} flagged: {problem}");
        let _ = self.db().execute(
            "UPDATE sessions SET status = 'tampered', problem = ?2 WHERE id = ?1",
            params![id, problem],
        );
    }

    /// What `host` has stored of one of its sessions' streams; another host's session is
    /// refused (an unknown session is at its start).
    pub fn stream_status_for(
        &self,
        host: &str,
        id: &str,
        stream: &str,
    ) -> Result<StreamStatus, Refused> {
        let owner: Option<String> = self
            .db()
            .query_row("SELECT host FROM sessions WHERE id = ?1", [id], |r| {
                r.get(0)
            })
            .optional()
            .map_err(internal)?;
        if owner.is_some_and(|h| h != host) {
            return Err(Refused::Forbidden(format!(
                "session {id} belongs to another host"
            )));
        }
        self.stream_status(id, stream)
    }

    fn stream_status(&self, id: &str, stream: &str) -> Result<StreamStatus, Refused> {
        let db = self.db();
        let last: Option<(u64, String)> = db
            .query_row(
                "SELECT seq, hash FROM chunks WHERE session = ?1 AND stream = ?2 ORDER BY seq DESC LIMIT 1",
                params![id, stream],
                |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)),
            )
            .optional()
            .map_err(internal)?;
        Ok(match last {
            Some((seq, hash)) => StreamStatus {
                next_seq: seq + 1,
                last_hash: hash,
            },
            None => StreamStatus {
                next_seq: 0,
                last_hash: chain::genesis(id, stream),
            },
        })
    }

    #[allow(clippy::too_many_arguments)] // the protocol's fields, each checked here
    pub async fn put_chunk(
        &self,
        writer: &Writer,
        id: &str,
        stream: &str,
        seq: u64,
        prev: &str,
        hash: &str,
        chunk: ChunkBody,
    ) -> Result<ChunkAccepted, Refused> {
        let host = writer.host.as_str();
        let body = chunk.raw;
        let _turn = self.session_turn(id).await;
        self.claim(id, host)?;
        let status = self.stream_status(id, stream)?;
        if seq < status.next_seq {
            let stored: Option<String> = self
                .db()
                .query_row(
                    "SELECT hash FROM chunks WHERE session = ?1 AND stream = ?2 AND seq = ?3",
                    params![id, stream, seq as i64],
                    |r| r.get(0),
                )
                .optional()
                .map_err(internal)?;
            return match stored {
                Some(h) if h == hash => Ok(ChunkAccepted {
                    stored: false,
                    duplicate: true,
                    next_seq: None,
                }),
                _ => {
                    // The protocol answers 409 here (not 422): the number is already taken.
                    let why = format!("{stream} chunk {seq} sent again with different content");
                    self.flag(id, &why);
                    Err(Refused::Rewritten {
                        why,
                        next_seq: status.next_seq,
                    })
                }
            };
        }
        if self.session_status(id)? == "complete" {
            // A sealed session's chains end where the host signed them.
            let why = format!("{stream} chunk {seq} sent after the seal");
            self.flag(id, &why);
            return Err(Refused::Rewritten {
                why,
                next_seq: status.next_seq,
            });
        }
        if seq > status.next_seq {
            return Err(Refused::Gap {
                next_seq: status.next_seq,
            });
        }
        if prev != status.last_hash {
            let why = format!("{stream} chunk {seq} does not continue the chain");
            self.flag(id, &why);
            return Err(Refused::Tampered(why));
        }
        let link = chain::next(prev, &body)
            .map_err(|_| Refused::BadRequest("bad X-Usher-Prev-Hash".into()))?;
        if link != hash {
            let why = format!("{stream} chunk {seq} does not match its hash");
            self.flag(id, &why);
            return Err(Refused::Tampered(why));
        }
        let path = ObjectPath::from(format!("sessions/{id}/{stream}/{seq:010}"));
        self.put_durably(&path, PutPayload::from(body.clone()))
            .await?;
        let mut db = self.db();
        let tx = db.transaction().map_err(internal)?;
        tx.execute(
            "INSERT INTO chunks (session, stream, seq, hash, size) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id, stream, seq as i64, hash, body.len() as i64],
        )
        .map_err(internal)?;
        if stream == "audit" {
            for line in body.split(|b| *b == b'\n') {
                let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
                    continue;
                };
                if v["event"] != "exec" {
                    continue;
                }
                let e = &v["exec"];
                tx.execute(
                    "INSERT INTO commands (session, time, path, argv, verdict, rule) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    params![
                        id,
                        e["time"].as_f64(),
                        e["path"].as_str(),
                        e["argv"].as_array().map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(" ")),
                        e["verdict"].as_str(),
                        e["rule"].as_str()
                    ],
                )
                .map_err(internal)?;
            }
        }
        tx.commit().map_err(internal)?;
        Ok(ChunkAccepted {
            stored: true,
            duplicate: false,
            next_seq: Some(seq + 1),
        })
    }

    /// `body` is the metadata as sent: its SHA-256 is what the seal names.
    pub async fn put_meta(
        &self,
        writer: &Writer,
        id: &str,
        received: ReceivedMeta,
        body: &[u8],
    ) -> Result<(), Refused> {
        let _ = body;
        let host = writer.host.as_str();
        let meta = &received.meta;
        if meta.host != host {
            return Err(Refused::Forbidden("the metadata names another host".into()));
        }
        if meta.session_id != id {
            return Err(Refused::BadRequest(
                "the metadata names another session".into(),
            ));
        }
        let _turn = self.session_turn(id).await;
        self.claim(id, host)?;
        let text = serde_json::to_string(&received).map_err(internal)?;
        self.put_durably(
            &ObjectPath::from(format!("sessions/{id}/meta.json")),
            PutPayload::from(text.clone().into_bytes()),
        )
        .await?;
        self.db()
            .execute(
                "UPDATE sessions SET login = ?2, sub = ?3, started_at = ?4, ended_at = ?5, meta = ?6 WHERE id = ?1",
                params![
                    id,
                    meta.login,
                    meta.grant.sub,
                    meta.started_at,
                    meta.ended_at,
                    text
                ],
            )
            .map_err(internal)?;
        Ok(())
    }

    /// Verifies the host's signature over the streams' lengths and last hashes, and that
    /// the stored chains end exactly there.
    pub async fn seal(
        &self,
        writer: &Writer,
        key: &ed25519_dalek::VerifyingKey,
        id: &str,
        seal: &Seal,
    ) -> Result<(), Refused> {
        let host = writer.host.as_str();
        let _turn = self.session_turn(id).await;
        self.claim(id, host)?;
        for (name, end) in &seal.streams {
            if !STREAMS.contains(&name.as_str()) {
                return Err(Refused::BadRequest(format!("unknown stream {name}")));
            }
            let have = self.stream_status(id, name)?;
            if have.next_seq != end.chunks || have.last_hash != end.last_hash {
                let why = format!(
                    "sealed {name} has {} chunks ending {}; stored: {} ending {}",
                    end.chunks, end.last_hash, have.next_seq, have.last_hash
                );
                self.flag(id, &why);
                return Err(Refused::Tampered(why));
            }
        }
        // Every stream the collector holds must be under the signature.
        for name in STREAMS {
            if !seal.streams.contains_key(name) && self.stream_status(id, name)?.next_seq > 0 {
                let why = format!("the seal leaves out the {name} stream");
                self.flag(id, &why);
                return Err(Refused::Tampered(why));
            }
        }
        if let Err(e) = seal.verify(id, key) {
            let why = e.to_string();
            self.flag(id, &why);
            return Err(Refused::Tampered(why));
        }
        self.put_durably(
            &ObjectPath::from(format!("sessions/{id}/seal.json")),
            PutPayload::from(serde_json::to_vec(seal).map_err(internal)?),
        )
        .await?;
        self.db()
            .execute(
                "UPDATE sessions SET status = 'complete' WHERE id = ?1 AND status = 'live'",
                [id],
            )
            .map_err(internal)?;
        Ok(())
    }

    pub fn search(&self, q: &Search) -> Result<Vec<SessionRow>, Refused> {
        let db = self.db();
        let mut stmt = db
            .prepare(
                "SELECT s.id, s.host, s.login, s.sub, s.started_at, s.ended_at, s.status, s.problem,
                        (SELECT count(*) FROM commands c WHERE c.session = s.id),
                        EXISTS (SELECT 1 FROM chunks k WHERE k.session = s.id AND k.stream = 'desktop')
                 FROM sessions s
                 WHERE (?1 IS NULL OR s.sub = ?1) AND (?2 IS NULL OR s.host = ?2) AND (?3 IS NULL OR s.login = ?3)
                   AND (?4 IS NULL OR s.started_at >= ?4) AND (?5 IS NULL OR s.started_at <= ?5)
                   AND (?6 IS NULL OR EXISTS (SELECT 1 FROM commands c WHERE c.session = s.id
                        AND (instr(c.path, ?6) > 0 OR instr(c.argv, ?6) > 0)))
                   AND (?7 IS NULL OR EXISTS (SELECT 1 FROM chunks k WHERE k.session = s.id AND k.stream = ?7))
                 ORDER BY s.started_at DESC LIMIT 500",
            )
            .map_err(internal)?;
        let rows = stmt
            .query_map(
                params![q.sub, q.host, q.login, q.from, q.to, q.command, q.recording],
                |r| {
                    Ok(SessionRow {
                        id: r.get(0)?,
                        host: r.get(1)?,
                        login: r.get(2)?,
                        sub: r.get(3)?,
                        started_at: r.get(4)?,
                        ended_at: r.get(5)?,
                        status: r.get(6)?,
                        problem: r.get(7)?,
                        commands: r.get::<_, i64>(8)? as u64,
                        desktop: r.get(9)?,
                    })
                },
            )
            .map_err(internal)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(internal)?;
        Ok(rows)
    }

    pub fn session(&self, id: &str) -> Result<serde_json::Value, Refused> {
        let db = self.db();
        let row = db
            .query_row(
                "SELECT host, status, problem, meta FROM sessions WHERE id = ?1",
                [id],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, Option<String>>(2)?,
                        r.get::<_, Option<String>>(3)?,
                    ))
                },
            )
            .optional()
            .map_err(internal)?
            .ok_or_else(|| Refused::NotFound(format!("no session {id}")))?;
        let mut stmt = db
            .prepare("SELECT time, path, argv, verdict, rule FROM commands WHERE session = ?1 ORDER BY time")
            .map_err(internal)?;
        let commands: Vec<serde_json::Value> = stmt
            .query_map([id], |r| {
                Ok(serde_json::json!({
                    "time": r.get::<_, Option<f64>>(0)?, "path": r.get::<_, Option<String>>(1)?,
                    "argv": r.get::<_, Option<String>>(2)?, "verdict": r.get::<_, Option<String>>(3)?,
                    "rule": r.get::<_, Option<String>>(4)?,
                }))
            })
            .map_err(internal)?
            .filter_map(Result::ok)
            .collect();
        let streams: Vec<String> = db
            .prepare("SELECT DISTINCT stream FROM chunks WHERE session = ?1 ORDER BY stream")
            .map_err(internal)?
            .query_map([id], |r| r.get(0))
            .map_err(internal)?
            .filter_map(Result::ok)
            .collect();
        let meta = row.3.as_deref().map(read_stored_meta).unwrap_or_default();
        Ok(serde_json::json!({
            "id": id, "host": row.0, "status": row.1, "problem": row.2, "meta": meta,
            "commands": commands, "streams": streams,
        }))
    }

    /// A stream as stored from chunk `from` on: its chunks, in order, one at a time (a
    /// desktop recording can be far larger than an answer should hold in memory), and the
    /// number of chunks stored (where a later read resumes).
    pub fn stream(
        &self,
        id: &str,
        stream: &str,
        from: u64,
    ) -> Result<
        (
            u64,
            impl futures::Stream<Item = Result<bytes::Bytes, Refused>> + Send + 'static,
        ),
        Refused,
    > {
        use futures::StreamExt;
        let n = self.stream_status(id, stream)?.next_seq;
        let objects = self.objects.clone();
        let prefix = format!("sessions/{id}/{stream}");
        Ok((
            n,
            futures::stream::iter(from.min(n)..n).then(move |seq| {
                let objects = objects.clone();
                let path = ObjectPath::from(format!("{prefix}/{seq:010}"));
                async move {
                    objects
                        .get(&path)
                        .await
                        .map_err(internal)?
                        .bytes()
                        .await
                        .map_err(internal)
                }
            }),
        ))
    }
}

/// Stored metadata as the viewer API answers it: typed when it reads as session metadata
/// (which turns an older sender's RFC 3339 `expires_at` into Unix seconds), else as stored,
/// so that no stored session becomes unreadable.
fn read_stored_meta(text: &str) -> serde_json::Value {
    match serde_json::from_str::<ReceivedMeta>(text) {
        Ok(meta) => serde_json::to_value(meta).unwrap_or_default(),
        Err(e) => {
            log::warn!("stored metadata is not session metadata ({e}); shown as stored");
            serde_json::from_str(text).unwrap_or_default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Metadata as stores hold it from senders before the wire crate: the expiry as RFC
    /// 3339 text, the enforcement as a bare `tracepoint`, and a field of a newer agent.
    fn older_form(id: &str, host: &str) -> serde_json::Value {
        serde_json::json!({
            "session_id": id, "kind": "ssh", "host": host, "login": "usher-zoe", "uid": 61000,
            "grant": {"iss": "test-issuer", "sub": "zoe@example.org", "jti": "j", "profile": "default",
                      "approved_by": "lead", "reason": "test", "expires_at": "2030-01-01T00:00:00Z"},
            "peer": "127.0.0.1:50000", "command": null, "term": "xterm",
            "started_at": "2026-11-22T12:00:00Z", "ended_at": "2026-11-22T12:05:00Z",
            "exit_status": 0, "exit_signal": null, "enforcement": "tracepoint", "enforced": true,
            "input_recorded": false, "interrupted": false, "extra_field_kept": "yes",
        })
    }

    fn writer(host: &str) -> Writer {
        Writer {
            host: host.into(),
            token_id: Writer::token_id("t"),
            addr: None,
            signed: true,
        }
    }

    fn scratch_store(name: &str) -> (Store, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "usher-collector-unit-{name}-{}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let config = Config {
            listen: "127.0.0.1:0".into(),
            tls_cert: dir.join("unused.pem"),
            tls_key: dir.join("unused.key"),
            data_dir: dir.clone(),
            storage: Storage::Local,
            agents: vec![],
            assets_dir: None,
            ..Config::default()
        };
        (Store::open(&config).unwrap(), dir)
    }

    #[test]
    fn older_stored_metadata_reads_typed_in_the_agents_form() {
        let read = read_stored_meta(&older_form("s1", "h").to_string());
        assert_eq!(read["grant"]["expires_at"], 1893456000);
        assert_eq!(read["enforcement"], "tracepoint");
        assert_eq!(read["extra_field_kept"], "yes");
        assert_eq!(read["login"], "usher-zoe");
    }

    #[test]
    fn stored_metadata_that_is_not_session_metadata_is_shown_as_stored() {
        let odd = serde_json::json!({"session_id": "s1", "grant": {"expires_at": "soon"}});
        assert_eq!(read_stored_meta(&odd.to_string()), odd);
        assert_eq!(read_stored_meta("{not json"), serde_json::Value::Null);
    }

    #[test]
    fn a_session_stored_in_the_older_form_is_answered_in_the_agents_form() {
        let (store, dir) = scratch_store("older-row");
        store.claim("old-1", "h").unwrap();
        // As an older collector wrote it: the metadata verbatim.
        store
            .db()
            .execute(
                "UPDATE sessions SET login = 'usher-zoe', meta = ?2 WHERE id = ?1",
                params!["old-1", older_form("old-1", "h").to_string()],
            )
            .unwrap();
        let answer = store.session("old-1").unwrap();
        assert_eq!(answer["meta"]["grant"]["expires_at"], 1893456000);
        assert_eq!(answer["meta"]["grant"]["sub"], "zoe@example.org");
        assert_eq!(answer["meta"]["extra_field_kept"], "yes");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn metadata_received_in_the_older_form_is_stored_and_indexed_typed() {
        let (store, dir) = scratch_store("older-put");
        let received: ReceivedMeta = serde_json::from_value(older_form("old-2", "h")).unwrap();
        store
            .put_meta(&writer("h"), "old-2", received, b"")
            .await
            .unwrap();
        let stored: String = store
            .db()
            .query_row("SELECT meta FROM sessions WHERE id = 'old-2'", [], |r| {
                r.get(0)
            })
            .unwrap();
        let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
        assert_eq!(stored["grant"]["expires_at"], 1893456000);
        assert_eq!(stored["extra_field_kept"], "yes");
        let rows = store
            .search(&Search {
                sub: Some("zoe@example.org".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].login.as_deref(), Some("usher-zoe"));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[tokio::test]
    async fn metadata_naming_another_host_or_session_is_refused() {
        let (store, dir) = scratch_store("wrong-owner");
        let received: ReceivedMeta = serde_json::from_value(older_form("s", "h")).unwrap();
        assert!(matches!(
            store
                .put_meta(&writer("other"), "s", received.clone(), b"")
                .await,
            Err(Refused::Forbidden(_))
        ));
        assert!(matches!(
            store.put_meta(&writer("h"), "t", received, b"").await,
            Err(Refused::BadRequest(_))
        ));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn refusals_carry_the_code_the_shipper_decides_on() {
        assert_eq!(Refused::Gap { next_seq: 3 }.code(), ErrorCode::Gap);
        assert_eq!(Refused::Gap { next_seq: 3 }.next_seq(), Some(3));
        assert_eq!(Refused::Gap { next_seq: 3 }.to_string(), "gap");
        let rewritten = Refused::Rewritten {
            why: "cast chunk 1 sent again with different content".into(),
            next_seq: 4,
        };
        assert_eq!(rewritten.code(), ErrorCode::Tampered);
        assert_eq!(
            rewritten.to_string(),
            "tampered: cast chunk 1 sent again with different content"
        );
        assert_eq!(Refused::Tampered("x".into()).code(), ErrorCode::Tampered);
        assert_eq!(Refused::Tampered("x".into()).next_seq(), None);
    }
}
