//! The hash chain that lets the collector show a recording is complete and unaltered:
//! `h(-1) = sha256("usher-chain-v1\n" + session + "\n" + stream)`,
//! `h(n) = sha256(h(n-1) || chunk(n))`, and a seal signed by the host's key at the end.

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

pub fn genesis(session_id: &str, stream: &str) -> String {
    hex::encode(Sha256::digest(
        format!("usher-chain-v1\n{session_id}\n{stream}").as_bytes(),
    ))
}

pub fn next(prev_hex: &str, chunk: &[u8]) -> Result<String, String> {
    let prev = hex::decode(prev_hex).map_err(|e| format!("bad hash {prev_hex:?}: {e}"))?;
    let mut h = Sha256::new();
    h.update(&prev);
    h.update(chunk);
    Ok(hex::encode(h.finalize()))
}

/// The text the host signs when a session's streams are complete:
/// `usher-seal-v1\n<session>\n` then `<stream> <chunks> <last_hash>\n` per stream, by name.
pub fn seal_message(session_id: &str, streams: &BTreeMap<String, (u64, String)>) -> String {
    let mut m = format!("usher-seal-v1\n{session_id}\n");
    for (name, (chunks, last)) in streams {
        m.push_str(&format!("{name} {chunks} {last}\n"));
    }
    m
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
    fn seal_lists_streams_in_name_order() {
        let mut s = BTreeMap::new();
        s.insert("cast".to_string(), (3, "aa".to_string()));
        s.insert("audit".to_string(), (1, "bb".to_string()));
        assert_eq!(
            seal_message("id", &s),
            "usher-seal-v1\nid\naudit 1 bb\ncast 3 aa\n"
        );
    }
}
