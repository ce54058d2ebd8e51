//! The relying party's side of OpenID Connect, against any provider found by its issuer URL:
//! discovery, the authorization request (code + PKCE S256 + state + nonce), the code
//! exchange, and the ID token's checks (signature by a key of the provider's JWKS, `iss`,
//! `aud`, `azp`, `exp`, `nonce`).
//!
//! Written on reqwest and jsonwebtoken (both already in the tree) rather than with the
//! `openidconnect` crate: adding that crate made cargo re-resolve the workspace (russh and
//! the RustCrypto release candidates moved), which the russh/ironrdp pins cannot afford.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest;
use std::time::{Duration, Instant};
use tokio::sync::RwLock;

/// How long a request to the provider may take.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
/// An unknown `kid` makes the keys be fetched again, at most this often.
const KEY_REFRESH_MIN: Duration = Duration::from_secs(30);
/// Clock difference tolerated on `exp` and `iat`.
const LEEWAY_SECS: u64 = 60;

#[derive(Debug, thiserror::Error)]
pub enum OidcError {
    #[error("the identity provider cannot be reached: {0}")]
    Unreachable(String),
    #[error("the identity provider's discovery document: {0}")]
    Discovery(String),
    #[error("the identity provider calls itself {found:?}, not {expected:?}")]
    IssuerMismatch { expected: String, found: String },
    #[error("the identity provider refused the code: {0}")]
    CodeRefused(String),
    #[error("the identity provider's keys: {0}")]
    Keys(String),
    #[error("the ID token is refused: {0}")]
    IdToken(#[from] IdTokenRefused),
    #[error("the provider's CA file {path}: {reason}")]
    Ca { path: String, reason: String },
}

/// Why an ID token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdTokenRefused {
    #[error("not a JWT: {0}")]
    Malformed(String),
    #[error("signed with algorithm {0:?}, which is not accepted")]
    Algorithm(String),
    #[error("signed by an unknown key {0:?}")]
    UnknownKey(String),
    #[error("the key {kid:?} does not sign with {alg:?}")]
    KeyAlgorithm { kid: String, alg: String },
    #[error("the signature or a registered claim does not hold: {0}")]
    Invalid(String),
    #[error("expired")]
    Expired,
    #[error("issued to another client")]
    Audience,
    #[error("not this sign-in's nonce")]
    Nonce,
    #[error("the claim {0} is missing")]
    Missing(&'static str),
}

/// Who the provider says signed in.
#[derive(Debug, Clone, PartialEq)]
pub struct Identity {
    pub sub: String,
    pub name: String,
    pub groups: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    jwks_uri: String,
}

struct Keys {
    set: JwkSet,
    fetched: Instant,
}

/// One provider, discovered.
pub struct Provider {
    pub issuer: String,
    authorization_endpoint: url::Url,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    jwks_uri: String,
    http: reqwest::Client,
    keys: RwLock<Keys>,
}

/// A fresh PKCE verifier, state or nonce: 32 random bytes, base64url.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// RFC 7636's S256 challenge of a verifier.
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(verifier.as_bytes()))
}

/// The HTTP client that talks to the provider: no redirects followed (a provider answers
/// its endpoints directly), bounded in time, with the configured extra root.
pub fn http_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, OidcError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(PROVIDER_TIMEOUT);
    if let Some(path) = ca {
        let ca_error = |reason: String| OidcError::Ca {
            path: path.display().to_string(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|e| ca_error(e.to_string()))?;
        let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| ca_error(e.to_string()))?;
        builder = builder.add_root_certificate(cert);
    }
    builder
        .build()
        .map_err(|e| OidcError::Unreachable(e.to_string()))
}

async fn get_json<T: serde::de::DeserializeOwned>(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
) -> Result<T, OidcError> {
    let mut request = http.get(url).header("accept", "application/json");
    if let Some(token) = bearer {
        request = request.bearer_auth(token);
    }
    let response = request
        .send()
        .await
        .map_err(|e| OidcError::Unreachable(format!("{url}: {e}")))?;
    if !response.status().is_success() {
        return Err(OidcError::Unreachable(format!(
            "{url}: HTTP {}",
            response.status()
        )));
    }
    let body = response
        .bytes()
        .await
        .map_err(|e| OidcError::Unreachable(format!("{url}: {e}")))?;
    serde_json::from_slice(&body).map_err(|e| OidcError::Discovery(format!("{url}: {e}")))
}

