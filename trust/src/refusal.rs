//! Why a token was refused, in words a person reading the journal or an audit record can
//! act on. Callers match the variants, never the text.

use jsonwebtoken::Algorithm;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed token: {0}")]
    Malformed(#[from] Malformed),
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("unknown kid {kid:?} for issuer {iss:?} ({refresh})")]
    UnknownKey {
        iss: String,
        kid: String,
        refresh: RefreshNote,
    },
    #[error("token has no kid and issuer {0:?} has several keys")]
    MissingKid(String),
    #[error("issuer {iss:?}'s keys unavailable: {why}")]
    KeysUnavailable { iss: String, why: String },
    #[error("key {kid:?} of issuer {iss:?} cannot verify tokens: {why}")]
    UnusableKey {
        iss: String,
        kid: String,
        why: UnusableKey,
    },
    #[error("algorithm {got:?} does not match the key's algorithm {want:?}")]
    AlgorithmMismatch { got: Algorithm, want: Algorithm },
    #[error("bad signature")]
    BadSignature,
    #[error("wrong audience: the token is for {token:?}, expected one of {expected:?}")]
    WrongAudience {
        token: String,
        expected: Vec<String>,
    },
    #[error("expired {ago_secs} s ago")]
    Expired { ago_secs: i64 },
    #[error("not yet valid")]
    NotYetValid,
    #[error("the header marks {0} as critical; Usher implements no JOSE extension")]
    CriticalHeader(String),
}

/// What the key cache did about a kid it did not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefreshNote {
    /// Nobody asked for a refresh (a plain check against the keys at hand).
    NotAsked,
    /// The keys are a file or a fixed set: nothing to refresh.
    Static,
    /// Fetched again just now; the kid is still not there.
    Refreshed,
    /// The last fetch was too recent to fetch again (at most one per `min_secs`).
    RateLimited { last_secs_ago: u64, min_secs: u64 },
    /// Fetching failed.
    Failed(String),
}

impl std::fmt::Display for RefreshNote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RefreshNote::NotAsked => f.write_str("keys not refreshed"),
            RefreshNote::Static => f.write_str("keys from a fixed set, not refreshed"),
            RefreshNote::Refreshed => f.write_str("keys refreshed just now"),
            RefreshNote::RateLimited {
                last_secs_ago,
                min_secs,
            } => write!(
                f,
                "keys refreshed {last_secs_ago} s ago; at most once every {min_secs} s"
            ),
            RefreshNote::Failed(why) => write!(f, "refreshing the keys failed: {why}"),
        }
    }
}

/// A token that is not a well-formed JWS, before any question of trust.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Malformed {
    #[error("longer than 16 KiB")]
    TooLong,
    #[error("not three base64url parts separated by dots")]
    NotThreeParts,
    #[error("{part}: {why}")]
    Undecodable { part: Part, why: String },
    #[error("the header names no algorithm")]
    NoAlgorithm,
    /// `none`, or a name no JOSE library knows.
    #[error("algorithm {0} is not one Usher accepts")]
    UnsupportedAlgorithm(String),
    #[error("no {0} claim")]
    MissingClaim(String),
    /// A claim of the wrong type (a string `exp`, a number `login`).
    #[error("claims: {0}")]
    ClaimType(String),
    /// What the JOSE library refused for a reason not named above.
    #[error("{0}")]
    Unreadable(String),
}

/// The three parts of a compact JWS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    Header,
    Claims,
    Signature,
}

impl std::fmt::Display for Part {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Part::Header => "header",
            Part::Claims => "claims",
            Part::Signature => "signature",
        })
    }
}

/// Why an issuer's key cannot verify tokens.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnusableKey {
    #[error("symmetric keys are not accepted")]
    Symmetric,
    #[error("unsupported key type (use Ed25519, P-256, P-384 or RSA)")]
    UnsupportedType,
    #[error("{0}")]
    Invalid(String),
}
