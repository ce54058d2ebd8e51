//! `usher-collector`: the central Usher service. It receives recordings and audit streams
//! from Usher agents over HTTPS, verifies, stores, indexes and replays them, and runs the
//! just-in-time workflow (collector/WORKFLOW.md).
//!
//! As a systemd service (packaging/usher-collector.service) it is `Type=notify`: READY once
//! its port takes connections, RELOADING/READY around a reload (SIGHUP), STOPPING on
//! SIGTERM, then a bounded graceful stop. It logs to the journal with structured fields
//! (`USHER_EVENT=…`) when journald holds its stderr, to stderr otherwise.

#![deny(unsafe_code)]

mod edge;

use usher_collector::{api, config};

use clap::{Parser, Subcommand};
use log::kv::{Key, Value, VisitSource};
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// How long a stop waits for requests in flight (an agent's upload, a long-poll) before
/// their connections are closed; the unit's TimeoutStopSec is longer.
const GRACEFUL_STOP: Duration = Duration::from_secs(10);

/// The self-signed certificate `init` makes: long enough that agents pinning it are not
/// broken by surprise, short enough that it is not forever.
const SELF_SIGNED_DAYS: i64 = 3650;

#[derive(Parser)]
#[command(
    version,
    about = "Usher service: just-in-time access workflow, session recordings and their replay"
)]
struct Args {
    #[arg(short, long, default_value = "/etc/usher/collector.toml")]
    config: PathBuf,
    /// More detail in the log.
    #[arg(short, long)]
    verbose: bool,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
    /// Makes a self-signed TLS certificate and key at the configured `tls_cert` and
    /// `tls_key`, unless both are already there (the package runs this on first install).
    /// Its names: localhost, 127.0.0.1, ::1, this host's name, the host of `public_url`,
    /// and every --name.
    Init {
        /// Another DNS name or IP address the certificate is valid for (repeatable).
        #[arg(long = "name")]
        names: Vec<String>,
    },
    /// One collector (in-process, loopback, local storage in a scratch directory) and N
    /// simulated agents shipping at once; prints ingest MB/s and sessions/s.
    Bench {
        #[arg(long, default_value_t = 8)]
        agents: usize,
        /// Sessions each agent ships, one after the other.
        #[arg(long, default_value_t = 10)]
        sessions: usize,
        /// Size of each session's cast.
        #[arg(long, default_value_t = 1024)]
        session_kib: usize,
        #[arg(long, default_value_t = 64)]
        chunk_kib: usize,
        /// Send chunk bodies as they are, not zstd as agents do.
        #[arg(long)]
        no_compress: bool,
    },
    /// Prints an API token signed with the service's issuer key (from its state store),
    /// e.g. for an auditor's script or a test: `token --sub S --name N --roles auditor`.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long)]
        name: String,
        /// requester, approver, auditor, admin (comma-separated).
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        /// Groups (comma-separated); a token with groups gets its roles from `[roles]`.
        #[arg(long, value_delimiter = ',')]
        groups: Vec<String>,
        /// How long it is valid: 90s, 15m, 12h, 30d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// `usher-collector token`: an API token from the issuer key in the state store.
fn mint_token(
    config: &std::path::Path,
    sub: String,
    name: String,
    roles: Vec<String>,
    groups: Vec<String>,
    ttl: &str,
) -> Result<String, String> {
    let config = config::Config::load(config).map_err(|e| e.to_string())?;
    let ttl =
        config::parse_duration(ttl).ok_or_else(|| format!("--ttl {ttl:?}: not a duration"))?;
    let roles = roles
        .iter()
        .filter(|r| !r.is_empty())
        .map(|r| {
            serde_json::from_value::<usher_wire::jit::Role>(serde_json::Value::String(r.clone()))
                .map_err(|_| format!("--roles: unknown role {r:?}"))
        })
        .collect::<Result<_, _>>()?;
    let workflow =
        usher_collector::workflow::Workflow::open_blocking(&config).map_err(|e| e.to_string())?;
    let principal = usher_wire::jit::Principal {
        sub,
        name,
        groups: groups.into_iter().filter(|g| !g.is_empty()).collect(),
        roles,
    };
    workflow
        .issuer
        .api_token(&principal, usher_collector::workflow::now(), ttl as i64)
        .map_err(|e| e.to_string())
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("tokio: {0}")]
    Runtime(std::io::Error),
    #[error("signal handler: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Tls(#[from] edge::TlsSetupError),
    #[error("listen {listen:?}: {source}")]
    Listen {
        listen: String,
        source: std::net::AddrParseError,
    },
    #[error(transparent)]
    App(#[from] api::AppError),
    #[error("cannot serve on {addr}: {source}")]
    Serve {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the server task ended abnormally: {0}")]
    ServerTask(tokio::task::JoinError),
}

fn main() -> ExitCode {
    let args = Args::parse();
    init_logging(args.verbose);
    // Two TLS stacks are linked in (the server's and the S3 client's); say which provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match args.command {
        Some(Cmd::Init { names }) => match init_tls(&args.config, names) {
            Ok(InitOutcome::Made { cert, key, names }) => {
                println!(
                    "usher-collector: made a self-signed certificate {} (key {}) for {}",
                    cert.display(),
                    key.display(),
                    names.join(", ")
                );
                ExitCode::SUCCESS
            }
            Ok(InitOutcome::AlreadyThere { cert, key }) => {
                println!(
                    "usher-collector: {} and {} are already there; nothing made",
                    cert.display(),
                    key.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("usher-collector init: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::Token {
            sub,
            name,
            roles,
            groups,
            ttl,
        }) => match mint_token(&args.config, sub, name, roles, groups, &ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("usher-collector token: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::Bench {
            agents,
            sessions,
            session_kib,
            chunk_kib,
            no_compress,
        }) => {
            let params = usher_collector::bench::Params {
                agents,
                sessions,
                session_kib,
                chunk_kib,
                compress: !no_compress,
            };
            let result = tokio::runtime::Runtime::new()
                .map_err(|e| e.to_string())
                .and_then(|rt| rt.block_on(usher_collector::bench::run(params)));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("usher-collector bench: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        None => match run_service(&args.config) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                // One line, to the journal or to stderr (both would say it twice there).
                log::error!(target: "usher", usher_event = "service_failed", error = e.to_string(); "usher-collector: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_service(config_path: &Path) -> Result<(), StartError> {
    let config = config::Config::load(config_path)?;
    let runtime = tokio::runtime::Runtime::new().map_err(StartError::Runtime)?;
    runtime.block_on(serve(config_path, config))
}

async fn serve(config_path: &Path, config: config::Config) -> Result<(), StartError> {
    // Registered before anything else: a signal that arrives while the service starts is
    // handled, never left to its default (the end of the service).
    let mut signals = Signals::install().map_err(StartError::Signals)?;
    let tls = axum_server::tls_rustls::RustlsConfig::from_config(edge::server_tls(&config).await?);
    let addr: SocketAddr = config.listen.parse().map_err(|source| StartError::Listen {
        listen: config.listen.clone(),
        source,
    })?;
    let mut reloader = Reloader {
        path: config_path.to_owned(),
        sections: read_sections(config_path),
        listen: config.listen.clone(),
        tls: tls.clone(),
    };
    let limits = config.limits.clone();
    let header_time = Duration::from_secs(limits.header_secs);
    let idle_time = Duration::from_secs(limits.idle_secs);
    let acceptor = edge::EdgeAcceptor::new(
        tls.clone(),
        limits.max_connections,
        idle_time,
        header_time,
        config.tls.client_ca.is_some(),
    );
    let app = Arc::new(api::App::new(config).await?);
    let handle = axum_server::Handle::new();
    let mut server = axum_server::bind(addr)
        .acceptor(acceptor)
        .handle(handle.clone());
    // A client that does not finish its headers in time is cut (a keep-alive connection
    // waiting for its next request is held as long); an HTTP/2 peer that stops answering
    // pings is dropped.
    server
        .http_builder()
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_time);
    server
        .http_builder()
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(idle_time / 2)
        .keep_alive_timeout(header_time)
        .max_concurrent_streams(256);
    let mut server = tokio::spawn(
        server.serve(api::router(app.clone()).into_make_service_with_connect_info::<SocketAddr>()),
    );
    let server_ended = |joined: Result<std::io::Result<()>, tokio::task::JoinError>| match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(source)) => Err(StartError::Serve { addr, source }),
        Err(e) => Err(StartError::ServerTask(e)),
    };
    // READY only once the socket is bound: a client that connects from then on is answered.
    tokio::select! {
        bound = handle.listening() => match bound {
            Some(bound) => {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                log::info!(target: "usher", usher_event = "service_ready", listen = bound.to_string(), version = env!("CARGO_PKG_VERSION"); "usher-collector {} listening on https://{bound}", env!("CARGO_PKG_VERSION"));
            }
            // The bind failed: the server task says why.
            None => return server_ended((&mut server).await),
        },
        joined = &mut server => return server_ended(joined),
    }
    let signal = loop {
        tokio::select! {
            _ = signals.hangup.recv() => reloader.reload(&app).await,
            _ = signals.terminate.recv() => break "SIGTERM",
            _ = signals.interrupt.recv() => break "SIGINT",
            joined = &mut server => return server_ended(joined),
        }
    };
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    log::info!(target: "usher", usher_event = "service_stopping", signal = signal, connections = handle.connection_count(); "usher-collector stopping ({signal}): {} connection(s) get up to {} s to finish", handle.connection_count(), GRACEFUL_STOP.as_secs());
    handle.graceful_shutdown(Some(GRACEFUL_STOP));
    server_ended(server.await)
}

/// The signals the service answers, registered at once.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Signals {
            terminate: signal(SignalKind::terminate())?,
            interrupt: signal(SignalKind::interrupt())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }
}

/// SIGHUP (`systemctl reload usher-collector`): the file is read again; a file that does
/// not load leaves everything as it was.
struct Reloader {
    path: PathBuf,
    /// The file's top-level sections as last loaded: what a reload compares against to say
    /// what changed (by name only: values hold tokens and secrets).
    sections: toml::Table,
    listen: String,
    tls: axum_server::tls_rustls::RustlsConfig,
}

impl Reloader {
    async fn reload(&mut self, app: &api::App) {
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        let _ = sd_notify::notify(false, &states);
        match config::Config::load(&self.path) {
            Err(e) => {
                log::error!(target: "usher", usher_event = "config_reload_failed", error = e.to_string(); "reload failed, keeping the previous configuration: {e}");
            }
            Ok(new) => {
                let sections = read_sections(&self.path);
                let changed = changed_sections(&self.sections, &sections);
                // Always re-read: a certificate (or the agents' CA) renewed at the same path
                // is a change too.
                match edge::server_tls(&new).await {
                    Ok(server) => self.tls.reload_from_config(server),
                    Err(e) => {
                        log::error!(target: "usher", usher_event = "tls_reload_failed", error = e.to_string(); "reload: {e}; still serving the previous TLS configuration");
                    }
                }
                let mut at_restart = Vec::new();
                if new.listen != self.listen {
                    at_restart.push("listen".to_string());
                }
                at_restart.extend(hand_to_app(app, new, &changed));
                let changed_text = if changed.is_empty() {
                    "nothing".to_string()
                } else {
                    changed.join(", ")
                };
                log::info!(target: "usher", usher_event = "config_reloaded", changed = changed.join(","), at_restart = at_restart.join(","); "configuration reloaded from {}: changed {changed_text}", self.path.display());
                if !at_restart.is_empty() {
                    log::warn!(target: "usher", "reload: {} take(s) effect at the next restart (systemctl restart usher-collector)", at_restart.join(", "));
                }
                self.sections = sections;
            }
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    }
}

/// Hands a reloaded configuration to the running app; answers the changed sections that
/// still need a restart (the app swaps request policy, roles, webhooks, workload rules and
/// hosts' labels; listen, TLS files are the reloader's; the rest waits for a restart).
fn hand_to_app(app: &api::App, config: config::Config, changed: &[String]) -> Vec<String> {
    if let Err(e) = app.reload(config) {
        log::error!(target: "usher", usher_event = "config_reload_failed", error = e.to_string(); "reload: the service refused the new configuration: {e}");
        return changed.to_vec();
    }
    changed
        .iter()
        .filter(|s| {
            matches!(
                s.as_str(),
                "data_dir"
                    | "storage"
                    | "state"
                    | "agent"
                    | "oidc"
                    | "public_url"
                    | "tls"
                    | "limits"
            )
        })
        .cloned()
        .collect()
}

/// The configuration file's top-level keys and their values; empty when it cannot be read
/// (only the change report loses by that: the configuration itself is read by
/// `Config::load`).
fn read_sections(path: &Path) -> toml::Table {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| text.parse::<toml::Table>().ok())
        .unwrap_or_default()
}

/// The top-level keys whose value differs between two readings of the file, sorted.
fn changed_sections(old: &toml::Table, new: &toml::Table) -> Vec<String> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .cloned()
        .collect()
}

#[derive(Debug, thiserror::Error)]
enum InitError {
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("{present} is there but {missing} is not: remove the one or provide the other")]
    HalfThere { present: PathBuf, missing: PathBuf },
    #[error("the certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

enum InitOutcome {
    Made {
        cert: PathBuf,
        key: PathBuf,
        names: Vec<String>,
    },
    AlreadyThere {
        cert: PathBuf,
        key: PathBuf,
    },
}

fn init_tls(config_path: &Path, extra_names: Vec<String>) -> Result<InitOutcome, InitError> {
    let config = config::Config::load(config_path)?;
    let (cert_path, key_path) = (config.tls_cert, config.tls_key);
    match (cert_path.exists(), key_path.exists()) {
        (true, true) => {
            return Ok(InitOutcome::AlreadyThere {
                cert: cert_path,
                key: key_path,
            })
        }
        (true, false) => {
            return Err(InitError::HalfThere {
                present: cert_path,
                missing: key_path,
            })
        }
        (false, true) => {
            return Err(InitError::HalfThere {
                present: key_path,
                missing: cert_path,
            })
        }
        (false, false) => {}
    }
    let names = certificate_names(&read_sections(config_path), extra_names);
    let mut params = rcgen::CertificateParams::new(names.clone())?;
    let mut subject = rcgen::DistinguishedName::new();
    subject.push(rcgen::DnType::CommonName, "usher-collector (self-signed)");
    params.distinguished_name = subject;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(SELF_SIGNED_DAYS);
    let key_pair = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key_pair)?;
    write_new(&cert_path, cert.pem().as_bytes(), 0o644)?;
    if let Err(e) = write_new(&key_path, key_pair.serialize_pem().as_bytes(), 0o600) {
        // Half a pair would stop the next `init` too: take the certificate back.
        let _ = std::fs::remove_file(&cert_path);
        return Err(e);
    }
    Ok(InitOutcome::Made {
        cert: cert_path,
        key: key_path,
        names,
    })
}

