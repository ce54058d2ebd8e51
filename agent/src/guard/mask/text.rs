//! The text view of a byte stream: what a terminal would print, without its escape
//! sequences, with a map back to the raw bytes so that the output keeps every byte that is
//! not masked exactly where it was.
//!
//! - Escape sequences (CSI, OSC/DCS/SOS/PM/APC strings ended by BEL or ST, two-byte and
//!   nF `ESC x`) are not text; they stay in the raw bytes between the characters.
//! - A UTF-8 character cut between reads waits for its remaining bytes; a byte that is not
//!   part of a valid character becomes `INVALID` in the text (one per byte), so it breaks
//!   every candidate of the built-in detectors.
//! - Controls (CR, LF, TAB, ...) are text: no built-in expression matches them.

use std::collections::VecDeque;

/// What an invalid byte is in the text view (SUB, a control no detector matches).
pub(super) const INVALID: u8 = 0x1a;

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;
/// CSI parameters kept for the full-screen test (longer ones are not cursor moves).
const CSI_PARAMS_MAX: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Escape {
    Ground,
    /// After ESC.
    Esc,
    /// ESC followed by intermediate bytes (0x20..=0x2f), waiting for the final byte.
    EscIntermediate,
    /// ESC [ ...
    Csi,
    /// OSC (`osc`: BEL ends it too), DCS, SOS, PM, APC: until ST.
    Str {
        osc: bool,
    },
    /// ESC inside a string: `\` ends the string, anything else starts a new sequence.
    StrEsc {
        osc: bool,
    },
}

#[derive(Debug)]
pub(super) struct TextView {
    /// Raw bytes not yet given out; `raw[0]` is stream byte `raw_base`.
    pub raw: Vec<u8>,
    pub raw_base: u64,
    /// Every raw byte before this is text or part of an escape sequence (the rest is the
    /// start of a UTF-8 character still incomplete).
    pub raw_tokenized: u64,
    /// Text of the window; `text[0]` is text byte `text_base`.
    pub text: Vec<u8>,
    pub text_base: u64,
    /// (text position, raw position) where the text resumes after raw bytes that are not
    /// text: between two entries, text and raw advance together.
    breaks: VecDeque<(u64, u64)>,
    escape: Escape,
    csi: Vec<u8>,
    /// The start of a UTF-8 character still incomplete, and its raw position.
    pending: Vec<u8>,
    pending_at: u64,
    /// The stream switched to the alternate screen or positioned the cursor.
    pub full_screen: bool,
}

impl TextView {
    pub fn new() -> TextView {
        TextView {
            raw: Vec::new(),
            raw_base: 0,
            raw_tokenized: 0,
            text: Vec::new(),
            text_base: 0,
            breaks: VecDeque::from([(0, 0)]),
            escape: Escape::Ground,
            csi: Vec::new(),
            pending: Vec::new(),
            pending_at: 0,
            full_screen: false,
        }
    }

    pub fn text_end(&self) -> u64 {
        self.text_base + self.text.len() as u64
    }

    pub fn raw_end(&self) -> u64 {
        self.raw_base + self.raw.len() as u64
    }

    /// Text between two stream positions.
    pub fn slice(&self, from: u64, to: u64) -> &[u8] {
        &self.text[(from - self.text_base) as usize..(to - self.text_base) as usize]
    }

    /// Whether text position `at` starts a character.
    pub fn is_boundary(&self, at: u64) -> bool {
        match self.text.get((at - self.text_base) as usize) {
            Some(b) => (b & 0xc0) != 0x80,
            None => true,
        }
    }

    /// The first character boundary at or after `at`.
    pub fn boundary_up(&self, mut at: u64) -> u64 {
        while at < self.text_end() && !self.is_boundary(at) {
            at += 1;
        }
        at
    }

    /// The last character boundary at or before `at`.
    pub fn boundary_down(&self, mut at: u64) -> u64 {
        while at > self.text_base && !self.is_boundary(at) {
            at -= 1;
        }
        at
    }

    /// The raw position of text byte `at` (which must be in the window).
    pub fn raw_of(&self, at: u64) -> u64 {
        let i = self.breaks.partition_point(|&(t, _)| t <= at);
        let (t, r) = self.breaks[i.saturating_sub(1)];
        r + (at - t)
    }

    /// The text position where the run that contains `at` ends (the next break).
    pub fn run_end(&self, at: u64) -> u64 {
        let i = self.breaks.partition_point(|&(t, _)| t <= at);
        match self.breaks.get(i) {
            Some(&(t, _)) => t,
            None => self.text_end(),
        }
    }

