//! Profiles (`policies/*.toml`): what a session may do beyond having a shell — port
//! forwarding, the console, and the exec rules enforced in the kernel.

use crate::enforce::ExecPolicy;
use crate::guard::mask::MaskRules;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `ssh -L` (direct-tcpip) to any address the host can reach.
    #[serde(default)]
    pub port_forwarding: bool,
    /// Local logins at the console (see issue 6).
    #[serde(default)]
    pub console: bool,
    /// Desktops over RDP, and what may cross between the client and the desktop.
    #[serde(default)]
    pub rdp: bool,
    #[serde(default)]
    pub rdp_clipboard: bool,
    #[serde(default)]
    pub rdp_drives: bool,
    #[serde(default)]
    pub exec: ExecPolicy,
    /// Who approves the commands `[exec] approve` and `approve_commands` hold, and how.
    #[serde(default)]
    pub approval: ApprovalPolicy,
    /// What is masked in the session's text before the client or the recording sees it.
    #[serde(default)]
    pub mask: crate::guard::mask::MaskConfig,
    /// How much a session's recording may take, and what happens at the limit.
    #[serde(default)]
    pub recording: RecordingLimits,
    /// What one session may take from the host (its cgroup's limits).
    #[serde(default)]
    pub limits: Limits,
}

/// `[approval]` of a profile.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ApprovalPolicy {
    /// Who may approve (`group:NAME`, or a subject or e-mail address); empty: anyone with
    /// the approver role on the central service, and root on the host.
    #[serde(default)]
    pub approvers: Vec<String>,
    /// How many distinct approvers it takes.
    #[serde(default = "one")]
    pub required: u32,
    /// No decision in this time is a denial.
    #[serde(default = "two_minutes")]
    pub timeout_secs: u64,
}

impl ApprovalPolicy {
    pub fn validate(&self) -> Result<(), ApprovalError> {
        if self.required == 0 {
            return Err(ApprovalError::NoApprovers);
        }
        if self.timeout_secs == 0 {
            return Err(ApprovalError::NoTime);
        }
        Ok(())
    }
}

fn one() -> u32 {
    1
}

fn two_minutes() -> u64 {
    120
}

impl Default for ApprovalPolicy {
    fn default() -> Self {
        ApprovalPolicy {
            approvers: Vec::new(),
            required: one(),
            timeout_secs: two_minutes(),
        }
    }
}

/// A profile file the agent cannot use; the agent does not start (or reload) with it.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("{}: {source}", path.display())]
    Limits { path: PathBuf, source: LimitsError },
    #[error("{}: {source}", path.display())]
    Approval {
        path: PathBuf,
        source: ApprovalError,
    },
    #[error("{}: {source}", path.display())]
    Mask {
        path: PathBuf,
        source: crate::guard::mask::MaskConfigError,
    },
}

/// `[approval]` values that parse but cannot be meant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("approval.required = 0 would let every held command run unapproved")]
    NoApprovers,
    #[error("approval.timeout_secs = 0 would deny every held command at once")]
    NoTime,
}

/// `[limits]` values that parse but cannot be meant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LimitsError {
    #[error("limits.cpu_weight = {0}: it must be 1..=10000")]
    CpuWeight(u32),
    #[error("limits.pids_max = 0 would not even allow the shell")]
    NoProcesses,
    #[error("limits.memory_max = 0 would not even allow the shell")]
    NoMemory,
}

/// A memory size that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MemorySizeError {
    #[error("{0:?} is not a memory size: write bytes, a number with K, M, G or T, a percentage of RAM (\"25%\") or \"max\"")]
    NotASize(String),
    #[error("{0:?}: a percentage of RAM must be 1%..=100%")]
    PercentOutOfRange(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

#[derive(Debug, Clone, Default)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
    /// The compiled `[mask]` of each profile that masks something, compiled once per load
    /// and shared by every session of the profile.
    masks: BTreeMap<String, Arc<MaskRules>>,
}

