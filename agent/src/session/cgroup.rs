//! One cgroup per session. Its cgroup v2 directory is the session's identity in the kernel
//! (the directory's inode is the id eBPF sees) and the handle that kills all of it at once.
//! Its limits (processes, memory, CPU) go wherever this host's controllers are: into that
//! same v2 directory on a pure v2 host, or into a parallel cgroup v1 group per hierarchy on
//! a hybrid host, whose v2 mount has no controllers. Every place is found from
//! /proc/self/mountinfo and /proc/self/cgroup, never assumed.

use crate::profile::SessionLimits;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The directory, beside the agent's own cgroup, that holds the session cgroups.
const SESSIONS_DIR: &str = "usher-sessions";
/// The leaf the agent lives in when its own cgroup must enable controllers for the
/// sessions (cgroup v2 allows no process in a cgroup that does). `DelegateSubgroup=usherd`
/// in the unit has systemd (254 and later) start the agent there.
const AGENT_LEAF: &str = "usherd";

/// The controllers a session's limits need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Controller {
    Pids,
    Memory,
    Cpu,
}

impl Controller {
    const ALL: [Controller; 3] = [Controller::Pids, Controller::Memory, Controller::Cpu];

    fn name(self) -> &'static str {
        match self {
            Controller::Pids => "pids",
            Controller::Memory => "memory",
            Controller::Cpu => "cpu",
        }
    }
}

/// One line of /proc/self/mountinfo, the parts a cgroup needs.
#[derive(Debug, Clone, PartialEq)]
struct Mount {
    /// The directory of the hierarchy mounted here (not `/` inside a cgroup namespace).
    root: String,
    point: PathBuf,
    fstype: String,
    super_options: Vec<String>,
}

fn parse_mounts(info: &str) -> Vec<Mount> {
    info.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let left: Vec<&str> = left.split_whitespace().collect();
            let mut right = right.split_whitespace();
            let fstype = right.next()?.to_string();
            let _source = right.next()?;
            let super_options = right
                .next()
                .unwrap_or("")
                .split(',')
                .map(str::to_string)
                .collect();
            Some(Mount {
                root: unescape_octal(left.get(3)?),
                point: PathBuf::from(unescape_octal(left.get(4)?)),
                fstype,
                super_options,
            })
        })
        .collect()
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

/// The cgroup v2 mount point (hybrid hosts mount it at /sys/fs/cgroup/unified, pure v2
/// hosts at /sys/fs/cgroup).
pub fn v2_mount() -> io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    parse_mounts(&info)
        .into_iter()
        .find(|m| m.fstype == "cgroup2")
        .map(|m| m.point)
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted"))
}

/// This process's cgroup in each hierarchy, from /proc/self/cgroup: (controllers, path);
/// the v2 line has no controllers.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_string)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

/// The directory of cgroup `path` (as /proc/self/cgroup names it) under `mount`.
fn dir_of(mount: &Mount, path: &str) -> PathBuf {
    let root = mount.root.trim_end_matches('/');
    let rel = path.strip_prefix(root).unwrap_or(path);
    mount.point.join(rel.trim_start_matches('/'))
}

/// Where session cgroups go in one hierarchy: beside the agent's own cgroup (or beside its
/// leaf, when the agent already lives in one), so under systemd inside the unit's delegated
/// subtree.
fn sessions_base(own: &Path) -> PathBuf {
    if own.file_name().is_some_and(|n| n == AGENT_LEAF) {
        own.parent().unwrap_or(own).to_owned()
    } else {
        own.to_owned()
    }
}

