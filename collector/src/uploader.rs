//! A client of the agents' protocol (collector/API.md, "Shipping"): what the tests and
//! `usher-collector bench` use to play an agent. It computes the hash chain and signs the
//! seal exactly as an agent does, and resumes from what the collector says it has.

use base64::Engine;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};

/// The chain's starting point for one stream of one session.
pub fn genesis(session: &str, stream: &str) -> [u8; 32] {
    Sha256::digest(format!("usher-chain-v1\n{session}\n{stream}").as_bytes()).into()
}

/// `h_n = sha256(h_{n-1} || chunk_n)`.
pub fn next_hash(prev: &[u8; 32], chunk: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(chunk);
    h.finalize().into()
}

/// The text the host key signs: `usher-seal-v1\n<id>\n` and `<stream> <chunks> <hash>\n`
/// per stream, in name order.
pub fn seal_message(session: &str, streams: &[(String, u64, String)]) -> String {
    let mut sorted: Vec<&(String, u64, String)> = streams.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let mut m = format!("usher-seal-v1\n{session}\n");
    for (name, chunks, last) in sorted {
        m.push_str(&format!("{name} {chunks} {last}\n"));
    }
    m
}

/// The OpenSSH public key line of `key`, as the collector's config wants it.
pub fn openssh_public_line(key: &SigningKey) -> String {
    let mut blob = Vec::new();
    for part in [&b"ssh-ed25519"[..], key.verifying_key().as_bytes()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!(
        "ssh-ed25519 {} usher-test",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// When fake sessions start (Unix time): the cast header's `timestamp`; exec events
/// carry Unix times as the agent's do.
pub const START: u64 = 1795000000;

/// One recorded session as an agent would have it in its spool: metadata, and each
/// stream cut into chunks of whole lines.
#[derive(Clone, Debug)]
pub struct Recording {
    pub id: String,
    pub meta: serde_json::Value,
    pub cast: Vec<Vec<u8>>,
    pub audit: Vec<Vec<u8>>,
}

impl Recording {
    /// A plausible session: `commands` exec events in the audit stream (one chunk each),
    /// and a cast of about `cast_bytes` bytes printing `marker`, cut into `chunk_bytes`
    /// chunks of whole lines.
    #[allow(clippy::too_many_arguments)]
    pub fn fake(
        id: &str,
        host: &str,
        sub: &str,
        login: &str,
        commands: &[&str],
        marker: &str,
        cast_bytes: usize,
        chunk_bytes: usize,
    ) -> Recording {
        let meta = serde_json::json!({
            "session_id": id, "kind": "ssh", "host": host, "login": login, "uid": 61000,
            "grant": {"iss": "test-issuer", "sub": sub, "jti": format!("jti-{id}"), "profile": "default",
                      "approved_by": "lead", "reason": "test", "expires_at": "2030-01-01T00:00:00Z"},
            "peer": "127.0.0.1:50000", "command": null, "term": "xterm",
            "started_at": "2026-11-22T12:00:00Z", "ended_at": "2026-11-22T12:05:00Z",
            "exit_status": 0, "exit_signal": null, "enforcement": "tracepoint", "enforced": true,
            "input_recorded": false, "interrupted": false, "extra_field_kept": "yes",
        });
        let mut lines: Vec<Vec<u8>> = vec![serde_json::json!({
            "version": 2, "width": 80, "height": 24, "timestamp": START
        })
        .to_string()
        .into_bytes()];
        let mut t = 0.1f64;
        let mut size = 0;
        lines.push(
            serde_json::to_vec(&serde_json::json!([t, "o", format!("{marker}\r\n")])).unwrap(),
        );
        while size < cast_bytes {
            t += 0.01;
            let line = serde_json::to_vec(&serde_json::json!([
                t,
                "o",
                format!("line {size:08} of {id}: the quick brown fox jumps over the lazy dog\r\n")
            ]))
            .unwrap();
            size += line.len() + 1;
            lines.push(line);
        }
        let cast = cut(&lines, chunk_bytes);
        let audit: Vec<Vec<u8>> = commands
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let argv: Vec<&str> = c.split_whitespace().collect();
                let mut line = serde_json::to_vec(&serde_json::json!({
                    "event": "exec",
                    "exec": {"path": format!("/usr/bin/{}", argv[0]), "argv": argv, "pid": 1000 + i,
                             "verdict": "allowed", "time": START as f64 + 0.5 + i as f64}
                }))
                .unwrap();
                line.push(b'\n');
                line
            })
            .collect();
        Recording {
            id: id.to_string(),
            meta,
            cast,
            audit,
        }
    }

    pub fn stream(&self, name: &str) -> &[Vec<u8>] {
        if name == "cast" {
            &self.cast
        } else {
            &self.audit
        }
    }

    pub fn bytes(&self) -> usize {
        self.cast.iter().chain(&self.audit).map(Vec::len).sum()
    }

    /// The hashes of a stream's chunks, `h_0 ..`.
    pub fn hashes(&self, stream: &str) -> Vec<[u8; 32]> {
        let mut prev = genesis(&self.id, stream);
        self.stream(stream)
            .iter()
            .map(|c| {
                prev = next_hash(&prev, c);
                prev
            })
            .collect()
    }
}

/// Whole lines, joined into chunks of at most about `chunk_bytes`.
fn cut(lines: &[Vec<u8>], chunk_bytes: usize) -> Vec<Vec<u8>> {
    let mut chunks = Vec::new();
    let mut cur = Vec::new();
    for l in lines {
        if !cur.is_empty() && cur.len() + l.len() + 1 > chunk_bytes {
            chunks.push(std::mem::take(&mut cur));
        }
        cur.extend_from_slice(l);
        cur.push(b'\n');
    }
    if !cur.is_empty() {
        chunks.push(cur);
    }
    chunks
}

/// An answer: HTTP status and body (JSON when it is JSON, else a string).
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    pub body: serde_json::Value,
    /// The body as sent.
    pub text: String,
}

