//! The service's own issuer: one Ed25519 key that signs grants, API tokens and review
//! records, published as a JWKS so agents trust it by discovery.

use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::SigningKey;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sha2::Digest;
use usher_wire::jit::Principal;

/// The audience of the service's API tokens: never a host name, so an API token is never
/// a grant.
pub const API_AUDIENCE: &str = "usher-api";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("issuer key: {0}")]
    Key(String),
    #[error("{0}")]
    Jose(#[from] jsonwebtoken::errors::Error),
}

/// Why an API token is not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRefused {
    #[error("expired")]
    Expired,
    #[error("not a token of this service: {0}")]
    Invalid(String),
}

pub struct Issuer {
    /// `iss` of everything signed here: the service's public URL.
    pub iss: String,
    pub kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
    jwk: Jwk,
}

#[derive(Serialize, Deserialize)]
struct ApiClaims {
    iss: String,
    aud: String,
    sub: String,
    iat: i64,
    exp: i64,
    principal: Principal,
}

impl Issuer {
    /// A fresh key, as its 32 secret bytes (what the state store keeps).
    pub fn generate_secret() -> [u8; 32] {
        SigningKey::generate(&mut rand::rngs::OsRng).to_bytes()
    }

    pub fn new(iss: &str, secret: &[u8; 32]) -> Result<Issuer, IssuerError> {
        let signing = SigningKey::from_bytes(secret);
        // PKCS#8 v1 (no public key inside): the form jsonwebtoken reads.
        let pem = ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: *secret,
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())
        .map_err(|e| IssuerError::Key(e.to_string()))?;
        let kid = hex::encode(&sha2::Sha256::digest(signing.verifying_key().as_bytes())[..8]);
        let encoding = EncodingKey::from_ed_pem(pem.as_bytes())?;
        let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::EdDSA)?;
        jwk.common.key_id = Some(kid.clone());
        let decoding = DecodingKey::from_jwk(&jwk)?;
        Ok(Issuer {
            iss: iss.trim_end_matches('/').to_string(),
            kid,
            encoding,
            decoding,
            jwk,
        })
    }

    /// The public key, for `/jwks.json`.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: vec![self.jwk.clone()],
        }
    }

    /// `/.well-known/openid-configuration`: just enough for discovery of the keys.
    pub fn discovery_document(&self) -> serde_json::Value {
        serde_json::json!({
            "issuer": self.iss,
            "jwks_uri": format!("{}/jwks.json", self.iss),
            "id_token_signing_alg_values_supported": ["EdDSA"],
        })
    }

    /// Signs any claims (grants, review records) with the issuer key.
    pub fn sign<T: Serialize>(&self, claims: &T) -> Result<String, IssuerError> {
        self.sign_typed("JWT", claims)
    }

    /// Signs claims under a header `typ` of their own (e.g. a command's decision), so that
    /// a verifier can tell them from a grant whatever the claims say.
    pub fn sign_typed<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, IssuerError> {
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        header.typ = Some(typ.to_string());
        Ok(jsonwebtoken::encode(&header, claims, &self.encoding)?)
    }

    /// Verifies something this issuer signed (its signature only: the caller checks the
    /// claims that matter to it).
    pub fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, TokenRefused> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.validate_exp = false;
        v.validate_aud = false;
        v.required_spec_claims.clear();
        jsonwebtoken::decode::<T>(token, &self.decoding, &v)
            .map(|d| d.claims)
            .map_err(|e| TokenRefused::Invalid(e.to_string()))
    }

    /// A bearer token for `principal`, valid for `ttl_secs`.
    pub fn api_token(
        &self,
        principal: &Principal,
        now: i64,
        ttl_secs: i64,
    ) -> Result<String, IssuerError> {
        self.sign(&ApiClaims {
            iss: self.iss.clone(),
            aud: API_AUDIENCE.to_string(),
            sub: principal.sub.clone(),
            iat: now,
            exp: now + ttl_secs,
            principal: principal.clone(),
        })
    }

    /// The principal an API token speaks for.
    pub fn principal(&self, token: &str, now: i64) -> Result<Principal, TokenRefused> {
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[API_AUDIENCE]);
        v.set_issuer(&[&self.iss]);
        v.validate_exp = false;
        v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let claims = jsonwebtoken::decode::<ApiClaims>(token, &self.decoding, &v)
            .map_err(|e| TokenRefused::Invalid(e.to_string()))?
            .claims;
        if now >= claims.exp {
            return Err(TokenRefused::Expired);
        }
        if claims.principal.sub != claims.sub {
            return Err(TokenRefused::Invalid("sub mismatch".into()));
        }
        Ok(claims.principal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usher_wire::jit::Role;

    fn alice() -> Principal {
        Principal {
            sub: "alice-sub".into(),
            name: "alice".into(),
            groups: vec!["eng".into()],
            roles: [Role::Requester].into(),
        }
    }

    #[test]
    fn api_tokens_round_trip_and_expire() {
        let issuer = Issuer::new("https://usher.test/", &Issuer::generate_secret()).unwrap();
        assert_eq!(issuer.iss, "https://usher.test");
        let token = issuer.api_token(&alice(), 1000, 60).unwrap();
        assert_eq!(issuer.principal(&token, 1030).unwrap(), alice());
        assert_eq!(issuer.principal(&token, 1060), Err(TokenRefused::Expired));
    }

    #[test]
    fn another_key_or_a_grant_is_not_an_api_token() {
        let issuer = Issuer::new("https://usher.test", &Issuer::generate_secret()).unwrap();
        let other = Issuer::new("https://usher.test", &Issuer::generate_secret()).unwrap();
        let token = other.api_token(&alice(), 1000, 60).unwrap();
        assert!(matches!(
            issuer.principal(&token, 1001),
            Err(TokenRefused::Invalid(_))
        ));
        // Signed by the right key but meant for a host: refused by audience.
        let grant = issuer
            .sign(
                &serde_json::json!({"iss": issuer.iss, "aud": "web-1", "sub": "alice-sub",
                "exp": 2000, "principal": alice()}),
            )
            .unwrap();
        assert!(matches!(
            issuer.principal(&grant, 1001),
            Err(TokenRefused::Invalid(_))
        ));
    }

    #[test]
    fn the_jwks_holds_only_the_public_key() {
        let issuer = Issuer::new("https://usher.test", &Issuer::generate_secret()).unwrap();
        let jwks = serde_json::to_string(&issuer.jwks()).unwrap();
        assert!(jwks.contains(&issuer.kid) && jwks.contains("OKP"));
        assert!(!jwks.contains("\"d\""), "{jwks}");
    }
}