impl Provider {
    /// Discovers `issuer` (its `/.well-known/openid-configuration`) and fetches its keys.
    pub async fn discover(issuer: &str, http: reqwest::Client) -> Result<Provider, OidcError> {
        let issuer = issuer.trim_end_matches('/');
        let url = format!("{issuer}/.well-known/openid-configuration");
        let doc: Discovery = get_json(&http, &url, None).await?;
        // OpenID Connect Discovery 4.3: the document speaks for exactly this issuer.
        if doc.issuer.trim_end_matches('/') != issuer {
            return Err(OidcError::IssuerMismatch {
                expected: issuer.to_string(),
                found: doc.issuer,
            });
        }
        let authorization_endpoint = url::Url::parse(&doc.authorization_endpoint)
            .map_err(|e| OidcError::Discovery(format!("authorization_endpoint: {e}")))?;
        let set: JwkSet = get_json(&http, &doc.jwks_uri, None).await?;
        Ok(Provider {
            issuer: doc.issuer,
            authorization_endpoint,
            token_endpoint: doc.token_endpoint,
            userinfo_endpoint: doc.userinfo_endpoint,
            jwks_uri: doc.jwks_uri,
            http,
            keys: RwLock::new(Keys {
                set,
                fetched: Instant::now(),
            }),
        })
    }

    /// Where the browser goes to sign in.
    pub fn authorization_url(
        &self,
        client_id: &str,
        redirect_uri: &str,
        scopes: &[String],
        state: &str,
        nonce: &str,
        pkce_verifier: &str,
    ) -> String {
        let mut url = self.authorization_endpoint.clone();
        url.query_pairs_mut()
            .append_pair("response_type", "code")
            .append_pair("client_id", client_id)
            .append_pair("redirect_uri", redirect_uri)
            .append_pair("scope", &scopes.join(" "))
            .append_pair("state", state)
            .append_pair("nonce", nonce)
            .append_pair("code_challenge", &pkce_challenge(pkce_verifier))
            .append_pair("code_challenge_method", "S256");
        url.into()
    }

    /// Exchanges an authorization code: the ID token and the access token (for userinfo).
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: Option<&str>,
        redirect_uri: &str,
        code: &str,
        pkce_verifier: &str,
    ) -> Result<(String, Option<String>), OidcError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", pkce_verifier),
        ];
        let mut request = self.http.post(&self.token_endpoint);
        match client_secret {
            // client_secret_basic (RFC 6749 2.3.1: each part form-encoded first).
            Some(secret) => {
                let encode = |s: &str| {
                    url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>()
                };
                request = request.basic_auth(encode(client_id), Some(encode(secret)));
            }
            None => form.push(("client_id", client_id)),
        }
        let response = request
            .form(&form)
            .send()
            .await
            .map_err(|e| OidcError::Unreachable(format!("{}: {e}", self.token_endpoint)))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| OidcError::Unreachable(format!("{}: {e}", self.token_endpoint)))?;
        let body: Value = serde_json::from_slice(&bytes)
            .map_err(|e| OidcError::CodeRefused(format!("HTTP {status}: {e}")))?;
        if !status.is_success() {
            let error = body["error"].as_str().unwrap_or("unknown error");
            let description = body["error_description"].as_str().unwrap_or("");
            return Err(OidcError::CodeRefused(
                format!("{error} {description}").trim().to_string(),
            ));
        }
        let id_token = body["id_token"]
            .as_str()
            .ok_or_else(|| OidcError::CodeRefused("no id_token in the answer".into()))?;
        Ok((
            id_token.to_string(),
            body["access_token"].as_str().map(String::from),
        ))
    }

    /// The userinfo endpoint's claims for an access token, when the ID token lacks the
    /// groups claim (providers that keep scope claims out of ID tokens).
    pub async fn userinfo(&self, access_token: &str) -> Result<Option<Value>, OidcError> {
        let Some(url) = &self.userinfo_endpoint else {
            return Ok(None);
        };
        get_json(&self.http, url, Some(access_token))
            .await
            .map(Some)
    }

    /// The key `kid` names, fetching the JWKS again (rate-limited) when it is unknown.
    async fn key(&self, kid: Option<&str>) -> Result<Jwk, OidcError> {
        if let Some(jwk) = find_key(&self.keys.read().await.set, kid) {
            return Ok(jwk);
        }
        let mut keys = self.keys.write().await;
        if keys.fetched.elapsed() >= KEY_REFRESH_MIN {
            // The clock starts now whatever the outcome, so a flood of unknown kids is
            // one fetch per interval.
            keys.fetched = Instant::now();
            match get_json::<JwkSet>(&self.http, &self.jwks_uri, None).await {
                Ok(set) => keys.set = set,
                Err(e) => log::warn!(target: "usher", "the identity provider's keys: {e}"),
            }
        }
        find_key(&keys.set, kid).ok_or_else(|| {
            OidcError::IdToken(IdTokenRefused::UnknownKey(kid.unwrap_or("").to_string()))
        })
    }

    /// Checks an ID token issued by this provider to `client_id` (with `nonce`, when the
    /// sign-in sent one) and says who it names; `groups_claim` names the groups.
    pub async fn verify_id_token(
        &self,
        token: &str,
        client_id: &str,
        nonce: Option<&str>,
        groups_claim: &str,
        now: i64,
    ) -> Result<(Identity, Value), OidcError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| IdTokenRefused::Malformed(e.to_string()))?;
        let jwk = self.key(header.kid.as_deref()).await?;
        let claims = verify_with_key(token, &header, &jwk, &self.issuer, client_id, now)?;
        if let Some(expected) = nonce {
            if claims.get("nonce").and_then(Value::as_str) != Some(expected) {
                return Err(IdTokenRefused::Nonce.into());
            }
        }
        Ok((identity(&claims, groups_claim)?, claims))
    }
}

