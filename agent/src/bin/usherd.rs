//! `usherd`: the privileged host agent.

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
    usher::local_issuer::ensure(&mut config)?;
    if args.remove_accounts {
        let agent = Agent::start_offline(config)?;
        agent.remove_everything();
        return Ok(());
    }
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let agent = Agent::start(config)?;
        let host_key = usher::ssh::load_or_create_host_key(&agent.config.state_dir)?;
        spawn_sweeper(agent.clone());
        if let Some(collector) = &agent.config.collector {
            let signing = usher::ssh::signing_key(&host_key)?;
            let shipper = Arc::new(
                usher::ship::Shipper::new(collector, &agent.config.spool_dir, signing)
                    .map_err(|e| format!("collector: {e}"))?,
            );
            let _ = agent.shipper.set(shipper.clone());
            let live: Arc<dyn usher::ship::LiveSessions> = agent.clone();
            tokio::spawn(shipper.run(live));
            log::info!(target: "usher::ship", "shipping recordings to {}", collector.url);
        }
        let control_path = agent.config.control_socket.clone();
        let control_agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = usher::control::serve(control_agent, &control_path).await {
                log::error!(target: "usher", "control socket: {e}");
            }
        });
        let console_path = agent.config.console_socket.clone();
        let console_agent = agent.clone();
        tokio::spawn(async move {
            if let Err(e) = usher::console::serve(console_agent, &console_path).await {
                log::error!(target: "usher", "console socket: {e}");
            }
        });
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| e.to_string())?;
        spawn_reloader(agent.clone(), config_path);
        let serving = usher::ssh::serve(agent.clone(), host_key);
        tokio::pin!(serving);
        // Ready once the listeners are bound: give them a moment, then tell systemd.
        let ready = tokio::time::sleep(std::time::Duration::from_millis(100));
        tokio::pin!(ready);
        let mut announced = false;
        let result = loop {
            tokio::select! {
                r = &mut serving => break r,
                _ = &mut ready, if !announced => {
                    announced = true;
                    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
                    log::info!(target: "usher", "usherd {} ready on {}", env!("CARGO_PKG_VERSION"), agent.config.ssh.listen.join(", "));
                }
                _ = term.recv() => { log::info!(target: "usher", "usherd stopping (SIGTERM)"); break Ok(()) }
                _ = tokio::signal::ctrl_c() => { log::info!(target: "usher", "usherd stopping (SIGINT)"); break Ok(()) }
            }
        };
        let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
        result
    })
}

/// SIGHUP (`systemctl reload usherd`) re-reads issuers, policy and profiles.
fn spawn_reloader(agent: Arc<Agent>, path: Option<PathBuf>) {
    tokio::spawn(async move {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        while hup.recv().await.is_some() {
            let mut states = vec![sd_notify::NotifyState::Reloading];
            if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
                states.push(now);
            }
            let _ = sd_notify::notify(false, &states);
            let result = load_config(path.clone()).and_then(|mut c| {
                usher::local_issuer::ensure(&mut c)?;
                agent.reload(&c)
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