    /// Appends stream bytes and decodes them.
    pub fn append(&mut self, input: &[u8]) {
        let start = self.raw_end();
        self.raw.extend_from_slice(input);
        let mut i = 0;
        let n = input.len();
        while i < n {
            match self.escape {
                Escape::Ground => {
                    let stop = memchr::memchr(ESC, &input[i..]).map_or(n, |k| i + k);
                    if stop > i {
                        self.text_run(&input[i..stop], start + i as u64, stop == n);
                    }
                    i = stop;
                    if i < n {
                        self.invalidate_pending();
                        self.escape = Escape::Esc;
                        i += 1;
                    }
                }
                Escape::Str { osc } => {
                    let stop = if osc {
                        memchr::memchr2(BEL, ESC, &input[i..])
                    } else {
                        memchr::memchr(ESC, &input[i..])
                    };
                    match stop {
                        None => i = n,
                        Some(k) => {
                            self.escape = if input[i + k] == BEL {
                                Escape::Ground
                            } else {
                                Escape::StrEsc { osc }
                            };
                            i += k + 1;
                        }
                    }
                }
                state => {
                    let b = input[i];
                    if self.escape_byte(state, b) {
                        i += 1;
                    }
                }
            }
        }
        self.raw_tokenized = if self.pending.is_empty() {
            self.raw_end()
        } else {
            self.pending_at
        };
    }

    /// The end of the stream: an incomplete character is invalid bytes.
    pub fn finish(&mut self) {
        self.invalidate_pending();
        self.raw_tokenized = self.raw_end();
    }

    /// One byte of an escape sequence; false when the byte is not consumed (it ended the
    /// sequence and must be read again as text).
    fn escape_byte(&mut self, state: Escape, b: u8) -> bool {
        match state {
            Escape::Esc => match b {
                b'[' => {
                    self.csi.clear();
                    self.escape = Escape::Csi;
                }
                b']' => self.escape = Escape::Str { osc: true },
                b'P' | b'X' | b'^' | b'_' => self.escape = Escape::Str { osc: false },
                0x20..=0x2f => self.escape = Escape::EscIntermediate,
                0x30..=0x7e => self.escape = Escape::Ground,
                ESC => self.escape = Escape::Esc,
                _ => {
                    self.escape = Escape::Ground;
                    return false;
                }
            },
            Escape::EscIntermediate => match b {
                0x20..=0x2f => {}
                0x30..=0x7e => self.escape = Escape::Ground,
                ESC => self.escape = Escape::Esc,
                _ => {
                    self.escape = Escape::Ground;
                    return false;
                }
            },
            Escape::Csi => match b {
                0x20..=0x3f => {
                    if self.csi.len() < CSI_PARAMS_MAX {
                        self.csi.push(b);
                    }
                }
                0x40..=0x7e => {
                    self.csi_final(b);
                    self.escape = Escape::Ground;
                }
                ESC => self.escape = Escape::Esc,
                _ => {
                    self.escape = Escape::Ground;
                    return false;
                }
            },
            Escape::StrEsc { .. } => {
                if b == b'\\' {
                    self.escape = Escape::Ground;
                } else {
                    // The ESC began a new sequence: read `b` as the byte after it.
                    self.escape = Escape::Esc;
                    return false;
                }
            }
            Escape::Ground | Escape::Str { .. } => unreachable!("handled by append"),
        }
        true
    }

    /// Alternate screen (`CSI ? 1049 h`, `? 47 h`, `? 1047 h`) or absolute cursor
    /// positioning (`CSI row ; col H` or `f`).
    fn csi_final(&mut self, final_byte: u8) {
        let params = &self.csi[..];
        let full = match final_byte {
            b'h' => match params.split_first() {
                Some((b'?', modes)) => modes
                    .split(|&b| b == b';')
                    .any(|m| m == b"1049" || m == b"47" || m == b"1047"),
                _ => false,
            },
            b'H' | b'f' => params.contains(&b';'),
            _ => false,
        };
        self.full_screen |= full;
    }

    /// Text bytes (no ESC among them) at raw position `at`; `at_end`: the run ends where
    /// the input ends, so a character cut there may still be completed.
    fn text_run(&mut self, mut run: &[u8], mut at: u64, at_end: bool) {
        if !self.pending.is_empty() {
            let need = utf8_len(self.pending[0]);
            let missing = need - self.pending.len();
            let cont = run
                .iter()
                .take(missing)
                .take_while(|&&b| (b & 0xc0) == 0x80)
                .count();
            if cont == missing {
                let mut ch = std::mem::take(&mut self.pending);
                ch.extend_from_slice(&run[..cont]);
                if std::str::from_utf8(&ch).is_ok() {
                    self.push_text(&ch, self.pending_at);
                } else {
                    for (k, _) in ch[..need - cont].iter().enumerate() {
                        self.push_text(&[INVALID], self.pending_at + k as u64);
                    }
                    // The bytes taken from `run` are read again below (invalid too).
                    self.pending.clear();
                    self.decode(run, at, at_end);
                    return;
                }
                run = &run[cont..];
                at += cont as u64;
            } else if cont == run.len() && at_end {
                self.pending.extend_from_slice(run);
                return;
            } else {
                self.invalidate_pending();
            }
        }
        self.decode(run, at, at_end);
    }

