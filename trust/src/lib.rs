//! How Usher trusts token issuers, for the agent (`usherd`) and the central service alike.
//!
//! - [`IssuerConfig`]: an issuer and where its keys are (a JWKS file, a JWKS URL, or OpenID
//!   discovery), with an optional extra root CA.
//! - [`IssuerKeys`]: one issuer's key cache (fetched at start, refreshed on an unknown `kid`
//!   at most once per `refresh_min_secs`, refreshed every `refresh_secs`, last good keys
//!   kept for `max_stale_secs`); [`TrustedIssuers`]: several, chosen by the token's `iss`.
//! - [`verify_with_keys`] / [`IssuerKeys::verify`]: signature (the key's algorithm, never
//!   the header's; no `none`, no HMAC), `iss`, `aud`, `exp`/`nbf`/`iat` with a leeway, a
//!   size cap. The answer is the verified claims or a [`Refusal`] whose text a person can
//!   act on.
//! - [`WorkloadRule`] and [`match_rule`]: which verified token may become which grant.
//!
//! Header parameters that would fetch or carry keys (`jku`, `x5u`, `x5c`, `jwk`) are never
//! used.

mod cache;
mod config;
mod fetch;
mod jose;
mod refusal;
mod workload;

pub use cache::{IssuerKeys, KeyStatus, SetupError, TrustedIssuers};
pub use config::{
    default_max_stale_secs, default_refresh_min_secs, default_refresh_secs, discovery_url,
    is_allowed_url, ConfigError, IssuerConfig, KeySource,
};
pub use fetch::{read_jwks_file, FetchError, MAX_DOCUMENT_BYTES};
pub use jose::{
    key_algorithm, peek_issuer, select_key, verify_with_keys, Expect, Unverified, VerifiedClaims,
    MAX_TOKEN_BYTES,
};
pub use refusal::{Malformed, Part, RefreshNote, Refusal, UnusableKey};
pub use workload::{
    audiences_for, glob_match, match_rule, workload_issuers, BadDuration, ClaimPattern,
    HumanDuration, NoRule, RuleMiss, WorkloadRule,
};

// The JOSE library's key types, so callers need not name the same version.
pub use jsonwebtoken::jwk::{Jwk, JwkSet};
pub use jsonwebtoken::Algorithm;
