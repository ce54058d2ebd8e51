//! Group commit: a write (chunk, metadata, seal, hold) is answered only once its objects
//! are durable and its index rows committed ("acknowledged = durable"), but concurrent
//! writes share the cost. Two stages overlap:
//!
//! 1. objects: the writes queued take their objects to disk together (the local backend:
//!    every file written, then every file and directory fsync'd at once, which the kernel
//!    folds into one journal commit; S3: the puts run at once, each durable when
//!    answered); several such batches may be in flight at once;
//! 2. index: every write whose objects are durable decides and writes its rows in ONE
//!    transaction (each under its session's row lock), which commits, then each request
//!    is answered. A failed batch fails each of its writes (the agent retries).
//!
//! A session has at most one write in flight from this instance (`Store::session_turn`),
//! so per-session order holds; across instances the row lock does it
//! (`index::lock_session`). A chunk's object is named after its content (number, chain
//! link, encoding: [`chunk_path`]), so an object written for a write the index then
//! refuses (a retried duplicate, a race lost to another instance) overwrites nothing but
//! the same recording, and is never referenced.

use super::index::{self, CommandRow, Dialect};
use super::{internal, Encoding, Inner, Refused, StoreEvent, Writer};
use crate::workflow::db::Tx;
use bytes::Bytes;
use object_store::path::Path as ObjectPath;
use object_store::PutPayload;
use std::sync::{Arc, Weak};
use tokio::sync::mpsc;
use usher_wire::collector::ChunkAccepted;

/// At most this many writes or bytes in one batch (a bound on what one failure costs).
const MAX_BATCH_WRITES: usize = 256;
const MAX_BATCH_BYTES: usize = 256 << 20;
/// Batches whose objects are being made durable at once.
const MAX_BATCHES_IN_FLIGHT: usize = 8;

/// Sends a write's outcome to its requester, once its batch has committed.
pub type Answer = Box<dyn FnOnce() + Send>;
/// A write's decision, made under its session's row lock in the batch's transaction: its
/// rows, and its answer (sent only if the transaction commits). `Err` fails the batch.
pub type Decision =
    Box<dyn FnMut(&mut dyn Tx, &mut Vec<StoreEvent>) -> Result<Answer, Refused> + Send>;

/// One write waiting for its batch: chunks, metadata, seals, holds.
pub struct Job {
    /// The session whose row the decision locks: a batch locks its rows in this order, the
    /// same on every instance, so that two instances' batches never deadlock.
    pub session: String,
    /// Made durable before the decision runs; if one fails, the write fails.
    pub objects: Vec<(ObjectPath, Bytes)>,
    pub decide: Decision,
    /// Answers the requester when the write cannot be committed.
    pub fail: Box<dyn FnOnce(Refused) + Send>,
}

pub type Queue = mpsc::UnboundedSender<Job>;

/// Starts the committer for `inner`, two stages that overlap: while one batch's rows
/// commit, the next batch's objects are made durable. It ends when the store is dropped.
pub fn start(inner: &Arc<Inner>) -> Queue {
    let (queue, mut queued) = mpsc::unbounded_channel::<Job>();
    let (durable, mut to_commit) = mpsc::channel::<Vec<Job>>(MAX_BATCHES_IN_FLIGHT);
    let weak: Weak<Inner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        // Several batches' objects may be on their way to disk at once: a write arriving
        // while a batch syncs starts its own at once instead of waiting a whole round
        // (the filesystem folds concurrent fsyncs into one journal commit anyway).
        let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
        while let Some(first) = queued.recv().await {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let mut bytes = weigh(&first);
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH_WRITES && bytes < MAX_BATCH_BYTES {
                match queued.try_recv() {
                    Ok(job) => {
                        bytes += weigh(&job);
                        batch.push(job);
                    }
                    Err(_) => break,
                }
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            let durable = durable.clone();
            tokio::spawn(async move {
                let batch = make_durable(&inner, batch).await;
                drop(inner);
                drop(permit);
                let _ = durable.send(batch).await;
            });
        }
    });
    let weak: Weak<Inner> = Arc::downgrade(inner);
    tokio::spawn(async move {
        while let Some(mut jobs) = to_commit.recv().await {
            // Whatever became durable meanwhile commits in the same transaction.
            while let Ok(more) = to_commit.try_recv() {
                jobs.extend(more);
            }
            let Some(inner) = weak.upgrade() else {
                return;
            };
            commit(&inner, jobs).await;
        }
    });
    queue
}

