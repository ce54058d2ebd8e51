//! One cgroup v2 directory per session: the session's identity in the kernel and the
//! handle that kills all of it at once.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The cgroup v2 mount point, read from /proc/self/mountinfo (hybrid hosts mount it at
/// /sys/fs/cgroup/unified, pure v2 hosts at /sys/fs/cgroup).
pub fn v2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_mountinfo(&info)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted"))
}

fn parse_mountinfo(info: &str) -> Option<PathBuf> {
    info.lines().find_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        if right.split_whitespace().next()? != "cgroup2" {
            return None;
        }
        let mount_point = left.split_whitespace().nth(4)?;
        Some(PathBuf::from(unescape_octal(mount_point)))
    })
}

/// mountinfo escapes space, tab, newline and backslash as \ooo.
fn unescape_octal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let v = (bytes[i + 1] - b'0') * 64 + (bytes[i + 2] - b'0') * 8 + (bytes[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory under which this agent makes session cgroups: beside the agent's own
/// cgroup (under systemd, inside the unit's delegated subtree).
pub fn sessions_root() -> io::Result<PathBuf> {
    let mount = v2_mount()?;
    let own = std::fs::read_to_string("/proc/self/cgroup")?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .unwrap_or("/")
        .trim_start_matches('/')
        .to_string();
    // Under systemd the agent's own cgroup holds the agent; sessions go in a child of it.
    let root = mount.join(rel).join("usher-sessions");
    std::fs::create_dir_all(&root)?;
    Ok(root)
}

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
}

impl Cgroup {
    pub fn create(root: &Path, name: &str) -> io::Result<Cgroup> {
        let path = root.join(name);
        std::fs::create_dir(&path)?;
        Self::open(&path)
    }

    pub fn open(path: &Path) -> io::Result<Cgroup> {
        let id = std::fs::metadata(path)?.ino();
        Ok(Cgroup {
            path: path.to_owned(),
            id,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The id BPF sees (`bpf_get_current_cgroup_id`): the directory's inode number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// An open `cgroup.procs`, for a child to move itself in before it execs.
    pub fn procs_file(&self) -> io::Result<std::fs::File> {
        std::fs::OpenOptions::new()
            .write(true)
            .open(self.path.join("cgroup.procs"))
    }

    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.path.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    pub fn is_populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process in the cgroup (and below), waits for it to empty and removes it.
    pub fn kill_and_remove(&self) -> io::Result<()> {
        if !self.path.exists() {
            return Ok(());
        }
        for _ in 0..300 {
            if !self.is_populated() {
                break;
            }
            // cgroup.kill (Linux 5.14) is atomic against forks; fall back to signalling
            // each pid on older kernels.
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                for pid in self.pids() {
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::remove_dir(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let info = "24 30 0:22 / /sys rw - sysfs sysfs rw\n\
                    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        assert_eq!(parse_mountinfo(info), Some("/sys/fs/cgroup/unified".into()));
        let info = "41 31 0:38 / /my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(parse_mountinfo(info), Some("/my cg".into()));
        assert_eq!(parse_mountinfo("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }
}
