//! Stage 4: exec attribution and enforcement in the kernel (eBPF, `agent-ebpf/programs`).
//!
//! At start-up the agent loads the programs embedded in its binary, tells them where the
//! kernel keeps the fields they read (from BTF), and picks the enforcement path the kernel
//! allows: BPF-LSM (`bprm_check_security`, the exec fails with EPERM) or the
//! `sched_process_exec` tracepoint with SIGKILL. Each session's policy lives in maps keyed
//! by its cgroup id from before its first process starts until it ends; every exec in it
//! comes back as an event for its audit stream and its recording.
//!
//! The programs, their links and their maps are pinned in bpffs (`pins`): when the agent
//! stops, crashes or is upgraded, the kernel goes on checking (and queueing the events of)
//! every exec in the live sessions, and the next agent takes the pinned state over.

mod btf;
pub mod confine;
mod pins;
pub(crate) mod policy;

pub use pins::{pin_dir, unpin};
pub use policy::{kernel_dev, ExecMode, ExecPolicy};

use crate::sync::lock;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{Lsm, TracePoint};
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot};
use usher_ebpf_common as common;

/// The programs, built by agent/build.rs; empty when the agent was built without them.
static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/usher-ebpf"));

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
    /// BPF-LSM `bprm_check_security`: the exec fails with EPERM. `mappings_unchecked` says
    /// why the `mmap_file`/`file_mprotect` hooks did not load, when they did not.
    BpfLsm { mappings_unchecked: Option<String> },
    /// `sched:sched_process_exec` + `bpf_send_signal(SIGKILL)`; `no_lsm` says why BPF-LSM
    /// (and with it the check of executable mappings) is not there.
    TracepointKill { no_lsm: String },
    /// Nothing loaded; the string says why.
    Unavailable(String),
}

impl fmt::Display for EnforcementPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EnforcementPath::BpfLsm {
                mappings_unchecked: None,
            } => f.write_str("bpf-lsm (execs and executable mappings)"),
            EnforcementPath::BpfLsm {
                mappings_unchecked: Some(why),
            } => write!(
                f,
                "bpf-lsm (execs only; executable mappings unchecked: {why})"
            ),
            EnforcementPath::TracepointKill { no_lsm } => write!(
                f,
                "tracepoint-sigkill (no BPF-LSM: {no_lsm}; executable mappings are left to \
                 the sessions' noexec mounts)"
            ),
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

/// What the kernel programs hand a session: its execs, and how many of them its queue had
/// no room for.
#[derive(Debug, Clone)]
pub enum ExecNote {
    Exec(ExecEvent),
    /// `count` events were dropped since the last note (`total` in this session): the
    /// session did not take them as fast as it made them.
    Lost {
        count: u64,
        total: u64,
    },
}

pub type ExecSender = mpsc::Sender<ExecNote>;
pub type ExecReceiver = mpsc::Receiver<ExecNote>;

/// Exec events one session may have waiting: a session that makes them faster than its
/// recording takes them loses the excess (counted), never the agent's memory.
pub const EXEC_QUEUE: usize = 1024;

/// A session's exec channel.
pub fn exec_channel() -> (ExecSender, ExecReceiver) {
    mpsc::channel(EXEC_QUEUE)
}

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("exec enforcement is not loaded: {0}")]
    NotLoaded(String),
    #[error("could not load the profile into the kernel: {0}")]
    Map(String),
}

struct Route {
    events: ExecSender,
    rule_names: Vec<String>,
    keys: Vec<common::RuleKey>,
    /// The session's entries in `APPROVE`.
    approve_keys: Vec<common::RuleKey>,
    /// Dropped since the last `Lost` note reached the session.
    lost_pending: u64,
    lost_total: u64,
}

impl Route {
    fn new(events: ExecSender, rule_names: Vec<String>, keys: Vec<common::RuleKey>) -> Route {
        Route {
            events,
            rule_names,
            keys,
            approve_keys: Vec::new(),
            lost_pending: 0,
            lost_total: 0,
        }
    }

