//! `usher-rdp`: one process per RDP connection, started by usherd (see
//! `usher_wire::rdp`). stdin is the client's TCP connection, fd 3 the socket to usherd.

mod record;
mod screen;

fn main() {}
