//! Stage 2: ephemeral local accounts, made with the system's own tools.
//!
//! The agent only ever modifies or removes accounts it made: each is in its state file with
//! the UID it was given. An account inside the fence (the prefix and the UID range) that the
//! agent did not make is reported and left alone, and no grant opens it.
//!
//! UIDs are handed out in order through the range (a high-water mark in the state file), so
//! a UID comes back only after the range wrapped, and never while anything on the host still
//! belongs to it. Removing an account removes everything its processes could leave behind.

mod deny_lists;
mod passwd;
mod reap;
mod settings;
pub mod sshd;

pub use deny_lists::DenyLists;
pub use passwd::{lookup_group, PasswdEntry};
pub use reap::{kill_uid_processes, remove_leftovers, uids_in_use};
pub use settings::{AccountsConfig, AccountsConfigError};

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
    /// Supplementary group ids of the grant that opens this session; given to the
    /// session's process, never written to /etc/group.
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
    /// Where the search for the next UID starts: one past the last one handed out.
    #[serde(default)]
    next_uid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("{0:?} is not a name this agent manages")]
    NotManaged(String),
    #[error("an account named {0:?} exists on this host and was not made by usher")]
    NameTaken(String),
    #[error("no free UID in {0}..={1}")]
    RangeFull(u32, u32),
    #[error("group {0:?} does not exist on this host")]
    NoSuchGroup(String),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error("useradd succeeded but {0} is not in /etc/passwd")]
    MissingAfterUseradd(String),
    #[error("cannot list the account in the host's cron/at deny lists: {0}")]
    DenyList(std::io::Error),
    #[error("state file {}: {source}", path.display())]
    StateCorrupt {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("state file: {0}")]
    State(#[from] std::io::Error),
}

/// A shadow-utils tool (useradd, usermod, userdel, loginctl) that did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error("{tool} failed: {source}")]
    NotRun {
        tool: &'static str,
        source: std::io::Error,
    },
    #[error("{tool} failed: {status}: {stderr}")]
    Failed {
        tool: &'static str,
        status: std::process::ExitStatus,
        failure: ToolFailure,
        stderr: String,
    },
}

/// What a failed shadow-utils tool reported, by the exit codes useradd(8), usermod(8)
/// and userdel(8) share.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFailure {
    /// Another process held the passwd or group files' lock (exit 10, "cannot update the
    /// group file", or exit 1 with "cannot lock" in its message).
    Locked,
    /// Exit 4: the UID is taken.
    UidInUse,
    /// Exit 6: the user or a group does not exist.
    NoSuchUserOrGroup,
    /// Exit 8: the user is logged in (userdel, usermod).
    InUse,
    /// Exit 9: the name is taken (useradd, usermod).
    NameInUse,
    /// Exit 12: the home directory could not be created, moved or removed.
    HomeDirectory,
    Other,
}

impl ToolFailure {
    /// The tools say that a lock is held only in words for most of their lock files; the
    /// words are read here, once, and nowhere else.
    fn of(code: Option<i32>, stderr: &str) -> ToolFailure {
        match code {
            Some(10) => ToolFailure::Locked,
            _ if stderr.contains("lock") => ToolFailure::Locked,
            Some(4) => ToolFailure::UidInUse,
            Some(6) => ToolFailure::NoSuchUserOrGroup,
            Some(8) => ToolFailure::InUse,
            Some(9) => ToolFailure::NameInUse,
            Some(12) => ToolFailure::HomeDirectory,
            _ => ToolFailure::Other,
        }
    }
}

impl ToolError {
    pub fn failure(&self) -> Option<ToolFailure> {
        match self {
            ToolError::NotRun { .. } => None,
            ToolError::Failed { failure, .. } => Some(*failure),
        }
    }
}

pub struct Accounts {
    config: AccountsConfig,
    login_shell: PathBuf,
    state_path: PathBuf,
    state: StateFile,
    passwd_path: PathBuf,
    deny_lists: DenyLists,
}

