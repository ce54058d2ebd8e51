//! A small local issuer: key generation and grant signing, so a single host (and the
//! tests) need no external identity service.

use super::Claims;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyAlg {
    Ed25519,
    Es256,
    Rs256,
}

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("cannot make an RSA key: {0}")]
    RsaKey(#[from] rsa::Error),
    #[error("cannot encode the private key as PKCS#8: {0}")]
    Pkcs8(#[from] ed25519_dalek::pkcs8::Error),
    #[error("not an Ed25519, P-256 or RSA private key in PKCS#8 PEM")]
    NotAPrivateKey,
    #[error("{0}")]
    Jose(#[from] jsonwebtoken::errors::Error),
    #[error("cannot write the JWKS: {0}")]
    Jwks(#[from] serde_json::Error),
    #[error("cannot hash the secret: {0:?}")]
    SecretHash(sha_crypt::CryptError),
}

/// A new issuer key pair: the private key as PKCS#8 PEM and the public key as a JWKS.
pub fn keygen(alg: KeyAlg, kid: &str) -> Result<(String, String), IssueError> {
    let mut rng = rand::rngs::OsRng;
    let pem = match alg {
        // PKCS#8 v1 (no public key inside): the form jsonwebtoken reads.
        KeyAlg::Ed25519 => ed25519_dalek::pkcs8::KeypairBytes {
            secret_key: ed25519_dalek::SigningKey::generate(&mut rng).to_bytes(),
            public_key: None,
        }
        .to_pkcs8_pem(Default::default())?
        .to_string(),
        KeyAlg::Es256 => p256::SecretKey::random(&mut rng)
            .to_pkcs8_pem(Default::default())?
            .to_string(),
        KeyAlg::Rs256 => rsa::RsaPrivateKey::new(&mut rng, 3072)?
            .to_pkcs8_pem(Default::default())?
            .to_string(),
    };
    let (key, algorithm) = encoding_key(&pem)?;
    let mut jwk = Jwk::from_encoding_key(&key, algorithm)?;
    jwk.common.key_id = Some(kid.to_string());
    let jwks = JwkSet { keys: vec![jwk] };
    let jwks = serde_json::to_string_pretty(&jwks)?;
    Ok((pem, jwks))
}

/// The crypt(3) SHA-512 hash of a console one-time secret, for the `secret_hash` claim.
pub fn console_secret_hash(secret: &str) -> Result<String, IssueError> {
    let params = sha_crypt::Sha512Params::new(10_000).map_err(IssueError::SecretHash)?;
    sha_crypt::sha512_simple(secret, &params).map_err(IssueError::SecretHash)
}

/// Signs `claims` with a key made by `keygen`; the key's type picks the algorithm.
pub fn sign(private_pem: &str, kid: &str, claims: &Claims) -> Result<String, IssueError> {
    let (key, alg) = encoding_key(private_pem)?;
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_string());
    Ok(jsonwebtoken::encode(&header, claims, &key)?)
}

fn encoding_key(pem: &str) -> Result<(EncodingKey, Algorithm), IssueError> {
    if ed25519_dalek::SigningKey::from_pkcs8_pem(pem).is_ok() {
        return Ok((EncodingKey::from_ed_pem(pem.as_bytes())?, Algorithm::EdDSA));
    }
    if p256::SecretKey::from_pkcs8_pem(pem).is_ok() {
        return Ok((EncodingKey::from_ec_pem(pem.as_bytes())?, Algorithm::ES256));
    }
    if rsa::RsaPrivateKey::from_pkcs8_pem(pem).is_ok() {
        return Ok((EncodingKey::from_rsa_pem(pem.as_bytes())?, Algorithm::RS256));
    }
    Err(IssueError::NotAPrivateKey)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_algorithm_signs_and_publishes_its_key() {
        for (alg, want) in [
            (KeyAlg::Ed25519, "\"OKP\""),
            (KeyAlg::Es256, "\"EC\""),
            (KeyAlg::Rs256, "\"RSA\""),
        ] {
            let (pem, jwks) = keygen(alg, "k1").unwrap();
            assert!(jwks.contains(want) && jwks.contains("\"k1\""), "{jwks}");
            assert!(!jwks.contains("\"d\""), "private part leaked into the JWKS");
            let (_, a) = encoding_key(&pem).unwrap();
            assert_eq!(
                format!("{a:?}"),
                match alg {
                    KeyAlg::Ed25519 => "EdDSA",
                    KeyAlg::Es256 => "ES256",
                    KeyAlg::Rs256 => "RS256",
                }
            );
        }
        assert!(matches!(
            encoding_key("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(IssueError::NotAPrivateKey)
        ));
    }
}
