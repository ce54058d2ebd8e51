//! What an RDP client's keys mean to X: the scancode (set 1, as a PC keyboard sends it) to
//! the keysym a US keyboard has on that key, and a Unicode character to its keysym. The
//! keycode that carries the keysym is the X server's business (see `screen::KeyboardMap`):
//! Xvfb's keycodes follow whatever XKB rules it was started with, so nothing here knows them.

/// X keysyms used below (from X11/keysymdef.h).
pub mod keysym {
    pub const NO_SYMBOL: u32 = 0;
    pub const BACKSPACE: u32 = 0xff08;
    pub const TAB: u32 = 0xff09;
    pub const RETURN: u32 = 0xff0d;
    pub const PAUSE: u32 = 0xff13;
    pub const SCROLL_LOCK: u32 = 0xff14;
    pub const SYS_REQ: u32 = 0xff15;
    pub const ESCAPE: u32 = 0xff1b;
    pub const HOME: u32 = 0xff50;
    pub const LEFT: u32 = 0xff51;
    pub const UP: u32 = 0xff52;
    pub const RIGHT: u32 = 0xff53;
    pub const DOWN: u32 = 0xff54;
    pub const PRIOR: u32 = 0xff55;
    pub const NEXT: u32 = 0xff56;
    pub const END: u32 = 0xff57;
    pub const PRINT: u32 = 0xff61;
    pub const INSERT: u32 = 0xff63;
    pub const MENU: u32 = 0xff67;
    pub const NUM_LOCK: u32 = 0xff7f;
    pub const KP_ENTER: u32 = 0xff8d;
    pub const KP_HOME: u32 = 0xff95;
    pub const KP_LEFT: u32 = 0xff96;
    pub const KP_UP: u32 = 0xff97;
    pub const KP_RIGHT: u32 = 0xff98;
    pub const KP_DOWN: u32 = 0xff99;
    pub const KP_PRIOR: u32 = 0xff9a;
    pub const KP_NEXT: u32 = 0xff9b;
    pub const KP_END: u32 = 0xff9c;
    pub const KP_BEGIN: u32 = 0xff9d;
    pub const KP_INSERT: u32 = 0xff9e;
    pub const KP_DELETE: u32 = 0xff9f;
    pub const KP_MULTIPLY: u32 = 0xffaa;
    pub const KP_ADD: u32 = 0xffab;
    pub const KP_SUBTRACT: u32 = 0xffad;
    pub const KP_DECIMAL: u32 = 0xffae;
    pub const KP_DIVIDE: u32 = 0xffaf;
    pub const KP_0: u32 = 0xffb0;
    pub const F1: u32 = 0xffbe;
    pub const F11: u32 = 0xffc8;
    pub const F12: u32 = 0xffc9;
    pub const SHIFT_L: u32 = 0xffe1;
    pub const SHIFT_R: u32 = 0xffe2;
    pub const CONTROL_L: u32 = 0xffe3;
    pub const CONTROL_R: u32 = 0xffe4;
    pub const CAPS_LOCK: u32 = 0xffe5;
    pub const META_L: u32 = 0xffe7;
    pub const ALT_L: u32 = 0xffe9;
    pub const ALT_R: u32 = 0xffea;
    pub const SUPER_L: u32 = 0xffeb;
    pub const SUPER_R: u32 = 0xffec;
    pub const DELETE: u32 = 0xffff;
    pub const ISO_LEVEL3_SHIFT: u32 = 0xfe03;
    pub const LESS: u32 = 0x3c;
    pub const BACKSLASH: u32 = 0x5c;
}

use keysym::*;

