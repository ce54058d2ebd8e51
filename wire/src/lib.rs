//! The formats Usher's programs exchange, written once and used by every side: the agent,
//! the collector, the tests and the benchmarks.

#![deny(unsafe_code)]

pub mod chain;
pub mod console;
pub mod control;
pub mod meta;
pub mod seal;
