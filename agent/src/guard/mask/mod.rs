//! Streaming, split-proof masking of a session's text (see ../README.md).
//!
//! How a stream goes through (`Masker`):
//! 1. `text::TextView` decodes the bytes into text (escape sequences and incomplete
//!    characters are not text) with a map back to the raw bytes.
//! 2. The detectors run as one leftmost-first multi-pattern regex from the scan position.
//!    A match is final when no candidate that starts at or before it can still grow: the
//!    *hold point* is the first position whose anchored DFA (all rules) is not dead after
//!    the last text seen. Matches that start before it are validated (Luhn, mod 97, JWT
//!    header) and masked; the text before the hold point goes out.
//! 3. What is held goes out when it can no longer match, at the end of a read that drained
//!    its source if nothing in it is evidence of a secret, after `HOLD` if something is,
//!    or when more than `HOLD_BYTES` are held. A release does not move the scan position:
//!    if the candidate then completes, its part not yet given out is masked.
//! 4. `-----BEGIN ... PRIVATE KEY-----` switches to block mode: every character up to
//!    `-----END` (or 64 KiB) is masked as it comes.

use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regex_automata::hybrid::dfa::{Cache as DfaCache, DFA};
use regex_automata::meta;
use regex_automata::{Anchored, Input, PatternID};
use unicode_width::UnicodeWidthChar;

mod rules;
#[cfg(test)]
mod tests;
mod text;

use rules::{Rule, Secret};
use text::{TextView, INVALID};

/// How long text that could still become a secret is held back at most.
pub const HOLD: Duration = Duration::from_millis(25);
/// How much text is held back at most.
pub const HOLD_BYTES: usize = 512;

/// How far back a candidate still alive is followed (a match longer than this from its
/// start is not found; the scan restarts within the last `MAX_MATCH` bytes).
const MAX_MATCH: u64 = 4096;
/// Look-behind context kept before the scan position (`\b` needs the previous character).
const CONTEXT: u64 = 8;
/// Large reads are processed in slices of this size, so memory stays bounded.
const SLICE: usize = 64 * 1024;
/// Raw bytes (escape sequences included) held at most.
const RAW_HOLD_MAX: u64 = 16 * 1024;
/// A private-key block longer than this ends (a missing END line must not mask forever).
const BLOCK_MAX: u64 = 64 * 1024;
const BLOCK_END: &[u8] = b"-----END";

/// `[mask]` of a profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MaskConfig {
    /// Built-in detectors by name (`credit_card`, `aws_access_key`, `email`, ...).
    #[serde(default)]
    pub detectors: Vec<String>,
    /// Regular expressions (Rust `regex` syntax) matched against the text.
    #[serde(default)]
    pub patterns: Vec<String>,
}

/// A `[mask]` that cannot be used; the profile does not load.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MaskConfigError {
    #[error("mask.detectors: unknown detector {0:?} (known: {1})")]
    UnknownDetector(String, String),
    #[error("mask.patterns: {0:?} is not a regular expression: {1}")]
    BadPattern(String, String),
    #[error("mask.patterns: {0:?} matches the empty string")]
    EmptyMatch(String),
}

/// The compiled rules of one profile, shared by every stream of its sessions.
#[derive(Debug)]
pub struct MaskRules {
    rules: Vec<Rule>,
    /// All rules, leftmost-first, pattern i = rules[i].
    search: Option<meta::Regex>,
    /// The same rules as a lazy DFA with an anchored start per pattern: "can a match still
    /// start here?"
    prefix: Option<DFA>,
}

