//! `usher play FILE`: replays an asciicast v2 recording on this terminal.
//!
//! A recording is whatever the session wrote, and the session's user may be the attacker.
//! Written raw to a reviewer's terminal it could set their clipboard (OSC 52) or window
//! title, make the terminal answer queries into the reviewer's own input (CSI 6n, DA,
//! DECRQSS), turn on mouse or focus reports, or switch the terminal's character set.
//! [`SafeOutput`] passes through only what replaying a screen needs and drops the rest.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

pub fn play(path: &std::path::Path, speed: f64, idle_limit: Option<f64>) -> Result<(), String> {
    if !(speed > 0.0 && speed.is_finite()) {
        return Err("speed must be a positive number".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let header = lines
        .next()
        .ok_or("empty file")?
        .map_err(|e| e.to_string())?;
    let header: serde_json::Value =
        serde_json::from_str(&header).map_err(|e| format!("bad header: {e}"))?;
    if header["version"] != 2 {
        return Err("not an asciicast v2 file".into());
    }
    let mut out = std::io::stdout().lock();
    let mut screen = SafeOutput::default();
    let replayed = replay(lines, speed, idle_limit, &mut screen, &mut out);
    // Whatever the recording left switched on (alternate screen, hidden cursor, colours)
    // is switched off, also when the file turned out to be broken half way.
    let restored = out
        .write_all(screen.finish().as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| e.to_string());
    replayed.and(restored)
}

fn replay(
    lines: impl Iterator<Item = std::io::Result<String>>,
    speed: f64,
    idle_limit: Option<f64>,
    screen: &mut SafeOutput,
    out: &mut impl Write,
) -> Result<(), String> {
    let start = Instant::now();
    let (mut last_t, mut virtual_t) = (0.0f64, 0.0f64);
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        let (t, kind, data): (f64, String, String) =
            serde_json::from_str(&line).map_err(|e| format!("line {}: bad event: {e}", n + 2))?;
        let mut gap = (t - last_t).max(0.0);
        if let Some(limit) = idle_limit {
            gap = gap.min(limit);
        }
        last_t = t;
        virtual_t += gap / speed;
        let due = start + Duration::from_secs_f64(virtual_t);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            out.flush().map_err(|e| e.to_string())?;
            std::thread::sleep(wait);
        }
        if kind == "o" {
            out.write_all(screen.filter(&data).as_bytes())
                .map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// Longest parameter string of a control sequence passed on; longer ones are dropped whole.
const SEQUENCE_MAX: usize = 64;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum State {
    #[default]
    Ground,
    /// After ESC: intermediates (0x20-0x2F) are collected until a final character.
    Escape,
    /// After CSI: parameters, then intermediates, until a final character (0x40-0x7E).
    Csi,
    /// Inside OSC, DCS, SOS, PM or APC: everything is dropped until the string ends
    /// (ST, or BEL for OSC as xterm allows).
    Str { osc: bool },
}

/// A filter for terminal output fed event by event: a sequence cut across two events is
/// judged whole. What comes out is text, the C0 controls a screen needs, and complete
/// control sequences from an allow-list, always in their 7-bit form, so the reviewer's
/// terminal is back in its ground state between any two pieces of output.
///
/// The parser follows the DEC/ECMA-48 state machine (as xterm and VT500 parse), reading
/// characters rather than bytes: a cast holds text, and a terminal in UTF-8 mode takes
/// U+0080..U+009F as the 8-bit C1 controls (U+009B is CSI, U+009D is OSC).
#[derive(Debug, Default)]
pub struct SafeOutput {
    state: State,
    /// Parameters and intermediates of the sequence being read.
    seq: String,
    /// The sequence being read is longer than `SEQUENCE_MAX`: dropped at its end.
    overflow: bool,
    /// The alternate-screen mode the recording switched on and has not switched off.
    alt_screen: Option<u16>,
    /// The recording set a scrolling region.
    scroll_region: bool,
}

impl SafeOutput {
    /// What of `data` may reach the reviewer's terminal.
    pub fn filter(&mut self, data: &str) -> String {
        let mut out = String::with_capacity(data.len());
        for c in data.chars() {
            self.step(c, &mut out);
        }
        out
    }

    /// Puts back what the recording may have left switched on; a sequence cut off by the
    /// end of the file is dropped.
    pub fn finish(&mut self) -> String {
        self.state = State::Ground;
        let mut out = String::from("\x1b[0m\x1b[4l\x1b[?7h\x1b(B\x0f");
        if self.scroll_region {
            // DECSTBM homes the cursor: save and restore it around the reset.
            out.push_str("\x1b7\x1b[r\x1b8");
            self.scroll_region = false;
        }
        if let Some(mode) = self.alt_screen.take() {
            out.push_str(&format!("\x1b[?{mode}l"));
        }
        out.push_str("\x1b[?25h");
        out
    }

    fn enter(&mut self, state: State) {
        self.state = state;
        self.seq.clear();
        self.overflow = false;
    }

    fn step(&mut self, c: char, out: &mut String) {
        if let State::Str { osc } = self.state {
            // A string swallows everything up to its end. An ESC ends it too (ESC \ is
            // ST; any other ESC starts the next sequence, as in the DEC parser).
            match c {
                '\x1b' => self.enter(State::Escape),
                '\u{9c}' | '\x18' | '\x1a' => self.enter(State::Ground),
                '\x07' if osc => self.enter(State::Ground),
                _ => {}
            }
            return;
        }
        match c {
            // CAN and SUB cancel the sequence in progress.
            '\x18' | '\x1a' => self.enter(State::Ground),
            '\x1b' => self.enter(State::Escape),
            '\u{9b}' => self.enter(State::Csi),
            '\u{9d}' => self.enter(State::Str { osc: true }),
            // DCS, SOS, PM, APC.
            '\u{90}' | '\u{98}' | '\u{9e}' | '\u{9f}' => self.enter(State::Str { osc: false }),
            // Every other C1 control is dropped, and cancels a sequence in progress.
            '\u{80}'..='\u{9f}' => self.enter(State::Ground),
            // C0 controls act wherever they occur, even inside a sequence.
            '\0'..='\x1f' => {
                if matches!(c, '\x08' | '\t' | '\n' | '\r' | '\x0e' | '\x0f') {
                    out.push(c);
                }
            }
            '\x7f' => {}
            _ => match self.state {
                State::Ground => out.push(c),
                State::Escape => self.escape_char(c, out),
                State::Csi => self.csi_char(c, out),
                State::Str { .. } => {}
            },
        }
    }

    fn collect(&mut self, c: char) {
        if self.seq.len() < SEQUENCE_MAX {
            self.seq.push(c);
        } else {
            self.overflow = true;
        }
    }

    fn escape_char(&mut self, c: char, out: &mut String) {
        match c {
            '[' if self.seq.is_empty() => self.enter(State::Csi),
            ']' if self.seq.is_empty() => self.enter(State::Str { osc: true }),
            'P' | 'X' | '^' | '_' if self.seq.is_empty() => self.enter(State::Str { osc: false }),
            ' '..='/' => self.collect(c),
            '0'..='~' => {
                if !self.overflow && escape_allowed(&self.seq, c) {
                    out.push('\x1b');
                    out.push_str(&self.seq);
                    out.push(c);
                }
                self.enter(State::Ground);
            }
            // Not part of any escape sequence: the sequence is abandoned, the text shown.
            _ => {
                self.enter(State::Ground);
                out.push(c);
            }
        }
    }

    fn csi_char(&mut self, c: char, out: &mut String) {
        match c {
            ' '..='?' => self.collect(c),
            '@'..='~' => {
                if !self.overflow {
                    if let Some(kept) = self.csi_allowed(c) {
                        out.push_str("\x1b[");
                        out.push_str(&kept);
                        out.push(c);
                    }
                }
                self.enter(State::Ground);
            }
            _ => {
                self.enter(State::Ground);
                out.push(c);
            }
        }
    }

    /// The parameters to pass on for the CSI sequence ending in `last`, or None to drop it.
    fn csi_allowed(&mut self, last: char) -> Option<String> {
        let params = std::mem::take(&mut self.seq);
        let params = params.as_str();
        // Intermediates (`CSI $ p` DECRQM, `CSI ! p` DECSTR, `CSI SP q` cursor style…):
        // none of them is needed to draw a screen.
        if params.chars().any(|c| (' '..='/').contains(&c)) {
            return None;
        }
        let (private, body) = match params.chars().next() {
            Some(p @ ('<' | '=' | '>' | '?')) => (Some(p), &params[1..]),
            _ => (None, params),
        };
        if !body
            .chars()
            .all(|c| c.is_ascii_digit() || c == ';' || c == ':')
        {
            return None;
        }
        // No terminal needs a count or position of more than five digits.
        if body.split([';', ':']).any(|n| n.len() > 5) {
            return None;
        }
        let args = || body.split(';');
        match (private, last) {
            (Some('?'), 'h' | 'l') => self.private_modes(body, last == 'h'),
            (Some(_), _) => None,
            // SGR: colours and attributes.
            (None, 'm') => Some(params.to_string()),
            // Cursor movement and position.
            (None, 'A' | 'B' | 'C' | 'D' | 'E' | 'F' | 'G' | 'H' | 'I' | 'Z' | '`' | 'a')
            | (None, 'd' | 'e' | 'f') => Some(params.to_string()),
            // Erase in display, but not `CSI 3 J`: the reviewer's scrollback is not part
            // of the recording.
            (None, 'J') if args().all(|a| a != "3") => Some(params.to_string()),
            // Erase in line, erase, insert and delete characters and lines, scroll, repeat.
            (None, 'K' | 'X' | '@' | 'P' | 'L' | 'M' | 'S' | 'T' | 'b') => Some(params.to_string()),
            (None, 'r') => {
                self.scroll_region = !body.is_empty();
                Some(params.to_string())
            }
            // Save and restore the cursor (with parameters, `CSI s` sets margins).
            (None, 's' | 'u') if body.is_empty() => Some(String::new()),
            // Insert mode (IRM) is the one ANSI mode a screen needs.
            (None, 'h' | 'l') if body == "4" => Some(body.to_string()),
            // Everything else: DSR (`CSI 6n`), DA (`CSI c`), window operations and
            // reports (`CSI t`), media copy (`CSI i`), tab stops, LED, keyboard modes.
            _ => None,
        }
    }

    /// DEC private modes the player needs: the alternate screen, the cursor's visibility,
    /// autowrap, saving the cursor, and bracketed paste only to switch it off. Mouse and
    /// focus reporting, cursor-key and keypad modes and the rest change what the
    /// reviewer's terminal sends, not what it shows.
    fn private_modes(&mut self, body: &str, set: bool) -> Option<String> {
        let mut kept = Vec::new();
        for arg in body.split(';') {
            let Ok(mode) = arg.parse::<u16>() else {
                continue;
            };
            let allowed = match mode {
                7 | 25 | 1048 => true,
                47 | 1047 | 1049 => {
                    self.alt_screen = set.then_some(mode);
                    true
                }
                2004 => !set,
                _ => false,
            };
            if allowed {
                kept.push(mode.to_string());
            }
        }
        (!kept.is_empty()).then(|| format!("?{}", kept.join(";")))
    }
}

/// Escape sequences a screen needs: save and restore the cursor (DECSC, DECRC), index,
/// next line, reverse index, and choosing ASCII or line drawing for G0 and G1.
fn escape_allowed(intermediates: &str, last: char) -> bool {
    match intermediates {
        "" => matches!(last, '7' | '8' | 'D' | 'E' | 'M'),
        "(" | ")" => matches!(last, '0' | 'A' | 'B'),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(events: &[&str]) -> String {
        let mut f = SafeOutput::default();
        events.iter().map(|e| f.filter(e)).collect()
    }

    #[test]
    fn text_colours_cursor_movement_and_erase_pass_unchanged() {
        for s in [
            "plain text, é, 世界 🎉\r\n",
            "ls\r\n\x1b[0m\x1b[01;34mdir\x1b[0m  \x1b[38;5;208mfile\x1b[m\r\n",
            "\x1b[38:2::255:0:0mtruecolour\x1b[39m",
            "\x1b[H\x1b[2J\x1b[10;20H\x1b[5A\x1b[3B\x1b[2C\x1b[D\x1b[K\x1b[1K\x1b[4X\x1b[2P\x1b[3@",
            "\x1b[1;24r\x1b[3L\x1b[2M\x1b[S\x1b[T\x1b[12d\x1b[40G\x1b[s\x1b[u\x1b7\x1b8\x1bM",
            "\x1b[?1049h\x1b[?25l\x1b[?7l\x1b[?2004l\x1b(0lqk\x1b(B\x1b[4h\x1b[4l",
            "tab\there\x08\x08",
        ] {
            assert_eq!(filtered(&[s]), s, "{s:?}");
        }
    }

    #[test]
    fn osc_dcs_apc_pm_sos_are_dropped_with_their_payload() {
        for (s, want) in [
            // OSC 52: set the clipboard, ended by BEL or by ST.
            ("a\x1b]52;c;Y3VybCBldmlsfHNo\x07b", "ab"),
            ("a\x1b]52;c;Y3VybCBldmlsfHNo\x1b\\b", "ab"),
            // OSC 0/2: the window title; OSC 8: a hyperlink; OSC 4: the palette.
            ("\x1b]0;owned\x07\x1b]2;owned\x1b\\x", "x"),
            ("\x1b]8;;http://evil.test\x1b\\link\x1b]8;;\x1b\\", "link"),
            ("\x1b]4;1;rgb:ff/00/00\x07", ""),
            // DCS: XTGETTCAP and DECRQSS queries, sixel; BEL does not end a DCS.
            ("\x1bP+q544e\x1b\\ok", "ok"),
            ("\x1bP$qm\x07still-dcs\x1b\\ok", "ok"),
            // APC, PM, SOS.
            ("\x1b_Gf=100;AAAA\x1b\\\x1b^pm\x1b\\\x1bXsos\x1b\\ok", "ok"),
        ] {
            assert_eq!(filtered(&[s]), want, "{s:?}");
        }
    }

    #[test]
    fn queries_and_modes_that_change_what_the_terminal_sends_are_dropped() {
        for s in [
            "\x1b[6n",         // cursor position report
            "\x1b[5n",         // status report
            "\x1b[c",          // primary DA
            "\x1b[>c",         // secondary DA
            "\x1b[=c",         // tertiary DA
            "\x1b[?6n",        // DECXCPR
            "\x1b[21t",        // report the window title
            "\x1b[14t",        // report the window size
            "\x1b[8;100;200t", // resize the window
            "\x1b[?1000h",     // mouse reports
            "\x1b[?1006h",
            "\x1b[?1004h", // focus reports
            "\x1b[?1h",    // application cursor keys
            "\x1b[?2004h", // bracketed paste on
            "\x1b[$p",     // DECRQM
            "\x1b[?25$p",
            "\x1b[!p",                // soft reset
            "\x1b[>4;1m",             // modifyOtherKeys
            "\x1b[>1u",               // kitty keyboard
            "\x1b[5i",                // media copy to the printer
            "\x1b[3J",                // erase the scrollback
            "\x1bc",                  // full reset
            "\x1bZ",                  // DECID
            "\x1b=",                  // application keypad
            "\x1b%@",                 // leave UTF-8
            "\x1b#8",                 // screen alignment test
            "\x1b F",                 // 7-bit responses
            "\x1b G",                 // 8-bit responses
            "\x05\x07\x0b\x0c\0\x7f", // ENQ (answerback), BEL, VT, FF, NUL, DEL
        ] {
            assert_eq!(filtered(&[&format!("<{s}>")]), "<>", "{s:?}");
        }
        // A mixed list keeps only the allowed modes.
        assert_eq!(filtered(&["\x1b[?1000;1049;1004;25h"]), "\x1b[?1049;25h");
    }

    #[test]
    fn eight_bit_c1_forms_are_parsed_and_never_passed_on() {
        for (s, want) in [
            ("a\u{9d}52;c;aGk=\u{9c}b", "ab"),
            ("a\u{9d}0;title\x07b", "ab"),
            ("a\u{9b}6nb", "ab"),
            ("a\u{90}+q544e\u{9c}b", "ab"),
            ("a\u{9f}apc\u{9c}\u{9e}pm\u{9c}\u{98}sos\u{9c}b", "ab"),
            // An allowed sequence comes out in its 7-bit form.
            ("\u{9b}31mred", "\x1b[31mred"),
            // Other C1 controls (NEL, IND, RI, HTS, SS2, ST) are dropped.
            ("a\u{85}\u{84}\u{8d}\u{88}\u{8e}\u{9c}b", "ab"),
            // A C1 control cancels a sequence in progress.
            ("\x1b[12\u{85}Hx", "Hx"),
        ] {
            assert_eq!(filtered(&[s]), want, "{s:?}");
        }
    }

    #[test]
    fn sequences_split_across_events_are_judged_whole() {
        assert_eq!(filtered(&["x\x1b]5", "2;c;aGk", "=\x07y"]), "xy");
        assert_eq!(filtered(&["x\x1b", "]0;t", "\x1b", "\\y"]), "xy");
        assert_eq!(filtered(&["\x1b[3", "1mred"]), "\x1b[31mred");
        assert_eq!(filtered(&["a\x1b[", "6", "n", "b"]), "ab");
        assert_eq!(filtered(&["a\u{9d}52;", "c;x\u{9c}b"]), "ab");
        assert_eq!(filtered(&["a\x1bP", "q", "\x1b\\b"]), "ab");
        // Every cut of a hostile stream gives the same safe output.
        let s = "a\x1b]52;c;aGk=\x07b\x1b[6nc\x1b[1;31md\x1bP+q\x1b\\e\u{9b}0cf";
        let whole = filtered(&[s]);
        assert_eq!(whole, "abc\x1b[1;31mdef");
        let chars: Vec<char> = s.chars().collect();
        for cut in 0..=chars.len() {
            let (a, b): (String, String) =
                (chars[..cut].iter().collect(), chars[cut..].iter().collect());
            assert_eq!(filtered(&[&a, &b]), whole, "cut at {cut}");
        }
    }

    #[test]
    fn hostile_shapes_of_sequences_are_dropped() {
        // Overlong parameters, huge numbers, parameters after intermediates.
        let long = format!("\x1b[{}mx", "1;".repeat(100));
        assert_eq!(filtered(&[&long]), "x");
        assert_eq!(filtered(&["\x1b[999999999bx"]), "x");
        assert_eq!(filtered(&["\x1b[ 1qx"]), "x");
        // CAN and SUB cancel; ESC restarts.
        assert_eq!(filtered(&["\x1b[6\x18nx"]), "nx");
        assert_eq!(filtered(&["\x1b]0;t\x1ax"]), "x");
        assert_eq!(filtered(&["\x1b[6\x1b[31mx"]), "\x1b[31mx");
        // C0 controls inside a sequence act before it, as on a real terminal.
        assert_eq!(filtered(&["\x1b[1\r2Hx"]), "\r\x1b[12Hx");
        // ST on its own is dropped.
        assert_eq!(filtered(&["a\x1b\\b"]), "ab");
    }

    #[test]
    fn finish_switches_off_what_the_recording_left_on() {
        let mut f = SafeOutput::default();
        f.filter("\x1b[?1049h\x1b[?25l\x1b[2;10r\x1b[31m\x1b]0;cut");
        let end = f.finish();
        assert!(end.contains("\x1b[0m"), "{end:?}");
        assert!(end.contains("\x1b[r"), "{end:?}");
        assert!(end.contains("\x1b[?1049l"), "{end:?}");
        assert!(end.ends_with("\x1b[?25h"), "{end:?}");
        // Leaving the alternate screen is not repeated when the recording did it.
        let mut f = SafeOutput::default();
        f.filter("\x1b[?1049h\x1b[?1049l");
        assert!(!f.finish().contains("1049"));
    }
}
