//! The host's own sshd is told to refuse the agent's accounts: the package ships
//! /etc/ssh/sshd_config.d/usher.conf with `DenyUsers jit-*`. The agent checks at start-up
//! that the drop-in covers its configured prefix, and says so in the journal when not.

use std::path::Path;

pub const DROP_IN: &str = "/etc/ssh/sshd_config.d/usher.conf";

/// Whether the sshd configuration text denies every user whose name starts with `prefix`
/// through a `DenyUsers PREFIX*` pattern (keywords are case-insensitive, `=` may separate).
pub fn denies_prefix(config: &str, prefix: &str) -> bool {
    let wanted = format!("{prefix}*");
    config.lines().any(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let (keyword, rest) = match line.find(|c: char| c.is_whitespace() || c == '=') {
            Some(i) => (&line[..i], &line[i..]),
            None => return false,
        };
        let rest = rest.trim_start().strip_prefix('=').unwrap_or(rest);
        keyword.eq_ignore_ascii_case("DenyUsers") && rest.split_whitespace().any(|p| p == wanted)
    })
}

/// Why the host's sshd may let the agent's accounts in.
#[derive(Debug, thiserror::Error)]
pub enum DropInProblem {
    #[error("{drop_in} does not deny \"{prefix}*\": the host's sshd may let usher's accounts in; add `DenyUsers {prefix}*` there and reload sshd", drop_in = DROP_IN)]
    DoesNotDeny { prefix: String },
    #[error("{drop_in}: {source}: the host's sshd may let usher's accounts in; add `DenyUsers {prefix}*` there and reload sshd", drop_in = DROP_IN)]
    Unreadable {
        prefix: String,
        source: std::io::Error,
    },
}

/// What to tell the journal about the system sshd, if anything: None when no sshd is
/// configured on this host or when the drop-in denies `prefix`.
pub fn drop_in_problem(prefix: &str) -> Option<DropInProblem> {
    if !Path::new("/etc/ssh/sshd_config").exists() {
        return None;
    }
    match std::fs::read_to_string(DROP_IN) {
        Ok(text) if denies_prefix(&text, prefix) => None,
        Ok(_) => Some(DropInProblem::DoesNotDeny {
            prefix: prefix.to_string(),
        }),
        Err(source) => Some(DropInProblem::Unreadable {
            prefix: prefix.to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::denies_prefix;

    #[test]
    fn deny_users_patterns() {
        assert!(denies_prefix("DenyUsers jit-*\n", "jit-"));
        assert!(denies_prefix(
            "# x\n  denyusers   bob jit-*  # ours\n",
            "jit-"
        ));
        assert!(denies_prefix("DenyUsers=jit-*\n", "jit-"));
        assert!(!denies_prefix("DenyUsers jit-*\n", "tmp-"));
        assert!(!denies_prefix("# DenyUsers jit-*\n", "jit-"));
        assert!(!denies_prefix("AllowUsers jit-*\n", "jit-"));
        assert!(!denies_prefix("DenyUsers jit-bob\n", "jit-"));
    }
}