fn weigh(job: &Job) -> usize {
    job.objects.iter().map(|(_, b)| b.len()).sum()
}

/// Writes the batch's objects and makes them durable together; the jobs whose objects
/// did not are answered with the failure and left out.
async fn make_durable(inner: &Inner, batch: Vec<Job>) -> Vec<Job> {
    let writes: Vec<(ObjectPath, Bytes)> = batch
        .iter()
        .flat_map(|j| j.objects.iter().cloned())
        .collect();
    if writes.is_empty() {
        return batch;
    }
    let failed = inner.objects.put_all_durably(writes).await;
    if failed.is_empty() {
        return batch;
    }
    let mut kept = Vec::with_capacity(batch.len());
    for job in batch {
        let failure = job
            .objects
            .iter()
            .find_map(|(path, _)| failed.get(path.as_ref()));
        match failure {
            Some(why) => (job.fail)(Refused::Internal(why.clone())),
            None => kept.push(job),
        }
    }
    kept
}

/// One index transaction for every job: each decides under its session's lock, then all
/// commit, then each is answered.
async fn commit(inner: &Inner, mut jobs: Vec<Job>) {
    jobs.sort_by(|a, b| a.session.cmp(&b.session));
    let mut decisions = Vec::with_capacity(jobs.len());
    let mut fails = Vec::with_capacity(jobs.len());
    for job in jobs {
        decisions.push(job.decide);
        fails.push(job.fail);
    }
    let committed = inner
        .index
        .transaction(move |tx| -> Result<_, Refused> {
            let mut events = Vec::new();
            let mut answers = Vec::with_capacity(decisions.len());
            for decide in decisions.iter_mut() {
                answers.push(decide(tx, &mut events)?);
            }
            Ok((answers, events))
        })
        .await;
    match committed {
        Ok((answers, events)) => {
            for event in events {
                inner.emit(event);
            }
            for answer in answers {
                answer();
            }
        }
        Err(e) => {
            let why = e.to_string();
            for fail in fails {
                fail(Refused::Internal(why.clone()));
            }
        }
    }
}

/// A chunk, as its decision needs it.
pub struct ChunkWrite {
    pub writer: Writer,
    pub id: String,
    pub stream: String,
    pub seq: u64,
    pub prev: String,
    pub hash: String,
    /// The body's chain link matches `hash` (checked before queueing; the object is written
    /// only if it does).
    pub link_ok: bool,
    pub encoding: Encoding,
    pub size: usize,
    pub commands: Vec<CommandRow>,
    pub object: String,
}

