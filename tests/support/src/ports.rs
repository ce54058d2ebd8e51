//! Loopback ports for servers a test or a benchmark starts.

/// A TCP port on 127.0.0.1 that nothing listened on a moment ago. The kernel picks it, so
/// parallel tests do not collide; whoever binds it next wins, which for a server started
/// right after is the server.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("the loopback interface has a free port")
}
