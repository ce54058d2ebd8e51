//! A compact JWS checked against one issuer's keys: the form, the key (chosen by `kid`),
//! the algorithm (the key's, never the header's), the signature, `iss`, `aud` and time.
//!
//! Header parameters that point at other keys (`jku`, `x5u`, `x5c`, `jwk`) are never read:
//! an issuer's keys come only from its configured source.

use crate::refusal::{Malformed, Part, Refusal, UnusableKey};
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm};
use jsonwebtoken::{errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use std::str::FromStr;

/// Longer tokens are refused unread: a grant or an ID token is a few hundred bytes to a
/// few KiB, a hostile token could be anything.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// What a verified token must also satisfy.
#[derive(Debug, Clone)]
pub struct Expect<'a> {
    /// The token's `aud` must name at least one of these.
    pub audiences: &'a [String],
    /// Clock skew tolerated on `exp`, `nbf` and `iat`, in seconds.
    pub leeway_secs: u64,
    /// Unix seconds.
    pub now: i64,
}

/// A token whose signature, issuer, audience and time were checked: its claims.
pub type VerifiedClaims = Map<String, Value>;

/// What a token says before its signature is checked: enough to pick the issuer and the
/// key, nothing to trust.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub alg: Algorithm,
    pub kid: Option<String>,
    pub claims: Map<String, Value>,
}

impl Unverified {
    /// Decodes the three parts, so that whatever fails later is about trust, not form.
    pub fn parse(token: &str) -> Result<Unverified, Refusal> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(Malformed::TooLong.into());
        }
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

    /// The `iss` claim, unverified: only to pick whose keys to check the token against.
    pub fn issuer(&self) -> Result<&str, Refusal> {
        self.claims
            .get("iss")
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::MissingClaim("iss".into()).into())
    }
}

/// The issuer a token claims, read without trusting it (to choose which keys, which rules).
pub fn peek_issuer(token: &str) -> Result<String, Refusal> {
    Unverified::parse(token.trim())?
        .issuer()
        .map(str::to_string)
}

/// Which key of the set a token names. `Ok(None)`: its kid is not in the set (a refresh may
/// find it).
pub fn select_key<'k>(
    iss: &str,
    keys: &'k JwkSet,
    kid: Option<&str>,
) -> Result<Option<&'k Jwk>, Refusal> {
    match kid {
        Some(kid) => Ok(keys.find(kid)),
        None if keys.keys.len() == 1 => Ok(Some(&keys.keys[0])),
        None if keys.keys.is_empty() => Ok(None),
        None => Err(Refusal::MissingKid(iss.to_string())),
    }
}

/// Checks `token` against the keys of issuer `iss`: signature, `iss` (exactly), `aud` (one
/// of `expect.audiences`), `exp`/`nbf`/`iat` with the leeway. The claims come back as the
/// token has them; which of the others are required is the caller's business.
///
/// A kid that is not in `keys` is `Refusal::UnknownKey` with `RefreshNote::NotAsked`:
/// the caller that can refresh (`IssuerKeys::verify`) does so and asks again.
pub fn verify_with_keys(
    token: &str,
    iss: &str,
    keys: &JwkSet,
    expect: &Expect<'_>,
) -> Result<VerifiedClaims, Refusal> {
    let token = token.trim();
    let unverified = Unverified::parse(token)?;
    let claimed = unverified.issuer()?;
    if claimed != iss {
        return Err(Refusal::UnknownIssuer(shortened(claimed)));
    }
    let jwk =
        select_key(iss, keys, unverified.kid.as_deref())?.ok_or_else(|| Refusal::UnknownKey {
            iss: iss.to_string(),
            kid: unverified.kid.clone().unwrap_or_default(),
            refresh: crate::RefreshNote::NotAsked,
        })?;
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
    let key =
        DecodingKey::from_jwk(jwk).map_err(|e| unusable(UnusableKey::Invalid(e.to_string())))?;

    let mut validation = Validation::new(want);
    validation.set_issuer(&[iss]);
    validation.set_audience(expect.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    // Time is checked below against `expect.now`, so that tests and callers agree on one
    // clock.
    validation.validate_exp = false;
    validation.validate_nbf = false;
    let verified = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            ErrorKind::InvalidSignature => Refusal::BadSignature,
            ErrorKind::InvalidAudience => Refusal::WrongAudience {
                token: audience_text(unverified.claims.get("aud")),
                expected: expect.audiences.to_vec(),
            },
            ErrorKind::InvalidIssuer => Refusal::UnknownIssuer(iss.to_string()),
            ErrorKind::InvalidAlgorithm => Refusal::AlgorithmMismatch { got, want },
            ErrorKind::MissingRequiredClaim(name) => Malformed::MissingClaim(name.clone()).into(),
            ErrorKind::Json(e) => Malformed::ClaimType(e.to_string()).into(),
            ErrorKind::InvalidKeyFormat
            | ErrorKind::InvalidEddsaKey
            | ErrorKind::InvalidEcdsaKey
            | ErrorKind::InvalidRsaKey(_) => unusable(UnusableKey::Invalid(e.to_string())),
            _ => Malformed::Unreadable(e.to_string()).into(),
        })?
        .claims;
    let Value::Object(claims) = verified else {
        return Err(Malformed::Undecodable {
            part: Part::Claims,
            why: "not a JSON object".into(),
        }
        .into());
    };
    check_time(&claims, expect)?;
    Ok(claims)
}

