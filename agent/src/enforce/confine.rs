//! What the exec policy needs outside the kernel programs: an exec is checked, but code can
//! also run without one (`LD_PRELOAD`, `dlopen`, `bash enable -f` map a library the user
//! wrote). For sessions whose profile allows or denies, the session gets its own mount
//! namespace in which every place its user can write is `noexec` (the kernel then refuses
//! executable mappings of files there, as it refuses execs), and for allow lists the
//! loader's variables are not passed on.
//!
//! The plan is made in the agent (it reads the mount table and the file system); the
//! child enters it between fork and exec with system calls only (`system::mount`).

use super::ExecMode;
use crate::system::mount::NoexecMounts;
use std::collections::BTreeSet;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// The variables the dynamic loader (and glibc's code loaders: iconv modules, locales)
/// honour to load or inspect code: glibc ignores them for set-uid programs (its
/// `unsecvars.h`), and an allow-list session gets the same treatment everywhere.
const LOADER_VARIABLES: &[&str] = &[
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "LOCPATH",
    "MALLOC_TRACE",
    "NLSPATH",
];

/// Whether the loader reads `name` (every `LD_*`, and the glibc ones above).
pub fn is_loader_variable(name: &str) -> bool {
    name.starts_with("LD_") || LOADER_VARIABLES.contains(&name)
}

/// Drops the loader's variables from a session's environment, for allow-list profiles.
pub fn strip_loader_env(mode: ExecMode, env: &mut Vec<(String, String)>) {
    if mode == ExecMode::Allow {
        env.retain(|(k, _)| !is_loader_variable(k));
    }
}

/// Places users commonly can write to; those that exist and are writable by the session's
/// user join the plan.
const KNOWN_WRITABLE: &[&str] = &[
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/dev/mqueue",
    "/run/lock",
    "/var/lock",
    "/var/crash",
    "/var/mail",
];

/// File systems that hold no files a user could write and map (or that must keep their
/// own flags, such as device nodes): their mounts are left alone.
const PSEUDO_FS: &[&str] = &[
    "proc",
    "sysfs",
    "cgroup",
    "cgroup2",
    "devpts",
    "debugfs",
    "tracefs",
    "securityfs",
    "bpf",
    "pstore",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "efivarfs",
    "autofs",
    "rpc_pipefs",
    "nsfs",
    "selinuxfs",
];

/// Directories of the root file system searched for places the user can write (up to
/// `SCAN_DEPTH` levels), beyond the known ones. The system's own code lives elsewhere.
const SCAN_ROOTS: &[&str] = &["/var", "/run", "/srv", "/opt", "/mnt", "/media", "/home"];
const SCAN_DEPTH: usize = 3;
const SCAN_MAX_ENTRIES: usize = 20_000;

/// Who the session runs as, to decide what it can write.
pub struct SessionUser<'a> {
    pub uid: u32,
    pub gids: &'a [u32],
    pub home: &'a Path,
}

/// The mount set-up of one confined session, prepared before the fork.
pub struct NoexecPlan {
    /// Each place bound onto itself and remounted noexec, parents first.
    mounts: NoexecMounts,
}

impl NoexecPlan {
    /// The plan for a session under `mode`; `None` for audit profiles (nothing is
    /// enforced, nothing is confined).
    pub fn for_session(mode: ExecMode, user: &SessionUser<'_>) -> io::Result<Option<NoexecPlan>> {
        if mode == ExecMode::Audit {
            return Ok(None);
        }
        let mut places: BTreeSet<PathBuf> = BTreeSet::new();
        // The home is the user's own, whatever its mode says.
        if user.home.is_dir() {
            places.insert(user.home.canonicalize()?);
        }
        let run_user = PathBuf::from(format!("/run/user/{}", user.uid));
        for p in KNOWN_WRITABLE
            .iter()
            .map(PathBuf::from)
            .chain(std::iter::once(run_user))
        {
            if let Ok(real) = p.canonicalize() {
                if writable_by(&real, user) {
                    places.insert(real);
                }
            }
        }
        for mount in writable_mounts()? {
            if mount_is_writable_by(&mount, user) {
                places.insert(mount);
            }
        }
        let mut scanned = 0;
        for root in SCAN_ROOTS {
            scan(Path::new(root), SCAN_DEPTH, user, &mut places, &mut scanned);
        }
        // Parents before children: a child's bind is made inside its parent's copy.
        let mut ordered: Vec<PathBuf> = places.into_iter().collect();
        ordered.sort_by_key(|p| p.components().count());
        let mounts = NoexecMounts::new(&ordered)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        Ok(Some(NoexecPlan { mounts }))
    }

    /// The places made noexec, for the journal and the tests.
    pub fn places(&self) -> impl Iterator<Item = &Path> {
        self.mounts.places()
    }