fn find_key(set: &JwkSet, kid: Option<&str>) -> Option<Jwk> {
    match kid {
        Some(kid) => set.find(kid).cloned(),
        // Without a kid only an unambiguous set will do.
        None if set.keys.len() == 1 => set.keys.first().cloned(),
        None => None,
    }
}

/// The algorithms a key may sign with: its type decides, never the token's header alone.
fn key_allows(jwk: &Jwk, alg: Algorithm) -> bool {
    use Algorithm::*;
    let family_ok = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => matches!(alg, RS256 | RS384 | RS512 | PS256 | PS384 | PS512),
        AlgorithmParameters::EllipticCurve(ec) => matches!(
            (&ec.curve, alg),
            (EllipticCurve::P256, ES256) | (EllipticCurve::P384, ES384)
        ),
        AlgorithmParameters::OctetKeyPair(okp) => {
            okp.curve == EllipticCurve::Ed25519 && alg == EdDSA
        }
        // Symmetric keys are never accepted (the provider's secret would be ours too),
        // nor key types this code does not know.
        _ => false,
    };
    let declared_ok = match jwk.common.key_algorithm {
        Some(declared) => format!("{declared:?}") == format!("{alg:?}"),
        None => true,
    };
    family_ok && declared_ok
}

/// The signature and the registered claims (`iss`, `aud`, `exp`, `azp`); the claims.
pub fn verify_with_key(
    token: &str,
    header: &jsonwebtoken::Header,
    jwk: &Jwk,
    issuer: &str,
    client_id: &str,
    now: i64,
) -> Result<Value, IdTokenRefused> {
    let alg = header.alg;
    let kid = header.kid.clone().unwrap_or_default();
    if matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512) {
        return Err(IdTokenRefused::Algorithm(format!("{alg:?}")));
    }
    if !key_allows(jwk, alg) {
        return Err(IdTokenRefused::KeyAlgorithm {
            kid,
            alg: format!("{alg:?}"),
        });
    }
    let key = DecodingKey::from_jwk(jwk).map_err(|e| IdTokenRefused::Invalid(e.to_string()))?;
    let mut validation = Validation::new(alg);
    validation.set_issuer(&[issuer]);
    validation.set_audience(&[client_id]);
    validation.set_required_spec_claims(&["iss", "aud", "exp", "sub"]);
    // Expiry is checked below against the caller's clock.
    validation.validate_exp = false;
    let claims: Value = jsonwebtoken::decode::<Value>(token, &key, &validation)
        .map_err(|e| match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidAudience => IdTokenRefused::Audience,
            _ => IdTokenRefused::Invalid(e.to_string()),
        })?
        .claims;
    let exp = claims
        .get("exp")
        .and_then(Value::as_i64)
        .ok_or(IdTokenRefused::Missing("exp"))?;
    if now > exp + LEEWAY_SECS as i64 {
        return Err(IdTokenRefused::Expired);
    }
    // OpenID Connect Core 3.1.3.7: with several audiences, `azp` must name this client;
    // when present it must name this client anyway.
    let several_audiences = claims
        .get("aud")
        .and_then(Value::as_array)
        .is_some_and(|a| a.len() > 1);
    match claims.get("azp").and_then(Value::as_str) {
        Some(azp) if azp != client_id => return Err(IdTokenRefused::Audience),
        None if several_audiences => return Err(IdTokenRefused::Missing("azp")),
        _ => {}
    }
    Ok(claims)
}

/// Who the claims name: `sub`, a readable name, and the groups from `groups_claim` (an
/// array of strings, or one string).
pub fn identity(claims: &Value, groups_claim: &str) -> Result<Identity, IdTokenRefused> {
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(IdTokenRefused::Missing("sub"))?;
    let name = ["preferred_username", "email", "name"]
        .iter()
        .find_map(|c| {
            claims
                .get(*c)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
        })
        .unwrap_or(sub);
    Ok(Identity {
        sub: sub.to_string(),
        name: name.to_string(),
        groups: groups(claims, groups_claim).unwrap_or_default(),
    })
}