    /// Hands over `event`, first saying what was lost before it; never waits.
    fn deliver(&mut self, event: ExecEvent) {
        if !self.flush_lost() {
            self.lost_pending += 1;
            self.lost_total += 1;
            return;
        }
        if let Err(mpsc::error::TrySendError::Full(_)) = self.events.try_send(ExecNote::Exec(event))
        {
            self.lost_pending += 1;
            self.lost_total += 1;
        }
    }

    /// Tells the session how many events it lost; false while its queue is still full.
    fn flush_lost(&mut self) -> bool {
        if self.lost_pending == 0 {
            return true;
        }
        let note = ExecNote::Lost {
            count: self.lost_pending,
            total: self.lost_total,
        };
        match self.events.try_send(note) {
            Ok(()) => {
                self.lost_pending = 0;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => false,
            // Nobody listens any more: nothing to tell.
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.lost_pending = 0;
                true
            }
        }
    }
}

struct Maps {
    sessions: BpfHashMap<MapData, u64, common::SessionPolicy>,
    rules: BpfHashMap<MapData, common::RuleKey, u32>,
    approve: BpfHashMap<MapData, common::RuleKey, u32>,
    permits: BpfHashMap<MapData, common::PermitKey, u64>,
    lost: PerCpuArray<MapData, u64>,
}

struct Loaded {
    _ebpf: aya::Ebpf,
    // The programs stay attached while their pins in bpffs exist, with or without us.
    _links: Vec<PinnedLink>,
    maps: Mutex<Maps>,
    routes: Arc<Mutex<HashMap<u64, Route>>>,
    /// Opens the event reader once the sessions of a previous agent have their routes back.
    reader_gate: Mutex<Option<oneshot::Sender<()>>>,
    /// The events a previous agent left unread in the ring buffer (the agent's down time),
    /// read at load, handed over when the sessions they belong to are known again.
    backlog: Mutex<Vec<common::ExecEvent>>,
}

pub struct Enforcer {
    mode: Enforcement,
    path: EnforcementPath,
    loaded: Option<Loaded>,
}

impl Enforcer {
    /// For one-shot maintenance: nothing loaded, and what is pinned stays as it is.
    pub fn offline() -> Enforcer {
        Enforcer {
            mode: Enforcement::Off,
            path: EnforcementPath::Unavailable("offline".into()),
            loaded: None,
        }
    }

