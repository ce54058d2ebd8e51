//! Stage 4: exec attribution and enforcement in the kernel (eBPF, `agent-ebpf/programs`).
//!
//! At start-up the agent loads the programs embedded in its binary, tells them where the
//! kernel keeps the fields they read (from BTF), and picks the enforcement path the kernel
//! allows: BPF-LSM (`bprm_check_security`, the exec fails with EPERM) or the
//! `sched_process_exec` tracepoint with SIGKILL. Each session's policy lives in maps keyed
//! by its cgroup id from before its first process starts until it ends; every exec in it
//! comes back as an event for its audit stream and its recording.

mod btf;
mod policy;

pub use policy::{kernel_dev, ExecMode, ExecPolicy};

use crate::sync::lock;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::{Lsm, TracePoint};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use tokio::io::unix::AsyncFd;
use tokio::sync::mpsc::UnboundedSender;
use usher_ebpf_common as common;

/// The programs, built by agent/build.rs; empty when the agent was built without them.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/usher-ebpf.o"));

/// `enforcement = "required" | "best-effort" | "off"` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Enforcement {
    Required,
    #[default]
    BestEffort,
    Off,
}

/// Which kernel mechanism blocks forbidden execs on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnforcementPath {
    /// BPF-LSM `bprm_check_security`: the exec fails with EPERM.
    BpfLsm,
    /// `sched:sched_process_exec` + `bpf_send_signal(SIGKILL)`.
    TracepointKill,
    /// Nothing loaded; the string says why.
    Unavailable(String),
}

impl fmt::Display for EnforcementPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnforcementPath::BpfLsm => f.write_str("bpf-lsm"),
            EnforcementPath::TracepointKill => f.write_str("tracepoint-sigkill"),
            EnforcementPath::Unavailable(why) => write!(f, "unavailable ({why})"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Allowed,
    Killed,
    Denied,
}

/// One exec seen in a session's cgroup.
#[derive(Debug, Clone, Serialize)]
pub struct ExecEvent {
    /// Unix time in seconds (fractional).
    pub time: f64,
    pub cgroup_id: u64,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    /// The executed file's path, resolved by the agent (falls back to `filename`).
    pub path: String,
    /// The name the caller passed to exec (`/dev/fd/3` for an fexecve).
    pub filename: String,
    /// The executed file's identity: device (major:minor) and inode.
    pub dev: String,
    pub ino: u64,
    pub argv: Vec<String>,
    pub argv_truncated: bool,
    pub verdict: Verdict,
    /// The profile rule that decided a block, in words.
    pub rule: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("exec enforcement is not loaded: {0}")]
    NotLoaded(String),
    #[error("could not load the profile into the kernel: {0}")]
    Map(String),
}

struct Route {
    events: UnboundedSender<ExecEvent>,
    rule_names: Vec<String>,
    keys: Vec<common::RuleKey>,
}

struct Maps {
    sessions: BpfHashMap<MapData, u64, common::SessionPolicy>,
    rules: BpfHashMap<MapData, common::RuleKey, u32>,
    lost: PerCpuArray<MapData, u64>,
}

struct Loaded {
    // The programs stay attached as long as this lives.
    _ebpf: aya::Ebpf,
    maps: Mutex<Maps>,
    routes: Arc<Mutex<HashMap<u64, Route>>>,
}

pub struct Enforcer {
    mode: Enforcement,
    path: EnforcementPath,
    loaded: Option<Loaded>,
}

impl Enforcer {
    /// Probes the kernel and loads the programs. Never fails: the outcome is in `path()`.
    /// Must run inside a tokio runtime (the event reader is a task).
    pub fn start(mode: Enforcement) -> Enforcer {
        if mode == Enforcement::Off {
            return Enforcer {
                mode,
                path: EnforcementPath::Unavailable("enforcement = off".into()),
                loaded: None,
            };
        }
        match load() {
            Ok((path, loaded)) => Enforcer {
                mode,
                path,
                loaded: Some(loaded),
            },
            Err(why) => {
                log::warn!(target: "usher::enforce", "eBPF programs not loaded: {why}");
                Enforcer {
                    mode,
                    path: EnforcementPath::Unavailable(why),
                    loaded: None,
                }
            }
        }
    }

    pub fn mode(&self) -> Enforcement {
        self.mode
    }

    pub fn path(&self) -> &EnforcementPath {
        &self.path
    }