impl MaskRules {
    pub fn compile(config: &MaskConfig) -> Result<Arc<MaskRules>, MaskConfigError> {
        let mut rules = Vec::new();
        for name in &config.detectors {
            let rule = rules::builtin(name).ok_or_else(|| {
                MaskConfigError::UnknownDetector(name.clone(), rules::DETECTORS.join(", "))
            })?;
            if !rules.iter().any(|r: &Rule| r.name == rule.name) {
                rules.push(rule);
            }
        }
        for pattern in &config.patterns {
            let rule = rules::user_pattern(pattern)?;
            // Built alone first so that an error names its pattern.
            meta::Regex::new(pattern)
                .map_err(|e| MaskConfigError::BadPattern(pattern.clone(), e.to_string()))?;
            DFA::builder()
                .configure(DFA::config().unicode_word_boundary(true))
                .build(pattern)
                .map_err(|e| MaskConfigError::BadPattern(pattern.clone(), e.to_string()))?;
            rules.push(rule);
        }
        if rules.is_empty() {
            return Ok(Arc::new(MaskRules {
                rules,
                search: None,
                prefix: None,
            }));
        }
        let patterns: Vec<&str> = rules.iter().map(|r| r.pattern.as_str()).collect();
        let all = || patterns.join(" | ");
        let search = meta::Regex::new_many(&patterns)
            .map_err(|e| MaskConfigError::BadPattern(all(), e.to_string()))?;
        let prefix = DFA::builder()
            .configure(
                DFA::config()
                    .starts_for_each_pattern(true)
                    .unicode_word_boundary(true),
            )
            .build_many(&patterns)
            .map_err(|e| MaskConfigError::BadPattern(all(), e.to_string()))?;
        Ok(Arc::new(MaskRules {
            rules,
            search: Some(search),
            prefix: Some(prefix),
        }))
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The names of the rules, in the order of their pattern ids.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|r| r.name.as_str())
    }
}

/// What one call of the masker gives back.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Masked {
    /// Bytes that may go out now (to the client and the recording).
    pub out: Vec<u8>,
    /// (rule name, matches masked) for this call, for the `masked` audit event.
    pub hits: Vec<(String, u32)>,
    /// The stream just started drawing by cursor positioning (alternate screen): said once.
    pub full_screen: bool,
}

/// A private-key block being masked.
#[derive(Debug, Clone, Copy)]
struct Block {
    /// Text before this is masked (or given out).
    cursor: u64,
    /// The block ends here at the latest.
    limit: u64,
}

/// The result of running an anchored DFA from a start to the end of the text.
enum Run {
    Dead,
    Alive,
}

/// One stream's masker.
pub struct Masker {
    rules: Arc<MaskRules>,
    view: TextView,
    search_cache: Option<meta::Cache>,
    dfa_cache: Option<DfaCache>,
    /// Where the leftmost-first search goes on: no match starts before it that is not
    /// already dealt with.
    scan: u64,
    /// Text given out before this (masked where it had to be).
    emitted: u64,
    /// The first start that may still begin a match (an anchored run was alive there).
    alive_from: Option<u64>,
    /// Starts before this are known dead (a dead anchored run stays dead).
    dead_below: u64,
    block: Option<Block>,
    /// Text ranges to mask, sorted, disjoint, at or after `emitted`.
    masks: VecDeque<(u64, u64)>,
    /// Matches masked by a release before they were final (start, rule): counted once.
    provisional: Vec<(u64, usize)>,
    /// When the oldest text held with evidence was first held.
    held_since: Option<Instant>,
    hits: Vec<u32>,
    full_screen_said: bool,
}

impl Masker {
    pub fn new(rules: Arc<MaskRules>) -> Masker {
        let search_cache = rules.search.as_ref().map(|r| r.create_cache());
        let dfa_cache = rules.prefix.as_ref().map(|d| d.create_cache());
        let hits = vec![0; rules.rules.len()];
        Masker {
            rules,
            view: TextView::new(),
            search_cache,
            dfa_cache,
            scan: 0,
            emitted: 0,
            alive_from: None,
            dead_below: 0,
            block: None,
            masks: VecDeque::new(),
            provisional: Vec::new(),
            held_since: None,
            hits,
            full_screen_said: false,
        }
    }

