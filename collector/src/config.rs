//! `usher-collector.toml`: the recordings part (listen, TLS, storage, agents) and the
//! just-in-time workflow's part (public URL, state, roles, request policy, webhooks,
//! workload rules, the OpenID provider). See API.md and WORKFLOW.md.

use serde::{Deserialize, Deserializer};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use usher_wire::jit::Role;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `127.0.0.1:8443`
    pub listen: String,
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The index (SQLite), the workflow's SQLite state, and, with the local backend, the
    /// recordings.
    pub data_dir: PathBuf,
    #[serde(default)]
    pub storage: Storage,
    /// The hosts that may ship and fetch grants, each bound to a token and to its host key.
    #[serde(rename = "agent", default)]
    pub agents: Vec<AgentConfig>,
    /// asciinema-player's files (`asciinema-player.min.js`, `asciinema-player.css`).
    pub assets_dir: Option<PathBuf>,
    /// The service's address as its users and agents reach it: the `iss` of every grant and
    /// API token it signs. Default `https://<listen>`.
    pub public_url: Option<String>,
    #[serde(default)]
    pub state: StateConfig,
    /// Role → the groups whose members hold it.
    #[serde(default)]
    pub roles: BTreeMap<Role, Vec<String>>,
    #[serde(rename = "request_policy", default)]
    pub request_policies: Vec<RequestPolicy>,
    #[serde(rename = "webhook", default)]
    pub webhooks: Vec<Webhook>,
    /// Token-exchange rules for workloads (`[[workload]]`).
    #[serde(rename = "workload", default)]
    pub workloads: Vec<usher_trust::WorkloadRule>,
    /// How to reach a workload issuer when discovery with the usual roots is not enough
    /// (`[[workload_issuer]] iss, ca, jwks, jwks_url, discovery, refresh_*`); an issuer a
    /// rule names and not listed here is found by discovery.
    #[serde(rename = "workload_issuer", default)]
    pub workload_issuers: Vec<usher_trust::IssuerConfig>,
    pub oidc: Option<OidcConfig>,
    /// Per-person, per-agent and per-address rate limits, timeouts and the connection cap
    /// (`[limits]`).
    #[serde(default)]
    pub limits: Limits,
    /// Where the recordings index lives (`[index]`): `data_dir/index.sqlite` by default, or
    /// one PostgreSQL database shared by several instances (`backend = "postgres"`, `url`).
    #[serde(default)]
    pub index: StateConfig,
    /// How long recordings are kept (`[retention]`); absent: forever.
    #[serde(default)]
    pub retention: Retention,
    /// Client certificates for agents (`[tls]`, mutual TLS; the server's own pair is
    /// `tls_cert`/`tls_key`).
    #[serde(default)]
    pub tls: ClientTls,
}

