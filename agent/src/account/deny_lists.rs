//! The host's own job schedulers are told not to serve the agent's accounts: each account is
//! in /etc/cron.deny and /etc/at.deny for as long as it exists.
//!
//! Debian's `crontab` and `at` read these lists when a job is submitted; `cron` and `atd`
//! do not read them when a job runs (measured with the real daemons: a job submitted before
//! the name was listed still ran). So a name is listed before its account is made, and the
//! account's jobs are removed with it (see `reap`).
//!
//! The rules both tools apply: when the allow list exists, only names in it may submit (our
//! names never are); otherwise names in the deny list may not. With neither file, Debian's
//! cron lets everyone submit, and `at` only root. So the cron deny list is made when neither
//! file exists, the at deny list never is (making it would open `at` to every user).

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

pub struct DenyList {
    deny: PathBuf,
    allow: PathBuf,
    /// Whether an absent deny list (with no allow list) means "everyone may".
    absent_means_everyone: bool,
}

/// The deny lists of the host's schedulers, and the lock that serialises their editing
/// between agents (and between the threads of one).
pub struct DenyLists {
    lists: Vec<DenyList>,
    lock_path: PathBuf,
}

impl DenyLists {
    /// cron and at, in `etc` (the host's /etc).
    pub fn in_dir(etc: &Path, lock_path: &Path) -> DenyLists {
        DenyLists {
            lists: vec![
                DenyList {
                    deny: etc.join("cron.deny"),
                    allow: etc.join("cron.allow"),
                    absent_means_everyone: true,
                },
                DenyList {
                    deny: etc.join("at.deny"),
                    allow: etc.join("at.allow"),
                    absent_means_everyone: false,
                },
            ],
            lock_path: lock_path.to_owned(),
        }
    }

    pub fn host() -> DenyLists {
        Self::in_dir(Path::new("/etc"), Path::new("/run/usher-deny-lists.lock"))
    }

    /// Lists `name` in every deny list that decides for it.
    pub fn add(&self, name: &str) -> std::io::Result<()> {
        let _lock = self.lock()?;
        for list in &self.lists {
            let exists = list.deny.exists();
            let needed = exists || (list.absent_means_everyone && !list.allow.exists());
            if needed {
                edit(&list.deny, |names| {
                    if !names.iter().any(|n| n == name) {
                        names.push(name.to_string());
                    }
                })?;
            }
        }
        Ok(())
    }

    /// Takes `name` out of every deny list (once its account is gone).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        let _lock = self.lock()?;
        for list in &self.lists {
            if list.deny.exists() {
                edit(&list.deny, |names| names.retain(|n| n != name))?;
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::io::Result<nix::fcntl::Flock<std::fs::File>> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&self.lock_path)?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
    }
}

/// Rewrites the list at `path` through `change`, keeping every other line as it was and the
/// file's owner and mode (at.deny is root:daemon 0640 so that the setuid `at` can read it).
/// The new file replaces the old in one rename, so a reader never sees half of it.
fn edit(path: &Path, change: impl FnOnce(&mut Vec<String>)) -> std::io::Result<()> {
    let (old, meta) = match std::fs::read_to_string(path) {
        Ok(text) => (text, Some(std::fs::metadata(path)?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (String::new(), None),
        Err(e) => return Err(e),
    };
    let mut lines: Vec<String> = old.lines().map(str::to_string).collect();
    let before = lines.clone();
    change(&mut lines);
    if lines == before && meta.is_some() {
        return Ok(());
    }
    let mode = meta.as_ref().map(|m| m.mode() & 0o7777).unwrap_or(0o644);
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.usher-new"));
    let _ = std::fs::remove_file(&tmp);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create_new(true)
            .write(true)
            .mode(mode)
            .open(&tmp)?;
        if let Some(m) = &meta {
            std::os::unix::fs::fchown(&f, Some(m.uid()), Some(m.gid()))?;
        }
        // The mode given at creation passed through the umask.
        f.set_permissions(std::os::unix::fs::PermissionsExt::from_mode(mode))?;
        let mut text = lines.join("\n");
        if !text.is_empty() {
            text.push('\n');
        }
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("usher-deny-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn cron_list_is_made_when_absent_at_list_is_not() {
        let dir = scratch("absent");
        let lists = DenyLists::in_dir(&dir, &dir.join("lock"));
        lists.add("jit-a").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("cron.deny")).unwrap(),
            "jit-a\n"
        );
        assert!(!dir.join("at.deny").exists(), "no at.deny means root only");
        lists.remove("jit-a").unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("cron.deny")).unwrap(), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn existing_lists_keep_their_lines_and_mode() {
        let dir = scratch("existing");
        std::fs::write(dir.join("at.deny"), "daemon\n# comment\nnobody").unwrap();
        std::fs::set_permissions(dir.join("at.deny"), std::fs::Permissions::from_mode(0o640))
            .unwrap();
        std::fs::write(dir.join("cron.allow"), "root\n").unwrap();
        let lists = DenyLists::in_dir(&dir, &dir.join("lock"));
        lists.add("jit-a").unwrap();
        lists.add("jit-a").unwrap();
        lists.add("jit-b").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("at.deny")).unwrap(),
            "daemon\n# comment\nnobody\njit-a\njit-b\n"
        );
        assert_eq!(
            std::fs::metadata(dir.join("at.deny")).unwrap().mode() & 0o777,
            0o640
        );
        assert!(
            !dir.join("cron.deny").exists(),
            "cron.allow already excludes the account"
        );
        lists.remove("jit-a").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.join("at.deny")).unwrap(),
            "daemon\n# comment\nnobody\njit-b\n"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
