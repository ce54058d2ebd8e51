//! Fetching an issuer's keys: a JWKS file, a JWKS URL, or OpenID discovery. Responses are
//! bounded in size and time, redirects are not followed, and every URL (the discovery
//! document's `jwks_uri` too) must be HTTPS or loopback http.

use crate::config::{is_allowed_url, KeySource};
use crate::jose::key_algorithm;
use crate::refusal::UnusableKey;
use jsonwebtoken::jwk::{Jwk, JwkSet, PublicKeyUse};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// A discovery document or a JWKS is a few KiB; a hostile server gets no more than this.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// Why an issuer's keys could not be fetched (or read). Each names the URL or file.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: not HTTPS (plain http is allowed only on loopback)")]
    Insecure { url: String },
    #[error("{url}: {why}")]
    Transport { url: String, why: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: answer larger than {limit} bytes")]
    TooLarge { url: String, limit: usize },
    #[error("{url}: not JSON: {why}")]
    NotJson { url: String, why: String },
    #[error("{url}: the discovery document names issuer {got:?}, not {want:?}")]
    IssuerMismatch {
        url: String,
        got: String,
        want: String,
    },
    #[error("{url}: the discovery document has no jwks_uri")]
    NoJwksUri { url: String },
    #[error("{url}: jwks_uri {jwks_uri:?} is not a URL")]
    BadJwksUri { url: String, jwks_uri: String },
    #[error("{from}: not a JWKS (an object with a list of keys)")]
    NotJwks { from: String },
    #[error("{from}: no key usable for signatures ({})", .dropped.join("; "))]
    NoUsableKeys { from: String, dropped: Vec<String> },
    #[error("cannot read {}: {why}", path.display())]
    Read { path: PathBuf, why: String },
    #[error("{}: key {kid:?}: {why}", path.display())]
    UnusableKeyInFile {
        path: PathBuf,
        kid: String,
        why: UnusableKey,
    },
}

/// The HTTP client for one issuer: rustls with the usual roots plus `ca`, no redirects, no
/// pooled connections (fetches are rare, and a fetch may run on a start-up runtime of its
/// own).
pub(crate) fn http_client(ca: Option<&Path>) -> Result<reqwest::Client, crate::SetupError> {
    let mut builder = reqwest::Client::builder()
        .use_rustls_tls()
        .https_only(false)
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(REQUEST_TIMEOUT)
        .pool_max_idle_per_host(0)
        .user_agent(concat!("usher-trust/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca {
        let pem = std::fs::read(path).map_err(|e| crate::SetupError::Ca {
            path: path.to_owned(),
            why: e.to_string(),
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| crate::SetupError::Ca {
                path: path.to_owned(),
                why: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(crate::SetupError::Ca {
                path: path.to_owned(),
                why: "no certificate in the file".into(),
            });
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| crate::SetupError::Client(e.to_string()))
}

/// The keys at `source`. From a URL, keys not meant for signatures or of a type Usher does
/// not verify are left out (a provider may publish encryption keys beside its signing
/// keys); from a file, which an administrator wrote for this purpose, any such key is an
/// error.
pub(crate) async fn fetch_keys(
    client: &reqwest::Client,
    iss: &str,
    source: &KeySource,
) -> Result<JwkSet, FetchError> {
    match source {
        KeySource::File(path) => read_jwks_file(path),
        KeySource::Url(url) => {
            let body = get_json(client, url).await?;
            usable_keys(url.as_str(), body)
        }
        KeySource::Discovery(url) => {
            let jwks_uri = discover(client, iss, url).await?;
            let body = get_json(client, &jwks_uri).await?;
            usable_keys(jwks_uri.as_str(), body)
        }
    }
}

/// A JWKS file: every key must be one Usher can verify with.
pub fn read_jwks_file(path: &Path) -> Result<JwkSet, FetchError> {
    let text = std::fs::read_to_string(path).map_err(|e| FetchError::Read {
        path: path.to_owned(),
        why: e.to_string(),
    })?;
    let set: JwkSet = serde_json::from_str(&text).map_err(|_| FetchError::NotJwks {
        from: path.display().to_string(),
    })?;
    for jwk in &set.keys {
        key_algorithm(jwk).map_err(|why| FetchError::UnusableKeyInFile {
            path: path.to_owned(),
            kid: jwk.common.key_id.clone().unwrap_or_default(),
            why,
        })?;
    }
    Ok(set)
}

async fn discover(client: &reqwest::Client, iss: &str, url: &Url) -> Result<Url, FetchError> {
    let doc = get_json(client, url).await?;
    let named = doc.get("issuer").and_then(Value::as_str).unwrap_or("");
    if named != iss {
        return Err(FetchError::IssuerMismatch {
            url: url.to_string(),
            got: crate::jose::shortened(named),
            want: iss.to_string(),
        });
    }
    let jwks_uri =
        doc.get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or_else(|| FetchError::NoJwksUri {
                url: url.to_string(),
            })?;
    let parsed = Url::parse(jwks_uri).map_err(|_| FetchError::BadJwksUri {
        url: url.to_string(),
        jwks_uri: crate::jose::shortened(jwks_uri),
    })?;
    if !is_allowed_url(&parsed) {
        return Err(FetchError::Insecure {
            url: parsed.to_string(),
        });
    }
    Ok(parsed)
}

/// One GET, its body read up to `MAX_DOCUMENT_BYTES`, as JSON.
async fn get_json(client: &reqwest::Client, url: &Url) -> Result<Value, FetchError> {
    if !is_allowed_url(url) {
        return Err(FetchError::Insecure {
            url: url.to_string(),
        });
    }
    let transport = |e: reqwest::Error| FetchError::Transport {
        url: url.to_string(),
        why: error_chain(&e),
    };
    let mut response = client
        .get(url.clone())
        .header("accept", "application/json")
        .send()
        .await
        .map_err(transport)?;
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    let too_large = || FetchError::TooLarge {
        url: url.to_string(),
        limit: MAX_DOCUMENT_BYTES,
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(transport)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    serde_json::from_slice(&body).map_err(|e| FetchError::NotJson {
        url: url.to_string(),
        why: e.to_string(),
    })
}

/// reqwest's error with its causes ("error sending request: … : connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// The signing keys of a fetched JWKS, each parsed alone so that one odd key (an unknown
/// type, an encryption key) does not hide the others.
fn usable_keys(from: &str, body: Value) -> Result<JwkSet, FetchError> {
    let Some(Value::Array(entries)) = body.get("keys") else {
        return Err(FetchError::NotJwks {
            from: from.to_string(),
        });
    };
    let mut keys = Vec::new();
    let mut dropped = Vec::new();
    for entry in entries {
        let kid = entry
            .get("kid")
            .and_then(Value::as_str)
            .map(crate::jose::shortened)
            .unwrap_or_default();
        let jwk: Jwk = match serde_json::from_value(entry.clone()) {
            Ok(jwk) => jwk,
            Err(e) => {
                dropped.push(format!("key {kid:?}: {e}"));
                continue;
            }
        };
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption) {
            dropped.push(format!("key {kid:?}: for encryption"));
            continue;
        }
        match key_algorithm(&jwk) {
            Ok(_) => keys.push(jwk),
            Err(why) => dropped.push(format!("key {kid:?}: {why}")),
        }
    }
    if keys.is_empty() {
        return Err(FetchError::NoUsableKeys {
            from: from.to_string(),
            dropped,
        });
    }
    if !dropped.is_empty() {
        log::debug!(target: "usher::trust", "{from}: keys left out: {}", dropped.join("; "));
    }
    Ok(JwkSet { keys })
}
