//! Chunk bodies as agents send them (FLEET.md, "Shipping cheaply" and "Limits"): as they
//! are, or `Content-Encoding: zstd`. The chain hash is over the decoded bytes, so a body is
//! decoded before anything is checked against it; decoding stops at a cap, so a small body
//! that inflates without end (a bomb) costs at most the cap in memory, never more.

use crate::store::Encoding;
use bytes::Bytes;
use std::io::Read;

/// Why a chunk body cannot be taken.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodingError {
    /// Decoded, it is longer than the cap (413 `too_large`).
    #[error("the decoded chunk is over {cap} bytes")]
    TooLarge { cap: usize },
    /// `Content-Encoding: zstd`, but the body is not a complete zstd stream (400).
    #[error("the body is not zstd")]
    NotZstd,
    /// A `Content-Encoding` other than `zstd` or `identity` (415).
    #[error("unsupported Content-Encoding {0:?}: only zstd and identity")]
    Unsupported(String),
}

/// The encoding a `Content-Encoding` header value names (absent: identity).
pub fn encoding_of(header: Option<&str>) -> Result<Encoding, EncodingError> {
    match header.map(str::trim) {
        None | Some("") => Ok(Encoding::Identity),
        Some(v) if v.eq_ignore_ascii_case("identity") => Ok(Encoding::Identity),
        Some(v) if v.eq_ignore_ascii_case("zstd") => Ok(Encoding::Zstd),
        Some(other) => Err(EncodingError::Unsupported(other.to_string())),
    }
}

/// A chunk body as received (`header`: its `Content-Encoding`, if any) → its decoded bytes
/// (at most `cap`) and how it came. The body as sent stays the caller's (what storage
/// keeps).
pub fn decode(
    header: Option<&str>,
    body: Bytes,
    cap: usize,
) -> Result<(Bytes, Encoding), EncodingError> {
    match encoding_of(header)? {
        Encoding::Identity if body.len() > cap => Err(EncodingError::TooLarge { cap }),
        Encoding::Identity => Ok((body, Encoding::Identity)),
        Encoding::Zstd => Ok((Bytes::from(unzstd(&body, cap)?), Encoding::Zstd)),
    }
}

/// Decodes a zstd stream (one or more frames) of at most `cap` bytes decoded.
fn unzstd(body: &[u8], cap: usize) -> Result<Vec<u8>, EncodingError> {
    if body.is_empty() {
        return Err(EncodingError::NotZstd);
    }
    // A frame that declares its size says at once whether it fits.
    if let Ok(Some(declared)) = zstd::zstd_safe::get_frame_content_size(body) {
        if declared > cap as u64 {
            return Err(EncodingError::TooLarge { cap });
        }
    }
    let decoder =
        zstd::stream::read::Decoder::with_buffer(body).map_err(|_| EncodingError::NotZstd)?;
    let mut raw = Vec::new();
    // One byte past the cap tells "exactly the cap" from "more".
    decoder
        .take(cap as u64 + 1)
        .read_to_end(&mut raw)
        .map_err(|_| EncodingError::NotZstd)?;
    if raw.len() > cap {
        return Err(EncodingError::TooLarge { cap });
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;
    // What the agent sends (its policy is the wire crate's, tested there).
    use usher_wire::collector::compress_chunk as encode;

    const CAP: usize = 4 << 20;

    fn lines(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("[{i}.0, \"o\", \"line {i}\\r\\n\"]\n").into_bytes())
            .collect()
    }

    #[test]
    fn identity_is_taken_as_it_is_up_to_the_cap() {
        let body = Bytes::from_static(b"[0.1, \"o\", \"x\"]\n");
        for header in [None, Some("identity"), Some("Identity"), Some("")] {
            assert_eq!(
                decode(header, body.clone(), CAP),
                Ok((body.clone(), Encoding::Identity))
            );
        }
        assert_eq!(
            decode(None, Bytes::from(vec![b'x'; 11]), 10),
            Err(EncodingError::TooLarge { cap: 10 })
        );
    }

    #[test]
    fn zstd_is_decoded_to_the_bytes_that_were_encoded() {
        let raw = lines(5000);
        let sent = encode(&raw).expect("terminal output compresses");
        assert!(sent.len() * 4 < raw.len());
        let (decoded, how) = decode(Some("zstd"), Bytes::from(sent), CAP).unwrap();
        assert_eq!((&decoded[..], how), (&raw[..], Encoding::Zstd));
        // Exactly the cap is allowed.
        let full = vec![b'a'; CAP];
        let (decoded, _) = decode(Some("ZSTD"), encode(&full).unwrap().into(), CAP).unwrap();
        assert_eq!(decoded.len(), CAP);
    }

    #[test]
    fn a_bomb_stops_at_the_cap_whether_its_size_is_declared_or_not() {
        // 64 MiB of zeros in a few KiB, the size declared in the frame header.
        let declared = zstd::bulk::compress(&vec![0u8; 64 << 20], 1).unwrap();
        assert_eq!(
            decode(Some("zstd"), declared.into(), CAP),
            Err(EncodingError::TooLarge { cap: CAP })
        );
        // A streamed frame does not declare its size: decoding stops one byte past the cap.
        let mut streamed = zstd::stream::write::Encoder::new(Vec::new(), 1).unwrap();
        std::io::Write::write_all(&mut streamed, &vec![0u8; CAP + 1]).unwrap();
        let streamed = streamed.finish().unwrap();
        assert_eq!(
            zstd::zstd_safe::get_frame_content_size(&streamed)
                .ok()
                .flatten(),
            None
        );
        assert_eq!(
            decode(Some("zstd"), streamed.into(), CAP),
            Err(EncodingError::TooLarge { cap: CAP })
        );
    }

    #[test]
    fn what_is_not_zstd_or_is_cut_short_is_refused() {
        assert_eq!(
            decode(
                Some("zstd"),
                Bytes::from_static(b"[0.1, \"o\", \"x\"]\n"),
                CAP
            ),
            Err(EncodingError::NotZstd)
        );
        assert_eq!(
            decode(Some("zstd"), Bytes::new(), CAP),
            Err(EncodingError::NotZstd)
        );
        let sent = encode(&lines(5000)).unwrap();
        let cut = Bytes::copy_from_slice(&sent[..sent.len() / 2]);
        assert_eq!(decode(Some("zstd"), cut, CAP), Err(EncodingError::NotZstd));
        let mut trailing = sent.clone();
        trailing.extend_from_slice(b"garbage after the frame");
        assert_eq!(
            decode(Some("zstd"), trailing.into(), CAP),
            Err(EncodingError::NotZstd)
        );
    }

    #[test]
    fn other_encodings_are_unsupported() {
        for other in ["gzip", "br", "zstd, gzip"] {
            assert_eq!(
                decode(Some(other), Bytes::from_static(b"x\n"), CAP),
                Err(EncodingError::Unsupported(other.to_string()))
            );
        }
    }
}
