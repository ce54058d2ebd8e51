//! What the agent reads about a process that waits in the kernel: its cgroup, and the
//! command line of the exec it waits in.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::OnceLock;

/// The v2 cgroup directory process `pid` is in.
pub fn cgroup_dir_of(pid: i32) -> Option<PathBuf> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    let mount = MOUNT
        .get_or_init(|| crate::session::cgroup::v2_mount().ok())
        .as_ref()?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let path = text.lines().find_map(|l| l.strip_prefix("0::"))?;
    Some(mount.join(path.trim_start_matches('/')))
}

/// The id (inode) of the cgroup process `pid` is in: what `bpf_get_current_cgroup_id`
/// and `Cgroup::id` say.
pub fn cgroup_id_of(pid: i32) -> Option<u64> {
    Some(std::fs::metadata(cgroup_dir_of(pid)?).ok()?.ino())
}

/// Whether process `pid` has exited (gone, or a zombie nobody reaped yet).
pub fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name's closing parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state == "Z" || state == "X"),
        Err(_) => true,
    }
}

const SYS_EXECVE: u64 = 59;
const SYS_EXECVEAT: u64 = 322;
/// Arguments read at most, and bytes of each.
const MAX_ARGS: usize = 64;
const MAX_ARG_BYTES: usize = 1024;

/// The arguments of the `execve` process `pid` is blocked in, read from the process
/// itself: its old image is still mapped while the kernel holds the exec, so the argv
/// pointers the syscall got (/proc/PID/syscall) still point at the strings. Only on
/// x86_64 (the syscall numbers); `None` when the process is not in an exec.
pub fn exec_command_line(pid: i32) -> Option<String> {
    if !cfg!(target_arch = "x86_64") {
        return None;
    }
    // Any thread of the process may be the one in execve.
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    for task in tasks.flatten() {
        let Ok(syscall) = std::fs::read_to_string(task.path().join("syscall")) else {
            continue;
        };
        let fields: Vec<u64> = syscall
            .split_whitespace()
            .map(|f| {
                f.strip_prefix("0x")
                    .map(|h| u64::from_str_radix(h, 16).unwrap_or(0))
                    .unwrap_or_else(|| f.parse().unwrap_or(u64::MAX))
            })
            .collect();
        let argv = match fields.first() {
            Some(&SYS_EXECVE) => fields.get(2),
            Some(&SYS_EXECVEAT) => fields.get(3),
            _ => None,
        };
        if let Some(&argv) = argv {
            return read_argv(pid, argv);
        }
    }
    None
}

fn read_argv(pid: i32, argv: u64) -> Option<String> {
    use std::os::unix::fs::FileExt;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok()?;
    let mut args = Vec::new();
    for i in 0..MAX_ARGS as u64 {
        let mut ptr = [0u8; 8];
        mem.read_exact_at(&mut ptr, argv + i * 8).ok()?;
        let ptr = u64::from_ne_bytes(ptr);
        if ptr == 0 {
            break;
        }
        let mut buf = vec![0u8; MAX_ARG_BYTES];
        // A string near the end of a mapping reads short: take what there is.
        let n = mem.read_at(&mut buf, ptr).ok()?;
        buf.truncate(n);
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        args.push(String::from_utf8_lossy(&buf[..end]).into_owned());
    }
    Some(args.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_in_a_cgroup_and_alive() {
        let pid = std::process::id() as i32;
        if cgroup_dir_of(pid).is_some() {
            assert!(cgroup_id_of(pid).is_some());
        }
        assert!(!is_gone(pid));
        assert!(is_gone(i32::MAX));
    }
}