    pub fn is_enforcing(&self) -> bool {
        self.loaded.is_some()
    }

    /// Events the kernel could not hand over (ring buffer full), since start-up.
    pub fn lost_events(&self) -> u64 {
        self.loaded
            .as_ref()
            .and_then(|l| lock(&l.maps).lost.get(&0, 0).ok())
            .map(|per_cpu| per_cpu.iter().sum())
            .unwrap_or(0)
    }

    /// Loads `policy` for the session whose cgroup has inode `cgroup_id`; its exec events
    /// are sent to `events` until `detach`.
    pub fn attach(
        &self,
        cgroup_id: u64,
        policy: &ExecPolicy,
        events: UnboundedSender<ExecEvent>,
    ) -> Result<(), EnforceError> {
        let Some(loaded) = &self.loaded else {
            let why = match &self.path {
                EnforcementPath::Unavailable(w) => w.clone(),
                other => other.to_string(),
            };
            return Err(EnforceError::NotLoaded(why));
        };
        let resolved = policy.resolve().map_err(EnforceError::Map)?;
        let mut maps = lock(&loaded.maps);
        let mut keys = Vec::with_capacity(resolved.keys.len());
        for (file, index) in &resolved.keys {
            let key = common::RuleKey {
                cgroup_id,
                file: *file,
            };
            if let Err(e) = maps.rules.insert(key, index, 0) {
                for k in &keys {
                    let _ = maps.rules.remove(k);
                }
                return Err(EnforceError::Map(format!("rules map: {e}")));
            }
            keys.push(key);
        }
        // The route exists before the policy: no event of the session is dropped.
        lock(&loaded.routes).insert(
            cgroup_id,
            Route {
                events,
                rule_names: resolved.rule_names,
                keys,
            },
        );
        let session = common::SessionPolicy {
            mode: resolved.mode,
            flags: resolved.flags,
        };
        if let Err(e) = maps.sessions.insert(cgroup_id, session, 0) {
            let route = lock(&loaded.routes).remove(&cgroup_id);
            for k in route.map(|r| r.keys).unwrap_or_default() {
                let _ = maps.rules.remove(&k);
            }
            return Err(EnforceError::Map(format!("sessions map: {e}")));
        }
        Ok(())
    }

    pub fn detach(&self, cgroup_id: u64) {
        let Some(loaded) = &self.loaded else { return };
        let mut maps = lock(&loaded.maps);
        let _ = maps.sessions.remove(&cgroup_id);
        if let Some(route) = lock(&loaded.routes).remove(&cgroup_id) {
            for k in &route.keys {
                let _ = maps.rules.remove(k);
            }
        }
    }
}

fn offsets(btf: &btf::Btf) -> Result<common::Offsets, String> {
    Ok(common::Offsets {
        task_mm: btf.field_offset("task_struct", "mm")?,
        task_real_parent: btf.field_offset("task_struct", "real_parent")?,
        task_tgid: btf.field_offset("task_struct", "tgid")?,
        mm_exe_file: btf.field_offset("mm_struct", "exe_file")?,
        mm_arg_start: btf.field_offset("mm_struct", "arg_start")?,
        mm_arg_end: btf.field_offset("mm_struct", "arg_end")?,
        file_inode: btf.field_offset("file", "f_inode")?,
        file_path_dentry: btf.field_offset("file", "f_path")?
            + btf.field_offset("path", "dentry")?,
        dentry_parent: btf.field_offset("dentry", "d_parent")?,
        dentry_inode: btf.field_offset("dentry", "d_inode")?,
        inode_ino: btf.field_offset("inode", "i_ino")?,
        inode_sb: btf.field_offset("inode", "i_sb")?,
        inode_nlink: btf.field_offset("inode", "i_nlink")?,
        sb_dev: btf.field_offset("super_block", "s_dev")?,
        binprm_file: btf.field_offset("linux_binprm", "file")?,
        _pad: 0,
    })
}