/// `[tls] client_ca = "/etc/usher/agents-ca.pem"`: the collector asks for a client
/// certificate chaining to it, and an agent's must name its host (a DNS name, or the CN);
/// with `require_client_cert`, agent requests without one are refused.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ClientTls {
    pub client_ca: Option<PathBuf>,
    pub require_client_cert: bool,
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source,
        })?;
        config.check().map_err(|problem| ConfigError::Invalid {
            path: path.to_owned(),
            problem,
        })?;
        Ok(config)
    }

    /// What the service calls itself (`iss`), without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(u) => u.trim_end_matches('/').to_string(),
            None => format!("https://{}", self.listen),
        }
    }

    /// The roles `groups` confer.
    pub fn roles_of(&self, groups: &[String]) -> std::collections::BTreeSet<Role> {
        self.roles
            .iter()
            .filter(|(_, role_groups)| role_groups.iter().any(|g| groups.contains(g)))
            .map(|(role, _)| *role)
            .collect()
    }

    /// Checks what serde cannot: unique policy names, sane numbers, parsable windows.
    pub fn check(&self) -> Result<(), String> {
        let l = &self.limits;
        let rates = [
            (l.requests_burst, l.requests_per_minute),
            (l.exchanges_burst, l.exchanges_per_second),
            (l.agent_burst, l.agent_per_second),
            (l.unauthenticated_burst, l.unauthenticated_per_second),
            (l.reader_burst, l.reader_per_second),
        ];
        if rates
            .iter()
            .any(|&(burst, rate)| burst == 0 || rate.is_nan() || rate <= 0.0)
        {
            return Err("limits: bursts and rates must be above 0".into());
        }
        if l.max_connections == 0 || l.header_secs == 0 || l.body_secs == 0 || l.idle_secs == 0 {
            return Err("limits: max_connections and the timeouts must be above 0".into());
        }
        if self.tls.require_client_cert && self.tls.client_ca.is_none() {
            return Err("tls: require_client_cert needs client_ca".into());
        }
        if self.retention.sweep_secs == 0 {
            return Err("retention: sweep_secs must be above 0".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for p in &self.request_policies {
            if !names.insert(&p.name) {
                return Err(format!("request_policy {:?} is defined twice", p.name));
            }
            if p.approvals == 0 && p.auto_approve_groups.is_empty() {
                return Err(format!(
                    "request_policy {:?}: approvals must be at least 1",
                    p.name
                ));
            }
            if p.approvals > 0 && p.approver_groups.is_empty() {
                return Err(format!(
                    "request_policy {:?}: approvals need approver_groups",
                    p.name
                ));
            }
        }
        let mut rule_names = std::collections::BTreeSet::new();
        for w in &self.workloads {
            if !rule_names.insert(&w.name) {
                return Err(format!("workload {:?} is defined twice", w.name));
            }
            if w.max_lifetime.as_secs() == 0 {
                return Err(format!(
                    "workload {:?}: max_lifetime must be positive",
                    w.name
                ));
            }
        }
        for w in &self.webhooks {
            if !(w.url.starts_with("http://") || w.url.starts_with("https://")) {
                return Err(format!("webhook {:?}: not an http(s) URL", w.url));
            }
        }
        let mut hosts = std::collections::BTreeSet::new();
        for a in &self.agents {
            if !hosts.insert(&a.host) {
                return Err(format!("agent {:?} is defined twice", a.host));
            }
            for l in &a.labels {
                if !l.contains('=') {
                    return Err(format!("agent {:?}: label {l:?} is not key=value", a.host));
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum Storage {
    /// Files under `data_dir/objects`.
    #[default]
    Local,
    /// An S3-compatible service.
    S3 {
        bucket: String,
        endpoint: Option<String>,
        region: Option<String>,
        access_key_id: String,
        secret_access_key: String,
        #[serde(default)]
        allow_http: bool,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub host: String,
    pub token: String,
    /// The host's SSH host key (`ssh-ed25519 AAAA…`): it signs each session's seal.
    pub host_key: String,
    /// `key=value` labels request policies select hosts by (`host_labels`).
    #[serde(default)]
    pub labels: Vec<String>,
}

/// Where the workflow's state lives (`[state]`).
#[derive(Debug, Clone, Deserialize, Default, PartialEq)]
#[serde(tag = "backend", rename_all = "lowercase", deny_unknown_fields)]
pub enum StateConfig {
    /// `data_dir/workflow.sqlite`: one instance.
    #[default]
    Sqlite,
    /// One PostgreSQL database shared by every instance (`postgres://user@host:port/db`).
    Postgres { url: String },
}

/// `[retention]`: recordings whose end (or start) is older than `max_age_days` are
/// deleted, objects then index rows, unless under legal hold; a sweep runs every
/// `sweep_secs` on whichever instance holds the sweep's lease.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    pub max_age_days: Option<u64>,
    pub sweep_secs: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            max_age_days: None,
            sweep_secs: 3600,
        }
    }
}

/// `[[request_policy]]`: who may request what, and who approves it.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestPolicy {
    pub name: String,
    /// Who may request under this rule.
    pub groups: Vec<String>,
    /// Host names (globs) ...
    #[serde(default)]
    pub hosts: Vec<String>,
    /// ... or hosts carrying one of these `key=value` labels.
    #[serde(default)]
    pub host_labels: Vec<String>,
    /// Login patterns: `{user}` is the requester's name, sanitised; globs allowed.
    pub logins: Vec<String>,
    /// Profiles that may be asked for; empty: only a request without a profile.
    #[serde(default)]
    pub profiles: Vec<String>,
    #[serde(deserialize_with = "duration_secs")]
    pub max_duration: u64,
    #[serde(default = "yes")]
    pub reason_required: bool,
    #[serde(default = "one")]
    pub approvals: u32,
    #[serde(default)]
    pub approver_groups: Vec<String>,
    #[serde(default)]
    pub auto_approve_groups: Vec<String>,
    /// `HH:MM-HH:MM`, UTC; may wrap past midnight.
    #[serde(default, deserialize_with = "optional_window")]
    pub auto_approve_hours: Option<(u32, u32)>,
    #[serde(default = "one_hour", deserialize_with = "duration_secs")]
    pub pending_ttl: u64,
}

fn yes() -> bool {
    true
}
fn one() -> u32 {
    1
}
fn one_hour() -> u64 {
    3600
}

/// `[[webhook]]`: who hears about requests.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Webhook {
    pub url: String,
    /// `request.created`, `request.decided`, `grant.revoked`; empty: all.
    #[serde(default)]
    pub events: Vec<String>,
}

/// `[oidc]`: the people's identity provider (sign-in on the page, `usher login`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    /// The provider's issuer URL (discovery from `/.well-known/openid-configuration`).
    pub issuer: String,
    /// The page's client (authorization code + PKCE).
    pub client_id: String,
    pub client_secret: Option<String>,
    /// The CLI's public client (device authorization grant); default `client_id`.
    pub cli_client_id: Option<String>,
    /// The ID-token claim that lists the person's groups.
    #[serde(default = "groups_claim")]
    pub roles_claim: String,
    /// An extra root certificate (PEM) for the provider's HTTPS.
    pub ca: Option<PathBuf>,
}

fn groups_claim() -> String {
    "groups".into()
}

/// Token buckets: `*_burst` requests at once, then `*_per_minute` (requests) or
/// `*_per_second` (token exchanges) sustained. The defaults hold off a scripted flood
/// without getting in a person's way; a benchmark or a busy CI fleet raises them.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// New access requests, per person.
    pub requests_burst: u32,
    pub requests_per_minute: f64,
    /// Token exchanges, per client address.
    pub exchanges_burst: u32,
    pub exchanges_per_second: f64,
    /// Requests per agent token (shipping, grants).
    pub agent_burst: u32,
    pub agent_per_second: f64,
    /// Requests per client address that carry no valid credentials: what a scanner or a
    /// guesser of tokens gets before 429.
    pub unauthenticated_burst: u32,
    pub unauthenticated_per_second: f64,
    /// Searches and reads of recordings per person (an API token's or the page's `sub`).
    pub reader_burst: u32,
    pub reader_per_second: f64,
    /// Open connections at once; more are closed as they arrive.
    pub max_connections: usize,
    /// A request's headers must arrive within this many seconds (HTTP/1.1; a keep-alive
    /// connection waiting for its next request is held as long).
    pub header_secs: u64,
    /// A request's body (an agent's chunk, metadata or seal) must arrive within this many
    /// seconds (408).
    pub body_secs: u64,
    /// A connection with no request in flight and nothing read or written for this many
    /// seconds is closed.
    pub idle_secs: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            requests_burst: 10,
            requests_per_minute: 10.0,
            exchanges_burst: 30,
            exchanges_per_second: 10.0,
            agent_burst: 1000,
            agent_per_second: 500.0,
            unauthenticated_burst: 100,
            unauthenticated_per_second: 10.0,
            reader_burst: 300,
            reader_per_second: 50.0,
            max_connections: 4096,
            header_secs: 10,
            body_secs: 60,
            idle_secs: 60,
        }
    }
}

