//! Listening TCP sockets for the front ends (SSH, RDP).

use crate::admission::{Admission, Refused, Slot};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};

/// Binds every configured address. An IPv6 socket is bound v6-only, so that `0.0.0.0`
/// and `[::]` on one port are two sockets, not a conflict. Addresses that cannot be
/// bound are logged; no address at all is an error.
pub fn bind(addresses: &[String], what: &str) -> Result<Vec<TcpListener>, String> {
    let mut bound = Vec::new();
    for text in addresses {
        let addr: SocketAddr = text
            .parse()
            .map_err(|_| format!("{text:?} is not an address and port"))?;
        match bind_one(addr) {
            Ok(l) => bound.push(l),
            Err(e) => log::error!(target: "usher", "cannot listen for {what} on {addr}: {e}"),
        }
    }
    if bound.is_empty() {
        return Err(format!(
            "no {what} listen address could be bound ({})",
            addresses.join(", ")
        ));
    }
    Ok(bound)
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Accepts for as long as the agent lives. Nothing a network peer does before it
/// authenticates may stop the agent or use up what other peers need: accept errors (out of
/// file descriptors, above all) are waited out, and each connection takes a startup slot
/// (capped globally and per source address) or is closed at once. `serve` gets the rest.
pub async fn accept_admitted(
    listener: TcpListener,
    startups: Arc<Admission<IpAddr>>,
    what: &'static str,
    mut serve: impl FnMut(TcpStream, SocketAddr, Slot<IpAddr>),
) {
    let mut failing_since: Option<Instant> = None;
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                // EMFILE, ENFILE, ENOBUFS, ECONNABORTED…: all pass. Said once per spell,
                // and the pause lets sessions that end give descriptors back.
                if failing_since.is_none() {
                    log::error!(target: "usher", "accepting a connection failed ({what}): {e}; retrying");
                    failing_since = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if let Some(since) = failing_since.take() {
            log::info!(target: "usher", "accepting {what} connections again after {:.1} s", since.elapsed().as_secs_f64());
        }
        match startups.try_admit(peer.ip()) {
            Ok(slot) => {
                let _ = stream.set_nodelay(true);
                serve(stream, peer, slot);
            }
            Err(why) => refuse(what, peer, why),
        }
    }
}

fn refuse(what: &str, peer: SocketAddr, why: Refused) {
    // One line per refusal would let a flood fill the journal: count, say it at powers of 2.
    static REFUSED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = REFUSED.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    if n.is_power_of_two() {
        log::warn!(target: "usher", usher_event = "connection_refused", peer = peer.to_string().as_str(); "{what} connection from {peer} closed: {why} ({n} so far)");
    }
}
