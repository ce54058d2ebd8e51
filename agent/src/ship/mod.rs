//! Stage 6: shipping. Each session's cast and audit stream leave the spool in chunks of
//! whole lines, hash-chained, while the session is live; a session is sealed with the
//! host's key when it is over; its files leave the spool only after the collector has
//! acknowledged every chunk and the seal.
//!
//! Crash safety: a chunk is planned (its offset, length and hash written to the session's
//! `.ship.json`) before it is sent, so after a crash the same bytes are sent again under
//! the same sequence number, and the collector, which stores a chunk once, says so.

pub mod chain;
mod client;

pub use client::{Client, ClientError, PutOutcome};

use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The collector refuses larger chunks.
const MAX_CHUNK: usize = 4 << 20;

/// The streams of a session, by the collector's name and the spool file's suffix.
const STREAMS: [(&str, &str); 2] = [("audit", "audit.jsonl"), ("cast", "cast")];

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct StreamState {
    next_seq: u64,
    /// Bytes of the spool file already acknowledged.
    offset: u64,
    last_hash: String,
    /// Cut and hashed, maybe sent, not yet acknowledged.
    pending: Option<Pending>,
    /// Agreed with the collector since this agent started.
    #[serde(skip)]
    synced: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Pending {
    seq: u64,
    offset: u64,
    len: u64,
    hash: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct ShipState {
    streams: BTreeMap<String, StreamState>,
    /// The metadata as last acknowledged.
    meta_sent: Option<String>,
}

/// What `usher status` shows of shipping.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ShipStatus {
    pub configured: bool,
    pub reachable: Option<bool>,
    pub backlog_sessions: usize,
    pub last_error: Option<String>,
}

pub struct Shipper {
    spool: PathBuf,
    client: Client,
    signing: ed25519_dalek::SigningKey,
    chunk_bytes: usize,
    interval: Duration,
    status: std::sync::Mutex<ShipStatus>,
}

/// Live sessions are not sealed; the agent answers which ones are.
pub trait LiveSessions: Send + Sync {
    fn is_live(&self, session_id: &str) -> bool;
}

impl Shipper {
    pub fn new(
        config: &crate::config::CollectorConfig,
        spool: &Path,
        signing: ed25519_dalek::SigningKey,
    ) -> Result<Shipper, ClientError> {
        Ok(Shipper {
            spool: spool.to_owned(),
            client: Client::new(config)?,
            signing,
            chunk_bytes: config.chunk_bytes.clamp(1024, MAX_CHUNK),
            interval: Duration::from_secs(config.interval_secs.max(1)),
            status: std::sync::Mutex::new(ShipStatus {
                configured: true,
                ..Default::default()
            }),
        })
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
                        if st.last_error.as_deref() != Some(&e) {
                            log::warn!(target: "usher::ship", "shipping paused: {e}; retrying with backoff");
                        }
                        st.reachable = Some(!e.starts_with("collector unreachable"));
                        st.last_error = Some(e);
                        // Every synced flag is suspect after a failure: ask the collector again.
                        for s in states.values_mut() {
                            for stream in s.streams.values_mut() {
                                stream.synced = false;
                            }
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
    ) -> Result<usize, String> {
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
            let done = self.ship_session(id, state, live.is_live(id)).await?;
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
        std::fs::read(self.file(id, "ship.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn save_state(&self, id: &str, state: &ShipState) -> Result<(), String> {
        let bytes = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        fsutil::write_atomic(&self.file(id, "ship.json"), &bytes, 0o600)
            .map_err(|e| format!("spool: {e}"))
    }

    /// Ships what there is of one session; true once it is sealed and gone from the spool.
    async fn ship_session(
        &self,
        id: &str,
        state: &mut ShipState,
        live: bool,
    ) -> Result<bool, String> {
        let mut fully_shipped = true;
        for (stream, suffix) in STREAMS {
            let path = self.file(id, suffix);
            if !path.exists() {
                continue;
            }
            self.ship_stream(id, stream, &path, state).await?;
            if file_len(&path) != state.streams[stream].offset {
                fully_shipped = false;
            }
        }

        let meta_path = self.file(id, "json");
        let meta = std::fs::read_to_string(&meta_path)
            .map_err(|e| format!("{}: {e}", meta_path.display()))?;
        if state.meta_sent.as_deref() != Some(&meta) {
            self.client
                .put_meta(id, meta.clone().into_bytes())
                .await
                .map_err(|e| e.to_string())?;
            state.meta_sent = Some(meta.clone());
            self.save_state(id, state)?;
        }
        let ended = serde_json::from_str::<serde_json::Value>(&meta)
            .map(|m| !m["ended_at"].is_null())
            .unwrap_or(false);
        if !ended || live || !fully_shipped {
            return Ok(false);
        }
        self.seal(id, state).await?;
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
    ) -> Result<(), String> {
        let st = state
            .streams
            .entry(stream.to_string())
            .or_insert_with(|| StreamState {
                last_hash: chain::genesis(id, stream),
                ..Default::default()
            });
        if !st.synced {
            self.resync(id, stream, st).await?;
            self.save_state(id, state)?;
        }
        loop {
            let st = &state.streams[stream];
            let (p, bytes) = match &st.pending {
                Some(p) => (p.clone(), read_range(path, p.offset, p.len as usize)?),
                None => match self.cut(path, st)? {
                    Some((p, bytes)) => {
                        // Written down before it is sent: after a crash, the same bytes go
                        // again under the same number.
                        state.streams.get_mut(stream).expect("present").pending = Some(p.clone());
                        self.save_state(id, state)?;
                        (p, bytes)
                    }
                    None => return Ok(()),
                },
            };
            let prev = state.streams[stream].last_hash.clone();
            let outcome = self
                .client
                .put_chunk(id, stream, p.seq, &prev, &p.hash, bytes)
                .await
                .map_err(|e| e.to_string())?;
            let st = state.streams.get_mut(stream).expect("present");
            match outcome {
                PutOutcome::Stored | PutOutcome::Duplicate => {
                    st.next_seq = p.seq + 1;
                    st.offset = p.offset + p.len;
                    st.last_hash = p.hash;
                    st.pending = None;
                    self.save_state(id, state)?;
                }
                PutOutcome::OutOfStep(why) => {
                    st.synced = false;
                    return Err(format!(
                        "session {id} {stream}: collector out of step: {why}"
                    ));
                }
            }
        }
    }

    async fn resync(&self, id: &str, stream: &str, st: &mut StreamState) -> Result<(), String> {
        let remote = self
            .client
            .stream_status(id, stream)
            .await
            .map_err(|e| e.to_string())?;
        // A planned chunk the collector already has: it was acknowledged, we crashed
        // before writing that down.
        if let Some(p) = &st.pending {
            if remote.next_seq == p.seq + 1 && remote.last_hash == p.hash {
                st.next_seq = p.seq + 1;
                st.offset = p.offset + p.len;
                st.last_hash = p.hash.clone();
                st.pending = None;
            }
        }
        if remote.next_seq == st.next_seq && remote.last_hash == st.last_hash {
            st.synced = true;
            return Ok(());
        }
        if remote.next_seq == 0 {
            // The collector has nothing (a new or wiped store): the spool still holds the
            // whole stream, send it again from the start.
            log::warn!(target: "usher::ship", "session {id} {stream}: collector has nothing; re-sending from the start");
            *st = StreamState {
                last_hash: chain::genesis(id, stream),
                synced: true,
                ..Default::default()
            };
            return Ok(());
        }
        Err(format!(
            "session {id} {stream}: collector has {} chunks, this host {}; not sending until resolved",
            remote.next_seq, st.next_seq
        ))
    }

    /// The next chunk: whole lines from the acknowledged offset, at most `chunk_bytes`
    /// unless one line is longer. Made durable before it is hashed.
    fn cut(&self, path: &Path, st: &StreamState) -> Result<Option<(Pending, Vec<u8>)>, String> {
        let len = file_len(path);
        if len <= st.offset {
            return Ok(None);
        }
        let want = ((len - st.offset) as usize).min(MAX_CHUNK);
        let data = read_range(path, st.offset, want)?;
        let window = &data[..data.len().min(self.chunk_bytes)];
        let end = match window.iter().rposition(|b| *b == b'\n') {
            Some(i) => i + 1,
            // One line longer than a chunk: take it whole, up to the collector's limit.
            None => match data.iter().position(|b| *b == b'\n') {
                Some(i) => i + 1,
                None => return Ok(None),
            },
        };
        let bytes = data[..end].to_vec();
        std::fs::File::open(path)
            .and_then(|f| f.sync_data())
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let hash = chain::next(&st.last_hash, &bytes)?;
        Ok(Some((
            Pending {
                seq: st.next_seq,
                offset: st.offset,
                len: bytes.len() as u64,
                hash,
            },
            bytes,
        )))
    }

    async fn seal(&self, id: &str, state: &ShipState) -> Result<(), String> {
        use ed25519_dalek::Signer;
        let streams: BTreeMap<String, (u64, String)> = state
            .streams
            .iter()
            .map(|(k, v)| (k.clone(), (v.next_seq, v.last_hash.clone())))
            .collect();
        let message = chain::seal_message(id, &streams);
        let signature = self.signing.sign(message.as_bytes());
        use base64::Engine;
        let body = serde_json::json!({
            "streams": streams.iter().map(|(k, (n, h))| (k.clone(), serde_json::json!({"chunks": n, "last_hash": h}))).collect::<serde_json::Map<_, _>>(),
            "signature": base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        });
        self.client.seal(id, &body).await.map_err(|e| e.to_string())
    }
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn read_range(path: &Path, offset: u64, len: usize) -> Result<Vec<u8>, String> {
    let mut f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; len];
    let mut got = 0;
    while got < len {
        let n = f.read(&mut buf[got..]).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    buf.truncate(got);
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
