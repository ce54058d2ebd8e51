//! Recordings in an object store (a local directory, or S3-compatible), and an index in
//! SQLite that says what is stored, whether its chain holds, and what ran in it.
//!
//! A chunk is acknowledged only after its object is stored and its index row committed.

use crate::config::{Config, Storage};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

pub const STREAMS: [&str; 2] = ["audit", "cast"];
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

#[derive(Debug)]
pub enum Refused {
    BadRequest(String),
    Forbidden(String),
    NotFound(String),
    /// The chain does not hold: the session is flagged.
    Tampered(String),
    Conflict(serde_json::Value),
    Internal(String),
}

#[derive(Debug, Serialize)]
pub struct StreamStatus {
    pub next_seq: u64,
    pub last_hash: String,
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
}

pub fn genesis(session: &str, stream: &str) -> String {
    hex::encode(Sha256::digest(
        format!("usher-chain-v1\n{session}\n{stream}").as_bytes(),
    ))
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
    pub fn open(config: &Config) -> Result<Store, String> {
        std::fs::create_dir_all(&config.data_dir)
            .map_err(|e| format!("{}: {e}", config.data_dir.display()))?;
        let local_root =
            matches!(config.storage, Storage::Local).then(|| config.data_dir.join("objects"));
        let objects: Arc<dyn ObjectStore> = match &config.storage {
            Storage::Local => {
                let dir = config.data_dir.join("objects");
                std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&dir)
                        .map_err(|e| e.to_string())?,
                )
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
                Arc::new(b.build().map_err(|e| e.to_string())?)
            }
        };
        let db =
            Connection::open(config.data_dir.join("index.sqlite")).map_err(|e| e.to_string())?;
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
        )
        .map_err(|e| e.to_string())?;
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

    pub fn stream_status(&self, id: &str, stream: &str) -> Result<StreamStatus, Refused> {
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
                last_hash: genesis(id, stream),
            },
        })
    }

    #[allow(clippy::too_many_arguments)] // the protocol's fields, each checked here
    pub async fn put_chunk(
        &self,
        host: &str,
        id: &str,
        stream: &str,
        seq: u64,
        prev: &str,
        hash: &str,
        body: bytes::Bytes,
    ) -> Result<serde_json::Value, Refused> {
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
                Some(h) if h == hash => Ok(serde_json::json!({"stored": false, "duplicate": true})),
                _ => {
                    // The protocol answers 409 here (not 422): the number is already taken.
                    let why = format!("{stream} chunk {seq} sent again with different content");
                    self.flag(id, &why);
                    Err(Refused::Conflict(serde_json::json!({
                        "error": format!("tampered: {why}"),
                        "next_seq": status.next_seq,
                    })))
                }
            };
        }
        if self.session_status(id)? == "complete" {
            // A sealed session's chains end where the host signed them.
            let why = format!("{stream} chunk {seq} sent after the seal");
            self.flag(id, &why);
            return Err(Refused::Conflict(serde_json::json!({
                "error": format!("tampered: {why}"),
                "next_seq": status.next_seq,
            })));
        }
        if seq > status.next_seq {
            return Err(Refused::Conflict(
                serde_json::json!({"error": "gap", "next_seq": status.next_seq}),
            ));
        }
        if prev != status.last_hash {
            let why = format!("{stream} chunk {seq} does not continue the chain");
            self.flag(id, &why);
            return Err(Refused::Tampered(why));
        }
        let mut h = Sha256::new();
        h.update(
            hex::decode(prev).map_err(|_| Refused::BadRequest("bad X-Usher-Prev-Hash".into()))?,
        );
        h.update(&body);
        if hex::encode(h.finalize()) != hash {
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
        Ok(serde_json::json!({"stored": true, "next_seq": seq + 1}))
    }

    pub async fn put_meta(
        &self,
        host: &str,
        id: &str,
        meta: serde_json::Value,
    ) -> Result<(), Refused> {
        if meta["host"].as_str() != Some(host) {
            return Err(Refused::Forbidden("the metadata names another host".into()));
        }
        if meta["session_id"].as_str() != Some(id) {
            return Err(Refused::BadRequest(
                "the metadata names another session".into(),
            ));
        }
        let _turn = self.session_turn(id).await;
        self.claim(id, host)?;
        let bytes = serde_json::to_vec(&meta).map_err(internal)?;
        self.put_durably(
            &ObjectPath::from(format!("sessions/{id}/meta.json")),
            PutPayload::from(bytes),
        )
        .await?;
        self.db()
            .execute(
                "UPDATE sessions SET login = ?2, sub = ?3, started_at = ?4, ended_at = ?5, meta = ?6 WHERE id = ?1",
                params![
                    id,
                    meta["login"].as_str(),
                    meta["grant"]["sub"].as_str(),
                    meta["started_at"].as_str(),
                    meta["ended_at"].as_str(),
                    meta.to_string()
                ],
            )
            .map_err(internal)?;
        Ok(())
    }

    /// Verifies the host's signature over the streams' lengths and last hashes, and that
    /// the stored chains end exactly there.
    pub async fn seal(
        &self,
        host: &str,
        key: &ed25519_dalek::VerifyingKey,
        id: &str,
        seal: serde_json::Value,
    ) -> Result<(), Refused> {
        let _turn = self.session_turn(id).await;
        self.claim(id, host)?;
        let streams = seal["streams"]
            .as_object()
            .ok_or_else(|| Refused::BadRequest("no streams".into()))?;
        let mut message = format!("usher-seal-v1\n{id}\n");
        let mut names: Vec<&String> = streams.keys().collect();
        names.sort();
        for name in &names {
            let s = &streams[name.as_str()];
            let chunks = s["chunks"]
                .as_u64()
                .ok_or_else(|| Refused::BadRequest("chunks".into()))?;
            let last = s["last_hash"]
                .as_str()
                .ok_or_else(|| Refused::BadRequest("last_hash".into()))?;
            if !STREAMS.contains(&name.as_str()) {
                return Err(Refused::BadRequest(format!("unknown stream {name}")));
            }
            message.push_str(&format!("{name} {chunks} {last}\n"));
            let have = self.stream_status(id, name)?;
            if have.next_seq != chunks || have.last_hash != last {
                let why = format!(
                    "sealed {name} has {chunks} chunks ending {last}; stored: {} ending {}",
                    have.next_seq, have.last_hash
                );
                self.flag(id, &why);
                return Err(Refused::Tampered(why));
            }
        }
        // Every stream the collector holds must be under the signature.
        for name in STREAMS {
            if !streams.contains_key(name) && self.stream_status(id, name)?.next_seq > 0 {
                let why = format!("the seal leaves out the {name} stream");
                self.flag(id, &why);
                return Err(Refused::Tampered(why));
            }
        }
        let signature = seal["signature"]
            .as_str()
            .ok_or_else(|| Refused::BadRequest("no signature".into()))?;
        if let Err(why) = crate::keys::verify_seal(key, &message, signature) {
            self.flag(id, &why);
            return Err(Refused::Tampered(why));
        }
        self.put_durably(
            &ObjectPath::from(format!("sessions/{id}/seal.json")),
            PutPayload::from(seal.to_string().into_bytes()),
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
                        (SELECT count(*) FROM commands c WHERE c.session = s.id)
                 FROM sessions s
                 WHERE (?1 IS NULL OR s.sub = ?1) AND (?2 IS NULL OR s.host = ?2) AND (?3 IS NULL OR s.login = ?3)
                   AND (?4 IS NULL OR s.started_at >= ?4) AND (?5 IS NULL OR s.started_at <= ?5)
                   AND (?6 IS NULL OR EXISTS (SELECT 1 FROM commands c WHERE c.session = s.id
                        AND (instr(c.path, ?6) > 0 OR instr(c.argv, ?6) > 0)))
                 ORDER BY s.started_at DESC LIMIT 500",
            )
            .map_err(internal)?;
        let rows = stmt
            .query_map(
                params![q.sub, q.host, q.login, q.from, q.to, q.command],
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
        let meta: serde_json::Value = row
            .3
            .as_deref()
            .and_then(|m| serde_json::from_str(m).ok())
            .unwrap_or_default();
        Ok(
            serde_json::json!({"id": id, "host": row.0, "status": row.1, "problem": row.2, "meta": meta, "commands": commands}),
        )
    }

    /// A stream as stored: its chunks, in order, joined.
    pub async fn stream(&self, id: &str, stream: &str) -> Result<Vec<u8>, Refused> {
        let n = self.stream_status(id, stream)?.next_seq;
        let mut out = Vec::new();
        for seq in 0..n {
            let path = ObjectPath::from(format!("sessions/{id}/{stream}/{seq:010}"));
            let bytes = self
                .objects
                .get(&path)
                .await
                .map_err(internal)?
                .bytes()
                .await
                .map_err(internal)?;
            out.extend_from_slice(&bytes);
        }
        Ok(out)
    }
}