fn load() -> Result<(EnforcementPath, Loaded), String> {
    if PROGRAMS.is_empty() {
        return Err("this agent was built without its eBPF programs".into());
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads one rlimit struct.
    unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
    let mut ebpf = aya::Ebpf::load(PROGRAMS).map_err(|e| format!("loading the programs: {e}"))?;
    match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => spawn_logger(logger),
        Err(e) => log::debug!(target: "usher::enforce", "eBPF log unavailable: {e}"),
    }
    let kernel_btf = btf::Btf::from_sys_fs()?;
    let offsets = offsets(&kernel_btf)?;
    let mut offsets_map: Array<_, common::Offsets> =
        Array::try_from(ebpf.map_mut("OFFSETS").ok_or("no OFFSETS map")?)
            .map_err(|e| e.to_string())?;
    offsets_map
        .set(0, offsets, 0)
        .map_err(|e| format!("OFFSETS: {e}"))?;
    let mut loaders: BpfHashMap<_, common::FileKey, u32> =
        BpfHashMap::try_from(ebpf.map_mut("LOADERS").ok_or("no LOADERS map")?)
            .map_err(|e| e.to_string())?;
    for key in policy::loaders() {
        loaders
            .insert(key, 0, 0)
            .map_err(|e| format!("LOADERS: {e}"))?;
    }

    // BPF-LSM where the kernel allows it (lsm=...,bpf and CONFIG_BPF_LSM).
    let lsm_result = (|| -> Result<(), String> {
        let aya_btf = aya::Btf::from_sys_fs().map_err(|e| e.to_string())?;
        let prog: &mut Lsm = ebpf
            .program_mut("bprm_check")
            .ok_or("no bprm_check program")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load("bprm_check_security", &aya_btf)
            .map_err(|e| e.to_string())?;
        prog.attach().map_err(|e| e.to_string())?;
        Ok(())
    })();
    let lsm = match lsm_result {
        Ok(()) => {
            let mut config: Array<_, u32> =
                Array::try_from(ebpf.map_mut("CONFIG").ok_or("no CONFIG map")?)
                    .map_err(|e| e.to_string())?;
            config
                .set(common::CONFIG_LSM_ACTIVE, 1, 0)
                .map_err(|e| e.to_string())?;
            true
        }
        Err(why) => {
            log::info!(target: "usher::enforce", "BPF-LSM not available here ({why}); using the exec tracepoint with SIGKILL");
            false
        }
    };
    ensure_tracefs();
    let tracepoint = (|| -> Result<(), String> {
        let prog: &mut TracePoint = ebpf
            .program_mut("sched_process_exec")
            .ok_or("no sched_process_exec program")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("loading: {e}"))?;
        prog.attach("sched", "sched_process_exec")
            .map_err(|e| format!("attaching: {e}"))?;
        Ok(())
    })();
    let path = match (lsm, tracepoint) {
        (true, Ok(())) => EnforcementPath::BpfLsm,
        (true, Err(why)) => {
            log::warn!(target: "usher::enforce", "exec tracepoint not attached ({why}): refusals are enforced, allowed execs go unreported");
            EnforcementPath::BpfLsm
        }
        (false, Ok(())) => EnforcementPath::TracepointKill,
        (false, Err(why)) => return Err(format!("sched_process_exec: {why}")),
    };

    let take =
        |ebpf: &mut aya::Ebpf, name: &str| ebpf.take_map(name).ok_or(format!("no {name} map"));
    let maps = Maps {
        sessions: BpfHashMap::try_from(take(&mut ebpf, "SESSIONS")?).map_err(|e| e.to_string())?,
        rules: BpfHashMap::try_from(take(&mut ebpf, "RULES")?).map_err(|e| e.to_string())?,
        lost: PerCpuArray::try_from(take(&mut ebpf, "LOST")?).map_err(|e| e.to_string())?,
    };
    let ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(|e| e.to_string())?;
    let routes = Arc::new(Mutex::new(HashMap::new()));
    spawn_reader(ring, routes.clone())?;
    Ok((
        path,
        Loaded {
            _ebpf: ebpf,
            maps: Mutex::new(maps),
            routes,
        },
    ))
}

/// Tracepoints are found through tracefs; minimal hosts (and containers) may not have it
/// mounted.
fn ensure_tracefs() {
    let dir = std::path::Path::new("/sys/kernel/tracing");
    if dir.join("events").exists()
        || std::path::Path::new("/sys/kernel/debug/tracing/events").exists()
    {
        return;
    }
    let r = nix::mount::mount(
        Some("tracefs"),
        dir,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    );
    match r {
        Ok(()) => log::info!(target: "usher::enforce", "mounted tracefs at {}", dir.display()),
        Err(e) => {
            log::warn!(target: "usher::enforce", "cannot mount tracefs at {}: {e}", dir.display())
        }
    }
}

