//! Stage 6: shipping. Each session's streams (audit, and a terminal cast or a desktop
//! recording) leave the spool in chunks of whole lines, hash-chained, while the session is
//! live; a session is sealed with the host's key when it is over; its files leave the spool
//! only after the collector has acknowledged every chunk and the seal.
//!
//! Crash safety: a chunk is planned (its offset, length and hash written to the session's
//! `.ship.json`) before it is sent, so after a crash the same bytes are sent again under
//! the same sequence number, and the collector, which stores a chunk once, says so.
//! `state` holds those decisions; this module does the reading, writing and asking.

mod client;
mod state;

pub use client::{ChunkWrite, Client, ClientError, Collector, PutOutcome};
/// The chain's format lives in the wire crate; here for the agent's users of it.
pub use usher_wire::chain;

use crate::fsutil;
use bytes::Bytes;
use serde::Serialize;
pub use state::MAX_CHUNK;
use state::{Agreement, Diverged, PlanError, ShipState};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use usher_wire::collector::{chunk_signed_text, meta_signed_text, sha256_hex, sign_write};
use usher_wire::meta::SessionMeta;
use usher_wire::seal::Seal;

/// The streams of a session, by the collector's name and the spool file's suffix. A
/// session has the ones whose file exists (a desktop session a `desktop`, a terminal one a
/// `cast`).
pub const STREAMS: [(&str, &str); 3] = [
    ("audit", "audit.jsonl"),
    ("cast", "cast"),
    ("desktop", "desktop"),
];

/// Why a round of shipping stopped.
#[derive(Debug, thiserror::Error)]
pub enum ShipError {
    #[error(transparent)]
    Collector(#[from] ClientError),
    #[error("spool: {path}: {source}")]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not session metadata: {source}")]
    Meta {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("session {session} {stream}: spool state: {source}")]
    State {
        session: String,
        stream: String,
        source: chain::ChainError,
    },
    #[error("session {session} {stream}: collector out of step: it expects chunk {}", expected.map_or("another".to_string(), |n| n.to_string()))]
    OutOfStep {
        session: String,
        stream: String,
        expected: Option<u64>,
    },
    /// A line longer than a chunk can be (the collector refuses more than 4 MiB): it can
    /// never be sent, and a person decides (the writers refuse such lines, so a spool file
    /// was changed behind the agent's back). The session waits; the others ship.
    #[error("session {session} {stream}: a line at byte {offset} is longer than a chunk ({max} bytes); not sending until resolved")]
    LineTooLong {
        session: String,
        stream: String,
        offset: u64,
        max: usize,
    },
    #[error("session {session} {stream}: collector has {remote_chunks} chunks, this host {local_chunks}; not sending until resolved")]
    Diverged {
        session: String,
        stream: String,
        remote_chunks: u64,
        local_chunks: u64,
    },
}

impl ShipError {
    /// Whether the collector did not answer at all (`usher status` says unreachable).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ShipError::Collector(e) if e.is_unreachable())
    }

    fn spool(path: &Path) -> impl FnOnce(std::io::Error) -> ShipError + '_ {
        move |source| ShipError::Spool {
            path: path.to_owned(),
            source,
        }
    }
}

/// What `usher status` shows of shipping.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShipStatus {
    pub configured: bool,
    pub reachable: Option<bool>,
    pub backlog_sessions: usize,
    pub last_error: Option<String>,
}

pub struct Shipper<C: Collector = Client> {
    spool: PathBuf,
    client: C,
    signing: ed25519_dalek::SigningKey,
    /// A live session's tail goes in chunks of at most this.
    chunk_bytes: usize,
    /// A backlog goes in chunks of at most this ([`MAX_CHUNK`]; smaller in tests).
    backlog_chunk_bytes: usize,
    interval: Duration,
    status: std::sync::Mutex<ShipStatus>,
}

/// Live sessions are not sealed; the agent answers which ones are.
pub trait LiveSessions: Send + Sync {
    fn is_live(&self, session_id: &str) -> bool;
}

impl Shipper<Client> {
    pub fn new(
        config: &crate::config::CollectorConfig,
        spool: &Path,
        signing: ed25519_dalek::SigningKey,
    ) -> Result<Shipper<Client>, ClientError> {
        let mut shipper = Shipper::with_collector(
            Client::new(config)?,
            spool,
            signing,
            config.chunk_bytes,
            Duration::from_secs(config.interval_secs.max(1)),
        );
        shipper.backlog_chunk_bytes = config.backlog_chunk_bytes.clamp(1024, MAX_CHUNK);
        Ok(shipper)
    }
}

impl<C: Collector> Shipper<C> {
    pub fn with_collector(
        client: C,
        spool: &Path,
        signing: ed25519_dalek::SigningKey,
        chunk_bytes: usize,
        interval: Duration,
    ) -> Shipper<C> {
        Shipper {
            spool: spool.to_owned(),
            client,
            signing,
            chunk_bytes: chunk_bytes.clamp(1024, MAX_CHUNK),
            backlog_chunk_bytes: MAX_CHUNK,
            interval,
            status: std::sync::Mutex::new(ShipStatus {
                configured: true,
                ..Default::default()
            }),
        }
    }

