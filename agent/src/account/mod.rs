//! Stage 2: ephemeral local accounts, made with the system's own tools.
//!
//! The agent only ever touches names that carry its prefix AND whose UID lies in its range,
//! and it remembers every account it made in a state file so that a crash is followed by
//! reconciliation rather than by leftovers.

mod passwd;
mod reap;

pub use passwd::{lookup_group, PasswdEntry};
pub use reap::{kill_uid_processes, remove_uid_files};

use crate::config::AccountsConfig;
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A user name the system tools accept and that cannot be mistaken for an option.
pub fn is_valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
    /// Supplementary group ids.
    pub groups: Vec<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct AccountRecord {
    uid: u32,
    created_at: i64,
    /// Unix day the account's expiry is set to.
    expire_day: i64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateFile {
    accounts: BTreeMap<String, AccountRecord>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0:?} is not a name this agent manages")]
    NotManaged(String),
    #[error("an account named {0:?} already exists and was not made by usher")]
    NameTaken(String),
    #[error("no free UID in {0}..={1}")]
    RangeFull(u32, u32),
    #[error("group {0:?} does not exist on this host")]
    NoSuchGroup(String),
    #[error("{tool} failed: {detail}")]
    Tool { tool: &'static str, detail: String },
    #[error("state file: {0}")]
    State(#[from] std::io::Error),
}

pub struct Accounts {
    config: AccountsConfig,
    login_shell: PathBuf,
    state_path: PathBuf,
    state: StateFile,
    passwd_path: PathBuf,
}

impl Accounts {
    pub fn open(
        config: &AccountsConfig,
        login_shell: &Path,
        state_dir: &Path,
    ) -> Result<Accounts, AccountError> {
        let state_path = state_dir.join("accounts.json");
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", state_path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(e.into()),
        };
        Ok(Accounts {
            config: config.clone(),
            login_shell: login_shell.to_owned(),
            state_path,
            state,
            passwd_path: "/etc/passwd".into(),
        })
    }

    /// Whether `entry` is inside the fence: our prefix and our UID range.
    pub fn is_ours(&self, entry: &PasswdEntry) -> bool {
        entry.name.starts_with(&self.config.name_prefix)
            && (self.config.uid_min..=self.config.uid_max).contains(&entry.uid)
    }

    pub fn names(&self) -> Vec<String> {
        self.state.accounts.keys().cloned().collect()
    }

    /// The account for `login`, made now if it does not exist. `until` is the end of the
    /// latest live grant for it; the account's expiry date follows it.
    pub fn ensure(
        &mut self,
        login: &str,
        groups: &[String],
        until: i64,
        now: i64,
    ) -> Result<(Account, bool), AccountError> {
        if !is_valid_name(login) || !login.starts_with(&self.config.name_prefix) {
            return Err(AccountError::NotManaged(login.into()));
        }
        let mut group_ids = Vec::new();
        for g in groups {
            group_ids.push(lookup_group(g).ok_or_else(|| AccountError::NoSuchGroup(g.clone()))?);
        }
        let passwd = passwd::read(&self.passwd_path)?;
        let expire_day = until.div_euclid(86400) + 1;
        if let Some(entry) = passwd.iter().find(|e| e.name == login) {
            if !self.is_ours(entry) || !self.state.accounts.contains_key(login) {
                return Err(AccountError::NameTaken(login.into()));
            }
            let record = self.state.accounts.get_mut(login).expect("checked above");
            if expire_day > record.expire_day {
                run(
                    "usermod",
                    &["--expiredate", &day_string(expire_day), "--", login],
                )?;
                record.expire_day = expire_day;
                self.save()?;
            }
            return Ok((self.account_of(entry, group_ids), false));
        }
        let used: BTreeSet<u32> = passwd
            .iter()
            .map(|e| e.uid)
            .chain(self.state.accounts.values().map(|r| r.uid))
            .collect();
        let uid = (self.config.uid_min..=self.config.uid_max)
            .find(|u| !used.contains(u))
            .ok_or(AccountError::RangeFull(
                self.config.uid_min,
                self.config.uid_max,
            ))?;
        let home = self.config.home_base.join(login);
        let uid_s = uid.to_string();
        let day = day_string(expire_day);
        let home_s = home.to_string_lossy().into_owned();
        let shell_s = self.login_shell.to_string_lossy().into_owned();
        let group_list = groups.join(",");
        let mut args = vec![
            "--uid",
            &uid_s,
            "--user-group",
            "--create-home",
            "--home-dir",
            &home_s,
            "--shell",
            &shell_s,
            "--expiredate",
            &day,
            // A locked password: grants, not passwords, open this account.
            "--password",
            "!",
            "--comment",
            "usher ephemeral account",
        ];
        if !groups.is_empty() {
            args.extend(["--groups", &group_list]);
        }
        args.extend(["--", login]);
        run("useradd", &args)?;
        self.state.accounts.insert(
            login.to_string(),
            AccountRecord {
                uid,
                created_at: now,
                expire_day,
            },
        );
        self.save()?;
        let passwd = passwd::read(&self.passwd_path)?;
        let entry = passwd
            .iter()
            .find(|e| e.name == login)
            .ok_or_else(|| AccountError::Tool {
                tool: "useradd",
                detail: "account missing from /etc/passwd after useradd".into(),
            })?;
        Ok((self.account_of(entry, group_ids), true))
    }

    /// Kills every process of `login`, removes the account, its home and its files in the
    /// shared temporary directories. Returns false if there was nothing to remove.
    pub fn remove(&mut self, login: &str) -> Result<bool, AccountError> {
        let passwd = passwd::read(&self.passwd_path)?;
        let Some(entry) = passwd.iter().find(|e| e.name == login) else {
            let known = self.state.accounts.remove(login).is_some();
            self.save()?;
            return Ok(known);
        };
        if !self.is_ours(entry) {
            return Err(AccountError::NotManaged(login.into()));
        }
        kill_uid_processes(entry.uid);
        remove_uid_files(entry.uid);
        match run("userdel", &["--remove", "--", login]) {
            Ok(()) => {}
            // 12: the home directory could not be removed (already gone): the account is.
            Err(AccountError::Tool { detail, .. }) if detail.contains("exit status: 12") => {}
            Err(e) => return Err(e),
        }
        if entry.home.starts_with(&self.config.home_base) && entry.home.exists() {
            let _ = std::fs::remove_dir_all(&entry.home);
        }
        self.state.accounts.remove(login);
        self.save()?;
        Ok(true)
    }

    /// Accounts inside the fence (from /etc/passwd and from the state file) whose name is
    /// not in `keep`; the caller removes them.
    pub fn orphans(&mut self, keep: &BTreeSet<String>) -> Result<Vec<String>, AccountError> {
        let passwd = passwd::read(&self.passwd_path)?;
        let mut orphans: BTreeSet<String> = passwd
            .iter()
            .filter(|e| self.is_ours(e) && !keep.contains(&e.name))
            .map(|e| e.name.clone())
            .collect();
        // Remembered accounts that are gone from passwd: forget them.
        let gone: Vec<String> = self
            .state
            .accounts
            .keys()
            .filter(|n| !passwd.iter().any(|e| &e.name == *n))
            .cloned()
            .collect();
        for name in gone {
            self.state.accounts.remove(&name);
        }
        // Accounts in the fence that a live grant still uses but the state lost: adopt.
        let adopt: Vec<&PasswdEntry> = passwd
            .iter()
            .filter(|e| self.is_ours(e) && keep.contains(&e.name))
            .collect();
        for e in adopt {
            self.state
                .accounts
                .entry(e.name.clone())
                .or_insert(AccountRecord {
                    uid: e.uid,
                    created_at: 0,
                    expire_day: 0,
                });
        }
        orphans.extend(
            self.state
                .accounts
                .keys()
                .filter(|n| !keep.contains(*n))
                .cloned(),
        );
        self.save()?;
        Ok(orphans.into_iter().collect())
    }

    pub fn lookup(&self, login: &str) -> Option<PasswdEntry> {
        passwd::read(&self.passwd_path)
            .ok()?
            .into_iter()
            .find(|e| e.name == login && self.is_ours(e))
    }

    /// Sets the account's password hash (a console grant's one-time secret), or locks it.
    pub fn set_password(&self, login: &str, crypt_hash: Option<&str>) -> Result<(), AccountError> {
        let entry = self
            .lookup(login)
            .ok_or_else(|| AccountError::NotManaged(login.into()))?;
        let hash = crypt_hash.unwrap_or("!");
        run("usermod", &["--password", hash, "--", &entry.name])
    }

    /// Puts back the recording shell of any account whose login shell was changed
    /// (`chsh`); returns the names it had to fix.
    pub fn restore_login_shells(&self) -> Vec<String> {
        let Ok(passwd) = passwd::read(&self.passwd_path) else {
            return Vec::new();
        };
        let mut fixed = Vec::new();
        for e in passwd
            .iter()
            .filter(|e| self.is_ours(e) && self.state.accounts.contains_key(&e.name))
        {
            if e.shell != self.login_shell {
                let shell = self.login_shell.to_string_lossy().into_owned();
                if run("usermod", &["--shell", &shell, "--", &e.name]).is_ok() {
                    fixed.push(e.name.clone());
                }
            }
        }
        fixed
    }

    fn account_of(&self, entry: &PasswdEntry, groups: Vec<u32>) -> Account {
        Account {
            name: entry.name.clone(),
            uid: entry.uid,
            gid: entry.gid,
            home: entry.home.clone(),
            // Sessions run the real shell; the passwd one is the recording shell.
            shell: self.config.shell.clone(),
            groups,
        }
    }

    fn save(&self) -> Result<(), AccountError> {
        let bytes = serde_json::to_vec_pretty(&self.state).map_err(std::io::Error::other)?;
        fsutil::write_atomic(&self.state_path, &bytes, 0o600)?;
        Ok(())
    }
}

fn day_string(unix_day: i64) -> String {
    let date = time::OffsetDateTime::UNIX_EPOCH + time::Duration::days(unix_day);
    format!(
        "{:04}-{:02}-{:02}",
        date.year(),
        date.month() as u8,
        date.day()
    )
}

/// Runs a shadow-utils tool with arguments (never through a shell). Retries while another
/// process holds the passwd lock.
fn run(tool: &'static str, args: &[&str]) -> Result<(), AccountError> {
    let mut last = String::new();
    for attempt in 0..20 {
        let out = Command::new(tool)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .map_err(|e| AccountError::Tool {
                tool,
                detail: e.to_string(),
            })?;
        if out.status.success() {
            return Ok(());
        }
        last = format!(
            "{}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let locked = last.contains("lock") || out.status.code() == Some(10);
        if !locked {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50 * (attempt + 1)));
    }
    Err(AccountError::Tool { tool, detail: last })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(is_valid_name("jit-alice"));
        assert!(is_valid_name("_svc"));
        for bad in [
            "",
            "-rf",
            "Alice",
            "a b",
            "a;b",
            "a/b",
            "é",
            "root\n",
            &"a".repeat(33),
        ] {
            assert!(!is_valid_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn expiry_day_format() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(20414), "2025-11-22");
    }
}
