//! Usher: the host agent for just-in-time access.
//!
//! The modules follow the journey of one session (DESIGN.md):
//!
//! 1. `grant`: a signed, time-bounded grant is verified and capped by local policy
//!    (`profile` holds the policy's exec profiles, `local_issuer` the embedded default key);
//! 2. `account`: the grant becomes an ephemeral local account, removed with its last grant;
//! 3. `session`: the core every front end hands its client to (cgroup, process, relay);
//!    the front ends are `ssh` (russh) and `console` (`usher-shell` on a local login);
//! 4. `enforce`: the kernel programs attribute every exec to its session and stop the
//!    forbidden ones;
//! 5. `record`: terminal output and exec events become a cast, an audit stream and
//!    metadata in the spool;
//! 6. `ship`: the spool goes to the collector in hash-chained chunks, sealed at the end.
//!
//! Around them: `feed` brings this host's grants and revocations from the central
//! service (`service` is that service's API, client side, for the feed and for `usher`;
//! `cli` is `usher`'s side of it: sign-in, requests, reviews);
//! `daemon` wires the stages into the agent and makes the decisions that span
//! them (a grant's end ends its sessions and its account); `control` is root's socket for
//! `usher`; `admission` caps peers that have not proved anything yet; `config` is the
//! agent's file; `audit` its log; `play` replays a cast safely; `fsutil` writes the agent's
//! files whole and private; `system` is the one place that talks to the kernel through
//! `unsafe` (the sudo-rs pattern): everything else is safe code.

#![deny(unsafe_code)]

#[macro_use]
pub mod audit;

// The journey, stage by stage (blank lines keep rustfmt from sorting them).
pub mod grant;

pub mod account;

pub mod session;

pub mod ssh;
// Stage 1 for desktops: RDP, through one `usher-rdp` worker per connection.
pub mod rdp;

pub mod console;

pub mod enforce;

pub mod record;

pub mod ship;

// Around the journey.
pub mod admission;
pub mod cli;
pub mod config;
pub mod control;
pub mod daemon;
pub mod export;
pub mod feed;
pub mod fsutil;
pub mod guard;
pub mod local_issuer;
pub mod play;
pub mod profile;
pub mod service;
mod sync;

// Every `unsafe` block of the agent is in here, each with its SAFETY argument.
#[allow(unsafe_code)]
pub mod system;