/// Where this agent's session cgroups live and where each limit is written.
#[derive(Debug, Clone)]
pub struct Layout {
    v2_mount: PathBuf,
    /// The agent's own v2 cgroup when it started.
    v2_own: PathBuf,
    /// The parent of the session cgroups on the v2 hierarchy.
    v2_sessions: PathBuf,
    /// Controllers of the v2 hierarchy that the sessions' limits use.
    v2_controllers: Vec<Controller>,
    /// On a hybrid host: each v1 hierarchy that holds a controller the limits need, and the
    /// parent of the sessions' groups in it.
    v1_sessions: Vec<(Vec<Controller>, PathBuf)>,
    /// Controllers this host does not offer to the agent, and why.
    missing: Vec<(Controller, String)>,
}

impl Layout {
    /// Finds the hierarchies and prepares the parents of the session cgroups (on v2, the
    /// controllers enabled down to them).
    pub fn discover() -> io::Result<Layout> {
        let mounts = parse_mounts(&std::fs::read_to_string("/proc/self/mountinfo")?);
        let own = parse_proc_cgroup(&std::fs::read_to_string("/proc/self/cgroup")?);
        let mut layout = Self::plan(&mounts, &own, |dir| {
            std::fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default()
        })?;
        layout.prepare()?;
        Ok(layout)
    }