/// `exp` (required; jsonwebtoken has checked it is a number), `nbf` and `iat` (optional,
/// numbers when present): not over, not yet started, both with the leeway.
fn check_time(claims: &Map<String, Value>, expect: &Expect<'_>) -> Result<(), Refusal> {
    let seconds = |name: &str| -> Result<Option<i64>, Refusal> {
        match claims.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_i64().map(Some).ok_or_else(|| {
                Malformed::ClaimType(format!("{name} is not a whole number of seconds")).into()
            }),
        }
    };
    let exp = seconds("exp")?.ok_or_else(|| Malformed::MissingClaim("exp".into()))?;
    let nbf = seconds("nbf")?;
    let iat = seconds("iat")?;
    let leeway = i64::try_from(expect.leeway_secs).unwrap_or(i64::MAX / 4);
    let now = expect.now;
    if now >= exp.saturating_add(leeway) {
        return Err(Refusal::Expired {
            ago_secs: now - exp,
        });
    }
    let starts = nbf.or(iat);
    if [starts, iat]
        .into_iter()
        .flatten()
        .any(|t| t > now.saturating_add(leeway))
    {
        return Err(Refusal::NotYetValid);
    }
    Ok(())
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
/// not understand. Usher understands none, so the parameter's presence, with any value
/// (a list, an empty list, null, anything), refuses the token. The header is read here
/// from its JSON rather than through `jsonwebtoken::Header`, which reads `"crit": null`
/// as absent.
fn refuse_critical_extensions(header: &Map<String, Value>) -> Result<(), Refusal> {
    match header.get("crit") {
        None => Ok(()),
        Some(value) => Err(Refusal::CriticalHeader(shortened(&value.to_string()))),
    }
}

/// A value from a hostile token as a log line shows it: cut short.
pub(crate) fn shortened(text: &str) -> String {
    text.chars().take(80).collect()
}

fn audience_text(aud: Option<&Value>) -> String {
    match aud {
        Some(Value::String(s)) => shortened(s),
        Some(Value::Array(items)) => shortened(
            &items
                .iter()
                .map(|v| v.as_str().unwrap_or("?"))
                .collect::<Vec<_>>()
                .join(", "),
        ),
        Some(other) => shortened(&other.to_string()),
        None => String::new(),
    }
}

/// The one algorithm a key may verify: its type's, or the `alg` it was published with when
/// that is one its type can do. The token's header never chooses.
pub fn key_algorithm(jwk: &Jwk) -> Result<Algorithm, UnusableKey> {
    let by_type = match &jwk.algorithm {
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
            Algorithm::EdDSA
        }
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => Algorithm::ES256,
        AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P384 => Algorithm::ES384,
        AlgorithmParameters::RSA(_) => Algorithm::RS256,
        AlgorithmParameters::OctetKey(_) => return Err(UnusableKey::Symmetric),
        _ => return Err(UnusableKey::UnsupportedType),
    };
    let Some(published) = &jwk.common.key_algorithm else {
        return Ok(by_type);
    };
    let published = match published {
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        other => {
            return Err(UnusableKey::Invalid(format!(
                "published for {other:?}, not for signatures its type can make"
            )))
        }
    };
    let same_family = match by_type {
        Algorithm::RS256 => matches!(
            published,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        other => published == other,
    };
    if same_family {
        Ok(published)
    } else {
        Err(UnusableKey::Invalid(format!(
            "published for {published:?} but it is a {by_type:?} key"
        )))
    }
}