impl Accounts {
    pub fn open(
        config: &AccountsConfig,
        login_shell: &Path,
        state_dir: &Path,
    ) -> Result<Accounts, AccountError> {
        let state_path = state_dir.join("accounts.json");
        let state = match std::fs::read(&state_path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|source| AccountError::StateCorrupt {
                path: state_path.clone(),
                source,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StateFile::default(),
            Err(e) => return Err(e.into()),
        };
        let mut accounts = Accounts {
            config: config.clone(),
            login_shell: login_shell.to_owned(),
            state_path,
            state,
            passwd_path: "/etc/passwd".into(),
            deny_lists: DenyLists::host(),
        };
        accounts.disown_adopted()?;
        Ok(accounts)
    }

    /// Earlier versions adopted any account in the fence that a live grant named, recording
    /// it with a creation time of 0; nothing says the agent made it. Such records are
    /// dropped, so the accounts are reported as not made by usher instead of being managed.
    fn disown_adopted(&mut self) -> Result<(), AccountError> {
        let adopted: Vec<String> = self
            .state
            .accounts
            .iter()
            .filter(|(_, r)| r.created_at == 0)
            .map(|(n, _)| n.clone())
            .collect();
        if adopted.is_empty() {
            return Ok(());
        }
        for name in &adopted {
            log::warn!(target: "usher::account", "{name} was adopted by an earlier version of usher, not made by it: no longer managed");
            self.state.accounts.remove(name);
        }
        self.save()
    }

    /// Whether `entry` is inside the fence: our prefix and our UID range.
    fn in_fence(&self, entry: &PasswdEntry) -> bool {
        entry.name.starts_with(&self.config.name_prefix)
            && (self.config.uid_min..=self.config.uid_max).contains(&entry.uid)
    }

    /// Whether this agent made `entry`: it is in the state file under that name with that
    /// UID (even if the fence was moved since). Only such accounts are ever modified or
    /// removed.
    fn made_here(&self, entry: &PasswdEntry) -> bool {
        self.state
            .accounts
            .get(&entry.name)
            .is_some_and(|r| r.uid == entry.uid)
    }

    /// The names of the accounts this agent made.
    pub fn names(&self) -> Vec<String> {
        self.state.accounts.keys().cloned().collect()
    }

    /// Accounts inside the fence that this agent did not make: reported, never touched.
    pub fn unmanaged(&self) -> Vec<PasswdEntry> {
        passwd::read(&self.passwd_path)
            .unwrap_or_default()
            .into_iter()
            .filter(|e| self.in_fence(e) && !self.made_here(e))
            .collect()
    }

    /// Why no grant may open `login`, if one may not: an account of that name exists and
    /// this agent did not make it.
    pub fn refusal(&self, login: &str) -> Option<AccountError> {
        let passwd = passwd::read(&self.passwd_path).ok()?;
        let entry = passwd.iter().find(|e| e.name == login)?;
        (!self.made_here(entry)).then(|| AccountError::NameTaken(login.into()))
    }

    /// The account for `login`, made now if it does not exist. `until` is the end of the
    /// latest live grant for it; the account's expiry date follows it. `groups` are the
    /// grant's supplementary groups, for its sessions only.
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
            if !self.made_here(entry) {
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
        // A name the state remembers but passwd lost (removed behind our back): what its
        // UID left goes before the name is used again.
        if self.state.accounts.contains_key(login) {
            self.forget_lost(login, &passwd)?;
        }
        let uid = self.allocate_uid(&passwd)?;
        // Listed before it exists: the schedulers read the lists only when a job is
        // submitted, so there must be no moment when the account could submit one.
        self.deny_lists.add(login).map_err(AccountError::DenyList)?;
        let home = self.config.home_base.join(login);
        let uid_s = uid.to_string();
        let day = day_string(expire_day);
        let home_s = home.to_string_lossy().into_owned();
        let shell_s = self.login_shell.to_string_lossy().into_owned();
        // No --groups: a grant's groups are given to its sessions' processes, so that no
        // membership in /etc/group outlives a grant or leaks to another grant's session.
        let args = [
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
            "--",
            login,
        ];
        if let Err(e) = run("useradd", &args) {
            let _ = self.deny_lists.remove(login);
            return Err(e.into());
        }
        self.state.accounts.insert(
            login.to_string(),
            AccountRecord {
                uid,
                created_at: now,
                expire_day,
            },
        );
        self.state.next_uid = Some(uid.wrapping_add(1));
        self.save()?;
        let passwd = passwd::read(&self.passwd_path)?;
        let entry = passwd
            .iter()
            .find(|e| e.name == login)
            .ok_or_else(|| AccountError::MissingAfterUseradd(login.to_string()))?;
        Ok((self.account_of(entry, group_ids), true))
    }

    /// The next UID after the high-water mark that no account has and nothing on the host
    /// still belongs to, wrapping round the range once.
    fn allocate_uid(&self, passwd: &[PasswdEntry]) -> Result<u32, AccountError> {
        let range = self.config.uid_min..=self.config.uid_max;
        let mut taken: BTreeSet<u32> = passwd
            .iter()
            .map(|e| e.uid)
            .chain(self.state.accounts.values().map(|r| r.uid))
            .collect();
        taken.extend(uids_in_use(range.clone()));
        let start = self.state.next_uid.unwrap_or(self.config.uid_min);
        next_free_uid(range, start, |u| taken.contains(&u)).ok_or(AccountError::RangeFull(
            self.config.uid_min,
            self.config.uid_max,
        ))
    }

    /// Kills every process of `login`, removes the account, its home, and everything it
    /// left in shared places: crontab, at jobs, IPC objects, message queues, mail, systemd
    /// lingering. Only accounts this agent made: returns false for any other name.
    pub fn remove(&mut self, login: &str) -> Result<bool, AccountError> {
        if !self.state.accounts.contains_key(login) {
            return Ok(false);
        }
        let passwd = passwd::read(&self.passwd_path)?;
        let Some(entry) = passwd.iter().find(|e| e.name == login) else {
            self.forget_lost(login, &passwd)?;
            return Ok(true);
        };
        if !self.made_here(entry) {
            // The name is someone else's now (our account was removed and another made):
            // theirs is not ours to touch; ours is forgotten.
            log::warn!(target: "usher::account", "{login} now has uid {} and was not made by usher; leaving it alone", entry.uid);
            self.forget_lost(login, &passwd)?;
            return Ok(false);
        }
        if systemd_runs() {
            // Ends the user's systemd instance and its units, and stops lingering.
            let _ = run("loginctl", &["terminate-user", "--", login]);
            let _ = run("loginctl", &["disable-linger", "--", login]);
        }
        kill_uid_processes(entry.uid);
        remove_leftovers(login, entry.uid);
        match run("userdel", &["--remove", "--", login]) {
            Ok(()) => {}
            // The home directory could not be removed (already gone): the account is.
            Err(e) if e.failure() == Some(ToolFailure::HomeDirectory) => {}
            Err(e) => return Err(e.into()),
        }
        if entry.home.starts_with(&self.config.home_base) && entry.home.exists() {
            let _ = std::fs::remove_dir_all(&entry.home);
        }
        if let Err(e) = self.deny_lists.remove(login) {
            log::warn!(target: "usher::account", "cannot take {login} out of the cron/at deny lists: {e}");
        }
        self.state.accounts.remove(login);
        self.save()?;
        Ok(true)
    }

    /// Forgets an account of ours that is gone from passwd, after removing what its UID
    /// left behind (unless the UID now belongs to another account).
    fn forget_lost(&mut self, login: &str, passwd: &[PasswdEntry]) -> Result<(), AccountError> {
        if let Some(record) = self.state.accounts.get(login) {
            let uid = record.uid;
            if !passwd.iter().any(|e| e.uid == uid) {
                kill_uid_processes(uid);
                remove_leftovers(login, uid);
            }
        }
        if let Err(e) = self.deny_lists.remove(login) {
            log::warn!(target: "usher::account", "cannot take {login} out of the cron/at deny lists: {e}");
        }
        self.state.accounts.remove(login);
        self.save()
    }

    /// The accounts this agent made whose name is not in `keep`; the caller removes them.
    /// Accounts it did not make are never among them, whatever their name and UID.
    pub fn orphans(&self, keep: &BTreeSet<String>) -> Vec<String> {
        self.state
            .accounts
            .keys()
            .filter(|n| !keep.contains(*n))
            .cloned()
            .collect()
    }

    /// The passwd entry of an account this agent made.
    pub fn lookup(&self, login: &str) -> Option<PasswdEntry> {
        passwd::read(&self.passwd_path)
            .ok()?
            .into_iter()
            .find(|e| e.name == login && self.made_here(e))
    }

    /// Sets the account's password hash (a console grant's one-time secret), or locks it.
    pub fn set_password(&self, login: &str, crypt_hash: Option<&str>) -> Result<(), AccountError> {
        let entry = self
            .lookup(login)
            .ok_or_else(|| AccountError::NotManaged(login.into()))?;
        let hash = crypt_hash.unwrap_or("!");
        run("usermod", &["--password", hash, "--", &entry.name])?;
        Ok(())
    }

    /// Puts back the recording shell of any account this agent made whose login shell was
    /// changed (`chsh`); returns the names it had to fix.
    pub fn restore_login_shells(&self) -> Vec<String> {
        let Ok(passwd) = passwd::read(&self.passwd_path) else {
            return Vec::new();
        };
        let mut fixed = Vec::new();
        for e in passwd.iter().filter(|e| self.made_here(e)) {
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

/// The first UID from `start` on (wrapping to the range's start once past its end) for
/// which `taken` is false. A `start` outside the range (the range was changed) starts over.
fn next_free_uid(
    range: std::ops::RangeInclusive<u32>,
    start: u32,
    taken: impl Fn(u32) -> bool,
) -> Option<u32> {
    let (min, max) = (*range.start(), *range.end());
    let start = if range.contains(&start) { start } else { min };
    (start..=max).chain(min..start).find(|u| !taken(*u))
}

/// Whether systemd is the init system (its runtime directory exists), so that logind
/// knows the accounts' users.
fn systemd_runs() -> bool {
    Path::new("/run/systemd/system").is_dir()
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
fn run(tool: &'static str, args: &[&str]) -> Result<(), ToolError> {
    let mut attempt = 0;
    loop {
        let out = Command::new(tool)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .map_err(|source| ToolError::NotRun { tool, source })?;
        if out.status.success() {
            return Ok(());
        }
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let failure = ToolFailure::of(out.status.code(), &stderr);
        attempt += 1;
        if failure != ToolFailure::Locked || attempt == 20 {
            return Err(ToolError::Failed {
                tool,
                status: out.status,
                failure,
                stderr,
            });
        }
        std::thread::sleep(std::time::Duration::from_millis(50 * attempt));
    }
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
    fn uids_are_handed_out_in_order_and_wrap() {
        let none = |_| false;
        assert_eq!(next_free_uid(100..=105, 100, none), Some(100));
        assert_eq!(next_free_uid(100..=105, 103, none), Some(103));
        // Past the end, or a range that changed: from the start.
        assert_eq!(next_free_uid(100..=105, 106, none), Some(100));
        assert_eq!(next_free_uid(100..=105, 7, none), Some(100));
        // Wraps round to what is free before the mark.
        assert_eq!(next_free_uid(100..=105, 104, |u| u >= 104), Some(100));
        assert_eq!(next_free_uid(100..=105, 102, |u| u != 101), Some(101));
        assert_eq!(next_free_uid(100..=105, 102, |_| true), None);
    }

    #[test]
    fn accounts_adopted_by_earlier_versions_are_no_longer_managed() {
        let dir = std::env::temp_dir().join(format!("usher-adopted-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("accounts.json"),
            r#"{"accounts": {"jit-made": {"uid": 61000, "created_at": 1700000000, "expire_day": 19000},
                             "jit-found": {"uid": 61001, "created_at": 0, "expire_day": 0}}}"#,
        )
        .unwrap();
        let accounts =
            Accounts::open(&AccountsConfig::default(), Path::new("/bin/sh"), &dir).unwrap();
        assert_eq!(accounts.names(), ["jit-made"]);
        // The state file was rewritten without it.
        let again = Accounts::open(&AccountsConfig::default(), Path::new("/bin/sh"), &dir).unwrap();
        assert_eq!(again.names(), ["jit-made"]);
        assert_eq!(again.state.next_uid, None);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tool_failures_are_classified_by_exit_code() {
        assert_eq!(
            ToolFailure::of(Some(12), "userdel: /home/jit-a not found"),
            ToolFailure::HomeDirectory
        );
        assert_eq!(
            ToolFailure::of(
                Some(8),
                "userdel: user jit-a is currently used by process 7"
            ),
            ToolFailure::InUse
        );
        assert_eq!(ToolFailure::of(Some(10), ""), ToolFailure::Locked);
        assert_eq!(
            ToolFailure::of(
                Some(1),
                "useradd: cannot lock /etc/passwd; try again later."
            ),
            ToolFailure::Locked
        );
        assert_eq!(
            ToolFailure::of(Some(9), "useradd: user 'jit-a' already exists"),
            ToolFailure::NameInUse
        );
        assert_eq!(ToolFailure::of(Some(4), ""), ToolFailure::UidInUse);
        assert_eq!(ToolFailure::of(Some(6), ""), ToolFailure::NoSuchUserOrGroup);
        assert_eq!(ToolFailure::of(None, "killed"), ToolFailure::Other);
    }

    #[test]
    fn a_missing_tool_is_not_run_and_says_which() {
        let e = run("usher-no-such-tool", &[]).unwrap_err();
        assert!(matches!(
            e,
            ToolError::NotRun {
                tool: "usher-no-such-tool",
                ..
            }
        ));
        assert_eq!(e.failure(), None);
    }

    #[test]
    fn a_corrupt_state_file_is_an_error_not_an_empty_state() {
        let dir = std::env::temp_dir().join(format!("usher-corrupt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("accounts.json"), "{").unwrap();
        assert!(matches!(
            Accounts::open(&AccountsConfig::default(), Path::new("/bin/sh"), &dir),
            Err(AccountError::StateCorrupt { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn expiry_day_format() {
        assert_eq!(day_string(0), "1970-01-01");
        assert_eq!(day_string(20414), "2025-11-22");
    }
}
