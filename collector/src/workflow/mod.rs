//! The just-in-time workflow (collector/WORKFLOW.md): requests, approvals, grants,
//! revocations, token exchange, and the audit trail of each step.

pub mod issuer;

/// Unix seconds now.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
