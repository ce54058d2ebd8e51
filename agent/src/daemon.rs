//! The agent: the stages of the journey wired together, and the decisions that span them
//! (a grant's end ends its sessions and, with the last grant, its account).

use crate::account::{Account, Accounts};
use crate::config::Config;
use crate::enforce::{Enforcement, Enforcer, ExecEvent};
use crate::grant::{self, Grant, GrantStore, Refusal, Revocations, Verifier};
use crate::profile::{Profile, Profiles};
use crate::session::{Cgroup, SessionKind, SessionTable};
use crate::sync::lock;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;

pub struct Agent {
    pub config: Config,
    pub host: String,
    verifier: Mutex<Arc<Verifier>>,
    profiles: Mutex<Arc<Profiles>>,
    grants: Mutex<GrantStore>,
    revocations: Mutex<Revocations>,
    accounts: Mutex<Accounts>,
    pub sessions: SessionTable,
    pub enforcer: Enforcer,
    pub started_at: i64,
    pub shipper: std::sync::OnceLock<Arc<crate::ship::Shipper>>,
    lost_reported: std::sync::atomic::AtomicU64,
}

impl crate::ship::LiveSessions for Agent {
    fn is_live(&self, session_id: &str) -> bool {
        self.sessions.contains(session_id)
    }
}

/// What a new session needs from the agent before its process starts.
pub struct SessionGrant {
    pub session_id: String,
    pub account: Account,
    pub cgroup: Arc<Cgroup>,
    pub profile: Profile,
    pub exec_events: Option<mpsc::UnboundedReceiver<ExecEvent>>,
    pub enforced: bool,
    /// Says why, when the grant ends while the session runs.
    pub ended: tokio::sync::watch::Receiver<Option<String>>,
}

impl Agent {
    /// Loads state, reconciles accounts and sessions with the live grants, starts the
    /// enforcement programs.
    pub fn start(config: Config) -> Result<Arc<Agent>, String> {
        let agent = Self::build(config, true)?;
        agent.reconcile(agent.started_at);
        Ok(agent)
    }

    /// The agent's state without its kernel programs or reconciliation, for one-shot
    /// maintenance (`usherd --remove-accounts`).
    pub fn start_offline(config: Config) -> Result<Arc<Agent>, String> {
        Self::build(config, false)
    }

    fn build(config: Config, online: bool) -> Result<Arc<Agent>, String> {
        let now = grant::now();
        crate::fsutil::private_dir(&config.state_dir, 0o700)
            .map_err(|e| format!("{}: {e}", config.state_dir.display()))?;
        crate::fsutil::private_dir(&config.spool_dir, 0o700)
            .map_err(|e| format!("{}: {e}", config.spool_dir.display()))?;
        let profiles = Profiles::load(&config.policies_dir)?;
        let verifier = Verifier::from_config(&config, profiles.names())?;
        let revocations =
            Revocations::open(&config.state_dir.join("revoked.json")).map_err(|e| e.to_string())?;
        let (grants, dropped) = GrantStore::open(
            &config.state_dir.join("grants"),
            &verifier,
            &revocations,
            now,
        )
        .map_err(|e| format!("grant store: {e}"))?;
        for (jti, why) in dropped {
            let reason = why.to_string();
            audit!("grant_ended", jti = jti.as_str(), reason = reason.as_str(); "grant {jti} dropped at start-up: {why}");
        }
        let accounts = Accounts::open(&config.accounts, &config.login_shell(), &config.state_dir)
            .map_err(|e| e.to_string())?;
        let enforcer = Enforcer::start(if online {
            config.enforcement
        } else {
            Enforcement::Off
        });
        log::info!(target: "usher::enforce", enforcement_path = enforcer.path().to_string().as_str(); "exec enforcement: {} (mode {:?})", enforcer.path(), config.enforcement);
        let sessions = SessionTable::open(&config.state_dir.join("sessions.json"))
            .map_err(|e| format!("session table: {e}"))?;
        let agent = Arc::new(Agent {
            host: config.host_name(),
            verifier: Mutex::new(Arc::new(verifier)),
            profiles: Mutex::new(Arc::new(profiles)),
            grants: Mutex::new(grants),
            revocations: Mutex::new(revocations),
            accounts: Mutex::new(accounts),
            sessions,
            enforcer,
            started_at: now,
            shipper: std::sync::OnceLock::new(),
            lost_reported: std::sync::atomic::AtomicU64::new(0),
            config,
        });
        Ok(agent)
    }

