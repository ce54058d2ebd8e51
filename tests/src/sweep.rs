//! What a killed test run left (its agents still running, their accounts, session cgroups,
//! pinned programs and spool mounts) goes before this run makes its own. Only what carries
//! the harness's own names is touched: directories `/tmp/usher-test-p<pid>-<n>` whose test
//! process is gone, and accounts that have a test agent's name and UID but no living test
//! process that made them.

use crate::{
    passwd, remove_account, remove_what_an_agent_left, send_signal, TEST_DIR_PREFIX, TEST_UIDS,
};
use std::path::{Path, PathBuf};
use std::sync::Once;
use std::time::Duration;
use usher_test_support::wait_until;

/// Sweeps once per test process, before its first agent starts.
pub(crate) fn once() {
    static SWEPT: Once = Once::new();
    SWEPT.call_once(sweep);
}

fn sweep() {
    let (stale, living): (Vec<TestDir>, Vec<TestDir>) =
        test_dirs().into_iter().partition(|d| !d.owner_alive());
    for dir in &stale {
        kill_agents_of(&dir.path);
        match dir.fence() {
            Some((prefix, uids)) => remove_what_an_agent_left(&dir.path, &prefix, uids),
            // Killed before it wrote its config: nothing of its own can exist yet.
            None => {
                let _ = std::fs::remove_dir_all(&dir.path);
            }
        }
    }
    // Accounts whose directory is gone too (a reboot cleared /tmp): a test agent's name and
    // UID, and no living test process's fence around them.
    let living_prefixes: Vec<String> = living
        .iter()
        .filter_map(|d| d.fence().map(|(prefix, _)| prefix))
        .collect();
    for (name, uid) in passwd() {
        if TEST_UIDS.contains(&uid)
            && is_test_login(&name)
            && !living_prefixes.iter().any(|p| name.starts_with(p.as_str()))
        {
            remove_account(&name, uid);
        }
    }
}

/// A test agent's directory and the test process that made it.
struct TestDir {
    path: PathBuf,
    owner: Owner,
}

/// What a directory's name says of the test process that made it.
enum Owner {
    /// `usher-test-p<pid>-<n>`.
    Pid(u32),
    /// `usher-test-<pid modulo 10000>-<n>`, as earlier harnesses named it.
    Tag(u32),
}

impl TestDir {
    /// Whether the test process that made it may still run. In doubt, yes: nothing is swept.
    fn owner_alive(&self) -> bool {
        let alive =
            |pid: u32| pid == std::process::id() || Path::new(&format!("/proc/{pid}")).exists();
        match self.owner {
            Owner::Pid(pid) => alive(pid),
            // Only a part of the pid: alive while its agent runs, whoever started it.
            Owner::Tag(tag) => alive(tag) || !agents_of(&self.path).is_empty(),
        }
    }

    /// The account prefix and UIDs its config gave the agent.
    fn fence(&self) -> Option<(String, std::ops::RangeInclusive<u32>)> {
        let config = std::fs::read_to_string(self.path.join("usherd.toml")).ok()?;
        let value = |key: &str| {
            config.lines().find_map(|l| {
                let (k, v) = l.split_once('=')?;
                (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
            })
        };
        let prefix = value("name_prefix")?;
        let uids = value("uid_min")?.parse().ok()?..=value("uid_max")?.parse().ok()?;
        // Never wider than what the harness hands out, whatever the file says.
        (is_test_login(&prefix)
            && TEST_UIDS.contains(uids.start())
            && TEST_UIDS.contains(uids.end()))
        .then_some((prefix, uids))
    }
}

/// The test agents' directories: `/tmp/usher-test-<pid>-<n>`.
fn test_dirs() -> Vec<TestDir> {
    let Some((parent, stem)) = TEST_DIR_PREFIX.rsplit_once('/') else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (owner, n) = name.strip_prefix(stem)?.split_once('-')?;
            n.parse::<u32>().ok()?;
            let owner = match owner.strip_prefix('p') {
                Some(pid) => Owner::Pid(pid.parse().ok()?),
                None => Owner::Tag(owner.parse().ok()?),
            };
            Some(TestDir {
                path: e.path(),
                owner,
            })
        })
        .collect()
}

/// A name the harness gives its accounts: `t`, a letter of the run, the agent's letters,
/// `-`, then the test's name for the login. A person's name can look the same ("tom-x"):
/// only together with a test UID does it mark an account as the harness's.
fn is_test_login(name: &str) -> bool {
    let Some((head, _)) = name.split_once('-') else {
        return false;
    };
    head.len() >= 3 && head.starts_with('t') && head.bytes().all(|b| b.is_ascii_lowercase())
}

/// Kills the `usherd` started with `dir`'s config (a killed test does not take its agent
/// with it), so it makes no more accounts while they are removed.
fn kill_agents_of(dir: &Path) {
    for pid in agents_of(dir) {
        send_signal(pid, nix::sys::signal::Signal::SIGKILL);
    }
    // Gone, not dying: a dying agent still holds its spool's mount.
    let _ = wait_until(
        "the killed agents to be gone",
        Duration::from_secs(5),
        || agents_of(dir).is_empty(),
    );
}

/// The processes started with `dir`'s config as an argument (`usherd --config ...`).
fn agents_of(dir: &Path) -> Vec<i32> {
    let config = dir.join("usherd.toml");
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .split(|b| *b == 0)
                .any(|arg| arg == config.as_os_str().as_encoded_bytes())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_harness_names_are_test_logins() {
        assert!(is_test_login("tab-alice"));
        assert!(is_test_login("tqbaa-offline"));
        assert!(!is_test_login("ta-x"));
        assert!(!is_test_login("root"));
        assert!(!is_test_login("Tab-x"));
        assert!(!is_test_login("t1b-x"));
    }
}
