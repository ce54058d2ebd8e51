//! Empty on purpose: a library target lets the agent name this crate as a
//! build-dependency (see agent/build.rs); the programs are the binary, `main.rs`.
#![no_std]
