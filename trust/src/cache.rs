//! One issuer's keys, kept fresh (collector/WORKFLOW.md, "Key cache rules"):
//!
//! - fetched at start; a failure is logged, not fatal (a file that cannot be read is fatal:
//!   it is the administrator's, and wrong now);
//! - fetched again when a token names an unknown `kid`, at most once per
//!   `refresh_min_secs`, and every `refresh_secs`;
//! - when fetching fails, the last good keys stay trusted for `max_stale_secs` after they
//!   were fetched, then are dropped;
//! - keys come only from the configured source: nothing a token's header says is fetched.

use crate::config::{IssuerConfig, KeySource};
use crate::fetch::{fetch_keys, http_client, FetchError};
use crate::jose::{verify_with_keys, Expect, VerifiedClaims};
use crate::refusal::{RefreshNote, Refusal};
use jsonwebtoken::jwk::JwkSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// Why an issuer cannot be set up at all.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("issuer CA {}: {why}", path.display())]
    Ca {
        path: std::path::PathBuf,
        why: String,
    },
    #[error("cannot make an HTTP client: {0}")]
    Client(String),
    /// A JWKS file that cannot be trusted for anything: better no logins than logins
    /// checked against the wrong keys.
    #[error(transparent)]
    File(FetchError),
}

/// The keys of one issuer, shared by every clone.
#[derive(Clone)]
pub struct IssuerKeys {
    inner: Arc<Inner>,
}

struct Inner {
    iss: String,
    /// `None`: a fixed set, handed over by the caller.
    source: Option<KeySource>,
    client: Option<reqwest::Client>,
    refresh_min: Duration,
    refresh_every: Duration,
    max_stale: Duration,
    state: Mutex<State>,
    /// Where the last good keys are written, so that a restart while the issuer is
    /// unreachable still has them (within `max_stale`).
    saved: Option<PathBuf>,
    /// One fetch at a time; whoever waited reads what the fetch before it found.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct State {
    keys: Option<Arc<JwkSet>>,
    /// When `keys` were fetched.
    fetched_at: Option<Instant>,
    /// When a fetch was last tried, whatever came of it: the rate limit counts tries.
    tried_at: Option<Instant>,
    last_error: Option<FetchError>,
}

/// What `IssuerKeys::status` reports, for `usher status` and the service's health page.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyStatus {
    pub iss: String,
    /// Key ids in use (empty when none are).
    pub kids: Vec<String>,
    /// Seconds since the keys in use were fetched; `None` for a fixed set or no keys.
    pub age_secs: Option<u64>,
    pub last_error: Option<FetchError>,
}

impl IssuerKeys {
    /// An issuer from its configuration. A file source is read now (and must be good); a
    /// URL or discovery source has no keys until `refresh` (or `load_blocking`, or the
    /// task `spawn_refresher` starts) fetches them.
    pub fn new(config: &IssuerConfig) -> Result<IssuerKeys, SetupError> {
        IssuerKeys::new_saving(config, None)
    }

