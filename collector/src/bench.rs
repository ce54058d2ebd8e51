//! `usher-collector bench`: one collector (in this process, on loopback, local storage in
//! a scratch directory) and N simulated agents shipping sessions through the real HTTPS
//! protocol at once. Prints ingest throughput in MB/s and sessions/s, in steady state:
//! each agent ships one warm-up session (its connection, the collector's first writes)
//! before the clock starts, and all start together.
//!
//! The index is SQLite in the scratch directory; with `USHER_BENCH_INDEX=postgres` a
//! scratch PostgreSQL (Debian's, as the tests start it), or the one
//! `USHER_BENCH_INDEX_URL` (`postgres://…`) names. The scratch directory is under `TMPDIR`;
//! with `USHER_BENCH_KEEP_SCRATCH` set it is left for the caller to delete (so that runs
//! in a row do not allocate their files among the inodes the previous run just freed).

use crate::config::{AgentConfig, Config, StateConfig, Storage};
use crate::uploader::{openssh_public_line, Recording, Uploader};
use ed25519_dalek::SigningKey;
use std::sync::Arc;
use std::time::Instant;

pub struct Params {
    pub agents: usize,
    pub sessions: usize,
    pub session_kib: usize,
    pub chunk_kib: usize,
    /// Chunk bodies as the agents send them (zstd when it saves a tenth), or as they are.
    pub compress: bool,
}

/// Serves `config` on an already bound listener until the process ends.
pub async fn serve(listener: std::net::TcpListener, config: Config) -> Result<(), String> {
    let tls =
        axum_server::tls_rustls::RustlsConfig::from_pem_file(&config.tls_cert, &config.tls_key)
            .await
            .map_err(|e| format!("TLS: {e}"))?;
    let app = Arc::new(
        crate::api::App::new(config)
            .await
            .map_err(|e| e.to_string())?,
    );
    listener.set_nonblocking(true).map_err(|e| e.to_string())?;
    // Small answers go out at once (no Nagle wait for the client's delayed ACK).
    let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(tls)
        .acceptor(axum_server::accept::NoDelayAcceptor::new());
    axum_server::from_tcp(listener)
        .acceptor(acceptor)
        .serve(crate::api::router(app).into_make_service())
        .await
        .map_err(|e| e.to_string())
}

pub async fn run(p: Params) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("usher-collector-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    // The benchmark's TLS is the tests' throwaway CA.
    let ca = usher_test_support::TestCa::create(&dir).map_err(|e| e.to_string())?;
    // `USHER_BENCH_INDEX=postgres`: a scratch PostgreSQL (the tests'), kept while this
    // runs; `USHER_BENCH_INDEX_URL`: an existing one.
    let mut scratch_postgres = None;
    let postgres = match (
        std::env::var("USHER_BENCH_INDEX_URL")
            .ok()
            .filter(|u| !u.is_empty()),
        std::env::var("USHER_BENCH_INDEX").as_deref(),
    ) {
        (Some(url), _) => Some(url),
        (None, Ok("postgres")) => {
            let pg = usher_test_support::Postgres::start().map_err(|e| e.to_string())?;
            let url = pg.url();
            scratch_postgres = Some(pg);
            Some(url)
        }
        _ => None,
    };
    let keys: Vec<SigningKey> = (0..p.agents)
        .map(|i| SigningKey::from_bytes(&[i as u8 + 1; 32]))
        .collect();
    let config = Config {
        listen: "127.0.0.1:0".into(),
        tls_cert: ca.server_cert(),
        tls_key: ca.server_key(),
        data_dir: dir.join("data"),
        storage: Storage::Local,
        agents: keys
            .iter()
            .enumerate()
            .map(|(i, k)| AgentConfig {
                host: format!("bench-{i}"),
                token: format!("bench-token-{i}"),
                host_key: openssh_public_line(k),
                labels: vec![],
            })
            .collect(),
        assets_dir: None,
        index: match &postgres {
            Some(url) => StateConfig::Postgres { url: url.clone() },
            None => StateConfig::Sqlite,
        },
        ..Config::default()
    };
    let index = match &config.index {
        StateConfig::Sqlite => "SQLite index",
        StateConfig::Postgres { .. } => "PostgreSQL index",
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    tokio::spawn(async move {
        if let Err(e) = serve(listener, config).await {
            eprintln!("collector: {e}");
        }
    });
    let ca = std::fs::read(ca.ca_pem()).map_err(|e| e.to_string())?;
    let mut work = Vec::new();
    let warm_up: Vec<Recording> = (0..p.agents)
        .map(|i| {
            Recording::fake(
                &format!("bench-{i}-warm-up"),
                &format!("bench-{i}"),
                "bench@example.org",
                "usher-bench",
                &["true"],
                "BENCH",
                p.chunk_kib << 10,
                p.chunk_kib << 10,
            )
        })
        .collect();
    for (i, key) in keys.into_iter().enumerate() {
        let mut up = Uploader::new(
            &format!("https://127.0.0.1:{port}"),
            &ca,
            &format!("bench-token-{i}"),
            key,
        )
        .map_err(|e| e.to_string())?;
        // The simulated agents compress in this process, on the collector's cores: the
        // figure includes their work, as it includes their TLS and hashing.
        up.compress = p.compress;
        let recs: Vec<Recording> = (0..p.sessions)
            .map(|s| {
                Recording::fake(
                    &format!("bench-{i}-{s}"),
                    &format!("bench-{i}"),
                    "bench@example.org",
                    "usher-bench",
                    &["ls -l", "cat /etc/os-release", "make test"],
                    "BENCH",
                    p.session_kib << 10,
                    p.chunk_kib << 10,
                )
            })
            .collect();
        work.push((up, recs));
    }
    let bytes: usize = work.iter().flat_map(|(_, r)| r).map(Recording::bytes).sum();
    let chunks: usize = work
        .iter()
        .flat_map(|(_, r)| r)
        .map(|r| r.cast.len() + r.audit.len())
        .sum();
    // Every agent warms up, then waits for the others: the clock starts when all ship.
    let ready = Arc::new(tokio::sync::Barrier::new(p.agents + 1));
    let tasks: Vec<_> = work
        .into_iter()
        .zip(warm_up)
        .map(|((up, recs), warm_up)| {
            let ready = ready.clone();
            tokio::spawn(async move {
                let warmed = up.ship(&warm_up).await;
                ready.wait().await;
                warmed.map_err(|e| e.to_string())?;
                for r in &recs {
                    up.ship(r).await.map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    ready.wait().await;
    let start = Instant::now();
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    let secs = start.elapsed().as_secs_f64();
    let sessions = p.agents * p.sessions;
    println!(
        "{} agents, {sessions} sessions, {chunks} chunks of {} KiB at most ({}), {index}, {:.1} MB in {secs:.2} s: {:.1} MB/s, {:.1} sessions/s, {:.0} chunks/s",
        p.agents,
        p.chunk_kib,
        if p.compress { "zstd bodies, as agents send them" } else { "bodies as they are" },
        bytes as f64 / 1e6,
        bytes as f64 / 1e6 / secs,
        sessions as f64 / secs,
        chunks as f64 / secs
    );
    if std::env::var_os("USHER_BENCH_KEEP_SCRATCH").is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    drop(scratch_postgres);
    Ok(())
}
