//! `usher` as a client of the central service: sign in (`login`), ask for access
//! (`request`), decide (`review`), take back (`revoke`). The binary parses and prints;
//! this module does the asking.

pub mod credentials;
pub mod device;

use crate::service::{PersonClient, ServiceError};
use credentials::{Credentials, CredentialsError};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use usher_wire::jit::{self, AccessRequest, Decision, RequestState};

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Credentials(#[from] CredentialsError),
    #[error("the sign-in expired: run `usher login`")]
    Expired,
    #[error("the service refused the sign-in ({0}): run `usher login`")]
    SignInRefused(String),
    #[error("service: {0}")]
    Service(ServiceError),
    #[error("sign-in: {0}")]
    Device(#[from] device::DeviceError),
    #[error("{}: {source}", path.display())]
    SshKey {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: not an OpenSSH public key", path.display())]
    NotAPublicKey { path: PathBuf },
    #[error("{0:?} is not a duration (e.g. 90s, 15m, 1h, 1h30m, 2d)")]
    Duration(String),
    #[error("cannot make the console secret: {0}")]
    Secret(String),
    #[error("request {id} was denied{}", by_whom(reviews))]
    Denied {
        id: String,
        reviews: Vec<jit::RecordedReview>,
    },
    #[error("request {id} ended {state} before it was approved")]
    Ended { id: String, state: String },
    #[error("request {id} is still pending after {waited}s (it stays open: `usher requests`)")]
    StillPending { id: String, waited: u64 },
    #[error("request {0} has no grant to revoke (it was never approved)")]
    NoGrant(String),
    #[error("the service approved request {0} but sent no grant")]
    ApprovedWithoutGrant(String),
}

fn by_whom(reviews: &[jit::RecordedReview]) -> String {
    match reviews.iter().rev().find(|r| r.decision == Decision::Deny) {
        Some(r) if r.comment.is_empty() => format!(" by {}", r.name),
        Some(r) => format!(" by {}: {}", r.name, r.comment),
        None => String::new(),
    }
}

impl From<ServiceError> for CliError {
    fn from(e: ServiceError) -> CliError {
        match e.status() {
            Some(401) => CliError::SignInRefused(e.to_string()),
            _ => CliError::Service(e),
        }
    }
}

impl CliError {
    /// `usher request --wait` tells scripts how it ended: 2 denied, 3 still pending or
    /// ended without a decision; everything else is 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Denied { .. } => 2,
            CliError::StillPending { .. } | CliError::Ended { .. } => 3,
            _ => 1,
        }
    }
}

/// The service as the signed-in person, from their stored sign-in.
pub fn signed_in(path: &Path) -> Result<(PersonClient, Credentials), CliError> {
    let credentials = Credentials::load(path)?;
    if credentials.expires_at <= crate::grant::now() {
        return Err(CliError::Expired);
    }
    let client = PersonClient::new(
        &credentials.url,
        Some(credentials.token.clone()),
        credentials.ca.as_deref(),
    )?;
    Ok((client, credentials))
}

/// What `usher login` shows while the person signs in elsewhere.
pub trait LoginPrompt {
    fn show(&self, code: &device::DeviceCode);
}

/// Signs in with the device authorization grant and stores the service's API token.
pub async fn login(
    service: &str,
    ca: Option<PathBuf>,
    path: &Path,
    prompt: &impl LoginPrompt,
) -> Result<Credentials, CliError> {
    let service = service.trim_end_matches('/').to_string();
    // The CA file is kept by name: an absolute one, so it still means the same file
    // from another directory.
    let ca = match ca {
        Some(p) if p.is_relative() => {
            Some(std::env::current_dir().map(|d| d.join(&p)).unwrap_or(p))
        }
        other => other,
    };
    let anonymous = PersonClient::new(&service, None, ca.as_deref())?;
    let config = anonymous.login_config().await?;
    let pending = device::start(anonymous.http(), &config).await?;
    prompt.show(&pending.code);
    let id_token = pending.wait().await?;
    let api = anonymous.login(id_token).await?;
    let credentials = Credentials {
        url: service,
        ca,
        token: api.token,
        expires_at: api.expires_at,
        principal: api.principal,
    };
    credentials.save(path)?;
    Ok(credentials)
}

/// What `usher request` asks for.
pub struct RequestArgs {
    pub host: String,
    pub login: String,
    pub profile: Option<String>,
    pub duration_secs: u64,
    pub reason: String,
    pub ssh_key: Option<PathBuf>,
    pub console_secret: bool,
}

/// A request as made, with the one-time secret when one was asked for (it exists only
/// here: the service has its hash).
pub struct Made {
    pub request: AccessRequest,
    pub console_secret: Option<String>,
}

/// `~/.ssh/id_ed25519.pub`: the key a request binds when none is named.
pub fn default_ssh_key() -> Option<PathBuf> {
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".ssh/id_ed25519.pub"))
}