/// One chunk's fate, decided under its session's row lock; the outer `Err` fails the
/// batch (the index could not be read or written), the inner one refuses this chunk.
pub fn decide_chunk(
    tx: &mut dyn Tx,
    dialect: Dialect,
    row: &ChunkWrite,
    now: i64,
    events: &mut Vec<StoreEvent>,
) -> Result<Result<ChunkAccepted, Refused>, Refused> {
    let (id, stream, seq) = (row.id.as_str(), row.stream.as_str(), row.seq);
    let session = index::lock_session(tx, dialect, id, &row.writer.host, now).map_err(internal)?;
    if let Some(refused) = session.refuses(id, &row.writer.host) {
        return Ok(Err(refused));
    }
    let (next_seq, last_hash) = index::stream_end(tx, id, stream)
        .map_err(internal)?
        .unwrap_or_else(|| (0, usher_wire::chain::genesis(id, stream)));
    let mut flag = |tx: &mut dyn Tx, why: &str| -> Result<(), Refused> {
        super::flag_in(tx, id, why, &row.writer, events)
    };
    if seq < next_seq {
        let stored = index::chunk_hash(tx, id, stream, seq).map_err(internal)?;
        if stored.as_deref() == Some(row.hash.as_str()) {
            return Ok(Ok(ChunkAccepted {
                stored: false,
                duplicate: true,
                next_seq: None,
            }));
        }
        // The protocol answers 409 here (not 422): the number is already taken.
        let why = format!("{stream} chunk {seq} sent again with different content");
        flag(tx, &why)?;
        return Ok(Err(Refused::Rewritten { why, next_seq }));
    }
    if session.sealed {
        // A sealed session's chains end where the host signed them.
        let why = format!("{stream} chunk {seq} sent after the seal");
        flag(tx, &why)?;
        return Ok(Err(Refused::Rewritten { why, next_seq }));
    }
    if seq > next_seq {
        return Ok(Err(Refused::Gap { next_seq }));
    }
    if row.prev != last_hash {
        let why = format!("{stream} chunk {seq} does not continue the chain");
        flag(tx, &why)?;
        return Ok(Err(Refused::Tampered(why)));
    }
    if !row.link_ok {
        let why = format!("{stream} chunk {seq} does not match its hash");
        flag(tx, &why)?;
        return Ok(Err(Refused::Tampered(why)));
    }
    index::insert_chunk(
        tx,
        id,
        stream,
        seq,
        &row.hash,
        row.size,
        row.encoding.as_str(),
        &row.object,
        &row.commands,
    )
    .map_err(internal)?;
    Ok(Ok(ChunkAccepted {
        stored: true,
        duplicate: false,
        next_seq: Some(seq + 1),
    }))
}

/// Where chunk `seq` of a stream is kept: named after its number, its chain link (which
/// commits to its decoded bytes) and its encoding, so that two writes of one name always
/// hold the same recording.
pub fn chunk_path(id: &str, stream: &str, seq: u64, hash: &str, encoding: Encoding) -> ObjectPath {
    let suffix = match encoding {
        Encoding::Identity => "",
        Encoding::Zstd => ".zst",
    };
    ObjectPath::from(format!("sessions/{id}/{stream}/{seq:010}.{hash}{suffix}"))
}

/// Where a chunk stored by a collector before content-named objects is.
pub fn legacy_chunk_path(id: &str, stream: &str, seq: u64) -> ObjectPath {
    ObjectPath::from(format!("sessions/{id}/{stream}/{seq:010}"))
}

/// The objects' side of durability: S3 (durable when a put is answered) or a local
/// directory (durable once the file and its directories are fsync'd).
pub enum Objects {
    S3(Arc<dyn object_store::ObjectStore>),
    Local {
        /// For reads, listings and deletions.
        store: Arc<dyn object_store::ObjectStore>,
        root: std::path::PathBuf,
    },
}

impl Objects {
    pub fn store(&self) -> &Arc<dyn object_store::ObjectStore> {
        match self {
            Objects::S3(s) | Objects::Local { store: s, .. } => s,
        }
    }

