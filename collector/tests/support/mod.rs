//! The shared collector harness (`usher-test-support`) with agents played by
//! `usher_collector::uploader`: each simulated host has a name, a token and a host key.

#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use usher_collector::uploader::{openssh_public_line, Answer, Uploader};
pub use usher_test_support::Backend;

/// One simulated host: its name, token and host key.
pub struct Host {
    pub name: String,
    pub token: String,
    pub key: SigningKey,
}

pub fn host(name: &str, seed: u8) -> Host {
    Host {
        name: name.into(),
        token: format!("token-of-{name}"),
        key: SigningKey::from_bytes(&[seed; 32]),
    }
}

/// A collector (this package's binary) that trusts the simulated hosts it was made for.
pub struct Collector {
    inner: usher_test_support::Collector,
    /// The CA certificate (PEM) the uploaders trust.
    pub ca: Vec<u8>,
}

impl Deref for Collector {
    type Target = usher_test_support::Collector;
    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}

impl DerefMut for Collector {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.inner
    }
}

impl Collector {
    /// Configured for `hosts`, not yet running.
    pub fn new(backend: Backend, hosts: &[&Host]) -> Collector {
        let trusted: Vec<usher_test_support::TrustedAgent> = hosts
            .iter()
            .map(|h| usher_test_support::TrustedAgent {
                host: h.name.clone(),
                token: h.token.clone(),
                host_key: openssh_public_line(&h.key),
            })
            .collect();
        let mut inner = usher_test_support::Collector::with_backend(backend, &trusted);
        inner.binary = PathBuf::from(env!("CARGO_BIN_EXE_usher-collector"));
        let ca = std::fs::read(inner.ca.ca_pem()).unwrap();
        Collector { inner, ca }
    }

    pub fn started(backend: Backend, hosts: &[&Host]) -> Collector {
        let mut c = Collector::new(backend, hosts);
        c.start();
        c
    }

    pub fn uploader(&self, h: &Host) -> Uploader {
        Uploader::new(&self.url(), &self.ca, &h.token, h.key.clone()).unwrap()
    }

    /// A client with an auditor's API token.
    pub fn viewer(&self) -> Uploader {
        Uploader::new(
            &self.url(),
            &self.ca,
            &self.viewer_token(),
            SigningKey::from_bytes(&[0; 32]),
        )
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        let v = self.viewer();
        v.send(v.client.get(format!("{}{path}", self.url())))
            .await
            .unwrap()
    }
}

/// Runs an async test body once per backend, as two `#[test]`s.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn local() {
                super::$name($crate::support::Backend::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                super::$name($crate::support::Backend::S3).await
            }
        }
    };
}
