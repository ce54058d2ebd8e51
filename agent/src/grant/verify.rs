//! Turning a compact JWT into a `Grant`, or into a reason why not.
//!
//! The issuer's key decides the algorithm: a token whose header names another algorithm than
//! the one its key is for (`none`, HMAC keyed with a public key, RS256 against an EdDSA key)
//! is refused before any signature check.

use super::{Claims, Grant};
use crate::config::{Config, PolicyConfig};
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use std::collections::BTreeSet;
use std::path::Path;

/// Why a grant was refused. The journal gets `Display`; the client only a generic line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed token: {0}")]
    Malformed(String),
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("no key {kid:?} for issuer {iss:?}")]
    UnknownKey { iss: String, kid: String },
    #[error("token has no kid and issuer {0:?} has several keys")]
    MissingKid(String),
    #[error("algorithm {got} does not match the key's algorithm {want}")]
    AlgorithmMismatch { got: String, want: String },
    #[error("bad signature")]
    BadSignature,
    #[error("audience does not include this host")]
    WrongAudience,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("lifetime {got}s exceeds the local cap of {cap}s")]
    LifetimeOverCap { got: i64, cap: u64 },
    #[error("group {0:?} is not allowed by local policy")]
    GroupNotAllowed(String),
    #[error("profile {0:?} is not allowed by local policy")]
    ProfileNotAllowed(String),
    #[error("login {0:?} is not a name this agent may manage")]
    BadLogin(String),
    #[error("invalid claim: {0}")]
    BadClaim(String),
    #[error("jti {0:?} is revoked")]
    Revoked(String),
}

struct Issuer {
    iss: String,
    keys: JwkSet,
}

pub struct Verifier {
    issuers: Vec<Issuer>,
    audiences: Vec<String>,
    policy: PolicyConfig,
    name_prefix: String,
    known_profiles: BTreeSet<String>,
}