    fn decode(&mut self, mut run: &[u8], mut at: u64, at_end: bool) {
        loop {
            match std::str::from_utf8(run) {
                Ok(_) => {
                    self.push_text(run, at);
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    self.push_text(&run[..valid], at);
                    run = &run[valid..];
                    at += valid as u64;
                    match e.error_len() {
                        Some(bad) => {
                            for k in 0..bad {
                                self.push_text(&[INVALID], at + k as u64);
                            }
                            run = &run[bad..];
                            at += bad as u64;
                        }
                        None if at_end => {
                            self.pending.extend_from_slice(run);
                            self.pending_at = at;
                            return;
                        }
                        None => {
                            for k in 0..run.len() {
                                self.push_text(&[INVALID], at + k as u64);
                            }
                            return;
                        }
                    }
                }
            }
        }
    }

    fn invalidate_pending(&mut self) {
        let pending = std::mem::take(&mut self.pending);
        for k in 0..pending.len() {
            self.push_text(&[INVALID], self.pending_at + k as u64);
        }
    }

    fn push_text(&mut self, bytes: &[u8], at: u64) {
        if bytes.is_empty() {
            return;
        }
        let end = self.text_end();
        let (t, r) = *self.breaks.back().expect("breaks never empty");
        if r + (end - t) != at {
            self.breaks.push_back((end, at));
        }
        self.text.extend_from_slice(bytes);
    }

    /// Forgets text before `at` and raw bytes before `raw_at` (already given out).
    pub fn trim(&mut self, at: u64, raw_at: u64) {
        if at > self.text_base {
            let k = (at - self.text_base) as usize;
            self.text.drain(..k.min(self.text.len()));
            self.text_base = at;
            while self.breaks.len() > 1 && self.breaks[1].0 <= at {
                self.breaks.pop_front();
            }
        }
        if raw_at > self.raw_base {
            let k = (raw_at - self.raw_base) as usize;
            self.raw.drain(..k.min(self.raw.len()));
            self.raw_base = raw_at;
        }
    }

    /// The raw byte at stream position `at` (still held).
    pub fn raw_byte(&self, at: u64) -> u8 {
        self.raw[(at - self.raw_base) as usize]
    }

    pub fn raw_slice(&self, from: u64, to: u64) -> &[u8] {
        &self.raw[(from - self.raw_base) as usize..(to - self.raw_base) as usize]
    }
}

fn utf8_len(first: u8) -> usize {
    match first {
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        0xf0..=0xf7 => 4,
        _ => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(parts: &[&[u8]]) -> TextView {
        let mut v = TextView::new();
        for p in parts {
            v.append(p);
        }
        v
    }

    #[test]
    fn escapes_are_not_text_and_map_back() {
        let v = view(&[b"ab\x1b[31mcd\x1b]0;title\x07e\x1b]2;t\x1b\\f\x1b(Bg"]);
        assert_eq!(v.text, b"abcdefg");
        assert_eq!(v.raw_of(2), 7);
        assert_eq!(v.raw_of(4), 19);
        assert!(!v.full_screen);
    }

    #[test]
    fn escapes_and_characters_cut_between_reads() {
        let v = view(&[b"a\x1b[3", b"1mb\xc3", b"\xa9c\xe2\x82", b"\xac"]);
        assert_eq!(v.text, "ab\u{e9}c\u{20ac}".as_bytes());
        assert_eq!(v.raw_tokenized, v.raw_end());
        let v = view(&[b"x\xe2\x82", b"A"]);
        assert_eq!(v.text, [b'x', INVALID, INVALID, b'A']);
        let whole = view(&[b"x\xe2\x82A"]);
        assert_eq!(whole.text, v.text);
    }

    #[test]
    fn full_screen_sequences() {
        assert!(view(&[b"\x1b[?1049h"]).full_screen);
        assert!(view(&[b"\x1b[?10", b"47h"]).full_screen);
        assert!(view(&[b"\x1b[12;40H"]).full_screen);
        assert!(!view(&[b"\x1b[H\x1b[2J\x1b[?25h"]).full_screen);
    }
}
