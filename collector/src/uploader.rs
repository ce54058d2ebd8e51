//! A client of the agents' protocol (collector/API.md, "Shipping"): what the tests and
//! `usher-collector bench` use to play an agent. It computes the hash chain, signs every
//! write and the seal (over the metadata it sent) exactly as an agent does, and resumes
//! from what the collector says it has. Tests send unsigned or wrongly signed writes with
//! the `*_signed_as` methods.

use base64::Engine;
use ed25519_dalek::SigningKey;
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Mutex;
use usher_wire::chain::{self, Link};
use usher_wire::collector::{
    chunk_signed_text, meta_signed_text, sha256_hex, sign_write, ChunkAccepted, StreamStatus,
    HASH_HEADER, PREV_HASH_HEADER, SIGNATURE_HEADER,
};
use usher_wire::meta::{GrantInfo, SessionMeta};
use usher_wire::seal::{Seal, StreamEnd};

/// What went wrong for the uploader; tests read the variant, people the text.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("the collector's CA certificate: {0}")]
    Ca(reqwest::Error),
    #[error("HTTP client: {0}")]
    Client(reqwest::Error),
    #[error("collector unreachable: {0:?}")]
    Transport(reqwest::Error),
    #[error("{what}: {status} {body}")]
    Refused {
        what: String,
        status: u16,
        body: serde_json::Value,
    },
    #[error("{what}: unreadable answer {text:?}")]
    Unreadable { what: String, text: String },
    #[error("{session} {stream}: the collector's chain differs from ours at {next_seq}")]
    Diverged {
        session: String,
        stream: String,
        next_seq: u64,
    },
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
    /// A desktop recording's chunks (an RDP session); empty for a terminal session.
    pub desktop: Vec<Vec<u8>>,
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
        let typed = SessionMeta {
            session_id: id.into(),
            kind: "ssh".into(),
            host: host.into(),
            login: login.into(),
            uid: 61000,
            grant: GrantInfo {
                iss: "test-issuer".into(),
                sub: sub.into(),
                jti: format!("jti-{id}"),
                profile: "default".into(),
                approved_by: Some("lead".into()),
                reason: Some("test".into()),
                request: None,
                // 2030-01-01T00:00:00Z
                expires_at: 1893456000,
            },
            peer: Some("127.0.0.1:50000".into()),
            command: None,
            term: Some("xterm".into()),
            started_at: "2026-11-22T12:00:00Z".into(),
            ended_at: Some("2026-11-22T12:05:00Z".into()),
            exit_status: Some(0),
            exit_signal: None,
            enforcement: "tracepoint-sigkill (no BPF-LSM: test)".into(),
            enforced: true,
            input_recorded: false,
            interrupted: false,
            truncated: None,
            limits: None,
        };
        let mut meta = serde_json::to_value(typed).unwrap_or_default();
        // A field a newer agent might send: the collector keeps it.
        meta["extra_field_kept"] = "yes".into();
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
            desktop: Vec::new(),
        }
    }

    /// The session as an RDP desktop: `lines` (a desktop recording, header first) instead
    /// of the terminal cast, cut into `chunk_bytes` chunks of whole lines.
    pub fn with_desktop(mut self, lines: &[String], chunk_bytes: usize) -> Recording {
        let lines: Vec<Vec<u8>> = lines.iter().map(|l| l.clone().into_bytes()).collect();
        self.desktop = cut(&lines, chunk_bytes);
        self.cast.clear();
        self.meta["kind"] = "rdp".into();
        self.meta["term"] = serde_json::Value::Null;
        self
    }

    pub fn stream(&self, name: &str) -> &[Vec<u8>] {
        match name {
            "cast" => &self.cast,
            "desktop" => &self.desktop,
            _ => &self.audit,
        }
    }

    /// The streams this session has.
    pub fn streams(&self) -> Vec<&'static str> {
        let mut streams = vec!["audit"];
        if !self.cast.is_empty() || self.desktop.is_empty() {
            streams.push("cast");
        }
        if !self.desktop.is_empty() {
            streams.push("desktop");
        }
        streams
    }

    pub fn bytes(&self) -> usize {
        self.cast
            .iter()
            .chain(&self.audit)
            .chain(&self.desktop)
            .map(Vec::len)
            .sum()
    }

    /// The hashes of a stream's chunks, `h_0 ..`.
    pub fn hashes(&self, stream: &str) -> Vec<Link> {
        let mut prev = chain::genesis_bytes(&self.id, stream);
        self.stream(stream)
            .iter()
            .map(|c| {
                prev = chain::next_bytes(&prev, c);
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

impl Answer {
    fn refused(self, what: String) -> UploadError {
        UploadError::Refused {
            what,
            status: self.status,
            body: self.body,
        }
    }
}

pub struct Uploader {
    pub client: reqwest::Client,
    pub base: String,
    pub token: String,
    pub key: SigningKey,
    /// The SHA-256 of the metadata last sent per session: what its seal covers.
    sent_meta: Mutex<HashMap<String, String>>,
    /// Chunk bodies go as zstd when that saves a tenth, as an agent sends them.
    pub compress: bool,
}

/// How a test's write is signed.
#[derive(Debug, Clone)]
pub enum Signature {
    /// With the uploader's key, as an agent does.
    Host,
    /// No `X-Usher-Signature` at all.
    Missing,
    /// This header value, whatever it is.
    Header(String),
}

impl Uploader {
    /// `base`: `https://127.0.0.1:PORT`; `ca_pem`: the CA that signed the collector's
    /// certificate (the only root trusted).
    pub fn new(
        base: &str,
        ca_pem: &[u8],
        token: &str,
        key: SigningKey,
    ) -> Result<Uploader, UploadError> {
        Self::with_identity(base, ca_pem, token, key, None)
    }

    /// `new`, presenting a client certificate: `identity_pem` holds its certificate and
    /// key (PEM), for a collector with `[tls] client_ca`.
    pub fn with_identity(
        base: &str,
        ca_pem: &[u8],
        token: &str,
        key: SigningKey,
        identity_pem: Option<&[u8]>,
    ) -> Result<Uploader, UploadError> {
        let ca = reqwest::Certificate::from_pem(ca_pem).map_err(UploadError::Ca)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(std::time::Duration::from_secs(60));
        if let Some(pem) = identity_pem {
            builder = builder.identity(reqwest::Identity::from_pem(pem).map_err(UploadError::Ca)?);
        }
        let client = builder.build().map_err(UploadError::Client)?;
        Ok(Uploader {
            client,
            base: base.trim_end_matches('/').to_string(),
            token: token.to_string(),
            key,
            sent_meta: Mutex::new(HashMap::new()),
            compress: false,
        })
    }

    fn signature(&self, how: &Signature, text: &str) -> Option<String> {
        match how {
            Signature::Host => Some(sign_write(&self.key, text)),
            Signature::Missing => None,
            Signature::Header(v) => Some(v.clone()),
        }
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> Result<Answer, UploadError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(UploadError::Transport)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(UploadError::Transport)?;
        let body = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text.clone()));
        Ok(Answer { status, body, text })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// What the collector has of a stream: `(next_seq, last_hash)`.
    pub async fn status(&self, id: &str, stream: &str) -> Result<(u64, String), UploadError> {
        let what = || format!("status of {id}/{stream}");
        let a = self
            .send(
                self.client
                    .get(self.url(&format!("/api/v1/sessions/{id}/streams/{stream}"))),
            )
            .await?;
        if a.status != 200 {
            return Err(a.refused(what()));
        }
        let status: StreamStatus =
            serde_json::from_value(a.body).map_err(|_| UploadError::Unreadable {
                what: what(),
                text: a.text,
            })?;
        Ok((status.next_seq, status.last_hash))
    }

    /// One chunk with the given chain headers (not checked here: tests send wrong ones),
    /// signed with the host key.
    pub async fn put_chunk(
        &self,
        id: &str,
        stream: &str,
        seq: u64,
        prev_hex: &str,
        hash_hex: &str,
        body: Vec<u8>,
    ) -> Result<Answer, UploadError> {
        self.put_chunk_signed_as(id, stream, seq, prev_hex, hash_hex, body, &Signature::Host)
            .await
    }

    /// `put_chunk`, signed as `how` says.
    #[allow(clippy::too_many_arguments)] // the protocol's fields, and the signature
    pub async fn put_chunk_signed_as(
        &self,
        id: &str,
        stream: &str,
        seq: u64,
        prev_hex: &str,
        hash_hex: &str,
        body: Vec<u8>,
        how: &Signature,
    ) -> Result<Answer, UploadError> {
        let mut req = self
            .client
            .put(self.url(&format!(
                "/api/v1/sessions/{id}/streams/{stream}/chunks/{seq}"
            )))
            .header(PREV_HASH_HEADER, prev_hex)
            .header(HASH_HEADER, hash_hex);
        req = match self
            .compress
            .then(|| usher_wire::collector::compress_chunk(&body))
            .flatten()
        {
            Some(smaller) => req
                .header(reqwest::header::CONTENT_ENCODING, "zstd")
                .body(smaller),
            None => req.body(body),
        };
        if let Some(sig) =
            self.signature(how, &chunk_signed_text(id, stream, seq, prev_hex, hash_hex))
        {
            req = req.header(SIGNATURE_HEADER, sig);
        }
        self.send(req).await
    }

    /// The session's metadata, signed with the host key; its SHA-256 is what `seal` covers.
    pub async fn put_meta(
        &self,
        id: &str,
        meta: &serde_json::Value,
    ) -> Result<Answer, UploadError> {
        let body = serde_json::to_vec(meta).unwrap_or_default();
        self.put_meta_signed_as(id, body, &Signature::Host).await
    }

    /// Metadata `body` as is, with `X-Usher-Hash` its SHA-256, signed as `how` says.
    pub async fn put_meta_signed_as(
        &self,
        id: &str,
        body: Vec<u8>,
        how: &Signature,
    ) -> Result<Answer, UploadError> {
        let hash = sha256_hex(&body);
        let mut req = self
            .client
            .put(self.url(&format!("/api/v1/sessions/{id}/meta")))
            .header("Content-Type", "application/json")
            .header(HASH_HEADER, &hash);
        if let Some(sig) = self.signature(how, &meta_signed_text(id, &hash)) {
            req = req.header(SIGNATURE_HEADER, sig);
        }
        let a = self.send(req.body(body)).await?;
        if a.status == 200 {
            self.sent_meta
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id.to_string(), hash);
        }
        Ok(a)
    }

    /// The SHA-256 of the metadata of `id` this uploader last had accepted.
    pub fn sent_meta(&self, id: &str) -> Option<String> {
        self.sent_meta
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// Signs and sends the seal for `streams`: (name, chunks, last hash hex), over the
    /// metadata this uploader last sent for `id` (a v1 seal, without, when it sent none).
    pub async fn seal(
        &self,
        id: &str,
        streams: &[(String, u64, String)],
    ) -> Result<Answer, UploadError> {
        self.seal_over(id, self.sent_meta(id), streams).await
    }

    /// `seal`, naming `meta` as the metadata's SHA-256 (None: a v1 seal).
    pub async fn seal_over(
        &self,
        id: &str,
        meta: Option<String>,
        streams: &[(String, u64, String)],
    ) -> Result<Answer, UploadError> {
        let ends: BTreeMap<String, StreamEnd> = streams
            .iter()
            .map(|(name, chunks, last)| {
                let end = StreamEnd {
                    chunks: *chunks,
                    last_hash: last.clone(),
                };
                (name.clone(), end)
            })
            .collect();
        let body =
            serde_json::to_string(&Seal::sign(id, meta, ends, &self.key)).unwrap_or_default();
        self.send(
            self.client
                .post(self.url(&format!("/api/v1/sessions/{id}/seal")))
                .header("Content-Type", "application/json")
                .body(body),
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
    ) -> Result<String, UploadError> {
        let (next, last) = self.status(&rec.id, stream).await?;
        let hashes = rec.hashes(stream);
        let expected = match next.checked_sub(1) {
            None => Some(chain::genesis(&rec.id, stream)),
            Some(i) => hashes.get(i as usize).map(hex::encode),
        };
        if expected.as_deref() != Some(last.as_str()) {
            return Err(UploadError::Diverged {
                session: rec.id.clone(),
                stream: stream.into(),
                next_seq: next,
            });
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
            let accepted = serde_json::from_value::<ChunkAccepted>(a.body.clone()).ok();
            let duplicate = a.status == 200 && accepted.is_some_and(|c| c.duplicate);
            if a.status != 201 && !duplicate {
                return Err(a.refused(format!("{}/{stream}/{seq}", rec.id)));
            }
            prev = hash;
        }
        Ok(prev)
    }

    /// The whole session: metadata, its streams, the seal.
    pub async fn ship(&self, rec: &Recording) -> Result<(), UploadError> {
        let a = self.put_meta(&rec.id, &rec.meta).await?;
        if a.status != 200 {
            return Err(a.refused("meta".into()));
        }
        let mut streams = Vec::new();
        for stream in rec.streams() {
            let last = self.ship_stream(rec, stream, usize::MAX).await?;
            streams.push((stream.to_string(), rec.stream(stream).len() as u64, last));
        }
        let a = self.seal(&rec.id, &streams).await?;
        if a.status != 200 {
            return Err(a.refused("seal".into()));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_uploaders_host_key_line_is_what_the_collector_reads() {
        let key = SigningKey::from_bytes(&[5; 32]);
        let parsed = crate::keys::parse_openssh_ed25519(&openssh_public_line(&key)).unwrap();
        assert_eq!(parsed, key.verifying_key());
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

    #[test]
    fn fake_metadata_is_what_an_agent_writes_plus_one_unknown_field() {
        let r = Recording::fake("f", "h", "s", "l", &["ls"], "M", 1 << 10, 4 << 10);
        let received: crate::store::ReceivedMeta = serde_json::from_value(r.meta).unwrap();
        assert_eq!(received.meta.grant.expires_at, 1893456000);
        assert_eq!(received.unknown.len(), 1);
        assert_eq!(received.unknown["extra_field_kept"], "yes");
    }
}
