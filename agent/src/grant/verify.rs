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
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Longer tokens are refused unread: a grant is a few hundred bytes, a hostile token could
/// be anything.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Claims every grant carries; a token without one is malformed, whatever else it says.
const REQUIRED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "jti", "iat", "exp", "login"];

/// Why a grant was refused. The journal gets `Display`; the client only a generic line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed token: {0}")]
    Malformed(#[from] Malformed),
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("no key {kid:?} for issuer {iss:?}")]
    UnknownKey { iss: String, kid: String },
    #[error("token has no kid and issuer {0:?} has several keys")]
    MissingKid(String),
    #[error("key {kid:?} of issuer {iss:?} cannot verify grants: {why}")]
    UnusableKey {
        iss: String,
        kid: String,
        why: UnusableKey,
    },
    #[error("algorithm {got:?} does not match the key's algorithm {want:?}")]
    AlgorithmMismatch { got: Algorithm, want: Algorithm },
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
    BadClaim(#[from] InvalidClaim),
    #[error("grant {0} is revoked")]
    Revoked(GrantId),
    #[error("the header marks {0} as critical; this host implements no JOSE extension")]
    CriticalHeader(String),
    /// A stored grant whose file is named for another (iss, jti) than its own.
    #[error("invalid claim: {}: the file name does not match the grant's (iss, jti)", .0.display())]
    Misfiled(PathBuf),
}

/// A token that is not a well-formed grant, before any question of trust.
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
    #[error("algorithm {0} is not one grants are signed with")]
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

/// A claim that is present and typed right but not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidClaim {
    #[error("exp is not after nbf/iat")]
    EndsBeforeItStarts,
    #[error("jti must be 1-128 characters of [A-Za-z0-9._-]")]
    Jti,
    #[error("sub must be 1-256 printable characters")]
    Sub,
    #[error("secret_hash must be a crypt(3) hash ($6$, $5$, $y$, $2b$)")]
    SecretHash,
    #[error("ssh_keys: {0}")]
    SshKey(String),
}

/// Why an issuer's key cannot verify grants.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum UnusableKey {
    #[error("symmetric keys are not accepted for grants")]
    Symmetric,
    #[error("unsupported key type (use Ed25519, P-256 or RSA)")]
    UnsupportedType,
    #[error("{0}")]
    Invalid(String),
}

