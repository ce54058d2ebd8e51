//! `usherd`: the privileged host agent.

#![deny(unsafe_code)]

use clap::Parser;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use usher::config::Config;
use usher::daemon::Agent;

#[derive(Parser)]
#[command(
    version,
    about = "Usher host agent: just-in-time SSH access from signed grants"
)]
struct Args {
    /// Configuration file; without it (and without /etc/usher/usherd.toml) built-in
    /// defaults apply, with a local issuer key made in the state directory.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// More detail in the log.
    #[arg(short, long)]
    verbose: bool,
    /// End every session and remove every account this agent made, then exit (used when
    /// the package is removed).
    #[arg(long)]
    remove_accounts: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    usher::audit::init(args.verbose);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!(target: "usher", "usherd: {e}");
            eprintln!("usherd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn load_config(path: Option<PathBuf>) -> Result<Config, String> {
    let default = PathBuf::from("/etc/usher/usherd.toml");
    match path {
        Some(p) => Config::load(&p).map_err(|e| e.to_string()),
        None if default.exists() => Config::load(&default).map_err(|e| e.to_string()),
        None => Ok(Config::default()),
    }
}

fn run(args: Args) -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("usherd must run as root (it creates accounts and cgroups)".into());
    }
    protect_from_oom_killer();
    let config_path = args.config.clone();
    let mut config = load_config(args.config)?;
    usher::local_issuer::ensure(&mut config).map_err(|e| e.to_string())?;
    if args.remove_accounts {
        let agent = Agent::start_offline(config).map_err(|e| e.to_string())?;
        agent.remove_everything();
        return Ok(());
    }
    raise_open_file_limit();
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let agent = Agent::start(config).map_err(|e| e.to_string())?;
        let host_key = usher::ssh::load_or_create_host_key(&agent.config.state_dir)?;
        // From here on a signal is handled, never left to its default (the end of the
        // agent): a reload right after READY re-reads the configuration.
        let mut signals = Signals::install()?;
        // Everything that reads files or makes keys comes before the sockets: a test or a
        // unit that waits for the ports knows the configuration has been read by then, and
        // a start that fails has answered nobody.
        let rdp = match agent.config.rdp.as_ref().filter(|r| !r.listen.is_empty()) {
            Some(config) => {
                let identity = usher::rdp::tls::load_or_create(&agent.config.state_dir, &agent.host)
                    .map_err(|e| e.to_string())?;
                let _ = agent.rdp_certificate.set(identity.fingerprint.clone());
                Some(usher::rdp::RdpServer::new(agent.clone(), config.clone(), identity)?)
            }
            None => None,
        };
        let shipper = match &agent.config.collector {
            Some(collector) => {
                let signing = usher::ssh::signing_key(&host_key)?;
                let shipper = Arc::new(
                    usher::ship::Shipper::new(collector, &agent.config.spool_dir, signing)
                        .map_err(|e| format!("collector: {e}"))?,
                );
                let _ = agent.shipper.set(shipper.clone());
                log::info!(target: "usher::ship", "shipping recordings to {}", collector.url);
                Some(shipper)
            }
            None => None,
        };
        let service = agent
            .config
            .service_endpoint()
            .map_err(|e| e.to_string())?;
        let sockets = Sockets::bind(&agent.config)?;
        let ssh_addresses = sockets.ssh_addresses();

        // Serving: every socket is already bound, so nothing below can fail.
        spawn_sweeper(agent.clone());
        if let Some(shipper) = shipper {
            let live: Arc<dyn usher::ship::LiveSessions> = agent.clone();
            tokio::spawn(shipper.run(live));
        }
        if let Some(endpoint) = service {
            log::info!(target: "usher::feed", "grants and revocations from the service at {}", endpoint.url);
            tokio::spawn(usher::feed::run(agent.clone(), endpoint));
        }
        tokio::spawn(usher::control::serve(agent.clone(), sockets.control));
        let console_uids = agent.config.accounts.uid_min..=agent.config.accounts.uid_max;
        tokio::spawn(usher::console::serve(
            agent.clone(),
            console_uids,
            sockets.console,
        ));
        spawn_reloader(agent.clone(), config_path, signals.hangup);
        let settings = usher::ssh::settings(&agent.config.ssh, host_key);
        let ssh = Arc::new(usher::ssh::SshOptions {
            config: agent.config.ssh.clone(),
            sftp_server: agent.config.sftp_server(),
        });
        tokio::spawn(usher::ssh::serve(agent.clone(), ssh, settings, sockets.ssh));
        if let Some(rdp) = rdp {
            log::info!(target: "usher::rdp", "RDP on {}; certificate SHA-256 {}", addresses(&sockets.rdp).join(", "), agent.rdp_certificate.get().map(String::as_str).unwrap_or("?"));
            tokio::spawn(rdp.serve(sockets.rdp));
        }

        // A client that connects from here on is answered: queued by the kernel on the
        // bound sockets until the tasks above accept it.
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        log::info!(target: "usher", "usherd {} ready; SSH on {}", env!("CARGO_PKG_VERSION"), ssh_addresses.join(", "));
        tokio::select! {
            _ = signals.terminate.recv() => log::info!(target: "usher", "usherd stopping (SIGTERM)"),
            _ = signals.interrupt.recv() => log::info!(target: "usher", "usherd stopping (SIGINT)"),
        }
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        Ok(())
    })
}