    /// Probes the kernel and loads the programs (or takes over those a previous agent
    /// pinned under `pin_dir`). Never fails: the outcome is in `path()`. Must run inside a
    /// tokio runtime (the event reader is a task), which reads no event before
    /// `takeover_complete`.
    pub fn start(mode: Enforcement, pin_dir: &Path) -> Enforcer {
        if mode == Enforcement::Off {
            // Off means off: what a previous agent left in the kernel goes too.
            if let Err(e) = pins::remove(pin_dir) {
                log::warn!(target: "usher::enforce", "cannot remove the pinned programs in {}: {e}", pin_dir.display());
            }
            return Enforcer {
                mode,
                path: EnforcementPath::Unavailable("enforcement = off".into()),
                loaded: None,
            };
        }
        match load(pin_dir) {
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

    /// Called once the sessions that outlived the previous agent are attached again: the
    /// kernel's entries of sessions nobody claimed are dropped, and the events that waited
    /// in the ring buffer meanwhile are read (and reach the claimed sessions).
    pub fn takeover_complete(&self) {
        let Some(loaded) = &self.loaded else { return };
        let backlog = std::mem::take(&mut *lock(&loaded.backlog));
        if !backlog.is_empty() {
            log::info!(target: "usher::enforce", "{} exec event(s) from while the agent was down", backlog.len());
            let epoch = boot_epoch();
            for raw in &backlog {
                dispatch(raw, epoch, &loaded.routes);
            }
        }
        {
            let routes = lock(&loaded.routes);
            let mut maps = lock(&loaded.maps);
            let claimed: HashSet<common::RuleKey> = routes
                .values()
                .flat_map(|r| r.keys.iter().copied())
                .collect();
            let stale_sessions: Vec<u64> = maps
                .sessions
                .keys()
                .flatten()
                .filter(|id| !routes.contains_key(id))
                .collect();
            for id in &stale_sessions {
                let _ = maps.sessions.remove(id);
            }
            let stale_rules: Vec<common::RuleKey> = maps
                .rules
                .keys()
                .flatten()
                .filter(|k| !claimed.contains(k))
                .collect();
            for k in &stale_rules {
                let _ = maps.rules.remove(k);
            }
            let claimed: HashSet<common::RuleKey> = routes
                .values()
                .flat_map(|r| r.approve_keys.iter().copied())
                .collect();
            let stale_approvals: Vec<common::RuleKey> = maps
                .approve
                .keys()
                .flatten()
                .filter(|k| !claimed.contains(k))
                .collect();
            for k in &stale_approvals {
                let _ = maps.approve.remove(k);
            }
            if !stale_sessions.is_empty() {
                log::info!(target: "usher::enforce", "dropped the kernel policy of {} session(s) no longer live", stale_sessions.len());
            }
        }
        if let Some(gate) = lock(&loaded.reader_gate).take() {
            let _ = gate.send(());
        }
    }

    /// Loads `policy` for the session whose cgroup has inode `cgroup_id`; its exec events
    /// are sent to `events` until `detach`.
    pub fn attach(
        &self,
        cgroup_id: u64,
        policy: &ExecPolicy,
        events: ExecSender,
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
        let mut approve_keys = Vec::with_capacity(resolved.approve.len());
        for (file, index) in &resolved.approve {
            let key = common::RuleKey {
                cgroup_id,
                file: *file,
            };
            if let Err(e) = maps.approve.insert(key, index, 0) {
                for k in &keys {
                    let _ = maps.rules.remove(k);
                }
                for k in &approve_keys {
                    let _ = maps.approve.remove(k);
                }
                return Err(EnforceError::Map(format!("approve map: {e}")));
            }
            approve_keys.push(key);
        }
        let mut route = Route::new(events, resolved.rule_names, keys);
        route.approve_keys = approve_keys;
        // The route exists before the policy: no event of the session is dropped.
        let previous = lock(&loaded.routes).insert(cgroup_id, route);
        // Attached again (after a takeover): rules the profile no longer names go.
        if let Some(previous) = previous {
            let routes = lock(&loaded.routes);
            let current = &routes[&cgroup_id];
            for k in previous.keys.iter().filter(|k| !current.keys.contains(k)) {
                let _ = maps.rules.remove(k);
            }
            for k in previous
                .approve_keys
                .iter()
                .filter(|k| !current.approve_keys.contains(k))
            {
                let _ = maps.approve.remove(k);
            }
        }
        let session = common::SessionPolicy {
            mode: resolved.mode,
            flags: resolved.flags,
        };
        if let Err(e) = maps.sessions.insert(cgroup_id, session, 0) {
            if let Some(route) = lock(&loaded.routes).remove(&cgroup_id) {
                for k in &route.keys {
                    let _ = maps.rules.remove(k);
                }
                for k in &route.approve_keys {
                    let _ = maps.approve.remove(k);
                }
            }
            return Err(EnforceError::Map(format!("sessions map: {e}")));
        }
        Ok(())
    }

    /// Lets process `tgid` become `file` once, within `ttl`: written before a held exec is
    /// let go, so the exec tracepoint does not kill the approved program.
    pub fn permit(
        &self,
        tgid: u32,
        file: common::FileKey,
        ttl: std::time::Duration,
    ) -> Result<(), EnforceError> {
        let Some(loaded) = &self.loaded else {
            return Err(EnforceError::NotLoaded("no programs loaded".into()));
        };
        let until = boot_ns().saturating_add(ttl.as_nanos() as u64);
        let key = common::PermitKey {
            tgid,
            _pad: 0,
            file,
        };
        lock(&loaded.maps)
            .permits
            .insert(key, until, 0)
            .map_err(|e| EnforceError::Map(format!("permits map: {e}")))
    }

    /// Takes back a permit that was not used (the exec failed or went elsewhere).
    pub fn revoke_permit(&self, tgid: u32, file: common::FileKey) {
        if let Some(loaded) = &self.loaded {
            let key = common::PermitKey {
                tgid,
                _pad: 0,
                file,
            };
            let _ = lock(&loaded.maps).permits.remove(&key);
        }
    }

    pub fn detach(&self, cgroup_id: u64) {
        let Some(loaded) = &self.loaded else { return };
        let mut maps = lock(&loaded.maps);
        let _ = maps.sessions.remove(&cgroup_id);
        if let Some(mut route) = lock(&loaded.routes).remove(&cgroup_id) {
            for k in &route.keys {
                let _ = maps.rules.remove(k);
            }
            for k in &route.approve_keys {
                let _ = maps.approve.remove(k);
            }
            if !route.flush_lost() {
                log::warn!(target: "usher::enforce", "{} exec event(s) of the session in cgroup {cgroup_id} were lost ({} in all): its queue was full", route.lost_pending, route.lost_total);
            }
        }
    }
}

/// The maps that outlive the agent (pinned): everything but the programs' log.
const PINNED_MAPS: [&str; 9] = [
    "SESSIONS", "RULES", "APPROVE", "PERMITS", "LOADERS", "OFFSETS", "CONFIG", "LOST", "EVENTS",
];

fn load(pin_dir: &Path) -> Result<(EnforcementPath, Loaded), String> {
    if PROGRAMS.is_empty() {
        return Err("this agent was built without its eBPF programs".into());
    }
    // Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK.
    {
        use nix::sys::resource::{setrlimit, Resource, RLIM_INFINITY};
        let _ = setrlimit(Resource::RLIMIT_MEMLOCK, RLIM_INFINITY, RLIM_INFINITY);
    }
    pins::prepare(pin_dir)?;
    let taking_over = pins::holds_links(pin_dir);
    // Maps already pinned (a previous agent's) are reused as they are: the sessions'
    // policies in them never stopped applying, and their events wait in the ring buffer.
    let map_pins: Vec<(&str, PathBuf)> = PINNED_MAPS
        .iter()
        .map(|name| (*name, pins::map_path(pin_dir, name)))
        .collect();
    let mut loader = aya::EbpfLoader::new();
    for (name, path) in &map_pins {
        loader.map_pin_path(name, path.as_path());
    }
    let mut ebpf = loader
        .load(PROGRAMS)
        .map_err(|e| format!("loading the programs: {e}"))?;
    if taking_over {
        log::info!(target: "usher::enforce", "taking over the programs and maps pinned in {}", pin_dir.display());
    }
    // Maps of another layout (an upgrade that changed the shared types) are not ours to
    // read: they go with the links of the programs that used them (replaced below).
    let current: Vec<&Path> = map_pins.iter().map(|(_, p)| p.as_path()).collect();
    pins::remove_other_maps(pin_dir, &current);
    match aya_log::EbpfLogger::init(&mut ebpf) {
        Ok(logger) => spawn_logger(logger),
        Err(e) => log::debug!(target: "usher::enforce", "eBPF log unavailable: {e}"),
    }
    let kernel_btf = btf::KernelBtf::from_sys_fs().map_err(|e| e.to_string())?;
    let mut offsets_map: Array<_, common::Offsets> =
        Array::try_from(ebpf.map_mut("OFFSETS").ok_or("no OFFSETS map")?)
            .map_err(|e| e.to_string())?;
    offsets_map
        .set(0, kernel_btf.offsets, 0)
        .map_err(|e| format!("OFFSETS: {e}"))?;
    let mut loaders: BpfHashMap<_, common::FileKey, u32> =
        BpfHashMap::try_from(ebpf.map_mut("LOADERS").ok_or("no LOADERS map")?)
            .map_err(|e| e.to_string())?;
    for key in policy::loaders() {
        loaders
            .insert(key, 0, 0)
            .map_err(|e| format!("LOADERS: {e}"))?;
    }

    let mut links = Vec::new();
    // BPF-LSM where the kernel allows it (lsm=...,bpf and CONFIG_BPF_LSM, and the BPF
    // trampolines LSM programs attach through).
    let aya_btf = kernel_btf.aya.as_ref().map_err(|e| e.to_string());
    let lsm = aya_btf
        .clone()
        .and_then(|btf| attach_lsm(&mut ebpf, "bprm_check", "bprm_check_security", btf))
        .and_then(|link| pins::replace_link(pin_dir, "bprm_check", link));
    let mappings = match (&lsm, aya_btf) {
        (Ok(_), Ok(btf)) => ["mmap_file", "file_mprotect"]
            .iter()
            .map(|hook| {
                attach_lsm(&mut ebpf, hook, hook, btf)
                    .and_then(|link| pins::replace_link(pin_dir, hook, link))
                    .map_err(|e| format!("{hook}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>(),
        (Err(why), _) => Err(why.clone()),
        (_, Err(why)) => Err(why),
    };
    let mut config: Array<_, u32> = Array::try_from(ebpf.map_mut("CONFIG").ok_or("no CONFIG map")?)
        .map_err(|e| e.to_string())?;
    config
        .set(common::CONFIG_LSM_ACTIVE, lsm.is_ok() as u32, 0)
        .map_err(|e| format!("CONFIG: {e}"))?;
    let lsm = match lsm {
        Ok(link) => {
            links.push(link);
            Ok(())
        }
        Err(why) => {
            log::info!(target: "usher::enforce", "BPF-LSM not available here ({why}); using the exec tracepoint with SIGKILL");
            // Whatever a previous agent had pinned of it (another kernel's choice) goes.
            pins::remove_link(pin_dir, "bprm_check");
            Err(why)
        }
    };
    let mappings_unchecked = match mappings {
        Ok(pinned) => {
            links.extend(pinned);
            None
        }
        Err(why) => {
            for hook in ["mmap_file", "file_mprotect"] {
                pins::remove_link(pin_dir, hook);
            }
            if lsm.is_ok() {
                log::warn!(target: "usher::enforce", "BPF-LSM mapping hooks not attached ({why}): executable mappings are left to noexec mounts");
            }
            Some(why)
        }
    };
    ensure_tracefs();
    let tracepoint = (|| -> Result<PinnedLink, String> {
        let prog: &mut TracePoint = ebpf
            .program_mut("sched_process_exec")
            .ok_or("no sched_process_exec program")?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| e.to_string())?;
        prog.load().map_err(|e| format!("loading: {e}"))?;
        let id = prog
            .attach("sched", "sched_process_exec")
            .map_err(|e| format!("attaching: {e}"))?;
        let link = prog.take_link(id).map_err(|e| e.to_string())?;
        let link = FdLink::try_from(link).map_err(|e| format!("not an fd link: {e}"))?;
        // The new program is attached before the old one's pin is replaced: no exec goes
        // unchecked in between (one may be reported twice).
        pins::replace_link(pin_dir, "sched_process_exec", link)
    })();
    let path = match (lsm, tracepoint) {
        (Ok(()), Ok(link)) => {
            links.push(link);
            EnforcementPath::BpfLsm { mappings_unchecked }
        }
        (Ok(()), Err(why)) => {
            log::warn!(target: "usher::enforce", "exec tracepoint not attached ({why}): refusals are enforced, allowed execs go unreported");
            EnforcementPath::BpfLsm { mappings_unchecked }
        }
        (Err(no_lsm), Ok(link)) => {
            links.push(link);
            EnforcementPath::TracepointKill {
                no_lsm: first_line(&no_lsm),
            }
        }
        (Err(_), Err(why)) => return Err(format!("sched_process_exec: {why}")),
    };

    let take =
        |ebpf: &mut aya::Ebpf, name: &str| ebpf.take_map(name).ok_or(format!("no {name} map"));
    let maps = Maps {
        sessions: BpfHashMap::try_from(take(&mut ebpf, "SESSIONS")?).map_err(|e| e.to_string())?,
        rules: BpfHashMap::try_from(take(&mut ebpf, "RULES")?).map_err(|e| e.to_string())?,
        approve: BpfHashMap::try_from(take(&mut ebpf, "APPROVE")?).map_err(|e| e.to_string())?,
        permits: BpfHashMap::try_from(take(&mut ebpf, "PERMITS")?).map_err(|e| e.to_string())?,
        lost: PerCpuArray::try_from(take(&mut ebpf, "LOST")?).map_err(|e| e.to_string())?,
    };
    let mut ring = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(|e| e.to_string())?;
    let backlog = read_ring(&mut ring);
    let routes = Arc::new(Mutex::new(HashMap::new()));
    let (gate_tx, gate_rx) = oneshot::channel();
    spawn_reader(ring, routes.clone(), gate_rx)?;
    Ok((
        path,
        Loaded {
            _ebpf: ebpf,
            _links: links,
            maps: Mutex::new(maps),
            routes,
            reader_gate: Mutex::new(Some(gate_tx)),
            backlog: Mutex::new(backlog),
        },
    ))
}

/// Loads and attaches one BPF-LSM program.
fn attach_lsm(
    ebpf: &mut aya::Ebpf,
    program: &str,
    hook: &str,
    btf: &aya::Btf,
) -> Result<FdLink, String> {
    let prog: &mut Lsm = ebpf
        .program_mut(program)
        .ok_or(format!("no {program} program"))?
        .try_into()
        .map_err(|e: aya::programs::ProgramError| e.to_string())?;
    prog.load(hook, btf).map_err(|e| e.to_string())?;
    let id = prog.attach().map_err(|e| e.to_string())?;
    let link = prog.take_link(id).map_err(|e| e.to_string())?;
    Ok(link.into())
}

/// aya's errors carry the verifier's log after the first line; the path's name needs only
/// the reason.
fn first_line(s: &str) -> String {
    let line = s.lines().next().unwrap_or("").trim();
    // An empty verifier log (the kernel refused before verifying) says nothing.
    line.strip_suffix("Verifier output:")
        .map(|l| l.trim_end().trim_end_matches('.'))
        .unwrap_or(line)
        .to_string()
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
        let Ok(mut fd) = crate::system::async_fd::register(logger) else {
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

/// Now on the programs' clock (CLOCK_BOOTTIME, ns).
fn boot_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Wall-clock seconds at boot: adds to the programs' CLOCK_BOOTTIME stamps.
fn boot_epoch() -> f64 {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .map(|ts| ts.tv_sec() as f64 + ts.tv_nsec() as f64 / 1e9)
        .unwrap_or(0.0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    now - boot
}

fn spawn_reader(
    ring: RingBuf<MapData>,
    routes: Arc<Mutex<HashMap<u64, Route>>>,
    gate: oneshot::Receiver<()>,
) -> Result<(), String> {
    let mut fd =
        crate::system::async_fd::register(ring).map_err(|e| format!("events ring buffer: {e}"))?;
    let epoch = boot_epoch();
    tokio::spawn(async move {
        // Events a previous agent left in the ring belong to sessions that get their
        // routes back during reconciliation: read nothing before.
        let _ = gate.await;
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

/// The next event in the ring, if any.
fn next_event(ring: &mut RingBuf<MapData>) -> Option<Option<common::ExecEvent>> {
    let item = ring.next()?;
    // The programs write exactly one ExecEvent per record.
    Some(crate::system::bpf::exec_event(&item))
}

/// Everything waiting in the ring (at most its 1 MiB of events).
fn read_ring(ring: &mut RingBuf<MapData>) -> Vec<common::ExecEvent> {
    let mut events = Vec::new();
    while let Some(next) = next_event(ring) {
        events.extend(next);
    }
    events
}

fn drain(ring: &mut RingBuf<MapData>, epoch: f64, routes: &Mutex<HashMap<u64, Route>>) {
    while let Some(next) = next_event(ring) {
        if let Some(raw) = next {
            dispatch(&raw, epoch, routes);
        }
    }
    // A session that lost events hears of it even if it makes no more.
    for route in lock(routes).values_mut() {
        route.flush_lost();
    }
}

fn dispatch(raw: &common::ExecEvent, epoch: f64, routes: &Mutex<HashMap<u64, Route>>) {
    let mut routes = lock(routes);
    let Some(route) = routes.get_mut(&raw.cgroup_id) else {
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
        common::RULE_APPROVAL => Some("held for approval, and not approved".to_string()),
        common::RULE_MAP_EXEC => {
            Some("executable mapping of a file the profile does not cover".to_string())
        }
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
    route.deliver(event);
}