impl Verifier {
    /// Reads every issuer's JWKS. A broken JWKS file stops the agent: better no logins
    /// than logins checked against the wrong keys.
    pub fn from_config(
        config: &Config,
        known_profiles: BTreeSet<String>,
    ) -> Result<Verifier, String> {
        let mut issuers = Vec::new();
        for ic in &config.issuers {
            issuers.push(Issuer {
                iss: ic.iss.clone(),
                keys: read_jwks(&ic.jwks)?,
            });
        }
        Ok(Verifier {
            issuers,
            audiences: config.accepted_audiences(),
            policy: config.policy.clone(),
            name_prefix: config.accounts.name_prefix.clone(),
            known_profiles,
        })
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<Grant, Refusal> {
        let token = token.trim();
        if token.len() > 16 * 1024 {
            return Err(Refusal::Malformed("longer than 16 KiB".into()));
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| malformed(&e))?;
        // The issuer is read before the signature is checked only to pick its keys; every
        // claim is re-read from the verified token below.
        let unverified: serde_json::Value = jsonwebtoken::dangerous::insecure_decode_claims(token)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        let iss = unverified
            .get("iss")
            .and_then(|v| v.as_str())
            .ok_or_else(|| Refusal::Malformed("no iss claim".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.iss == iss)
            .ok_or_else(|| Refusal::UnknownIssuer(iss.to_string()))?;
        let jwk = match &header.kid {
            Some(kid) => issuer.keys.find(kid).ok_or_else(|| Refusal::UnknownKey {
                iss: iss.to_string(),
                kid: kid.clone(),
            })?,
            None if issuer.keys.keys.len() == 1 => &issuer.keys.keys[0],
            None => return Err(Refusal::MissingKid(iss.to_string())),
        };
        let want = key_algorithm(jwk).map_err(Refusal::Malformed)?;
        if header.alg != want {
            return Err(Refusal::AlgorithmMismatch {
                got: format!("{:?}", header.alg),
                want: format!("{want:?}"),
            });
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| Refusal::Malformed(e.to_string()))?;

        let mut validation = Validation::new(want);
        validation.set_issuer(&[&issuer.iss]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub", "jti"]);
        validation.leeway = self.policy.leeway_secs;
        validation.validate_nbf = true;
        // Time is checked here against `now` so that tests and sweeps agree on one clock.
        validation.validate_exp = false;
        let data = jsonwebtoken::decode::<Claims>(token, &key, &validation).map_err(|e| match e
            .kind()
        {
            ErrorKind::InvalidSignature => Refusal::BadSignature,
            ErrorKind::InvalidAudience => Refusal::WrongAudience,
            ErrorKind::InvalidIssuer => Refusal::UnknownIssuer(iss.to_string()),
            ErrorKind::ImmatureSignature => Refusal::NotYetValid,
            ErrorKind::ExpiredSignature => Refusal::Expired,
            ErrorKind::InvalidAlgorithm => Refusal::AlgorithmMismatch {
                got: format!("{:?}", header.alg),
                want: format!("{want:?}"),
            },
            _ => malformed(&e),
        })?;
        self.check_policy(data.claims, token, now)
    }

    fn check_policy(&self, claims: Claims, token: &str, now: i64) -> Result<Grant, Refusal> {
        let leeway = self.policy.leeway_secs as i64;
        if now >= claims.exp + leeway {
            return Err(Refusal::Expired);
        }
        if claims.starts_at() > now + leeway || claims.iat > now + leeway {
            return Err(Refusal::NotYetValid);
        }
        let lifetime = claims.exp - claims.starts_at();
        if lifetime <= 0 {
            return Err(Refusal::BadClaim("exp is not after nbf/iat".into()));
        }
        if lifetime as u64 > self.policy.max_lifetime_secs {
            return Err(Refusal::LifetimeOverCap {
                got: lifetime,
                cap: self.policy.max_lifetime_secs,
            });
        }
        if !crate::account::is_valid_name(&claims.login)
            || !claims.login.starts_with(&self.name_prefix)
            || claims.login.len() <= self.name_prefix.len()
        {
            return Err(Refusal::BadLogin(claims.login));
        }
        if claims.jti.is_empty()
            || claims.jti.len() > 128
            || !claims
                .jti
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(Refusal::BadClaim(
                "jti must be 1-128 characters of [A-Za-z0-9._-]".into(),
            ));
        }
        if claims.sub.is_empty()
            || claims.sub.len() > 256
            || claims.sub.chars().any(char::is_control)
        {
            return Err(Refusal::BadClaim(
                "sub must be 1-256 printable characters".into(),
            ));
        }
        for group in &claims.groups {
            if !self.policy.allowed_groups.iter().any(|g| g == group) {
                return Err(Refusal::GroupNotAllowed(group.clone()));
            }
        }
        if let Some(h) = &claims.secret_hash {
            if !is_crypt_hash(h) {
                return Err(Refusal::BadClaim(
                    "secret_hash must be a crypt(3) hash ($6$, $5$, $y$, $2b$)".into(),
                ));
            }
        }
        for line in &claims.ssh_keys {
            russh::keys::PublicKey::from_openssh(line)
                .map_err(|e| Refusal::BadClaim(format!("ssh_keys: {e}")))?;
        }
        let profile = claims
            .profile
            .clone()
            .unwrap_or_else(|| self.policy.default_profile.clone());
        let allowed = profile == self.policy.default_profile
            || self.policy.allowed_profiles.iter().any(|p| *p == profile);
        if !allowed || !self.known_profiles.contains(&profile) {
            return Err(Refusal::ProfileNotAllowed(profile));
        }
        Ok(Grant {
            token: token.to_string(),
            claims,
            profile,
        })
    }
}

/// A crypt(3) hash of a kind the system's tools understand, with nothing that could break
/// the shadow file's format.
pub fn is_crypt_hash(h: &str) -> bool {
    ["$6$", "$5$", "$y$", "$2b$"]
        .iter()
        .any(|p| h.starts_with(p))
        && h.len() <= 256
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./$=".contains(c))
}

fn malformed(e: &jsonwebtoken::errors::Error) -> Refusal {
    Refusal::Malformed(e.to_string())
}

/// The one algorithm a key may verify.
fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, String> {
    match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            Ok(Algorithm::EdDSA)
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Ok(Algorithm::ES256)
        }
        AlgorithmParameters::RSA(_) => Ok(Algorithm::RS256),
        AlgorithmParameters::OctetKey(_) => {
            Err("symmetric keys are not accepted for grants".into())
        }
        _ => Err("unsupported key type (use Ed25519, P-256 or RSA)".into()),
    }
}

pub fn read_jwks(path: &Path) -> Result<JwkSet, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let set: JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("{}: not a JWKS: {e}", path.display()))?;
    for jwk in &set.keys {
        key_algorithm(jwk).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(set)
}
