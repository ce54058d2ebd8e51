//! The hash chain that lets the collector show a recording is complete and unaltered.
//!
//! Each stream of a session is a chain of chunks:
//! `h(-1) = sha256("usher-chain-v1\n" + session + "\n" + stream)`,
//! `h(n) = sha256(h(n-1) as 32 bytes || chunk n)`. On the wire and on disk a link is
//! lowercase hex; [`genesis_bytes`] and [`next_bytes`] are the same links as bytes.

use sha2::{Digest, Sha256};

/// One link of a chain, as bytes.
pub type Link = [u8; 32];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    #[error("bad chain hash {text:?}: not 64 hex digits")]
    BadHash { text: String },
}

/// The chain's starting point for one stream of one session.
pub fn genesis_bytes(session_id: &str, stream: &str) -> Link {
    Sha256::digest(format!("usher-chain-v1\n{session_id}\n{stream}").as_bytes()).into()
}

/// The link after `prev` once `chunk` is appended.
pub fn next_bytes(prev: &Link, chunk: &[u8]) -> Link {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(chunk);
    h.finalize().into()
}

/// [`genesis_bytes`] in hex.
pub fn genesis(session_id: &str, stream: &str) -> String {
    hex::encode(genesis_bytes(session_id, stream))
}

/// [`next_bytes`] in hex; `prev_hex` comes from outside (a header, a state file).
pub fn next(prev_hex: &str, chunk: &[u8]) -> Result<String, ChainError> {
    Ok(hex::encode(next_bytes(&parse(prev_hex)?, chunk)))
}

/// A link from its hex form.
pub fn parse(hex_text: &str) -> Result<Link, ChainError> {
    let bad = || ChainError::BadHash {
        text: hex_text.chars().take(80).collect(),
    };
    let bytes = hex::decode(hex_text).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_links_depend_on_every_byte_and_the_order() {
        let g = genesis("s1", "cast");
        assert_eq!(g.len(), 64);
        assert_ne!(g, genesis("s1", "audit"));
        assert_ne!(g, genesis("s2", "cast"));
        let a = next(&g, b"one\n").unwrap();
        let b = next(&a, b"two\n").unwrap();
        assert_ne!(b, next(&next(&g, b"two\n").unwrap(), b"one\n").unwrap());
        assert_ne!(a, next(&g, b"one!").unwrap());
        assert!(next("zz", b"x").is_err());
    }

    #[test]
    fn the_hex_and_byte_forms_are_one_chain() {
        let g = genesis_bytes("s", "cast");
        assert_eq!(hex::encode(g), genesis("s", "cast"));
        assert_eq!(
            hex::encode(next_bytes(&g, b"x\n")),
            next(&genesis("s", "cast"), b"x\n").unwrap()
        );
        assert_eq!(parse(&genesis("s", "cast")), Ok(g));
    }

    #[test]
    fn the_known_genesis_does_not_change() {
        // Stores and spools hold chains made with this exact text: it is the protocol.
        assert_eq!(
            genesis("s", "cast"),
            hex::encode(Sha256::digest(b"usher-chain-v1\ns\ncast"))
        );
    }

    #[test]
    fn links_that_are_not_32_bytes_of_hex_are_refused() {
        for bad in ["", "zz", "abc", &"ab".repeat(31), &"ab".repeat(33)] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
