//! An issuer as configuration names it (`[[issuer]]` in usherd.toml; the service builds the
//! same from its `[[workload]]` and login settings).

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use url::Url;

/// One trusted issuer and where its public keys come from: exactly one of `jwks` (a file),
/// `jwks_url`, or `discovery = true` (`{iss}/.well-known/openid-configuration` →
/// `jwks_uri`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The `iss` its tokens carry, compared exactly.
    pub iss: String,
    /// A JWKS file with the issuer's public keys; `kid` selects the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<PathBuf>,
    /// Where the issuer publishes its JWKS (HTTPS; plain http only on loopback).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_url: Option<String>,
    /// Find the JWKS through the issuer's OpenID discovery document.
    #[serde(default)]
    pub discovery: bool,
    /// An extra root certificate (PEM) for this issuer's HTTPS, besides the usual roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// Fewest seconds between two fetches asked for by unknown `kid`s.
    #[serde(default = "default_refresh_min_secs")]
    pub refresh_min_secs: u64,
    /// Seconds between routine fetches.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// How long the last good keys stay trusted while fetching fails, in seconds.
    #[serde(default = "default_max_stale_secs")]
    pub max_stale_secs: u64,
}

pub fn default_refresh_min_secs() -> u64 {
    30
}

pub fn default_refresh_secs() -> u64 {
    3600
}

pub fn default_max_stale_secs() -> u64 {
    24 * 3600
}

/// Where an issuer's keys come from, once the configuration is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    File(PathBuf),
    Url(Url),
    /// The discovery document's URL.
    Discovery(Url),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("issuer {0:?}: say where its keys are: jwks (a file), jwks_url, or discovery = true")]
    NoKeySource(String),
    #[error("issuer {0:?}: give only one of jwks, jwks_url and discovery = true")]
    SeveralKeySources(String),
    #[error("issuer {iss:?}: {url:?} is not a URL: {why}")]
    BadUrl {
        iss: String,
        url: String,
        why: String,
    },
    #[error("issuer {iss:?}: {url:?} is not HTTPS (plain http is allowed only on loopback)")]
    Insecure { iss: String, url: String },
    #[error("issuer {iss:?}: refresh_min_secs, refresh_secs and max_stale_secs must be above 0")]
    ZeroInterval { iss: String },
}

impl IssuerConfig {
    /// An issuer whose keys are found by discovery, with the default timings.
    pub fn discovery(iss: &str) -> IssuerConfig {
        IssuerConfig {
            iss: iss.to_string(),
            jwks: None,
            jwks_url: None,
            discovery: true,
            ca: None,
            refresh_min_secs: default_refresh_min_secs(),
            refresh_secs: default_refresh_secs(),
            max_stale_secs: default_max_stale_secs(),
        }
    }

    /// The one key source, checked: URLs parse and are HTTPS or loopback http.
    pub fn source(&self) -> Result<KeySource, ConfigError> {
        if self.refresh_min_secs == 0 || self.refresh_secs == 0 || self.max_stale_secs == 0 {
            return Err(ConfigError::ZeroInterval {
                iss: self.iss.clone(),
            });
        }
        let url = |text: &str| -> Result<Url, ConfigError> {
            let url = Url::parse(text).map_err(|e| ConfigError::BadUrl {
                iss: self.iss.clone(),
                url: text.to_string(),
                why: e.to_string(),
            })?;
            if !is_allowed_url(&url) {
                return Err(ConfigError::Insecure {
                    iss: self.iss.clone(),
                    url: text.to_string(),
                });
            }
            Ok(url)
        };
        match (&self.jwks, &self.jwks_url, self.discovery) {
            (Some(path), None, false) => Ok(KeySource::File(path.clone())),
            (None, Some(jwks_url), false) => Ok(KeySource::Url(url(jwks_url)?)),
            (None, None, true) => Ok(KeySource::Discovery(url(&discovery_url(&self.iss))?)),
            (None, None, false) => Err(ConfigError::NoKeySource(self.iss.clone())),
            _ => Err(ConfigError::SeveralKeySources(self.iss.clone())),
        }
    }
}

/// OpenID Connect Discovery 1.0 §4: the issuer with any trailing `/` removed, then
/// `/.well-known/openid-configuration`.
pub fn discovery_url(iss: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        iss.trim_end_matches('/')
    )
}

/// HTTPS anywhere; plain http only to a loopback address (tests, a provider on the host).
pub fn is_allowed_url(url: &Url) -> bool {
    match url.scheme() {
        "https" => url.host().is_some(),
        "http" => match url.host() {
            Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
            Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
            Some(url::Host::Domain(name)) => name.eq_ignore_ascii_case("localhost"),
            None => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exactly_one_source_and_only_safe_urls() {
        let mut c = IssuerConfig::discovery("https://idp.example");
        assert_eq!(
            c.source().unwrap(),
            KeySource::Discovery(
                Url::parse("https://idp.example/.well-known/openid-configuration").unwrap()
            )
        );
        c.jwks = Some("/etc/usher/idp.jwks".into());
        assert_eq!(
            c.source(),
            Err(ConfigError::SeveralKeySources("https://idp.example".into()))
        );
        c.discovery = false;
        assert_eq!(
            c.source().unwrap(),
            KeySource::File("/etc/usher/idp.jwks".into())
        );
        c.jwks = None;
        assert!(matches!(c.source(), Err(ConfigError::NoKeySource(_))));
        for bad in [
            "http://idp.example/jwks.json",
            "http://10.0.0.1/jwks.json",
            "ftp://127.0.0.1/jwks.json",
            "file:///etc/passwd",
        ] {
            c.jwks_url = Some(bad.into());
            assert!(
                matches!(c.source(), Err(ConfigError::Insecure { .. })),
                "{bad}"
            );
        }
        c.jwks_url = Some("not a url".into());
        assert!(matches!(c.source(), Err(ConfigError::BadUrl { .. })));
        for good in [
            "http://127.0.0.1:8080/jwks.json",
            "http://[::1]:8080/jwks.json",
            "http://localhost/jwks.json",
            "https://idp.example/jwks.json",
        ] {
            c.jwks_url = Some(good.into());
            assert!(c.source().is_ok(), "{good}");
        }
        // The issuer itself must be safe to discover from.
        let c = IssuerConfig::discovery("http://idp.example");
        assert!(matches!(c.source(), Err(ConfigError::Insecure { .. })));
        assert_eq!(
            discovery_url("https://idp.example/"),
            "https://idp.example/.well-known/openid-configuration"
        );
    }

    #[test]
    fn parses_from_toml_with_default_timings() {
        let c: IssuerConfig = serde_json::from_value(serde_json::json!({
            "iss": "https://usher.example:8443", "discovery": true, "ca": "/etc/usher/ca.pem"
        }))
        .unwrap();
        assert_eq!(c.refresh_min_secs, 30);
        assert_eq!(c.refresh_secs, 3600);
        assert_eq!(c.max_stale_secs, 86400);
        assert!(serde_json::from_value::<IssuerConfig>(
            serde_json::json!({"iss": "x", "jku": "https://evil"})
        )
        .is_err());
    }
}
