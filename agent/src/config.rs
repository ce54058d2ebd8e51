//! The agent's configuration file (`/etc/usher/usherd.toml`).
//!
//! Every field has a default so that an empty file (or no file) gives a working agent that
//! needs no external service: grants signed by a local issuer key, recordings in a local spool.

use crate::account::{AccountsConfig, AccountsConfigError};
use crate::enforce::Enforcement;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Name of this host as grants address it (`aud`); defaults to the system host name.
    pub host_name: Option<String>,
    /// Extra audiences this host answers to, e.g. `"group:web"`.
    pub audiences: Vec<String>,
    pub state_dir: PathBuf,
    pub spool_dir: PathBuf,
    /// Directory of exec profiles (`*.toml`).
    pub policies_dir: PathBuf,
    pub control_socket: PathBuf,
    /// Where `usher-shell` (the accounts' login shell) hands console logins over.
    pub console_socket: PathBuf,
    pub enforcement: Enforcement,
    pub ssh: SshConfig,
    /// RDP (`[rdp]`); absent, no RDP.
    pub rdp: Option<RdpConfig>,
    pub accounts: AccountsConfig,
    pub policy: PolicyConfig,
    pub recording: RecordingConfig,
    pub spool: SpoolConfig,
    /// Where recordings are shipped; without it they stay in the spool.
    pub collector: Option<CollectorConfig>,
    /// The central service this host fetches its grants and revocations from; its
    /// address, token and CA default to `[collector]`'s (the same service, the same host
    /// token).
    pub service: Option<ServiceConfig>,
    /// Issuers whose grants this host accepts: a JWKS file, a JWKS URL, or discovery.
    #[serde(rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
    /// OIDC tokens of workloads (CI jobs, agents) accepted at the SSH password or
    /// keyboard-interactive prompt, and what each may become.
    #[serde(rename = "workload")]
    pub workloads: Vec<WorkloadRule>,
    /// Key settings (CA, JWKS file or URL, timings) for issuers the `[[workload]]` rules
    /// name; an issuer not listed here is trusted by discovery with the defaults.
    #[serde(rename = "workload_issuer")]
    pub workload_issuers: Vec<IssuerConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SshConfig {
    pub listen: Vec<String>,
    /// Client environment variables passed to the session; a trailing `*` matches a prefix.
    pub accept_env: Vec<String>,
    pub sftp_server: Option<PathBuf>,
    /// Seconds a connection may sit idle before it is dropped.
    pub idle_timeout_secs: u64,
    /// Seconds a connection has to authenticate before it is dropped (sshd's
    /// LoginGraceTime).
    pub login_grace_secs: u64,
    /// Connections that have not authenticated yet, in all and from one source address
    /// (sshd's MaxStartups); more are closed at once.
    pub max_startups: usize,
    pub max_startups_per_source: usize,
    /// Authenticated connections in all.
    pub max_connections: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RdpConfig {
    pub listen: Vec<String>,
    /// What the desktop runs, as the account, with `DISPLAY` set: a shell command line.
    /// The session ends when it exits.
    pub desktop: String,
    /// The X server each desktop runs on (Xvfb, from the xvfb package).
    pub xvfb: PathBuf,
    /// The largest desktop a client may ask for; larger requests are cut to it.
    pub max_width: u16,
    pub max_height: u16,
    /// Desktops start at the largest size, so that a client can enlarge its window later
    /// (Xvfb resizes only below the size it started at); the memory of a full-size screen
    /// per desktop. Off: they start at the client's size, and can shrink and grow back.
    pub grow: bool,
    /// Frames a second sent to a client, at most.
    pub max_fps: u32,
    /// Frames a second written to the recording, at most, and seconds between keyframes.
    pub record_fps: u32,
    pub keyframe_secs: u32,
    /// How long a desktop whose client dropped waits for it to come back.
    pub reconnect_secs: u64,
    /// Seconds a connection has to log in.
    pub login_grace_secs: u64,
    /// Connections not logged in yet, in all and from one address; logged-in ones in all.
    pub max_startups: usize,
    pub max_startups_per_source: usize,
    pub max_connections: usize,
    /// The worker binary (`usher-rdp`); next to usherd when unset.
    pub worker: Option<PathBuf>,
    /// The unprivileged user the workers run as.
    pub worker_user: String,
    /// Where the desktops' X cookies are kept (root's, 0711; each file the account's).
    pub runtime_dir: PathBuf,
}

impl Default for RdpConfig {
    fn default() -> Self {
        RdpConfig {
            listen: vec!["0.0.0.0:3389".into(), "[::]:3389".into()],
            // The terminal starts once the window manager runs (a window mapped while
            // openbox starts up can be left unmapped), and closing it ends the desktop.
            desktop: r#"xsetroot -solid '#2f4f6f' 2>/dev/null; exec openbox --startup 'sh -c "xterm; openbox --exit"' >/dev/null 2>&1"#
                .into(),
            xvfb: "/usr/bin/Xvfb".into(),
            max_width: 2560,
            max_height: 1600,
            grow: false,
            max_fps: 30,
            record_fps: 5,
            keyframe_secs: 10,
            reconnect_secs: 300,
            login_grace_secs: 30,
            max_startups: 50,
            max_startups_per_source: 10,
            max_connections: 200,
            worker: None,
            worker_user: "nobody".into(),
            runtime_dir: "/run/usher/rdp".into(),
        }
    }
}

impl RdpConfig {
    /// `worker`, else next to usherd (a build tree), else where the packages put it.
    pub fn worker_path(&self) -> PathBuf {
        if let Some(p) = &self.worker {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("usher-rdp")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "/usr/libexec/usher/usher-rdp".into())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Longest grant (exp − nbf/iat) accepted, in seconds.
    pub max_lifetime_secs: u64,
    /// Supplementary groups a grant may ask for.
    pub allowed_groups: Vec<String>,
    /// Profiles a grant may name; the default profile is always allowed.
    pub allowed_profiles: Vec<String>,
    pub default_profile: String,
    /// Clock skew tolerated on `nbf`, `iat` and `exp`, in seconds.
    pub leeway_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Refuse the session when its recording cannot be written.
    pub required: bool,
    /// Record keystrokes (`i` events), never at a password-style read (canonical mode
    /// with ECHO off).
    pub input: bool,
    /// Record the output of non-terminal commands (`ssh host cmd`) too.
    pub exec_output: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SpoolConfig {
    /// Bytes the spool may hold before new sessions wait or are refused.
    pub max_bytes: u64,
    pub when_full: WhenFull,
    /// How long a new session waits for room when `when_full = "wait"`.
    pub wait_secs: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WhenFull {
    Refuse,
    Wait,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CollectorConfig {
    /// `https://collector.example:8443`
    pub url: String,
    /// File holding the bearer token that binds this host at the collector.
    pub token_file: PathBuf,
    /// CA certificate(s), PEM, that the collector's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, PEM, for collectors that want mutual TLS.
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Largest chunk of a live session's tail, in bytes (what a reviewer watching it
    /// waits for).
    #[serde(default = "default_chunk_bytes")]
    pub chunk_bytes: usize,
    /// Largest chunk of a backlog (a finished session, or more than two chunks waiting),
    /// in bytes: at most, and by default, the collector's 4 MiB.
    #[serde(default = "default_backlog_chunk_bytes")]
    pub backlog_chunk_bytes: usize,
    /// Seconds between shipping rounds while sessions are live.
    #[serde(default = "default_interval")]
    pub interval_secs: u64,
    /// Chunk bodies go compressed (`Content-Encoding: zstd`, level 1) when that saves at
    /// least a tenth; `false` sends them as they are (a collector older than the fleet
    /// issue does not decode them).
    #[serde(default = "default_compress")]
    pub compress: bool,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// `https://usher.example:8443`; default: `[collector] url`.
    pub url: Option<String>,
    /// The host's bearer token at the service, inline or in a file; default: `[collector]
    /// token_file`.
    pub token: Option<String>,
    pub token_file: Option<PathBuf>,
    /// CA certificate(s), PEM, that the service's certificate must chain to; default:
    /// `[collector] ca_file`.
    pub ca: Option<PathBuf>,
    /// Seconds the service may hold one long-poll before answering "nothing new".
    #[serde(default = "default_service_wait")]
    pub wait_secs: u64,
}

fn default_service_wait() -> u64 {
    25
}

/// Where the grant feed connects and how it proves which host it is, with `[collector]`'s
/// settings filling what `[service]` leaves out.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceEndpoint {
    pub url: String,
    pub token: ServiceToken,
    pub ca: Option<PathBuf>,
    pub wait_secs: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ServiceToken {
    Inline(String),
    File(PathBuf),
}

fn default_chunk_bytes() -> usize {
    256 * 1024
}

fn default_interval() -> u64 {
    2
}

fn default_backlog_chunk_bytes() -> usize {
    4 << 20
}

fn default_compress() -> bool {
    true
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            max_bytes: 4 << 30,
            when_full: WhenFull::Refuse,
            wait_secs: 60,
        }
    }
}

/// `[[issuer]]`: `iss`, and exactly one of `jwks` (a file), `jwks_url`, `discovery = true`;
/// optional `ca`, `refresh_min_secs`, `refresh_secs`, `max_stale_secs`.
pub use usher_trust::IssuerConfig;
/// `[[workload]]`: the same rules as the service's (`hosts` and `approval` are the
/// service's; here the rule means this host, with no approval).
pub use usher_trust::WorkloadRule;

impl Default for Config {
    fn default() -> Self {
        Config {
            host_name: None,
            audiences: Vec::new(),
            state_dir: "/var/lib/usher".into(),
            spool_dir: "/var/spool/usher".into(),
            policies_dir: "/etc/usher/policies".into(),
            control_socket: "/run/usher/control.sock".into(),
            console_socket: "/run/usher/console.sock".into(),
            enforcement: Enforcement::default(),
            ssh: SshConfig::default(),
            rdp: None,
            accounts: AccountsConfig::default(),
            policy: PolicyConfig::default(),
            recording: RecordingConfig::default(),
            spool: SpoolConfig::default(),
            collector: None,
            service: None,
            issuers: Vec::new(),
            workloads: Vec::new(),
            workload_issuers: Vec::new(),
        }
    }
}

impl Default for SshConfig {
    fn default() -> Self {
        SshConfig {
            listen: vec!["0.0.0.0:2222".into(), "[::]:2222".into()],
            accept_env: vec!["LANG".into(), "LC_*".into(), "COLORTERM".into()],
            sftp_server: None,
            idle_timeout_secs: 3600,
            login_grace_secs: 30,
            max_startups: 100,
            max_startups_per_source: 10,
            max_connections: 1000,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            max_lifetime_secs: 8 * 3600,
            allowed_groups: Vec::new(),
            allowed_profiles: vec!["default".into()],
            default_profile: "default".into(),
            leeway_secs: 30,
        }
    }
}

impl Default for RecordingConfig {
    fn default() -> Self {
        RecordingConfig {
            required: true,
            input: false,
            exec_output: true,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error(transparent)]
    Accounts(#[from] AccountsConfigError),
    #[error("ssh.listen is empty")]
    NoListenAddress,
    #[error("ssh.listen: {0:?} is not an address and port (\"0.0.0.0:2222\", \"[::]:2222\")")]
    ListenAddress(String),
    #[error("ssh.login_grace_secs, max_startups, max_startups_per_source and max_connections must be above 0")]
    ZeroConnectionLimit,
    #[error("[service] needs a url (or a [collector] url to default to)")]
    ServiceWithoutUrl,
    #[error("[service] needs token or token_file (or a [collector] token_file to default to)")]
    ServiceWithoutToken,
    #[error("[service] gives both token and token_file: keep one")]
    ServiceTwoTokens,
    #[error("[service] url {0:?} is not https://")]
    ServiceNotHttps(String),
    #[error("[service] wait_secs must be between 1 and 60")]
    ServiceWait,
    #[error(transparent)]
    Issuer(#[from] usher_trust::ConfigError),
    #[error("workload rule {rule:?}: login {login:?} must be a valid account name starting with the accounts' prefix {prefix:?}")]
    WorkloadLogin {
        rule: String,
        login: String,
        prefix: String,
    },
    #[error("workload rule {rule:?}: max_lifetime must be above 0")]
    WorkloadLifetime { rule: String },
    #[error("workload_issuer {0:?} is named by no [[workload]] rule")]
    UnusedWorkloadIssuer(String),
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { source, .. } => ConfigError::Parse {
                path: path.to_owned(),
                source,
            },
            other => other,
        })
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::new(),
            source: Box::new(e),
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.accounts.validate()?;
        if self.ssh.listen.is_empty() {
            return Err(ConfigError::NoListenAddress);
        }
        for addr in &self.ssh.listen {
            addr.parse::<std::net::SocketAddr>()
                .map_err(|_| ConfigError::ListenAddress(addr.clone()))?;
        }
        let s = &self.ssh;
        if s.login_grace_secs == 0
            || s.max_startups == 0
            || s.max_startups_per_source == 0
            || s.max_connections == 0
        {
            return Err(ConfigError::ZeroConnectionLimit);
        }
        for issuer in self.issuers.iter().chain(&self.workload_issuers) {
            issuer.source()?;
        }
        let prefix = &self.accounts.name_prefix;
        for rule in &self.workloads {
            if !crate::account::is_valid_name(&rule.login)
                || !rule.login.starts_with(prefix.as_str())
                || rule.login.len() <= prefix.len()
            {
                return Err(ConfigError::WorkloadLogin {
                    rule: rule.name.clone(),
                    login: rule.login.clone(),
                    prefix: prefix.clone(),
                });
            }
            if rule.max_lifetime_secs() == 0 {
                return Err(ConfigError::WorkloadLifetime {
                    rule: rule.name.clone(),
                });
            }
        }
        if let Some(unused) = self
            .workload_issuers
            .iter()
            .find(|i| !self.workloads.iter().any(|r| r.issuer == i.iss))
        {
            return Err(ConfigError::UnusedWorkloadIssuer(unused.iss.clone()));
        }
        self.service_endpoint()?;
        Ok(())
    }

    /// The grant feed's endpoint, when `[service]` is configured.
    pub fn service_endpoint(&self) -> Result<Option<ServiceEndpoint>, ConfigError> {
        let Some(service) = &self.service else {
            return Ok(None);
        };
        let collector = self.collector.as_ref();
        let url = service
            .url
            .clone()
            .or_else(|| collector.map(|c| c.url.clone()))
            .ok_or(ConfigError::ServiceWithoutUrl)?;
        if !url.starts_with("https://") {
            return Err(ConfigError::ServiceNotHttps(url));
        }
        let token = match (&service.token, &service.token_file) {
            (Some(_), Some(_)) => return Err(ConfigError::ServiceTwoTokens),
            (Some(t), None) => ServiceToken::Inline(t.clone()),
            (None, Some(f)) => ServiceToken::File(f.clone()),
            (None, None) => ServiceToken::File(
                collector
                    .map(|c| c.token_file.clone())
                    .ok_or(ConfigError::ServiceWithoutToken)?,
            ),
        };
        if !(1..=60).contains(&service.wait_secs) {
            return Err(ConfigError::ServiceWait);
        }
        Ok(Some(ServiceEndpoint {
            url: url.trim_end_matches('/').to_string(),
            token,
            ca: service
                .ca
                .clone()
                .or_else(|| collector.and_then(|c| c.ca_file.clone())),
            wait_secs: service.wait_secs,
        }))
    }

    pub fn host_name(&self) -> String {
        self.host_name.clone().unwrap_or_else(|| {
            nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into())
        })
    }

    /// Every `aud` value a grant for this host may carry.
    pub fn accepted_audiences(&self) -> Vec<String> {
        let mut auds = vec![self.host_name()];
        auds.extend(self.audiences.iter().cloned());
        auds
    }

    /// The recording shell accounts get; `nologin` if it cannot be found, so that a
    /// console login fails closed rather than getting an unrecorded shell.
    pub fn login_shell(&self) -> PathBuf {
        if let Some(p) = &self.accounts.login_shell {
            return p.clone();
        }
        std::env::current_exe()
            .ok()
            .and_then(|exe| Some(exe.parent()?.join("usher-shell")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| "/usr/sbin/nologin".into())
    }

    pub fn sftp_server(&self) -> Option<PathBuf> {
        if let Some(p) = &self.ssh.sftp_server {
            return Some(p.clone());
        }
        [
            "/usr/lib/openssh/sftp-server",
            "/usr/libexec/openssh/sftp-server",
        ]
        .iter()
        .map(PathBuf::from)
        .find(|p| p.exists())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.accounts.name_prefix, "jit-");
        assert!(c.recording.required);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_each_by_its_kind() {
        assert!(matches!(
            Config::parse("nonsense = 1"),
            Err(ConfigError::Parse { .. })
        ));
        for (text, min, max) in [
            ("[accounts]\nuid_min = 0\nuid_max = 10", 0, 10),
            ("[accounts]\nuid_min = 70000\nuid_max = 60000", 70000, 60000),
        ] {
            assert!(matches!(
                Config::parse(text),
                Err(ConfigError::Accounts(AccountsConfigError::UidRange { min: a, max: b })) if a == min && b == max
            ));
        }
        for prefix in ["a b", "-x", "averyveryverylongprefix-"] {
            assert!(matches!(
                Config::parse(&format!("[accounts]\nname_prefix = \"{prefix}\"")),
                Err(ConfigError::Accounts(AccountsConfigError::NamePrefix(p))) if p == prefix
            ));
        }
        assert!(matches!(
            Config::parse("[ssh]\nlisten = []"),
            Err(ConfigError::NoListenAddress)
        ));
        assert!(matches!(
            Config::parse("[ssh]\nlisten = [\"2222\"]"),
            Err(ConfigError::ListenAddress(a)) if a == "2222"
        ));
        assert!(matches!(
            Config::parse("[ssh]\nmax_startups = 0"),
            Err(ConfigError::ZeroConnectionLimit)
        ));
        assert!(matches!(
            Config::load(Path::new("/nonexistent/usherd.toml")),
            Err(ConfigError::Read { .. })
        ));
    }

    #[test]
    fn the_service_defaults_to_the_collector_and_says_what_is_missing() {
        let collector =
            "[collector]\nurl = \"https://c:8443/\"\ntoken_file = \"/t\"\nca_file = \"/ca.pem\"\n";
        let c = Config::parse(&format!("{collector}[service]\n")).unwrap();
        assert_eq!(
            c.service_endpoint().unwrap(),
            Some(ServiceEndpoint {
                url: "https://c:8443".into(),
                token: ServiceToken::File("/t".into()),
                ca: Some("/ca.pem".into()),
                wait_secs: 25,
            })
        );
        let c = Config::parse(&format!(
            "{collector}[service]\nurl = \"https://s\"\ntoken = \"abc\"\nca = \"/s.pem\"\nwait_secs = 5\n"
        ))
        .unwrap();
        let e = c.service_endpoint().unwrap().unwrap();
        assert_eq!(e.url, "https://s");
        assert_eq!(e.token, ServiceToken::Inline("abc".into()));
        assert_eq!(e.ca, Some("/s.pem".into()));
        assert_eq!(e.wait_secs, 5);
        assert_eq!(Config::parse("").unwrap().service_endpoint().unwrap(), None);
        assert!(matches!(
            Config::parse("[service]\ntoken = \"x\"\n"),
            Err(ConfigError::ServiceWithoutUrl)
        ));
        assert!(matches!(
            Config::parse("[service]\nurl = \"https://s\"\n"),
            Err(ConfigError::ServiceWithoutToken)
        ));
        assert!(matches!(
            Config::parse("[service]\nurl = \"https://s\"\ntoken = \"x\"\ntoken_file = \"/t\"\n"),
            Err(ConfigError::ServiceTwoTokens)
        ));
        assert!(matches!(
            Config::parse("[service]\nurl = \"http://s\"\ntoken = \"x\"\n"),
            Err(ConfigError::ServiceNotHttps(u)) if u == "http://s"
        ));
        assert!(matches!(
            Config::parse("[service]\nurl = \"https://s\"\ntoken = \"x\"\nwait_secs = 0\n"),
            Err(ConfigError::ServiceWait)
        ));
    }

    #[test]
    fn issuers_parse() {
        let c = Config::parse(
            "enforcement = \"off\"\n[[issuer]]\niss = \"https://idp\"\njwks = \"/etc/usher/idp.jwks\"\n",
        )
        .unwrap();
        assert_eq!(c.issuers.len(), 1);
        assert_eq!(c.enforcement, Enforcement::Off);
        let c = Config::parse(
            "[[issuer]]\niss = \"https://usher.example:8443\"\ndiscovery = true\nca = \"/etc/usher/service-ca.pem\"\n\
             [[issuer]]\niss = \"https://idp\"\njwks_url = \"https://idp/jwks.json\"\nrefresh_min_secs = 5\n",
        )
        .unwrap();
        assert!(c.issuers[0].discovery);
        assert_eq!(c.issuers[1].refresh_min_secs, 5);
        for bad in [
            "[[issuer]]\niss = \"https://idp\"\n",
            "[[issuer]]\niss = \"https://idp\"\njwks = \"/x\"\ndiscovery = true\n",
            "[[issuer]]\niss = \"http://idp\"\ndiscovery = true\n",
        ] {
            assert!(
                matches!(Config::parse(bad), Err(ConfigError::Issuer(_))),
                "{bad}"
            );
        }
    }

    const WORKLOAD: &str =
        "[[workload]]\nname = \"deploy\"\nissuer = \"https://token.actions.example\"\n\
        audience = \"usher\"\nclaims = { repository = \"acme/web\", ref = \"refs/heads/main\" }\n\
        login = \"jit-deploy\"\nprofile = \"restricted\"\nmax_lifetime = \"15m\"\n";

    #[test]
    fn workload_rules_parse_and_their_logins_carry_the_prefix() {
        let c = Config::parse(WORKLOAD).unwrap();
        assert_eq!(c.workloads.len(), 1);
        assert_eq!(c.workloads[0].max_lifetime_secs(), 900);
        assert_eq!(c.workloads[0].claims.len(), 2);
        for login in ["root", "jit-", "deploy", "jit-a b"] {
            let text = WORKLOAD.replace("jit-deploy", login);
            assert!(
                matches!(Config::parse(&text), Err(ConfigError::WorkloadLogin { login: l, .. }) if l == login),
                "{login}"
            );
        }
        let text = WORKLOAD.replace("\"15m\"", "0");
        assert!(matches!(
            Config::parse(&text),
            Err(ConfigError::WorkloadLifetime { .. })
        ));
        let with_issuer = format!(
            "{WORKLOAD}[[workload_issuer]]\niss = \"https://token.actions.example\"\ndiscovery = true\nrefresh_min_secs = 1\n"
        );
        assert_eq!(
            Config::parse(&with_issuer).unwrap().workload_issuers[0].refresh_min_secs,
            1
        );
        assert!(matches!(
            Config::parse("[[workload_issuer]]\niss = \"https://nobody\"\ndiscovery = true\n"),
            Err(ConfigError::UnusedWorkloadIssuer(_))
        ));
    }
}
