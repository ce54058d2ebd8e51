//! SSH: the agent terminates SSH itself (russh), so people keep using `ssh`, `scp`, `sftp`.

mod hostkey;
mod listen;
mod server;

pub use hostkey::{load_or_create_host_key, signing_key};
pub use listen::serve;
pub use server::settings;

/// What the SSH front end takes from the agent's configuration.
pub struct SshOptions {
    pub config: crate::config::SshConfig,
    /// The program the `sftp` subsystem runs, if this host has one.
    pub sftp_server: Option<std::path::PathBuf>,
}
