//! The agent: the stages of the journey wired together, and the decisions that span them
//! (a grant's end ends its sessions and, with the last grant, its account).

use crate::account::{Account, Accounts};
use crate::config::Config;
use crate::enforce::{Enforcement, Enforcer};
use crate::grant::{self, Grant, GrantId, GrantStore, Refusal, Revocations, Verifier};
use crate::profile::{Profile, Profiles};
use crate::session::budget::SpoolMeter;
use crate::session::{
    ConsoleRefused, Core, Opened, RdpRefused, RecordingContext, Refused, SessionKind, SessionTable,
};
use crate::sync::lock;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
    /// Every grant that ends, for whatever holds access under it (SSH
    /// connections and their forwards) to close.
    grant_ended: tokio::sync::broadcast::Sender<GrantId>,
    spool: Arc<SpoolMeter>,
    /// The RDP certificate's fingerprint, once RDP serves.
    pub rdp_certificate: std::sync::OnceLock<String>,
    /// Commands held for a person's approval (guard/approval).
    pub approvals: Arc<crate::guard::approval::Approvals>,
}

impl crate::ship::LiveSessions for Agent {
    fn is_live(&self, session_id: &str) -> bool {
        self.sessions.contains(session_id)
    }
}

/// The spool room a new session needs before it starts.
const SESSION_FLOOR_BYTES: u64 = 16 << 10;

impl Agent {
    /// Loads state, reconciles accounts and sessions with the live grants, starts the
    /// enforcement programs.
    pub fn start(config: Config) -> Result<Arc<Agent>, StartError> {
        let agent = Self::build(config, true)?;
        agent.reconcile(agent.started_at);
        agent.start_exec_hold();
        agent.use_central_approvals();
        Ok(agent)
    }

    /// The agent's state without its kernel programs or reconciliation, for one-shot
    /// maintenance (`usherd --remove-accounts`).
    pub fn start_offline(config: Config) -> Result<Arc<Agent>, StartError> {
        Self::build(config, false)
    }

    fn build(config: Config, online: bool) -> Result<Arc<Agent>, StartError> {
        let now = grant::now();
        for dir in [&config.state_dir, &config.spool_dir] {
            crate::fsutil::private_dir(dir, 0o700).map_err(|source| StartError::Directory {
                path: dir.clone(),
                source,
            })?;
        }
        let profiles = Profiles::load(&config.policies_dir)?;
        let verifier = Verifier::from_config(&config, profiles.names())?;
        let revocations = Revocations::open(&config.state_dir.join("revoked.json"))?;
        let (grants, dropped) = GrantStore::open(
            &config.state_dir.join("grants"),
            &verifier,
            &revocations,
            now,
        )
        .map_err(StartError::GrantStore)?;
        for (jti, why) in dropped {
            let reason = why.to_string();
            audit!("grant_ended", jti = jti.as_str(), reason = reason.as_str(); "grant {jti} dropped at start-up: {why}");
        }
        let accounts = Accounts::open(&config.accounts, &config.login_shell(), &config.state_dir)?;
        let enforcer = if online {
            Enforcer::start(
                config.enforcement,
                &crate::enforce::pin_dir(&config.state_dir),
            )
        } else {
            Enforcer::offline()
        };
        log::info!(target: "usher::enforce", enforcement_path = enforcer.path().to_string().as_str(); "exec enforcement: {} (mode {:?})", enforcer.path(), config.enforcement);
        let sessions = SessionTable::open(&config.state_dir.join("sessions.json"))
            .map_err(StartError::SessionTable)?;
        let approvals = crate::guard::approval::Approvals::new(&config.host_name());
        let agent = Arc::new(Agent {
            approvals,
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
            grant_ended: tokio::sync::broadcast::channel(256).0,
            spool: SpoolMeter::new(config.spool_dir.clone(), config.spool.max_bytes),
            rdp_certificate: std::sync::OnceLock::new(),
            config,
        });
        Ok(agent)
    }

