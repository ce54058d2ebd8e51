//! Host keys and seals.

use base64::Engine;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};

/// The Ed25519 key of an OpenSSH public key line (`ssh-ed25519 AAAA… comment`).
pub fn parse_openssh_ed25519(line: &str) -> Result<VerifyingKey, String> {
    let mut parts = line.split_whitespace();
    if parts.next() != Some("ssh-ed25519") {
        return Err("only ssh-ed25519 host keys are supported".into());
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(parts.next().ok_or("no key data")?)
        .map_err(|e| format!("key data: {e}"))?;
    // string "ssh-ed25519", string key (32 bytes)
    let read = |at: usize| -> Result<(&[u8], usize), String> {
        let len = u32::from_be_bytes(blob.get(at..at + 4).ok_or("short key")?.try_into().unwrap())
            as usize;
        Ok((
            blob.get(at + 4..at + 4 + len).ok_or("short key")?,
            at + 4 + len,
        ))
    };
    let (name, next) = read(0)?;
    if name != b"ssh-ed25519" {
        return Err("key type mismatch".into());
    }
    let (key, _) = read(next)?;
    let key: [u8; 32] = key.try_into().map_err(|_| "an Ed25519 key is 32 bytes")?;
    VerifyingKey::from_bytes(&key).map_err(|e| e.to_string())
}

pub fn verify_seal(key: &VerifyingKey, message: &str, signature_b64: &str) -> Result<(), String> {
    let sig = base64::engine::general_purpose::STANDARD
        .decode(signature_b64)
        .map_err(|e| format!("signature: {e}"))?;
    let sig = Signature::from_slice(&sig).map_err(|e| format!("signature: {e}"))?;
    key.verify(message.as_bytes(), &sig)
        .map_err(|_| "the seal's signature does not verify".to_string())
}
