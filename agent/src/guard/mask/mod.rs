//! Streaming, split-proof masking of a session's text (see ../README.md).

use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long text that could still become a secret is held back at most.
pub const HOLD: Duration = Duration::from_millis(25);
/// How much text is held back at most.
pub const HOLD_BYTES: usize = 512;

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
    _todo: (),
}

impl MaskRules {
    pub fn compile(config: &MaskConfig) -> Result<Arc<MaskRules>, MaskConfigError> {
        let _ = config;
        todo!("mask engine")
    }

    pub fn is_empty(&self) -> bool {
        todo!("mask engine")
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

/// One stream's masker.
pub struct Masker {
    _rules: Arc<MaskRules>,
}

impl Masker {
    pub fn new(rules: Arc<MaskRules>) -> Masker {
        Masker { _rules: rules }
    }

    /// Masks `input` (read at `now`). `drained`: the read did not fill its buffer (nothing
    /// more was waiting), so text held without evidence may go.
    pub fn push(&mut self, input: &[u8], now: Instant, drained: bool) -> Masked {
        let _ = (input, now, drained);
        todo!("mask engine")
    }

    /// When held text must go out at the latest (`release` then), if any is held.
    pub fn deadline(&self) -> Option<Instant> {
        todo!("mask engine")
    }

    /// Releases what is held past its deadline at `now`.
    pub fn release(&mut self, now: Instant) -> Masked {
        let _ = now;
        todo!("mask engine")
    }

    /// The end of the stream: everything held goes out (masked where it matches).
    pub fn finish(&mut self) -> Masked {
        todo!("mask engine")
    }
}
