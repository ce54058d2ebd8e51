//! What the shipper knows of each session it ships, kept in the session's `.ship.json`
//! beside its spool files, and the decisions made on it. No I/O here: the shipper reads
//! the spool and talks to the collector, this decides what that means.
//!
//! A chunk's life: planned (its offset, length and hash written down) → sent →
//! acknowledged (the offset moves past it). Several chunks are planned at once and
//! written down in one write; a crash anywhere leaves a plan that is sent again as it
//! was, or a prefix of which the collector turns out to hold already.

use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use usher_wire::chain::{self, ChainError};
use usher_wire::collector::StreamStatus;
use usher_wire::seal::StreamEnd;

/// The collector refuses larger chunks (decoded).
pub const MAX_CHUNK: usize = 4 << 20;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    pub next_seq: u64,
    /// Bytes of the spool file already acknowledged.
    pub offset: u64,
    pub last_hash: String,
    /// Cut and hashed, maybe sent, not yet acknowledged: consecutive chunks from `offset`
    /// and `next_seq` on. (A single chunk, or null, in files of earlier agents.)
    #[serde(
        default,
        deserialize_with = "one_or_many",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub pending: Vec<Pending>,
    /// Agreed with the collector since this agent started.
    #[serde(skip)]
    pub synced: bool,
}

/// A chunk planned: the bytes `offset..offset + len` of the spool file, sent as `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub seq: u64,
    pub offset: u64,
    pub len: u64,
    pub hash: String,
}

impl Pending {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// `pending` as this agent writes it (a list) or as earlier ones did (one chunk or null).
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Pending>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(Pending),
        Many(Vec<Pending>),
    }
    Ok(match Option::<OneOrMany>::deserialize(d)? {
        None => Vec::new(),
        Some(OneOrMany::One(p)) => vec![p],
        Some(OneOrMany::Many(v)) => v,
    })
}

#[derive(Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShipState {
    pub streams: BTreeMap<String, StreamState>,
    /// The metadata as last acknowledged (the seal names its SHA-256).
    pub meta_sent: Option<String>,
    /// A stream of it cannot be shipped (said once in the journal, not every round).
    #[serde(skip)]
    pub stuck: bool,
}

/// How a stream came to agree with the collector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agreement {
    /// Both sides end at the same chunk (planned chunks the collector already held count
    /// as acknowledged).
    InStep,
    /// The collector holds nothing of it (a new or wiped store): the spool still holds
    /// the whole stream, so it is sent again from the start.
    FromTheStart,
}

/// The collector holds a different stream than this host: neither side's copy can be
/// taken to extend the other's, so nothing is sent until a person resolves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Diverged {
    pub remote_chunks: u64,
    pub local_chunks: u64,
}

/// How the next chunks are cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cutting {
    /// Largest chunk, unless one line is longer (then that line, up to [`MAX_CHUNK`]).
    pub chunk_bytes: usize,
    /// Most chunks planned in one go (one write of the state for all of them).
    pub max_chunks: usize,
}

/// Why nothing more can be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// The line at the acknowledged offset is longer than a chunk can be.
    #[error("a line longer than {MAX_CHUNK} bytes")]
    LineTooLong,
}

impl StreamState {
    /// A stream nothing of which has been sent.
    pub fn new(session_id: &str, stream: &str) -> StreamState {
        StreamState {
            last_hash: chain::genesis(session_id, stream),
            ..Default::default()
        }
    }

    /// The collector has chunk `p` (and so every planned chunk before it): the stream
    /// moves past it.
    pub fn acknowledge(&mut self, p: &Pending) {
        self.next_seq = p.seq + 1;
        self.offset = p.end();
        self.last_hash = p.hash.clone();
        self.pending.retain(|q| q.seq > p.seq);
    }

