//! The claims of a grant: what an issuer (the local one, the central service, an
//! administrator's `usher grant sign`) signs and what usherd reads.

use serde::{Deserialize, Serialize};

/// The claims of a grant. Unknown claims are ignored; the listed ones are typed so that a
/// grant with, say, a string `exp` is malformed rather than misread.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Claims {
    pub iss: String,
    /// The person or workload the grant is for.
    pub sub: String,
    pub aud: Audience,
    pub jti: String,
    pub iat: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    pub exp: i64,
    /// The local account name requested (it carries the agent's reserved prefix).
    pub login: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<String>,
    /// OpenSSH public keys (`ssh-ed25519 AAAA… comment`) that may use the grant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_keys: Vec<String>,
    /// Hash of a one-time secret for console or RDP logins.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_hash: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approved_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The central service's request this grant answers (copied into the session's
    /// metadata, so a recording links back to its request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

impl Claims {
    /// When the grant starts: `nbf` if given, else `iat`.
    pub fn starts_at(&self) -> i64 {
        self.nbf.unwrap_or(self.iat)
    }
}