    /// Decides the places from the mount table and this process's cgroups, without
    /// touching anything; `controllers_of(dir)` reads a v2 directory's `cgroup.controllers`.
    fn plan(
        mounts: &[Mount],
        own: &[(Vec<String>, String)],
        controllers_of: impl Fn(&Path) -> String,
    ) -> io::Result<Layout> {
        let v2 = mounts
            .iter()
            .find(|m| m.fstype == "cgroup2")
            .ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "no cgroup2 file system is mounted")
            })?;
        let own_v2 = own
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        let v2_own = dir_of(v2, own_v2);
        let v2_base = sessions_base(&v2_own);
        let available = controllers_of(&v2_base);
        let mut layout = Layout {
            v2_mount: v2.point.clone(),
            v2_own,
            v2_sessions: v2_base.join(SESSIONS_DIR),
            v2_controllers: Vec::new(),
            v1_sessions: Vec::new(),
            missing: Vec::new(),
        };
        for c in Controller::ALL {
            if available.split_whitespace().any(|a| a == c.name()) {
                layout.v2_controllers.push(c);
                continue;
            }
            let v1 = mounts
                .iter()
                .find(|m| m.fstype == "cgroup" && m.super_options.iter().any(|o| o == c.name()));
            let own_v1 = own
                .iter()
                .find(|(cs, _)| cs.iter().any(|x| x == c.name()))
                .map(|(_, p)| p.as_str());
            match (v1, own_v1) {
                (Some(m), Some(path)) => {
                    let dir = sessions_base(&dir_of(m, path)).join(SESSIONS_DIR);
                    match layout.v1_sessions.iter_mut().find(|(_, d)| *d == dir) {
                        Some((cs, _)) => cs.push(c),
                        None => layout.v1_sessions.push((vec![c], dir)),
                    }
                }
                (Some(m), None) => layout.missing.push((
                    c,
                    format!(
                        "the {} hierarchy at {} does not list this process",
                        c.name(),
                        m.point.display()
                    ),
                )),
                (None, _) => layout.missing.push((
                    c,
                    format!(
                        "no {} controller: not in {} and no cgroup v1 hierarchy has it",
                        c.name(),
                        v2_base.join("cgroup.controllers").display()
                    ),
                )),
            }
        }
        Ok(layout)
    }

    /// Makes the parents of the session cgroups. A controller that cannot be handed to them
    /// joins `missing` (a profile that sets its limit is then refused; its default is
    /// reported), rather than stopping every session.
    fn prepare(&mut self) -> io::Result<()> {
        std::fs::create_dir_all(&self.v2_sessions)?;
        for c in std::mem::take(&mut self.v2_controllers) {
            match self.enable_v2_controller(c) {
                Ok(()) => self.v2_controllers.push(c),
                Err(e) => self.missing.push((c, e.to_string())),
            }
        }
        let mut v1 = Vec::new();
        for (cs, dir) in std::mem::take(&mut self.v1_sessions) {
            match std::fs::create_dir_all(&dir) {
                Ok(()) => v1.push((cs, dir)),
                Err(e) => {
                    for c in cs {
                        self.missing.push((c, format!("{}: {e}", dir.display())));
                    }
                }
            }
        }
        self.v1_sessions = v1;
        for (c, why) in &self.missing {
            log::warn!(target: "usher::session", "session {} limits cannot be applied on this host: {why}", c.name());
        }
        Ok(())
    }

    /// cgroup v2 hands a controller to a cgroup only if every ancestor enables it in
    /// `cgroup.subtree_control`: from the mount's root down to the sessions' parent.
    fn enable_v2_controller(&self, c: Controller) -> io::Result<()> {
        let rel = self
            .v2_sessions
            .strip_prefix(&self.v2_mount)
            .map_err(io::Error::other)?;
        let mut dir = self.v2_mount.clone();
        let mut chain = vec![dir.clone()];
        for part in rel.components() {
            dir = dir.join(part);
            chain.push(dir.clone());
        }
        let name = c.name();
        for dir in chain {
            let control = dir.join("cgroup.subtree_control");
            let enabled = std::fs::read_to_string(&control)?;
            if enabled.split_whitespace().any(|e| e == name) {
                continue;
            }
            let enable = || {
                std::fs::write(&control, format!("+{name}")).map_err(|e| {
                    io::Error::new(e.kind(), format!("{}: +{name}: {e}", control.display()))
                })
            };
            match enable() {
                Ok(()) => {}
                // The agent itself lives in this cgroup, and a cgroup that enables
                // controllers may hold no process: it moves into a leaf beside the sessions.
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && dir == self.v2_own
                        && dir != self.v2_mount =>
                {
                    move_self_into(&dir.join(AGENT_LEAF))?;
                    enable()?;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Moves this process (all its threads) into `leaf`, made if needed.
fn move_self_into(leaf: &Path) -> io::Result<()> {
    std::fs::create_dir_all(leaf)?;
    std::fs::write(leaf.join("cgroup.procs"), "0")?;
    log::info!(target: "usher::session", "usherd moved itself into {}: a cgroup v2 that hands controllers to the sessions may hold no process (under systemd 254 and later, DelegateSubgroup={AGENT_LEAF} does this)", leaf.display());
    Ok(())
}

/// The host's RAM in bytes (MemTotal), for limits given as a percentage.
pub fn host_ram_bytes() -> io::Result<u64> {
    let text = std::fs::read_to_string("/proc/meminfo")?;
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| io::Error::other("/proc/meminfo has no MemTotal"))
}

/// What a session's cgroup holds it to: part of the session's metadata, so its format
/// lives in the wire crate.
pub use usher_wire::meta::AppliedLimits;

#[derive(Debug)]
pub struct Cgroup {
    path: PathBuf,
    id: u64,
    /// The session's cgroup v1 groups (hybrid hosts), which hold its limits.
    limit_groups: Vec<PathBuf>,
    limits: AppliedLimits,
}

/// The open `cgroup.procs` files a session's process writes itself into before it execs:
/// the groups that limit it, then the v2 cgroup that names it.
pub struct JoinFiles {
    pub limits: Vec<File>,
    pub identity: File,
}

impl Cgroup {
    /// Makes the session's cgroup (and its v1 groups) and writes `limits` into it. A limit
    /// the profile set that cannot be applied is an error, and nothing is left behind; a
    /// default that cannot be applied is logged and listed in `limits().not_applied`.
    pub fn create(layout: &Layout, name: &str, limits: &SessionLimits) -> io::Result<Cgroup> {
        let path = layout.v2_sessions.join(name);
        std::fs::create_dir(&path)?;
        let mut cgroup = Cgroup {
            id: std::fs::metadata(&path)?.ino(),
            path,
            limit_groups: Vec::new(),
            limits: AppliedLimits::default(),
        };
        let result = cgroup.apply(layout, name, limits);
        if let Err(e) = result {
            let _ = cgroup.kill_and_remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    fn apply(&mut self, layout: &Layout, name: &str, limits: &SessionLimits) -> io::Result<()> {
        let mut places: Vec<(Controller, PathBuf, bool)> = Vec::new();
        for c in &layout.v2_controllers {
            places.push((*c, self.path.clone(), true));
        }
        // A v1 group that cannot be made (a read-only hierarchy, as in a container on a
        // hybrid host) leaves its controllers unapplied, like a missing controller.
        let mut unavailable: Vec<(Controller, String)> = Vec::new();
        for (cs, parent) in &layout.v1_sessions {
            let dir = parent.join(name);
            match std::fs::create_dir(&dir) {
                Ok(()) => {
                    self.limit_groups.push(dir.clone());
                    for c in cs {
                        places.push((*c, dir.clone(), false));
                    }
                }
                Err(e) => {
                    for c in cs {
                        unavailable.push((*c, format!("{}: {e}", dir.display())));
                    }
                }
            }
        }
        self.limits = AppliedLimits {
            pids_max: limits.pids_max.value,
            memory_max: limits.memory_max.value,
            cpu_weight: Some(limits.cpu_weight.value),
            not_applied: Vec::new(),
        };
        let mut refused = Vec::new();
        for c in Controller::ALL {
            let explicit = match c {
                Controller::Pids => limits.pids_max.explicit,
                Controller::Memory => limits.memory_max.explicit,
                Controller::Cpu => limits.cpu_weight.explicit,
            };
            let outcome = match places.iter().find(|(p, _, _)| *p == c) {
                Some((_, dir, v2)) => write_limit(c, dir, *v2, limits).map_err(|e| e.to_string()),
                None => Err(unavailable
                    .iter()
                    .chain(&layout.missing)
                    .find(|(m, _)| *m == c)
                    .map(|(_, why)| why.clone())
                    .unwrap_or_else(|| format!("no {} controller", c.name()))),
            };
            if let Err(why) = outcome {
                let what = format!("{}: {why}", c.name());
                if explicit {
                    log::error!(target: "usher::session", "session {name}: the profile's {} limit cannot be applied: {why}", c.name());
                    refused.push(what);
                } else {
                    log::warn!(target: "usher::session", "session {name}: the default {} limit is not applied: {why}", c.name());
                    self.limits.not_applied.push(what);
                }
            }
        }
        if refused.is_empty() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "the profile's limits cannot be applied on this host ({})",
                refused.join("; ")
            )))
        }
    }

    /// A session cgroup made before (an agent restart), with its v1 groups.
    pub fn open_with_limit_groups(path: &Path, limit_groups: &[PathBuf]) -> io::Result<Cgroup> {
        let id = std::fs::metadata(path)?.ino();
        Ok(Cgroup {
            path: path.to_owned(),
            id,
            limit_groups: limit_groups.to_vec(),
            limits: AppliedLimits::default(),
        })
    }

    pub fn open(path: &Path) -> io::Result<Cgroup> {
        Self::open_with_limit_groups(path, &[])
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The session's cgroup v1 groups, empty on a pure v2 host.
    pub fn limit_groups(&self) -> &[PathBuf] {
        &self.limit_groups
    }

    /// What the session was held to when its cgroup was made.
    pub fn limits(&self) -> &AppliedLimits {
        &self.limits
    }

    /// The id BPF sees (`bpf_get_current_cgroup_id`): the directory's inode number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The open `cgroup.procs` files, for a child to move itself in before it execs.
    pub fn procs_file(&self) -> io::Result<JoinFiles> {
        let open = |dir: &Path| {
            std::fs::OpenOptions::new()
                .write(true)
                .open(dir.join("cgroup.procs"))
        };
        Ok(JoinFiles {
            limits: self
                .limit_groups
                .iter()
                .map(|d| open(d))
                .collect::<io::Result<_>>()?,
            identity: open(&self.path)?,
        })
    }

    pub fn pids(&self) -> Vec<i32> {
        pids_in(&self.path)
    }

    pub fn is_populated(&self) -> bool {
        std::fs::read_to_string(self.path.join("cgroup.events"))
            .map(|s| s.lines().any(|l| l == "populated 1"))
            .unwrap_or(false)
    }

    /// Kills every process in the cgroup (and below) and waits (up to 3 s) for it to empty.
    pub fn kill_all(&self) {
        for _ in 0..300 {
            if !self.path.exists() || !self.is_populated() {
                break;
            }
            // cgroup.kill (Linux 5.14) is atomic against forks; fall back to signalling
            // each pid on older kernels.
            if std::fs::write(self.path.join("cgroup.kill"), "1").is_err() {
                kill_all(&self.pids());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills every process in the cgroup (and below), waits for it to empty and removes it
    /// and its v1 groups.
    pub fn kill_and_remove(&self) -> io::Result<()> {
        let mut result = Ok(());
        if self.path.exists() {
            self.kill_all();
            result = std::fs::remove_dir(&self.path);
        }
        for dir in &self.limit_groups {
            if let Err(e) = remove_v1_group(dir) {
                log::warn!(target: "usher::session", "cannot remove {}: {e}", dir.display());
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        result
    }
}

fn pids_in(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn kill_all(pids: &[i32]) {
    for pid in pids {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// A v1 group empties when the v2 cgroup does (the same processes); a process that
/// escaped the v2 cgroup is killed all the same. rmdir is retried while exits settle.
fn remove_v1_group(dir: &Path) -> io::Result<()> {
    let mut last = Ok(());
    for _ in 0..200 {
        if !dir.exists() {
            return Ok(());
        }
        kill_all(&pids_in(dir));
        last = std::fs::remove_dir(dir);
        match &last {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            _ => return last,
        }
    }
    last
}

/// Writes one controller's limit into `dir` (a v2 cgroup, or the controller's v1 group).
fn write_limit(c: Controller, dir: &Path, v2: bool, limits: &SessionLimits) -> io::Result<()> {
    let write = |file: &str, value: String| {
        std::fs::write(dir.join(file), &value).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("{} = {value}: {e}", dir.join(file).display()),
            )
        })
    };
    match c {
        Controller::Pids => write(
            "pids.max",
            limits
                .pids_max
                .value
                .map_or("max".to_string(), |n| n.to_string()),
        ),
        Controller::Memory if v2 => {
            let Some(bytes) = limits.memory_max.value else {
                return write("memory.max", "max".into());
            };
            write("memory.max", bytes.to_string())?;
            // Swap is memory too: without this a hog pages out instead of meeting the limit.
            if dir.join("memory.swap.max").exists() {
                write("memory.swap.max", "0".into())?;
            }
            Ok(())
        }
        Controller::Memory => {
            let value = limits
                .memory_max
                .value
                .map_or("-1".to_string(), |n| n.to_string());
            write("memory.limit_in_bytes", value.clone())?;
            // memory+swap, present when the kernel accounts swap; it may not be below the
            // memory limit, so it is written second.
            if dir.join("memory.memsw.limit_in_bytes").exists() {
                write("memory.memsw.limit_in_bytes", value)?;
            }
            Ok(())
        }
        Controller::Cpu if v2 => write("cpu.weight", limits.cpu_weight.value.to_string()),
        Controller::Cpu => write(
            "cpu.shares",
            v1_cpu_shares(limits.cpu_weight.value).to_string(),
        ),
    }
}

/// cgroup v2's weight (default 100) in v1's shares (default 1024, minimum 2).
fn v1_cpu_shares(weight: u32) -> u64 {
    (u64::from(weight) * 1024 / 100).max(2)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755\n\
        32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct\n\
        35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
        39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids\n\
        40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd\n\
        41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";

    #[test]
    fn finds_cgroup2_in_mountinfo() {
        let v2 = |info: &str| {
            parse_mounts(info)
                .into_iter()
                .find(|m| m.fstype == "cgroup2")
                .map(|m| m.point)
        };
        assert_eq!(v2(HYBRID), Some("/sys/fs/cgroup/unified".into()));
        let info = "41 31 0:38 / /my\\040cg rw - cgroup2 none rw\n";
        assert_eq!(v2(info), Some("/my cg".into()));
        assert_eq!(v2("1 2 0:1 / / rw - ext4 /dev/vda rw\n"), None);
    }

    #[test]
    fn on_a_hybrid_host_the_limits_go_to_parallel_v1_groups_beside_the_agent() {
        let own = parse_proc_cgroup(
            "9:name=systemd:/system.slice/usherd.service\n8:pids:/system.slice/usherd.service\n\
             4:memory:/system.slice/usherd.service\n1:cpu,cpuacct:/system.slice/usherd.service\n\
             0::/system.slice/usherd.service\n",
        );
        let layout = Layout::plan(&parse_mounts(HYBRID), &own, |_| String::new()).unwrap();
        let svc = "system.slice/usherd.service/usher-sessions";
        assert_eq!(
            layout.v2_sessions,
            Path::new("/sys/fs/cgroup/unified").join(svc)
        );
        assert!(layout.v2_controllers.is_empty());
        assert_eq!(
            layout.v1_sessions,
            vec![
                (
                    vec![Controller::Pids],
                    Path::new("/sys/fs/cgroup/pids").join(svc)
                ),
                (
                    vec![Controller::Memory],
                    Path::new("/sys/fs/cgroup/memory").join(svc)
                ),
                (
                    vec![Controller::Cpu],
                    Path::new("/sys/fs/cgroup/cpu,cpuacct").join(svc)
                ),
            ]
        );
        assert!(layout.missing.is_empty());
    }

    #[test]
    fn on_a_pure_v2_host_the_limits_stay_in_the_session_cgroup() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw,nsdelegate\n";
        // Already in the leaf DelegateSubgroup= makes: the sessions go beside it.
        let own = parse_proc_cgroup("0::/system.slice/usherd.service/usherd\n");
        let layout = Layout::plan(&parse_mounts(info), &own, |dir| {
            assert_eq!(dir, Path::new("/sys/fs/cgroup/system.slice/usherd.service"));
            "cpuset cpu io memory pids".into()
        })
        .unwrap();
        assert_eq!(
            layout.v2_sessions,
            Path::new("/sys/fs/cgroup/system.slice/usherd.service/usher-sessions")
        );
        assert_eq!(layout.v2_controllers, Controller::ALL.to_vec());
        assert!(layout.v1_sessions.is_empty() && layout.missing.is_empty());
    }

    #[test]
    fn a_missing_controller_is_named_not_guessed() {
        let info = "30 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
        let layout = Layout::plan(&parse_mounts(info), &parse_proc_cgroup("0::/\n"), |_| {
            "cpu pids".into()
        })
        .unwrap();
        assert_eq!(
            layout.v2_sessions,
            Path::new("/sys/fs/cgroup/usher-sessions")
        );
        assert_eq!(layout.missing.len(), 1);
        assert_eq!(layout.missing[0].0, Controller::Memory);
    }

    #[test]
    fn a_cgroup_namespace_root_is_stripped() {
        let m = &parse_mounts("41 31 0:38 /ns /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n")[0];
        assert_eq!(dir_of(m, "/ns/a/b"), Path::new("/sys/fs/cgroup/a/b"));
        assert_eq!(dir_of(m, "/"), Path::new("/sys/fs/cgroup"));
    }

    #[test]
    fn cpu_weight_maps_to_shares() {
        assert_eq!(v1_cpu_shares(100), 1024);
        assert_eq!(v1_cpu_shares(1), 10);
        assert_eq!(v1_cpu_shares(10000), 102400);
    }
}