pub struct Uploader {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
    pub key: SigningKey,
}

impl Uploader {
    /// `base`: `https://127.0.0.1:PORT`; `ca_pem`: the CA that signed the collector's
    /// certificate (the only root trusted).
    pub fn new(
        base: &str,
        ca_pem: &[u8],
        token: &str,
        key: SigningKey,
    ) -> Result<Uploader, String> {
        let ca = reqwest::Certificate::from_pem(ca_pem).map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(60))
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Uploader {
            client,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            key,
        })
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, String> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(|e| e.to_string())?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()));
        Ok(Answer { status, body, text })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What the collector has of a stream: `(next_seq, last_hash)`.
    pub async fn status(&self, id: &str, stream: &str) -> Result<(u64, String), String> {
        let a = self
            .send(
                self.client
                    .get(self.url(&format!("/api/v1/sessions/{id}/streams/{stream}"))),
            )
            .await?;
        if a.status != 200 {
            return Err(format!("status of {id}/{stream}: {} {}", a.status, a.body));
        }
        Ok((
            a.body["next_seq"].as_u64().ok_or("no next_seq")?,
            a.body["last_hash"]
                .as_str()
                .ok_or("no last_hash")?
                .to_string(),
        ))
    }

    /// One chunk with the given chain headers (not checked here: tests send wrong ones).
    pub async fn put_chunk(
        &self,
        id: &str,
        stream: &str,
        seq: u64,
        prev_hex: &str,
        hash_hex: &str,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        self.send(
            self.client
                .put(self.url(&format!(
                    "/api/v1/sessions/{id}/streams/{stream}/chunks/{seq}"
                )))
                .header("X-Usher-Prev-Hash", prev_hex)
                .header("X-Usher-Hash", hash_hex)
                .body(body),
        )
        .await
    }

    pub async fn put_meta(&self, id: &str, meta: &serde_json::Value) -> Result<Answer, String> {
        self.send(
            self.client
                .put(self.url(&format!("/api/v1/sessions/{id}/meta")))
                .header("Content-Type", "application/json")
                .body(serde_json::to_vec(meta).unwrap_or_default()),
        )
        .await
    }

    /// Signs and sends the seal for `streams`: (name, chunks, last hash hex).
    pub async fn seal(
        &self,
        id: &str,
        streams: &[(String, u64, String)],
    ) -> Result<Answer, String> {
        let signature = self.key.sign(seal_message(id, streams).as_bytes());
        let mut map = serde_json::Map::new();
        for (name, chunks, last) in streams {
            map.insert(
                name.clone(),
                serde_json::json!({"chunks": chunks, "last_hash": last}),
            );
        }
        let body = serde_json::json!({
            "streams": map,
            "signature": base64::engine::general_purpose::STANDARD.encode(signature.to_bytes()),
        });
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/sessions/{id}/seal")))
                .header("Content-Type", "application/json")
                .body(body.to_string()),
        )
        .await
    }

    /// Ships chunks `..upto` of a stream, starting where the collector says it is (the
    /// resumption an agent does after a restart). Returns the last hash sent.
    pub async fn ship_stream(
        &self,
        rec: &Recording,
        stream: &str,
        upto: usize,
    ) -> Result<String, String> {
        let (next, last) = self.status(&rec.id, stream).await?;
        let hashes = rec.hashes(stream);
        let expected = if next == 0 {
            hex::encode(genesis(&rec.id, stream))
        } else {
            hex::encode(hashes[next as usize - 1])
        };
        if last != expected {
            return Err(format!("the collector's chain differs from ours at {next}"));
        }
        let mut prev = last;
        #[allow(clippy::needless_range_loop)] // seq is the protocol's number, not only an index
        for seq in next as usize..upto.min(hashes.len()) {
            let hash = hex::encode(hashes[seq]);
            let a = self
                .put_chunk(
                    &rec.id,
                    stream,
                    seq as u64,
                    &prev,
                    &hash,
                    rec.stream(stream)[seq].clone(),
                )
                .await?;
            if a.status != 201 && !(a.status == 200 && a.body["duplicate"] == true) {
                return Err(format!(
                    "{}/{stream}/{seq}: {} {}",
                    rec.id, a.status, a.body
                ));
            }
            prev = hash;
        }
        Ok(prev)
    }

    /// The whole session: metadata, both streams, the seal.
    pub async fn ship(&self, rec: &Recording) -> Result<(), String> {
        let a = self.put_meta(&rec.id, &rec.meta).await?;
        if a.status != 200 {
            return Err(format!("meta: {} {}", a.status, a.body));
        }
        let mut streams = Vec::new();
        for stream in ["audit", "cast"] {
            let last = self.ship_stream(rec, stream, usize::MAX).await?;
            streams.push((stream.to_string(), rec.stream(stream).len() as u64, last));
        }
        let a = self.seal(&rec.id, &streams).await?;
        if a.status != 200 {
            return Err(format!("seal: {} {}", a.status, a.body));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uploaders_chain_and_seal_are_what_the_collector_checks() {
        assert_eq!(
            hex::encode(genesis("s", "cast")),
            crate::store::genesis("s", "cast")
        );
        let key = SigningKey::from_bytes(&[5; 32]);
        let parsed = crate::keys::parse_openssh_ed25519(&openssh_public_line(&key)).unwrap();
        assert_eq!(parsed, key.verifying_key());
        let streams = vec![
            ("cast".to_string(), 2, "ab".repeat(32)),
            ("audit".to_string(), 1, "cd".repeat(32)),
        ];
        let message = seal_message("s", &streams);
        assert_eq!(
            message,
            format!(
                "usher-seal-v1\ns\naudit 1 {}\ncast 2 {}\n",
                "cd".repeat(32),
                "ab".repeat(32)
            )
        );
        let sig = base64::engine::general_purpose::STANDARD
            .encode(key.sign(message.as_bytes()).to_bytes());
        assert!(crate::keys::verify_seal(&parsed, &message, &sig).is_ok());
        assert!(crate::keys::verify_seal(&parsed, &message.replace("2", "3"), &sig).is_err());
        assert!(crate::keys::verify_seal(&parsed, &message, "not base64!").is_err());
    }

    #[test]
    fn hostile_host_keys_and_ids_are_refused() {
        for bad in [
            "",
            "ssh-rsa AAAA",
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5",
        ] {
            assert!(crate::keys::parse_openssh_ed25519(bad).is_err(), "{bad}");
        }
        for bad in ["", ".", "..", "../x", "a/b", "a b", "é", &"x".repeat(129)] {
            assert!(!crate::store::valid_id(bad), "{bad}");
        }
        for good in ["20261122T120000Z-0a1b2c3d", "a.b_c-d", &"x".repeat(128)] {
            assert!(crate::store::valid_id(good), "{good}");
        }
    }

    #[test]
    fn fake_recordings_are_cut_into_whole_lines() {
        let r = Recording::fake("f", "h", "s", "l", &["ls"], "M", 50 << 10, 4 << 10);
        assert!(r.cast.len() > 10);
        for c in &r.cast {
            assert!(c.ends_with(b"\n") && c.len() <= 4 << 10);
        }
    }
}
