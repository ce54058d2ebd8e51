//! The collector's answers to the agents' shipping requests (collector/API.md), as both
//! sides read them: the collector serialises these, the shipper and the test uploader
//! decide on them.

use base64::Engine;
use ed25519_dalek::{Signer, Verifier};
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Every write an agent makes (a chunk, the metadata) carries the host key's Ed25519
/// signature over the write's identity in this header (standard base64), so a collector
/// can tell a write of the host from a write of someone holding only its token; the
/// signature is over headers only, so it is checked before the body is read.
pub const SIGNATURE_HEADER: &str = "x-usher-signature";
/// A chunk's chain link before it (`h(n-1)`), and its own (`h(n)`); for metadata,
/// `X-Usher-Hash` is the SHA-256 of the body.
pub const PREV_HASH_HEADER: &str = "x-usher-prev-hash";
pub const HASH_HEADER: &str = "x-usher-hash";

/// What the host signs for chunk `seq` of a stream: its place and both chain links (the
/// link commits to the body).
pub fn chunk_signed_text(session: &str, stream: &str, seq: u64, prev: &str, hash: &str) -> String {
    format!("usher-chunk-v1\n{session}\n{stream}\n{seq}\n{prev}\n{hash}\n")
}

/// What the host signs for a session's metadata: the session and the body's SHA-256.
pub fn meta_signed_text(session: &str, body_sha256: &str) -> String {
    format!("usher-meta-v1\n{session}\n{body_sha256}\n")
}

/// SHA-256 in lowercase hex (the metadata's hash in its header and in the seal).
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// The header value for a write whose signed text is `text`.
pub fn sign_write(key: &ed25519_dalek::SigningKey, text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(key.sign(text.as_bytes()).to_bytes())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WriteSignatureError {
    #[error("the write's signature is not base64 of 64 bytes")]
    Malformed,
    #[error("the write is not signed by the host's key")]
    BadSignature,
}

/// Whether the host whose key is `key` signed `text`.
pub fn verify_write(
    key: &ed25519_dalek::VerifyingKey,
    text: &str,
    signature: &str,
) -> Result<(), WriteSignatureError> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(signature)
        .map_err(|_| WriteSignatureError::Malformed)?;
    let signature =
        ed25519_dalek::Signature::from_slice(&bytes).map_err(|_| WriteSignatureError::Malformed)?;
    key.verify(text.as_bytes(), &signature)
        .map_err(|_| WriteSignatureError::BadSignature)
}

/// `GET /api/v1/sessions/{id}/streams/{stream}`: what is stored durably; an upload
/// resumes there.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamStatus {
    pub next_seq: u64,
    /// `h(next_seq - 1)`, or the genesis when nothing is stored.
    pub last_hash: String,
}

/// `PUT …/chunks/{seq}` accepted: `201 {"stored": true, "next_seq": N+1}`, or
/// `200 {"stored": false, "duplicate": true}` for a chunk already stored with that hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkAccepted {
    pub stored: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub duplicate: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
}

/// Every refusal's body: a code to decide on, and words for a person.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub code: ErrorCode,
    /// For a person; never parsed.
    pub error: String,
    /// With `gap` and with a chunk refused as tampered: where the stored stream ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_seq: Option<u64>,
}

/// Why the collector refused, as the `code` of its error body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (ids, headers, JSON).
    BadRequest,
    /// 401: no known token.
    Unauthorized,
    /// 403: another host's session or metadata.
    Forbidden,
    /// 404.
    NotFound,
    /// 409: a chunk number past the end of the stored stream; resume at `next_seq`.
    Gap,
    /// 409 or 422: the chain does not hold, or the seal does not match; the session is
    /// flagged.
    Tampered,
    /// 413: a chunk over 4 MiB.
    TooLarge,
    /// 408: the body did not arrive in time; send the write again.
    Timeout,
    /// 409 (workflow): the request is no longer pending, or already reviewed by this person.
    Conflict,
    /// 429: too many requests from this principal or address; try again later.
    RateLimited,
    /// 500.
    Internal,
    /// A code this side does not know (a newer collector).
    #[serde(other)]
    Unknown,
}

