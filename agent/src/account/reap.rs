//! Making sure nothing of an account outlives it: processes, scheduled jobs, SysV and POSIX
//! IPC objects, mail, and files in the places every user may write. The same places answer
//! whether a UID still owns anything on the host, so that it is not handed out again.

use crate::system::ipc::{self, IpcKind};
use std::collections::BTreeSet;
use std::fs::Metadata;
use std::ops::RangeInclusive;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

/// Where POSIX message queues appear as files (the IPC namespace's mqueue filesystem).
pub const MQUEUE_DIR: &str = "/dev/mqueue";

/// Shared places where a user leaves things that outlive its processes: temporary files and
/// sockets, shared memory, crontabs and at jobs (Debian keeps both under /var/spool/cron,
/// Red Hat at jobs under /var/spool/at), mail spools, message queues.
const SHARED_DIRS: &[&str] = &[
    "/tmp",
    "/var/tmp",
    "/dev/shm",
    "/var/spool/cron",
    "/var/spool/at",
    "/var/mail",
    "/var/spool/mail",
    MQUEUE_DIR,
];

/// How deep below a shared directory owned files are looked for.
const MAX_DEPTH: u32 = 4;

/// Files that belong to an account by their name, whoever owns them: its crontab (Debian,
/// then cronie's layout), its mail spool, and systemd's lingering flag.
fn named_files(login: &str) -> [String; 5] {
    [
        format!("/var/spool/cron/crontabs/{login}"),
        format!("/var/spool/cron/{login}"),
        format!("/var/mail/{login}"),
        format!("/var/spool/mail/{login}"),
        format!("/var/lib/systemd/linger/{login}"),
    ]
}

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

/// The four UIDs (real, effective, saved, filesystem) of every live process, by pid.
fn process_uids() -> Vec<(i32, [u32; 4])> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter_map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            // A zombie is already dead; it waits for its parent, not for a signal.
            if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
            {
                return None;
            }
            let line = status.lines().find(|l| l.starts_with("Uid:"))?;
            let mut uids = [0u32; 4];
            let mut fields = line.split_whitespace().skip(1);
            for u in uids.iter_mut() {
                *u = fields.next()?.parse().ok()?;
            }
            Some((pid, uids))
        })
        .collect()
}

fn processes_of(uid: u32) -> Vec<i32> {
    process_uids()
        .into_iter()
        .filter(|(_, uids)| uids.contains(&uid))
        .map(|(pid, _)| pid)
        .collect()
}

/// Removes everything of `login` (UID `uid`) that its processes could leave behind: files
/// it owns in the shared places, its crontab, at jobs, mail spool and lingering flag, and
/// its SysV IPC objects and message queues. The processes must be dead already, or they
/// could make more. Returns how many things were removed.
pub fn remove_leftovers(login: &str, uid: u32) -> usize {
    if let Err(e) = ensure_mqueue_mounted() {
        log::warn!(target: "usher::account", "cannot mount {MQUEUE_DIR} to look for message queues: {e}");
    }
    let mut removed = 0;
    for path in named_files(login) {
        let path = Path::new(&path);
        if std::fs::symlink_metadata(path).is_ok() && remove_path(path) {
            removed += 1;
        }
    }
    for dir in shared_dirs() {
        visit_owned(&dir, uid..=uid, 0, &mut |path, _| {
            removed += remove_path(path) as usize;
        });
    }
    removed + remove_ipc_objects(uid)
}

/// UIDs in `range` that anything on the host still belongs to: a process, a file in the
/// shared places, a SysV IPC object.
pub fn uids_in_use(range: RangeInclusive<u32>) -> BTreeSet<u32> {
    let _ = ensure_mqueue_mounted();
    let mut used: BTreeSet<u32> = process_uids()
        .into_iter()
        .flat_map(|(_, uids)| uids)
        .filter(|u| range.contains(u))
        .collect();
    for dir in shared_dirs() {
        visit_owned(&dir, range.clone(), 0, &mut |_, meta| {
            used.insert(meta.uid());
        });
    }
    used.extend(
        IPC_KINDS
            .iter()
            .flat_map(|k| ipc_objects(k.proc_file))
            .flat_map(|o| [o.uid, o.creator_uid])
            .filter(|u| range.contains(u)),
    );
    used
}

/// The shared directories that exist, each once (/var/spool/mail is often a link to
/// /var/mail).
fn shared_dirs() -> Vec<std::path::PathBuf> {
    let mut seen = BTreeSet::new();
    SHARED_DIRS
        .iter()
        .filter_map(|d| std::fs::canonicalize(d).ok())
        .filter(|d| seen.insert(d.clone()))
        .collect()
}

