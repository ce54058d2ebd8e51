//! `usher-collector.toml`.

use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `127.0.0.1:8443`
    pub listen: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The index (SQLite) and, with the local backend, the recordings.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub storage: Storage,
    /// Tokens that may read (the web page and the search API).
    #[serde(default)]
    pub viewer_tokens: Vec<String>,
    /// The hosts that may ship, each bound to a token and to its host key.
    #[serde(rename = "agent", default)]
    pub agents: Vec<AgentConfig>,
    /// asciinema-player's files (`asciinema-player.min.js`, `asciinema-player.css`).
    pub assets_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum Storage {
    /// Files under `data_dir/objects`.
    #[default]
    Local,
    /// An S3-compatible service.
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: Option<String>,
        access_key_id: String,
        secret_access_key: String,
        #[serde(default)]
        allow_http: bool,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub host: String,
    pub token: String,
    /// The host's SSH host key (`ssh-ed25519 AAAA…`): it signs each session's seal.
    pub host_key: String,
}

/// Why the configuration cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })
    }
}
