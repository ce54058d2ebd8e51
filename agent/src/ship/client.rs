//! The collector's HTTP API, client side (see collector/API.md).

use crate::config::CollectorConfig;
use reqwest::StatusCode;
use serde::Deserialize;
use std::time::Duration;

pub struct Client {
    http: reqwest::Client,
    base: String,
    token: String,
}

#[derive(Debug, Deserialize)]
pub struct StreamStatus {
    pub next_seq: u64,
    pub last_hash: String,
}

#[derive(Debug)]
pub enum PutOutcome {
    Stored,
    Duplicate,
    /// The collector expects another sequence number: resynchronise.
    OutOfStep(String),
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("collector unreachable: {0}")]
    Transport(String),
    #[error("collector refused ({status}): {body}")]
    Refused { status: u16, body: String },
    #[error("configuration: {0}")]
    Config(String),
}

impl Client {
    pub fn new(config: &CollectorConfig) -> Result<Client, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))
        };
        let token = String::from_utf8_lossy(&read(&config.token_file)?)
            .trim()
            .to_string();
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .https_only(true)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60));
        if let Some(ca) = &config.ca_file {
            builder = builder.tls_built_in_root_certs(false);
            for cert in reqwest::Certificate::from_pem_bundle(&read(ca)?)
                .map_err(|e| ClientError::Config(format!("{}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&config.client_cert, &config.client_key) {
            let mut pem = read(cert)?;
            pem.extend(read(key)?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| ClientError::Config(format!("client certificate: {e}")))?;
            builder = builder.identity(id);
        }
        let http = builder
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client {
            http,
            base: config.url.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}/api/v1/{path}", self.base)
    }

    async fn send(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<(StatusCode, String), ClientError> {
        let resp = req
            .bearer_auth(&self.token)
            .send()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        let status = resp.status();
        let body = resp
            .text()
            .await
            .map_err(|e| ClientError::Transport(e.to_string()))?;
        Ok((status, body))
    }

    pub async fn stream_status(
        &self,
        session: &str,
        stream: &str,
    ) -> Result<StreamStatus, ClientError> {
        let (status, body) = self
            .send(
                self.http
                    .get(self.url(&format!("sessions/{session}/streams/{stream}"))),
            )
            .await?;
        if !status.is_success() {
            return Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            });
        }
        serde_json::from_str(&body).map_err(|e| ClientError::Refused {
            status: status.as_u16(),
            body: format!("unreadable answer {body:?}: {e}"),
        })
    }

    pub async fn put_chunk(
        &self,
        session: &str,
        stream: &str,
        seq: u64,
        prev: &str,
        hash: &str,
        body: Vec<u8>,
    ) -> Result<PutOutcome, ClientError> {
        let req = self
            .http
            .put(self.url(&format!("sessions/{session}/streams/{stream}/chunks/{seq}")))
            .header("X-Usher-Prev-Hash", prev)
            .header("X-Usher-Hash", hash)
            .body(body);
        let (status, body) = self.send(req).await?;
        match status.as_u16() {
            201 => Ok(PutOutcome::Stored),
            200 => Ok(PutOutcome::Duplicate),
            409 if body.contains("gap") => Ok(PutOutcome::OutOfStep(body)),
            s => Err(ClientError::Refused { status: s, body }),
        }
    }

    pub async fn put_meta(&self, session: &str, meta: Vec<u8>) -> Result<(), ClientError> {
        let req = self
            .http
            .put(self.url(&format!("sessions/{session}/meta")))
            .header("Content-Type", "application/json")
            .body(meta);
        let (status, body) = self.send(req).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            })
        }
    }

    pub async fn seal(&self, session: &str, seal: &serde_json::Value) -> Result<(), ClientError> {
        let req = self
            .http
            .post(self.url(&format!("sessions/{session}/seal")))
            .json(seal);
        let (status, body) = self.send(req).await?;
        if status.is_success() {
            Ok(())
        } else {
            Err(ClientError::Refused {
                status: status.as_u16(),
                body,
            })
        }
    }

    /// Whether the collector answers at all (for `usher status`).
    pub async fn reachable(&self) -> bool {
        self.stream_status("usher-status-probe", "audit")
            .await
            .is_ok()
    }
}