impl Profiles {
    /// Reads every `*.toml` of `dir`. Without the directory, only the built-in `default`
    /// profile (a shell, no forwarding, no exec restriction) exists.
    pub fn load(dir: &Path) -> Result<Profiles, ProfileError> {
        let mut by_name = BTreeMap::new();
        by_name.insert("default".to_string(), Profile::builtin_default());
        let mut masks = BTreeMap::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Profiles { by_name, masks })
            }
            Err(source) => {
                return Err(ProfileError::Read {
                    path: dir.to_owned(),
                    source,
                })
            }
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text = std::fs::read_to_string(&path).map_err(|source| ProfileError::Read {
                path: path.clone(),
                source,
            })?;
            let profile: Profile = toml::from_str(&text).map_err(|source| ProfileError::Parse {
                path: path.clone(),
                source: Box::new(source),
            })?;
            profile
                .limits
                .validate()
                .map_err(|source| ProfileError::Limits {
                    path: path.clone(),
                    source,
                })?;
            profile
                .approval
                .validate()
                .map_err(|source| ProfileError::Approval {
                    path: path.clone(),
                    source,
                })?;
            // A mask that cannot be compiled would leave secrets on screen: refuse the
            // profile now rather than at the first session. One that masks nothing gets
            // no rules at all: its sessions spend nothing on masking.
            let rules = MaskRules::compile(&profile.mask).map_err(|source| ProfileError::Mask {
                path: path.clone(),
                source,
            })?;
            if rules.is_empty() {
                masks.remove(&profile.name);
            } else {
                masks.insert(profile.name.clone(), rules);
            }
            by_name.insert(profile.name.clone(), profile);
        }
        Ok(Profiles { by_name, masks })
    }

    /// The compiled `[mask]` of `name`; `None` when the profile masks nothing (its
    /// sessions get no masker at all).
    pub fn mask(&self, name: &str) -> Option<Arc<MaskRules>> {
        self.masks.get(name).cloned()
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.by_name.keys().cloned().collect()
    }
}

impl Profile {
    fn builtin_default() -> Profile {
        Profile {
            name: "default".into(),
            description: "a shell; no forwarding; every exec audited, none blocked".into(),
            port_forwarding: false,
            console: false,
            rdp: false,
            rdp_clipboard: false,
            rdp_drives: false,
            exec: ExecPolicy::default(),
            approval: ApprovalPolicy::default(),
            mask: Default::default(),
            recording: RecordingLimits::default(),
            limits: Limits::default(),
        }
    }
}

/// `[limits]`: a session's share of the host, written into its cgroup. A value the
/// profile leaves out gets a default (`DEFAULT_*`) so that no session is unbounded by
/// accident; `"max"` lifts a limit on purpose.
///
/// A limit the profile sets explicitly is a promise: if the host cannot apply it (no such
/// controller), the session is refused. A default that cannot be applied is reported
/// (journal, session metadata) and the session goes on: an access tool that locks every
/// administrator out of a host whose kernel lacks a controller helps nobody.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Processes and threads in the session (`pids.max`): a number or `"max"`.
    pub pids_max: Option<Count>,
    /// Memory of the session, swap included (`memory.max` with `memory.swap.max = 0`;
    /// `memory.limit_in_bytes` and `memory.memsw.limit_in_bytes` on cgroup v1): bytes as a
    /// number, or a string `"512M"`, `"2G"` (K, M, G, T are powers of 1024), `"25%"` (of
    /// the host's RAM) or `"max"`.
    pub memory_max: Option<MemorySize>,
    /// CPU share under contention, as cgroup v2's `cpu.weight` (1..=10000, a service's
    /// default is 100); `cpu.shares = weight * 1024 / 100` on cgroup v1.
    pub cpu_weight: Option<u32>,
}

/// A session of a profile without `[limits]` holds at most this many processes and threads.
pub const DEFAULT_PIDS_MAX: u64 = 4096;
/// ... this share of the host's RAM, in percent ...
pub const DEFAULT_MEMORY_PERCENT: u8 = 25;
/// ... and this CPU weight (that of any service).
pub const DEFAULT_CPU_WEIGHT: u32 = 100;

/// A count or no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Max,
    At(u64),
}

/// A memory size as a profile writes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemorySize {
    Max,
    Bytes(u64),
    /// Percent of the host's RAM (1..=100).
    Percent(u8),
}

/// One limit resolved for this host: the value, and whether the profile asked for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resolved<T> {
    pub value: T,
    pub explicit: bool,
}

/// The limits a session gets here, defaults filled in and percentages turned into bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionLimits {
    /// `None`: no limit.
    pub pids_max: Resolved<Option<u64>>,
    pub memory_max: Resolved<Option<u64>>,
    pub cpu_weight: Resolved<u32>,
}

impl Limits {
    /// Checks what serde cannot: ranges.
    pub fn validate(&self) -> Result<(), LimitsError> {
        if let Some(w) = self.cpu_weight {
            if !(1..=10000).contains(&w) {
                return Err(LimitsError::CpuWeight(w));
            }
        }
        if self.pids_max == Some(Count::At(0)) {
            return Err(LimitsError::NoProcesses);
        }
        if self.memory_max == Some(MemorySize::Bytes(0)) {
            return Err(LimitsError::NoMemory);
        }
        Ok(())
    }

