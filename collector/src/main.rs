//! `usher-collector`: receives recordings and audit streams from Usher agents over HTTPS,
//! verifies their hash chains and seals, stores them (local directory or S3), indexes them
//! in SQLite, and serves a page to search and replay them.

mod api;
mod config;
mod keys;
mod store;

use clap::Parser;
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
    let result = (|| -> Result<(), String> {
        let config = config::Config::load(&args.config)?;
        let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
        rt.block_on(async move {
            let tls = axum_server::tls_rustls::RustlsConfig::from_pem_file(
                &config.tls_cert,
                &config.tls_key,
            )
            .await
            .map_err(|e| format!("TLS: {e}"))?;
            let addr: std::net::SocketAddr =
                config.listen.parse().map_err(|e| format!("listen: {e}"))?;
            let app = Arc::new(api::App::new(config)?);
            log::info!(target: "usher", "usher-collector listening on https://{addr}");
            axum_server::bind_rustls(addr, tls)
                .serve(api::router(app).into_make_service())
                .await
                .map_err(|e| e.to_string())
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
