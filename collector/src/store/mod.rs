//! Recordings in an object store (a local directory, or S3-compatible), and an index
//! (SQLite for one machine, PostgreSQL for several instances) that says what is stored,
//! whether its chain holds, who flagged it, whether it is under legal hold, and what ran
//! in it. See collector/FLEET.md, "Storage and index".
//!
//! A chunk is acknowledged only after its object is durable and its index row committed;
//! concurrent chunks are committed together (`commit`). Every decision that must hold
//! across instances is made under the session's row lock in the index (`index`).

mod commit;
pub mod index;
pub mod retention;

use crate::config::{Config, Storage};
use crate::workflow::db::{Db, DbError, Tx, Value};
use crate::workflow::now;
use commit::Objects;
use index::Dialect;
use object_store::path::Path as ObjectPath;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::mpsc;
use usher_wire::chain;
use usher_wire::collector::{ChunkAccepted, ErrorCode, StreamStatus};
use usher_wire::meta::SessionMeta;
use usher_wire::seal::Seal;

/// A session's streams: `audit` always, `cast` for a terminal, `desktop` for an RDP
/// desktop (agent-rdp/README.md, "Recording format").
pub const STREAMS: [&str; 3] = ["audit", "cast", "desktop"];
pub const MAX_CHUNK: usize = 4 << 20;

/// The status of a session retention is deleting: no write lands in it any more.
const DELETING: &str = "deleting";

pub struct Store {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    objects: Objects,
    /// Writes (the group committer's transactions, leases).
    index: Db,
    /// Reads: a connection of their own, so that they never wait for a batch's commit.
    reader: Db,
    dialect: Dialect,
    /// One write per session at a time in this instance: an optimisation (a session's
    /// chunks reach the index in order, without refusals); across instances the index's
    /// row lock decides.
    session_locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// The group committer, started on the first chunk (it needs the runtime).
    queue: OnceLock<commit::Queue>,
    events: mpsc::UnboundedSender<StoreEvent>,
    events_out: Mutex<Option<mpsc::UnboundedReceiver<StoreEvent>>>,
    /// This instance's name in leases (the retention sweep's).
    instance: String,
}

/// Something the audit log must say (the workflow's `audit` table, through
/// [`forward_events`]): `session_flagged`, `recording_deleted`.
#[derive(Debug, Clone, PartialEq)]
pub struct StoreEvent {
    pub event: &'static str,
    /// Who did it: a writer (`host … (token …, from …)`) or `retention`.
    pub actor: String,
    pub detail: serde_json::Value,
}

