//! What every harness of Usher needs and none should write again: free loopback ports, a
//! throwaway certificate authority, a real collector (on a local directory or moto's S3),
//! the options of an `ssh` client that talks to throwaway servers, waiting with a deadline,
//! a headless Chromium driven over WebDriver, and an RDP client (FreeRDP) on a display of its own.
//!
//! Used by the end-to-end tests (`tests/`), the collector's tests (`collector/tests/`) and
//! the benchmarks (`xtask`). It does not depend on the agent, so `xtask` builds it without
//! the eBPF programs.

pub mod browser;
pub mod ca;
pub mod collector;
pub mod oidc;
pub mod ports;
pub mod postgres;
pub mod rdp;
pub mod ssh;
pub mod wait;
pub mod webhook;

pub use browser::Browser;
pub use ca::{CaError, TestCa};
pub use collector::{Backend, Collector, LogSource, Moto, TrustedAgent};
pub use oidc::{Account, OidcError, OidcOptions, OidcProvider, Workload};
pub use ports::free_port;
pub use postgres::{Postgres, PostgresError};
pub use rdp::{CertCheck, ClientDisplay, Image, RdpClient, RdpError, RdpOptions, Rgb, Security};
pub use ssh::{client_options, SshClient};
pub use wait::{poll_until, wait_for_file, wait_for_log_line, wait_for_port, wait_until, TimedOut};
pub use webhook::WebhookSink;

use std::path::{Path, PathBuf};

/// The workspace's root directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A binary of the workspace as `cargo build` left it: in `$USHER_BIN_DIR` when set (the
/// build's target directory is elsewhere), else in `target/debug`.
pub fn built_binary(name: &str) -> PathBuf {
    let dir = std::env::var_os("USHER_BIN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/debug"));
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: run the tests with `cargo xtask test` (it builds the binaries)",
        path.display()
    );
    path
}
