//! SSH: the agent terminates SSH itself (russh), so people keep using `ssh`, `scp`, `sftp`.

mod hostkey;
mod server;

pub use hostkey::{load_or_create_host_key, signing_key};
pub use server::serve;