    /// As `new`, and a URL issuer's last good keys are also kept in a file under
    /// `save_dir`: read back at start (if younger than `max_stale_secs`), rewritten after
    /// every good fetch. A missing or unreadable file only means starting without keys.
    pub fn new_saving(
        config: &IssuerConfig,
        save_dir: Option<&Path>,
    ) -> Result<IssuerKeys, SetupError> {
        let source = config.source()?;
        let (client, keys) = match &source {
            KeySource::File(path) => (
                None,
                Some(Arc::new(
                    crate::fetch::read_jwks_file(path).map_err(SetupError::File)?,
                )),
            ),
            KeySource::Url(_) | KeySource::Discovery(_) => {
                (Some(http_client(config.ca.as_deref())?), None)
            }
        };
        let max_stale = Duration::from_secs(config.max_stale_secs);
        let saved = match (&source, save_dir) {
            (KeySource::Url(_) | KeySource::Discovery(_), Some(dir)) => {
                Some(saved_keys_path(dir, &config.iss))
            }
            _ => None,
        };
        let mut state = State {
            keys,
            ..State::default()
        };
        if let Some((jwks, age)) = saved
            .as_deref()
            .and_then(|p| read_saved(p, &config.iss, max_stale))
        {
            state.keys = Some(Arc::new(jwks));
            state.fetched_at = Instant::now().checked_sub(age);
        }
        Ok(IssuerKeys {
            inner: Arc::new(Inner {
                iss: config.iss.clone(),
                source: Some(source),
                client,
                refresh_min: Duration::from_secs(config.refresh_min_secs),
                refresh_every: Duration::from_secs(config.refresh_secs),
                max_stale,
                state: Mutex::new(state),
                saved,
                fetching: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// An issuer whose keys the caller holds (the service's own key; tests).
    pub fn fixed(iss: &str, keys: JwkSet) -> IssuerKeys {
        IssuerKeys {
            inner: Arc::new(Inner {
                iss: iss.to_string(),
                source: None,
                client: None,
                refresh_min: Duration::MAX,
                refresh_every: Duration::MAX,
                max_stale: Duration::MAX,
                state: Mutex::new(State {
                    keys: Some(Arc::new(keys)),
                    ..State::default()
                }),
                saved: None,
                fetching: tokio::sync::Mutex::new(()),
            }),
        }
    }

    pub fn iss(&self) -> &str {
        &self.inner.iss
    }

    /// Whether the keys come from a URL (and so can change while Usher runs).
    pub fn is_fetched(&self) -> bool {
        self.inner.client.is_some()
    }

    /// The keys to check a token against now: the last good ones, unless they are older
    /// than `max_stale_secs` (then they are dropped) or there never were any.
    pub fn current(&self) -> Result<Arc<JwkSet>, Refusal> {
        let mut state = self.state();
        let unavailable = |why: String| Refusal::KeysUnavailable {
            iss: self.inner.iss.clone(),
            why,
        };
        let last_error = |state: &State| {
            state
                .last_error
                .as_ref()
                .map(|e| format!("; last fetch: {e}"))
                .unwrap_or_default()
        };
        if let (Some(_), Some(at)) = (&state.keys, state.fetched_at) {
            let age = at.elapsed();
            if age > self.inner.max_stale {
                state.keys = None;
                let why = format!(
                    "the last good keys are {} s old, more than max_stale_secs = {}{}",
                    age.as_secs(),
                    self.inner.max_stale.as_secs(),
                    last_error(&state)
                );
                log::warn!(target: "usher::trust", "issuer {:?}: keys dropped: {why}", self.inner.iss);
                return Err(unavailable(why));
            }
        }
        match &state.keys {
            Some(keys) => Ok(keys.clone()),
            None => Err(unavailable(match &state.last_error {
                Some(e) => e.to_string(),
                None if state.fetched_at.is_some() => format!(
                    "the last good keys expired (max_stale_secs = {})",
                    self.inner.max_stale.as_secs()
                ),
                None => "not fetched yet".into(),
            })),
        }
    }

    /// Fetches the keys now, whatever the rate limit (start-up, the periodic refresh).
    /// On failure the last good keys stay (until they are too old).
    pub async fn refresh(&self) -> Result<usize, FetchError> {
        let _one_at_a_time = self.inner.fetching.lock().await;
        self.fetch_and_keep().await
    }

    /// A token named a kid these keys lack: fetch again, unless the last try was less than
    /// `refresh_min_secs` ago. Says what happened, for the refusal's text.
    pub async fn refresh_for_unknown_kid(&self) -> RefreshNote {
        if !self.is_fetched() {
            return RefreshNote::Static;
        }
        let _one_at_a_time = self.inner.fetching.lock().await;
        if let Some(tried) = self.state().tried_at {
            let since = tried.elapsed();
            if since < self.inner.refresh_min {
                return RefreshNote::RateLimited {
                    last_secs_ago: since.as_secs(),
                    min_secs: self.inner.refresh_min.as_secs(),
                };
            }
        }
        match self.fetch_and_keep().await {
            Ok(_) => RefreshNote::Refreshed,
            Err(e) => RefreshNote::Failed(e.to_string()),
        }
    }

    /// Fetches the keys on a thread of its own, for callers that are not async and need the
    /// keys before they go on (the agent's start-up re-verifies its stored grants).
    pub fn load_blocking(&self) -> Result<usize, FetchError> {
        if !self.is_fetched() {
            return Ok(self.current().map(|k| k.keys.len()).unwrap_or(0));
        }
        let keys = self.clone();
        let joined = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| FetchError::Transport {
                    url: keys.iss().to_string(),
                    why: format!("cannot start a runtime to fetch keys: {e}"),
                })?;
            runtime.block_on(keys.refresh())
        })
        .join();
        joined.unwrap_or_else(|_| {
            Err(FetchError::Transport {
                url: self.iss().to_string(),
                why: "the fetching thread panicked".into(),
            })
        })
    }

    /// Keeps the keys fresh in the background: fetches at once if there are none, then
    /// every `refresh_secs` (sooner after a failure). Ends when the last `IssuerKeys`
    /// clone is dropped. Needs a Tokio runtime.
    pub fn spawn_refresher(&self) -> Option<tokio::task::JoinHandle<()>> {
        if !self.is_fetched() {
            return None;
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        Some(tokio::spawn(async move {
            loop {
                let wait = {
                    let Some(inner) = weak.upgrade() else { return };
                    let keys = IssuerKeys { inner };
                    let due = keys.next_routine_fetch();
                    if due.is_zero() {
                        match keys.refresh().await {
                            Ok(n) => {
                                log::debug!(target: "usher::trust", "issuer {:?}: {n} key(s) fetched", keys.iss())
                            }
                            Err(e) => {
                                log::warn!(target: "usher::trust", "issuer {:?}: cannot fetch keys: {e}", keys.iss())
                            }
                        }
                        keys.next_routine_fetch()
                    } else {
                        due
                    }
                };
                // At least a second, so that a clock oddity cannot spin the loop.
                tokio::time::sleep(wait.max(Duration::from_secs(1))).await;
            }
        }))
    }

    /// How long until the next routine fetch: `refresh_secs` after the last good one; after
    /// a failure, a retry within `refresh_min_secs` (at least 5 s, at most a minute).
    fn next_routine_fetch(&self) -> Duration {
        let state = self.state();
        let retry = self
            .inner
            .refresh_min
            .clamp(Duration::from_secs(5), Duration::from_secs(60))
            .min(self.inner.refresh_every);
        let since = |at: Option<Instant>| at.map(|t| t.elapsed());
        match (since(state.fetched_at), since(state.tried_at)) {
            (_, None) => Duration::ZERO,
            (Some(good), Some(tried)) if state.last_error.is_none() || good <= tried => {
                self.inner.refresh_every.saturating_sub(good)
            }
            (_, Some(tried)) => retry.saturating_sub(tried),
        }
    }

    /// Checks a token of this issuer. A kid the keys lack (or no keys at all) asks for one
    /// rate-limited refresh, and the token is checked once more with what it found.
    pub async fn verify(
        &self,
        token: &str,
        expect: &Expect<'_>,
    ) -> Result<VerifiedClaims, Refusal> {
        let first = self
            .current()
            .and_then(|keys| verify_with_keys(token, &self.inner.iss, &keys, expect));
        match first {
            Err(Refusal::UnknownKey { .. }) | Err(Refusal::KeysUnavailable { .. })
                if self.is_fetched() => {}
            Err(Refusal::UnknownKey { iss, kid, .. }) => {
                return Err(Refusal::UnknownKey {
                    iss,
                    kid,
                    refresh: RefreshNote::Static,
                })
            }
            other => return other,
        }
        let note = self.refresh_for_unknown_kid().await;
        let second = self
            .current()
            .and_then(|keys| verify_with_keys(token, &self.inner.iss, &keys, expect));
        match second {
            Err(Refusal::UnknownKey { iss, kid, .. }) => Err(Refusal::UnknownKey {
                iss,
                kid,
                refresh: note,
            }),
            other => other,
        }
    }

    /// What the cache holds, for status pages.
    pub fn status(&self) -> KeyStatus {
        let state = self.state();
        KeyStatus {
            iss: self.inner.iss.clone(),
            kids: state
                .keys
                .as_ref()
                .map(|set| {
                    set.keys
                        .iter()
                        .map(|k| k.common.key_id.clone().unwrap_or_default())
                        .collect()
                })
                .unwrap_or_default(),
            age_secs: state
                .keys
                .as_ref()
                .and(state.fetched_at)
                .map(|at| at.elapsed().as_secs()),
            last_error: state.last_error.clone(),
        }
    }

    async fn fetch_and_keep(&self) -> Result<usize, FetchError> {
        let (Some(client), Some(source)) = (&self.inner.client, &self.inner.source) else {
            return Ok(self.current().map(|k| k.keys.len()).unwrap_or(0));
        };
        self.state().tried_at = Some(Instant::now());
        let fetched = fetch_keys(client, &self.inner.iss, source).await;
        let mut state = self.state();
        match fetched {
            Ok(keys) => {
                let n = keys.keys.len();
                if let Some(path) = &self.inner.saved {
                    if let Err(e) = write_saved(path, &self.inner.iss, &keys) {
                        log::warn!(target: "usher", "cannot keep a copy of {}'s keys in {}: {e}", self.inner.iss, path.display());
                    }
                }
                state.keys = Some(Arc::new(keys));
                state.fetched_at = Some(Instant::now());
                state.last_error = None;
                Ok(n)
            }
            Err(e) => {
                state.last_error = Some(e.clone());
                Err(e)
            }
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the state half-written: every
        // write is one assignment.
        self.inner
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Every issuer a verifier trusts, chosen by the token's `iss`.
#[derive(Clone, Default)]
pub struct TrustedIssuers {
    issuers: Vec<IssuerKeys>,
}

impl TrustedIssuers {
    pub fn new(issuers: Vec<IssuerKeys>) -> TrustedIssuers {
        TrustedIssuers { issuers }
    }

    /// Builds every issuer of `configs`; the first that cannot be set up is the error.
    pub fn from_configs(configs: &[IssuerConfig]) -> Result<TrustedIssuers, SetupError> {
        configs
            .iter()
            .map(IssuerKeys::new)
            .collect::<Result<Vec<_>, _>>()
            .map(TrustedIssuers::new)
    }

    pub fn get(&self, iss: &str) -> Option<&IssuerKeys> {
        self.issuers.iter().find(|i| i.iss() == iss)
    }

    pub fn iter(&self) -> impl Iterator<Item = &IssuerKeys> {
        self.issuers.iter()
    }

    /// Checks a token against the issuer its (unverified) `iss` names.
    pub async fn verify(
        &self,
        token: &str,
        expect: &Expect<'_>,
    ) -> Result<VerifiedClaims, Refusal> {
        let iss = crate::jose::peek_issuer(token)?;
        let issuer = self
            .get(&iss)
            .ok_or_else(|| Refusal::UnknownIssuer(crate::jose::shortened(&iss)))?;
        issuer.verify(token, expect).await
    }

    /// Fetches every URL issuer's keys on threads of their own (start-up of a caller that
    /// is not async); failures are logged, not fatal.
    pub fn load_blocking(&self) {
        for issuer in self.issuers.iter().filter(|i| i.is_fetched()) {
            if let Err(e) = issuer.load_blocking() {
                log::warn!(target: "usher::trust", "issuer {:?}: cannot fetch keys at start: {e}", issuer.iss());
            }
        }
    }

    /// `IssuerKeys::spawn_refresher` for each issuer whose keys come from a URL.
    pub fn spawn_refreshers(&self) -> Vec<tokio::task::JoinHandle<()>> {
        self.issuers
            .iter()
            .filter_map(IssuerKeys::spawn_refresher)
            .collect()
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct SavedKeys {
    iss: String,
    /// Unix seconds.
    fetched_at: u64,
    jwks: JwkSet,
}

/// One file per issuer, named by a digest of its name (an issuer is a URL).
fn saved_keys_path(dir: &Path, iss: &str) -> PathBuf {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(iss.as_bytes());
    let name: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    dir.join(format!("{name}.jwks.json"))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The saved keys and their age, unless missing, unreadable or older than `max_stale`.
fn read_saved(path: &Path, iss: &str, max_stale: Duration) -> Option<(JwkSet, Duration)> {
    let text = std::fs::read(path).ok()?;
    let saved: SavedKeys = serde_json::from_slice(&text).ok()?;
    let age = Duration::from_secs(unix_now().saturating_sub(saved.fetched_at));
    (saved.iss == iss && age < max_stale && !saved.jwks.keys.is_empty())
        .then_some((saved.jwks, age))
}

/// Written beside and renamed, so a crash leaves the old copy or the new one.
fn write_saved(path: &Path, iss: &str, jwks: &JwkSet) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let saved = SavedKeys {
        iss: iss.to_string(),
        fetched_at: unix_now(),
        jwks: jwks.clone(),
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(&saved).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(&tmp, path)
}