/// Loopback, this host's name, the host of `public_url` when the file has one, and what
/// the administrator adds; each once.
fn certificate_names(sections: &toml::Table, extra: Vec<String>) -> Vec<String> {
    let mut names: Vec<String> = ["localhost", "127.0.0.1", "::1"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Ok(host) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        names.push(host.trim().to_string());
    }
    let public_host = sections
        .get("public_url")
        .and_then(|v| v.as_str())
        .and_then(|u| url::Url::parse(u).ok())
        .and_then(|u| u.host_str().map(|h| h.trim_matches(['[', ']']).to_string()));
    names.extend(public_host);
    names.extend(extra);
    let mut unique = Vec::new();
    for name in names {
        if !name.is_empty() && !unique.contains(&name) {
            unique.push(name);
        }
    }
    unique
}

/// Writes a file that must not exist yet (never through a link someone left there), its
/// directory made if needed (0750: the key's directory is not for everyone to list).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InitError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    let failed = |source| InitError::Write {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o750)
            .create(dir)
            .map_err(|source| InitError::Write {
                path: dir.to_owned(),
                source,
            })?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(failed)?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(failed)
}

/// The journal (with structured fields: `journalctl USHER_EVENT=config_reloaded`) when
/// journald holds stderr, stderr otherwise.
fn init_logging(verbose: bool) {
    let level = if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger.with_syslog_identifier("usher-collector".to_string());
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("usher") || m.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format!("{:<5} {}", record.level(), record.args());
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        line.push_str(&fields.0);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

/// A record's structured fields on a stderr line, as the journal names them.
struct Fields(String);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let v = value.to_string();
        let name = key.as_str().to_uppercase();
        if v.contains(' ') || v.is_empty() {
            self.0.push_str(&format!(" {name}={v:?}"));
        } else {
            self.0.push_str(&format!(" {name}={v}"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> toml::Table {
        text.parse().expect("test toml")
    }

    #[test]
    fn a_reload_names_changed_added_and_removed_sections_only() {
        let old =
            table("listen = \"a\"\ndata_dir = \"/d\"\n[[agent]]\nhost = \"h\"\ntoken = \"t\"\n");
        let new = table("listen = \"a\"\ndata_dir = \"/e\"\nassets_dir = \"/x\"\n");
        assert_eq!(
            changed_sections(&old, &new),
            vec!["agent", "assets_dir", "data_dir"]
        );
        assert!(changed_sections(&old, &old).is_empty());
    }

    #[test]
    fn certificate_names_take_public_url_and_extras_once() {
        let names = certificate_names(
            &table("public_url = \"https://usher.example:8443\"\n"),
            vec!["usher.example".into(), "10.0.0.5".into()],
        );
        assert_eq!(&names[..3], &["localhost", "127.0.0.1", "::1"]);
        assert_eq!(
            names.iter().filter(|n| *n == "usher.example").count(),
            1,
            "{names:?}"
        );
        assert!(names.contains(&"10.0.0.5".to_string()));
    }

    #[test]
    fn init_makes_a_pair_once_and_refuses_half_a_pair() {
        let dir = std::env::temp_dir().join(format!("usher-collector-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let config = dir.join("collector.toml");
        let cert = dir.join("tls/cert.pem");
        let key = dir.join("tls/key.pem");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:0\"\ntls_cert = {:?}\ntls_key = {:?}\ndata_dir = {:?}\n",
                cert,
                key,
                dir.join("data")
            ),
        )
        .expect("config");
        assert!(matches!(
            init_tls(&config, vec![]),
            Ok(InitOutcome::Made { .. })
        ));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key).expect("key").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(&cert).expect("cert");
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        // rustls takes the pair as made.
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let _ = rustls::crypto::ring::default_provider().install_default();
        rt.block_on(axum_server::tls_rustls::RustlsConfig::from_pem_file(
            &cert, &key,
        ))
        .expect("rustls loads the pair");
        assert!(matches!(
            init_tls(&config, vec![]),
            Ok(InitOutcome::AlreadyThere { .. })
        ));
        std::fs::remove_file(&key).expect("remove key");
        assert!(matches!(
            init_tls(&config, vec![]),
            Err(InitError::HalfThere { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
