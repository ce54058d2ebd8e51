//! The collector's HTTP API, client side (see collector/API.md and collector/FLEET.md):
//! one connection, reused (HTTP/2 when the collector offers it over ALPN), signed writes,
//! chunk bodies compressed with zstd when that saves enough.

use crate::config::CollectorConfig;
use bytes::Bytes;
use reqwest::StatusCode;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::time::Duration;
use usher_wire::collector::{
    compress_chunk, ErrorCode, Refusal, StreamStatus, HASH_HEADER, PREV_HASH_HEADER,
    SIGNATURE_HEADER,
};
use usher_wire::seal::Seal;

/// What the shipper asks of a collector. [`Client`] asks over HTTPS; the shipper's tests
/// answer from memory.
pub trait Collector: Send + Sync + 'static {
    /// What the collector has of a stream, durably.
    fn stream_status(
        &self,
        session: &str,
        stream: &str,
    ) -> impl Future<Output = Result<StreamStatus, ClientError>> + Send;

    /// Sends one chunk of a stream, signed.
    fn put_chunk(
        &self,
        chunk: ChunkWrite<'_>,
    ) -> impl Future<Output = Result<PutOutcome, ClientError>> + Send;

    /// Sends the session's metadata, as the spool holds it; `hash` is its SHA-256 (hex)
    /// and `signature` the host key's over [`usher_wire::collector::meta_signed_text`].
    fn put_meta(
        &self,
        session: &str,
        meta: Bytes,
        hash: &str,
        signature: &str,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;

    fn seal(
        &self,
        session: &str,
        seal: &Seal,
    ) -> impl Future<Output = Result<(), ClientError>> + Send;
}

/// Chunk `seq` of a stream: `prev` and `hash` are its chain links, `signature` the host
/// key's over [`usher_wire::collector::chunk_signed_text`] of them, `body` its bytes.
#[derive(Debug, Clone)]
pub struct ChunkWrite<'a> {
    pub session: &'a str,
    pub stream: &'a str,
    pub seq: u64,
    pub prev: &'a str,
    pub hash: &'a str,
    pub signature: &'a str,
    pub body: Bytes,
}

/// What the collector did with a chunk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Stored,
    /// Stored before, with this hash: it was acknowledged once already.
    Duplicate,
    /// The collector expects another sequence number (`next_seq`, when it said): resynchronise.
    OutOfStep {
        next_seq: Option<u64>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No answer: the collector is down or unreachable.
    #[error("collector unreachable: {0}")]
    Transport(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// An answer that refuses; `code` when the collector said one.
    #[error("collector refused ({status}): {message}")]
    Refused {
        status: u16,
        code: Option<ErrorCode>,
        message: String,
    },
    #[error("collector answered {status} with something unreadable: {detail}")]
    Unreadable { status: u16, detail: String },
    #[error("configuration: {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("configuration: {path}: {source}")]
    Certificate {
        path: PathBuf,
        source: reqwest::Error,
    },
    #[error("configuration: client certificate: {0}")]
    ClientIdentity(#[source] reqwest::Error),
    #[error("configuration: {0}")]
    Build(#[source] reqwest::Error),
}

impl ClientError {
    /// Whether the collector did not answer at all (as opposed to answering no).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Transport(_))
    }

    /// A refusal from its status and body: the body's code when it is the collector's
    /// error body, else the body as text.
    fn refusal(status: StatusCode, body: String) -> ClientError {
        match serde_json::from_str::<Refusal>(&body) {
            Ok(r) => ClientError::Refused {
                status: status.as_u16(),
                code: Some(r.code),
                message: r.error,
            },
            Err(_) => ClientError::Refused {
                status: status.as_u16(),
                code: None,
                message: body,
            },
        }
    }
}

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
    compress: bool,
}

impl Client {
    pub fn new(config: &CollectorConfig) -> Result<Client, ClientError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| ClientError::ReadFile {
                path: path.to_owned(),
                source,
            })
        };
        let token = String::from_utf8_lossy(&read(&config.token_file)?)
            .trim()
            .to_string();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            // One connection carries every request: the collector closes idle ones after
            // 60 s, so this side lets go a little before.
            .pool_idle_timeout(Duration::from_secs(50))
            .pool_max_idle_per_host(2)
            .http2_adaptive_window(true);
        if let Some(ca) = &config.ca_file {
            builder = builder.tls_built_in_root_certs(false);
            let certs = reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|source| {
                ClientError::Certificate {
                    path: ca.clone(),
                    source,
                }
            })?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
            let mut pem = read(cert)?;
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem).map_err(ClientError::ClientIdentity)?;
            builder = builder.identity(id);
        }
        let http = builder.build().map_err(ClientError::Build)?;
        Ok(Client {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            token,
            compress: config.compress,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String), ClientError> {
        let unreachable = |e: reqwest::Error| ClientError::Transport(Box::new(e));
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(unreachable)?;
        let status = resp.status();
        let body = resp.text().await.map_err(unreachable)?;
        Ok((status, body))
    }

    /// Sends `req`; any answer but a success is a refusal.
    async fn expect_success(&self, req: reqwest::RequestBuilder) -> Result<String, ClientError> {
        let (status, body) = self.send(req).await?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(ClientError::refusal(status, body))
        }
    }

    /// Whether the collector answers at all (for `usher status`).
    pub async fn reachable(&self) -> bool {
        self.stream_status("usher-status-probe", "audit")
            .await
            .is_ok()
    }
}

