//! Host keys: the OpenSSH public key line an `[[agent]]` is bound to.

use base64::Engine;
use ed25519_dalek::VerifyingKey;

/// Why a configured host key is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("only ssh-ed25519 host keys are supported")]
    NotEd25519,
    #[error("no key data after ssh-ed25519")]
    NoKeyData,
    #[error("key data: not base64")]
    NotBase64,
    #[error("key data: too short")]
    Short,
    #[error("key data names another key type")]
    TypeMismatch,
    #[error("key data: an Ed25519 key is 32 bytes")]
    WrongLength,
    #[error("key data: not an Ed25519 public key")]
    NotAPoint,
}

/// The Ed25519 key of an OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse_openssh_ed25519(line: &str) -> Result<VerifyingKey, KeyError> {
    let mut parts = line.split_whitespace();
    if parts.next() != Some("ssh-ed25519") {
        return Err(KeyError::NotEd25519);
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(parts.next().ok_or(KeyError::NoKeyData)?)
        .map_err(|_| KeyError::NotBase64)?;
    // string "ssh-ed25519", string key (32 bytes)
    let read = |at: usize| -> Result<(&[u8], usize), KeyError> {
        let len: [u8; 4] = blob
            .get(at..at + 4)
            .and_then(|b| b.try_into().ok())
            .ok_or(KeyError::Short)?;
        let end = at + 4 + u32::from_be_bytes(len) as usize;
        Ok((blob.get(at + 4..end).ok_or(KeyError::Short)?, end))
    };
    let (name, next) = read(0)?;
    if name != b"ssh-ed25519" {
        return Err(KeyError::TypeMismatch);
    }
    let (key, _) = read(next)?;
    let key: [u8; 32] = key.try_into().map_err(|_| KeyError::WrongLength)?;
    VerifyingKey::from_bytes(&key).map_err(|_| KeyError::NotAPoint)
}