    /// After a crash or reboot: sessions whose grant is gone are killed, those whose grant
    /// lives get their exec profile back; accounts without a live grant are removed.
    fn reconcile(self: &Arc<Self>, now: i64) {
        for rec in self.sessions.leftovers() {
            let live = lock(&self.grants)
                .get(&rec.jti)
                .map(|g| g.is_live(now))
                .unwrap_or(false);
            let cgroup = match rec.open_cgroup() {
                Ok(c) => c,
                Err(_) => {
                    self.sessions.forget(&rec.id);
                    continue;
                }
            };
            if live && cgroup.is_populated() {
                let profile = self.profile(&rec.profile);
                let (tx, rx) = mpsc::unbounded_channel();
                if self.enforcer.attach(cgroup.id(), &profile.exec, tx).is_ok() {
                    crate::session::append_exec_events(
                        self.config
                            .spool_dir
                            .join(format!("{}.audit.jsonl", rec.id)),
                        rx,
                    );
                }
                self.sessions.adopt(rec, Arc::new(cgroup));
            } else {
                let _ = cgroup.kill_and_remove();
                self.sessions.forget(&rec.id);
                crate::session::mark_interrupted(&self.config.spool_dir, &rec.id);
                audit!("session_ended", session = rec.id.as_str(), jti = rec.jti.as_str(); "session {} ended while the agent was down", rec.id);
            }
        }
        let keep: BTreeSet<String> = lock(&self.grants)
            .iter()
            .filter(|g| g.is_live(now))
            .map(|g| g.login().to_string())
            .collect();
        let orphans = lock(&self.accounts).orphans(&keep);
        match orphans {
            Ok(names) => {
                for name in names {
                    self.remove_account(&name, "no live grant at start-up");
                }
            }
            Err(e) => log::error!(target: "usher::account", "reconciliation failed: {e}"),
        }
    }

    pub fn profile(&self, name: &str) -> Profile {
        let profiles = lock(&self.profiles).clone();
        profiles.get(name).cloned().unwrap_or_else(|| {
            // A grant is only admitted with a known profile; if a reload removed it, the
            // session gets nothing beyond the built-in default.
            profiles.get("default").cloned().expect("built-in profile")
        })
    }

    /// Verifies a token, checks it against revocations and stores it.
    pub fn admit(&self, token: &str, how: &str) -> Result<Grant, Refusal> {
        let now = grant::now();
        let verifier = lock(&self.verifier).clone();
        let result = verifier.verify(token, now).and_then(|g| {
            if lock(&self.revocations).contains(g.jti()) {
                Err(Refusal::Revoked(g.jti().to_string()))
            } else {
                Ok(g)
            }
        });
        match &result {
            Ok(g) => {
                let new = lock(&self.grants).insert(g.clone()).unwrap_or_else(|e| {
                    log::error!(target: "usher::grant", "cannot store grant {}: {e}", g.jti());
                    false
                });
                if new {
                    audit!("grant_accepted", jti = g.jti(), sub = g.claims.sub.as_str(), login = g.login(), via = how, expires = g.expires_at();
                        "grant {} for {} as {} accepted ({how}), ends at {}", g.jti(), g.claims.sub, g.login(), g.expires_at());
                }
            }
            Err(why) => {
                let reason = why.to_string();
                audit!("grant_refused", via = how, reason = reason.as_str(); "grant refused ({how}): {why}");
            }
        }
        result
    }

    /// The live grant for `login` bound to `key`, if any.
    pub fn grant_for_key(&self, login: &str, key: &russh::keys::PublicKey) -> Option<Grant> {
        let now = grant::now();
        let grants = lock(&self.grants);
        let revoked = lock(&self.revocations);
        grants
            .live_for_login(login, now)
            .into_iter()
            .find(|g| g.binds_key(key) && !revoked.contains(g.jti()))
            .cloned()
    }

    pub fn is_live(&self, jti: &str) -> bool {
        let now = grant::now();
        !lock(&self.revocations).contains(jti)
            && lock(&self.grants)
                .get(jti)
                .map(|g| g.is_live(now))
                .unwrap_or(false)
    }

    pub fn grants(&self) -> Vec<Grant> {
        lock(&self.grants).iter().cloned().collect()
    }

    pub fn account_names(&self) -> Vec<String> {
        lock(&self.accounts).names()
    }

