//! Usher: the host agent for just-in-time access.
//!
//! One module per stage of a session's journey (see DESIGN.md):
//! grant → account → session → enforce → record → ship.

pub mod enforce;