/// Calls `found` for every entry below `dir` owned by a UID in `uids`, without crossing
/// into another filesystem and without descending into what it reports.
fn visit_owned(
    dir: &Path,
    uids: RangeInclusive<u32>,
    depth: u32,
    found: &mut dyn FnMut(&Path, &Metadata),
) {
    let Ok(dev) = std::fs::symlink_metadata(dir).map(|m| m.dev()) else {
        return;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if uids.contains(&meta.uid()) {
            found(&path, &meta);
        } else if meta.is_dir() && depth < MAX_DEPTH {
            visit_owned(&path, uids.clone(), depth + 1, found);
        }
    }
}

fn remove_path(path: &Path) -> bool {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(path).is_ok(),
        Ok(_) => std::fs::remove_file(path).is_ok(),
        Err(_) => false,
    }
}

/// Mounts the mqueue filesystem on /dev/mqueue when nothing is mounted there, so that
/// message queues can be listed and unlinked like files. Under systemd the agent runs in
/// its own mount namespace and the mount stays there.
pub fn ensure_mqueue_mounted() -> std::io::Result<()> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mounted = mountinfo.lines().any(|l| {
        let mount_point = l.split_whitespace().nth(4);
        let fs_type = l
            .split(" - ")
            .nth(1)
            .and_then(|r| r.split_whitespace().next());
        mount_point == Some(MQUEUE_DIR) && fs_type == Some("mqueue")
    });
    if mounted {
        return Ok(());
    }
    std::fs::create_dir_all(MQUEUE_DIR)?;
    use nix::mount::MsFlags;
    nix::mount::mount(
        Some("mqueue"),
        MQUEUE_DIR,
        Some("mqueue"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(std::io::Error::from)
}

struct IpcTable {
    kind: IpcKind,
    proc_file: &'static str,
}

const IPC_KINDS: [IpcTable; 3] = [
    IpcTable {
        kind: IpcKind::SharedMemory,
        proc_file: "/proc/sysvipc/shm",
    },
    IpcTable {
        kind: IpcKind::MessageQueue,
        proc_file: "/proc/sysvipc/msg",
    },
    IpcTable {
        kind: IpcKind::Semaphores,
        proc_file: "/proc/sysvipc/sem",
    },
];

#[derive(Debug, PartialEq, Eq)]
struct IpcObject {
    id: i32,
    uid: u32,
    creator_uid: u32,
}

fn ipc_objects(proc_file: &str) -> Vec<IpcObject> {
    std::fs::read_to_string(proc_file)
        .map(|t| parse_sysvipc(&t))
        .unwrap_or_default()
}

/// The kernel's table of SysV IPC objects: a header naming the columns, then one object
/// per line. The id column is the second (`shmid`, `msqid`, `semid`).
fn parse_sysvipc(text: &str) -> Vec<IpcObject> {
    let mut lines = text.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let columns: Vec<&str> = header.split_whitespace().collect();
    let (Some(uid_col), Some(cuid_col)) = (
        columns.iter().position(|c| *c == "uid"),
        columns.iter().position(|c| *c == "cuid"),
    ) else {
        return Vec::new();
    };
    lines
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some(IpcObject {
                id: f.get(1)?.parse().ok()?,
                uid: f.get(uid_col)?.parse().ok()?,
                creator_uid: f.get(cuid_col)?.parse().ok()?,
            })
        })
        .collect()
}

/// Removes the SysV shared memory segments, message queues and semaphore sets that `uid`
/// owns or created. A segment still attached somewhere goes once its last user detaches.
fn remove_ipc_objects(uid: u32) -> usize {
    let mut removed = 0;
    for table in &IPC_KINDS {
        for obj in ipc_objects(table.proc_file) {
            if obj.uid == uid || obj.creator_uid == uid {
                match ipc::remove(table.kind, obj.id) {
                    Ok(()) => removed += 1,
                    Err(e) => {
                        log::warn!(target: "usher::account", "cannot remove {:?} {} of uid {uid}: {e}", table.kind, obj.id)
                    }
                }
            }
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sysvipc_tables_are_read_by_their_header() {
        let shm = "       key      shmid perms                  size  cpid  lpid nattch   uid   gid  cuid  cgid      atime      dtime      ctime                   rss                  swap\n\
                            0         12  1600                  4096  3330  3330      0 61001 61001 61001 61001          0          0 1700000000                     0                     0\n";
        assert_eq!(
            parse_sysvipc(shm),
            vec![IpcObject {
                id: 12,
                uid: 61001,
                creator_uid: 61001
            }]
        );
        let sem = "       key      semid perms      nsems   uid   gid  cuid  cgid      otime      ctime\n\
                   1234567          3   600          1     0     0 61002 61002          0 1700000000\n";
        assert_eq!(
            parse_sysvipc(sem),
            vec![IpcObject {
                id: 3,
                uid: 0,
                creator_uid: 61002
            }]
        );
        assert!(parse_sysvipc("").is_empty());
        assert!(parse_sysvipc("garbage\n1 2 3\n").is_empty());
    }
}