fn spawn_logger(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    tokio::spawn(async move {
        // SAFETY: the AsyncFd owns the logger and with it the descriptor.
        let Ok(mut fd) = (unsafe { AsyncFd::register(logger) }) else {
            return;
        };
        loop {
            let Ok(mut guard) = fd.readable_mut().await else {
                return;
            };
            guard.get_inner_mut().flush();
            guard.clear_ready();
        }
    });
}

/// Wall-clock seconds at boot: adds to the programs' CLOCK_BOOTTIME stamps.
fn boot_epoch() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let boot = ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    now - boot
}

fn spawn_reader(
    ring: RingBuf<MapData>,
    routes: Arc<Mutex<HashMap<u64, Route>>>,
) -> Result<(), String> {
    // SAFETY: the AsyncFd owns the ring buffer and with it the descriptor.
    let mut fd =
        unsafe { AsyncFd::register(ring) }.map_err(|e| format!("events ring buffer: {e}"))?;
    let epoch = boot_epoch();
    tokio::spawn(async move {
        // The programs wake the reader for blocks and for backlogs; ordinary events are
        // also collected on this tick.
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(20));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let woken = tokio::select! {
                r = fd.readable_mut() => Some(r),
                _ = tick.tick() => None,
            };
            match woken {
                Some(Ok(mut guard)) => {
                    drain(guard.get_inner_mut(), epoch, &routes);
                    guard.clear_ready();
                }
                Some(Err(_)) => return,
                None => drain(fd.get_mut(), epoch, &routes),
            }
        }
    });
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, epoch: f64, routes: &Mutex<HashMap<u64, Route>>) {
    while let Some(item) = ring.next() {
        if item.len() < std::mem::size_of::<common::ExecEvent>() {
            continue;
        }
        // SAFETY: the programs write exactly one ExecEvent per record; read it unaligned
        // from the ring's memory.
        let raw: common::ExecEvent =
            unsafe { std::ptr::read_unaligned(item.as_ptr() as *const common::ExecEvent) };
        dispatch(&raw, epoch, routes);
    }
}

fn dispatch(raw: &common::ExecEvent, epoch: f64, routes: &Mutex<HashMap<u64, Route>>) {
    let routes = lock(routes);
    let Some(route) = routes.get(&raw.cgroup_id) else {
        return;
    };
    let cstr = |b: &[u8]| {
        let end = b.iter().position(|c| *c == 0).unwrap_or(b.len());
        String::from_utf8_lossy(&b[..end]).into_owned()
    };
    let filename = cstr(&raw.filename);
    let kept = (raw.argv_len as usize).min(common::ARGV_MAX);
    let argv: Vec<String> = raw.argv[..kept]
        .split(|c| *c == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let verdict = match raw.verdict {
        common::VERDICT_KILLED => Verdict::Killed,
        common::VERDICT_DENIED => Verdict::Denied,
        _ => Verdict::Allowed,
    };
    // The running image's path, while it is there to ask; a killed one is gone.
    let path = match verdict {
        Verdict::Allowed => std::fs::read_link(format!("/proc/{}/exe", raw.pid))
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| filename.clone()),
        _ => filename.clone(),
    };
    let rule = match raw.rule {
        common::RULE_NONE => None,
        common::RULE_NOT_ALLOWED => Some("not in the profile's allow list".to_string()),
        common::RULE_UNLINKED => Some("image with no file on disk (memfd or deleted)".to_string()),
        common::RULE_LOADER => Some("direct run of the dynamic loader".to_string()),
        i => route.rule_names.get(i as usize).cloned(),
    };
    let event = ExecEvent {
        time: epoch + raw.boot_ns as f64 / 1e9,
        cgroup_id: raw.cgroup_id,
        pid: raw.pid,
        ppid: raw.ppid,
        uid: raw.uid,
        path: if path.is_empty() {
            format!("(dev {} ino {})", raw.dev, raw.ino)
        } else {
            path
        },
        filename,
        dev: format!("{}:{}", raw.dev >> 20, raw.dev & 0xfffff),
        ino: raw.ino,
        argv,
        argv_truncated: raw.argv_len as usize > common::ARGV_MAX,
        verdict,
        rule,
    };
    let _ = route.events.send(event);
}
