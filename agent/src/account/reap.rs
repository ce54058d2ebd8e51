//! Making sure nothing of an account outlives it: processes and files in shared places.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// SIGKILLs every process whose real, effective, saved or filesystem UID is `uid`, until
/// none is left (a process may fork while we look). Gives up after about two seconds.
pub fn kill_uid_processes(uid: u32) -> usize {
    let mut killed = 0;
    for _ in 0..200 {
        let pids = processes_of(uid);
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            if nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            )
            .is_ok()
            {
                killed += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    killed
}

fn processes_of(uid: u32) -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else {
                return false;
            };
            // A zombie is already dead; it waits for its parent, not for a signal.
            if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
            {
                return false;
            }
            status
                .lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().skip(1).any(|f| f == uid.to_string()))
                .unwrap_or(false)
        })
        .collect()
}

/// Removes what `uid` left in the world-writable directories (sockets, temp files, shm).
pub fn remove_uid_files(uid: u32) -> usize {
    ["/tmp", "/var/tmp", "/dev/shm"]
        .iter()
        .map(|d| remove_owned(Path::new(d), uid, 0))
        .sum()
}

fn remove_owned(dir: &Path, uid: u32, depth: u32) -> usize {
    let Ok(dev) = std::fs::symlink_metadata(dir).map(|m| m.dev()) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.uid() == uid {
            let ok = if meta.is_dir() {
                std::fs::remove_dir_all(&path).is_ok()
            } else {
                std::fs::remove_file(&path).is_ok()
            };
            removed += ok as usize;
        } else if meta.is_dir() && depth < 4 {
            removed += remove_owned(&path, uid, depth + 1);
        }
    }
    removed
}