/// Every socket the agent serves, bound before any is served: READY means each one
/// takes connections, and a socket that cannot be bound stops the start before any
/// client is answered.
struct Sockets {
    ssh: Vec<tokio::net::TcpListener>,
    /// Empty when RDP is off.
    rdp: Vec<tokio::net::TcpListener>,
    control: tokio::net::UnixListener,
    console: tokio::net::UnixListener,
}

impl Sockets {
    fn bind(config: &Config) -> Result<Sockets, String> {
        Ok(Sockets {
            ssh: usher::system::tcp::bind(&config.ssh.listen, "SSH")?,
            rdp: match &config.rdp {
                Some(rdp) => usher::system::tcp::bind(&rdp.listen, "RDP")?,
                None => Vec::new(),
            },
            control: usher::control::bind_open_socket(&config.control_socket)
                .map_err(|e| format!("control socket: {e}"))?,
            console: usher::control::bind_open_socket(&config.console_socket)
                .map_err(|e| format!("console socket: {e}"))?,
        })
    }

    fn ssh_addresses(&self) -> Vec<String> {
        addresses(&self.ssh)
    }
}

fn addresses(listeners: &[tokio::net::TcpListener]) -> Vec<String> {
    listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .map(|a| a.to_string())
        .collect()
}

/// The signals usherd answers, registered at once so that none arrives unhandled (whose
/// default would end the agent) while it starts.
struct Signals {
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, String> {
        use tokio::signal::unix::{signal, SignalKind};
        let install = |kind: SignalKind| signal(kind).map_err(|e| format!("signal handler: {e}"));
        Ok(Signals {
            terminate: install(SignalKind::terminate())?,
            interrupt: install(SignalKind::interrupt())?,
            hangup: install(SignalKind::hangup())?,
        })
    }
}

/// Every connection and session costs descriptors; the soft limit a service starts with
/// (1024 under systemd) is far below what the agent is built to hold. Raised to the hard
/// limit; the unit sets that with LimitNOFILE.
fn raise_open_file_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => log::info!(target: "usher", "open file limit raised from {soft} to {hard}"),
            Err(e) => {
                log::warn!(target: "usher", "cannot raise the open file limit from {soft}: {e}")
            }
        },
        Ok(_) => {}
        Err(e) => log::warn!(target: "usher", "cannot read the open file limit: {e}"),
    }
}

/// SIGHUP (`systemctl reload usherd`) re-reads issuers, policy and profiles.
fn spawn_reloader(
    agent: Arc<Agent>,
    path: Option<PathBuf>,
    mut hangup: tokio::signal::unix::Signal,
) {
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let mut states = vec![sd_notify::NotifyState::Reloading];
            if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                states.push(now);
            }
            let _ = sd_notify::notify(false, &states);
            let result = load_config(path.clone()).and_then(|mut c| {
                usher::local_issuer::ensure(&mut c).map_err(|e| e.to_string())?;
                agent.reload(&c).map_err(|e| e.to_string())
            });
            if let Err(e) = result {
                log::error!(target: "usher", "reload failed, keeping the previous configuration: {e}");
            }
            let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
        }
    });
}

/// Grants end on time: every second, whatever else the agent is doing.
fn spawn_sweeper(agent: Arc<Agent>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tick.tick().await;
            agent.sweep().await;
        }
    });
}

/// The kernel's OOM killer picks a session before the agent: usherd lowers its own score
/// (sessions get 0 back, see `session_oom_score_adj`).
fn protect_from_oom_killer() {
    use usher::session::spawn::{session_oom_score_adj, AGENT_OOM_SCORE_ADJ};
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", AGENT_OOM_SCORE_ADJ.to_string()) {
        log::warn!(target: "usher", "cannot lower usherd's OOM score to {AGENT_OOM_SCORE_ADJ} ({e}; it needs CAP_SYS_RESOURCE): sessions get oom_score_adj {} instead, so that they are still killed first", session_oom_score_adj());
    }
}