    /// What the session's child enters between fork and exec.
    pub fn into_mounts(self) -> NoexecMounts {
        self.mounts
    }
}

/// Mount points of read-write mounts of real file systems, but the root.
fn writable_mounts() -> io::Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")?;
    Ok(text.lines().filter_map(parse_writable_mount).collect())
}

/// One line of mountinfo: `id parent maj:min root mountpoint options [optional...] - fstype
/// source superoptions`. The mount point if the mount is read-write, not the root, and not a
/// pseudo file system.
fn parse_writable_mount(line: &str) -> Option<PathBuf> {
    let (left, right) = line.split_once(" - ")?;
    let fields: Vec<&str> = left.split(' ').collect();
    let mount_point = unescape_mountinfo(fields.get(4)?);
    let options = fields.get(5)?;
    let fstype = right.split(' ').next()?;
    let read_only = options.split(',').any(|o| o == "ro");
    if read_only || mount_point == Path::new("/") || PSEUDO_FS.contains(&fstype) {
        return None;
    }
    Some(mount_point)
}

/// mountinfo escapes space, tab, newline and backslash as octal (`\040`).
fn unescape_mountinfo(s: &str) -> PathBuf {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + (c - b'0') as u32));
        match octal {
            Some(v) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    PathBuf::from(std::ffi::OsStr::from_bytes(&out))
}

/// Whether the user can create files in `dir` (mode bits; the session has no capabilities).
fn writable_by(dir: &Path, user: &SessionUser<'_>) -> bool {
    let Ok(m) = std::fs::metadata(dir) else {
        return false;
    };
    if !m.is_dir() {
        return false;
    }
    let mode = m.mode();
    (m.uid() == user.uid && mode & 0o200 != 0)
        || (user.gids.contains(&m.gid()) && mode & 0o020 != 0)
        || mode & 0o002 != 0
}

/// A mount counts as the user's to write when its root, or a directory directly in it, is.
fn mount_is_writable_by(mount: &Path, user: &SessionUser<'_>) -> bool {
    if writable_by(mount, user) {
        return true;
    }
    let Ok(entries) = std::fs::read_dir(mount) else {
        return false;
    };
    entries
        .flatten()
        .take(SCAN_MAX_ENTRIES)
        .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
        .any(|e| writable_by(&e.path(), user))
}

/// Directories under `dir` (not following symlinks) the user can write; a writable one is
/// taken whole and not searched further.
fn scan(
    dir: &Path,
    depth: usize,
    user: &SessionUser<'_>,
    found: &mut BTreeSet<PathBuf>,
    scanned: &mut usize,
) {
    let Ok(meta) = std::fs::symlink_metadata(dir) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    if writable_by(dir, user) {
        found.insert(dir.to_path_buf());
        return;
    }
    if depth == 0 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        *scanned += 1;
        if *scanned > SCAN_MAX_ENTRIES {
            return;
        }
        if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            scan(&entry.path(), depth - 1, user, found, scanned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_lines_name_writable_real_mounts_only() {
        let tmp = "36 25 0:32 / /tmp rw,nosuid,nodev shared:15 - tmpfs tmpfs rw";
        assert_eq!(parse_writable_mount(tmp), Some(PathBuf::from("/tmp")));
        let ro = "40 25 8:2 / /usr ro,relatime shared:2 - ext4 /dev/sda2 ro";
        assert_eq!(parse_writable_mount(ro), None);
        let root = "25 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw";
        assert_eq!(parse_writable_mount(root), None);
        let proc_ = "22 25 0:5 / /proc rw,nosuid shared:12 - proc proc rw";
        assert_eq!(parse_writable_mount(proc_), None);
        let spaced = r"50 25 0:40 / /mnt/my\040disk rw - ext4 /dev/sdb1 rw";
        assert_eq!(
            parse_writable_mount(spaced),
            Some(PathBuf::from("/mnt/my disk"))
        );
        assert_eq!(parse_writable_mount("garbage"), None);
    }

    #[test]
    fn loader_variables_are_stripped_for_allow_lists_only() {
        let env = vec![
            ("LD_PRELOAD".to_string(), "/tmp/x.so".to_string()),
            ("LD_AUDIT".to_string(), "/tmp/x.so".to_string()),
            ("GCONV_PATH".to_string(), "/tmp".to_string()),
            ("PATH".to_string(), "/usr/bin".to_string()),
        ];
        let mut allow = env.clone();
        strip_loader_env(ExecMode::Allow, &mut allow);
        assert_eq!(allow, vec![("PATH".to_string(), "/usr/bin".to_string())]);
        let mut deny = env.clone();
        strip_loader_env(ExecMode::Deny, &mut deny);
        assert_eq!(deny, env);
    }
}