    /// Everything a session needs before its process starts: the account (made on first
    /// use), a cgroup, and the exec profile loaded in the kernel. Errors are said to the
    /// client as they are.
    pub async fn open_session(
        self: &Arc<Self>,
        grant: &Grant,
        kind: SessionKind,
    ) -> Result<SessionGrant, String> {
        if !self.is_live(grant.jti()) {
            return Err("the grant has ended".into());
        }
        let profile = self.profile(&grant.profile);
        if self.config.enforcement == Enforcement::Required && !self.enforcer.is_enforcing() {
            log::error!(target: "usher::enforce", "session refused: enforcement is required but {}", self.enforcer.path());
            return Err(format!(
                "exec enforcement is required on this host but is {}",
                self.enforcer.path()
            ));
        }
        self.wait_for_spool_room().await?;
        let account = self.ensure_account(grant).await?;
        let session_id = crate::session::new_session_id();
        let cgroup = self
            .sessions
            .create_cgroup(&session_id, &profile.limits)
            .map_err(|e| {
                log::error!(target: "usher::session", "cannot create a cgroup: {e}");
                format!("the session's cgroup could not be created: {e}")
            })?;
        let (tx, rx) = mpsc::unbounded_channel();
        let enforced = match self.enforcer.attach(cgroup.id(), &profile.exec, tx) {
            Ok(()) => true,
            Err(e) if self.config.enforcement == Enforcement::Required => {
                let _ = cgroup.kill_and_remove();
                log::error!(target: "usher::enforce", "session refused: {e}");
                return Err(format!("exec enforcement could not be set up: {e}"));
            }
            Err(_) => false,
        };
        let cgroup = Arc::new(cgroup);
        let ended = self.sessions.register(
            &session_id,
            grant.jti(),
            grant.login(),
            &grant.profile,
            kind,
            cgroup.clone(),
        );
        Ok(SessionGrant {
            session_id,
            account,
            cgroup,
            profile,
            exec_events: enforced.then_some(rx),
            enforced,
            ended,
        })
    }