    pub fn status(&self) -> ShipStatus {
        self.status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Ships forever: a round every interval, backing off while the collector fails.
    pub async fn run(self: Arc<Self>, live: Arc<dyn LiveSessions>) {
        let mut backoff = self.interval;
        let mut states: BTreeMap<String, ShipState> = BTreeMap::new();
        loop {
            let result = self.round(&mut states, &*live).await;
            {
                let mut st = self.status.lock().unwrap_or_else(|e| e.into_inner());
                match result {
                    Ok(backlog) => {
                        st.reachable = Some(true);
                        st.last_error = None;
                        st.backlog_sessions = backlog;
                        backoff = self.interval;
                    }
                    Err(e) => {
                        let text = e.to_string();
                        if st.last_error.as_deref() != Some(&text) {
                            log::warn!(target: "usher::ship", "shipping paused: {text}; retrying with backoff");
                        }
                        st.reachable = Some(!e.is_unreachable());
                        st.last_error = Some(text);
                        // Every synced flag is suspect after a failure: ask the collector again.
                        for s in states.values_mut() {
                            s.forget_agreement();
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// One pass over the spool. Returns how many sessions are still in it.
    async fn round(
        &self,
        states: &mut BTreeMap<String, ShipState>,
        live: &dyn LiveSessions,
    ) -> Result<usize, ShipError> {
        let ids = spooled_sessions(&self.spool);
        states.retain(|id, _| ids.contains(id));
        let mut remaining = 0;
        for id in &ids {
            let state = match states.get_mut(id) {
                Some(s) => s,
                None => {
                    let s = self.load_state(id);
                    states.entry(id.clone()).or_insert(s)
                }
            };
            let done = match self.ship_session(id, state, live.is_live(id)).await {
                Ok(done) => done,
                // One session's broken file must not hold up every other session.
                Err(e @ ShipError::LineTooLong { .. }) => {
                    if !std::mem::replace(&mut state.stuck, true) {
                        log::error!(target: "usher::ship", "{e}");
                    }
                    false
                }
                Err(e) => return Err(e),
            };
            if done {
                states.remove(id);
            } else {
                remaining += 1;
            }
        }
        Ok(remaining)
    }

    fn file(&self, id: &str, suffix: &str) -> PathBuf {
        self.spool.join(format!("{id}.{suffix}"))
    }

    fn load_state(&self, id: &str) -> ShipState {
        ShipState::from_saved(std::fs::read(self.file(id, "ship.json")).ok().as_deref())
    }

    fn save_state(&self, id: &str, state: &ShipState) -> Result<(), ShipError> {
        let path = self.file(id, "ship.json");
        let bytes = serde_json::to_vec(state).map_err(|e| ShipError::Spool {
            path: path.clone(),
            source: e.into(),
        })?;
        fsutil::write_atomic(&path, &bytes, 0o600).map_err(ShipError::spool(&path))
    }

    /// Ships what there is of one session; true once it is sealed and gone from the spool.
    async fn ship_session(
        &self,
        id: &str,
        state: &mut ShipState,
        live: bool,
    ) -> Result<bool, ShipError> {
        let mut fully_shipped = true;
        for (stream, suffix) in STREAMS {
            let path = self.file(id, suffix);
            if !path.exists() {
                continue;
            }
            self.ship_stream(id, stream, &path, state, live).await?;
            if !state.acknowledged_to(stream, file_len(&path)) {
                fully_shipped = false;
            }
        }

        let meta_path = self.file(id, "json");
        let meta = std::fs::read_to_string(&meta_path).map_err(ShipError::spool(&meta_path))?;
        let typed: SessionMeta = serde_json::from_str(&meta).map_err(|source| ShipError::Meta {
            path: meta_path.clone(),
            source,
        })?;
        // The seal names the metadata's hash, so what the collector holds must be this
        // file as it is now: sent again whenever it changed, and written down as sent only
        // once acknowledged. (A crash in between sends the same bytes again: the collector
        // answers 200 for metadata identical to what it holds, sealed or not.)
        if state.meta_sent.as_deref() != Some(&meta) {
            let hash = sha256_hex(meta.as_bytes());
            let signature = sign_write(&self.signing, &meta_signed_text(id, &hash));
            self.client
                .put_meta(id, meta.clone().into(), &hash, &signature)
                .await?;
            state.meta_sent = Some(meta.clone());
            self.save_state(id, state)?;
        }
        let ended = typed.ended_at.is_some();
        if !ended || live || !fully_shipped {
            return Ok(false);
        }
        let meta_hash = sha256_hex(meta.as_bytes());
        self.client
            .seal(
                id,
                &Seal::sign(id, Some(meta_hash), state.stream_ends(), &self.signing),
            )
            .await?;
        for (_, suffix) in STREAMS {
            let _ = std::fs::remove_file(self.file(id, suffix));
        }
        let _ = std::fs::remove_file(self.file(id, "ship.json"));
        let _ = std::fs::remove_file(&meta_path);
        log::info!(target: "usher::audit", usher_event = "session_shipped", session = id; "session {id} shipped and sealed; removed from the spool");
        Ok(true)
    }

    /// Sends every whole line of one stream that the collector does not have yet.
    async fn ship_stream(
        &self,
        id: &str,
        stream: &str,
        path: &Path,
        state: &mut ShipState,
        live: bool,
    ) -> Result<(), ShipError> {
        if !state.stream(id, stream).synced {
            let remote = self.client.stream_status(id, stream).await?;
            let agreed = state.stream(id, stream).agree_with(id, stream, &remote);
            match agreed {
                Ok(Agreement::InStep) => {}
                Ok(Agreement::FromTheStart) => {
                    log::warn!(target: "usher::ship", "session {id} {stream}: collector has nothing; re-sending from the start");
                }
                Err(Diverged {
                    remote_chunks,
                    local_chunks,
                }) => {
                    return Err(ShipError::Diverged {
                        session: id.into(),
                        stream: stream.into(),
                        remote_chunks,
                        local_chunks,
                    })
                }
            }
            self.save_state(id, state)?;
        }
        loop {
            let st = state.stream(id, stream);
            // The planned chunks' bytes, read once: the file from the first one's offset.
            let (base, bytes) = match (st.pending.first(), st.pending.last()) {
                (Some(first), Some(last)) => {
                    let (base, len) = (first.offset, (last.end() - first.offset) as usize);
                    let bytes = read_range(path, base, len)?;
                    // The file was cut behind the agent's back: what was planned is gone.
                    if bytes.len() != len {
                        return Err(ShipError::Spool {
                            path: path.to_owned(),
                            source: std::io::Error::new(
                                std::io::ErrorKind::UnexpectedEof,
                                "shorter than the chunks planned from it",
                            ),
                        });
                    }
                    (base, bytes)
                }
                _ => {
                    let Some(bytes) = self.cut(id, stream, path, st, live)? else {
                        return Ok(());
                    };
                    // Written down before they are sent: after a crash, the same bytes go
                    // again under the same numbers.
                    self.save_state(id, state)?;
                    (state.stream(id, stream).offset, bytes)
                }
            };
            let bytes = Bytes::from(bytes);
            for p in state.stream(id, stream).pending.clone() {
                let prev = state.stream(id, stream).last_hash.clone();
                let at = (p.offset - base) as usize;
                let body = bytes.slice(at..at + p.len as usize);
                let signature = sign_write(
                    &self.signing,
                    &chunk_signed_text(id, stream, p.seq, &prev, &p.hash),
                );
                let outcome = self
                    .client
                    .put_chunk(ChunkWrite {
                        session: id,
                        stream,
                        seq: p.seq,
                        prev: &prev,
                        hash: &p.hash,
                        signature: &signature,
                        body,
                    })
                    .await?;
                let st = state.stream(id, stream);
                match outcome {
                    // Not written down: a crash from here on finds the collector holding
                    // it when it asks (`agree_with`), or sends it again as a duplicate.
                    PutOutcome::Stored | PutOutcome::Duplicate => st.acknowledge(&p),
                    PutOutcome::OutOfStep { next_seq } => {
                        st.synced = false;
                        return Err(ShipError::OutOfStep {
                            session: id.into(),
                            stream: stream.into(),
                            expected: next_seq,
                        });
                    }
                }
            }
        }
    }

    /// Plans the next chunks of a stream's file (see [`state::StreamState::plan_chunks`])
    /// into `st.pending`, and returns the file's bytes from the acknowledged offset that
    /// they were cut from; made durable before they are written down as planned.
    ///
    /// Reads only what the chunks need. A live session's tail goes in chunks of
    /// `chunk_bytes` (a reviewer watching it sees it soon); a backlog (the session is
    /// over, or more than two chunks wait) in chunks of up to [`MAX_CHUNK`], several
    /// planned in one write of the state.
    fn cut(
        &self,
        id: &str,
        stream: &str,
        path: &Path,
        st: &mut state::StreamState,
        live: bool,
    ) -> Result<Option<Vec<u8>>, ShipError> {
        let len = file_len(path);
        if len <= st.offset {
            return Ok(None);
        }
        let waiting = len - st.offset;
        let backlog = !live || waiting > 2 * self.chunk_bytes as u64;
        let cutting = state::Cutting {
            chunk_bytes: match backlog {
                true => self.backlog_chunk_bytes.max(self.chunk_bytes),
                false => self.chunk_bytes,
            },
            max_chunks: PLAN_CHUNKS,
        };
        // Enough for the chunks planned, and more than a chunk can be, so that a line too
        // long for one is told from one not finished yet.
        let read = (PLAN_CHUNKS * cutting.chunk_bytes).max(MAX_CHUNK + 1);
        let unsent = read_range(path, st.offset, (waiting as usize).min(read))?;
        let planned = st.plan_chunks(&unsent, cutting).map_err(|e| match e {
            PlanError::LineTooLong => ShipError::LineTooLong {
                session: id.into(),
                stream: stream.into(),
                offset: st.offset,
                max: MAX_CHUNK,
            },
            PlanError::Chain(source) => ShipError::State {
                session: id.into(),
                stream: stream.into(),
                source,
            },
        })?;
        let Some(last) = planned.last() else {
            return Ok(None);
        };
        let used = (last.end() - st.offset) as usize;
        std::fs::File::open(path)
            .and_then(|f| f.sync_data())
            .map_err(ShipError::spool(path))?;
        st.pending = planned;
        let mut unsent = unsent;
        unsent.truncate(used);
        Ok(Some(unsent))
    }
}

/// Most chunks planned (read, hashed, written down with one write of the state) in one go:
/// a backlog's 16 MiB, or a live tail's few.
const PLAN_CHUNKS: usize = 4;

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_range(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, ShipError> {
    let mut f = std::fs::File::open(path).map_err(ShipError::spool(path))?;
    f.seek(SeekFrom::Start(offset))
        .map_err(ShipError::spool(path))?;
    // Not zeroed first: read into spare capacity.
    let mut buf = Vec::with_capacity(len);
    f.take(len as u64)
        .read_to_end(&mut buf)
        .map_err(ShipError::spool(path))?;
    Ok(buf)
}

/// Session ids with a metadata file in the spool, oldest first.
pub fn spooled_sessions(spool: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    let id = name.strip_suffix(".json")?;
                    (!id.ends_with(".ship") && !id.starts_with('.')).then(|| id.to_string())
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

/// Bytes in the spool (recordings not yet acknowledged by the collector).
pub fn spool_bytes(spool: &Path) -> u64 {
    std::fs::read_dir(spool)
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// The shipper against a collector held in memory, on a spool in a scratch directory: what
/// it sends, and how it resumes after a crash at each step. No root, no network.
#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    use usher_wire::collector::{verify_write, ErrorCode, StreamStatus};
    use usher_wire::meta::GrantInfo;

    /// A stream's chunks, each with its hash.
    type Chunks = Vec<(String, Vec<u8>)>;

    /// What a collector stores: each stream's chunks (by session and stream), metadata, seals.
    #[derive(Default)]
    struct Held {
        chunks: BTreeMap<(String, String), Chunks>,
        meta: BTreeMap<String, Vec<u8>>,
        seals: BTreeMap<String, Seal>,
    }

    /// A collector that checks what the real one checks, and can fail on request.
    struct Fake {
        held: Mutex<Held>,
        host_key: ed25519_dalek::VerifyingKey,
        /// Store the next chunk, then answer as if the connection dropped.
        lose_next_answer: AtomicBool,
        /// The next seal never arrives (the agent dies before sending it).
        lose_next_seal: AtomicBool,
        unreachable: AtomicBool,
        chunk_puts: AtomicUsize,
    }

    fn dropped() -> ClientError {
        ClientError::Transport("connection reset by peer".into())
    }

    fn refused(status: u16, code: ErrorCode, message: &str) -> ClientError {
        ClientError::Refused {
            status,
            code: Some(code),
            message: message.into(),
        }
    }

    impl Fake {
        fn new(host_key: ed25519_dalek::VerifyingKey) -> Arc<Fake> {
            Arc::new(Fake {
                held: Mutex::default(),
                host_key,
                lose_next_answer: AtomicBool::new(false),
                lose_next_seal: AtomicBool::new(false),
                unreachable: AtomicBool::new(false),
                chunk_puts: AtomicUsize::new(0),
            })
        }

        fn held(&self) -> std::sync::MutexGuard<'_, Held> {
            self.held.lock().unwrap()
        }

        fn status_of(&self, session: &str, stream: &str) -> StreamStatus {
            let held = self.held();
            let chunks = held.chunks.get(&(session.into(), stream.into()));
            StreamStatus {
                next_seq: chunks.map_or(0, |c| c.len() as u64),
                last_hash: chunks
                    .and_then(|c| c.last())
                    .map_or_else(|| chain::genesis(session, stream), |(h, _)| h.clone()),
            }
        }

        /// A stream as stored: its chunks, joined.
        fn stream(&self, session: &str, stream: &str) -> Vec<u8> {
            self.chunks(session, stream).concat()
        }

        fn chunks(&self, session: &str, stream: &str) -> Vec<Vec<u8>> {
            self.held()
                .chunks
                .get(&(session.into(), stream.into()))
                .map(|c| c.iter().map(|(_, b)| b.clone()).collect())
                .unwrap_or_default()
        }

        fn reachable(&self) -> Result<(), ClientError> {
            match self.unreachable.load(Ordering::SeqCst) {
                true => Err(dropped()),
                false => Ok(()),
            }
        }
    }

    impl Collector for Arc<Fake> {
        async fn stream_status(
            &self,
            session: &str,
            stream: &str,
        ) -> Result<StreamStatus, ClientError> {
            self.reachable()?;
            Ok(self.status_of(session, stream))
        }

        async fn put_chunk(&self, chunk: ChunkWrite<'_>) -> Result<PutOutcome, ClientError> {
            let ChunkWrite {
                session,
                stream,
                seq,
                prev,
                hash,
                signature,
                body,
            } = chunk;
            self.reachable()?;
            self.chunk_puts.fetch_add(1, Ordering::SeqCst);
            // Checked from the headers, before anything else (FLEET.md, "Signed writes").
            let signed = chunk_signed_text(session, stream, seq, prev, hash);
            verify_write(&self.host_key, &signed, signature)
                .map_err(|e| refused(403, ErrorCode::Forbidden, &e.to_string()))?;
            if body.len() > MAX_CHUNK {
                return Err(refused(413, ErrorCode::TooLarge, "over 4 MiB"));
            }
            let status = self.status_of(session, stream);
            let mut held = self.held();
            if held.seals.contains_key(session) {
                return Err(refused(409, ErrorCode::Tampered, "sealed"));
            }
            let chunks = held
                .chunks
                .entry((session.into(), stream.into()))
                .or_default();
            if seq < status.next_seq {
                return match chunks[seq as usize].0 == hash {
                    true => Ok(PutOutcome::Duplicate),
                    false => Err(refused(409, ErrorCode::Tampered, "tampered")),
                };
            }
            if seq > status.next_seq {
                return Ok(PutOutcome::OutOfStep {
                    next_seq: Some(status.next_seq),
                });
            }
            if prev != status.last_hash || chain::next(prev, &body).ok().as_deref() != Some(hash) {
                return Err(refused(422, ErrorCode::Tampered, "tampered"));
            }
            chunks.push((hash.to_string(), body.to_vec()));
            match self.lose_next_answer.swap(false, Ordering::SeqCst) {
                true => Err(dropped()),
                false => Ok(PutOutcome::Stored),
            }
        }

        async fn put_meta(
            &self,
            session: &str,
            meta: Bytes,
            hash: &str,
            signature: &str,
        ) -> Result<(), ClientError> {
            self.reachable()?;
            verify_write(&self.host_key, &meta_signed_text(session, hash), signature)
                .map_err(|e| refused(403, ErrorCode::Forbidden, &e.to_string()))?;
            if sha256_hex(&meta) != hash {
                return Err(refused(400, ErrorCode::BadRequest, "X-Usher-Hash"));
            }
            let mut held = self.held();
            if held.seals.contains_key(session)
                && held.meta.get(session).map(|m| &m[..]) != Some(&meta[..])
            {
                return Err(refused(409, ErrorCode::Tampered, "metadata after the seal"));
            }
            held.meta.insert(session.into(), meta.to_vec());
            Ok(())
        }

        async fn seal(&self, session: &str, seal: &Seal) -> Result<(), ClientError> {
            self.reachable()?;
            if self.lose_next_seal.swap(false, Ordering::SeqCst) {
                return Err(dropped());
            }
            seal.verify(session, &self.host_key)
                .map_err(|e| refused(422, ErrorCode::Tampered, &e.to_string()))?;
            // v2: the seal covers the metadata as stored.
            let stored_meta = self.held().meta.get(session).map(|m| sha256_hex(m));
            if seal.meta.is_none() || seal.meta != stored_meta {
                return Err(refused(
                    422,
                    ErrorCode::Tampered,
                    "the seal's metadata differs",
                ));
            }
            for (stream, end) in &seal.streams {
                let have = self.status_of(session, stream);
                if (have.next_seq, &have.last_hash) != (end.chunks, &end.last_hash) {
                    return Err(refused(
                        422,
                        ErrorCode::Tampered,
                        "the chains end elsewhere",
                    ));
                }
            }
            self.held().seals.insert(session.into(), seal.clone());
            Ok(())
        }
    }

    struct Nothing;
    impl LiveSessions for Nothing {
        fn is_live(&self, _: &str) -> bool {
            false
        }
    }

    /// A spool in a scratch directory, removed at the end.
    struct Spool(PathBuf);

    impl Spool {
        fn new(name: &str) -> Spool {
            let dir =
                std::env::temp_dir().join(format!("usher-ship-unit-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Spool(dir)
        }

        fn path(&self, id: &str, suffix: &str) -> PathBuf {
            self.0.join(format!("{id}.{suffix}"))
        }

        fn append(&self, id: &str, suffix: &str, bytes: &[u8]) {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.path(id, suffix))
                .unwrap()
                .write_all(bytes)
                .unwrap();
        }

        fn write_meta(&self, id: &str, ended: bool) {
            let meta = SessionMeta {
                session_id: id.into(),
                kind: "ssh".into(),
                host: "h".into(),
                login: "usher-t".into(),
                uid: 61000,
                grant: GrantInfo {
                    iss: "i".into(),
                    sub: "t@example.org".into(),
                    jti: "j".into(),
                    profile: "default".into(),
                    approved_by: None,
                    reason: None,
                    request: None,
                    expires_at: 1893456000,
                },
                peer: None,
                command: None,
                term: None,
                started_at: "2026-11-22T12:00:00Z".into(),
                ended_at: ended.then(|| "2026-11-22T12:05:00Z".into()),
                exit_status: None,
                exit_signal: None,
                enforcement: "off".into(),
                enforced: false,
                input_recorded: false,
                interrupted: false,
                truncated: None,
                limits: None,
            };
            std::fs::write(
                self.path(id, "json"),
                serde_json::to_vec_pretty(&meta).unwrap(),
            )
            .unwrap();
        }

        fn holds(&self, id: &str) -> bool {
            ["cast", "desktop", "audit.jsonl", "json", "ship.json"]
                .iter()
                .any(|s| self.path(id, s).exists())
        }

        fn saved_state(&self, id: &str) -> ShipState {
            ShipState::from_saved(std::fs::read(self.path(id, "ship.json")).ok().as_deref())
        }
    }

    impl Drop for Spool {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// `n` cast lines of about 300 bytes: at the smallest chunk size (1 KiB), three a chunk.
    fn lines(from: usize, n: usize) -> Vec<u8> {
        (from..from + n)
            .flat_map(|i| format!("[{i}.0, \"o\", \"{}\"]\n", "x".repeat(280)).into_bytes())
            .collect()
    }

    fn setup(name: &str) -> (Spool, Arc<Fake>, Shipper<Arc<Fake>>) {
        let spool = Spool::new(name);
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let fake = Fake::new(key.verifying_key());
        let mut shipper =
            Shipper::with_collector(fake.clone(), &spool.0, key, 1024, Duration::from_secs(1));
        // Small chunks for a backlog too: several to a session, several to a plan.
        shipper.backlog_chunk_bytes = 1024;
        (spool, fake, shipper)
    }

    /// A round as `run` does it: a failure makes every stream ask the collector again.
    async fn round(
        shipper: &Shipper<Arc<Fake>>,
        states: &mut BTreeMap<String, ShipState>,
    ) -> Result<usize, ShipError> {
        let result = shipper.round(states, &Nothing).await;
        if result.is_err() {
            states.values_mut().for_each(ShipState::forget_agreement);
        }
        result
    }

    #[tokio::test]
    async fn an_ended_session_is_shipped_in_whole_line_chunks_sealed_and_removed() {
        let (spool, fake, shipper) = setup("ended");
        let cast = lines(0, 10);
        spool.append("s1", "cast", &cast);
        spool.append("s1", "audit.jsonl", b"{\"event\":\"session_started\"}\n");
        spool.write_meta("s1", true);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 0);
        assert_eq!(fake.stream("s1", "cast"), cast);
        let chunks = fake.chunks("s1", "cast");
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(|c| c.len() <= 1024 && c.ends_with(b"\n")));
        let seal = fake.held().seals["s1"].clone();
        assert_eq!(seal.streams["cast"].chunks, 4);
        assert_eq!(seal.streams["audit"].chunks, 1);
        assert!(fake.held().meta.contains_key("s1"));
        assert!(!spool.holds("s1"), "gone from the spool once sealed");
    }

    #[tokio::test]
    async fn a_desktop_session_ships_its_multi_megabyte_keyframes_whole() {
        let (spool, fake, shipper) = setup("desktop");
        let mut file = crate::record::DesktopFile::create(&spool.0, "d1").unwrap();
        let keyframe = format!("[0.000,\"k\",0,0,1920,1080,\"{}\"]", "A".repeat(3 << 20));
        // The longest line that fits a chunk with its newline.
        let biggest = "B".repeat(crate::record::MAX_DESKTOP_LINE);
        let lines = [
            "{\"version\":1,\"format\":\"usher-desktop\",\"width\":1920,\"height\":1080}",
            &keyframe,
            "[0.100,\"p\",10,10]",
            "[0.200,\"p\",11,10]",
            &keyframe,
            "[0.300,\"m\",\"end\"]",
            &biggest,
        ];
        for line in lines {
            file.append(line).unwrap();
        }
        file.finish().unwrap();
        spool.append("d1", "audit.jsonl", b"{\"event\":\"session_started\"}\n");
        spool.write_meta("d1", true);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 0);
        let chunks = fake.chunks("d1", "desktop");
        assert!(chunks
            .iter()
            .all(|c| c.len() <= MAX_CHUNK && c.ends_with(b"\n")));
        assert_eq!(
            chunks.len(),
            6,
            "header, keyframe, pointers, keyframe, end, the biggest line"
        );
        assert_eq!(
            fake.stream("d1", "desktop"),
            (lines.join("\n") + "\n").into_bytes()
        );
        assert_eq!(fake.held().seals["d1"].streams["desktop"].chunks, 6);
        assert!(!spool.holds("d1"));
    }

    #[tokio::test]
    async fn a_line_longer_than_a_chunk_stops_its_session_and_not_the_others() {
        let (spool, fake, shipper) = setup("too-long");
        spool.append("d1", "desktop", b"{\"version\":1}\n");
        let mut long = vec![b'x'; MAX_CHUNK + 10];
        long.push(b'\n');
        spool.append("d1", "desktop", &long);
        spool.write_meta("d1", true);
        spool.append("s2", "cast", &lines(0, 2));
        spool.write_meta("s2", true);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        assert_eq!(
            fake.chunks("d1", "desktop").len(),
            1,
            "what came before it is shipped"
        );
        assert!(states["d1"].stuck);
        assert!(!fake.held().seals.contains_key("d1"));
        assert!(spool.holds("d1"));
        assert!(
            fake.held().seals.contains_key("s2"),
            "the other session ships"
        );
        let d1 = shipper.ship_session("d1", states.get_mut("d1").unwrap(), false);
        let error = d1.await.unwrap_err();
        assert!(
            matches!(error, ShipError::LineTooLong { offset: 14, .. }),
            "{error}"
        );
    }

    #[tokio::test]
    async fn a_live_session_ships_its_whole_lines_and_waits_for_the_rest() {
        let (spool, fake, shipper) = setup("live");
        let first = lines(0, 2);
        spool.append("s1", "cast", &first);
        spool.append("s1", "cast", b"[2.0, \"o\", \"half a li");
        spool.write_meta("s1", false);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        assert_eq!(fake.stream("s1", "cast"), first, "the partial line waits");
        let saved = spool.saved_state("s1");
        assert_eq!(saved.streams["cast"].offset, first.len() as u64);
        assert!(saved.streams["cast"].pending.is_empty());
        // The line is finished and the session ends.
        spool.append("s1", "cast", b"ne\"]\n");
        spool.write_meta("s1", true);
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 0);
        assert_eq!(
            fake.stream("s1", "cast"),
            [&first[..], b"[2.0, \"o\", \"half a line\"]\n"].concat()
        );
        assert!(fake.held().seals.contains_key("s1"));
    }

    #[tokio::test]
    async fn a_session_with_a_partial_last_line_is_not_sealed() {
        let (spool, fake, shipper) = setup("partial");
        spool.append("s1", "cast", &lines(0, 1));
        spool.append("s1", "cast", b"[1.0, \"o\", \"cut");
        spool.write_meta("s1", true);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        assert!(fake.held().seals.is_empty());
        assert!(spool.holds("s1"));
    }

    #[tokio::test]
    async fn after_a_crash_that_lost_the_collectors_answer_the_chunk_is_not_sent_again() {
        let (spool, fake, shipper) = setup("lost-answer");
        let cast = lines(0, 9);
        spool.append("s1", "cast", &cast);
        spool.write_meta("s1", true);
        fake.lose_next_answer.store(true, Ordering::SeqCst);
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        let saved = spool.saved_state("s1");
        assert_eq!(saved.streams["cast"].next_seq, 0);
        assert_eq!(
            saved.streams["cast"].pending.len(),
            3,
            "the three chunks planned in one write, none acknowledged"
        );
        // A new agent process: only what .ship.json says.
        assert_eq!(round(&shipper, &mut BTreeMap::new()).await.unwrap(), 0);
        assert_eq!(fake.stream("s1", "cast"), cast);
        assert_eq!(
            fake.chunk_puts.load(Ordering::SeqCst),
            3,
            "the collector said it held chunk 0: it was not sent again"
        );
        assert!(fake.held().seals.contains_key("s1"));
    }

    #[tokio::test]
    async fn a_chunk_resent_without_asking_first_is_acknowledged_as_a_duplicate() {
        let (spool, fake, shipper) = setup("duplicate");
        let cast = lines(0, 6);
        spool.append("s1", "cast", &cast);
        spool.write_meta("s1", true);
        let mut states = BTreeMap::new();
        fake.lose_next_answer.store(true, Ordering::SeqCst);
        assert!(shipper.round(&mut states, &Nothing).await.is_err());
        // Still agreed with the collector: the plan goes again as it was.
        assert_eq!(shipper.round(&mut states, &Nothing).await.unwrap(), 0);
        assert_eq!(fake.stream("s1", "cast"), cast);
        assert_eq!(fake.chunk_puts.load(Ordering::SeqCst), 3, "chunk 0 twice");
    }

    #[tokio::test]
    async fn a_plan_written_down_before_a_crash_is_sent_as_planned() {
        let (spool, fake, shipper) = setup("planned");
        let first = lines(0, 1);
        spool.append("s1", "cast", &first);
        spool.write_meta("s1", false);
        // The state a crash between planning chunk 0 and sending it leaves.
        let mut planned = ShipState::default();
        let st = planned.stream("s1", "cast");
        st.pending = st.plan(&first, 1024).unwrap().into_iter().collect();
        std::fs::write(
            spool.path("s1", "ship.json"),
            serde_json::to_vec(&planned).unwrap(),
        )
        .unwrap();
        // More was recorded since: it would fit in chunk 0, but chunk 0 is planned.
        let second = lines(1, 1);
        spool.append("s1", "cast", &second);
        assert_eq!(round(&shipper, &mut BTreeMap::new()).await.unwrap(), 1);
        assert_eq!(fake.chunks("s1", "cast"), vec![first, second]);
    }

    #[tokio::test]
    async fn a_wiped_collector_gets_every_stream_again_from_the_start() {
        let (spool, fake, shipper) = setup("wiped");
        let cast = lines(0, 6);
        spool.append("s1", "cast", &cast);
        spool.write_meta("s1", false);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        *fake.held() = Held::default();
        spool.write_meta("s1", true);
        // A new agent process asks where each stream stands.
        assert_eq!(round(&shipper, &mut BTreeMap::new()).await.unwrap(), 0);
        assert_eq!(fake.stream("s1", "cast"), cast);
        assert_eq!(fake.held().seals["s1"].streams["cast"].chunks, 2);
    }

    #[tokio::test]
    async fn a_collector_holding_another_chain_is_sent_nothing() {
        let (spool, fake, shipper) = setup("diverged");
        spool.append("s1", "cast", &lines(0, 3));
        spool.write_meta("s1", true);
        let forged = b"forged\n".to_vec();
        let hash = chain::next(&chain::genesis("s1", "cast"), &forged).unwrap();
        fake.held()
            .chunks
            .insert(("s1".into(), "cast".into()), vec![(hash, forged)]);
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(
            matches!(
                error,
                ShipError::Diverged {
                    remote_chunks: 1,
                    local_chunks: 0,
                    ..
                }
            ),
            "{error}"
        );
        assert!(!error.is_unreachable());
        assert_eq!(fake.chunk_puts.load(Ordering::SeqCst), 0);
        assert!(spool.holds("s1"));
    }

    #[tokio::test]
    async fn a_gap_stops_the_stream_until_the_collector_is_asked_again() {
        let (spool, fake, shipper) = setup("gap");
        spool.append("s1", "cast", &lines(0, 6));
        spool.write_meta("s1", false);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        // The collector lost its last chunk (restored from a backup); this agent, still
        // agreed with it, sends the next one.
        fake.held()
            .chunks
            .get_mut(&("s1".to_string(), "cast".to_string()))
            .unwrap()
            .pop();
        spool.append("s1", "cast", &lines(6, 3));
        let error = round(&shipper, &mut states).await.unwrap_err();
        assert!(
            matches!(
                error,
                ShipError::OutOfStep {
                    expected: Some(1),
                    ..
                }
            ),
            "{error}"
        );
        // Asked again, the collector's stream is shorter than this host's: a person decides.
        let error = round(&shipper, &mut states).await.unwrap_err();
        assert!(matches!(error, ShipError::Diverged { .. }), "{error}");
    }

    #[tokio::test]
    async fn an_unreachable_collector_is_told_apart_from_a_refusal() {
        let (spool, fake, shipper) = setup("unreachable");
        spool.append("s1", "cast", &lines(0, 1));
        spool.write_meta("s1", true);
        fake.unreachable.store(true, Ordering::SeqCst);
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(error.is_unreachable());
        assert!(error.to_string().starts_with("collector unreachable"));
        fake.unreachable.store(false, Ordering::SeqCst);
        assert_eq!(round(&shipper, &mut BTreeMap::new()).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn metadata_that_is_not_session_metadata_stops_the_session() {
        let (spool, fake, shipper) = setup("bad-meta");
        spool.append("s1", "cast", &lines(0, 1));
        std::fs::write(spool.path("s1", "json"), b"{\"session_id\": \"s1\"}").unwrap();
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(matches!(error, ShipError::Meta { .. }), "{error}");
        assert!(fake.held().meta.is_empty());
    }

    struct AllLive;
    impl LiveSessions for AllLive {
        fn is_live(&self, _: &str) -> bool {
            true
        }
    }

    #[tokio::test]
    async fn a_live_tail_goes_in_small_chunks_and_a_backlog_in_large_ones() {
        let spool = Spool::new("sizes");
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let fake = Fake::new(key.verifying_key());
        let shipper =
            Shipper::with_collector(fake.clone(), &spool.0, key, 1024, Duration::from_secs(1));
        spool.write_meta("s1", false);
        let mut states = BTreeMap::new();
        // A live tail of a few lines: chunks of at most `chunk_bytes`.
        let tail = lines(0, 6);
        spool.append("s1", "cast", &tail);
        shipper.round(&mut states, &AllLive).await.unwrap();
        let small = fake.chunks("s1", "cast");
        assert_eq!(small.len(), 2);
        assert!(small.iter().all(|c| c.len() <= 1024));
        // Far more than two chunks waiting, the session still live: one large chunk.
        let backlog = lines(6, 60);
        spool.append("s1", "cast", &backlog);
        shipper.round(&mut states, &AllLive).await.unwrap();
        assert_eq!(fake.chunks("s1", "cast").len(), 3);
        assert_eq!(fake.chunks("s1", "cast")[2], backlog);
        // The session is over: whatever is left goes in large chunks too, then the seal.
        let rest = lines(66, 5);
        spool.append("s1", "cast", &rest);
        spool.write_meta("s1", true);
        assert_eq!(shipper.round(&mut states, &Nothing).await.unwrap(), 0);
        assert_eq!(fake.chunks("s1", "cast")[3], rest);
        assert_eq!(fake.stream("s1", "cast"), [tail, backlog, rest].concat());
    }

    #[tokio::test]
    async fn metadata_that_changed_is_sent_again_and_the_seal_names_the_last_sent() {
        let (spool, fake, shipper) = setup("meta-changes");
        spool.append("s1", "cast", &lines(0, 2));
        spool.write_meta("s1", false);
        let mut states = BTreeMap::new();
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 1);
        let first = fake.held().meta["s1"].clone();
        spool.write_meta("s1", true);
        let ended = std::fs::read(spool.path("s1", "json")).unwrap();
        assert_ne!(first, ended);
        assert_eq!(round(&shipper, &mut states).await.unwrap(), 0);
        assert_eq!(fake.held().meta["s1"], ended);
        assert_eq!(
            fake.held().seals["s1"].meta.as_deref(),
            Some(sha256_hex(&ended).as_str())
        );
    }

    #[tokio::test]
    async fn a_crash_between_the_metadata_and_the_seal_still_seals_over_that_metadata() {
        let (spool, fake, shipper) = setup("meta-then-crash");
        spool.append("s1", "cast", &lines(0, 2));
        spool.write_meta("s1", true);
        fake.lose_next_seal.store(true, Ordering::SeqCst);
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(error.is_unreachable(), "{error}");
        let sent = std::fs::read(spool.path("s1", "json")).unwrap();
        assert_eq!(fake.held().meta["s1"], sent);
        assert_eq!(
            spool
                .saved_state("s1")
                .meta_sent
                .as_deref()
                .map(str::as_bytes),
            Some(&sent[..]),
            "written down as sent"
        );
        // A new agent process: it does not send the metadata again, and seals over it.
        assert_eq!(round(&shipper, &mut BTreeMap::new()).await.unwrap(), 0);
        assert_eq!(
            fake.held().seals["s1"].meta,
            Some(sha256_hex(&sent)),
            "the seal names the metadata the collector holds"
        );
        assert!(!spool.holds("s1"));
    }

    #[tokio::test]
    async fn writes_signed_with_another_key_are_refused_and_nothing_is_stored() {
        let spool = Spool::new("other-key");
        let host = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let fake = Fake::new(host.verifying_key());
        let thief = ed25519_dalek::SigningKey::from_bytes(&[10; 32]);
        let shipper =
            Shipper::with_collector(fake.clone(), &spool.0, thief, 1024, Duration::from_secs(1));
        spool.append("s1", "cast", &lines(0, 2));
        spool.write_meta("s1", true);
        let error = round(&shipper, &mut BTreeMap::new()).await.unwrap_err();
        assert!(
            matches!(
                error,
                ShipError::Collector(ClientError::Refused {
                    status: 403,
                    code: Some(ErrorCode::Forbidden),
                    ..
                })
            ),
            "{error}"
        );
        assert!(fake.chunks("s1", "cast").is_empty());
        assert!(fake.held().meta.is_empty());
        assert!(spool.holds("s1"));
    }

    #[tokio::test]
    async fn a_spool_file_cut_short_behind_a_plan_is_an_error_not_a_crash() {
        let (spool, fake, shipper) = setup("cut-short");
        let cast = lines(0, 6);
        spool.append("s1", "cast", &cast);
        spool.write_meta("s1", true);
        fake.lose_next_answer.store(true, Ordering::SeqCst);
        let mut states = BTreeMap::new();
        assert!(shipper.round(&mut states, &Nothing).await.is_err());
        std::fs::write(spool.path("s1", "cast"), &cast[..100]).unwrap();
        let error = shipper.round(&mut states, &Nothing).await.unwrap_err();
        assert!(matches!(error, ShipError::Spool { .. }), "{error}");
    }
}
