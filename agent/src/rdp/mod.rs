//! Stage 1 for desktops: usherd terminates RDP. It listens, caps connections as it does
//! for SSH, and hands each connection to an `usher-rdp` worker (agent-rdp/: IronRDP and
//! X11, one unprivileged process per connection). Usherd keeps every decision: who logs in
//! (`worker`), which desktop they get and how long it lives (`desktop`, an ordinary
//! session of the core), and the recording. The certificate is `tls`'s.

mod desktop;
pub mod tls;
mod worker;

use crate::admission::Admission;
use crate::config::RdpConfig;
use crate::session::Core;
use desktop::Desktops;
use std::net::IpAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

pub use tls::Identity;

/// What every RDP connection of this agent shares.
pub struct RdpServer<C: Core> {
    core: Arc<C>,
    config: Arc<RdpConfig>,
    identity: Identity,
    desktops: Arc<Desktops<C>>,
    worker_uid: u32,
    worker_gid: u32,
}

impl<C: Core> RdpServer<C> {
    pub fn new(core: Arc<C>, config: RdpConfig, identity: Identity) -> Result<Arc<Self>, String> {
        let user = nix::unistd::User::from_name(&config.worker_user)
            .map_err(|e| format!("rdp.worker_user {:?}: {e}", config.worker_user))?
            .ok_or_else(|| format!("rdp.worker_user {:?} does not exist", config.worker_user))?;
        if user.uid.is_root() {
            return Err("rdp.worker_user must not be root".into());
        }
        let worker = config.worker_path();
        if !worker.exists() {
            return Err(format!(
                "the RDP worker {} is not there (rdp.worker)",
                worker.display()
            ));
        }
        x11_socket_dir()?;
        remove_old_cookies(&config.runtime_dir);
        let config = Arc::new(config);
        Ok(Arc::new(RdpServer {
            desktops: Desktops::new(core.clone(), config.clone()),
            core,
            config,
            identity,
            worker_uid: user.uid.as_raw(),
            worker_gid: user.gid.as_raw(),
        }))
    }

    /// Serves every listener until the process ends.
    pub async fn serve(self: Arc<Self>, listeners: Vec<TcpListener>) -> ! {
        let startups = Admission::new(
            self.config.max_startups,
            self.config.max_startups_per_source,
        );
        let connections = Admission::new(self.config.max_connections, self.config.max_connections);
        for listener in listeners {
            tokio::spawn(accept_loop(
                self.clone(),
                listener,
                startups.clone(),
                connections.clone(),
            ));
        }
        std::future::pending().await
    }
}

async fn accept_loop<C: Core>(
    server: Arc<RdpServer<C>>,
    listener: TcpListener,
    startups: Arc<Admission<IpAddr>>,
    connections: Arc<Admission<()>>,
) {
    crate::system::tcp::accept_admitted(listener, startups, "RDP", |stream, peer, slot| {
        tokio::spawn(worker::connection(
            server.clone(),
            stream,
            peer,
            slot,
            connections.clone(),
        ));
    })
    .await
}

/// Where X servers put their sockets: root's and sticky (as systemd's tmpfiles make it),
/// made so here when missing. Were the first desktop's X server to make it, its account
/// would own the directory every later desktop's socket goes into.
fn x11_socket_dir() -> Result<(), String> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    let dir = std::path::Path::new("/tmp/.X11-unix");
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.is_dir() && m.uid() == 0 => Ok(()),
        Ok(m) => Err(format!(
            "{} is not a directory of root's (uid {}): remove it, then start usherd again",
            dir.display(),
            m.uid()
        )),
        Err(_) => {
            std::fs::DirBuilder::new()
                .mode(0o1777)
                .create(dir)
                .map_err(|e| format!("cannot make {}: {e}", dir.display()))?;
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1777))
                .map_err(|e| format!("{}: {e}", dir.display()))
        }
    }
}

/// The cookies of desktops from before this start (an agent killed while they ran): their X
/// servers read them long ago, and a file left with an account's UID outlives the account.
fn remove_old_cookies(dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "xauth") {
            let _ = std::fs::remove_file(&path);
        }
    }
}