    /// Brings this host's view in line with what the collector says it holds.
    pub fn agree_with(
        &mut self,
        session_id: &str,
        stream: &str,
        remote: &StreamStatus,
    ) -> Result<Agreement, Diverged> {
        // Planned chunks the collector already has: they were acknowledged, and this host
        // crashed (or lost the answer) before writing that down.
        if let Some(p) = self
            .pending
            .iter()
            .find(|p| remote.next_seq == p.seq + 1 && remote.last_hash == p.hash)
            .cloned()
        {
            self.acknowledge(&p);
        }
        if remote.next_seq == self.next_seq && remote.last_hash == self.last_hash {
            self.synced = true;
            return Ok(Agreement::InStep);
        }
        if remote.next_seq == 0 {
            *self = StreamState {
                synced: true,
                ..StreamState::new(session_id, stream)
            };
            return Ok(Agreement::FromTheStart);
        }
        Err(Diverged {
            remote_chunks: remote.next_seq,
            local_chunks: self.next_seq,
        })
    }

    /// The next chunk alone (see [`StreamState::plan_chunks`]).
    #[cfg(test)]
    pub fn plan(&self, unsent: &[u8], chunk_bytes: usize) -> Result<Option<Pending>, ChainError> {
        let cutting = Cutting {
            chunk_bytes,
            max_chunks: 1,
        };
        match self.plan_chunks(unsent, cutting) {
            Ok(planned) => Ok(planned.into_iter().next()),
            Err(PlanError::Chain(e)) => Err(e),
            Err(PlanError::LineTooLong) => Ok(None),
        }
    }

    /// The next chunks, cut one after the other from `unsent` (the file's bytes from the
    /// acknowledged offset on): whole lines each, chained from the last acknowledged one.
    /// Empty while there is no whole line; [`PlanError::LineTooLong`] when `unsent` holds
    /// more than [`MAX_CHUNK`] bytes and no newline in them.
    pub fn plan_chunks(&self, unsent: &[u8], cutting: Cutting) -> Result<Vec<Pending>, PlanError> {
        let mut planned: Vec<Pending> = Vec::new();
        let (mut at, mut seq, mut prev) = (0usize, self.next_seq, self.last_hash.clone());
        while planned.len() < cutting.max_chunks {
            let rest = &unsent[at..];
            let Some(end) = whole_lines(rest, cutting.chunk_bytes) else {
                if planned.is_empty() && rest.len() > MAX_CHUNK {
                    return Err(PlanError::LineTooLong);
                }
                break;
            };
            let hash = chain::next(&prev, &rest[..end])?;
            planned.push(Pending {
                seq,
                offset: self.offset + at as u64,
                len: end as u64,
                hash: hash.clone(),
            });
            at += end;
            seq += 1;
            prev = hash;
        }
        Ok(planned)
    }
}

/// Where the chunk cut from `data` ends: after the last newline within `chunk_bytes`, or,
/// when one line is longer than that, after that line, if it ends within [`MAX_CHUNK`].
pub fn whole_lines(data: &[u8], chunk_bytes: usize) -> Option<usize> {
    let window = &data[..data.len().min(chunk_bytes.min(MAX_CHUNK))];
    match memchr::memrchr(b'\n', window) {
        Some(i) => Some(i + 1),
        None => memchr::memchr(b'\n', &data[..data.len().min(MAX_CHUNK)]).map(|i| i + 1),
    }
}

impl ShipState {
    /// The state as `.ship.json` held it; a missing or unreadable file starts over (the
    /// collector says where each stream stands).
    pub fn from_saved(saved: Option<&[u8]>) -> ShipState {
        saved
            .and_then(|b| serde_json::from_slice(b).ok())
            .unwrap_or_default()
    }

    /// One stream's state, new if nothing of it was sent yet.
    pub fn stream(&mut self, session_id: &str, stream: &str) -> &mut StreamState {
        self.streams
            .entry(stream.to_string())
            .or_insert_with(|| StreamState::new(session_id, stream))
    }

    /// Whether a stream's file, `file_len` bytes long, is acknowledged to its end.
    pub fn acknowledged_to(&self, stream: &str, file_len: u64) -> bool {
        self.streams
            .get(stream)
            .is_some_and(|s| s.offset == file_len)
    }

    /// After a failure nothing the collector said can be trusted: ask again.
    pub fn forget_agreement(&mut self) {
        for s in self.streams.values_mut() {
            s.synced = false;
        }
    }

