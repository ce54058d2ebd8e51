//! The seal: when a session is over and every chunk is acknowledged, the host signs, with
//! its SSH host key (Ed25519), how many chunks each stream has and the hash that ends it.
//! The collector checks the signature and that its stored chains end exactly there.
//!
//! Since the fleet issue (collector/FLEET.md) the seal also names the SHA-256 of the
//! session's metadata as last sent (`meta`), so that the metadata is under the signature
//! too (`usher-seal-v2`). A seal without `meta` is the older form (`usher-seal-v1`); the
//! collector refuses it.

use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where one stream's chain ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamEnd {
    pub chunks: u64,
    /// `h(chunks - 1)` in hex (the genesis when the stream has no chunk).
    pub last_hash: String,
}

/// `POST /api/v1/sessions/{id}/seal`: `{"streams": {"cast": {…}, "audit": {…}}, "signature": "<base64>"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    /// By stream name; the map's order is the order the signed text lists them in.
    pub streams: BTreeMap<String, StreamEnd>,
    /// SHA-256 (lowercase hex) of the metadata body as the host last sent it
    /// (`PUT …/meta`); absent in the older form.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta: Option<String>,
    /// Ed25519 over [`signed_text`], standard base64.
    pub signature: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SealError {
    #[error("the seal's signature is not base64 of 64 bytes")]
    MalformedSignature,
    #[error("the seal's signature does not verify")]
    BadSignature,
}

/// The text the host signs: `usher-seal-v2\n<session>\nmeta <sha256>\n` (or, without
/// metadata, the older `usher-seal-v1\n<session>\n`), then `<stream> <chunks> <last_hash>\n`
/// per stream, by name.
pub fn signed_text(
    session_id: &str,
    meta: Option<&str>,
    streams: &BTreeMap<String, StreamEnd>,
) -> String {
    let mut text = match meta {
        Some(hash) => format!("usher-seal-v2\n{session_id}\nmeta {hash}\n"),
        None => format!("usher-seal-v1\n{session_id}\n"),
    };
    for (name, end) in streams {
        text.push_str(&format!("{name} {} {}\n", end.chunks, end.last_hash));
    }
    text
}

impl Seal {
    /// The seal of `streams` and of the metadata whose SHA-256 is `meta`, signed with the
    /// host's key.
    pub fn sign(
        session_id: &str,
        meta: Option<String>,
        streams: BTreeMap<String, StreamEnd>,
        key: &ed25519_dalek::SigningKey,
    ) -> Seal {
        let signature = key.sign(signed_text(session_id, meta.as_deref(), &streams).as_bytes());
        Seal {
            streams,
            meta,
            signature: base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        }
    }

    /// Whether the host whose key is `key` signed these streams for this session.
    pub fn verify(
        &self,
        session_id: &str,
        key: &ed25519_dalek::VerifyingKey,
    ) -> Result<(), SealError> {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&self.signature)
            .map_err(|_| SealError::MalformedSignature)?;
        let signature = ed25519_dalek::Signature::from_slice(&bytes)
            .map_err(|_| SealError::MalformedSignature)?;
        key.verify(
            signed_text(session_id, self.meta.as_deref(), &self.streams).as_bytes(),
            &signature,
        )
        .map_err(|_| SealError::BadSignature)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn end(chunks: u64, last_hash: &str) -> StreamEnd {
        StreamEnd {
            chunks,
            last_hash: last_hash.into(),
        }
    }

    #[test]
    fn the_signed_text_lists_streams_in_name_order() {
        let mut streams = BTreeMap::new();
        streams.insert("cast".to_string(), end(3, "aa"));
        streams.insert("audit".to_string(), end(1, "bb"));
        assert_eq!(
            signed_text("id", None, &streams),
            "usher-seal-v1\nid\naudit 1 bb\ncast 3 aa\n"
        );
        assert_eq!(
            signed_text("id", Some("mm"), &streams),
            "usher-seal-v2\nid\nmeta mm\naudit 1 bb\ncast 3 aa\n"
        );
    }

    #[test]
    fn a_seal_verifies_only_for_its_session_streams_and_key() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let mut streams = BTreeMap::new();
        streams.insert("cast".to_string(), end(2, &"ab".repeat(32)));
        streams.insert("audit".to_string(), end(1, &"cd".repeat(32)));
        let seal = Seal::sign("s", Some("ee".repeat(32)), streams, &key);
        assert_eq!(seal.verify("s", &key.verifying_key()), Ok(()));
        let mut other_meta = seal.clone();
        other_meta.meta = Some("ef".repeat(32));
        assert_eq!(
            other_meta.verify("s", &key.verifying_key()),
            Err(SealError::BadSignature)
        );
        let mut no_meta = seal.clone();
        no_meta.meta = None;
        assert_eq!(
            no_meta.verify("s", &key.verifying_key()),
            Err(SealError::BadSignature)
        );
        assert_eq!(
            seal.verify("t", &key.verifying_key()),
            Err(SealError::BadSignature)
        );
        let other = ed25519_dalek::SigningKey::from_bytes(&[6; 32]);
        assert_eq!(
            seal.verify("s", &other.verifying_key()),
            Err(SealError::BadSignature)
        );
        let mut longer = seal.clone();
        longer.streams.get_mut("cast").unwrap().chunks = 3;
        assert_eq!(
            longer.verify("s", &key.verifying_key()),
            Err(SealError::BadSignature)
        );
        let mut garbled = seal.clone();
        garbled.signature = "not base64!".into();
        assert_eq!(
            garbled.verify("s", &key.verifying_key()),
            Err(SealError::MalformedSignature)
        );
    }

    #[test]
    fn the_json_form_is_the_documented_one() {
        let mut streams = BTreeMap::new();
        streams.insert("cast".to_string(), end(2, "ab"));
        let mut seal = Seal {
            streams,
            meta: None,
            signature: "c2ln".into(),
        };
        assert_eq!(
            serde_json::to_value(&seal).unwrap(),
            serde_json::json!({"streams": {"cast": {"chunks": 2, "last_hash": "ab"}}, "signature": "c2ln"})
        );
        seal.meta = Some("dd".into());
        assert_eq!(
            serde_json::to_value(&seal).unwrap(),
            serde_json::json!({"streams": {"cast": {"chunks": 2, "last_hash": "ab"}}, "meta": "dd", "signature": "c2ln"})
        );
        for bad in ["[]]", "{\"streams\": 3}", "{\"streams\": {}}"] {
            assert!(serde_json::from_str::<Seal>(bad).is_err(), "{bad}");
        }
    }
}