/// A chunk body as the agent sends it: zstd at level 1 (fast: the agent's CPU matters
/// more than the last percent) when that saves at least a tenth (then `Some`, sent with
/// `Content-Encoding: zstd`); else `None`, and the bytes go as they are.
#[cfg(feature = "zstd")]
pub fn compress_chunk(raw: &[u8]) -> Option<Vec<u8>> {
    // Below this the frame's overhead eats the saving.
    const WORTH_TRYING: usize = 512;
    if raw.len() < WORTH_TRYING {
        return None;
    }
    let smaller = zstd::bulk::compress(raw, 1).ok()?;
    (smaller.len() <= raw.len() - raw.len() / 10).then_some(smaller)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_write_signature_holds_only_for_its_text_and_key() {
        let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
        let text = chunk_signed_text("s", "cast", 3, "aa", "bb");
        assert_eq!(text, "usher-chunk-v1\ns\ncast\n3\naa\nbb\n");
        let sig = sign_write(&key, &text);
        assert_eq!(verify_write(&key.verifying_key(), &text, &sig), Ok(()));
        let moved = chunk_signed_text("s", "cast", 4, "aa", "bb");
        assert_eq!(
            verify_write(&key.verifying_key(), &moved, &sig),
            Err(WriteSignatureError::BadSignature)
        );
        let other = ed25519_dalek::SigningKey::from_bytes(&[8; 32]);
        assert_eq!(
            verify_write(&other.verifying_key(), &text, &sig),
            Err(WriteSignatureError::BadSignature)
        );
        assert_eq!(
            verify_write(&key.verifying_key(), &text, "!!"),
            Err(WriteSignatureError::Malformed)
        );
        assert_eq!(
            meta_signed_text("s", &sha256_hex(b"{}")),
            "usher-meta-v1\ns\n44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a\n"
        );
    }

    #[test]
    fn a_gap_carries_its_code_words_and_resume_point() {
        let gap = Refusal {
            code: ErrorCode::Gap,
            error: "gap".into(),
            next_seq: Some(7),
        };
        let json = serde_json::to_value(&gap).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"code": "gap", "error": "gap", "next_seq": 7})
        );
        assert_eq!(serde_json::from_value::<Refusal>(json).unwrap(), gap);
    }

    #[test]
    fn an_unknown_code_is_read_as_unknown() {
        let r: Refusal =
            serde_json::from_str(r#"{"code": "quota", "error": "over quota"}"#).unwrap();
        assert_eq!(r.code, ErrorCode::Unknown);
        assert_eq!(r.next_seq, None);
    }

    #[test]
    fn chunk_answers_keep_their_documented_shapes() {
        let stored = ChunkAccepted {
            stored: true,
            duplicate: false,
            next_seq: Some(3),
        };
        assert_eq!(
            serde_json::to_value(&stored).unwrap(),
            serde_json::json!({"stored": true, "next_seq": 3})
        );
        let duplicate = ChunkAccepted {
            stored: false,
            duplicate: true,
            next_seq: None,
        };
        assert_eq!(
            serde_json::to_value(&duplicate).unwrap(),
            serde_json::json!({"stored": false, "duplicate": true})
        );
    }

    #[cfg(feature = "zstd")]
    #[test]
    fn chunks_are_compressed_only_when_it_saves_a_tenth() {
        let lines: Vec<u8> = (0..2000)
            .flat_map(|i| format!("[{i}.0, \"o\", \"line {i}\\r\\n\"]\n").into_bytes())
            .collect();
        let packed = compress_chunk(&lines).expect("terminal output compresses");
        assert!(packed.len() * 4 < lines.len());
        assert_eq!(zstd::bulk::decompress(&packed, lines.len()).unwrap(), lines);
        // Random bytes (e.g. PNG data) do not shrink: sent as they are.
        let mut noise = vec![0u8; 64 << 10];
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for b in noise.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        assert_eq!(compress_chunk(&noise), None);
        assert_eq!(
            compress_chunk(b"[0.1, \"o\", \"x\"]\n"),
            None,
            "too small to bother"
        );
    }
}