/// The keysyms to look for, best first, for a scancode of a US PC keyboard; the later ones
/// stand in when the server's keymap lacks the first (a layout without Alt_R has
/// ISO_Level3_Shift on that key, one without Super_R still has Super_L).
pub fn scancode_keysyms(code: u8, extended: bool) -> &'static [u32] {
    if extended {
        return match code {
            0x1c => &[KP_ENTER, RETURN],
            0x1d => &[CONTROL_R, CONTROL_L],
            0x35 => &[KP_DIVIDE, 0x2f],
            0x37 => &[PRINT],
            0x38 => &[ALT_R, ISO_LEVEL3_SHIFT, ALT_L],
            0x46 => &[PAUSE],
            0x47 => &[HOME],
            0x48 => &[UP],
            0x49 => &[PRIOR],
            0x4b => &[LEFT],
            0x4d => &[RIGHT],
            0x4f => &[END],
            0x50 => &[DOWN],
            0x51 => &[NEXT],
            0x52 => &[INSERT],
            0x53 => &[DELETE],
            0x5b => &[SUPER_L, META_L],
            0x5c => &[SUPER_R, SUPER_L],
            0x5d => &[MENU],
            _ => &[],
        };
    }
    // The printable keys of the main block, row by row, as a US keyboard labels them.
    const ROW_DIGITS: &[u8] = b"1234567890-=";
    const ROW_Q: &[u8] = b"qwertyuiop[]";
    const ROW_A: &[u8] = b"asdfghjkl;'`";
    const ROW_Z: &[u8] = b"zxcvbnm,./";
    static PRINTABLE: [[u32; 1]; 128] = {
        let mut table = [[NO_SYMBOL; 1]; 128];
        let mut i = 0;
        while i < ROW_DIGITS.len() {
            table[0x02 + i] = [ROW_DIGITS[i] as u32];
            i += 1;
        }
        i = 0;
        while i < ROW_Q.len() {
            table[0x10 + i] = [ROW_Q[i] as u32];
            i += 1;
        }
        i = 0;
        while i < ROW_A.len() {
            table[0x1e + i] = [ROW_A[i] as u32];
            i += 1;
        }
        i = 0;
        while i < ROW_Z.len() {
            table[0x2c + i] = [ROW_Z[i] as u32];
            i += 1;
        }
        table[0x2b] = [BACKSLASH];
        table[0x39] = [0x20];
        table
    };
    static FUNCTION_KEYS: [[u32; 1]; 10] = {
        let mut table = [[NO_SYMBOL; 1]; 10];
        let mut i = 0;
        while i < 10 {
            table[i] = [F1 + i as u32];
            i += 1;
        }
        table
    };
    match code {
        0x01 => &[ESCAPE],
        0x0e => &[BACKSPACE],
        0x0f => &[TAB],
        0x1c => &[RETURN],
        0x1d => &[CONTROL_L],
        0x2a => &[SHIFT_L],
        0x36 => &[SHIFT_R, SHIFT_L],
        0x37 => &[KP_MULTIPLY],
        0x38 => &[ALT_L],
        0x3a => &[CAPS_LOCK],
        0x3b..=0x44 => &FUNCTION_KEYS[(code - 0x3b) as usize],
        0x45 => &[NUM_LOCK],
        0x46 => &[SCROLL_LOCK],
        // The keypad's keys carry their navigation keysym first and the digit second
        // (what NumLock selects), so the navigation keysym finds the key.
        0x47 => &[KP_HOME, 0xffb7],
        0x48 => &[KP_UP, 0xffb8],
        0x49 => &[KP_PRIOR, 0xffb9],
        0x4a => &[KP_SUBTRACT],
        0x4b => &[KP_LEFT, 0xffb4],
        0x4c => &[KP_BEGIN, 0xffb5],
        0x4d => &[KP_RIGHT, 0xffb6],
        0x4e => &[KP_ADD],
        0x4f => &[KP_END, 0xffb1],
        0x50 => &[KP_DOWN, 0xffb2],
        0x51 => &[KP_NEXT, 0xffb3],
        0x52 => &[KP_INSERT, KP_0],
        0x53 => &[KP_DELETE, KP_DECIMAL],
        0x54 => &[SYS_REQ, PRINT],
        // The key between left Shift and Z on ISO keyboards.
        0x56 => &[LESS],
        0x57 => &[F11],
        0x58 => &[F12],
        _ => match PRINTABLE.get(code as usize) {
            Some(entry) if entry[0] != NO_SYMBOL => entry,
            _ => &[],
        },
    }
}

/// The keysym of a Unicode character: Latin-1 keysyms are the code point, the rest of
/// Unicode is 0x01000000 plus the code point; control characters a client may send as
/// Unicode map to their function keys.
pub fn char_keysym(character: char) -> u32 {
    let code = character as u32;
    match code {
        0x08 => BACKSPACE,
        0x09 => TAB,
        0x0a | 0x0d => RETURN,
        0x1b => ESCAPE,
        0x7f => DELETE,
        0x20..=0x7e | 0xa0..=0xff => code,
        _ => 0x0100_0000 | code,
    }
}

/// Joins the UTF-16 units a client sends one key event at a time (a character outside the
/// Basic Multilingual Plane arrives as two events: high surrogate, then low).
#[derive(Default)]
pub struct Utf16Joiner {
    high: Option<u16>,
}

impl Utf16Joiner {
    /// The character the unit completes, if any. A lone surrogate is dropped.
    pub fn push(&mut self, unit: u16) -> Option<char> {
        match unit {
            0xd800..=0xdbff => {
                self.high = Some(unit);
                None
            }
            0xdc00..=0xdfff => {
                let high = self.high.take()?;
                char::decode_utf16([high, unit]).next()?.ok()
            }
            _ => {
                self.high = None;
                char::from_u32(u32::from(unit))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_extended_scancodes() {
        assert_eq!(scancode_keysyms(0x1e, false), &[u32::from(b'a')]);
        assert_eq!(scancode_keysyms(0x10, false), &[u32::from(b'q')]);
        assert_eq!(scancode_keysyms(0x0b, false), &[u32::from(b'0')]);
        assert_eq!(scancode_keysyms(0x35, false), &[u32::from(b'/')]);
        assert_eq!(scancode_keysyms(0x29, false), &[u32::from(b'`')]);
        assert_eq!(scancode_keysyms(0x44, false), &[F1 + 9]);
        assert_eq!(scancode_keysyms(0x48, true), &[UP]);
        assert_eq!(scancode_keysyms(0x48, false)[0], KP_UP);
        assert_eq!(scancode_keysyms(0x53, true), &[DELETE]);
        assert_eq!(scancode_keysyms(0x1c, true)[0], KP_ENTER);
        assert!(scancode_keysyms(0x7f, false).is_empty());
        assert!(scancode_keysyms(0xff, true).is_empty());
    }

    #[test]
    fn unicode_keysyms() {
        assert_eq!(char_keysym('a'), 0x61);
        assert_eq!(char_keysym('é'), 0xe9);
        assert_eq!(char_keysym('€'), 0x0100_20ac);
        assert_eq!(char_keysym('\r'), RETURN);
    }

    #[test]
    fn surrogate_pairs_join() {
        let mut joiner = Utf16Joiner::default();
        assert_eq!(joiner.push(0xd83d), None);
        assert_eq!(joiner.push(0xde00), Some('😀'));
        assert_eq!(
            joiner.push(0xde00),
            None,
            "a low surrogate alone is dropped"
        );
        assert_eq!(joiner.push(0x20ac), Some('€'));
    }
}
