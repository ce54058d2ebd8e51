//! Turning a compact JWT into a `Grant`, or into a reason why not.
//!
//! The issuer's key decides the algorithm: a token whose header names another algorithm than
//! the one its key is for (`none`, HMAC keyed with a public key, RS256 against an EdDSA key)
//! is refused before any signature check.

use super::{Claims, Grant, GrantId};
use crate::config::{Config, PolicyConfig};
use base64::Engine;
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
    #[error("grant {0} is revoked")]
    Revoked(GrantId),
    #[error("the header marks {0} as critical; this host implements no JOSE extension")]
    CriticalHeader(String),
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

    /// The `iss` of every trusted issuer.
    pub fn issuers(&self) -> Vec<String> {
        self.issuers.iter().map(|i| i.iss.clone()).collect()
    }

    pub fn verify(&self, token: &str, now: i64) -> Result<Grant, Refusal> {
        let token = token.trim();
        if token.len() > 16 * 1024 {
            return Err(Refusal::Malformed("longer than 16 KiB".into()));
        }
        // Before the typed header is read, so that any `crit` is refused as such.
        refuse_critical_extensions(token)?;
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
            || self.policy.allowed_profiles.contains(&profile);
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

/// RFC 7515 §4.1.11: a recipient must refuse a JWS whose `crit` names an extension it does
/// not understand. This host understands none, so the parameter's presence, with any value
/// (a list, an empty list, null, anything), refuses the token. The header is read here
/// from its JSON rather than through `jsonwebtoken::Header`, which reads `"crit": null`
/// as absent.
fn refuse_critical_extensions(token: &str) -> Result<(), Refusal> {
    let encoded = token.split('.').next().unwrap_or_default();
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| Refusal::Malformed(format!("header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&json).map_err(|e| Refusal::Malformed(format!("header: {e}")))?;
    match header.get("crit") {
        None => Ok(()),
        Some(value) => {
            // Said in the journal: a hostile header is cut short there.
            let shown: String = value.to_string().chars().take(80).collect();
            Err(Refusal::CriticalHeader(shown))
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grant::{sign, Audience, KeyAlg};

    struct Fixture {
        dir: std::path::PathBuf,
        verifier: Verifier,
        key: String,
        claims: Claims,
    }

    fn fixture(name: &str) -> Fixture {
        let dir = std::env::temp_dir().join(format!("usher-verify-{name}-{}", std::process::id()));
        crate::fsutil::private_dir(&dir, 0o700).unwrap();
        let (key, jwks) = crate::grant::keygen(KeyAlg::Ed25519, "k1").unwrap();
        std::fs::write(dir.join("jwks.json"), jwks).unwrap();
        let config = Config::parse(&format!(
            "host_name = \"h\"\n[accounts]\nname_prefix = \"jit-\"\n[[issuer]]\niss = \"https://i\"\njwks = \"{}/jwks.json\"\n",
            dir.display()
        ))
        .unwrap();
        let verifier = Verifier::from_config(&config, ["default".to_string()].into()).unwrap();
        let now = crate::grant::now();
        let claims = Claims {
            iss: "https://i".into(),
            sub: "alice".into(),
            aud: Audience::One("h".into()),
            jti: "j-1".into(),
            iat: now,
            nbf: None,
            exp: now + 600,
            login: "jit-alice".into(),
            groups: vec![],
            ssh_keys: vec![],
            secret_hash: None,
            profile: None,
            approved_by: None,
            reason: None,
        };
        Fixture {
            dir,
            verifier,
            key,
            claims,
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    /// A token with `header` as its JOSE header, properly signed by the issuer's key.
    fn signed_with_header(f: &Fixture, header: serde_json::Value) -> String {
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(serde_json::to_string(&f.claims).unwrap().as_bytes())
        );
        let key = jsonwebtoken::EncodingKey::from_ed_pem(f.key.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::EdDSA).unwrap();
        format!("{message}.{sig}")
    }

    #[test]
    fn a_header_with_crit_is_refused_whatever_its_value() {
        let f = fixture("crit");
        let now = crate::grant::now();
        // The same header without crit verifies: the refusals below are crit's alone.
        let plain = signed_with_header(&f, serde_json::json!({"alg": "EdDSA", "kid": "k1"}));
        f.verifier.verify(&plain, now).unwrap();
        assert!(f
            .verifier
            .verify(&sign(&f.key, "k1", &f.claims).unwrap(), now)
            .is_ok());
        for crit in [
            serde_json::json!(["exp"]),
            serde_json::json!(["b64"]),
            serde_json::json!(["urn:example:unknown"]),
            serde_json::json!([]),
            serde_json::json!(null),
            serde_json::json!("exp"),
            serde_json::json!({"x": 1}),
        ] {
            let token = signed_with_header(
                &f,
                serde_json::json!({"alg": "EdDSA", "kid": "k1", "crit": crit, "exp": 1, "b64": true}),
            );
            match f.verifier.verify(&token, now) {
                Err(Refusal::CriticalHeader(_)) => {}
                other => panic!("crit {crit} gave {other:?}"),
            }
        }
        // A duplicated name cannot hide it either.
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let header = r#"{"alg":"EdDSA","kid":"k1","crit":["exp"],"crit":null}"#;
        let token = format!("{}.{}.AAAA", b64(header.as_bytes()), b64(b"{}"));
        assert!(matches!(
            f.verifier.verify(&token, now),
            Err(Refusal::CriticalHeader(_))
        ));
    }

    #[test]
    fn a_long_crit_value_is_cut_short_in_the_reason() {
        let f = fixture("critlong");
        let token = signed_with_header(
            &f,
            serde_json::json!({"alg": "EdDSA", "kid": "k1", "crit": ["x".repeat(5000)]}),
        );
        let why = f.verifier.verify(&token, crate::grant::now()).unwrap_err();
        assert!(why.to_string().len() < 200, "{why}");
    }
}