/// An issuer's JWKS file that cannot be trusted for anything.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a JWKS: {source}", path.display())]
    NotJwks {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {why}", path.display())]
    UnusableKey { path: PathBuf, why: UnusableKey },
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
    ) -> Result<Verifier, JwksError> {
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
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Malformed::TooLong.into());
        }
        let unverified = Unverified::parse(token)?;
        // The issuer is read before the signature is checked only to pick its keys; every
        // claim is re-read from the verified token below.
        let iss = unverified
            .claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::MissingClaim("iss".into()))?;
        let issuer = self
            .issuers
            .iter()
            .find(|i| i.iss == iss)
            .ok_or_else(|| Refusal::UnknownIssuer(iss.to_string()))?;
        let jwk = match &unverified.kid {
            Some(kid) => issuer.keys.find(kid).ok_or_else(|| Refusal::UnknownKey {
                iss: iss.to_string(),
                kid: kid.clone(),
            })?,
            None if issuer.keys.keys.len() == 1 => &issuer.keys.keys[0],
            None => return Err(Refusal::MissingKid(iss.to_string())),
        };
        let unusable = |why| Refusal::UnusableKey {
            iss: iss.to_string(),
            kid: jwk.common.key_id.clone().unwrap_or_default(),
            why,
        };
        let want = key_algorithm(jwk).map_err(unusable)?;
        let got = unverified.alg;
        if got != want {
            return Err(Refusal::AlgorithmMismatch { got, want });
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| unusable(UnusableKey::Invalid(e.to_string())))?;

        let mut validation = Validation::new(want);
        validation.set_issuer(&[&issuer.iss]);
        validation.set_audience(&self.audiences);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub", "jti"]);
        // Time is checked in `check_policy` against `now`, so that tests and sweeps agree
        // on one clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        let verified = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| match e.kind() {
                ErrorKind::InvalidSignature => Refusal::BadSignature,
                ErrorKind::InvalidAudience => Refusal::WrongAudience,
                ErrorKind::InvalidIssuer => Refusal::UnknownIssuer(iss.to_string()),
                ErrorKind::InvalidAlgorithm => Refusal::AlgorithmMismatch { got, want },
                ErrorKind::MissingRequiredClaim(name) => {
                    Malformed::MissingClaim(name.clone()).into()
                }
                ErrorKind::Json(e) => Malformed::ClaimType(e.to_string()).into(),
                ErrorKind::InvalidKeyFormat
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidRsaKey(_) => unusable(UnusableKey::Invalid(e.to_string())),
                _ => Malformed::Unreadable(e.to_string()).into(),
            })?
            .claims;
        if let Some(missing) = REQUIRED_CLAIMS
            .iter()
            .find(|name| verified.get(**name).is_none_or(Value::is_null))
        {
            return Err(Malformed::MissingClaim(missing.to_string()).into());
        }
        let claims: Claims =
            serde_json::from_value(verified).map_err(|e| Malformed::ClaimType(e.to_string()))?;
        self.check_policy(claims, token, now)
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
            return Err(InvalidClaim::EndsBeforeItStarts.into());
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
            return Err(InvalidClaim::Jti.into());
        }
        if claims.sub.is_empty()
            || claims.sub.len() > 256
            || claims.sub.chars().any(char::is_control)
        {
            return Err(InvalidClaim::Sub.into());
        }
        for group in &claims.groups {
            if !self.policy.allowed_groups.iter().any(|g| g == group) {
                return Err(Refusal::GroupNotAllowed(group.clone()));
            }
        }
        if let Some(h) = &claims.secret_hash {
            if !is_crypt_hash(h) {
                return Err(InvalidClaim::SecretHash.into());
            }
        }
        for line in &claims.ssh_keys {
            russh::keys::PublicKey::from_openssh(line)
                .map_err(|e| InvalidClaim::SshKey(e.to_string()))?;
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

/// What a token says before its signature is checked: enough to pick the key, nothing
/// to trust.
struct Unverified {
    alg: Algorithm,
    kid: Option<String>,
    claims: Map<String, Value>,
}

impl Unverified {
    /// Decodes the three parts, so that whatever fails later is about trust, not form.
    fn parse(token: &str) -> Result<Unverified, Refusal> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, claims, signature] = parts[..] else {
            return Err(Malformed::NotThreeParts.into());
        };
        let header = decode_object(Part::Header, header)?;
        // Before any other header parameter is read, so that any `crit` is refused as such.
        refuse_critical_extensions(&header)?;
        let alg = match header.get("alg") {
            None | Some(Value::Null) => return Err(Malformed::NoAlgorithm.into()),
            Some(Value::String(name)) => Algorithm::from_str(name)
                .map_err(|_| Malformed::UnsupportedAlgorithm(shortened(name)))?,
            Some(other) => {
                return Err(Malformed::UnsupportedAlgorithm(shortened(&other.to_string())).into())
            }
        };
        let kid = match header.get("kid") {
            // As the JOSE library reads it: a null kid is no kid.
            None | Some(Value::Null) => None,
            Some(Value::String(kid)) => Some(kid.clone()),
            Some(_) => {
                return Err(Malformed::Undecodable {
                    part: Part::Header,
                    why: "kid is not a string".into(),
                }
                .into())
            }
        };
        // The rest of the header as the JOSE library types it, so that it fails here, as
        // the header's fault, rather than during the signature check.
        jsonwebtoken::decode_header(token).map_err(|e| Malformed::Undecodable {
            part: Part::Header,
            why: e.to_string(),
        })?;
        let claims = decode_object(Part::Claims, claims)?;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|e| Malformed::Undecodable {
                part: Part::Signature,
                why: e.to_string(),
            })?;
        Ok(Unverified { alg, kid, claims })
    }
}

/// A base64url-encoded JSON object, one part of a token.
fn decode_object(part: Part, encoded: &str) -> Result<Map<String, Value>, Malformed> {
    let undecodable = |why: String| Malformed::Undecodable { part, why };
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(encoded)
        .map_err(|e| undecodable(e.to_string()))?;
    serde_json::from_slice(&json).map_err(|e| undecodable(e.to_string()))
}

/// RFC 7515 §4.1.11: a recipient must refuse a JWS whose `crit` names an extension it does
/// not understand. This host understands none, so the parameter's presence, with any value
/// (a list, an empty list, null, anything), refuses the token. The header is read here
/// from its JSON rather than through `jsonwebtoken::Header`, which reads `"crit": null`
/// as absent.
fn refuse_critical_extensions(header: &Map<String, Value>) -> Result<(), Refusal> {
    match header.get("crit") {
        None => Ok(()),
        Some(value) => Err(Refusal::CriticalHeader(shortened(&value.to_string()))),
    }
}

/// A value from a hostile token as the journal shows it: cut short.
fn shortened(text: &str) -> String {
    text.chars().take(80).collect()
}

