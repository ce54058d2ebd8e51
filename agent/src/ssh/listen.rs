//! The SSH listeners: bound before anything is served, accepting for as long as the agent
//! lives. Nothing a network peer does before it authenticates may stop the agent or use
//! up what other peers need: accept errors (out of file descriptors, above all) are
//! waited out, connections that have not authenticated are capped globally and per
//! source address, and each has a grace time to authenticate.

use super::server::Connection;
use super::SshOptions;
use crate::admission::Admission;
use crate::grant::GrantId;
use crate::session::Core;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, watch};

/// Serves every listener until the process ends; never returns.
pub async fn serve<C: Core>(
    core: Arc<C>,
    options: Arc<SshOptions>,
    config: Arc<russh::server::Config>,
    listeners: Vec<TcpListener>,
) -> ! {
    let ssh = &options.config;
    let startups = Admission::new(ssh.max_startups, ssh.max_startups_per_source);
    let connections = Admission::new(ssh.max_connections, ssh.max_connections);
    for listener in listeners {
        tokio::spawn(accept_loop(
            core.clone(),
            options.clone(),
            config.clone(),
            listener,
            startups.clone(),
            connections.clone(),
        ));
    }
    std::future::pending().await
}

async fn accept_loop<C: Core>(
    core: Arc<C>,
    options: Arc<SshOptions>,
    config: Arc<russh::server::Config>,
    listener: TcpListener,
    startups: Arc<Admission<IpAddr>>,
    connections: Arc<Admission<()>>,
) {
    crate::system::tcp::accept_admitted(listener, startups, "SSH", |stream, peer, slot| {
        let core = core.clone();
        let options = options.clone();
        let config = config.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            connection(core, options, config, stream, peer, slot, connections).await;
        });
    })
    .await
}

/// One connection from accept to its end: the login grace time until it authenticates,
/// then the life of its grant.
async fn connection<C: Core>(
    core: Arc<C>,
    options: Arc<SshOptions>,
    config: Arc<russh::server::Config>,
    stream: TcpStream,
    peer: SocketAddr,
    startup_slot: crate::admission::Slot<IpAddr>,
    connections: Arc<Admission<()>>,
) {
    let grace = Duration::from_secs(options.config.login_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    // Subscribed before authentication, so that a grant ending in between is not missed.
    let mut grant_ends = core.grant_ends();
    let (authenticated_tx, mut authenticated) = watch::channel(None::<GrantId>);
    let handler = Connection::new(core.clone(), options, Some(peer), authenticated_tx);
    // A second descriptor of the socket, to cut it from under a session that will not
    // end by itself (a peer that reads nothing).
    let socket = stream
        .as_fd()
        .try_clone_to_owned()
        .map(std::net::TcpStream::from)
        .ok();
    let running =
        match tokio::time::timeout_at(deadline, russh::server::run_stream(config, stream, handler))
            .await
        {
            Ok(Ok(r)) => r,
            // No SSH version line in time, or none at all: nothing to say to such a peer.
            _ => return,
        };
    let handle = running.handle();
    tokio::pin!(running);
    let mut startup_slot = Some(startup_slot);
    let mut _connection_slot = None;
    let mut grant: Option<GrantId> = None;
    loop {
        tokio::select! {
            _ = &mut running => return,
            _ = tokio::time::sleep_until(deadline), if grant.is_none() => {
                log::info!(target: "usher::ssh", "{peer}: no authentication within {} s; closed", grace.as_secs());
                break;
            }
            changed = authenticated.changed(), if grant.is_none() => {
                let id = authenticated.borrow().clone();
                match (changed, id) {
                    (Ok(()), Some(id)) => {
                        startup_slot = None;
                        match connections.try_admit(()) {
                            Ok(s) => _connection_slot = Some(s),
                            Err(why) => {
                                log::warn!(target: "usher::ssh", "{peer}: closed after authentication: {why}");
                                break;
                            }
                        }
                        if !core.is_live(&id) {
                            break;
                        }
                        grant = Some(id);
                    }
                    _ => return,
                }
            }
            ended = grant_ends.recv(), if grant.is_some() => {
                let Some(mine) = grant.as_ref() else { continue };
                let over = match ended {
                    Ok(id) => &id == mine,
                    // Missed some: ask the agent instead.
                    Err(broadcast::error::RecvError::Lagged(_)) => !core.is_live(mine),
                    Err(broadcast::error::RecvError::Closed) => false,
                };
                if over {
                    audit!("connection_closed", jti = mine.jti.as_str(), iss = mine.iss.as_str(), peer = peer.to_string().as_str(); "connection from {peer} closed: its grant {mine} ended");
                    break;
                }
            }
        }
    }
    drop(startup_slot);
    let _ = handle
        .disconnect(
            russh::Disconnect::ByApplication,
            "access ended".into(),
            "en".into(),
        )
        .await;
    // The session task ends once the disconnect is sent; a peer that does not read may
    // hold it a moment, not forever.
    if tokio::time::timeout(Duration::from_secs(2), &mut running)
        .await
        .is_err()
    {
        if let Some(s) = &socket {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut running).await;
    }
}
