//! The grant feed: the host's grants and revocations from the central service
//! (`GET /api/v1/agent/grants`, a long-poll), applied through the same paths as `usher
//! grant install` and `usher grant revoke`.
//!
//! Every answer is the whole picture for this host (every live grant, every revoked and
//! unexpired grant id), so a lost answer or an agent restart loses nothing: the first
//! answer after a start brings everything again, and what is already held is skipped.
//! A grant still has to pass this host's verifier (a trusted `[[issuer]]`, local policy):
//! the service is trusted for its signatures, not for its word.

use crate::config::{ServiceEndpoint, ServiceToken};
use crate::daemon::Agent;
use crate::grant::GrantId;
use crate::service::{HostClient, ServiceError};
use sha2::Digest;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usher_wire::jit::GrantFeed;

/// First pause after a failed poll; it doubles up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// A grant this host refused is tried again after this long (an issuer's keys may arrive
/// later), doubling up to [`MAX_RETRY_REFUSED`]: a refusal is logged per try, not per poll.
const RETRY_REFUSED: Duration = Duration::from_secs(30);
const MAX_RETRY_REFUSED: Duration = Duration::from_secs(600);

/// Runs for as long as the agent does.
pub async fn run(agent: Arc<Agent>, endpoint: ServiceEndpoint) {
    let mut since = 0u64;
    let mut client: Option<HostClient> = None;
    let mut refused = RefusedGrants::default();
    let mut outage: Option<Outage> = None;
    let mut backoff = FIRST_BACKOFF;
    let mut answered_once = false;
    loop {
        let answer = match &client {
            Some(c) => c
                .grants(since, endpoint.wait_secs)
                .await
                .map_err(FeedError::from),
            None => match connect(&endpoint) {
                Ok(c) => {
                    client = Some(c);
                    continue;
                }
                Err(e) => Err(e),
            },
        };
        match answer {
            Ok(feed) => {
                if let Some(o) = outage.take() {
                    log::info!(target: "usher::feed", "grant feed: the service at {} answers again (after {}s)", endpoint.url, o.since.elapsed().as_secs());
                } else if !answered_once {
                    log::info!(target: "usher::feed", "grant feed: {} live grant(s) for this host at {} (revision {})", feed.grants.len(), endpoint.url, feed.revision);
                }
                answered_once = true;
                backoff = FIRST_BACKOFF;
                // A revision that went backwards (the service's state was replaced) is
                // taken as it is: the answer is the whole picture either way.
                since = feed.revision;
                apply(&agent, &feed, &mut refused).await;
            }
            Err(e) => {
                match &outage {
                    None => {
                        log::warn!(target: "usher::feed", "grant feed: {e}; trying again with backoff (grants already here keep working)");
                        outage = Some(Outage {
                            since: Instant::now(),
                        });
                    }
                    Some(_) => log::debug!(target: "usher::feed", "grant feed: still failing: {e}"),
                }
                if matches!(e, FeedError::Token(_)) {
                    client = None;
                }
                tokio::time::sleep(jitter(backoff)).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

struct Outage {
    since: Instant,
}

#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("cannot read the host's token: {0}")]
    Token(std::io::Error),
    #[error(transparent)]
    Service(#[from] ServiceError),
}

fn connect(endpoint: &ServiceEndpoint) -> Result<HostClient, FeedError> {
    let token = match &endpoint.token {
        ServiceToken::Inline(t) => t.clone(),
        ServiceToken::File(path) => std::fs::read_to_string(path)
            .map_err(|e| {
                FeedError::Token(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ))
            })?
            .trim()
            .to_string(),
    };
    Ok(HostClient::new(
        &endpoint.url,
        token,
        endpoint.ca.as_deref(),
        endpoint.wait_secs,
    )?)
}

/// `pause` give or take a quarter, so that many agents cut off together do not come back
/// in step.
fn jitter(pause: Duration) -> Duration {
    let quarter = pause.as_millis() as u64 / 4;
    let offset = rand::random::<u64>() % (2 * quarter + 1);
    pause - Duration::from_millis(quarter) + Duration::from_millis(offset)
}

/// What an answer asks of this host: grants it does not hold yet, revocations it has not
/// recorded yet. Revocations come first: a grant both live and revoked stays out.
#[derive(Debug, PartialEq)]
struct Plan {
    revoke: Vec<GrantId>,
    install: Vec<String>,
}

fn plan(
    feed: &GrantFeed,
    held_tokens: &HashSet<String>,
    is_revoked: impl Fn(&GrantId) -> bool,
    refused: &RefusedGrants,
    now: Instant,
) -> Plan {
    let revoke = feed
        .revoked
        .iter()
        .map(|r| GrantId {
            iss: r.iss.clone(),
            jti: r.jti.clone(),
        })
        .filter(|id| !is_revoked(id))
        .collect();
    let install = feed
        .grants
        .iter()
        .map(|t| t.trim())
        .filter(|t| !held_tokens.contains(*t) && refused.may_try(t, now))
        .map(str::to_string)
        .collect();
    Plan { revoke, install }
}

async fn apply(agent: &Arc<Agent>, feed: &GrantFeed, refused: &mut RefusedGrants) {
    let held: HashSet<String> = agent.grants().into_iter().map(|g| g.token).collect();
    let now = Instant::now();
    let plan = plan(feed, &held, |id| agent.is_revoked(id), refused, now);
    for id in plan.revoke {
        // The same path as `usher grant revoke --iss`: recorded, then its sessions and
        // account end. It is recorded ahead of the grant too, should it come another way.
        if let Err(e) = agent.revoke(&id.jti, Some(&id.iss)).await {
            log::error!(target: "usher::feed", "grant feed: cannot revoke {id}: {e}");
        }
    }
    for token in plan.install {
        // The same path as `usher grant install`: verified, capped by local policy,
        // stored; refusals are logged with their reason by `admit`.
        match agent.admit(&token, "service feed") {
            Ok(grant) => {
                refused.forget(&token);
                if let Err(e) = agent.prepare_console(&grant).await {
                    log::error!(target: "usher::feed", "grant feed: grant {} accepted, but its console account is not ready: {e}", grant.id());
                }
            }
            Err(_) => refused.note(&token, now),
        }
    }
    refused.keep_only(&feed.grants);
}

/// Grants this host refused, by the digest of their token, with when to try again.
#[derive(Default)]
struct RefusedGrants {
    retry: HashMap<[u8; 32], (Instant, Duration)>,
}

fn digest(token: &str) -> [u8; 32] {
    sha2::Sha256::digest(token.trim().as_bytes()).into()
}

impl RefusedGrants {
    fn may_try(&self, token: &str, now: Instant) -> bool {
        self.retry
            .get(&digest(token))
            .is_none_or(|(at, _)| now >= *at)
    }

    fn note(&mut self, token: &str, now: Instant) {
        let pause = match self.retry.get(&digest(token)) {
            Some((_, last)) => (*last * 2).min(MAX_RETRY_REFUSED),
            None => RETRY_REFUSED,
        };
        self.retry.insert(digest(token), (now + pause, pause));
    }

    fn forget(&mut self, token: &str) {
        self.retry.remove(&digest(token));
    }

    /// Forgets grants the service no longer lists.
    fn keep_only(&mut self, tokens: &[String]) {
        let listed: HashSet<[u8; 32]> = tokens.iter().map(|t| digest(t)).collect();
        self.retry.retain(|d, _| listed.contains(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use usher_wire::jit::RevokedGrant;

    fn feed(grants: &[&str], revoked: &[(&str, &str)]) -> GrantFeed {
        GrantFeed {
            revision: 7,
            grants: grants.iter().map(|s| s.to_string()).collect(),
            revoked: revoked
                .iter()
                .map(|(iss, jti)| RevokedGrant {
                    iss: iss.to_string(),
                    jti: jti.to_string(),
                    exp: 0,
                })
                .collect(),
        }
    }

    fn id(iss: &str, jti: &str) -> GrantId {
        GrantId {
            iss: iss.into(),
            jti: jti.into(),
        }
    }

    #[test]
    fn only_what_is_new_here_is_installed_or_revoked() {
        let held: HashSet<String> = ["a.b.c".to_string()].into();
        let f = feed(
            &["a.b.c", " d.e.f\n", "g.h.i"],
            &[("https://s", "1"), ("https://s", "2")],
        );
        let already = id("https://s", "1");
        let p = plan(
            &f,
            &held,
            |i| *i == already,
            &RefusedGrants::default(),
            Instant::now(),
        );
        assert_eq!(
            p,
            Plan {
                revoke: vec![id("https://s", "2")],
                install: vec!["d.e.f".into(), "g.h.i".into()],
            }
        );
    }

    #[test]
    fn a_refused_grant_is_tried_again_later_not_at_every_poll() {
        let f = feed(&["bad.token.x", "other.token.y"], &[]);
        let mut refused = RefusedGrants::default();
        let t0 = Instant::now();
        refused.note("bad.token.x", t0);
        let p = plan(&f, &HashSet::new(), |_| false, &refused, t0);
        assert_eq!(p.install, vec!["other.token.y".to_string()]);
        let p = plan(&f, &HashSet::new(), |_| false, &refused, t0 + RETRY_REFUSED);
        assert_eq!(p.install.len(), 2);
        // Refused again: the pause doubles, to a bound.
        for _ in 0..20 {
            refused.note("bad.token.x", t0);
        }
        assert_eq!(refused.retry[&digest("bad.token.x")].1, MAX_RETRY_REFUSED);
        // Gone from the feed, forgotten.
        refused.keep_only(&["other.token.y".to_string()]);
        assert!(refused.retry.is_empty());
    }

    #[test]
    fn backoff_pauses_stay_within_a_quarter() {
        for _ in 0..200 {
            let p = jitter(Duration::from_secs(8));
            assert!(
                p >= Duration::from_secs(6) && p <= Duration::from_secs(10),
                "{p:?}"
            );
        }
        assert_eq!(jitter(Duration::ZERO), Duration::ZERO);
    }
}
