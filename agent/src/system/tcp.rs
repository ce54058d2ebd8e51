//! Listening TCP sockets for the front ends (SSH, RDP).

use std::net::SocketAddr;
use tokio::net::TcpListener;

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
