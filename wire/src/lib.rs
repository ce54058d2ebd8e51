//! The formats Usher's programs exchange, written once and used by every side: the agent,
//! the collector, the tests and the benchmarks.
//!
//! Shipping a session to the collector: its streams are hash-chained ([`chain`]), its
//! metadata sent beside them ([`meta`]), the collector answers as [`collector`] says, and a
//! signed [`seal`] ends it. On the host: the control socket ([`control`]) and the console
//! socket ([`console`]). The claims of a grant: [`grant`]. The just-in-time workflow's API:
//! [`jit`].

#![deny(unsafe_code)]

pub mod approval;
pub mod chain;
pub mod collector;
pub mod console;
pub mod control;
pub mod grant;
pub mod jit;
pub mod line;
pub mod meta;
pub mod rdp;
pub mod seal;
