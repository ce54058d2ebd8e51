//! `usher-collector`: receives recordings and audit streams from Usher agents over HTTPS,
//! verifies their hash chains and seals, stores them (local directory or S3), indexes them
//! in SQLite, and serves a page to search and replay them.

#![deny(unsafe_code)]

use usher_collector::{api, config};

use clap::{Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

#[derive(Parser)]
#[command(
    version,
    about = "Usher collector: stores, verifies, indexes and replays session recordings"
)]
struct Args {
    #[arg(short, long, default_value = "/etc/usher/collector.toml")]
    config: PathBuf,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Subcommand)]
enum Cmd {
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
    #[error("TLS: {0}")]
    Tls(std::io::Error),
    #[error("listen: {0}")]
    Listen(#[from] std::net::AddrParseError),
    #[error(transparent)]
    App(#[from] api::AppError),
    #[error("{0}")]
    Serve(std::io::Error),
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.target().starts_with("usher") || m.level() <= log::Level::Warn
    }
    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            let _ = writeln!(std::io::stderr(), "{:<5} {}", r.level(), r.args());
        }
    }
    fn flush(&self) {}
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let _ = log::set_boxed_logger(Box::new(StderrLog))
        .map(|()| log::set_max_level(log::LevelFilter::Info));
    // Two TLS stacks are linked in (the server's and the S3 client's); say which provider.
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Some(Cmd::Token {
        sub,
        name,
        roles,
        groups,
        ttl,
    }) = args.command
    {
        return match mint_token(&args.config, sub, name, roles, groups, &ttl) {
            Ok(token) => {
                println!("{token}");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("usher-collector token: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    if let Some(Cmd::Bench {
        agents,
        sessions,
        session_kib,
        chunk_kib,
    }) = args.command
    {
        let params = usher_collector::bench::Params {
            agents,
            sessions,
            session_kib,
            chunk_kib,
        };
        let result = tokio::runtime::Runtime::new()
            .map_err(|e| e.to_string())
            .and_then(|rt| rt.block_on(usher_collector::bench::run(params)));
        return match result {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("usher-collector bench: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let result = (|| -> Result<(), StartError> {
        let config = config::Config::load(&args.config)?;
        let rt = tokio::runtime::Runtime::new().map_err(StartError::Runtime)?;
        rt.block_on(async move {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
                &config.tls_cert,
                &config.tls_key,
            )
            .await
            .map_err(StartError::Tls)?;
            let addr: std::net::SocketAddr = config.listen.parse()?;
            let app = Arc::new(api::App::new(config).await?);
            log::info!(target: "usher", "usher-collector listening on https://{addr}");
            axum_server::bind_rustls(addr, tls)
                .serve(
                    api::router(app).into_make_service_with_connect_info::<std::net::SocketAddr>(),
                )
                .await
                .map_err(StartError::Serve)
        })
    })();
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher-collector: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
