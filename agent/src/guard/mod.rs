//! Guardrails inside a session (README.md here): commands that wait for a person's
//! approval, and secrets masked before anyone sees or records them.

pub mod approval;
pub mod mask;