    /// With `[service]`, command requests also go to the central service's page, and its
    /// signed decisions count here.
    fn use_central_approvals(&self) {
        let Ok(Some(endpoint)) = self.config.service_endpoint() else {
            return;
        };
        let verifier = lock(&self.verifier).clone();
        match crate::guard::approval::central::Central::from_verifier(
            &endpoint, &self.host, &verifier,
        ) {
            Ok(central) => self.approvals.use_central(central),
            Err(e) => {
                log::warn!(target: "usher::approval", "command approvals stay on this host: {e}")
            }
        }
    }

    /// Holds approval-class execs in the kernel (fanotify), with the BPF permit that lets
    /// an approved one through. Without it such programs are killed (no permit).
    fn start_exec_hold(self: &Arc<Self>) {
        if !self.enforcer.is_enforcing() {
            log::warn!(target: "usher::approval", "no exec programs loaded: commands that need approval cannot be held or let through");
            return;
        }
        let agent = Arc::downgrade(self);
        let permit: crate::guard::approval::PermitFn = Box::new(move |tgid, file, ttl| {
            let agent = agent.upgrade().ok_or("the agent is stopping")?;
            agent
                .enforcer
                .permit(tgid, file, ttl)
                .map_err(|e| e.to_string())
        });
        if let Err(e) = self.approvals.start_hold(permit) {
            log::warn!(target: "usher::approval", "execs cannot be held for approval ({e}): programs that need approval are killed instead");
        }
    }

    /// After a crash or reboot: sessions whose grant is gone are killed, those whose grant
    /// lives get their exec profile back; accounts without a live grant are removed.
    fn reconcile(self: &Arc<Self>, now: i64) {
        let mut ended = Vec::new();
        for mut rec in self.sessions.leftovers() {
            let grant = {
                let grants = lock(&self.grants);
                if rec.iss.is_empty() {
                    // Written before sessions named their grant's issuer, when one issuer
                    // owned each jti.
                    match grants.with_jti(&rec.jti)[..] {
                        [g] => Some(g.clone()),
                        _ => None,
                    }
                } else {
                    grants.get(&rec.grant_id()).cloned()
                }
            };
            if let Some(g) = &grant {
                rec.iss = g.claims.iss.clone();
            }
            let live = grant.map(|g| g.is_live(now)).unwrap_or(false);
            let cgroup = match rec.open_cgroup() {
                Ok(c) => c,
                Err(_) => {
                    self.sessions.forget(&rec.id);
                    continue;
                }
            };
            // Every leftover gets its route back, an ended one too: the execs of the
            // agent's down time (kills included) still belong in its audit stream.
            let profile = self.profile(&rec.profile);
            let (tx, rx) = crate::enforce::exec_channel();
            if self.enforcer.attach(cgroup.id(), &profile.exec, tx).is_ok() {
                crate::session::append_exec_events(
                    self.config
                        .spool_dir
                        .join(format!("{}.audit.jsonl", rec.id)),
                    rec.id.clone(),
                    rx,
                    lock(&self.profiles).mask(&profile.name),
                );
            }
            if live && cgroup.is_populated() {
                self.sessions.adopt(rec, Arc::new(cgroup));
            } else {
                ended.push((rec, cgroup));
            }
        }
        // Live sessions have their routes again: the events that waited can be read.
        self.enforcer.takeover_complete();
        for (rec, cgroup) in ended {
            self.enforcer.detach(cgroup.id());
            let _ = cgroup.kill_and_remove();
            self.sessions.forget(&rec.id);
            crate::session::mark_interrupted(&self.config.spool_dir, &rec.id);
            audit!("session_ended", session = rec.id.as_str(), jti = rec.jti.as_str(); "session {} ended while the agent was down", rec.id);
        }
        let keep: BTreeSet<String> = lock(&self.grants)
            .iter()
            .filter(|g| g.is_live(now))
            .map(|g| g.login().to_string())
            .collect();
        let orphans = lock(&self.accounts).orphans(&keep);
        for name in orphans {
            self.remove_account(&name, "no live grant at start-up");
        }
        self.report_unmanaged_accounts();
        if let Some(problem) =
            crate::account::sshd::drop_in_problem(&self.config.accounts.name_prefix)
        {
            log::warn!(target: "usher::account", "{problem}");
        }
    }