pub async fn make_request(client: &PersonClient, args: RequestArgs) -> Result<Made, CliError> {
    let ssh_key = match &args.ssh_key {
        Some(path) => Some(read_public_key(path)?),
        // Without a named key the default one is bound if it is there; a console-only
        // request needs none.
        None => match default_ssh_key() {
            Some(path) if path.exists() || !args.console_secret => Some(read_public_key(&path)?),
            _ => None,
        },
    };
    let console_secret = args.console_secret.then(new_secret);
    let secret_hash = match &console_secret {
        Some(s) => Some(
            crate::grant::console_secret_hash(s).map_err(|e| CliError::Secret(e.to_string()))?,
        ),
        None => None,
    };
    let request = client
        .create_request(&jit::NewRequest {
            host: args.host,
            login: args.login,
            profile: args.profile,
            duration_secs: args.duration_secs,
            reason: args.reason,
            ssh_key,
            secret_hash,
        })
        .await?;
    Ok(Made {
        request,
        console_secret,
    })
}

fn read_public_key(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|source| CliError::SshKey {
        path: path.to_owned(),
        source,
    })?;
    let line = text.trim();
    russh::keys::PublicKey::from_openssh(line).map_err(|_| CliError::NotAPublicKey {
        path: path.to_owned(),
    })?;
    Ok(line.to_string())
}

/// Twenty random characters a person can type at a console prompt (no look-alikes).
fn new_secret() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzACDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rngs::OsRng;
    (0..20)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Waits for a decision on request `id`, for at most `timeout`: the approved request
/// (with its grant), or why not.
pub async fn wait_for_decision(
    client: &PersonClient,
    id: &str,
    timeout: Duration,
) -> Result<AccessRequest, CliError> {
    let started = Instant::now();
    loop {
        let left = timeout.saturating_sub(started.elapsed());
        // The service holds a wait for up to 60 s.
        let wait = left.as_secs().min(60);
        let request = client.request(id, Some(wait)).await?;
        match request.state {
            RequestState::Pending if started.elapsed() < timeout => continue,
            RequestState::Pending => {
                return Err(CliError::StillPending {
                    id: id.to_string(),
                    waited: started.elapsed().as_secs(),
                })
            }
            RequestState::Approved if request.grant.is_some() => return Ok(request),
            RequestState::Approved => return Err(CliError::ApprovedWithoutGrant(id.to_string())),
            RequestState::Denied => {
                return Err(CliError::Denied {
                    id: id.to_string(),
                    reviews: request.reviews,
                })
            }
            other => {
                return Err(CliError::Ended {
                    id: id.to_string(),
                    state: state_name(other).to_string(),
                })
            }
        }
    }
}

pub fn state_name(state: RequestState) -> &'static str {
    match state {
        RequestState::Pending => "pending",
        RequestState::Approved => "approved",
        RequestState::Denied => "denied",
        RequestState::Expired => "expired",
        RequestState::Revoked => "revoked",
        RequestState::Cancelled => "cancelled",
    }
}

/// Revokes a grant named by its id or by its request's id.
pub async fn revoke(
    client: &PersonClient,
    id: &str,
    reason: String,
) -> Result<AccessRequest, CliError> {
    let grant_id = match client.request(id, None).await {
        Ok(request) => request
            .grant_id
            .ok_or_else(|| CliError::NoGrant(id.to_string()))?,
        // Not a request (or not one this person may read): a grant id, then.
        Err(e) if matches!(e.status(), Some(404 | 403)) => id.to_string(),
        Err(e) => return Err(e.into()),
    };
    Ok(client.revoke_grant(&grant_id, reason).await?)
}

/// `90s`, `15m`, `1h`, `1h30m`, `2d`, or plain seconds.
pub fn parse_duration(text: &str) -> Result<u64, CliError> {
    let bad = || CliError::Duration(text.to_string());
    let text = text.trim();
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(secs) = text.parse::<u64>() {
        return Ok(secs);
    }
    let mut total: u64 = 0;
    let mut number = String::new();
    for c in text.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            _ => return Err(bad()),
        };
        let n: u64 = number.parse().map_err(|_| bad())?;
        total = n
            .checked_mul(unit)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        number.clear();
    }
    if !number.is_empty() {
        return Err(bad());
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_people_write_them() {
        for (text, secs) in [
            ("90", 90),
            ("90s", 90),
            ("15m", 900),
            ("1h", 3600),
            ("1h30m", 5400),
            ("2d", 172800),
            ("1h0m5s", 3605),
        ] {
            assert_eq!(parse_duration(text).unwrap(), secs, "{text}");
        }
        for bad in [
            "",
            "h",
            "1x",
            "1h30",
            "-5m",
            "1.5h",
            "99999999999999999999d",
        ] {
            assert!(
                matches!(parse_duration(bad), Err(CliError::Duration(t)) if t == bad.trim()),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_console_secret_is_long_and_typeable() {
        let a = new_secret();
        assert_eq!(a.len(), 20);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_alphanumeric() && !"0O1lI".contains(c)));
        assert_ne!(a, new_secret());
    }

    #[test]
    fn a_denial_says_who_and_why_and_exits_2() {
        let e = CliError::Denied {
            id: "r1".into(),
            reviews: vec![jit::RecordedReview {
                sub: "b".into(),
                name: "bob".into(),
                decision: Decision::Deny,
                comment: "not during the freeze".into(),
                at: 0,
                signature: String::new(),
            }],
        };
        assert_eq!(
            e.to_string(),
            "request r1 was denied by bob: not during the freeze"
        );
        assert_eq!(e.exit_code(), 2);
        let e = CliError::StillPending {
            id: "r1".into(),
            waited: 600,
        };
        assert_eq!(e.exit_code(), 3);
    }
}