    /// Writes every object and makes them durable together: the map holds the paths that
    /// failed, with why.
    pub async fn put_all_durably(
        &self,
        writes: Vec<(ObjectPath, Bytes)>,
    ) -> std::collections::HashMap<String, String> {
        let mut failed = std::collections::HashMap::new();
        match self {
            Objects::S3(store) => {
                let puts = writes.into_iter().map(|(path, bytes)| {
                    let store = store.clone();
                    async move {
                        let r = store.put(&path, PutPayload::from(bytes)).await;
                        (path, r)
                    }
                });
                for (path, r) in futures::future::join_all(puts).await {
                    if let Err(e) = r {
                        failed.insert(path.to_string(), e.to_string());
                    }
                }
            }
            Objects::Local { root, .. } => {
                let root = root.clone();
                let names: Vec<String> = writes.iter().map(|(p, _)| p.to_string()).collect();
                let written =
                    tokio::task::spawn_blocking(move || local::write_all(&root, writes)).await;
                let written = match written {
                    Ok(w) => w,
                    Err(e) => {
                        // The whole batch is in doubt.
                        for name in names {
                            failed.insert(name, e.to_string());
                        }
                        return failed;
                    }
                };
                failed = written.failed;
                // Every fsync at once, each on a thread of the blocking pool: the
                // filesystem folds concurrent fsyncs together, so the batch costs about
                // one, not one per file.
                let files = written.files.into_iter().map(|(name, file)| async move {
                    let r = tokio::task::spawn_blocking(move || file.sync_all()).await;
                    (name, r.map_err(std::io::Error::other).and_then(|r| r))
                });
                let dirs = written.dirs.into_iter().map(|dir| async move {
                    tokio::task::spawn_blocking(move || std::fs::File::open(&dir)?.sync_all())
                        .await
                        .map_err(std::io::Error::other)
                        .and_then(|r| r)
                });
                let (files, dirs) = futures::future::join(
                    futures::future::join_all(files),
                    futures::future::join_all(dirs),
                )
                .await;
                // A directory that did not sync leaves every file of the batch in doubt.
                let dir_failure = dirs.into_iter().find_map(Result::err);
                for (name, r) in files {
                    if let Some(e) = r.err().or_else(|| {
                        dir_failure
                            .as_ref()
                            .map(|e| std::io::Error::new(e.kind(), e.to_string()))
                    }) {
                        failed.insert(name, e.to_string());
                    }
                }
            }
        }
        failed
    }
}

mod local {
    //! Files under the objects directory, written as object_store's LocalFileSystem lays
    //! them out (so it reads them), each through a temporary name and a rename; the caller
    //! then fsyncs them all at once: files, the directories holding the renames, and any
    //! directory made on the way (its entry lives in its parent).

    use object_store::path::Path as ObjectPath;
    use std::collections::{BTreeSet, HashMap};
    use std::io::Write;
    use std::path::{Path, PathBuf};

    /// What a batch's writes left to sync.
    pub struct Written {
        pub failed: HashMap<String, String>,
        /// Each file written, open (its data not yet synced), by object name.
        pub files: Vec<(String, std::fs::File)>,
        /// The directories holding the renames, and those made on the way.
        pub dirs: BTreeSet<PathBuf>,
    }

    pub fn write_all(root: &Path, writes: Vec<(ObjectPath, bytes::Bytes)>) -> Written {
        let mut written = Written {
            failed: HashMap::new(),
            files: Vec::new(),
            dirs: BTreeSet::new(),
        };
        for (path, bytes) in writes {
            let file = root.join(path.as_ref());
            match write_one(root, &file, &bytes, &mut written.dirs) {
                Ok(f) => written.files.push((path.to_string(), f)),
                Err(e) => {
                    written.failed.insert(path.to_string(), e.to_string());
                }
            }
        }
        written
    }

    fn write_one(
        root: &Path,
        file: &Path,
        bytes: &[u8],
        dirs: &mut BTreeSet<PathBuf>,
    ) -> std::io::Result<std::fs::File> {
        let parent = file
            .parent()
            .ok_or_else(|| std::io::Error::other("an object path without a directory"))?;
        if !parent.is_dir() {
            // Each directory made on the way needs its parent synced too.
            let mut missing = Vec::new();
            let mut dir = parent;
            while !dir.is_dir() && dir != root {
                missing.push(dir.to_path_buf());
                match dir.parent() {
                    Some(p) => dir = p,
                    None => break,
                }
            }
            std::fs::create_dir_all(parent)?;
            for made in missing {
                if let Some(p) = made.parent() {
                    dirs.insert(p.to_path_buf());
                }
            }
        }
        dirs.insert(parent.to_path_buf());
        let temp = file.with_extension(format!("tmp-{:016x}", rand::random::<u64>()));
        let written = (|| {
            let mut f = std::fs::File::create(&temp)?;
            f.write_all(bytes)?;
            std::fs::rename(&temp, file)?;
            // Still the renamed file: its data is synced through this handle.
            Ok(f)
        })();
        if written.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        written
    }
}