    /// Where each stream ends, for the seal.
    pub fn stream_ends(&self) -> BTreeMap<String, StreamEnd> {
        self.streams
            .iter()
            .map(|(name, s)| {
                let end = StreamEnd {
                    chunks: s.next_seq,
                    last_hash: s.last_hash.clone(),
                };
                (name.clone(), end)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(next_seq: u64, last_hash: &str) -> StreamStatus {
        StreamStatus {
            next_seq,
            last_hash: last_hash.to_string(),
        }
    }

    /// A stream with `lines` sent and acknowledged one chunk each.
    fn shipped(lines: &[&[u8]]) -> StreamState {
        let mut st = StreamState::new("s", "cast");
        for line in lines {
            let p = st.plan(line, 1024).unwrap().unwrap();
            st.acknowledge(&p);
        }
        st
    }

    #[test]
    fn chunks_are_whole_lines_within_the_chunk_size() {
        assert_eq!(
            whole_lines(b"ab\ncd\nef", 1024),
            Some(6),
            "the partial line waits"
        );
        assert_eq!(
            whole_lines(b"ab\ncd\nef\n", 4),
            Some(3),
            "cut at the last newline that fits"
        );
        assert_eq!(
            whole_lines(b"abcdefgh\nij\n", 4),
            Some(9),
            "one line longer than a chunk goes whole"
        );
        assert_eq!(whole_lines(b"no newline yet", 4), None);
        assert_eq!(whole_lines(b"", 4), None);
    }

    #[test]
    fn a_plan_starts_at_the_acknowledged_offset_and_extends_the_chain() {
        let st = shipped(&[b"one\n"]);
        assert_eq!((st.next_seq, st.offset), (1, 4));
        let p = st.plan(b"two\nthr", 1024).unwrap().unwrap();
        assert_eq!(
            p,
            Pending {
                seq: 1,
                offset: 4,
                len: 4,
                hash: chain::next(&st.last_hash, b"two\n").unwrap(),
            }
        );
        assert_eq!(st.plan(b"partial", 1024), Ok(None));
    }

    #[test]
    fn acknowledging_moves_past_the_chunk() {
        let mut st = shipped(&[b"one\n"]);
        let p = st.plan(b"two\n", 1024).unwrap().unwrap();
        st.pending = vec![p.clone()];
        st.acknowledge(&p);
        assert_eq!(
            (
                st.next_seq,
                st.offset,
                st.last_hash.as_str(),
                st.pending.is_empty()
            ),
            (2, 8, p.hash.as_str(), true)
        );
    }

    #[test]
    fn a_new_stream_agrees_with_an_empty_collector() {
        let mut st = StreamState::new("s", "cast");
        assert_eq!(
            st.agree_with("s", "cast", &remote(0, &chain::genesis("s", "cast"))),
            Ok(Agreement::InStep)
        );
        assert!(st.synced);
    }

    #[test]
    fn after_a_crash_before_the_answer_a_chunk_the_collector_holds_is_acknowledged() {
        let mut st = shipped(&[b"one\n"]);
        let p = st.plan(b"two\n", 1024).unwrap().unwrap();
        st.pending = vec![p.clone()];
        // The collector stored it; this host died before writing that down.
        assert_eq!(
            st.agree_with("s", "cast", &remote(2, &p.hash)),
            Ok(Agreement::InStep)
        );
        assert_eq!((st.next_seq, st.offset, st.pending.clone()), (2, 8, vec![]));
        assert_eq!(st.last_hash, p.hash);
    }

    #[test]
    fn after_a_crash_before_the_send_the_plan_stays_to_be_sent_again() {
        let mut st = shipped(&[b"one\n"]);
        let p = st.plan(b"two\n", 1024).unwrap().unwrap();
        st.pending = vec![p.clone()];
        let before = st.last_hash.clone();
        assert_eq!(
            st.agree_with("s", "cast", &remote(1, &before)),
            Ok(Agreement::InStep)
        );
        assert_eq!(
            st.pending,
            vec![p],
            "the same bytes go again under the same number"
        );
        assert_eq!((st.next_seq, st.offset), (1, 4));
    }

    #[test]
    fn a_collector_that_holds_nothing_gets_the_stream_again_from_the_start() {
        let mut st = shipped(&[b"one\n", b"two\n"]);
        st.pending = vec![st.plan(b"three\n", 1024).unwrap().unwrap()];
        assert_eq!(
            st.agree_with("s", "cast", &remote(0, &chain::genesis("s", "cast"))),
            Ok(Agreement::FromTheStart)
        );
        assert_eq!(
            st,
            StreamState {
                synced: true,
                ..StreamState::new("s", "cast")
            }
        );
    }

    #[test]
    fn a_collector_with_another_stream_is_not_sent_to() {
        let mut st = shipped(&[b"one\n", b"two\n"]);
        let kept = st.clone();
        let other = chain::next(&chain::genesis("s", "cast"), b"forged\n").unwrap();
        assert_eq!(
            st.agree_with("s", "cast", &remote(1, &other)),
            Err(Diverged {
                remote_chunks: 1,
                local_chunks: 2
            })
        );
        assert_eq!(
            st.agree_with("s", "cast", &remote(5, &other)),
            Err(Diverged {
                remote_chunks: 5,
                local_chunks: 2
            })
        );
        assert_eq!(st, kept, "nothing is changed or marked agreed");
    }

    #[test]
    fn a_plan_the_collector_holds_under_another_hash_is_not_acknowledged() {
        let mut st = shipped(&[b"one\n"]);
        st.pending = vec![st.plan(b"two\n", 1024).unwrap().unwrap()];
        let other = chain::next(&st.last_hash, b"else\n").unwrap();
        assert!(st.agree_with("s", "cast", &remote(2, &other)).is_err());
        assert!(!st.pending.is_empty());
    }

    #[test]
    fn the_saved_state_survives_a_restart_but_not_the_agreement() {
        let mut state = ShipState::default();
        let st = state.stream("s", "cast");
        let p = st.plan(b"one\n", 1024).unwrap().unwrap();
        st.acknowledge(&p);
        st.pending = vec![st.plan(b"two\n", 1024).unwrap().unwrap()];
        st.synced = true;
        state.meta_sent = Some("{}".into());
        let saved = serde_json::to_vec(&state).unwrap();
        let mut restarted = ShipState::from_saved(Some(&saved));
        assert!(
            !restarted.streams["cast"].synced,
            "asked again after a restart"
        );
        state.forget_agreement();
        assert_eq!(restarted, state);
        assert_eq!(restarted.stream("s", "cast").offset, 4);
    }

    #[test]
    fn a_missing_or_garbled_state_file_starts_over() {
        assert_eq!(ShipState::from_saved(None), ShipState::default());
        assert_eq!(ShipState::from_saved(Some(b"{trunc")), ShipState::default());
        let mut state = ShipState::default();
        assert_eq!(
            state.stream("s", "audit").last_hash,
            chain::genesis("s", "audit")
        );
    }

    #[test]
    fn a_stream_is_done_when_acknowledged_to_the_files_end() {
        let mut state = ShipState::default();
        assert!(
            !state.acknowledged_to("cast", 0),
            "a stream never started is not"
        );
        let st = state.stream("s", "cast");
        let p = st.plan(b"one\ntw", 1024).unwrap().unwrap();
        st.acknowledge(&p);
        assert!(!state.acknowledged_to("cast", 6));
        assert!(state.acknowledged_to("cast", 4));
    }

    #[test]
    fn the_seal_lists_each_streams_chunks_and_last_hash() {
        let mut state = ShipState::default();
        let st = state.stream("s", "cast");
        let p = st.plan(b"one\n", 1024).unwrap().unwrap();
        st.acknowledge(&p);
        state.stream("s", "audit");
        let ends = state.stream_ends();
        assert_eq!(
            ends["cast"],
            StreamEnd {
                chunks: 1,
                last_hash: p.hash
            }
        );
        assert_eq!(
            ends["audit"],
            StreamEnd {
                chunks: 0,
                last_hash: chain::genesis("s", "audit")
            }
        );
    }

    fn cutting(chunk_bytes: usize, max_chunks: usize) -> Cutting {
        Cutting {
            chunk_bytes,
            max_chunks,
        }
    }

    #[test]
    fn several_chunks_are_planned_at_once_each_chained_to_the_one_before() {
        let st = shipped(&[b"zero\n"]);
        let planned = st
            .plan_chunks(b"one\ntwo\nthree\nfour\nhalf", cutting(8, 3))
            .unwrap();
        let lens: Vec<u64> = planned.iter().map(|p| p.len).collect();
        assert_eq!(lens, [8, 6, 5], "one\\ntwo\\n, three\\n, four\\n");
        assert_eq!(planned[0].offset, 5);
        assert_eq!(planned[1].offset, 13);
        assert_eq!(planned[2].seq, 3);
        // The same chain as acknowledging them one by one.
        let mut one_by_one = st.clone();
        for (p, bytes) in planned
            .iter()
            .zip([&b"one\ntwo\n"[..], b"three\n", b"four\n"])
        {
            let q = one_by_one.plan(bytes, 8).unwrap().unwrap();
            assert_eq!(&q, p);
            one_by_one.acknowledge(&q);
        }
        let limited = st.plan_chunks(b"one\ntwo\nthree\n", cutting(8, 1)).unwrap();
        assert_eq!(limited.len(), 1);
        assert_eq!(st.plan_chunks(b"no newline", cutting(8, 4)), Ok(vec![]));
    }

    #[test]
    fn a_line_longer_than_a_chunk_can_be_is_told_apart_from_a_partial_one() {
        let st = StreamState::new("s", "desktop");
        let mut long = vec![b'x'; MAX_CHUNK + 1];
        assert_eq!(
            st.plan_chunks(&long, cutting(1024, 4)),
            Err(PlanError::LineTooLong)
        );
        long.truncate(MAX_CHUNK - 1);
        long.push(b'\n');
        let planned = st.plan_chunks(&long, cutting(1024, 4)).unwrap();
        assert_eq!(planned.len(), 1);
        assert_eq!(
            planned[0].len, MAX_CHUNK as u64,
            "the longest line that fits"
        );
        assert_eq!(
            st.plan_chunks(b"partial", cutting(1024, 4)),
            Ok(vec![]),
            "the rest of the line is not written yet"
        );
    }

    #[test]
    fn acknowledging_a_later_planned_chunk_acknowledges_those_before_it() {
        let mut st = shipped(&[b"zero\n"]);
        st.pending = st.plan_chunks(b"a\nb\nc\n", cutting(2, 3)).unwrap();
        let second = st.pending[1].clone();
        // The collector holds the first two (the agent died before hearing it).
        assert_eq!(
            st.agree_with("s", "cast", &remote(3, &second.hash)),
            Ok(Agreement::InStep)
        );
        assert_eq!((st.next_seq, st.offset), (3, 9));
        assert_eq!(st.pending.len(), 1);
        assert_eq!(st.pending[0].seq, 3);
    }

    #[test]
    fn a_state_file_of_an_earlier_agent_with_one_pending_chunk_is_read() {
        let p = Pending {
            seq: 0,
            offset: 0,
            len: 4,
            hash: "ab".into(),
        };
        let one = serde_json::json!({"streams": {"cast": {"next_seq": 0, "offset": 0, "last_hash": "g", "pending": p}}, "meta_sent": null});
        let state = ShipState::from_saved(Some(one.to_string().as_bytes()));
        assert_eq!(state.streams["cast"].pending, vec![p.clone()]);
        let none = serde_json::json!({"streams": {"cast": {"next_seq": 0, "offset": 0, "last_hash": "g", "pending": null}}});
        let state = ShipState::from_saved(Some(none.to_string().as_bytes()));
        assert!(state.streams["cast"].pending.is_empty());
        let mut many = ShipState::default();
        many.stream("s", "cast").pending = vec![p.clone(), p];
        let saved = serde_json::to_vec(&many).unwrap();
        assert_eq!(ShipState::from_saved(Some(&saved)), many);
    }
}