impl Collector for Client {
    async fn stream_status(
        &self,
        session: &str,
        stream: &str,
    ) -> Result<StreamStatus, ClientError> {
        let req = self
            .http
            .get(self.url(&format!("sessions/{session}/streams/{stream}")));
        let body = self.expect_success(req).await?;
        serde_json::from_str(&body).map_err(|e| ClientError::Unreadable {
            status: 200,
            detail: format!("{body:?}: {e}"),
        })
    }

    async fn put_chunk(&self, chunk: ChunkWrite<'_>) -> Result<PutOutcome, ClientError> {
        let ChunkWrite {
            session,
            stream,
            seq,
            prev,
            hash,
            signature,
            body,
        } = chunk;
        let mut req = self
            .http
            .put(self.url(&format!("sessions/{session}/streams/{stream}/chunks/{seq}")))
            .header(PREV_HASH_HEADER, prev)
            .header(HASH_HEADER, hash)
            .header(SIGNATURE_HEADER, signature);
        req = match self.compress.then(|| compress_chunk(&body)).flatten() {
            Some(smaller) => req.header("Content-Encoding", "zstd").body(smaller),
            None => req.body(body),
        };
        let (status, body) = self.send(req).await?;
        match status.as_u16() {
            201 => Ok(PutOutcome::Stored),
            200 => Ok(PutOutcome::Duplicate),
            _ => match serde_json::from_str::<Refusal>(&body) {
                Ok(Refusal {
                    code: ErrorCode::Gap,
                    next_seq,
                    ..
                }) => Ok(PutOutcome::OutOfStep { next_seq }),
                _ => Err(ClientError::refusal(status, body)),
            },
        }
    }

    async fn put_meta(
        &self,
        session: &str,
        meta: Bytes,
        hash: &str,
        signature: &str,
    ) -> Result<(), ClientError> {
        let req = self
            .http
            .put(self.url(&format!("sessions/{session}/meta")))
            .header("Content-Type", "application/json")
            .header(HASH_HEADER, hash)
            .header(SIGNATURE_HEADER, signature)
            .body(meta);
        self.expect_success(req).await.map(drop)
    }

    async fn seal(&self, session: &str, seal: &Seal) -> Result<(), ClientError> {
        let req = self
            .http
            .post(self.url(&format!("sessions/{session}/seal")))
            .json(seal);
        self.expect_success(req).await.map(drop)
    }
}