/// The groups a claim lists; None when the claim is absent.
pub fn groups(claims: &Value, groups_claim: &str) -> Option<Vec<String>> {
    match claims.get(groups_claim)? {
        Value::Array(items) => Some(
            items
                .iter()
                .filter_map(Value::as_str)
                .map(String::from)
                .collect(),
        ),
        Value::String(one) => Some(vec![one.clone()]),
        _ => Some(Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::pkcs8::EncodePrivateKey;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    const ISS: &str = "https://idp.test";

    fn key(seed: u8, kid: &str) -> (EncodingKey, Jwk) {
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: [seed; 32],
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())
        .unwrap();
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes()).unwrap();
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA).unwrap();
        jwk.common.key_id = Some(kid.into());
        (encoding, jwk)
    }

    fn token(encoding: &EncodingKey, kid: &str, claims: Value) -> (String, jsonwebtoken::Header) {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        let t = jsonwebtoken::encode(&header, &claims, encoding).unwrap();
        (t, header)
    }

    fn claims(aud: Value) -> Value {
        json!({"iss": ISS, "aud": aud, "sub": "s-bob", "exp": 2000, "iat": 1000,
               "preferred_username": "bob", "groups": ["sre", "eng"], "nonce": "n1"})
    }

    #[test]
    fn a_token_for_this_client_names_its_person_and_groups() {
        let (enc, jwk) = key(1, "k1");
        let (t, h) = token(&enc, "k1", claims(json!("web")));
        let c = verify_with_key(&t, &h, &jwk, ISS, "web", 1500).unwrap();
        let who = identity(&c, "groups").unwrap();
        assert_eq!(who.sub, "s-bob");
        assert_eq!(who.name, "bob");
        assert_eq!(who.groups, vec!["sre", "eng"]);
    }

    #[test]
    fn another_client_issuer_key_or_time_is_refused() {
        let (enc, jwk) = key(1, "k1");
        let (t, h) = token(&enc, "k1", claims(json!("cli")));
        assert_eq!(
            verify_with_key(&t, &h, &jwk, ISS, "web", 1500),
            Err(IdTokenRefused::Audience)
        );
        assert!(matches!(
            verify_with_key(&t, &h, &jwk, "https://other.test", "cli", 1500),
            Err(IdTokenRefused::Invalid(_))
        ));
        assert_eq!(
            verify_with_key(&t, &h, &jwk, ISS, "cli", 2100),
            Err(IdTokenRefused::Expired)
        );
        let (_, other) = key(2, "k1");
        assert!(matches!(
            verify_with_key(&t, &h, &other, ISS, "cli", 1500),
            Err(IdTokenRefused::Invalid(_))
        ));
        // Several audiences: azp must name this client.
        let (t, h) = token(&enc, "k1", claims(json!(["web", "cli"])));
        assert_eq!(
            verify_with_key(&t, &h, &jwk, ISS, "web", 1500),
            Err(IdTokenRefused::Missing("azp"))
        );
        let mut c = claims(json!(["web", "cli"]));
        c["azp"] = "cli".into();
        let (t, h) = token(&enc, "k1", c);
        assert_eq!(
            verify_with_key(&t, &h, &jwk, ISS, "web", 1500),
            Err(IdTokenRefused::Audience)
        );
    }

    #[test]
    fn the_key_type_decides_the_algorithm() {
        let (enc, jwk) = key(1, "k1");
        let (t, mut h) = token(&enc, "k1", claims(json!("web")));
        h.alg = Algorithm::RS256;
        assert!(matches!(
            verify_with_key(&t, &h, &jwk, ISS, "web", 1500),
            Err(IdTokenRefused::KeyAlgorithm { .. })
        ));
        h.alg = Algorithm::HS256;
        assert!(matches!(
            verify_with_key(&t, &h, &jwk, ISS, "web", 1500),
            Err(IdTokenRefused::Algorithm(_))
        ));
    }

    #[test]
    fn groups_come_as_a_list_or_one_string_and_a_name_falls_back_to_sub() {
        let c = json!({"sub": "s1", "roles": "ops"});
        let who = identity(&c, "roles").unwrap();
        assert_eq!(
            (who.name.as_str(), who.groups),
            ("s1", vec!["ops".to_string()])
        );
        assert_eq!(identity(&c, "groups").unwrap().groups, Vec::<String>::new());
        assert_eq!(
            identity(&json!({"sub": ""}), "g"),
            Err(IdTokenRefused::Missing("sub"))
        );
    }

    #[test]
    fn the_pkce_challenge_is_rfc_7636s() {
        // RFC 7636 appendix B.
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        assert_ne!(random_token(), random_token());
        assert_eq!(random_token().len(), 43);
    }
}