    /// Masks `input` (read at `now`). `drained`: the read did not fill its buffer (nothing
    /// more was waiting), so text held without evidence may go.
    pub fn push(&mut self, input: &[u8], now: Instant, drained: bool) -> Masked {
        let mut out = Vec::with_capacity(input.len() + 16);
        for slice in input.chunks(SLICE) {
            self.view.append(slice);
            self.step(&mut out, false);
        }
        // A read that filled its buffer is followed at once by the next one: only at the
        // end of a burst does it matter whether what is held is worth waiting for.
        if drained && self.held() {
            if !self.held_with_evidence() {
                self.release_all(&mut out);
            } else if self.held_since.is_none() {
                self.held_since = Some(now);
            }
        }
        if self.deadline().is_some_and(|d| now >= d) {
            self.release_all(&mut out);
        }
        self.settle_hold();
        self.masked(out)
    }

    /// When held text must go out at the latest (`release` then), if any is held.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.held() {
            return None;
        }
        self.held_since.map(|t| t + HOLD)
    }

    /// Releases what is held past its deadline at `now`.
    pub fn release(&mut self, now: Instant) -> Masked {
        let mut out = Vec::new();
        if self.deadline().is_some_and(|d| now >= d) {
            self.release_all(&mut out);
        }
        self.settle_hold();
        self.masked(out)
    }

    /// The end of the stream: everything held goes out (masked where it matches).
    pub fn finish(&mut self) -> Masked {
        let mut out = Vec::new();
        self.view.finish();
        self.step(&mut out, true);
        let end = self.view.text_end();
        self.emit(&mut out, end);
        self.held_since = None;
        self.masked(out)
    }

    fn masked(&mut self, out: Vec<u8>) -> Masked {
        let hits = self
            .hits
            .iter_mut()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, n)| (self.rules.rules[i].name.clone(), std::mem::take(n)))
            .collect();
        let full_screen = self.view.full_screen && !self.full_screen_said;
        self.full_screen_said |= full_screen;
        Masked {
            out,
            hits,
            full_screen,
        }
    }

    /// Whether any text (or escape bytes after it) is held.
    fn held(&self) -> bool {
        self.view.raw_base < self.view.raw_tokenized
    }

    fn settle_hold(&mut self) {
        if !self.held() {
            self.held_since = None;
        }
    }

    /// Settles what can be, gives it out, and bounds what stays held.
    fn step(&mut self, out: &mut Vec<u8>, eoi: bool) {
        let end = self.view.text_end();
        let mut upto = if self.rules.is_empty() {
            end
        } else {
            self.settle(eoi)
        };
        if end - upto.max(self.emitted) > HOLD_BYTES as u64 {
            upto = self.view.boundary_up(end - HOLD_BYTES as u64);
        }
        self.emit(out, upto);
        if self.view.raw_tokenized - self.view.raw_base > RAW_HOLD_MAX {
            self.release_all(out);
        }
        self.trim();
    }

    /// Masks what can no longer change and returns the hold point: text before it is final.
    fn settle(&mut self, eoi: bool) -> u64 {
        let end = self.view.text_end();
        let mut known_hold: Option<u64> = None;
        loop {
            if let Some(block) = self.block {
                match self.settle_block(block, eoi) {
                    Some(hold) => return hold,
                    None => continue,
                }
            }
            // The first alive start stays the first one as long as the scan has not passed
            // it (a final match before it does not change which starts are alive).
            let hold = match known_hold {
                Some(h) if h >= self.scan => h,
                _ if eoi => end,
                _ => self.first_alive(end),
            };
            known_hold = Some(hold);
            let Some(m) = self.find(self.scan, end) else {
                self.scan = hold;
                return hold;
            };
            if m.start() as u64 + self.view.text_base >= hold {
                self.scan = hold;
                return hold;
            }
            let (start, stop) = (
                self.view.text_base + m.start() as u64,
                self.view.text_base + m.end() as u64,
            );
            self.scan = self.apply(m.pattern().as_usize(), start, stop, true);
        }
    }

    /// Block mode: masks up to `-----END` (or the block's limit); `Some(hold)` while the
    /// block goes on, `None` when it ended (the scan resumes at the END line).
    fn settle_block(&mut self, block: Block, eoi: bool) -> Option<u64> {
        let end = self.view.text_end();
        let seen = self.view.slice(block.cursor, end);
        let found = memchr::memmem::find(seen, BLOCK_END).map(|i| block.cursor + i as u64);
        let stop = found.unwrap_or(end).min(block.limit);
        if found.is_some() || stop == block.limit {
            self.add_mask(block.cursor, stop);
            self.block = None;
            self.scan = self.scan.max(stop);
            self.alive_from = None;
            return None;
        }
        let keep = if eoi {
            0
        } else {
            partial_suffix(seen, BLOCK_END) as u64
        };
        let upto = end - keep;
        self.add_mask(block.cursor, upto);
        // Nothing is searched inside the block: the text before its cursor can go.
        self.scan = self.scan.max(upto);
        self.block = Some(Block {
            cursor: upto,
            ..block
        });
        Some(upto)
    }

    /// The first start at or after the scan position, within the last `HOLD_BYTES` (or
    /// followed from earlier while alive), from which a match can still begin.
    fn first_alive(&mut self, end: u64) -> u64 {
        if let Some(start) = self.alive_from.take() {
            // Followed while alive, up to `MAX_MATCH` back (this bounds the window).
            if start >= self.scan && start + MAX_MATCH >= end {
                if let Run::Alive = self.run_anchored(start, end, Anchored::Yes) {
                    self.alive_from = Some(start);
                    return start;
                }
                self.dead_below = self.dead_below.max(start + 1);
            }
        }
        let mut s = self
            .scan
            .max(self.dead_below)
            .max(end.saturating_sub(HOLD_BYTES as u64));
        while s < end {
            if self.view.is_boundary(s) {
                if let Run::Alive = self.run_anchored(s, end, Anchored::Yes) {
                    self.alive_from = Some(s);
                    self.dead_below = s;
                    return s;
                }
            }
            s += 1;
        }
        self.dead_below = end;
        end
    }

    /// Runs the prefix DFA anchored at `start` over the text to `end`.
    fn run_anchored(&mut self, start: u64, end: u64, anchored: Anchored) -> Run {
        let (Some(dfa), Some(cache)) = (self.rules.prefix.as_ref(), self.dfa_cache.as_mut()) else {
            return Run::Dead;
        };
        let base = self.view.text_base;
        let hay = &self.view.text[..(end - base) as usize];
        let input = Input::new(hay)
            .span((start - base) as usize..(end - base) as usize)
            .anchored(anchored);
        // A DFA that gives up (a Unicode word boundary next to non-ASCII text) cannot say
        // "dead": the candidate is held, which is the safe side.
        let Ok(mut sid) = dfa.start_state_forward(cache, &input) else {
            return Run::Alive;
        };
        for &b in &hay[(start - base) as usize..] {
            sid = match dfa.next_state(cache, sid, b) {
                Ok(sid) => sid,
                Err(_) => return Run::Alive,
            };
            if sid.is_dead() {
                return Run::Dead;
            }
            if sid.is_quit() {
                return Run::Alive;
            }
        }
        // Matches show one byte late: a match state whose every transition is dead has
        // nothing more to wait for (`AKIA...EXAMPLE\n` is final at the newline).
        if sid.is_match() {
            let clears = cache.clear_count();
            for unit in dfa.byte_classes().representatives(..) {
                let Some(b) = unit.as_u8() else { continue };
                match dfa.next_state(cache, sid, b) {
                    Ok(next) if next.is_dead() && cache.clear_count() == clears => {}
                    _ => return Run::Alive,
                }
            }
            return Run::Dead;
        }
        Run::Alive
    }

    fn find(&mut self, from: u64, end: u64) -> Option<regex_automata::Match> {
        let (Some(search), Some(cache)) = (self.rules.search.as_ref(), self.search_cache.as_mut())
        else {
            return None;
        };
        if from >= end {
            return None;
        }
        let base = self.view.text_base;
        let hay = &self.view.text[..(end - base) as usize];
        let input = Input::new(hay).span((from - base) as usize..(end - base) as usize);
        search.search_with(cache, &input)
    }

    /// A match of rule `rule` over `[start, stop)`: validated, its secret masked, counted.
    /// Returns where the search goes on: after the match, or at its secret when a label
    /// comes first (the `Bearer` token may itself be `aws_secret_access_key=...`, which
    /// the search must still see).
    fn apply(&mut self, rule: usize, start: u64, stop: u64, is_final: bool) -> u64 {
        let after = stop.max(start + 1);
        let r = &self.rules.rules[rule];
        let Some((a, b)) = r.secret_in(self.view.slice(start, stop)) else {
            return after;
        };
        // A number cut back to its valid part (`4111 ... 1111 4111 ...`: the next card
        // starts where the first ends) goes on after that part.
        let resume = if r.secret == Secret::BlockStart {
            after
        } else if a > 0 {
            start + a as u64
        } else if start + (b as u64) < stop {
            start + b as u64
        } else {
            after
        };
        let counted = if is_final {
            match self.provisional.iter().position(|&p| p == (start, rule)) {
                Some(i) => {
                    self.provisional.swap_remove(i);
                    true
                }
                None => false,
            }
        } else if self.provisional.contains(&(start, rule)) {
            true
        } else {
            self.provisional.push((start, rule));
            false
        };
        if r.secret == Secret::BlockStart {
            if is_final {
                self.block = Some(Block {
                    cursor: stop,
                    limit: stop + BLOCK_MAX,
                });
                self.alive_from = None;
            }
        } else {
            self.add_mask(start + a as u64, start + b as u64);
        }
        if !counted {
            self.hits[rule] += 1;
        }
        resume
    }

    fn add_mask(&mut self, start: u64, stop: u64) {
        let start = self.view.boundary_down(start.max(self.emitted));
        let stop = self.view.boundary_up(stop);
        if start >= stop {
            return;
        }
        let i = self.masks.partition_point(|&(_, e)| e < start);
        let mut merged = (start, stop);
        while let Some(&(s, e)) = self.masks.get(i) {
            if s > merged.1 {
                break;
            }
            merged = (merged.0.min(s), merged.1.max(e));
            self.masks.remove(i);
        }
        self.masks.insert(i, merged);
    }

    /// Whether some candidate in the held text carries evidence of a secret.
    fn held_with_evidence(&mut self) -> bool {
        let end = self.view.text_end();
        if self.block.is_some() {
            return true;
        }
        let from = self
            .alive_from
            .unwrap_or(end)
            .max(self.scan)
            .max(end.saturating_sub(HOLD_BYTES as u64));
        let rules = Arc::clone(&self.rules);
        let mut s = from;
        while s < end {
            if self.view.is_boundary(s) {
                for (i, rule) in rules.rules.iter().enumerate() {
                    if rule.evidence_in(self.view.slice(s, end)) {
                        let pattern = Anchored::Pattern(PatternID::new_unchecked(i));
                        if let Run::Alive = self.run_anchored(s, end, pattern) {
                            return true;
                        }
                    }
                }
            }
            s += 1;
        }
        false
    }

    /// Gives out everything held: candidates that match as they stand are masked (the
    /// scan position stays, so a candidate that completes later is masked from here on).
    fn release_all(&mut self, out: &mut Vec<u8>) {
        let end = self.view.text_end();
        if self.block.is_none() && !self.rules.is_empty() {
            // Matches before the scan position were dealt with by `settle`.
            let mut at = self.scan;
            while let Some(m) = self.find(at, end) {
                let (start, stop) = (
                    self.view.text_base + m.start() as u64,
                    self.view.text_base + m.end() as u64,
                );
                at = self.apply(m.pattern().as_usize(), start, stop, false);
            }
        }
        self.emit(out, end);
        self.held_since = None;
        self.trim();
    }

    /// Gives out text up to `upto` (and the escape bytes before it; all tokenized raw bytes
    /// when `upto` is the end of the text).
    fn emit(&mut self, out: &mut Vec<u8>, upto: u64) {
        let end = self.view.text_end();
        let upto = upto.max(self.emitted).min(end);
        let raw_target = if upto == end {
            self.view.raw_tokenized
        } else {
            self.view.raw_of(upto)
        };
        let mut raw_at = self.view.raw_base;
        let mut t = self.emitted;
        while self.masks.front().is_some_and(|&(_, e)| e <= t) {
            self.masks.pop_front();
        }
        if self.masks.front().is_none_or(|&(s, _)| s >= upto) {
            // Nothing to mask in it (the usual case): the raw bytes as they are.
            out.extend_from_slice(self.view.raw_slice(raw_at, raw_target));
            raw_at = raw_target;
        }
        while raw_at < raw_target {
            if t >= upto {
                out.extend_from_slice(self.view.raw_slice(raw_at, raw_target));
                raw_at = raw_target;
                continue;
            }
            let rt = self.view.raw_of(t);
            if raw_at < rt {
                out.extend_from_slice(self.view.raw_slice(raw_at, rt));
            }
            while self.masks.front().is_some_and(|&(_, e)| e <= t) {
                self.masks.pop_front();
            }
            let (masked, mask_edge) = match self.masks.front() {
                Some(&(s, e)) if s <= t => (true, e),
                Some(&(s, _)) => (false, s),
                None => (false, u64::MAX),
            };
            let stop = upto.min(self.view.run_end(t)).min(mask_edge);
            let len = stop - t;
            if masked {
                self.stars(out, t, stop, rt);
            } else {
                out.extend_from_slice(self.view.raw_slice(rt, rt + len));
            }
            raw_at = rt + len;
            t = stop;
        }
        self.emitted = upto;
        self.view.trim(self.view.text_base, raw_at);
    }

    /// Text `[from, to)` (raw bytes from `raw`) as `*` of the same display width; controls
    /// stay as they are (line structure, tabs).
    fn stars(&self, out: &mut Vec<u8>, from: u64, to: u64, raw: u64) {
        let text = self.view.slice(from, to);
        let Ok(s) = std::str::from_utf8(text) else {
            out.extend(std::iter::repeat_n(b'*', text.len()));
            return;
        };
        for (i, c) in s.char_indices() {
            let raw_byte = self.view.raw_byte(raw + i as u64);
            if c as u32 == u32::from(INVALID) && raw_byte != INVALID {
                out.push(b'*');
            } else if c.is_control() {
                out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes());
            } else {
                out.extend(std::iter::repeat_n(b'*', c.width().unwrap_or(0)));
            }
        }
    }

    /// Forgets text that no search, block or emission needs any more.
    fn trim(&mut self) {
        let mut keep = self.scan.min(self.emitted);
        if let Some(b) = self.block {
            keep = keep.min(b.cursor);
        }
        let keep = self
            .view
            .boundary_down(keep.saturating_sub(CONTEXT).max(self.view.text_base));
        let raw = self.view.raw_base;
        self.view.trim(keep, raw);
        self.provisional.retain(|&(s, _)| s >= keep);
    }
}

/// The length of the longest suffix of `seen` that is a proper prefix of `marker`.
fn partial_suffix(seen: &[u8], marker: &[u8]) -> usize {
    (1..marker.len().min(seen.len() + 1))
        .rev()
        .find(|&k| seen.ends_with(&marker[..k]))
        .unwrap_or(0)
}
