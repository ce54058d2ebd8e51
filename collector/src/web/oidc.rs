//! The relying party's side of OpenID Connect, against any provider found by its issuer URL:
//! discovery, the authorization request (code + PKCE S256 + state + nonce), the code
//! exchange, and the ID token's checks (signature by a key of the provider's JWKS, `iss`,
//! `aud`, `azp`, `exp`, `nonce`).
//!
//! Written on reqwest and usher-trust's key cache (the provider's JWKS by discovery,
//! refreshed on an unknown `kid`, the key's type deciding the algorithm) rather than with
//! the `openidconnect` crate: adding that crate made cargo re-resolve the workspace (russh
//! and the RustCrypto release candidates moved), which the russh/ironrdp pins cannot afford.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest;
use std::time::Duration;
use usher_trust::{Expect, IssuerConfig, IssuerKeys, Refusal};

/// How long a request to the provider may take.
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(10);
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
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum IdTokenRefused {
    /// Its form, key, algorithm, signature, issuer or time (usher-trust's checks).
    #[error(transparent)]
    Trust(Refusal),
    #[error("issued to another client")]
    Audience,
    #[error("expired")]
    Expired,
    #[error("not this sign-in's nonce")]
    Nonce,
    #[error("the claim {0} is missing")]
    Missing(&'static str),
}

impl From<Refusal> for IdTokenRefused {
    fn from(r: Refusal) -> IdTokenRefused {
        match r {
            Refusal::WrongAudience { .. } => IdTokenRefused::Audience,
            Refusal::Expired { .. } => IdTokenRefused::Expired,
            other => IdTokenRefused::Trust(other),
        }
    }
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
}

/// One provider, discovered.
pub struct Provider {
    pub issuer: String,
    authorization_endpoint: url::Url,
    token_endpoint: String,
    userinfo_endpoint: Option<String>,
    http: reqwest::Client,
    keys: IssuerKeys,
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
    /// Discovers `issuer` (its `/.well-known/openid-configuration`) and fetches its keys;
    /// `ca` is an extra root for its HTTPS.
    pub async fn discover(
        issuer: &str,
        ca: Option<&std::path::Path>,
        http: reqwest::Client,
    ) -> Result<Provider, OidcError> {
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
        let keys = IssuerKeys::new(&IssuerConfig {
            ca: ca.map(std::path::Path::to_path_buf),
            ..IssuerConfig::discovery(&doc.issuer)
        })
        .map_err(|e| OidcError::Keys(e.to_string()))?;
        keys.refresh()
            .await
            .map_err(|e| OidcError::Keys(e.to_string()))?;
        Ok(Provider {
            issuer: doc.issuer,
            authorization_endpoint,
            token_endpoint: doc.token_endpoint,
            userinfo_endpoint: doc.userinfo_endpoint,
            http,
            keys,
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
        Ok(verify_id_token(&self.keys, token, client_id, nonce, groups_claim, now).await?)
    }
}

/// The ID token's checks against an issuer's keys: usher-trust's (form, key, algorithm,
/// signature, `iss`, `aud`, time), then OpenID Connect's own (`azp`, `nonce`, `sub`).
pub async fn verify_id_token(
    keys: &IssuerKeys,
    token: &str,
    client_id: &str,
    nonce: Option<&str>,
    groups_claim: &str,
    now: i64,
) -> Result<(Identity, Value), IdTokenRefused> {
    let audiences = [client_id.to_string()];
    let expect = Expect {
        audiences: &audiences,
        leeway_secs: LEEWAY_SECS,
        now,
    };
    let claims = Value::Object(keys.verify(token, &expect).await?);
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
    if claims.get("exp").and_then(Value::as_i64).is_none() {
        return Err(IdTokenRefused::Missing("exp"));
    }
    if let Some(expected) = nonce {
        if claims.get("nonce").and_then(Value::as_str) != Some(expected) {
            return Err(IdTokenRefused::Nonce);
        }
    }
    Ok((identity(&claims, groups_claim)?, claims))
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
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
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

    fn keys(jwk: Jwk) -> IssuerKeys {
        IssuerKeys::fixed(ISS, JwkSet { keys: vec![jwk] })
    }

    fn token(encoding: &EncodingKey, kid: &str, claims: Value) -> String {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, encoding).unwrap()
    }

    fn claims(aud: Value) -> Value {
        json!({"iss": ISS, "aud": aud, "sub": "s-bob", "exp": 2000, "iat": 1000,
               "preferred_username": "bob", "groups": ["sre", "eng"], "nonce": "n1"})
    }

    #[tokio::test]
    async fn a_token_for_this_client_names_its_person_and_groups() {
        let (enc, jwk) = key(1, "k1");
        let t = token(&enc, "k1", claims(json!("web")));
        let (who, _) = verify_id_token(&keys(jwk), &t, "web", Some("n1"), "groups", 1500)
            .await
            .unwrap();
        assert_eq!(who.sub, "s-bob");
        assert_eq!(who.name, "bob");
        assert_eq!(who.groups, vec!["sre", "eng"]);
    }

    #[tokio::test]
    async fn another_client_issuer_key_nonce_or_time_is_refused() {
        let (enc, jwk) = key(1, "k1");
        let k = keys(jwk);
        let t = token(&enc, "k1", claims(json!("cli")));
        let check = |t: String, client: &'static str, nonce: Option<&'static str>, now: i64| {
            let k = &k;
            async move { verify_id_token(k, &t, client, nonce, "groups", now).await }
        };
        assert_eq!(
            check(t.clone(), "web", None, 1500).await,
            Err(IdTokenRefused::Audience)
        );
        assert_eq!(
            check(t.clone(), "cli", None, 2100).await,
            Err(IdTokenRefused::Expired)
        );
        assert_eq!(
            check(t.clone(), "cli", Some("n2"), 1500).await,
            Err(IdTokenRefused::Nonce)
        );
        assert!(check(t.clone(), "cli", Some("n1"), 1500).await.is_ok());
        let mut other_iss = claims(json!("cli"));
        other_iss["iss"] = "https://other.test".into();
        assert!(matches!(
            check(token(&enc, "k1", other_iss), "cli", None, 1500).await,
            Err(IdTokenRefused::Trust(_))
        ));
        // Another key under the same kid: the signature does not hold.
        let (other, _) = key(2, "k1");
        assert!(matches!(
            check(token(&other, "k1", claims(json!("cli"))), "cli", None, 1500).await,
            Err(IdTokenRefused::Trust(Refusal::BadSignature))
        ));
        // Several audiences: azp must name this client.
        assert_eq!(
            check(
                token(&enc, "k1", claims(json!(["web", "cli"]))),
                "web",
                None,
                1500
            )
            .await,
            Err(IdTokenRefused::Missing("azp"))
        );
        let mut c = claims(json!(["web", "cli"]));
        c["azp"] = "cli".into();
        assert_eq!(
            check(token(&enc, "k1", c), "web", None, 1500).await,
            Err(IdTokenRefused::Audience)
        );
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
