//! The only place with `unsafe`: small safe functions over the system calls the std library
//! and `nix` do not wrap safely, each `unsafe` block with the reason it holds (`// SAFETY:`).
//! The rest of the crate denies `unsafe_code`, and never sees a raw file descriptor taken
//! or a C string passed by hand.
//!
//! - [`process`]: what a session's child does between fork and exec;
//! - [`mount`]: the session's noexec mount namespace (made by `process`);
//! - [`term`]: the session's PTY and window sizes;
//! - [`signal`]: signals by name (SSH's), and noticing window changes;
//! - [`socket`]: descriptors passed over Unix sockets;
//! - [`ipc`]: removing an account's System V IPC objects;
//! - [`async_fd`]: waiting on descriptors (the PTY, the eBPF ring buffers) with tokio;
//! - [`bpf`]: the events the eBPF programs write;
//! - [`tcp`]: the front ends' listening sockets (no `unsafe`, but system-facing).

pub mod async_fd;
pub mod bpf;
pub mod ipc;
pub mod mount;
pub mod process;
pub mod signal;
pub mod socket;
pub mod tcp;
pub mod term;