/// The one algorithm a key may verify.
fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, UnusableKey> {
    match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
            // Checked here because jsonwebtoken 11 slices the key to 32 bytes unchecked: a
            // shorter `x` would panic at the first token rather than be refused.
            let x = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&p.x)
                .map_err(|e| UnusableKey::Invalid(format!("x: {e}")))?;
            let x: [u8; 32] = x
                .try_into()
                .map_err(|_| UnusableKey::Invalid("an Ed25519 public key is 32 bytes".into()))?;
            ed25519_dalek::VerifyingKey::from_bytes(&x)
                .map_err(|_| UnusableKey::Invalid("not an Ed25519 public key".into()))?;
            Ok(Algorithm::EdDSA)
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
            Ok(Algorithm::ES256)
        }
        AlgorithmParameters::RSA(_) => Ok(Algorithm::RS256),
        AlgorithmParameters::OctetKey(_) => Err(UnusableKey::Symmetric),
        _ => Err(UnusableKey::UnsupportedType),
    }
}

pub fn read_jwks(path: &Path) -> Result<JwkSet, JwksError> {
    let text = std::fs::read_to_string(path).map_err(|source| JwksError::Read {
        path: path.to_owned(),
        source,
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|source| JwksError::NotJwks {
        path: path.to_owned(),
        source,
    })?;
    for jwk in &set.keys {
        key_algorithm(jwk).map_err(|why| JwksError::UnusableKey {
            path: path.to_owned(),
            why,
        })?;
    }
    Ok(set)
}

#[cfg(test)]
mod tests {
    //! The refusal matrix, with no daemon and no root: each case names the `Refusal` it
    //! must give, and the clock is fixed so that time-bound cases are exact.

    use super::*;
    use crate::grant::{keygen, sign, Audience, KeyAlg};
    use jsonwebtoken::EncodingKey;
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://issuer.test";
    const LEEWAY: i64 = 30;
    const MAX_LIFETIME: i64 = 3600;

    struct TestKey {
        kid: &'static str,
        alg: Algorithm,
        pem: String,
        jwk: Jwk,
    }

    fn make_key(alg: KeyAlg, kid: &'static str) -> TestKey {
        let (pem, jwks) = keygen(alg, kid).unwrap();
        let mut set: JwkSet = serde_json::from_str(&jwks).unwrap();
        TestKey {
            kid,
            alg: key_algorithm(&set.keys[0]).unwrap(),
            pem,
            jwk: set.keys.remove(0),
        }
    }

    /// One key of each kind for the whole run: an RSA key takes seconds to make.
    fn ed() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Ed25519, "ed-1"))
    }

    fn es() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Es256, "es-1"))
    }

    fn rs() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Rs256, "rs-1"))
    }

    fn policy() -> PolicyConfig {
        PolicyConfig {
            max_lifetime_secs: MAX_LIFETIME as u64,
            allowed_groups: vec!["users".into()],
            allowed_profiles: vec!["restricted".into(), "ghost".into()],
            default_profile: "default".into(),
            leeway_secs: LEEWAY as u64,
        }
    }

    fn verifier_with(jwks: Vec<Jwk>, policy: PolicyConfig) -> Verifier {
        Verifier {
            issuers: vec![Issuer {
                iss: ISS.into(),
                keys: JwkSet { keys: jwks },
            }],
            audiences: vec!["host-a".into(), "group:web".into()],
            policy,
            name_prefix: "jit-".into(),
            // "ghost" is allowed by policy but no such profile file exists; "unlisted"
            // exists but policy does not allow it.
            known_profiles: ["default", "restricted", "unlisted"]
                .map(String::from)
                .into(),
        }
    }

    /// Trusts one issuer with an Ed25519, a P-256 and an RSA key.
    fn verifier() -> Verifier {
        verifier_with(
            vec![ed().jwk.clone(), es().jwk.clone(), rs().jwk.clone()],
            policy(),
        )
    }

    fn claims() -> Claims {
        Claims {
            iss: ISS.into(),
            sub: "alice@example.test".into(),
            aud: Audience::One("host-a".into()),
            jti: "grant-1".into(),
            iat: NOW - 60,
            nbf: None,
            exp: NOW + 600,
            login: "jit-alice".into(),
            groups: vec![],
            ssh_keys: vec![],
            secret_hash: None,
            profile: None,
            approved_by: None,
            reason: None,
        }
    }

    fn signed(key: &TestKey, claims: &Claims) -> String {
        sign(&key.pem, key.kid, claims).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unb64(text: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .unwrap()
    }

    /// A token with any header and any claims, signed by the Ed25519 key.
    fn signed_raw(header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = EncodingKey::from_ed_pem(ed().pem.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::EdDSA).unwrap();
        format!("{message}.{sig}")
    }

    fn ed_header() -> Value {
        json!({"alg": "EdDSA", "kid": "ed-1", "typ": "JWT"})
    }

    fn claims_json() -> Value {
        serde_json::to_value(claims()).unwrap()
    }

    fn refusal(verifier: &Verifier, token: &str) -> Refusal {
        match verifier.verify(token, NOW) {
            Ok(grant) => panic!("accepted: {:?}", grant.claims),
            Err(why) => why,
        }
    }

    fn refusal_of(claims: &Claims) -> Refusal {
        refusal(&verifier(), &signed(ed(), claims))
    }

    fn accepts(claims: &Claims) -> Grant {
        verifier()
            .verify(&signed(ed(), claims), NOW)
            .unwrap_or_else(|why| panic!("refused: {why}"))
    }

    // --- what is accepted ---

    #[test]
    fn each_key_type_verifies_its_own_algorithm() {
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let grant = v
                .verify(&signed(key, &claims()), NOW)
                .unwrap_or_else(|why| panic!("{:?}: {why}", key.alg));
            assert_eq!(grant.claims, claims());
            assert_eq!(grant.profile, "default");
        }
    }

    #[test]
    fn without_kid_the_only_key_is_used_and_several_keys_need_one() {
        for header in [
            json!({"alg": "EdDSA"}),
            json!({"alg": "EdDSA", "kid": null}),
        ] {
            let token = signed_raw(&header, &claims_json());
            verifier_with(vec![ed().jwk.clone()], policy())
                .verify(&token, NOW)
                .unwrap();
            assert_eq!(
                refusal(&verifier(), &token),
                Refusal::MissingKid(ISS.into())
            );
        }
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let token = format!("  {}\n", signed(ed(), &claims()));
        verifier().verify(&token, NOW).unwrap();
    }

    // --- the algorithm is the key's ---

    #[test]
    fn alg_none_is_refused_signed_or_not() {
        let v = verifier();
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "none", "kid": "ed-1"}),
            json!({"alg": "None", "kid": "ed-1"}),
        ] {
            let unsigned = format!(
                "{}.{}.",
                b64(header.to_string().as_bytes()),
                b64(claims_json().to_string().as_bytes())
            );
            let name = header["alg"].as_str().unwrap().to_string();
            for token in [unsigned, signed_raw(&header, &claims_json())] {
                assert_eq!(
                    refusal(&v, &token),
                    Refusal::Malformed(Malformed::UnsupportedAlgorithm(name.clone())),
                    "{header}"
                );
            }
        }
        assert_eq!(
            refusal(&v, &signed_raw(&json!({"kid": "ed-1"}), &claims_json())),
            Refusal::Malformed(Malformed::NoAlgorithm)
        );
        assert_eq!(
            refusal(
                &v,
                &signed_raw(&json!({"alg": null, "kid": "ed-1"}), &claims_json())
            ),
            Refusal::Malformed(Malformed::NoAlgorithm)
        );
        assert!(matches!(
            refusal(
                &v,
                &signed_raw(&json!({"alg": 7, "kid": "ed-1"}), &claims_json())
            ),
            Refusal::Malformed(Malformed::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn hmac_keyed_with_a_public_key_is_refused() {
        // The classic key confusion: the public key's bytes, as text or raw, as an HMAC
        // secret under the key's kid.
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let public = serde_json::to_value(&key.jwk).unwrap();
            let text = public
                .get("x")
                .or_else(|| public.get("n"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string();
            for secret in [
                text.as_bytes().to_vec(),
                unb64(&text),
                public.to_string().into_bytes(),
            ] {
                for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                    let mut header = jsonwebtoken::Header::new(alg);
                    header.kid = Some(key.kid.into());
                    let token = jsonwebtoken::encode(
                        &header,
                        &claims(),
                        &EncodingKey::from_secret(&secret),
                    )
                    .unwrap();
                    assert_eq!(
                        refusal(&v, &token),
                        Refusal::AlgorithmMismatch {
                            got: alg,
                            want: key.alg
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_of_another_algorithm_than_its_key_is_refused() {
        let v = verifier();
        // Each key signs under each other key's kid: RS256 and ES256 against the EdDSA key,
        // and every other pairing.
        for signer in [ed(), es(), rs()] {
            for named in [ed(), es(), rs()] {
                if signer.alg == named.alg {
                    continue;
                }
                let token = sign(&signer.pem, named.kid, &claims()).unwrap();
                assert_eq!(
                    refusal(&v, &token),
                    Refusal::AlgorithmMismatch {
                        got: signer.alg,
                        want: named.alg
                    }
                );
            }
        }
        // A header that lies about the algorithm of a genuine signature.
        let token = signed_raw(&json!({"alg": "RS256", "kid": "ed-1"}), &claims_json());
        assert_eq!(
            refusal(&v, &token),
            Refusal::AlgorithmMismatch {
                got: Algorithm::RS256,
                want: Algorithm::EdDSA
            }
        );
        // PS256 is the RSA key's family but not its algorithm.
        let token = signed_raw(&json!({"alg": "PS256", "kid": "rs-1"}), &claims_json());
        assert_eq!(
            refusal(&v, &token),
            Refusal::AlgorithmMismatch {
                got: Algorithm::PS256,
                want: Algorithm::RS256
            }
        );
    }

    #[test]
    fn a_symmetric_key_in_the_set_verifies_nothing() {
        let oct: Jwk =
            serde_json::from_value(json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hs-1"})).unwrap();
        let v = verifier_with(vec![oct], policy());
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("hs-1".into());
        let token =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        assert_eq!(
            refusal(&v, &token),
            Refusal::UnusableKey {
                iss: ISS.into(),
                kid: "hs-1".into(),
                why: UnusableKey::Symmetric
            }
        );
    }

    #[test]
    fn a_jwks_file_with_a_short_ed25519_key_is_refused_at_load() {
        let dir = std::env::temp_dir().join(format!("usher-jwks-short-{}", std::process::id()));
        crate::fsutil::private_dir(&dir, 0o700).unwrap();
        let path = dir.join("short.json");
        std::fs::write(
            &path,
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            read_jwks(&path),
            Err(JwksError::UnusableKey {
                why: UnusableKey::Invalid(_),
                ..
            })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_that_is_no_key_verifies_nothing() {
        let broken: Jwk = serde_json::from_value(
            json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "bad-1"}),
        )
        .unwrap();
        let v = verifier_with(vec![broken], policy());
        let token = sign(&ed().pem, "bad-1", &claims()).unwrap();
        assert!(matches!(
            refusal(&v, &token),
            Refusal::UnusableKey {
                why: UnusableKey::Invalid(_),
                ..
            }
        ));
    }

    #[test]
    fn a_jwks_file_with_a_symmetric_key_is_refused_at_load() {
        let dir = std::env::temp_dir().join(format!("usher-jwks-{}", std::process::id()));
        crate::fsutil::private_dir(&dir, 0o700).unwrap();
        let path = dir.join("oct.json");
        std::fs::write(&path, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
        assert!(matches!(
            read_jwks(&path),
            Err(JwksError::UnusableKey {
                why: UnusableKey::Symmetric,
                ..
            })
        ));
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(read_jwks(&path), Err(JwksError::NotJwks { .. })));
        assert!(matches!(
            read_jwks(&dir.join("absent.json")),
            Err(JwksError::Read { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // --- which key, which issuer ---

    #[test]
    fn an_unknown_kid_is_refused() {
        let token = sign(&ed().pem, "ed-9", &claims()).unwrap();
        assert_eq!(
            refusal(&verifier(), &token),
            Refusal::UnknownKey {
                iss: ISS.into(),
                kid: "ed-9".into()
            }
        );
    }

    #[test]
    fn an_unknown_or_absent_issuer_is_refused() {
        let mut c = claims();
        c.iss = "https://evil.test".into();
        assert_eq!(
            refusal_of(&c),
            Refusal::UnknownIssuer("https://evil.test".into())
        );
        // Issuers are compared exactly.
        c.iss = format!("{ISS}/");
        assert_eq!(refusal_of(&c), Refusal::UnknownIssuer(format!("{ISS}/")));
        for iss in [Value::Null, json!(7), json!([ISS])] {
            let mut c = claims_json();
            c["iss"] = iss;
            assert_eq!(
                refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                Refusal::Malformed(Malformed::MissingClaim("iss".into()))
            );
        }
        let mut c = claims_json();
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            refusal(&verifier(), &signed_raw(&ed_header(), &c)),
            Refusal::Malformed(Malformed::MissingClaim("iss".into()))
        );
    }

    // --- the signature ---

    #[test]
    fn a_flipped_byte_in_the_signature_is_refused() {
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let token = signed(key, &claims());
            let (message, signature) = token.rsplit_once('.').unwrap();
            let mut sig = unb64(signature);
            for at in [0, sig.len() / 2, sig.len() - 1] {
                sig[at] ^= 0x01;
                let forged = format!("{message}.{}", b64(&sig));
                assert_eq!(refusal(&v, &forged), Refusal::BadSignature, "{:?}", key.alg);
                sig[at] ^= 0x01;
            }
            // Cut short, or gone.
            let forged = format!("{message}.{}", b64(&sig[..sig.len() - 1]));
            assert_eq!(refusal(&v, &forged), Refusal::BadSignature);
            assert_eq!(refusal(&v, &format!("{message}.")), Refusal::BadSignature);
        }
    }

    #[test]
    fn tampered_claims_are_refused() {
        let token = signed(ed(), &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut c: Value = serde_json::from_slice(&unb64(parts[1])).unwrap();
        c["login"] = json!("jit-admin");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(refusal(&verifier(), &forged), Refusal::BadSignature);
        // A changed header is as bad as changed claims.
        let header = json!({"alg": "EdDSA", "kid": "ed-1", "typ": "at+jwt"});
        let forged = format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            parts[1],
            parts[2]
        );
        assert_eq!(refusal(&verifier(), &forged), Refusal::BadSignature);
    }

    #[test]
    fn another_key_under_a_trusted_kid_is_refused() {
        let v = verifier();
        for (alg, trusted) in [(KeyAlg::Ed25519, ed()), (KeyAlg::Es256, es())] {
            let stranger = make_key(alg, trusted.kid);
            assert_eq!(
                refusal(&v, &signed(&stranger, &claims())),
                Refusal::BadSignature
            );
        }
    }

    // --- the audience ---

    #[test]
    fn the_audience_must_name_this_host_or_one_of_its_selectors() {
        for aud in [
            Audience::One("host-a".into()),
            Audience::One("group:web".into()),
            Audience::Many(vec!["host-b".into(), "group:web".into()]),
            Audience::Many(vec!["host-a".into()]),
        ] {
            let mut c = claims();
            c.aud = aud.clone();
            accepts(&c);
        }
        for aud in [
            Audience::One("host-b".into()),
            Audience::One("HOST-A".into()),
            Audience::One("group:*".into()),
            Audience::One("group:db".into()),
            Audience::One("".into()),
            Audience::Many(vec!["host-b".into(), "group:db".into()]),
            Audience::Many(vec![]),
        ] {
            let mut c = claims();
            c.aud = aud.clone();
            assert_eq!(refusal_of(&c), Refusal::WrongAudience, "{aud:?}");
        }
        for aud in [None, Some(Value::Null), Some(json!(5))] {
            let mut c = claims_json();
            match aud {
                None => {
                    c.as_object_mut().unwrap().remove("aud");
                }
                Some(v) => c["aud"] = v,
            }
            assert_eq!(
                refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                Refusal::Malformed(Malformed::MissingClaim("aud".into()))
            );
        }
    }

    // --- time ---

    #[test]
    fn expiry_is_exact_with_the_leeway() {
        let mut c = claims();
        c.iat = NOW - 1000;
        c.exp = NOW - LEEWAY + 1;
        accepts(&c);
        c.exp = NOW - LEEWAY;
        assert_eq!(refusal_of(&c), Refusal::Expired);
        c.exp = NOW - 3600;
        c.iat = NOW - 4000;
        assert_eq!(refusal_of(&c), Refusal::Expired);
    }

    #[test]
    fn a_grant_that_has_not_started_is_refused() {
        let mut c = claims();
        c.nbf = Some(NOW + LEEWAY);
        accepts(&c);
        c.nbf = Some(NOW + LEEWAY + 1);
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
        // An iat in the future counts as a start too, nbf or not.
        let mut c = claims();
        c.iat = NOW + LEEWAY + 1;
        c.exp = NOW + 600;
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
        c.nbf = Some(NOW);
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
    }

    #[test]
    fn without_leeway_a_second_early_is_too_early() {
        let v = verifier_with(
            vec![ed().jwk.clone()],
            PolicyConfig {
                leeway_secs: 0,
                ..policy()
            },
        );
        let mut c = claims();
        c.nbf = Some(NOW);
        v.verify(&signed(ed(), &c), NOW).unwrap();
        c.nbf = Some(NOW + 1);
        assert_eq!(refusal(&v, &signed(ed(), &c)), Refusal::NotYetValid);
        let mut c = claims();
        c.exp = NOW;
        assert_eq!(refusal(&v, &signed(ed(), &c)), Refusal::Expired);
        c.exp = NOW + 1;
        v.verify(&signed(ed(), &c), NOW).unwrap();
    }

    #[test]
    fn the_lifetime_is_capped_by_local_policy() {
        let mut c = claims();
        c.iat = NOW - 60;
        c.exp = c.iat + MAX_LIFETIME;
        accepts(&c);
        c.exp = c.iat + MAX_LIFETIME + 1;
        assert_eq!(
            refusal_of(&c),
            Refusal::LifetimeOverCap {
                got: MAX_LIFETIME + 1,
                cap: MAX_LIFETIME as u64
            }
        );
        // Measured from nbf when there is one.
        c.nbf = Some(NOW);
        c.exp = NOW + MAX_LIFETIME;
        accepts(&c);
        c.exp = NOW + MAX_LIFETIME + 1;
        assert!(matches!(refusal_of(&c), Refusal::LifetimeOverCap { .. }));
        // A grant that ends before it starts has no lifetime at all.
        let mut c = claims();
        c.nbf = Some(NOW);
        c.exp = NOW;
        c.iat = NOW - 10;
        let v = verifier_with(
            vec![ed().jwk.clone()],
            PolicyConfig {
                leeway_secs: 60,
                ..policy()
            },
        );
        assert_eq!(
            refusal(&v, &signed(ed(), &c)),
            Refusal::BadClaim(InvalidClaim::EndsBeforeItStarts)
        );
    }

    // --- local policy ---

    #[test]
    fn groups_must_all_be_allowed() {
        let mut c = claims();
        c.groups = vec!["users".into()];
        accepts(&c);
        for groups in [vec!["sudo"], vec!["users", "sudo"], vec!["Users"], vec![""]] {
            c.groups = groups.iter().map(|g| g.to_string()).collect();
            let bad = groups.iter().find(|g| **g != "users").unwrap();
            assert_eq!(
                refusal_of(&c),
                Refusal::GroupNotAllowed(bad.to_string()),
                "{groups:?}"
            );
        }
    }

    #[test]
    fn the_profile_must_be_allowed_and_exist() {
        let mut c = claims();
        c.profile = Some("restricted".into());
        assert_eq!(accepts(&c).profile, "restricted");
        c.profile = Some("default".into());
        assert_eq!(accepts(&c).profile, "default");
        // Not allowed by policy; allowed but not on this host; neither.
        for name in ["unlisted", "ghost", "unrestricted-root"] {
            c.profile = Some(name.into());
            assert_eq!(refusal_of(&c), Refusal::ProfileNotAllowed(name.into()));
        }
    }

    #[test]
    fn the_login_must_be_a_valid_name_inside_the_prefix() {
        let mut c = claims();
        for login in [
            "root",
            "alice",
            "jit-",
            "xjit-alice",
            "JIT-alice",
            "jit-Alice",
            "jit-x;rm -rf",
            "jit-a b",
            "jit-a/../b",
            "jit-a\n",
            &format!("jit-{}", "a".repeat(40)),
        ] {
            c.login = login.into();
            assert_eq!(refusal_of(&c), Refusal::BadLogin(login.into()));
        }
    }

    #[test]
    fn claims_with_bad_values_are_refused() {
        let mut c = claims();
        for jti in ["", "a b", "a@b", "a/b", &"j".repeat(129)] {
            c.jti = jti.into();
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::Jti),
                "{jti:?}"
            );
        }
        let mut c = claims();
        for sub in ["", "a\nb", "a\u{0}", &"s".repeat(257)] {
            c.sub = sub.into();
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::Sub),
                "{sub:?}"
            );
        }
        let mut c = claims();
        for hash in ["plain", "$1$md5$x", "$6$salt$a:b", "$6$salt$a\nb"] {
            c.secret_hash = Some(hash.into());
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::SecretHash),
                "{hash:?}"
            );
        }
        c.secret_hash = Some(crate::grant::console_secret_hash("s3cret").unwrap());
        accepts(&c);
        let mut c = claims();
        c.ssh_keys = vec!["ssh-ed25519 not-a-key".into()];
        assert!(matches!(
            refusal_of(&c),
            Refusal::BadClaim(InvalidClaim::SshKey(_))
        ));
    }

    // --- form ---

    #[test]
    fn every_required_claim_must_be_there() {
        for name in REQUIRED_CLAIMS {
            for absent in [None, Some(Value::Null)] {
                let mut c = claims_json();
                match &absent {
                    None => {
                        c.as_object_mut().unwrap().remove(name);
                    }
                    Some(v) => c[name] = v.clone(),
                }
                assert_eq!(
                    refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                    Refusal::Malformed(Malformed::MissingClaim(name.into())),
                    "{name} {absent:?}"
                );
            }
        }
    }

    #[test]
    fn claims_of_the_wrong_type_are_malformed() {
        for (name, value) in [
            ("login", json!(5)),
            ("jti", json!(["a"])),
            ("iat", json!("now")),
            ("nbf", json!("later")),
            ("groups", json!("users")),
            ("aud", json!([1, 2])),
        ] {
            let mut c = claims_json();
            c[name] = value;
            assert!(
                matches!(
                    refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                    Refusal::Malformed(Malformed::ClaimType(_) | Malformed::MissingClaim(_))
                ),
                "{name}"
            );
        }
        // A string exp is not an exp.
        let mut c = claims_json();
        c["exp"] = json!("tomorrow");
        assert_eq!(
            refusal(&verifier(), &signed_raw(&ed_header(), &c)),
            Refusal::Malformed(Malformed::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn garbage_is_malformed_before_anything_is_trusted() {
        let v = verifier();
        let header = b64(ed_header().to_string().as_bytes());
        let body = b64(claims_json().to_string().as_bytes());
        let malformed = |token: &str| match refusal(&v, token) {
            Refusal::Malformed(m) => m,
            other => panic!("{token:.60}: {other:?}"),
        };
        for token in [
            "",
            " ",
            "\n",
            "abc",
            "a.b",
            "a.b.c.d",
            "...",
            &format!("{header}.{body}"),
        ] {
            assert_eq!(malformed(token), Malformed::NotThreeParts, "{token:?}");
        }
        for token in [
            "not.a.jwt".to_string(),
            "!!!.e30.AAAA".to_string(),
            format!("{}.{body}.AAAA", b64(b"not json")),
            format!("{}.{body}.AAAA", b64(b"[1]")),
            format!("{}.{body}.AAAA", b64(b"\xff\xfe")),
            format!("{}.{body}.AAAA", b64(br#"{"alg":"EdDSA","kid":5}"#)),
            format!("{}.{body}.AAAA", b64(br#"{"alg":"EdDSA","typ":5}"#)),
        ] {
            assert!(
                matches!(
                    malformed(&token),
                    Malformed::Undecodable {
                        part: Part::Header,
                        ..
                    }
                ),
                "{token}"
            );
        }
        for claims in [
            "!!!".to_string(),
            b64(b"not json"),
            b64(b"[]"),
            b64(b"\"x\""),
        ] {
            let token = format!("{header}.{claims}.AAAA");
            assert!(
                matches!(
                    malformed(&token),
                    Malformed::Undecodable {
                        part: Part::Claims,
                        ..
                    }
                ),
                "{token}"
            );
        }
        let token = format!("{header}.{body}.not*base64");
        assert!(matches!(
            malformed(&token),
            Malformed::Undecodable {
                part: Part::Signature,
                ..
            }
        ));
    }

    #[test]
    fn a_huge_token_is_refused_unread() {
        let v = verifier();
        assert_eq!(
            refusal(&v, &"a".repeat(20_000)),
            Refusal::Malformed(Malformed::TooLong)
        );
        // Even properly signed by a trusted key.
        let mut c = claims();
        c.reason = Some("r".repeat(MAX_TOKEN_BYTES));
        assert_eq!(
            refusal(&v, &signed(ed(), &c)),
            Refusal::Malformed(Malformed::TooLong)
        );
        // Just under the limit is fine.
        c.reason = Some("r".repeat(MAX_TOKEN_BYTES / 2));
        v.verify(&signed(ed(), &c), NOW).unwrap();
    }

    // --- crit ---

    #[test]
    fn a_header_with_crit_is_refused_whatever_its_value() {
        let v = verifier();
        // The same header without crit verifies: the refusals below are crit's alone.
        v.verify(
            &signed_raw(
                &json!({"alg": "EdDSA", "kid": "ed-1", "exp": 1, "b64": true}),
                &claims_json(),
            ),
            NOW,
        )
        .unwrap();
        for crit in [
            json!(["exp"]),
            json!(["b64"]),
            json!(["urn:example:unknown"]),
            json!([]),
            json!(null),
            json!("exp"),
            json!({"x": 1}),
            json!(0),
        ] {
            let token = signed_raw(
                &json!({"alg": "EdDSA", "kid": "ed-1", "crit": crit, "exp": 1, "b64": true}),
                &claims_json(),
            );
            assert!(
                matches!(refusal(&v, &token), Refusal::CriticalHeader(_)),
                "crit {crit}"
            );
        }
        // A duplicated name cannot hide it, nor can an algorithm the host refuses anyway.
        for header in [
            r#"{"alg":"EdDSA","kid":"ed-1","crit":["exp"],"crit":null}"#,
            r#"{"alg":"none","crit":null}"#,
        ] {
            let token = format!("{}.{}.AAAA", b64(header.as_bytes()), b64(b"{}"));
            assert!(
                matches!(refusal(&v, &token), Refusal::CriticalHeader(_)),
                "{header}"
            );
        }
    }

    #[test]
    fn a_long_crit_value_is_cut_short_in_the_reason() {
        let token = signed_raw(
            &json!({"alg": "EdDSA", "kid": "ed-1", "crit": ["x".repeat(5000)]}),
            &claims_json(),
        );
        let why = refusal(&verifier(), &token);
        assert!(matches!(why, Refusal::CriticalHeader(_)));
        assert!(why.to_string().len() < 200, "{why}");
    }
}