/// Why the configuration cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("{path}: {problem}")]
    Invalid { path: PathBuf, problem: String },
}

/// `"90s"`, `"15m"`, `"4h"`, `"2d"`, or a bare number of seconds.
pub fn parse_duration(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = digits.parse().ok()?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return None,
    };
    n.checked_mul(scale)
}

/// `"08:00-18:00"` as minutes after midnight.
pub fn parse_window(text: &str) -> Option<(u32, u32)> {
    let minutes = |hm: &str| -> Option<u32> {
        let (h, m) = hm.trim().split_once(':')?;
        let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
        (h <= 24 && m < 60 && h * 60 + m <= 24 * 60).then_some(h * 60 + m)
    };
    let (from, to) = text.split_once('-')?;
    Some((minutes(from)?, minutes(to)?))
}

fn duration_secs<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Secs(u64),
        Text(String),
    }
    match Either::deserialize(d)? {
        Either::Secs(n) => Ok(n),
        Either::Text(t) => parse_duration(&t)
            .ok_or_else(|| serde::de::Error::custom(format!("{t:?} is not a duration (15m, 4h)"))),
    }
}

fn optional_window<'de, D: Deserializer<'de>>(d: D) -> Result<Option<(u32, u32)>, D::Error> {
    let text = String::deserialize(d)?;
    parse_window(&text)
        .map(Some)
        .ok_or_else(|| serde::de::Error::custom(format!("{text:?} is not HH:MM-HH:MM")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_policy_reads() {
        let c: Config = toml::from_str(
            r#"
listen = "127.0.0.1:8443"
tls_cert = "c"
tls_key = "k"
data_dir = "d"
public_url = "https://usher.example:8443/"
[state]
backend = "postgres"
url = "postgres://u@127.0.0.1:5432/usher"
[roles]
requester = ["eng"]
approver = ["sre-leads"]
[[request_policy]]
name = "engineers"
groups = ["eng"]
hosts = ["web-*"]
host_labels = ["env=staging"]
logins = ["jit-{user}"]
profiles = ["restricted"]
max_duration = "4h"
approvals = 2
approver_groups = ["sre-leads"]
auto_approve_groups = ["oncall"]
auto_approve_hours = "08:00-18:00"
pending_ttl = "1h"
[[webhook]]
url = "http://127.0.0.1:9/hook"
events = ["request.created"]
[oidc]
issuer = "https://idp"
client_id = "usher"
[index]
backend = "postgres"
url = "postgres://u@127.0.0.1:5432/recordings"
[retention]
max_age_days = 365
sweep_secs = 600
[[workload]]
name = "deploy"
issuer = "https://token.actions.example"
audience = "usher"
claims = { repository = "acme/web", ref = "refs/heads/main" }
hosts = ["web-*"]
login = "jit-deploy"
profile = "restricted"
max_lifetime = "15m"
approval = true
[[workload_issuer]]
iss = "https://token.actions.example"
discovery = true
ca = "/etc/usher/ci-ca.pem"
"#,
        )
        .unwrap();
        c.check().unwrap();
        assert_eq!(c.public_url(), "https://usher.example:8443");
        let p = &c.request_policies[0];
        assert_eq!(p.max_duration, 4 * 3600);
        assert_eq!(p.auto_approve_hours, Some((8 * 60, 18 * 60)));
        assert!(p.reason_required);
        assert_eq!(
            c.state,
            StateConfig::Postgres {
                url: "postgres://u@127.0.0.1:5432/usher".into()
            }
        );
        assert_eq!(c.oidc.as_ref().unwrap().roles_claim, "groups");
        assert_eq!(
            c.index,
            StateConfig::Postgres {
                url: "postgres://u@127.0.0.1:5432/recordings".into()
            }
        );
        assert_eq!(c.retention.max_age_days, Some(365));
        assert_eq!(c.retention.sweep_secs, 600);
        assert_eq!(Config::default().retention.max_age_days, None);
        assert_eq!(c.workloads[0].max_lifetime_secs(), 900);
        assert!(c.workloads[0].approval);
        assert_eq!(c.roles_of(&["sre-leads".into()]), [Role::Approver].into());
    }

    #[test]
    fn durations_and_windows() {
        assert_eq!(parse_duration("15m"), Some(900));
        assert_eq!(parse_duration("30"), Some(30));
        assert_eq!(parse_duration("1x"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_window("22:00-06:00"), Some((1320, 360)));
        assert_eq!(parse_window("25:00-06:00"), None);
    }

    #[test]
    fn client_certificates_and_edge_limits_read_and_are_checked() {
        let base = "listen = \"a\"\ntls_cert = \"c\"\ntls_key = \"k\"\ndata_dir = \"d\"\n";
        let c: Config = toml::from_str(&format!(
            "{base}[tls]\nclient_ca = \"/etc/usher/agents-ca.pem\"\nrequire_client_cert = true\n\
             [limits]\nmax_connections = 10\nbody_secs = 5\n"
        ))
        .unwrap();
        assert_eq!(c.check(), Ok(()));
        assert_eq!(c.limits.max_connections, 10);
        assert_eq!(c.limits.header_secs, 10, "the others keep their defaults");
        let c: Config =
            toml::from_str(&format!("{base}[tls]\nrequire_client_cert = true\n")).unwrap();
        assert!(c.check().is_err(), "required, but chaining to nothing");
        let c: Config =
            toml::from_str(&format!("{base}[limits]\nagent_per_second = 0.0\n")).unwrap();
        assert!(c.check().is_err());
        let c: Config = toml::from_str(&format!("{base}[limits]\nidle_secs = 0\n")).unwrap();
        assert!(c.check().is_err());
        assert!(toml::from_str::<Config>(&format!("{base}[tls]\nclient_key = \"x\"\n")).is_err());
    }
}