    /// Accounts inside the fence that this agent did not make are left alone, and said.
    fn report_unmanaged_accounts(&self) {
        for e in lock(&self.accounts).unmanaged() {
            audit!("account_unmanaged", login = e.name.as_str(), uid = e.uid;
                "account {} (uid {}) has usher's prefix and UID range but was not made by usher: left alone, and no grant opens it", e.name, e.uid);
        }
    }

    /// Accounts inside the fence that this agent did not make, for `usher status`.
    pub fn unmanaged_accounts(&self) -> Vec<crate::account::PasswdEntry> {
        lock(&self.accounts).unmanaged()
    }

    /// Refuses a grant for a login whose account exists but was not made by this agent;
    /// the reason goes to the journal.
    fn refuse_unmanaged(&self, grant: &Grant, how: &str) -> bool {
        let Some(why) = lock(&self.accounts).refusal(grant.login()) else {
            return false;
        };
        let reason = why.to_string();
        audit!("login_refused", jti = grant.jti(), login = grant.login(), via = how, reason = reason.as_str();
            "grant {} refused ({how}): {why}", grant.jti());
        true
    }

    pub fn profile(&self, name: &str) -> Profile {
        let profiles = lock(&self.profiles).clone();
        profiles.get(name).cloned().unwrap_or_else(|| {
            // A grant is only admitted with a known profile; if a reload removed it, the
            // session gets nothing beyond the built-in default.
            profiles.get("default").cloned().expect("built-in profile")
        })
    }

    /// Verifies a token with the keys at hand (an unknown kid starts a key refresh in the
    /// background), checks it against revocations and stores it.
    pub fn admit(&self, token: &str, how: &str) -> Result<Grant, Refusal> {
        let verifier = lock(&self.verifier).clone();
        self.keep(verifier.verify(token, grant::now()), how)
    }

    /// `admit`, but an unknown kid waits for the issuer's keys to be refreshed (rate
    /// limited) and the token is checked once more.
    pub async fn admit_refreshing(&self, token: &str, how: &str) -> Result<Grant, Refusal> {
        let verifier = lock(&self.verifier).clone();
        let verdict = verifier.verify_refreshing(token, grant::now()).await;
        self.keep(verdict, how)
    }

    /// A token presented at the SSH prompt for `login`: a grant, or a workload's token.
    pub async fn admit_presented(
        &self,
        login: &str,
        token: &str,
        how: &str,
    ) -> Result<Grant, Refusal> {
        let verifier = lock(&self.verifier).clone();
        let verdict = verifier.verify_presented(token, login, grant::now()).await;
        self.keep(verdict, how)
    }

    /// A verified token checked against revocations and unmanaged accounts, then stored;
    /// a refusal goes to the journal with its reason.
    fn keep(&self, verdict: Result<Grant, Refusal>, how: &str) -> Result<Grant, Refusal> {
        let result = verdict.and_then(|g| {
            if lock(&self.revocations).contains(&g.id()) {
                Err(Refusal::Revoked(g.id()))
            } else if self.refuse_unmanaged(&g, how) {
                Err(Refusal::BadLogin(g.login().to_string()))
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
                    audit!("grant_accepted", jti = g.jti(), iss = g.claims.iss.as_str(), sub = g.claims.sub.as_str(), login = g.login(), via = how, expires = g.expires_at();
                        "grant {} for {} as {} accepted ({how}), ends at {}", g.id(), g.claims.sub, g.login(), g.expires_at());
                }
            }
            Err(why) => {
                let reason = why.to_string();
                audit!("grant_refused", via = how, reason = reason.as_str(); "grant refused ({how}): {why}");
            }
        }
        result
    }