    /// Fills in the defaults; `ram_bytes` is the host's RAM (for percentages).
    pub fn resolve(&self, ram_bytes: u64) -> SessionLimits {
        // Whole MiB: page-aligned, so the kernel keeps the value as written.
        let percent = |p: u8| (ram_bytes / 100 * u64::from(p)) & !((1 << 20) - 1);
        SessionLimits {
            pids_max: Resolved {
                value: match self.pids_max.unwrap_or(Count::At(DEFAULT_PIDS_MAX)) {
                    Count::Max => None,
                    Count::At(n) => Some(n),
                },
                explicit: self.pids_max.is_some(),
            },
            memory_max: Resolved {
                value: match self
                    .memory_max
                    .unwrap_or(MemorySize::Percent(DEFAULT_MEMORY_PERCENT))
                {
                    MemorySize::Max => None,
                    MemorySize::Bytes(b) => Some(b),
                    MemorySize::Percent(p) => Some(percent(p)),
                },
                explicit: self.memory_max.is_some(),
            },
            cpu_weight: Resolved {
                value: self.cpu_weight.unwrap_or(DEFAULT_CPU_WEIGHT),
                explicit: self.cpu_weight.is_some(),
            },
        }
    }
}

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Count::At(n)),
            Raw::S(s) if s == "max" => Ok(Count::Max),
            Raw::S(s) => Err(serde::de::Error::custom(format!(
                "{s:?} is not a count: write a number or \"max\""
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for MemorySize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(MemorySize::Bytes(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl std::str::FromStr for MemorySize {
    type Err = MemorySizeError;

    fn from_str(s: &str) -> Result<Self, MemorySizeError> {
        let bad = || MemorySizeError::NotASize(s.to_string());
        let t = s.trim();
        if t == "max" {
            return Ok(MemorySize::Max);
        }
        if let Some(p) = t.strip_suffix('%') {
            let p: u8 = p.trim().parse().map_err(|_| bad())?;
            if !(1..=100).contains(&p) {
                return Err(MemorySizeError::PercentOutOfRange(s.to_string()));
            }
            return Ok(MemorySize::Percent(p));
        }
        let (digits, shift) = match t.char_indices().last() {
            Some((i, c)) if c.is_ascii_alphabetic() => {
                let shift = match c.to_ascii_uppercase() {
                    'K' => 10,
                    'M' => 20,
                    'G' => 30,
                    'T' => 40,
                    _ => return Err(bad()),
                };
                (&t[..i], shift)
            }
            _ => (t, 0),
        };
        let n: u64 = digits.trim().parse().map_err(|_| bad())?;
        n.checked_mul(1u64 << shift)
            .map(MemorySize::Bytes)
            .ok_or_else(|| MemorySizeError::TooLarge(s.to_string()))
    }
}

/// A profile's `[recording]` section.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingLimits {
    /// Bytes one session's recording may take on disk (cast and audit stream).
    pub max_bytes: u64,
    /// Bytes per second the recording may grow by; past it the session's output is
    /// slowed down (its terminal is read more slowly), not dropped. 0: no limit.
    pub max_bytes_per_sec: u64,
    /// What happens when `max_bytes` or the spool's limit is reached.
    pub at_limit: AtLimit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AtLimit {
    /// The session is closed, with the reason on its terminal and in the recording.
    End,
    /// The session goes on unrecorded from there; the cast and its metadata say where
    /// and why it was cut.
    Truncate,
}

impl Default for RecordingLimits {
    fn default() -> Self {
        RecordingLimits {
            max_bytes: 1 << 30,
            max_bytes_per_sec: 0,
            at_limit: AtLimit::End,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let profiles = Profiles::load(&dir).unwrap();
        for name in ["default", "restricted", "no-network-tools", "guarded"] {
            let p = profiles
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            p.exec.resolve().unwrap();
        }
        assert_eq!(
            profiles.get("restricted").unwrap().exec.mode,
            crate::enforce::ExecMode::Allow
        );
    }

    #[test]
    fn a_broken_profile_is_an_error_with_its_file_name() {
        let dir = std::env::temp_dir().join(format!("usher-profiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.toml"),
            "name = \"x\"\n[exec]\nmode = \"sometimes\"\n",
        )
        .unwrap();
        match Profiles::load(&dir) {
            Err(ProfileError::Parse { path, .. }) => assert!(path.ends_with("bad.toml")),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn approvals_need_an_approver_and_time() {
        let p: Profile = toml::from_str(
            "name = \"g\"\n[exec]\napprove = [\"/usr/sbin\"]\napprove_commands = [\"systemctl *\"]\n[approval]\nrequired = 2\n",
        )
        .unwrap();
        assert_eq!(p.approval.required, 2);
        assert_eq!(p.approval.timeout_secs, 120);
        assert_eq!(p.approval.validate(), Ok(()));
        let p: Profile = toml::from_str("name = \"g\"\n[approval]\nrequired = 0\n").unwrap();
        assert_eq!(p.approval.validate(), Err(ApprovalError::NoApprovers));
        let p: Profile = toml::from_str("name = \"g\"\n[approval]\ntimeout_secs = 0\n").unwrap();
        assert_eq!(p.approval.validate(), Err(ApprovalError::NoTime));
        assert!(toml::from_str::<Profile>("name = \"g\"\n[approval]\nrequire = 1\n").is_err());
    }

    #[test]
    fn limits_parse_with_units_percentages_and_max() {
        let p: Profile = toml::from_str(
            "name = \"x\"\n[limits]\npids_max = 64\nmemory_max = \"256M\"\ncpu_weight = 50\n",
        )
        .unwrap();
        assert_eq!(p.limits.pids_max, Some(Count::At(64)));
        assert_eq!(p.limits.memory_max, Some(MemorySize::Bytes(256 << 20)));
        let r = p.limits.resolve(1 << 30);
        assert_eq!(r.pids_max.value, Some(64));
        assert!(r.pids_max.explicit && r.memory_max.explicit && r.cpu_weight.explicit);
        assert_eq!(r.cpu_weight.value, 50);
        for (text, want) in [
            ("max", MemorySize::Max),
            ("1073741824", MemorySize::Bytes(1 << 30)),
            ("2g", MemorySize::Bytes(2 << 30)),
            ("10%", MemorySize::Percent(10)),
        ] {
            assert_eq!(text.parse::<MemorySize>().unwrap(), want, "{text}");
        }
        for bad in ["", "12Q", "-1", "lots", "%", "x%"] {
            assert_eq!(
                bad.parse::<MemorySize>(),
                Err(MemorySizeError::NotASize(bad.into()))
            );
        }
        for bad in ["0%", "101%"] {
            assert_eq!(
                bad.parse::<MemorySize>(),
                Err(MemorySizeError::PercentOutOfRange(bad.into()))
            );
        }
        assert_eq!(
            "99999999999T".parse::<MemorySize>(),
            Err(MemorySizeError::TooLarge("99999999999T".into()))
        );
        let p: Profile = toml::from_str("name = \"x\"\n[limits]\npids_max = \"max\"\n").unwrap();
        assert_eq!(p.limits.resolve(0).pids_max.value, None);
        assert!(
            toml::from_str::<Profile>("name = \"x\"\n[limits]\npids_max = \"many\"\n").is_err()
        );
        assert!(toml::from_str::<Profile>("name = \"x\"\n[limits]\nswap = 1\n").is_err());
    }

    #[test]
    fn a_profile_without_limits_gets_the_defaults() {
        let p: Profile = toml::from_str("name = \"x\"\n").unwrap();
        let r = p.limits.resolve(100 << 30);
        assert_eq!(r.pids_max.value, Some(DEFAULT_PIDS_MAX));
        assert_eq!(r.memory_max.value, Some(25 << 30));
        assert_eq!(
            p.limits.resolve(1_000_000_007).memory_max.value,
            Some(238 << 20)
        );
        assert_eq!(r.cpu_weight.value, DEFAULT_CPU_WEIGHT);
        assert!(!r.pids_max.explicit && !r.memory_max.explicit && !r.cpu_weight.explicit);
    }

    #[test]
    fn out_of_range_limits_are_refused_with_the_file_name() {
        let dir = std::env::temp_dir().join(format!("usher-limits-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("w.toml"),
            "name = \"w\"\n[limits]\ncpu_weight = 0\n",
        )
        .unwrap();
        match Profiles::load(&dir) {
            Err(ProfileError::Limits {
                path,
                source: LimitsError::CpuWeight(0),
            }) => assert!(path.ends_with("w.toml")),
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_mask_that_cannot_compile_refuses_the_profile() {
        use crate::guard::mask::MaskConfigError;
        let dir = std::env::temp_dir().join(format!("usher-mask-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (body, want_detector) in [
            ("[mask]\ndetectors = [\"credit_kard\"]\n", true),
            ("[mask]\npatterns = [\"secret-(\"]\n", false),
        ] {
            std::fs::write(dir.join("m.toml"), format!("name = \"m\"\n{body}")).unwrap();
            match Profiles::load(&dir) {
                Err(ProfileError::Mask {
                    source: MaskConfigError::UnknownDetector(name, _),
                    ..
                }) if want_detector => assert_eq!(name, "credit_kard"),
                Err(ProfileError::Mask {
                    source: MaskConfigError::BadPattern(..),
                    path,
                }) if !want_detector => assert!(path.ends_with("m.toml")),
                other => panic!("{other:?}"),
            }
        }
        std::fs::write(
            dir.join("m.toml"),
            "name = \"m\"\n[mask]\ndetectors = [\"email\"]\npatterns = [\"x-[0-9]+\"]\n",
        )
        .unwrap();
        assert!(Profiles::load(&dir).unwrap().get("m").is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
