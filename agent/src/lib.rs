//! Usher: the host agent for just-in-time access.
//!
//! One module per stage of a session's journey (see DESIGN.md):
//! grant → account → session (ssh) → enforce → record. `daemon` wires them together.

#![deny(unsafe_code)]

#[macro_use]
pub mod audit;
pub mod account;
pub mod admission;
pub mod config;
pub mod console;
pub mod control;
pub mod daemon;
pub mod enforce;
pub mod fsutil;
pub mod grant;
pub mod local_issuer;
pub mod play;
pub mod profile;
pub mod record;
pub mod session;
pub mod ship;
pub mod ssh;
mod sync;
#[allow(unsafe_code)]
pub mod system;