    fn key_grant(&self, login: &str, key: &russh::keys::PublicKey) -> Option<Grant> {
        let now = grant::now();
        let grant = {
            let grants = lock(&self.grants);
            let revoked = lock(&self.revocations);
            grants
                .live_for_login(login, now)
                .into_iter()
                .find(|g| g.binds_key(key) && !revoked.contains(&g.id()))
                .cloned()
        }?;
        (!self.refuse_unmanaged(&grant, "ssh-publickey")).then_some(grant)
    }

    pub fn is_live(&self, id: &GrantId) -> bool {
        let now = grant::now();
        !lock(&self.revocations).contains(id)
            && lock(&self.grants)
                .get(id)
                .map(|g| g.is_live(now))
                .unwrap_or(false)
    }

    /// Whether a revocation of `id` is recorded here.
    pub fn is_revoked(&self, id: &GrantId) -> bool {
        lock(&self.revocations).contains(id)
    }

    fn subscribe_grant_ends(&self) -> tokio::sync::broadcast::Receiver<GrantId> {
        self.grant_ended.subscribe()
    }

    pub fn grants(&self) -> Vec<Grant> {
        lock(&self.grants).iter().cloned().collect()
    }

    pub fn account_names(&self) -> Vec<String> {
        lock(&self.accounts).names()
    }

