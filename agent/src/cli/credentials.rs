//! Where `usher login` keeps a person's sign-in: `~/.config/usher/service.json` (or under
//! `$XDG_CONFIG_HOME`), mode 0600, with the service's address and CA beside the token.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use usher_wire::jit::Principal;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Credentials {
    /// The service, `https://usher.example:8443`.
    pub url: String,
    /// The CA its certificate chains to, when not a public one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The service's API token (a bearer token).
    pub token: String,
    /// Unix seconds.
    pub expires_at: i64,
    pub principal: Principal,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("not signed in ({} does not exist): run `usher login --service URL`", path.display())]
    Missing { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not a sign-in written by `usher login`: {source}", path.display())]
    Unreadable {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("no home directory: set HOME or XDG_CONFIG_HOME")]
    NoHome,
}

/// The file, from the environment as the XDG base directory specification reads it.
pub fn default_path() -> Result<PathBuf, CredentialsError> {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    let config = from("XDG_CONFIG_HOME")
        .filter(|p| p.is_absolute())
        .or_else(|| from("HOME").map(|h| h.join(".config")))
        .ok_or(CredentialsError::NoHome)?;
    Ok(config.join("usher").join("service.json"))
}

impl Credentials {
    pub fn load(path: &Path) -> Result<Credentials, CredentialsError> {
        let text = std::fs::read_to_string(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                CredentialsError::Missing {
                    path: path.to_owned(),
                }
            } else {
                CredentialsError::Io {
                    path: path.to_owned(),
                    source,
                }
            }
        })?;
        serde_json::from_str(&text).map_err(|source| CredentialsError::Unreadable {
            path: path.to_owned(),
            source,
        })
    }

    /// Written whole, 0600 from its first byte, in a 0700 directory.
    pub fn save(&self, path: &Path) -> Result<(), CredentialsError> {
        let io = |source| CredentialsError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(dir) = path.parent() {
            if !dir.exists() {
                crate::fsutil::private_dir(dir, 0o700).map_err(io)?;
            }
        }
        let text = serde_json::to_string_pretty(self).expect("credentials serialise");
        crate::fsutil::write_atomic(path, text.as_bytes(), 0o600).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn saved_private_and_read_back() {
        let dir = std::env::temp_dir().join(format!("usher-creds-{}", std::process::id()));
        let path = dir.join("usher/service.json");
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::Missing { .. })
        ));
        let c = Credentials {
            url: "https://s:8443".into(),
            ca: Some("/ca.pem".into()),
            token: "tok".into(),
            expires_at: 42,
            principal: Principal {
                sub: "s-1".into(),
                name: "alice".into(),
                groups: vec!["eng".into()],
                roles: Default::default(),
            },
        };
        c.save(&path).unwrap();
        assert_eq!(Credentials::load(&path).unwrap(), c);
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        assert_eq!(mode(path.parent().unwrap()), 0o700);
        std::fs::write(&path, "{").unwrap();
        assert!(matches!(
            Credentials::load(&path),
            Err(CredentialsError::Unreadable { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