    async fn ensure_account(self: &Arc<Self>, grant: &Grant) -> Result<Account, String> {
        let agent = self.clone();
        let login = grant.login().to_string();
        let groups = grant.claims.groups.clone();
        let jti = grant.jti().to_string();
        tokio::task::spawn_blocking(move || {
            let now = grant::now();
            let until = {
                let grants = lock(&agent.grants);
                grants
                    .live_for_login(&login, now)
                    .first()
                    .map(|g| g.expires_at())
                    .unwrap_or(now)
            };
            let result = lock(&agent.accounts).ensure(&login, &groups, until, now);
            match result {
                Ok((account, created)) => {
                    if created {
                        audit!("account_created", login = login.as_str(), uid = account.uid, jti = jti.as_str();
                            "account {login} (uid {}) created for grant {jti}", account.uid);
                    }
                    Ok(account)
                }
                Err(e) => {
                    let reason = e.to_string();
                    audit!("account_refused", login = login.as_str(), jti = jti.as_str(), reason = reason.as_str(); "account {login} not made: {e}");
                    Err(format!("the account {login} could not be prepared"))
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Re-reads issuers, policy and profiles (SIGHUP, `systemctl reload`). Live sessions,
    /// grants and accounts are untouched; listen addresses and directories need a restart.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        let profiles = Profiles::load(&config.policies_dir)?;
        let verifier = Verifier::from_config(config, profiles.names())?;
        *lock(&self.verifier) = Arc::new(verifier);
        *lock(&self.profiles) = Arc::new(profiles);
        audit!("config_reloaded", issuers = config.issuers.len(); "configuration reloaded: {} issuer(s), profiles {:?}", config.issuers.len(), lock(&self.profiles).names());
        Ok(())
    }

    /// For package removal: ends every session and removes every account this agent made.
    pub fn remove_everything(&self) {
        for rec in self.sessions.leftovers() {
            if let Ok(cg) = rec.open_cgroup() {
                let _ = cg.kill_and_remove();
            }
            self.sessions.forget(&rec.id);
        }
        let orphans = lock(&self.accounts)
            .orphans(&BTreeSet::new())
            .unwrap_or_default();
        for name in orphans {
            self.remove_account(&name, "usher is being removed");
        }
    }

    /// A spool over its size means recordings are not leaving the host: new sessions wait
    /// or are refused (config), and the reason is said; nothing already spooled is dropped.
    async fn wait_for_spool_room(&self) -> Result<(), String> {
        let limit = self.config.spool.max_bytes;
        let deadline = std::time::Instant::now() + Duration::from_secs(self.config.spool.wait_secs);
        loop {
            let used = crate::ship::spool_bytes(&self.config.spool_dir);
            if used < limit {
                return Ok(());
            }
            let waiting = self.config.spool.when_full == crate::config::WhenFull::Wait
                && std::time::Instant::now() < deadline;
            if !waiting {
                audit!("session_refused", reason = "spool full", spool_bytes = used; "session refused: the recording spool holds {used} bytes, over its limit of {limit}");
                return Err("the recording spool is full (recordings are not reaching the collector); try again later".into());
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// A grant that allows the console needs its account before anyone logs in (the
    /// console's `login` looks in /etc/passwd), with the grant's one-time secret as its
    /// password. Other grants' accounts keep a locked password.
    pub async fn prepare_console(self: &Arc<Self>, grant: &Grant) -> Result<(), String> {
        if !self.profile(&grant.profile).console {
            return Ok(());
        }
        self.ensure_account(grant).await?;
        let agent = self.clone();
        let login = grant.login().to_string();
        let hash = grant.claims.secret_hash.clone();
        let jti = grant.jti().to_string();
        tokio::task::spawn_blocking(move || {
            let r = lock(&agent.accounts).set_password(&login, hash.as_deref());
            match &r {
                Ok(()) if hash.is_some() => audit!("console_enabled", login = login.as_str(), jti = jti.as_str(); "console login enabled for {login} with the one-time secret of grant {jti}"),
                Ok(()) => {}
                Err(e) => log::error!(target: "usher::account", "cannot set the console secret of {login}: {e}"),
            }
            r.map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// The live grant that lets the account with this UID open a console session.
    pub fn console_grant_for_uid(&self, uid: u32) -> Result<Grant, String> {
        let entry = {
            let accounts = lock(&self.accounts);
            let names = accounts.names();
            names
                .iter()
                .filter_map(|n| accounts.lookup(n))
                .find(|e| e.uid == uid)
        };
        let Some(entry) = entry else {
            return Err("this account is not managed by usher".into());
        };
        let now = grant::now();
        let grants = lock(&self.grants)
            .live_for_login(&entry.name, now)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        if grants.is_empty() {
            return Err("no live grant for this account".into());
        }
        grants
            .into_iter()
            .find(|g| {
                self.profile(&g.profile).console && !lock(&self.revocations).contains(g.jti())
            })
            .ok_or_else(|| "the grant does not allow console logins".to_string())
    }

    /// Called when a session's main process has ended. A cgroup still holding processes
    /// (`sleep 1000 &`) stays, enforced, until the grant ends.
    pub fn session_finished(&self, session_id: &str) {
        if let Some(cgroup) = self.sessions.finish(session_id) {
            self.enforcer.detach(cgroup.id());
            let _ = cgroup.kill_and_remove();
        }
    }

    /// Revokes a grant here: recorded durably, then ended at once.
    pub async fn revoke(self: &Arc<Self>, jti: &str) -> Result<bool, String> {
        let exp = lock(&self.grants).get(jti).map(|g| g.expires_at());
        lock(&self.revocations)
            .add(jti, exp, grant::now())
            .map_err(|e| format!("cannot record the revocation: {e}"))?;
        audit!("grant_revoked", jti = jti; "grant {jti} revoked");
        let known = exp.is_some();
        if known {
            self.end_grant(jti, "revoked").await;
        }
        Ok(known)
    }

    /// Ends every grant whose time is up, and says so when the kernel dropped exec events.
    /// Runs every second.
    pub async fn sweep(self: &Arc<Self>) {
        let lost = self.enforcer.lost_events();
        let before = self
            .lost_reported
            .swap(lost, std::sync::atomic::Ordering::SeqCst);
        if lost > before {
            audit!("exec_events_lost", lost = lost - before, total = lost; "{} exec event(s) lost: the kernel's ring buffer was full ({lost} since start-up)", lost - before);
        }
        let now = grant::now();
        let ended: Vec<String> = lock(&self.grants)
            .iter()
            .filter(|g| !g.is_live(now))
            .map(|g| g.jti().to_string())
            .collect();
        for jti in ended {
            self.end_grant(&jti, "expired").await;
        }
        let agent = self.clone();
        let fixed =
            tokio::task::spawn_blocking(move || lock(&agent.accounts).restore_login_shells())
                .await
                .unwrap_or_default();
        for name in fixed {
            audit!("shell_restored", login = name.as_str(); "the login shell of {name} was changed; the recording shell is back");
        }
    }

    async fn end_grant(self: &Arc<Self>, jti: &str, why: &str) {
        let Some(grant) = lock(&self.grants).remove(jti) else {
            return;
        };
        audit!("grant_ended", jti = jti, reason = why, login = grant.login(); "grant {jti} ended: {why}");
        // Sessions first say why on their terminals, then everything in them dies.
        let cgroups = self.sessions.end_grant(jti, why);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let agent = self.clone();
        let login = grant.login().to_string();
        let _ = tokio::task::spawn_blocking(move || {
            for (id, cgroup) in cgroups {
                agent.enforcer.detach(cgroup.id());
                let _ = cgroup.kill_and_remove();
                agent.sessions.forget(&id);
            }
            let still_used = !lock(&agent.grants)
                .live_for_login(&login, grant::now())
                .is_empty();
            if !still_used {
                agent.remove_account(&login, "its last grant ended");
            }
        })
        .await;
    }

    fn remove_account(&self, login: &str, why: &str) {
        let result = lock(&self.accounts).remove(login);
        match result {
            Ok(true) => {
                audit!("account_removed", login = login, reason = why; "account {login} removed: {why}")
            }
            Ok(false) => {}
            Err(e) => log::error!(target: "usher::account", "cannot remove {login}: {e}"),
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.config.spool_dir.clone()
    }
}
