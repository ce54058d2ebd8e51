//! `[accounts]` of the agent's configuration: the fence (name prefix and UID range) and what
//! each account gets. It lives here, with the accounts it governs; `config` reads it.

use serde::Deserialize;
use std::path::PathBuf;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountsConfig {
    /// Every account the agent makes starts with this; it never touches other names.
    pub name_prefix: String,
    pub uid_min: u32,
    pub uid_max: u32,
    /// The shell sessions run (SSH, and console sessions once the agent opened them).
    pub shell: PathBuf,
    /// The login shell in /etc/passwd: Usher's recording shell, so that a console or `su`
    /// login also goes through the agent. Default: `usher-shell` beside `usherd`.
    pub login_shell: Option<PathBuf>,
    pub home_base: PathBuf,
}

impl Default for AccountsConfig {
    fn default() -> Self {
        AccountsConfig {
            name_prefix: "jit-".into(),
            uid_min: 61000,
            uid_max: 61999,
            shell: "/bin/bash".into(),
            login_shell: None,
            home_base: "/home".into(),
        }
    }
}

/// Why `[accounts]` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AccountsConfigError {
    #[error("accounts.uid_min..uid_max ({min}..{max}) must be a non-empty range at or above 1000")]
    UidRange { min: u32, max: u32 },
    #[error("accounts.name_prefix {0:?} must be a short valid user name start")]
    NamePrefix(String),
}

impl AccountsConfig {
    /// Checks what serde cannot: the fence must be a fence.
    pub fn validate(&self) -> Result<(), AccountsConfigError> {
        if self.uid_min < 1000 || self.uid_min > self.uid_max {
            return Err(AccountsConfigError::UidRange {
                min: self.uid_min,
                max: self.uid_max,
            });
        }
        if !super::is_valid_name(&self.name_prefix) || self.name_prefix.len() > 16 {
            return Err(AccountsConfigError::NamePrefix(self.name_prefix.clone()));
        }
        Ok(())
    }
}
