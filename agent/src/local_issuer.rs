//! The embedded default issuer: with no issuer configured, the agent trusts a key of its
//! own in the state directory, so one host works with no external service. Only root can
//! read the private key, so only root can sign grants with it (`usher grant sign --local`).

use crate::config::{Config, IssuerConfig};
use crate::grant::{keygen, IssueError, KeyAlg};
use std::path::{Path, PathBuf};

pub const KID: &str = "local";

pub fn dir(state_dir: &Path) -> PathBuf {
    state_dir.join("issuer")
}

pub fn iss(config: &Config) -> String {
    format!("usher-local:{}", config.host_name())
}

#[derive(Debug, thiserror::Error)]
pub enum LocalIssuerError {
    #[error("{}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot make the local issuer key: {0}")]
    Key(#[from] IssueError),
}

/// Adds the local issuer to `config` when none is configured, making its key on first use.
pub fn ensure(config: &mut Config) -> Result<(), LocalIssuerError> {
    if !config.issuers.is_empty() {
        return Ok(());
    }
    let dir = dir(&config.state_dir);
    let key_path = dir.join("issuer.key");
    let jwks_path = dir.join("issuer.jwks.json");
    if !key_path.exists() || !jwks_path.exists() {
        let write_error = |path: &Path| {
            let path = path.to_owned();
            move |source| LocalIssuerError::Write { path, source }
        };
        crate::fsutil::private_dir(&dir, 0o700).map_err(write_error(&dir))?;
        let (pem, jwks) = keygen(KeyAlg::Ed25519, KID)?;
        crate::fsutil::write_atomic(&key_path, pem.as_bytes(), 0o600)
            .map_err(write_error(&key_path))?;
        crate::fsutil::write_atomic(&jwks_path, jwks.as_bytes(), 0o644)
            .map_err(write_error(&jwks_path))?;
        log::info!(target: "usher::grant", "made the local issuer key {}", key_path.display());
    }
    let iss = iss(config);
    config.issuers.push(IssuerConfig {
        jwks: Some(jwks_path),
        discovery: false,
        ..IssuerConfig::discovery(&iss)
    });
    Ok(())
}
