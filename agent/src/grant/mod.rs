//! Stage 1: grants — signed, time-bounded permission to become a local account.

mod issue;
mod store;
mod verify;

pub use issue::{console_secret_hash, keygen, sign, IssueError, KeyAlg};
pub use store::{GrantStore, Revocations, RevocationsError};
pub use usher_wire::grant::{Audience, Claims};
pub use verify::{InvalidClaim, JwksError, Malformed, Part, Refusal, UnusableKey, Verifier};

use serde::{Deserialize, Serialize};

/// Which grant: a `jti` is unique only within its issuer (RFC 7519 §4.1.7), so two
/// trusted issuers may both send "42". Stored grants, revocations and sessions' links to
/// their grant all use the pair.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GrantId {
    pub iss: String,
    pub jti: String,
}

impl std::fmt::Display for GrantId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?} of issuer {:?}", self.jti, self.iss)
    }
}

/// A grant that passed verification and local policy.
#[derive(Debug, Clone)]
pub struct Grant {
    pub token: String,
    pub claims: Claims,
    /// The profile in force (the grant's, or the local default).
    pub profile: String,
}

impl Grant {
    pub fn jti(&self) -> &str {
        &self.claims.jti
    }

    pub fn id(&self) -> GrantId {
        GrantId {
            iss: self.claims.iss.clone(),
            jti: self.claims.jti.clone(),
        }
    }

    pub fn login(&self) -> &str {
        &self.claims.login
    }

    pub fn expires_at(&self) -> i64 {
        self.claims.exp
    }

    pub fn is_live(&self, now: i64) -> bool {
        now < self.claims.exp
    }

    /// Whether the OpenSSH public key is one this grant is bound to.
    pub fn binds_key(&self, key: &russh::keys::PublicKey) -> bool {
        self.claims.ssh_keys.iter().any(|line| {
            russh::keys::PublicKey::from_openssh(line)
                .map(|k| k.key_data() == key.key_data())
                .unwrap_or(false)
        })
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
