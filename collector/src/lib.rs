//! The collector as a library: the binary `usher-collector` serves it, and the tests and
//! the benchmark drive it with [`uploader`], a client of the agents' protocol.

#![deny(unsafe_code)]

pub mod api;
pub mod auth;
pub mod bench;
pub mod config;
pub mod encoding;
pub mod keys;
pub mod store;
pub mod uploader;
pub mod web;
pub mod workflow;
