//! The kernel's hold on an exec: one fanotify group with `FAN_OPEN_EXEC_PERM` marks on the
//! approval-class files and directories of the live sessions. An exec of a marked file
//! waits in the kernel until usherd answers; a process outside the sessions that hold it
//! is let go at once, from the reading thread itself.

use super::proc_info;
use super::Approvals;
use crate::enforce::policy::{file_key, kernel_dev};
use nix::sys::fanotify::{
    EventFFlags, Fanotify, FanotifyEvent, FanotifyResponse, InitFlags, MarkFlags, MaskFlags,
    Response,
};
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use usher_ebpf_common::FileKey;

/// How often a waiting process is looked at (Ctrl-C kills it in its wait).
const WATCH_PROCESS: Duration = Duration::from_millis(100);

pub struct ExecHold {
    fan: Arc<Fanotify>,
    /// Marked path -> the sessions (cgroup ids) that need the mark.
    marks: Mutex<HashMap<PathBuf, (bool, HashSet<u64>)>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl ExecHold {
    pub fn start(approvals: Weak<Approvals>) -> Result<Arc<ExecHold>, String> {
        let fan = Fanotify::init(
            InitFlags::FAN_CLASS_CONTENT | InitFlags::FAN_CLOEXEC | InitFlags::FAN_UNLIMITED_QUEUE,
            EventFFlags::O_RDONLY | EventFFlags::O_CLOEXEC | EventFFlags::O_LARGEFILE,
        )
        .map_err(|e| format!("fanotify_init: {e}"))?;
        let fan = Arc::new(fan);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "the exec hold needs the agent's runtime".to_string())?;
        let reader = fan.clone();
        std::thread::Builder::new()
            .name("usher-exec-hold".into())
            .spawn(move || read_forever(reader, approvals, runtime))
            .map_err(|e| format!("exec hold thread: {e}"))?;
        Ok(Arc::new(ExecHold {
            fan,
            marks: Mutex::new(HashMap::new()),
        }))
    }

    /// Marks `paths` ((path, is a directory)) for the session of `cgroup_id`.
    pub fn mark(&self, cgroup_id: u64, paths: &[(PathBuf, bool)]) {
        let mut marks = lock(&self.marks);
        for (path, is_dir) in paths {
            let entry = marks
                .entry(path.clone())
                .or_insert((*is_dir, HashSet::new()));
            if entry.1.is_empty() {
                let mut mask = MaskFlags::FAN_OPEN_EXEC_PERM;
                if *is_dir {
                    mask |= MaskFlags::FAN_EVENT_ON_CHILD;
                }
                if let Err(e) =
                    self.fan
                        .mark(MarkFlags::FAN_MARK_ADD, mask, None, Some(path.as_path()))
                {
                    // Not held here means killed by the exec tracepoint: closed anyway.
                    log::warn!(target: "usher::approval", "cannot hold execs of {}: {e}", path.display());
                }
            }
            entry.1.insert(cgroup_id);
        }
    }

    /// The session of `cgroup_id` ended: marks nobody needs any more go.
    pub fn unmark(&self, cgroup_id: u64) {
        let mut marks = lock(&self.marks);
        let mut gone = Vec::new();
        for (path, (is_dir, sessions)) in marks.iter_mut() {
            if sessions.remove(&cgroup_id) && sessions.is_empty() {
                let mut mask = MaskFlags::FAN_OPEN_EXEC_PERM;
                if *is_dir {
                    mask |= MaskFlags::FAN_EVENT_ON_CHILD;
                }
                let _ = self
                    .fan
                    .mark(MarkFlags::FAN_MARK_REMOVE, mask, None, Some(path.as_path()));
                gone.push(path.clone());
            }
        }
        for path in gone {
            marks.remove(&path);
        }
    }
}

fn answer(fan: &Fanotify, event: &FanotifyEvent, allow: bool) {
    if let Some(fd) = event.fd() {
        let response = if allow {
            Response::FAN_ALLOW
        } else {
            Response::FAN_DENY
        };
        if let Err(e) = fan.write_response(FanotifyResponse::new(fd, response)) {
            log::warn!(target: "usher::approval", "answering a held exec failed: {e}");
        }
    }
}

fn read_forever(fan: Arc<Fanotify>, approvals: Weak<Approvals>, runtime: tokio::runtime::Handle) {
    loop {
        let events = match fan.read_events() {
            Ok(events) => events,
            Err(nix::errno::Errno::EINTR) | Err(nix::errno::Errno::EAGAIN) => continue,
            Err(e) => {
                log::error!(target: "usher::approval", "reading held execs failed: {e}; execs needing approval are now killed");
                return;
            }
        };
        for event in events {
            if !event.mask().contains(MaskFlags::FAN_OPEN_EXEC_PERM) {
                continue;
            }
            let Some(approvals) = approvals.upgrade() else {
                answer(&fan, &event, true);
                continue;
            };
            handle(&fan, event, &approvals, &runtime);
        }
    }
}

/// The file a held exec opens: its identity, the directory's, and a path for people.
fn file_of(event: &FanotifyEvent) -> Option<(FileKey, Option<FileKey>, String)> {
    let fd = event.fd()?;
    let meta = std::fs::File::from(fd.as_fd().try_clone_to_owned().ok()?)
        .metadata()
        .ok()?;
    let file = FileKey {
        dev: kernel_dev(meta.dev()),
        _pad: 0,
        ino: meta.ino(),
    };
    let path = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok();
    let dir = path
        .as_deref()
        .and_then(Path::parent)
        .and_then(|d| file_key(d).ok());
    let shown = path
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| format!("(dev {} ino {})", file.dev, file.ino));
    Some((file, dir, shown))
}

fn handle(
    fan: &Arc<Fanotify>,
    event: FanotifyEvent,
    approvals: &Arc<Approvals>,
    runtime: &tokio::runtime::Handle,
) {
    let pid = event.pid();
    let Some((file, dir, program)) = file_of(&event) else {
        answer(fan, &event, true);
        return;
    };
    // Inside the runtime: opening a request spawns its timeout.
    let _entered = runtime.enter();
    let Some((id, mut decided)) = approvals.held_exec(pid, file, dir, program) else {
        answer(fan, &event, true);
        return;
    };
    let fan = fan.clone();
    let approvals = approvals.clone();
    runtime.spawn(async move {
        let approved = loop {
            tokio::select! {
                r = &mut decided => break r.unwrap_or(false),
                _ = tokio::time::sleep(WATCH_PROCESS) => {
                    if proc_info::is_gone(pid) {
                        approvals.process_gone(&id);
                    }
                }
            }
        };
        // The permit first: the exec tracepoint kills an approval-class image without it.
        let allow = approved
            && match approvals.write_permit(pid as u32, file) {
                Ok(()) => true,
                Err(e) => {
                    log::error!(target: "usher::approval", "request {id}: approved, but the permit could not be written ({e}): denied");
                    false
                }
            };
        answer(&fan, &event, allow);
    });
}
