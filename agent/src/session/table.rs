//! The sessions the agent knows, in memory and in `sessions.json`, so that a restarted
//! agent finds the cgroups its predecessor made.

use super::{Cgroup, Layout, SessionKind};
use crate::fsutil;
use crate::grant::GrantId;
use crate::profile::Limits;
use crate::sync::lock;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use usher_wire::control::SessionSummary;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub jti: String,
    /// The grant's issuer; empty in records from before grants were keyed by (iss, jti).
    #[serde(default)]
    pub iss: String,
    pub login: String,
    pub profile: String,
    pub kind: SessionKind,
    pub cgroup: PathBuf,
    /// The cgroup v1 groups that hold the session's limits (hybrid hosts).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub limit_cgroups: Vec<PathBuf>,
    pub started_at: i64,
}

impl SessionRecord {
    pub fn grant_id(&self) -> GrantId {
        GrantId {
            iss: self.iss.clone(),
            jti: self.jti.clone(),
        }
    }

    /// The session's cgroup with everything that belongs to it, to adopt or remove.
    pub fn open_cgroup(&self) -> std::io::Result<Cgroup> {
        Cgroup::open_with_limit_groups(&self.cgroup, &self.limit_cgroups)
    }
}

struct Live {
    record: SessionRecord,
    cgroup: Arc<Cgroup>,
    end: watch::Sender<Option<String>>,
    attached: bool,
    commands: u64,
}

pub struct SessionTable {
    path: PathBuf,
    layout: Mutex<Option<Layout>>,
    live: Mutex<BTreeMap<String, Live>>,
    leftovers: Mutex<Vec<SessionRecord>>,
}

impl SessionTable {
    pub fn open(path: &Path) -> std::io::Result<SessionTable> {
        let leftovers: Vec<SessionRecord> = match std::fs::read(path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        Ok(SessionTable {
            path: path.to_owned(),
            layout: Mutex::new(None),
            live: Mutex::new(BTreeMap::new()),
            leftovers: Mutex::new(leftovers),
        })
    }

    /// Whether process `pid` runs inside one of the live sessions' cgroups.
    pub fn holds_process(&self, pid: i32) -> bool {
        let Some(dir) = crate::guard::approval::proc_info::cgroup_dir_of(pid) else {
            return false;
        };
        lock(&self.live)
            .values()
            .any(|l| dir.starts_with(l.cgroup.path()))
    }

    /// Sessions recorded by a previous run of the agent, to reconcile once.
    pub fn leftovers(&self) -> Vec<SessionRecord> {
        std::mem::take(&mut *lock(&self.leftovers))
    }

    /// Makes session `id`'s cgroup, held to `limits` (see `Cgroup::create` for a limit
    /// that cannot be applied).
    pub fn create_cgroup(&self, id: &str, limits: &Limits) -> std::io::Result<Cgroup> {
        let layout = {
            let mut layout = lock(&self.layout);
            if layout.is_none() {
                *layout = Some(Layout::discover()?);
            }
            layout.clone().expect("set above")
        };
        let limits = limits.resolve(super::cgroup::host_ram_bytes()?);
        Cgroup::create(&layout, id, &limits)
    }

    /// Adds a session; the receiver learns why, if its grant ends while it runs.
    pub fn register(
        &self,
        id: &str,
        grant: &GrantId,
        login: &str,
        profile: &str,
        kind: SessionKind,
        cgroup: Arc<Cgroup>,
    ) -> watch::Receiver<Option<String>> {
        let (end, rx) = watch::channel(None);
        let record = SessionRecord {
            id: id.into(),
            jti: grant.jti.clone(),
            iss: grant.iss.clone(),
            login: login.into(),
            profile: profile.into(),
            kind,
            cgroup: cgroup.path().to_owned(),
            limit_cgroups: cgroup.limit_groups().to_vec(),
            started_at: crate::grant::now(),
        };
        lock(&self.live).insert(
            id.into(),
            Live {
                record,
                cgroup,
                end,
                attached: true,
                commands: 0,
            },
        );
        self.save();
        rx
    }

    /// A session from before a restart whose processes still run.
    pub fn adopt(&self, record: SessionRecord, cgroup: Arc<Cgroup>) {
        let (end, _) = watch::channel(None);
        lock(&self.live).insert(
            record.id.clone(),
            Live {
                record,
                cgroup,
                end,
                attached: false,
                commands: 0,
            },
        );
        self.save();
    }

    pub fn contains(&self, id: &str) -> bool {
        lock(&self.live).contains_key(id)
    }

    pub fn count_command(&self, id: &str) {
        if let Some(l) = lock(&self.live).get_mut(id) {
            l.commands += 1;
        }
    }

    /// The main process ended. Returns the cgroup to remove if nothing is left in it;
    /// otherwise the session stays listed, detached, until its grant ends.
    pub fn finish(&self, id: &str) -> Option<Arc<Cgroup>> {
        let mut live = lock(&self.live);
        let entry = live.get_mut(id)?;
        if entry.cgroup.is_populated() {
            entry.attached = false;
            return None;
        }
        let cgroup = live.remove(id).map(|l| l.cgroup);
        drop(live);
        self.save();
        cgroup
    }

    /// Tells every session of the grant why it ends; returns their cgroups to kill.
    pub fn end_grant(&self, grant: &GrantId, why: &str) -> Vec<(String, Arc<Cgroup>)> {
        lock(&self.live)
            .values()
            .filter(|l| l.record.grant_id() == *grant)
            .map(|l| {
                let _ = l.end.send(Some(why.to_string()));
                (l.record.id.clone(), l.cgroup.clone())
            })
            .collect()
    }

    pub fn forget(&self, id: &str) {
        lock(&self.live).remove(id);
        self.save();
    }

    pub fn list(&self) -> Vec<SessionSummary> {
        lock(&self.live)
            .values()
            .map(|l| SessionSummary {
                id: l.record.id.clone(),
                kind: l.record.kind,
                jti: l.record.jti.clone(),
                iss: l.record.iss.clone(),
                login: l.record.login.clone(),
                started_at: l.record.started_at,
                attached: l.attached,
                commands: l.commands,
            })
            .collect()
    }

    fn save(&self) {
        let records: Vec<SessionRecord> = lock(&self.live)
            .values()
            .map(|l| l.record.clone())
            .collect();
        let result = serde_json::to_vec_pretty(&records)
            .map_err(std::io::Error::other)
            .and_then(|b| fsutil::write_atomic(&self.path, &b, 0o600));
        if let Err(e) = result {
            log::error!(target: "usher::session", "cannot write {}: {e}", self.path.display());
        }
    }
}