    async fn open_session(
        self: &Arc<Self>,
        grant: &Grant,
        kind: SessionKind,
    ) -> Result<Opened, Refused> {
        if !self.is_live(&grant.id()) {
            return Err(Refused::GrantEnded);
        }
        let profile = self.profile(&grant.profile);
        let mask = lock(&self.profiles).mask(&profile.name);
        if self.config.enforcement == Enforcement::Required && !self.enforcer.is_enforcing() {
            log::error!(target: "usher::enforce", "session refused: enforcement is required but {}", self.enforcer.path());
            return Err(Refused::EnforcementUnavailable(
                self.enforcer.path().to_string(),
            ));
        }
        self.wait_for_spool_room().await?;
        let account = self.ensure_account(grant).await.map_err(Refused::Account)?;
        let session_id = crate::session::new_session_id();
        let cgroup = self
            .sessions
            .create_cgroup(&session_id, &profile.limits)
            .map_err(|e| {
                log::error!(target: "usher::session", "cannot create a cgroup: {e}");
                Refused::Cgroup(e.to_string())
            })?;
        let (tx, rx) = crate::enforce::exec_channel();
        let enforced = match self.enforcer.attach(cgroup.id(), &profile.exec, tx) {
            Ok(()) => true,
            Err(e) if self.config.enforcement == Enforcement::Required => {
                let _ = cgroup.kill_and_remove();
                log::error!(target: "usher::enforce", "session refused: {e}");
                return Err(Refused::EnforcementFailed(e.to_string()));
            }
            Err(_) => false,
        };
        let cgroup = Arc::new(cgroup);
        let ended = self.sessions.register(
            &session_id,
            &grant.id(),
            grant.login(),
            &grant.profile,
            kind,
            cgroup.clone(),
        );
        // A grant that ended while this session was being set up did not see it in the
        // table: look again now that it is there.
        if !self.is_live(&grant.id()) {
            self.session_finished(&session_id);
            return Err(Refused::GrantEnded);
        }
        let guard = self.approvals.attach(
            cgroup.id(),
            crate::guard::approval::SessionFacts {
                session_id: session_id.clone(),
                grant: grant.id().to_string(),
                sub: grant.claims.sub.clone(),
                login: grant.login().to_string(),
                mask: mask.clone(),
            },
            &profile.exec.approve,
            &profile.exec.approve_commands,
            &profile.approval,
        );
        Ok(Opened {
            session_id,
            account,
            cgroup,
            profile,
            mask,
            exec_events: enforced.then_some(rx),
            enforced,
            ended,
            guard,
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
                    Err(match e {
                        crate::account::AccountError::NameTaken(_) => reason,
                        _ => format!("the account {login} could not be prepared"),
                    })
                }
            }
        })
        .await
        .map_err(|e| e.to_string())?
    }

    /// Re-reads issuers, policy and profiles (SIGHUP, `systemctl reload`). Live sessions,
    /// grants and accounts are untouched; listen addresses and directories need a restart.
    pub fn reload(&self, config: &Config) -> Result<(), StartError> {
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
        let orphans = lock(&self.accounts).orphans(&BTreeSet::new());
        for name in orphans {
            self.remove_account(&name, "usher is being removed");
        }
        // The programs stop only now, with nothing left to enforce.
        if let Err(e) = crate::enforce::unpin(&self.config.state_dir) {
            log::error!(target: "usher::enforce", "cannot unpin the eBPF programs: {e}");
        }
    }

    /// A spool over its size means recordings are not leaving the host: new sessions wait
    /// or are refused (config), and the reason is said; nothing already spooled is dropped.
    async fn wait_for_spool_room(&self) -> Result<(), Refused> {
        let limit = self.config.spool.max_bytes;
        let deadline = std::time::Instant::now() + Duration::from_secs(self.config.spool.wait_secs);
        loop {
            self.spool.rewalk();
            let used = self.spool.used();
            // Room for a session's own files (metadata, audit stream, cast header) at
            // least: a session that could not record its first line is not started.
            if used + SESSION_FLOOR_BYTES <= limit {
                return Ok(());
            }
            let waiting = self.config.spool.when_full == crate::config::WhenFull::Wait
                && std::time::Instant::now() < deadline;
            if !waiting {
                audit!("session_refused", reason = "spool full", spool_bytes = used; "session refused: the recording spool holds {used} bytes, too near its limit of {limit}");
                return Err(Refused::SpoolFull);
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

    fn console_grant_for_uid(&self, uid: u32) -> Result<Grant, ConsoleRefused> {
        let entry = {
            let accounts = lock(&self.accounts);
            let names = accounts.names();
            names
                .iter()
                .filter_map(|n| accounts.lookup(n))
                .find(|e| e.uid == uid)
        };
        let Some(entry) = entry else {
            return Err(ConsoleRefused::NotManaged);
        };
        let now = grant::now();
        let grants = lock(&self.grants)
            .live_for_login(&entry.name, now)
            .into_iter()
            .cloned()
            .collect::<Vec<_>>();
        if grants.is_empty() {
            return Err(ConsoleRefused::NoLiveGrant);
        }
        grants
            .into_iter()
            .find(|g| {
                self.profile(&g.profile).console && !lock(&self.revocations).contains(&g.id())
            })
            .ok_or(ConsoleRefused::NotAllowed)
    }

    pub async fn rdp_grant(&self, login: &str, password: &str) -> Result<Grant, RdpRefused> {
        // A JWT (three base64url parts): a grant or a workload's token, as at the SSH
        // password prompt. A one-time secret is never one.
        if password.len() > 64 && password.split('.').count() == 3 {
            let grant = self
                .admit_presented(login, password, "rdp password")
                .await
                .map_err(RdpRefused::Token)?;
            if !self.profile(&grant.profile).rdp {
                return Err(RdpRefused::NotAllowed);
            }
            return Ok(grant);
        }
        let now = grant::now();
        let grants: Vec<Grant> = lock(&self.grants)
            .live_for_login(login, now)
            .into_iter()
            .cloned()
            .collect();
        if grants.is_empty() {
            return Err(RdpRefused::NoLiveGrant);
        }
        let allowed: Vec<(Grant, String)> = grants
            .into_iter()
            .filter(|g| self.profile(&g.profile).rdp && !self.is_revoked(&g.id()))
            .filter_map(|g| {
                let hash = g.claims.secret_hash.clone()?;
                Some((g, hash))
            })
            .collect();
        if allowed.is_empty() {
            return Err(RdpRefused::NotAllowed);
        }
        let password = password.to_string();
        // crypt(3) hashes cost milliseconds each by design: off the runtime's threads.
        tokio::task::spawn_blocking(move || {
            allowed
                .into_iter()
                .find(|(_, hash)| secret_matches(&password, hash))
                .map(|(g, _)| g)
                .ok_or(RdpRefused::WrongSecret)
        })
        .await
        .unwrap_or(Err(RdpRefused::WrongSecret))
    }

    /// Called when a session's main process has ended. A cgroup still holding processes
    /// (`sleep 1000 &`) stays, enforced, until the grant ends.
    pub fn session_finished(&self, session_id: &str) {
        if let Some(cgroup) = self.sessions.finish(session_id) {
            self.enforcer.detach(cgroup.id());
            let _ = cgroup.kill_and_remove();
        }
    }

    /// Revokes a grant here: recorded durably, then ended at once. Returns which grant,
    /// and whether it was known here.
    pub async fn revoke(
        self: &Arc<Self>,
        jti: &str,
        iss: Option<&str>,
    ) -> Result<(GrantId, bool), RevokeError> {
        let id = self.revocation_target(jti, iss)?;
        let exp = lock(&self.grants).get(&id).map(|g| g.expires_at());
        lock(&self.revocations)
            .add(&id, exp, grant::now())
            .map_err(RevokeError::Record)?;
        audit!("grant_revoked", jti = id.jti.as_str(), iss = id.iss.as_str(); "grant {id} revoked");
        let known = exp.is_some();
        if known {
            self.end_grant(&id, "revoked").await;
        }
        Ok((id, known))
    }

    /// The grant `usher grant revoke JTI [--iss ISS]` means. Without `--iss` the jti must
    /// say it alone: one stored grant has it, or (revoking ahead of arrival) one issuer is
    /// trusted.
    fn revocation_target(&self, jti: &str, iss: Option<&str>) -> Result<GrantId, RevokeError> {
        if let Some(iss) = iss {
            return Ok(GrantId {
                iss: iss.to_string(),
                jti: jti.to_string(),
            });
        }
        let stored: Vec<GrantId> = lock(&self.grants)
            .with_jti(jti)
            .into_iter()
            .map(|g| g.id())
            .collect();
        match &stored[..] {
            [one] => return Ok(one.clone()),
            [] => {}
            several => {
                return Err(RevokeError::Ambiguous {
                    jti: jti.to_string(),
                    issuers: several.iter().map(|id| id.iss.clone()).collect(),
                });
            }
        }
        let trusted = lock(&self.verifier).issuers();
        match &trusted[..] {
            [one] => Ok(GrantId {
                iss: one.clone(),
                jti: jti.to_string(),
            }),
            _ => Err(RevokeError::UnknownIssuer {
                jti: jti.to_string(),
                trusted: trusted.len(),
            }),
        }
    }

    /// Ends every grant whose time is up, and says so when the kernel dropped exec events.
    /// Runs every second.
    pub async fn sweep(self: &Arc<Self>) {
        let spool = self.spool.clone();
        let _ = tokio::task::spawn_blocking(move || spool.rewalk()).await;
        let lost = self.enforcer.lost_events();
        let before = self
            .lost_reported
            .swap(lost, std::sync::atomic::Ordering::SeqCst);
        if lost > before {
            audit!("exec_events_lost", lost = lost - before, total = lost; "{} exec event(s) lost: the kernel's ring buffer was full ({lost} since start-up)", lost - before);
        }
        let now = grant::now();
        let ended: Vec<GrantId> = lock(&self.grants)
            .iter()
            .filter(|g| !g.is_live(now))
            .map(|g| g.id())
            .collect();
        for id in ended {
            self.end_grant(&id, "expired").await;
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

    async fn end_grant(self: &Arc<Self>, id: &GrantId, why: &str) {
        let Some(grant) = lock(&self.grants).remove(id) else {
            return;
        };
        audit!("grant_ended", jti = id.jti.as_str(), iss = id.iss.as_str(), reason = why, login = grant.login(); "grant {id} ended: {why}");
        // Sessions first say why on their terminals, then their connections close (with
        // every forward), then everything in them dies. Nothing new starts meanwhile: the
        // grant is no longer live.
        let cgroups = self.sessions.end_grant(id, why);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self.grant_ended.send(id.clone());
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

    /// The spool's size and limit, shared by every session's recording.
    pub fn spool_meter(&self) -> Arc<SpoolMeter> {
        self.spool.clone()
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.config.spool_dir.clone()
    }
}

/// The agent as the session core its front ends and sessions see.
impl Core for Agent {
    async fn admit_presented(&self, login: &str, token: &str, how: &str) -> Result<Grant, Refusal> {
        Agent::admit_presented(self, login, token, how).await
    }

    fn grant_for_key(&self, login: &str, key: &russh::keys::PublicKey) -> Option<Grant> {
        self.key_grant(login, key)
    }

    fn console_grant(&self, uid: u32) -> Result<Grant, ConsoleRefused> {
        self.console_grant_for_uid(uid)
    }

    async fn rdp_grant(&self, login: &str, password: &str) -> Result<Grant, RdpRefused> {
        Agent::rdp_grant(self, login, password).await
    }

    fn is_live(&self, grant: &GrantId) -> bool {
        Agent::is_live(self, grant)
    }

    fn grant_ends(&self) -> tokio::sync::broadcast::Receiver<GrantId> {
        self.subscribe_grant_ends()
    }

    fn profile(&self, name: &str) -> Profile {
        Agent::profile(self, name)
    }

    async fn open(self: &Arc<Self>, grant: &Grant, kind: SessionKind) -> Result<Opened, Refused> {
        self.open_session(grant, kind).await
    }

    fn finished(&self, session_id: &str) {
        self.session_finished(session_id)
    }

    fn count_command(&self, session_id: &str) {
        self.sessions.count_command(session_id)
    }

    fn recording(&self) -> RecordingContext {
        RecordingContext {
            host: self.host.clone(),
            spool_dir: self.config.spool_dir.clone(),
            settings: self.config.recording.clone(),
            enforcement: self.enforcer.path().to_string(),
            spool: self.spool.clone(),
        }
    }
}

/// Why the agent could not start (or reload): each says which file or directory.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{}: {source}", path.display())]
    Directory {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Profiles(#[from] crate::profile::ProfileError),
    #[error(transparent)]
    Issuers(#[from] crate::grant::JwksError),
    #[error(transparent)]
    Revocations(#[from] crate::grant::RevocationsError),
    #[error("grant store: {0}")]
    GrantStore(std::io::Error),
    #[error(transparent)]
    Accounts(#[from] crate::account::AccountError),
    #[error("session table: {0}")]
    SessionTable(std::io::Error),
}

/// Why `usher grant revoke` did not revoke; the text tells root what to do.
#[derive(Debug, thiserror::Error)]
pub enum RevokeError {
    #[error("jti {jti:?} is used by grants of {} issuers ({}): say which with --iss", issuers.len(), issuers.join(", "))]
    Ambiguous { jti: String, issuers: Vec<String> },
    #[error("no grant with jti {jti:?} is stored here and {trusted} issuers are trusted: say which with --iss")]
    UnknownIssuer { jti: String, trusted: usize },
    #[error("cannot record the revocation: {0}")]
    Record(#[source] std::io::Error),
}

/// Whether `password` is the secret behind a crypt(3) hash (SHA-512 or SHA-256 crypt: what
/// `usher grant issue --console-secret` and the service make).
fn secret_matches(password: &str, hash: &str) -> bool {
    if hash.starts_with("$6$") {
        sha_crypt::sha512_check(password, hash).is_ok()
    } else if hash.starts_with("$5$") {
        sha_crypt::sha256_check(password, hash).is_ok()
    } else {
        log::warn!(target: "usher::rdp", "a grant's secret_hash is not SHA-crypt ($6$/$5$): RDP cannot check it");
        false
    }
}
