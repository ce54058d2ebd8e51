//! The just-in-time workflow (collector/WORKFLOW.md): requests, approvals, grants,
//! revocations, token exchange, and the audit trail of each step.

pub mod issuer;