/// A session's turn to write; its lock leaves the map when nobody else wants it, so the
/// map holds only the sessions being written to.
struct SessionTurn<'a> {
    inner: &'a Inner,
    id: String,
    lock: Arc<tokio::sync::Mutex<()>>,
    guard: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Drop for SessionTurn<'_> {
    fn drop(&mut self) {
        self.guard.take();
        let mut map = self
            .inner
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
    /// The chain does not hold, or the seal does not match: the session is flagged (when
    /// the write verifiably came from its host).
    #[error("tampered: {0}")]
    Tampered(String),
    /// A chunk number past the stored end of its stream.
    #[error("gap")]
    Gap { next_seq: u64 },
    /// A chunk number already taken (with other content), or any chunk once the session
    /// is sealed: the session is flagged (when the write is the host's).
    #[error("tampered: {why}")]
    Rewritten { why: String, next_seq: u64 },
    /// Metadata other than the sealed one, after the seal (409 `tampered`): the session
    /// is flagged (when the write is the host's).
    #[error("tampered: {0}")]
    AfterSeal(String),
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
            Refused::Tampered(_) | Refused::Rewritten { .. } | Refused::AfterSeal(_) => {
                ErrorCode::Tampered
            }
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

impl From<DbError> for Refused {
    fn from(e: DbError) -> Refused {
        Refused::Internal(format!("index: {e}"))
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
    Index(#[from] DbError),
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
    /// Under legal hold: retention keeps it.
    pub hold: bool,
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

/// A stream as a reader gets it ([`Store::stream`]).
pub struct StoredStream<S> {
    /// The session's status when the read began (`live`: more may come).
    pub status: String,
    /// Chunks stored: where the next read resumes.
    pub next: u64,
    pub chunks: S,
}

/// One page of a search: newest first; `next_cursor` asks for the next page.
#[derive(Debug, Serialize)]
pub struct Page {
    pub sessions: Vec<SessionRow>,
    pub next_cursor: Option<String>,
}

/// A page's size when the request names none, and the most one may ask for.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 500;

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

impl Encoding {
    /// The index's `encoding` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Identity => "identity",
            Encoding::Zstd => "zstd",
        }
    }

    fn from_column(text: Option<&str>) -> Result<Encoding, Refused> {
        match text {
            None | Some("identity") => Ok(Encoding::Identity),
            Some("zstd") => Ok(Encoding::Zstd),
            Some(other) => Err(Refused::Internal(format!(
                "a chunk stored in an unknown encoding {other:?}"
            ))),
        }
    }
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

/// A stored chunk's bytes as recorded: decoded by the same function as on the way in
/// (`encoding::decode`, capped at `MAX_CHUNK`).
pub fn decode_stored(encoding: Encoding, stored: bytes::Bytes) -> Result<bytes::Bytes, Refused> {
    let header = match encoding {
        Encoding::Identity => None,
        Encoding::Zstd => Some("zstd"),
    };
    crate::encoding::decode(header, stored, MAX_CHUNK)
        .map(|(raw, _)| raw)
        .map_err(|e| Refused::Internal(format!("a stored chunk does not decode: {e}")))
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

/// Flags session `id` in the transaction `tx` if `writer` verifiably is its host (a
/// signed write); otherwise only says so in the log: a token alone cannot mark a recording
/// as tampered.
fn flag_in(
    tx: &mut dyn Tx,
    id: &str,
    problem: &str,
    writer: &Writer,
    events: &mut Vec<StoreEvent>,
) -> Result<(), Refused> {
    if !writer.signed {
        log::warn!(target: "usher", "session {id}: refused an unsigned write from {writer}: {problem} (not flagged)");
        return Ok(());
    }
    log::warn!(target: "usher", "session {id} flagged: {problem} (write from {writer})");
    index::flag(tx, id, problem, &writer.to_string())?;
    events.push(StoreEvent {
        event: "session_flagged",
        actor: writer.to_string(),
        detail: serde_json::json!({
            "session": id, "problem": problem, "host": writer.host,
            "token": writer.token_id, "addr": writer.addr.map(|a| a.to_string()),
        }),
    });
    Ok(())
}

impl Inner {
    fn emit(&self, event: StoreEvent) {
        let _ = self.events.send(event);
    }
}

impl Store {
    pub fn open(config: &Config) -> Result<Store, OpenError> {
        let create = |path: PathBuf| {
            std::fs::create_dir_all(&path).map_err(|source| OpenError::Directory { path, source })
        };
        create(config.data_dir.clone())?;
        let objects = match &config.storage {
            Storage::Local => {
                let root = config.data_dir.join("objects");
                create(root.clone())?;
                let store: Arc<dyn object_store::ObjectStore> = Arc::new(
                    object_store::local::LocalFileSystem::new_with_prefix(&root)?,
                );
                Objects::Local { store, root }
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
                Objects::S3(Arc::new(b.build()?))
            }
        };
        // PostgreSQL's blocking client runs a runtime of its own, which must not start on
        // an async thread (the service opens the store from one).
        let (index, reader, dialect) = std::thread::scope(|scope| {
            scope
                .spawn(|| index::open(&config.index, &config.data_dir))
                .join()
                .unwrap_or_else(|_| Err(DbError::Join("opening the index panicked".into())))
        })?;
        let (events, events_out) = mpsc::unbounded_channel();
        let inner = Arc::new(Inner {
            objects,
            index,
            reader,
            dialect,
            session_locks: Mutex::new(HashMap::new()),
            queue: OnceLock::new(),
            events,
            events_out: Mutex::new(Some(events_out)),
            instance: format!(
                "{}-{}-{:08x}",
                std::fs::read_to_string("/proc/sys/kernel/hostname")
                    .unwrap_or_default()
                    .trim(),
                std::process::id(),
                rand::random::<u32>()
            ),
        });
        if let (Some(days), Ok(_)) = (
            config.retention.max_age_days,
            tokio::runtime::Handle::try_current(),
        ) {
            retention::start(
                &inner,
                days,
                std::time::Duration::from_secs(config.retention.sweep_secs),
            );
        }
        Ok(Store { inner })
    }

    /// The audit events the store raises (flags, deletions), once: whoever takes them
    /// records them ([`forward_events`]). Until taken they wait in memory.
    pub fn take_events(&self) -> Option<mpsc::UnboundedReceiver<StoreEvent>> {
        self.inner
            .events_out
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Waits for this session's turn: one write per session at a time in this instance.
    async fn session_turn(&self, id: &str) -> SessionTurn<'_> {
        let lock = self
            .inner
            .session_locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let guard = lock.clone().lock_owned().await;
        SessionTurn {
            inner: &self.inner,
            id: id.to_string(),
            lock,
            guard: Some(guard),
        }
    }

    /// A write through the group committer: `objects` are made durable with the batch's,
    /// then `decide` runs in the batch's transaction (under the locks it takes); its own
    /// `Err` refuses this write (after committing what it wrote, e.g. a flag), the outer
    /// one fails the batch.
    async fn commit<T: Send + 'static>(
        &self,
        session: &str,
        objects: Vec<(ObjectPath, bytes::Bytes)>,
        mut decide: impl FnMut(&mut dyn Tx, &mut Vec<StoreEvent>) -> Result<Result<T, Refused>, Refused>
            + Send
            + 'static,
    ) -> Result<T, Refused> {
        type Slot<T> = Arc<Mutex<Option<tokio::sync::oneshot::Sender<Result<T, Refused>>>>>;
        let (sender, answer) = tokio::sync::oneshot::channel();
        let slot: Slot<T> = Arc::new(Mutex::new(Some(sender)));
        let for_failure = slot.clone();
        let job = commit::Job {
            session: session.to_string(),
            objects,
            decide: Box::new(move |tx, events| {
                let outcome = decide(tx, events)?;
                let slot = slot.clone();
                Ok(Box::new(move || {
                    if let Some(s) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() {
                        let _ = s.send(outcome);
                    }
                }) as commit::Answer)
            }),
            fail: Box::new(move |why| {
                if let Some(s) = for_failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
                    let _ = s.send(Err(why));
                }
            }),
        };
        let queue = self.inner.queue.get_or_init(|| commit::start(&self.inner));
        queue
            .send(job)
            .map_err(|_| internal("the committer stopped"))?;
        answer
            .await
            .map_err(|_| internal("the committer dropped a write"))?
    }

    /// A read on the readers' connection, for the synchronous read API: with PostgreSQL
    /// on a thread of its own (its blocking client must not run on an async thread).
    fn read<T: Send>(
        &self,
        work: impl FnMut(&mut dyn Tx) -> Result<T, Refused> + Send,
    ) -> Result<T, Refused> {
        if !self.inner.dialect.postgres {
            return self.inner.reader.transaction_blocking(work);
        }
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.inner.reader.transaction_blocking(work))
                .join()
                .unwrap_or_else(|_| Err(internal("an index read panicked")))
        })
    }

    /// What `host` has stored of one of its sessions' streams; another host's session is
    /// refused (an unknown session is at its start).
    pub fn stream_status_for(
        &self,
        host: &str,
        id: &str,
        stream: &str,
    ) -> Result<StreamStatus, Refused> {
        let (id, stream, host) = (id.to_string(), stream.to_string(), host.to_string());
        self.read(|tx| {
            if index::owner(tx, &id)?.is_some_and(|h| h != host) {
                return Err(Refused::Forbidden(format!(
                    "session {id} belongs to another host"
                )));
            }
            stream_status(tx, &id, &stream)
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
        let _turn = self.session_turn(id).await;
        let ChunkBody {
            raw,
            encoded,
            encoding,
        } = chunk;
        let size = raw.len();
        let is_audit = stream == "audit";
        let (prev_owned, hash_owned) = (prev.to_string(), hash.to_string());
        // Hashing a large chunk is CPU work: off the async threads.
        let check = move || {
            let link_ok = chain::next(&prev_owned, &raw).is_ok_and(|link| link == hash_owned);
            let commands = if link_ok && is_audit {
                index::commands_of(&raw)
            } else {
                Vec::new()
            };
            (link_ok, commands, prev_owned, hash_owned)
        };
        let (link_ok, commands, prev, hash) = if size > 256 << 10 {
            tokio::task::spawn_blocking(check).await.map_err(internal)?
        } else {
            check()
        };
        let object = commit::chunk_path(id, stream, seq, &hash, encoding);
        let write = commit::ChunkWrite {
            writer: writer.clone(),
            id: id.to_string(),
            stream: stream.to_string(),
            seq,
            prev,
            hash,
            link_ok,
            encoding,
            size,
            commands,
            object: object.to_string(),
        };
        // A body that does not match its link is never stored (the index refuses it).
        let objects = if link_ok {
            vec![(object, encoded)]
        } else {
            Vec::new()
        };
        let dialect = self.inner.dialect;
        self.commit(id, objects, move |tx, events| {
            commit::decide_chunk(tx, dialect, &write, now(), events)
        })
        .await
    }

    /// `body` is the metadata as sent: its SHA-256 is what the seal names. After the seal,
    /// the same metadata again is accepted (an agent retrying), other metadata refused.
    pub async fn put_meta(
        &self,
        writer: &Writer,
        id: &str,
        received: ReceivedMeta,
        body: &[u8],
    ) -> Result<(), Refused> {
        let meta = &received.meta;
        if meta.host != writer.host {
            return Err(Refused::Forbidden("the metadata names another host".into()));
        }
        if meta.session_id != id {
            return Err(Refused::BadRequest(
                "the metadata names another session".into(),
            ));
        }
        let _turn = self.session_turn(id).await;
        let body_hash = usher_wire::collector::sha256_hex(body);
        let text = serde_json::to_string(&received).map_err(internal)?;
        // A copy beside the recording, named after its content (the index's row is what
        // counts): other metadata never overwrites it.
        let copy = (
            ObjectPath::from(format!("sessions/{id}/meta.{body_hash}.json")),
            bytes::Bytes::from(text.clone().into_bytes()),
        );
        let (dialect, writer, id) = (self.inner.dialect, writer.clone(), id.to_string());
        let (login, sub, started, ended) = (
            meta.login.clone(),
            meta.grant.sub.clone(),
            meta.started_at.clone(),
            meta.ended_at.clone(),
        );
        self.commit(&id.clone(), vec![copy], move |tx, events| {
            let session = index::lock_session(tx, dialect, &id, &writer.host, now())?;
            if let Some(refused) = session.refuses(&id, &writer.host) {
                return Ok(Err(refused));
            }
            if session.sealed {
                if session.meta_hash.as_deref() == Some(body_hash.as_str()) {
                    return Ok(Ok(()));
                }
                let why = "metadata other than the sealed one, after the seal".to_string();
                flag_in(tx, &id, &why, &writer, events)?;
                return Ok(Err(Refused::AfterSeal(why)));
            }
            tx.execute(
                "UPDATE sessions SET login = $1, sub = $2, started_at = $3, sort_key = $3, ended_at = $4, meta = $5, meta_hash = $6 WHERE id = $7",
                &[
                    login.clone().into(),
                    sub.clone().into(),
                    started.clone().into(),
                    ended.clone().into(),
                    text.clone().into(),
                    body_hash.clone().into(),
                    id.clone().into(),
                ],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    /// Verifies the host's signature over the streams' lengths and last hashes and the
    /// metadata's hash, that the stored chains end exactly there and the stored metadata
    /// is the one named; then marks the session sealed, once across instances.
    pub async fn seal(
        &self,
        writer: &Writer,
        key: &ed25519_dalek::VerifyingKey,
        id: &str,
        seal: &Seal,
    ) -> Result<(), Refused> {
        for name in seal.streams.keys() {
            if !STREAMS.contains(&name.as_str()) {
                return Err(Refused::BadRequest(format!("unknown stream {name}")));
            }
        }
        let Some(sealed_meta) = seal.meta.clone() else {
            return Err(Refused::BadRequest(
                "the seal must cover the metadata (usher-seal-v2)".into(),
            ));
        };
        let _turn = self.session_turn(id).await;
        let signature = seal.verify(id, key).map_err(|e| e.to_string());
        let seal_text = serde_json::to_string(seal).map_err(internal)?;
        // A seal the host's key signed is the host's word, whatever carried it: it may flag
        // the session when the stored recording does not match it. One that does not
        // verify flags only if the request itself was signed.
        let writer = Writer {
            signed: writer.signed || signature.is_ok(),
            ..writer.clone()
        };
        let (dialect, writer, id_owned, seal_owned) =
            (self.inner.dialect, writer, id.to_string(), seal.clone());
        let text = seal_text.clone();
        self.commit(id, Vec::new(), move |tx, events| {
            let id = id_owned.as_str();
            let session = index::lock_session(tx, dialect, id, &writer.host, now())?;
            if let Some(refused) = session.refuses(id, &writer.host) {
                return Ok(Err(refused));
            }
            let mut refuse = |tx: &mut dyn Tx, why: String| -> Result<Result<(), Refused>, Refused> {
                flag_in(tx, id, &why, &writer, events)?;
                Ok(Err(Refused::Tampered(why)))
            };
            for (name, end) in &seal_owned.streams {
                let have = stream_status(tx, id, name)?;
                if have.next_seq != end.chunks || have.last_hash != end.last_hash {
                    let why = format!(
                        "sealed {name} has {} chunks ending {}; stored: {} ending {}",
                        end.chunks, end.last_hash, have.next_seq, have.last_hash
                    );
                    return refuse(tx, why);
                }
            }
            // Every stream the collector holds must be under the signature.
            for name in STREAMS {
                if !seal_owned.streams.contains_key(name)
                    && stream_status(tx, id, name)?.next_seq > 0
                {
                    return refuse(tx, format!("the seal leaves out the {name} stream"));
                }
            }
            if let Err(e) = &signature {
                return refuse(tx, e.clone());
            }
            if session.meta_hash.as_deref() != Some(sealed_meta.as_str()) {
                let why = match &session.meta_hash {
                    Some(stored) => format!(
                        "the seal names metadata {sealed_meta}; stored: {stored}"
                    ),
                    None => format!("the seal names metadata {sealed_meta}; none is stored"),
                };
                return refuse(tx, why);
            }
            // Once across instances: only the first seal sets it (under the row lock).
            tx.execute(
                "UPDATE sessions SET sealed_at = $1, seal = $2, status = CASE WHEN status = 'live' THEN 'complete' ELSE status END
                 WHERE id = $3 AND sealed_at IS NULL",
                &[now().into(), text.clone().into(), id.into()],
            )?;
            Ok(Ok(()))
        })
        .await?;
        // A copy beside the recording: the index's row holds the seal durably.
        self.inner
            .objects
            .store()
            .put(
                &ObjectPath::from(format!("sessions/{id}/seal.json")),
                object_store::PutPayload::from(seal_text.into_bytes()),
            )
            .await
            .map_err(internal)?;
        Ok(())
    }

    /// Sessions matching `q`, newest first (by start, then id), at most `limit` of them
    /// (clamped to 1..=`MAX_PAGE`), from `cursor` (a previous page's `next_cursor`) on.
    pub fn search(&self, q: &Search, limit: usize, cursor: Option<&str>) -> Result<Page, Refused> {
        let limit = limit.clamp(1, MAX_PAGE);
        let after = cursor.map(parse_cursor).transpose()?;
        let f = self.inner.dialect.substring_fn();
        let sql = format!(
            "SELECT s.id, s.host, s.login, s.sub, s.started_at, s.ended_at, s.status, s.problem,
                    (SELECT count(*) FROM commands c WHERE c.session = s.id),
                    CASE WHEN EXISTS (SELECT 1 FROM chunks k WHERE k.session = s.id AND k.stream = 'desktop') THEN 1 ELSE 0 END,
                    s.hold, s.sort_key
             FROM sessions s
             WHERE (CAST($1 AS TEXT) IS NULL OR s.sub = $1) AND (CAST($2 AS TEXT) IS NULL OR s.host = $2)
               AND (CAST($3 AS TEXT) IS NULL OR s.login = $3)
               AND (CAST($4 AS TEXT) IS NULL OR s.started_at >= $4) AND (CAST($5 AS TEXT) IS NULL OR s.started_at <= $5)
               AND (CAST($6 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM commands c WHERE c.session = s.id
                    AND ({f}(c.path, $6) > 0 OR {f}(c.argv, $6) > 0)))
               AND (CAST($7 AS TEXT) IS NULL OR EXISTS (SELECT 1 FROM chunks k WHERE k.session = s.id AND k.stream = $7))
               AND (CAST($8 AS TEXT) IS NULL OR s.sort_key < $8 OR (s.sort_key = $8 AND s.id < $9))
               AND s.status <> '{DELETING}'
             ORDER BY s.sort_key DESC, s.id DESC LIMIT $10"
        );
        let params: Vec<Value> = vec![
            q.sub.clone().into(),
            q.host.clone().into(),
            q.login.clone().into(),
            q.from.clone().into(),
            q.to.clone().into(),
            q.command.clone().into(),
            q.recording.clone().into(),
            after.as_ref().map(|(k, _)| k.clone()).into(),
            after
                .as_ref()
                .map(|(_, id)| id.clone())
                .unwrap_or_default()
                .into(),
            (limit as i64 + 1).into(),
        ];
        let rows = self.read(|tx| Ok(tx.query(&sql, &params)?))?;
        let mut sessions = Vec::with_capacity(rows.len().min(limit));
        let mut next_cursor = None;
        for (i, r) in rows.iter().enumerate() {
            if i == limit {
                let last = &rows[i - 1];
                next_cursor = Some(make_cursor(
                    last[11].text().unwrap_or_default(),
                    last[0].text().unwrap_or_default(),
                ));
                break;
            }
            let text = |i: usize| r[i].text().map(String::from);
            sessions.push(SessionRow {
                id: text(0).unwrap_or_default(),
                host: text(1).unwrap_or_default(),
                login: text(2),
                sub: text(3),
                started_at: text(4),
                ended_at: text(5),
                status: text(6).unwrap_or_default(),
                problem: text(7),
                commands: r[8].int().unwrap_or(0).max(0) as u64,
                desktop: r[9].int().unwrap_or(0) != 0,
                hold: r[10].int().unwrap_or(0) != 0,
            });
        }
        Ok(Page {
            sessions,
            next_cursor,
        })
    }

    pub fn session(&self, id: &str) -> Result<serde_json::Value, Refused> {
        let id = id.to_string();
        self.read(|tx| {
            let rows = tx.query(
                "SELECT host, status, problem, meta, flagged_by, sealed_at, hold, hold_reason, hold_by, hold_at
                 FROM sessions WHERE id = $1",
                &[id.clone().into()],
            )?;
            let Some(row) = rows.first() else {
                return Err(Refused::NotFound(format!("no session {id}")));
            };
            let commands: Vec<serde_json::Value> = tx
                .query(
                    "SELECT time, path, argv, verdict, rule FROM commands WHERE session = $1 ORDER BY time",
                    &[id.clone().into()],
                )?
                .iter()
                .map(|r| {
                    serde_json::json!({
                        "time": r[0].real(), "path": r[1].text(), "argv": r[2].text(),
                        "verdict": r[3].text(), "rule": r[4].text(),
                    })
                })
                .collect();
            let streams: Vec<String> = tx
                .query(
                    "SELECT DISTINCT stream FROM chunks WHERE session = $1 ORDER BY stream",
                    &[id.clone().into()],
                )?
                .iter()
                .filter_map(|r| r[0].text().map(String::from))
                .collect();
            let meta = row[3].text().map(read_stored_meta).unwrap_or_default();
            let hold = (row[6].int().unwrap_or(0) != 0).then(|| {
                serde_json::json!({"reason": row[7].text(), "by": row[8].text(), "at": row[9].int()})
            });
            Ok(serde_json::json!({
                "id": id, "host": row[0].text(), "status": row[1].text(), "problem": row[2].text(),
                "flagged_by": row[4].text(), "sealed_at": row[5].int(), "hold": hold,
                "meta": meta, "commands": commands, "streams": streams,
            }))
        })
    }

    /// A stream as stored from chunk `from` on: its chunks, decoded, in order, one at a
    /// time (a desktop recording can be far larger than an answer should hold in memory),
    /// and the number of chunks stored (where a later read resumes). The session's status
    /// is read first: when it says the session is over, the chunks counted after it are
    /// all there are.
    pub fn stream(
        &self,
        id: &str,
        stream: &str,
        from: u64,
    ) -> Result<
        StoredStream<impl futures::Stream<Item = Result<bytes::Bytes, Refused>> + Send + 'static>,
        Refused,
    > {
        use futures::StreamExt;
        let (id, stream) = (id.to_string(), stream.to_string());
        let (status, next, chunks) = self.read(|tx| {
            let status = tx
                .query("SELECT status FROM sessions WHERE id = $1", &[id.clone().into()])?
                .first()
                .map(|r| r[0].text().unwrap_or_default().to_string())
                .ok_or_else(|| Refused::NotFound(format!("no session {id}")))?;
            let next = stream_status(tx, &id, &stream)?.next_seq;
            let rows = tx.query(
                "SELECT seq, object, encoding FROM chunks WHERE session = $1 AND stream = $2 AND seq >= $3 ORDER BY seq",
                &[id.clone().into(), stream.clone().into(), (from.min(next) as i64).into()],
            )?;
            let mut chunks = Vec::with_capacity(rows.len());
            for r in &rows {
                let seq = r[0].int().unwrap_or(0) as u64;
                let path = match r[1].text() {
                    Some(object) => ObjectPath::from(object),
                    None => commit::legacy_chunk_path(&id, &stream, seq),
                };
                chunks.push((path, Encoding::from_column(r[2].text())?));
            }
            Ok::<_, Refused>((status, next, chunks))
        })?;
        let objects = self.inner.objects.store().clone();
        Ok(StoredStream {
            status,
            next,
            chunks: futures::stream::iter(chunks).then(move |(path, encoding)| {
                let objects = objects.clone();
                async move {
                    let stored = objects
                        .get(&path)
                        .await
                        .map_err(internal)?
                        .bytes()
                        .await
                        .map_err(internal)?;
                    decode_stored(encoding, stored)
                }
            }),
        })
    }

    /// Puts session `id` under legal hold: retention keeps it until the hold is lifted.
    pub async fn set_hold(&self, id: &str, by: &str, reason: &str) -> Result<(), Refused> {
        let (id, by, reason) = (id.to_string(), by.to_string(), reason.to_string());
        let dialect = self.inner.dialect;
        self.commit(&id.clone(), Vec::new(), move |tx, _| {
            let status = tx.query(
                &format!("SELECT status FROM sessions WHERE id = $1{}", dialect.for_update()),
                &[id.clone().into()],
            )?;
            match status.first().and_then(|r| r[0].text()) {
                None => return Ok(Err(Refused::NotFound(format!("no session {id}")))),
                Some(DELETING) => {
                    return Ok(Err(Refused::Forbidden(format!(
                        "session {id} is already being deleted (retention)"
                    ))))
                }
                Some(_) => {}
            }
            tx.execute(
                "UPDATE sessions SET hold = 1, hold_reason = $1, hold_by = $2, hold_at = $3 WHERE id = $4",
                &[reason.clone().into(), by.clone().into(), now().into(), id.clone().into()],
            )?;
            Ok(Ok(()))
        })
        .await
    }

    /// Lifts session `id`'s legal hold (retention may delete it at its next sweep).
    pub async fn lift_hold(&self, id: &str) -> Result<(), Refused> {
        let id = id.to_string();
        self.commit(&id.clone(), Vec::new(), move |tx, _| {
            let n = tx.execute(
                "UPDATE sessions SET hold = 0, hold_reason = NULL, hold_by = NULL, hold_at = NULL WHERE id = $1",
                &[id.clone().into()],
            )?;
            if n == 0 {
                return Ok(Err(Refused::NotFound(format!("no session {id}"))));
            }
            Ok(Ok(()))
        })
        .await
    }

    /// One retention sweep now (what the background sweep does every `sweep_secs`):
    /// deletes the sessions older than `max_age_days` and not under hold, if no other
    /// instance is sweeping; the ids deleted.
    pub async fn sweep(&self, max_age_days: u64) -> Result<Vec<String>, Refused> {
        retention::sweep(&self.inner, max_age_days, now()).await
    }
}

/// Where a stream's stored chain ends (the genesis for an empty stream).
fn stream_status(tx: &mut dyn Tx, id: &str, stream: &str) -> Result<StreamStatus, Refused> {
    Ok(match index::stream_end(tx, id, stream)? {
        Some((next_seq, last_hash)) => StreamStatus {
            next_seq,
            last_hash,
        },
        None => StreamStatus {
            next_seq: 0,
            last_hash: chain::genesis(id, stream),
        },
    })
}

/// A page's end as the next request names it: the last row's sort key (its start) and id.
fn make_cursor(started_at: &str, id: &str) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!("{started_at}\n{id}"))
}

fn parse_cursor(cursor: &str) -> Result<(String, String), Refused> {
    use base64::Engine;
    let bad = || Refused::BadRequest("the cursor is not one this service gave".into());
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (key, id) = text.split_once('\n').ok_or_else(bad)?;
    Ok((key.to_string(), id.to_string()))
}

/// Records the store's audit events (flags, deletions) in the workflow's audit log, as
/// they come; ends when the store is dropped.
pub fn forward_events(store: &Store, workflow: Arc<crate::workflow::Workflow>) {
    let Some(mut events) = store.take_events() else {
        return;
    };
    tokio::spawn(async move {
        while let Some(e) = events.recv().await {
            if let Err(err) = workflow
                .record(
                    e.event,
                    &e.actor,
                    None,
                    e.detail.clone(),
                    crate::workflow::now(),
                )
                .await
            {
                log::error!(target: "usher", "audit event {} not recorded: {err}", e.event);
            }
        }
    });
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
            addr: Some("127.0.0.1:4000".parse().unwrap()),
            signed: true,
        }
    }

    fn unsigned(host: &str) -> Writer {
        Writer {
            signed: false,
            ..writer(host)
        }
    }

    struct Scratch {
        store: Store,
        dir: PathBuf,
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    fn scratch_store(name: &str) -> Scratch {
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
        Scratch {
            store: Store::open(&config).unwrap(),
            dir,
        }
    }

    fn sql(store: &Store, statement: &str, params: Vec<Value>) -> Vec<crate::workflow::db::Row> {
        store
            .inner
            .index
            .transaction_blocking(|tx| tx.query(statement, &params))
            .unwrap()
    }

    fn exec(store: &Store, statement: &str, params: Vec<Value>) {
        store
            .inner
            .index
            .transaction_blocking(|tx| tx.execute(statement, &params))
            .unwrap();
    }

    /// Chunks of a stream with their chain links: `(prev, hash, body)`.
    fn chain_of(id: &str, stream: &str, bodies: &[&[u8]]) -> Vec<(String, String, bytes::Bytes)> {
        let mut prev = chain::genesis(id, stream);
        bodies
            .iter()
            .map(|b| {
                let hash = chain::next(&prev, b).unwrap();
                let link = (prev.clone(), hash.clone(), bytes::Bytes::copy_from_slice(b));
                prev = hash;
                link
            })
            .collect()
    }

    async fn put(
        store: &Store,
        w: &Writer,
        id: &str,
        stream: &str,
        seq: u64,
        link: &(String, String, bytes::Bytes),
    ) -> Result<ChunkAccepted, Refused> {
        store
            .put_chunk(
                w,
                id,
                stream,
                seq,
                &link.0,
                &link.1,
                ChunkBody::identity(link.2.clone()),
            )
            .await
    }

    async fn read_all(store: &Store, id: &str, stream: &str, from: u64) -> (u64, Vec<u8>) {
        use futures::StreamExt;
        let StoredStream { next, chunks, .. } = store.stream(id, stream, from).unwrap();
        let parts: Vec<_> = chunks.collect().await;
        let mut out = Vec::new();
        for p in parts {
            out.extend_from_slice(&p.unwrap());
        }
        (next, out)
    }

    fn meta_of(id: &str, host: &str) -> (ReceivedMeta, Vec<u8>) {
        let body = serde_json::to_vec(&older_form(id, host)).unwrap();
        (serde_json::from_slice(&body).unwrap(), body)
    }

    fn seal_for(
        id: &str,
        meta: Option<String>,
        ends: &[(&str, u64, &str)],
        key: &ed25519_dalek::SigningKey,
    ) -> Seal {
        let streams = ends
            .iter()
            .map(|(n, c, h)| {
                (
                    n.to_string(),
                    usher_wire::seal::StreamEnd {
                        chunks: *c,
                        last_hash: h.to_string(),
                    },
                )
            })
            .collect();
        Seal::sign(id, meta, streams, key)
    }

    fn drain(store: &Store, rx: &mut mpsc::UnboundedReceiver<StoreEvent>) -> Vec<StoreEvent> {
        let _ = store;
        let mut out = Vec::new();
        while let Ok(e) = rx.try_recv() {
            out.push(e);
        }
        out
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
        let s = scratch_store("older-row");
        // As an older collector wrote it: the metadata verbatim, no new columns set.
        exec(
            &s.store,
            "INSERT INTO sessions (id, host, login, meta) VALUES ($1, 'h', 'usher-zoe', $2)",
            vec!["old-1".into(), older_form("old-1", "h").to_string().into()],
        );
        let answer = s.store.session("old-1").unwrap();
        assert_eq!(answer["meta"]["grant"]["expires_at"], 1893456000);
        assert_eq!(answer["meta"]["grant"]["sub"], "zoe@example.org");
        assert_eq!(answer["meta"]["extra_field_kept"], "yes");
        assert_eq!(answer["hold"], serde_json::Value::Null);
    }

    #[tokio::test]
    async fn metadata_received_in_the_older_form_is_stored_and_indexed_typed() {
        let s = scratch_store("older-put");
        let (received, body) = meta_of("old-2", "h");
        s.store
            .put_meta(&writer("h"), "old-2", received, &body)
            .await
            .unwrap();
        let rows = sql(
            &s.store,
            "SELECT meta, meta_hash FROM sessions WHERE id = 'old-2'",
            vec![],
        );
        let stored: serde_json::Value = serde_json::from_str(rows[0][0].text().unwrap()).unwrap();
        assert_eq!(stored["grant"]["expires_at"], 1893456000);
        assert_eq!(stored["extra_field_kept"], "yes");
        assert_eq!(
            rows[0][1].text(),
            Some(usher_wire::collector::sha256_hex(&body).as_str()),
            "the hash is of the body as received"
        );
        let page = s
            .store
            .search(
                &Search {
                    sub: Some("zoe@example.org".into()),
                    ..Default::default()
                },
                DEFAULT_PAGE,
                None,
            )
            .unwrap();
        assert_eq!(page.sessions.len(), 1);
        assert_eq!(page.sessions[0].login.as_deref(), Some("usher-zoe"));
        assert!(page.next_cursor.is_none());
    }

    #[tokio::test]
    async fn metadata_naming_another_host_or_session_is_refused() {
        let s = scratch_store("wrong-owner");
        let (received, body) = meta_of("s", "h");
        assert!(matches!(
            s.store
                .put_meta(&writer("other"), "s", received.clone(), &body)
                .await,
            Err(Refused::Forbidden(_))
        ));
        assert!(matches!(
            s.store.put_meta(&writer("h"), "t", received, &body).await,
            Err(Refused::BadRequest(_))
        ));
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
        assert_eq!(Refused::AfterSeal("x".into()).code(), ErrorCode::Tampered);
        assert_eq!(Refused::AfterSeal("x".into()).next_seq(), None);
    }

    #[tokio::test]
    async fn chunks_chain_in_order_and_duplicates_gaps_and_other_hosts_are_told_apart() {
        let s = scratch_store("chain");
        let w = writer("h");
        let links = chain_of("c1", "cast", &[b"zero\n", b"one\n", b"two\n"]);
        let stored = put(&s.store, &w, "c1", "cast", 0, &links[0]).await.unwrap();
        assert_eq!((stored.stored, stored.next_seq), (true, Some(1)));
        let again = put(&s.store, &w, "c1", "cast", 0, &links[0]).await.unwrap();
        assert!(again.duplicate && !again.stored);
        assert!(matches!(
            put(&s.store, &w, "c1", "cast", 2, &links[2]).await,
            Err(Refused::Gap { next_seq: 1 })
        ));
        assert!(matches!(
            put(&s.store, &writer("other"), "c1", "cast", 1, &links[1]).await,
            Err(Refused::Forbidden(_))
        ));
        assert!(matches!(
            s.store.stream_status_for("other", "c1", "cast"),
            Err(Refused::Forbidden(_))
        ));
        put(&s.store, &w, "c1", "cast", 1, &links[1]).await.unwrap();
        put(&s.store, &w, "c1", "cast", 2, &links[2]).await.unwrap();
        let status = s.store.stream_status_for("h", "c1", "cast").unwrap();
        assert_eq!(
            (status.next_seq, status.last_hash.as_str()),
            (3, links[2].1.as_str())
        );
        assert_eq!(
            read_all(&s.store, "c1", "cast", 0).await,
            (3, b"zero\none\ntwo\n".to_vec())
        );
        assert_eq!(
            read_all(&s.store, "c1", "cast", 2).await,
            (3, b"two\n".to_vec())
        );
        assert_eq!(read_all(&s.store, "c1", "cast", 9).await, (3, Vec::new()));
        assert_eq!(s.store.session("c1").unwrap()["status"], "live");
    }

    #[tokio::test]
    async fn a_bad_chain_flags_only_when_the_write_is_signed_and_the_flag_names_the_writer() {
        let s = scratch_store("flags");
        let mut events = s.store.take_events().unwrap();
        let links = chain_of("f1", "cast", &[b"zero\n", b"one\n"]);
        let forged = (
            links[0].0.clone(),
            links[0].1.clone(),
            bytes::Bytes::from_static(b"evil\n"),
        );
        // Unsigned (a token without the host key): refused, and nothing is flagged.
        assert!(matches!(
            put(&s.store, &unsigned("h"), "f1", "cast", 0, &forged).await,
            Err(Refused::Tampered(_))
        ));
        assert_eq!(s.store.session("f1").unwrap()["status"], "live");
        assert!(drain(&s.store, &mut events).is_empty());
        // The same from the host: flagged, with who and from where.
        assert!(matches!(
            put(&s.store, &writer("h"), "f1", "cast", 0, &forged).await,
            Err(Refused::Tampered(_))
        ));
        let session = s.store.session("f1").unwrap();
        assert_eq!(session["status"], "tampered");
        assert!(session["problem"]
            .as_str()
            .unwrap()
            .contains("does not match its hash"));
        let by = session["flagged_by"].as_str().unwrap();
        assert!(
            by.contains(&Writer::token_id("t")) && by.contains("127.0.0.1:4000"),
            "{by}"
        );
        let heard = drain(&s.store, &mut events);
        assert_eq!(heard.len(), 1);
        assert_eq!(heard[0].event, "session_flagged");
        assert_eq!(heard[0].detail["session"], "f1");
        assert_eq!(heard[0].detail["token"], Writer::token_id("t"));

        // An old number with new content, unsigned: refused 409, not flagged.
        let s2 = scratch_store("flags-rewrite");
        let links = chain_of("f2", "cast", &[b"zero\n"]);
        put(&s2.store, &writer("h"), "f2", "cast", 0, &links[0])
            .await
            .unwrap();
        let rewrite = (
            links[0].0.clone(),
            chain::next(&links[0].0, b"other\n").unwrap(),
            bytes::Bytes::from_static(b"other\n"),
        );
        assert!(matches!(
            put(&s2.store, &unsigned("h"), "f2", "cast", 0, &rewrite).await,
            Err(Refused::Rewritten { next_seq: 1, .. })
        ));
        assert_eq!(s2.store.session("f2").unwrap()["status"], "live");
        assert!(matches!(
            put(&s2.store, &writer("h"), "f2", "cast", 0, &rewrite).await,
            Err(Refused::Rewritten { next_seq: 1, .. })
        ));
        assert_eq!(s2.store.session("f2").unwrap()["status"], "tampered");
    }

    #[tokio::test]
    async fn the_seal_covers_the_metadata_and_seals_once() {
        let s = scratch_store("seal");
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let w = writer("h");
        let (received, body) = meta_of("s1", "h");
        s.store
            .put_meta(&w, "s1", received.clone(), &body)
            .await
            .unwrap();
        let cast = chain_of("s1", "cast", &[b"a\n"]);
        let audit = chain_of("s1", "audit", &[b"{}\n"]);
        put(&s.store, &w, "s1", "cast", 0, &cast[0]).await.unwrap();
        put(&s.store, &w, "s1", "audit", 0, &audit[0])
            .await
            .unwrap();
        let ends = [
            ("audit", 1, audit[0].1.as_str()),
            ("cast", 1, cast[0].1.as_str()),
        ];
        let meta_hash = usher_wire::collector::sha256_hex(&body);
        // The older seal, without the metadata: 400, not a flag.
        let v1 = seal_for("s1", None, &ends, &key);
        assert!(matches!(
            s.store.seal(&w, &key.verifying_key(), "s1", &v1).await,
            Err(Refused::BadRequest(_))
        ));
        assert_eq!(s.store.session("s1").unwrap()["status"], "live");
        // A seal the host did not sign, from a token alone: refused, not flagged.
        let stranger = ed25519_dalek::SigningKey::from_bytes(&[4; 32]);
        let other = seal_for("s1", Some("ab".repeat(32)), &ends, &stranger);
        assert!(matches!(
            s.store
                .seal(&unsigned("h"), &key.verifying_key(), "s1", &other)
                .await,
            Err(Refused::Tampered(_))
        ));
        assert_eq!(s.store.session("s1").unwrap()["status"], "live");
        let good = seal_for("s1", Some(meta_hash.clone()), &ends, &key);
        s.store
            .seal(&w, &key.verifying_key(), "s1", &good)
            .await
            .unwrap();
        let sealed_at = s.store.session("s1").unwrap()["sealed_at"].clone();
        assert!(sealed_at.is_i64());
        // Again (a retry): 200, sealed once.
        s.store
            .seal(&w, &key.verifying_key(), "s1", &good)
            .await
            .unwrap();
        assert_eq!(s.store.session("s1").unwrap()["sealed_at"], sealed_at);
        assert_eq!(s.store.session("s1").unwrap()["status"], "complete");
        // The same metadata after the seal: accepted; other metadata: refused and flagged.
        s.store
            .put_meta(&w, "s1", received.clone(), &body)
            .await
            .unwrap();
        let mut changed = older_form("s1", "h");
        changed["login"] = "root".into();
        let changed_body = serde_json::to_vec(&changed).unwrap();
        let changed_meta: ReceivedMeta = serde_json::from_slice(&changed_body).unwrap();
        assert!(matches!(
            s.store
                .put_meta(&unsigned("h"), "s1", changed_meta.clone(), &changed_body)
                .await,
            Err(Refused::AfterSeal(_))
        ));
        assert_eq!(s.store.session("s1").unwrap()["status"], "complete");
        assert!(matches!(
            s.store
                .put_meta(&w, "s1", changed_meta, &changed_body)
                .await,
            Err(Refused::AfterSeal(_))
        ));
        let after = s.store.session("s1").unwrap();
        assert_eq!(after["status"], "tampered");
        assert_eq!(
            after["meta"]["login"], "usher-zoe",
            "the sealed metadata stays"
        );
        // A chunk after the seal is refused too.
        let more = chain_of("s1", "cast", &[b"a\n", b"b\n"]);
        assert!(matches!(
            put(&s.store, &w, "s1", "cast", 1, &more[1]).await,
            Err(Refused::Rewritten { .. })
        ));
    }

    #[tokio::test]
    async fn a_seal_whose_metadata_differs_from_the_stored_is_flagged() {
        let s = scratch_store("seal-meta");
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        let (received, body) = meta_of("s2", "h");
        s.store
            .put_meta(&writer("h"), "s2", received, &body)
            .await
            .unwrap();
        let audit = chain_of("s2", "audit", &[b"{}\n"]);
        put(&s.store, &writer("h"), "s2", "audit", 0, &audit[0])
            .await
            .unwrap();
        let seal = seal_for(
            "s2",
            Some("cd".repeat(32)),
            &[("audit", 1, &audit[0].1)],
            &key,
        );
        assert!(matches!(
            s.store
                .seal(&writer("h"), &key.verifying_key(), "s2", &seal)
                .await,
            Err(Refused::Tampered(_))
        ));
        let session = s.store.session("s2").unwrap();
        assert_eq!(session["status"], "tampered");
        assert!(session["problem"].as_str().unwrap().contains("metadata"));
    }

    #[tokio::test]
    async fn zstd_chunks_are_stored_as_sent_and_read_decoded() {
        let s = scratch_store("zstd");
        let raw = b"[0.1,\"o\",\"hello\"]\n".repeat(200);
        let links = chain_of("z1", "cast", &[&raw]);
        let encoded = bytes::Bytes::from(zstd::bulk::compress(&raw, 1).unwrap());
        let body = ChunkBody {
            raw: bytes::Bytes::from(raw.clone()),
            encoded: encoded.clone(),
            encoding: Encoding::Zstd,
        };
        s.store
            .put_chunk(
                &writer("h"),
                "z1",
                "cast",
                0,
                &links[0].0,
                &links[0].1,
                body,
            )
            .await
            .unwrap();
        let rows = sql(
            &s.store,
            "SELECT encoding, object, size FROM chunks WHERE session = 'z1'",
            vec![],
        );
        assert_eq!(rows[0][0].text(), Some("zstd"));
        assert_eq!(rows[0][2].int(), Some(raw.len() as i64));
        let on_disk =
            std::fs::read(s.dir.join("objects").join(rows[0][1].text().unwrap())).unwrap();
        assert_eq!(on_disk, encoded.to_vec(), "kept as sent");
        assert_eq!(read_all(&s.store, "z1", "cast", 0).await.1, raw);
    }

    #[tokio::test]
    async fn chunks_stored_by_an_older_collector_are_read_where_it_put_them() {
        let s = scratch_store("legacy");
        let links = chain_of("old-c", "cast", &[b"before\n", b"after\n"]);
        // As an older collector left it: `<seq:010>`, no object or encoding in the row.
        let dir = s.dir.join("objects/sessions/old-c/cast");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0000000000"), b"before\n").unwrap();
        exec(
            &s.store,
            "INSERT INTO sessions (id, host) VALUES ('old-c', 'h')",
            vec![],
        );
        exec(
            &s.store,
            "INSERT INTO chunks (session, stream, seq, hash, size) VALUES ('old-c', 'cast', 0, $1, 7)",
            vec![links[0].1.clone().into()],
        );
        // The next chunk continues it, the new way.
        put(&s.store, &writer("h"), "old-c", "cast", 1, &links[1])
            .await
            .unwrap();
        assert_eq!(
            read_all(&s.store, "old-c", "cast", 0).await,
            (2, b"before\nafter\n".to_vec())
        );
    }

    #[tokio::test]
    async fn concurrent_writes_commit_together_in_order() {
        let s = std::sync::Arc::new(scratch_store("group"));
        let mut tasks = Vec::new();
        for n in 0..12 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("g{n}");
                let bodies: Vec<Vec<u8>> = (0..8)
                    .map(|i| format!("{id} line {i}\n").into_bytes())
                    .collect();
                let refs: Vec<&[u8]> = bodies.iter().map(|b| b.as_slice()).collect();
                let links = chain_of(&id, "cast", &refs);
                for (seq, link) in links.iter().enumerate() {
                    let a = put(&s.store, &writer("h"), &id, "cast", seq as u64, link)
                        .await
                        .unwrap();
                    assert!(a.stored);
                }
                (id, bodies.concat())
            }));
        }
        for t in tasks {
            let (id, whole) = t.await.unwrap();
            assert_eq!(read_all(&s.store, &id, "cast", 0).await, (8, whole));
        }
        let n = sql(&s.store, "SELECT count(*) FROM chunks", vec![]);
        assert_eq!(n[0][0].int(), Some(96));
    }

    #[tokio::test]
    async fn audit_chunks_index_their_commands() {
        let s = scratch_store("commands");
        let line = br#"{"event":"exec","exec":{"path":"/usr/bin/vim","argv":["vim","/etc/hosts"],"verdict":"allowed","time":1795000000.5}}
{"event":"other"}
"#;
        let links = chain_of("a1", "audit", &[line]);
        put(&s.store, &writer("h"), "a1", "audit", 0, &links[0])
            .await
            .unwrap();
        let session = s.store.session("a1").unwrap();
        assert_eq!(session["commands"][0]["path"], "/usr/bin/vim");
        assert_eq!(session["commands"][0]["argv"], "vim /etc/hosts");
        assert_eq!(session["commands"][0]["time"], 1795000000.5);
        let found = s
            .store
            .search(
                &Search {
                    command: Some("/etc/hosts".into()),
                    ..Default::default()
                },
                10,
                None,
            )
            .unwrap();
        assert_eq!(found.sessions.len(), 1);
        assert_eq!(found.sessions[0].commands, 1);
    }

    #[tokio::test]
    async fn search_pages_newest_first_without_repeats_or_gaps() {
        let s = scratch_store("pages");
        for n in 0..7 {
            let id = format!("p{n}");
            let mut meta = older_form(&id, "h");
            // Two share a start: the id orders them.
            meta["started_at"] = format!("2026-11-2{}T12:00:00Z", n.min(5)).into();
            let body = serde_json::to_vec(&meta).unwrap();
            s.store
                .put_meta(
                    &writer("h"),
                    &id,
                    serde_json::from_slice(&body).unwrap(),
                    &body,
                )
                .await
                .unwrap();
        }
        // One without metadata yet: last.
        let links = chain_of("p-bare", "audit", &[b"{}\n"]);
        put(&s.store, &writer("h"), "p-bare", "audit", 0, &links[0])
            .await
            .unwrap();
        let mut seen = Vec::new();
        let mut cursor = None;
        loop {
            let page = s
                .store
                .search(&Search::default(), 3, cursor.as_deref())
                .unwrap();
            assert!(page.sessions.len() <= 3);
            seen.extend(page.sessions.iter().map(|r| r.id.clone()));
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, ["p6", "p5", "p4", "p3", "p2", "p1", "p0", "p-bare"]);
        assert!(matches!(
            s.store.search(&Search::default(), 3, Some("!!")),
            Err(Refused::BadRequest(_))
        ));
    }

    #[tokio::test]
    async fn retention_deletes_old_sessions_but_not_held_ones_and_says_so() {
        let s = scratch_store("retention");
        let mut events = s.store.take_events().unwrap();
        let w = writer("h");
        for id in ["old-1", "old-2", "new-1"] {
            let mut meta = older_form(id, "h");
            if id.starts_with("new") {
                let recent = retention::rfc3339_utc(now() - 3600);
                meta["started_at"] = recent.clone().into();
                meta["ended_at"] = recent.into();
            }
            let body = serde_json::to_vec(&meta).unwrap();
            s.store
                .put_meta(&w, id, serde_json::from_slice(&body).unwrap(), &body)
                .await
                .unwrap();
            let links = chain_of(id, "cast", &[b"x\n"]);
            put(&s.store, &w, id, "cast", 0, &links[0]).await.unwrap();
        }
        assert!(matches!(
            s.store.set_hold("nope", "auditor", "case 7").await,
            Err(Refused::NotFound(_))
        ));
        s.store
            .set_hold("old-2", "auditor", "case 7")
            .await
            .unwrap();
        assert_eq!(
            s.store.session("old-2").unwrap()["hold"]["reason"],
            "case 7"
        );
        let deleted = s.store.sweep(7).await.unwrap();
        assert_eq!(deleted, ["old-1"]);
        assert!(matches!(
            s.store.session("old-1"),
            Err(Refused::NotFound(_))
        ));
        assert!(!s.dir.join("objects/sessions/old-1").exists());
        assert_eq!(
            sql(
                &s.store,
                "SELECT count(*) FROM chunks WHERE session = 'old-1'",
                vec![]
            )[0][0]
                .int(),
            Some(0)
        );
        assert!(s.dir.join("objects/sessions/old-2").exists());
        let heard = drain(&s.store, &mut events);
        assert_eq!(heard.len(), 1);
        assert_eq!(heard[0].event, "recording_deleted");
        assert_eq!(heard[0].detail["session"], "old-1");
        assert_eq!(heard[0].detail["bytes"], 2);
        // Lifted: gone at the next sweep; the recent one stays.
        s.store.lift_hold("old-2").await.unwrap();
        assert_eq!(s.store.sweep(7).await.unwrap(), ["old-2"]);
        assert_eq!(s.store.sweep(7).await.unwrap(), Vec::<String>::new());
        assert_eq!(s.store.session("new-1").unwrap()["status"], "live");
    }

    #[tokio::test]
    async fn one_sweeper_at_a_time() {
        let s = scratch_store("lease");
        let now = now();
        let taken = s
            .store
            .inner
            .index
            .transaction_blocking(|tx| {
                index::take_lease(tx, "retention", "other-instance", now, now + 300)
            })
            .unwrap();
        assert!(taken);
        let mut meta = older_form("l1", "h");
        meta["ended_at"] = "2000-01-01T00:00:00Z".into();
        let body = serde_json::to_vec(&meta).unwrap();
        s.store
            .put_meta(
                &writer("h"),
                "l1",
                serde_json::from_slice(&body).unwrap(),
                &body,
            )
            .await
            .unwrap();
        assert!(
            s.store.sweep(7).await.unwrap().is_empty(),
            "the other instance sweeps"
        );
        exec(&s.store, "UPDATE leases SET until = 0", vec![]);
        assert_eq!(s.store.sweep(7).await.unwrap(), ["l1"]);
    }
}
