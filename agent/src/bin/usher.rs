//! `usher`: the command-line tool — a small issuer (keygen, grant sign), the client of
//! the local agent (grant install/list/revoke, status, sessions), a cast player, and a
//! person's client of the central service (login, whoami, request, requests, review,
//! revoke).

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use usher::cli::CliError;
use usher::control::{CallError, Client};
use usher::grant::{Audience, Claims, KeyAlg};
use usher_wire::control as wire;

#[derive(Parser)]
#[command(
    version,
    about = "Usher: just-in-time access — issue grants, manage the local agent"
)]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, default_value = "/run/usher/control.sock")]
    socket: PathBuf,
    /// The agent's answer as JSON, for scripts (grant install/list/revoke, status,
    /// sessions); aligned text without it.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once per run: the size of the `sign` variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Make an issuer key pair: DIR/issuer.key (private, 0600) and DIR/issuer.jwks.json.
    Keygen {
        #[arg(long)]
        out_dir: PathBuf,
        #[arg(long, default_value = "key-1")]
        kid: String,
        #[arg(long, value_enum, default_value = "ed25519")]
        alg: KeyAlg,
    },
    /// Grants: sign, install, list, revoke.
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Version, enforcement, grants, sessions, accounts and spool of the local agent.
    Status,
    /// Live sessions of every kind.
    Sessions,
    /// Commands waiting for approval on this host, then the last ones decided.
    Approvals,
    /// Approve a command waiting in a session (root; as SUDO_USER when run through sudo).
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Deny a command waiting in a session.
    Deny {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Sign in to the central service (device authorization at its identity provider).
    Login {
        /// The service, e.g. https://usher.example:8443 (default: the last one signed in to).
        #[arg(long)]
        service: Option<String>,
        /// CA certificate(s), PEM, the service's (and provider's) certificate chains to.
        #[arg(long)]
        ca: Option<PathBuf>,
    },
    /// Who the service says you are.
    Whoami,
    /// Ask for access to a host; with --wait, print the grant once approved.
    ///
    /// Exit status with --wait: 0 approved, 2 denied, 3 still pending at the timeout (or
    /// ended without a decision), 1 any other error.
    Request {
        #[arg(long)]
        host: String,
        /// The account, with the host's prefix (e.g. jit-alice).
        #[arg(long)]
        login: String,
        #[arg(long)]
        profile: Option<String>,
        /// How long: 90s, 15m, 1h, 1h30m, 2d.
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[arg(long, default_value = "")]
        reason: String,
        /// The OpenSSH public key the grant is bound to (default ~/.ssh/id_ed25519.pub).
        #[arg(long)]
        ssh_key: Option<PathBuf>,
        /// Also bind a one-time secret for console or RDP logins, made here; only its
        /// hash leaves this machine.
        #[arg(long)]
        console_secret: bool,
        /// Wait for the decision and print the grant (a compact JWT).
        #[arg(long)]
        wait: bool,
        /// How long --wait waits.
        #[arg(long, default_value = "10m", requires = "wait")]
        timeout: String,
    },
    /// Wait for the decision on a request made earlier and print its grant (exit status
    /// as `request --wait`).
    Wait {
        id: String,
        #[arg(long, default_value = "10m")]
        timeout: String,
    },
    /// Access requests: your own, or all of them for approvers and auditors.
    Requests {
        /// Only those waiting for a decision.
        #[arg(long)]
        pending: bool,
    },
    /// Approve or deny a request.
    Review {
        id: String,
        #[arg(long, conflicts_with = "deny", required_unless_present = "deny")]
        approve: bool,
        #[arg(long)]
        deny: bool,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Revoke a grant at the service (by grant or request id): every host ends its
    /// sessions and account within seconds.
    Revoke {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Replay an asciicast recording in this terminal.
    Play {
        file: PathBuf,
        /// Playback speed factor.
        #[arg(long, default_value_t = 1.0)]
        speed: f64,
        /// Longest pause, in seconds.
        #[arg(long)]
        idle_limit: Option<f64>,
    },
    /// Export a desktop (RDP) recording to a video file with ffmpeg; the format follows
    /// OUT's extension (.mp4, .mkv, .webm).
    ExportVideo {
        /// A `.desktop` recording, or a session id in the spool.
        recording: String,
        out: PathBuf,
        /// Frames a second in the video.
        #[arg(long, default_value_t = 10)]
        fps: u32,
        /// The agent's spool, where a session id is looked up.
        #[arg(long, default_value = "/var/spool/usher")]
        spool: PathBuf,
        /// The ffmpeg program.
        #[arg(long, default_value = "ffmpeg")]
        ffmpeg: String,
    },
}

#[derive(Subcommand)]
// Parsed once per run: the size of the `sign` variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
enum GrantCommand {
    /// Sign a grant and print it (a compact JWT).
    Sign {
        /// Issuer private key from `usher keygen`.
        #[arg(long, conflicts_with = "local")]
        key: Option<PathBuf>,
        /// Sign with this host's embedded issuer (root only).
        #[arg(long)]
        local: bool,
        /// The agent's state directory (for --local).
        #[arg(long, default_value = "/var/lib/usher")]
        state_dir: PathBuf,
        #[arg(long, default_value = "key-1")]
        kid: String,
        /// `iss`; with --local, the local issuer's name.
        #[arg(long)]
        iss: Option<String>,
        /// `aud`: the host name (default: this host).
        #[arg(long)]
        aud: Option<String>,
        /// Who the grant is for.
        #[arg(long)]
        sub: String,
        /// The account name (with the agent's prefix, e.g. jit-alice).
        #[arg(long)]
        login: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl: i64,
        /// Start this many seconds from now (nbf).
        #[arg(long, default_value_t = 0)]
        not_before: i64,
        #[arg(long = "group")]
        groups: Vec<String>,
        /// OpenSSH public key file(s) that may use the grant.
        #[arg(long = "ssh-key")]
        ssh_keys: Vec<PathBuf>,
        #[arg(long)]
        profile: Option<String>,
        #[arg(long)]
        approved_by: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        jti: Option<String>,
        /// A file holding a one-time secret for console logins (its hash goes in the grant).
        #[arg(long)]
        console_secret_file: Option<PathBuf>,
    },
    /// Install a grant on this host (TOKEN, or - for standard input).
    Install { token: String },
    /// List the grants this host knows.
    List,
    /// Revoke a grant by jti: its sessions end, its account goes.
    Revoke {
        jti: String,
        /// The grant's issuer: needed when grants of several issuers use this jti, or
        /// when revoking a grant not seen yet while several issuers are trusted.
        #[arg(long)]
        iss: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("usher: {e}");
            match e {
                UsherError::Service(e) => ExitCode::from(e.exit_code()),
                _ => ExitCode::FAILURE,
            }
        }
    }
}

/// What went wrong, for the one line `usher` prints before it fails.
#[derive(Debug, thiserror::Error)]
enum UsherError {
    #[error(transparent)]
    Agent(#[from] CallError),
    #[error(transparent)]
    Service(#[from] CliError),
    #[error("{0}")]
    Other(String),
}

impl From<String> for UsherError {
    fn from(message: String) -> UsherError {
        UsherError::Other(message)
    }
}

impl From<&str> for UsherError {
    fn from(message: &str) -> UsherError {
        UsherError::Other(message.to_string())
    }
}

/// Prints the agent's answer: pretty JSON with `--json`, else as `as_text` words it.
fn show<T: serde::Serialize + ?Sized>(
    json: bool,
    answer: &T,
    as_text: fn(&T) -> String,
) -> Result<(), UsherError> {
    if json {
        let text = serde_json::to_string_pretty(answer).map_err(|e| e.to_string())?;
        println!("{text}");
    } else {
        print!("{}", as_text(answer));
    }
    Ok(())
}

fn run(cli: Cli) -> Result<(), UsherError> {
    let agent = Client::new(&cli.socket);
    match cli.command {
        Command::Keygen { out_dir, kid, alg } => {
            let (pem, jwks) = usher::grant::keygen(alg, &kid).map_err(|e| e.to_string())?;
            usher::fsutil::private_dir(&out_dir, 0o700).map_err(|e| e.to_string())?;
            let key = out_dir.join("issuer.key");
            let pubs = out_dir.join("issuer.jwks.json");
            usher::fsutil::write_atomic(&key, pem.as_bytes(), 0o600).map_err(|e| e.to_string())?;
            usher::fsutil::write_atomic(&pubs, jwks.as_bytes(), 0o644)
                .map_err(|e| e.to_string())?;
            println!(
                "private key: {}\npublic keys: {}",
                key.display(),
                pubs.display()
            );
            Ok(())
        }
        Command::Grant(GrantCommand::Sign {
            key,
            local,
            state_dir,
            kid,
            iss,
            aud,
            sub,
            login,
            ttl,
            not_before,
            groups,
            ssh_keys,
            profile,
            approved_by,
            reason,
            jti,
            console_secret_file,
        }) => {
            let secret_hash = match console_secret_file {
                Some(p) => {
                    let secret =
                        std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    Some(
                        usher::grant::console_secret_hash(secret.trim_end_matches('\n'))
                            .map_err(|e| e.to_string())?,
                    )
                }
                None => None,
            };
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            let (key_path, kid, iss) = if local {
                (
                    usher::local_issuer::dir(&state_dir).join("issuer.key"),
                    usher::local_issuer::KID.to_string(),
                    iss.unwrap_or_else(|| format!("usher-local:{host}")),
                )
            } else {
                let key = key.ok_or("give --key FILE or --local")?;
                (key, kid, iss.ok_or("give --iss with --key")?)
            };
            let pem = std::fs::read_to_string(&key_path)
                .map_err(|e| format!("{}: {e}", key_path.display()))?;
            let mut keys = Vec::new();
            for p in ssh_keys {
                let line =
                    std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                keys.push(line.trim().to_string());
            }
            let now = usher::grant::now();
            let claims = Claims {
                iss,
                sub,
                aud: Audience::One(aud.unwrap_or(host)),
                jti: jti.unwrap_or_else(|| format!("{:016x}", rand::random::<u64>())),
                iat: now,
                nbf: (not_before != 0).then_some(now + not_before),
                exp: now + not_before + ttl,
                login,
                groups,
                ssh_keys: keys,
                secret_hash,
                profile,
                approved_by,
                reason,
                request: None,
            };
            println!(
                "{}",
                usher::grant::sign(&pem, &kid, &claims).map_err(|e| e.to_string())?
            );
            Ok(())
        }
        Command::Grant(GrantCommand::Install { token }) => {
            let token = if token == "-" {
                let mut s = String::new();
                std::io::stdin()
                    .read_to_string(&mut s)
                    .map_err(|e| e.to_string())?;
                s
            } else {
                token
            };
            let installed = agent.install(token.trim().to_string())?;
            show(cli.json, &installed, text::installed)
        }
        Command::Grant(GrantCommand::List) => show(cli.json, &agent.list()?[..], text::grants),
        Command::Grant(GrantCommand::Revoke { jti, iss }) => {
            show(cli.json, &agent.revoke(jti, iss)?, text::revoked)
        }
        Command::Status => {
            let status = agent.status()?;
            show(cli.json, &status, text::status)?;
            for a in &status.unmanaged_accounts {
                eprintln!(
                    "usher: warning: account {} (uid {}) is in usher's name prefix and UID range but was not made by usher; it is left alone and no grant opens it",
                    a.name, a.uid
                );
            }
            Ok(())
        }
        Command::Sessions => show(cli.json, &agent.sessions()?[..], text::sessions),
        Command::Approvals => show(cli.json, &agent.approvals()?[..], text::command_approvals),
        Command::Approve { id, comment } => show(
            cli.json,
            &agent.decide(id, true, comment, std::env::var("SUDO_USER").ok())?,
            text::decided,
        ),
        Command::Deny { id, comment } => show(
            cli.json,
            &agent.decide(id, false, comment, std::env::var("SUDO_USER").ok())?,
            text::decided,
        ),
        Command::Play {
            file,
            speed,
            idle_limit,
        } => Ok(usher::play::play(&file, speed, idle_limit)?),
        Command::ExportVideo {
            recording,
            out,
            fps,
            spool,
            ffmpeg,
        } => {
            let input = usher::export::resolve(&recording, &spool).map_err(|e| e.to_string())?;
            let done = usher::export::export_video(&input, &out, fps, &ffmpeg)
                .map_err(|e| e.to_string())?;
            eprintln!(
                "{}: {}x{}, {} frames, {:.1} s",
                out.display(),
                done.width,
                done.height,
                done.frames,
                done.seconds
            );
            Ok(())
        }
        Command::Login { .. }
        | Command::Whoami
        | Command::Request { .. }
        | Command::Wait { .. }
        | Command::Requests { .. }
        | Command::Review { .. }
        | Command::Revoke { .. } => {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(service::run(cli.json, cli.command))
        }
    }
}

/// The commands that talk to the central service.
mod service {
    use super::{show, text, Command, UsherError};
    use usher::cli::{self, credentials, CliError};
    use usher_wire::jit;

    struct Prompt;

    impl cli::LoginPrompt for Prompt {
        fn show(&self, code: &cli::device::DeviceCode) {
            // On standard error: standard output is the result, for scripts.
            eprintln!(
                "To sign in, open {} and enter the code {}",
                code.verification_uri, code.user_code
            );
            if let Some(complete) = &code.verification_uri_complete {
                eprintln!("(or open {complete})");
            }
            eprintln!(
                "Waiting for the sign-in (the code expires in {}s)...",
                code.expires_in
            );
        }
    }

    pub async fn run(json: bool, command: Command) -> Result<(), UsherError> {
        let path = credentials::default_path().map_err(CliError::from)?;
        match command {
            Command::Login { service, ca } => {
                let previous = credentials::Credentials::load(&path).ok();
                let service = service
                    .or_else(|| previous.as_ref().map(|p| p.url.clone()))
                    .ok_or("give --service URL (no earlier sign-in to take it from)")?;
                let ca = ca.or_else(|| previous.and_then(|p| p.ca));
                let signed_in = cli::login(&service, ca, &path, &Prompt).await?;
                show(json, &signed_in.principal, |p| {
                    format!("signed in as {}\n{}", p.name, text::principal(p))
                })?;
                if !json {
                    println!(
                        "(sign-in kept in {}, until {})",
                        path.display(),
                        text::when(signed_in.expires_at)
                    );
                }
                Ok(())
            }
            Command::Whoami => {
                let (client, _) = cli::signed_in(&path)?;
                let me = client.me().await.map_err(CliError::from)?;
                show(json, &me, text::principal)
            }
            Command::Request {
                host,
                login,
                profile,
                duration,
                reason,
                ssh_key,
                console_secret,
                wait,
                timeout,
            } => {
                let duration_secs = cli::parse_duration(&duration)?;
                let timeout = std::time::Duration::from_secs(cli::parse_duration(&timeout)?);
                let (client, _) = cli::signed_in(&path)?;
                let made = cli::make_request(
                    &client,
                    cli::RequestArgs {
                        host,
                        login,
                        profile,
                        duration_secs,
                        reason,
                        ssh_key,
                        console_secret,
                    },
                )
                .await?;
                let mut request = made.request;
                if wait {
                    if !json && request.state == jit::RequestState::Pending {
                        eprintln!("{}", text::request_line(&request));
                        eprintln!("waiting for a decision...");
                    }
                    request = match cli::wait_for_decision(&client, &request.id, timeout).await {
                        Ok(decided) => decided,
                        // Still open: the secret is needed if it is approved later, and
                        // exists nowhere else.
                        Err(e @ CliError::StillPending { .. }) => {
                            if let Some(secret) = &made.console_secret {
                                eprintln!("console secret (shown once, not stored; it works once the request is approved): {secret}");
                            }
                            return Err(e.into());
                        }
                        Err(e) => return Err(e.into()),
                    };
                }
                print_request(json, &request, made.console_secret.as_deref(), wait)
            }
            Command::Wait { id, timeout } => {
                let timeout = std::time::Duration::from_secs(cli::parse_duration(&timeout)?);
                let (client, _) = cli::signed_in(&path)?;
                let request = cli::wait_for_decision(&client, &id, timeout).await?;
                print_request(json, &request, None, true)
            }
            Command::Requests { pending } => {
                let (client, _) = cli::signed_in(&path)?;
                let list = client.requests(pending).await.map_err(CliError::from)?;
                show(json, &list[..], text::requests)
            }
            Command::Review {
                id,
                approve,
                deny: _,
                comment,
            } => {
                let (client, _) = cli::signed_in(&path)?;
                let decision = if approve {
                    jit::Decision::Approve
                } else {
                    jit::Decision::Deny
                };
                let request = client
                    .review(&id, &jit::Review { decision, comment })
                    .await
                    .map_err(CliError::from)?;
                show(json, &request, text::request_line_nl)
            }
            Command::Revoke { id, reason } => {
                let (client, _) = cli::signed_in(&path)?;
                let request = cli::revoke(&client, &id, reason).await?;
                show(json, &request, text::request_line_nl)
            }
            _ => unreachable!("only the service's commands come here"),
        }
    }

    /// A request as `usher request` ends: with --wait in text, the grant alone on standard
    /// output (`$(usher request --wait …)`), the rest on standard error.
    fn print_request(
        json: bool,
        request: &jit::AccessRequest,
        console_secret: Option<&str>,
        waited: bool,
    ) -> Result<(), UsherError> {
        if json {
            let mut value = serde_json::to_value(request).map_err(|e| e.to_string())?;
            if let (Some(secret), Some(map)) = (console_secret, value.as_object_mut()) {
                map.insert("console_secret".into(), secret.into());
            }
            println!(
                "{}",
                serde_json::to_string_pretty(&value).map_err(|e| e.to_string())?
            );
            return Ok(());
        }
        if waited {
            eprintln!("{}", text::request_line(request));
            if let Some(secret) = console_secret {
                eprintln!("console secret (shown once, not stored): {secret}");
            }
            if let Some(grant) = &request.grant {
                println!("{grant}");
            }
        } else {
            println!("{}", text::request_line(request));
            if let Some(secret) = console_secret {
                println!("console secret (shown once, not stored; it works once the request is approved): {secret}");
            }
            if let Some(grant) = &request.grant {
                println!("{grant}");
            }
        }
        Ok(())
    }
}

/// The agent's answers as a person reads them: aligned columns, times in UTC, durations
/// and sizes rounded.
mod text {
    use super::wire;
    use usher_wire::jit;

    pub fn principal(p: &jit::Principal) -> String {
        let roles: Vec<&str> = p
            .roles
            .iter()
            .map(|r| match r {
                jit::Role::Requester => "requester",
                jit::Role::Approver => "approver",
                jit::Role::Auditor => "auditor",
                jit::Role::Admin => "admin",
            })
            .collect();
        table(
            &["NAME", "SUBJECT", "GROUPS", "ROLES"],
            vec![vec![
                p.name.clone(),
                p.sub.clone(),
                or_none(&p.groups.join(",")),
                or_none(&roles.join(",")),
            ]],
        )
    }

    fn or_none(s: &str) -> String {
        if s.is_empty() {
            "-".into()
        } else {
            s.to_string()
        }
    }

    pub fn when(unix: i64) -> String {
        time(unix)
    }

    fn approvals(r: &jit::AccessRequest) -> usize {
        r.reviews
            .iter()
            .filter(|v| v.decision == jit::Decision::Approve)
            .count()
    }

    /// One line: the request, where it stands, and what comes next.
    pub fn request_line(r: &jit::AccessRequest) -> String {
        let what = format!(
            "request {} ({} as {} for {})",
            r.id,
            r.host,
            r.login,
            duration(r.duration_secs as i64)
        );
        match r.state {
            jit::RequestState::Pending => format!(
                "{what}: pending, {} of {} approval(s) under policy {}",
                approvals(r),
                r.approvals_needed,
                r.policy
            ),
            jit::RequestState::Approved => {
                let by = match &r.auto_approved {
                    Some(rule) => format!("automatically ({rule})"),
                    None => {
                        let names: Vec<&str> = r
                            .reviews
                            .iter()
                            .filter(|v| v.decision == jit::Decision::Approve)
                            .map(|v| v.name.as_str())
                            .collect();
                        format!("by {}", names.join(", "))
                    }
                };
                let grant = r.grant_id.as_deref().unwrap_or("-");
                let until = r.expires_at.map(time).unwrap_or_else(|| "-".into());
                format!("{what}: approved {by}; grant {grant} until {until}")
            }
            jit::RequestState::Denied => {
                let why = r
                    .reviews
                    .iter()
                    .rev()
                    .find(|v| v.decision == jit::Decision::Deny)
                    .map(|v| format!(" by {}: {}", v.name, v.comment))
                    .unwrap_or_default();
                format!("{what}: denied{why}")
            }
            jit::RequestState::Revoked => {
                let why = r
                    .revoked
                    .as_ref()
                    .map(|v| format!(" by {} at {}: {}", v.by.name, time(v.at), v.reason))
                    .unwrap_or_default();
                format!("{what}: revoked{why}")
            }
            other => format!("{what}: {}", usher::cli::state_name(other)),
        }
    }

    pub fn request_line_nl(r: &jit::AccessRequest) -> String {
        format!("{}\n", request_line(r))
    }

    pub fn requests(list: &[jit::AccessRequest]) -> String {
        if list.is_empty() {
            return "no requests\n".into();
        }
        table(
            &[
                "ID",
                "STATE",
                "REQUESTER",
                "HOST",
                "LOGIN",
                "PROFILE",
                "FOR",
                "APPROVALS",
                "CREATED",
                "REASON",
            ],
            list.iter()
                .map(|r| {
                    vec![
                        r.id.clone(),
                        usher::cli::state_name(r.state).to_string(),
                        r.requester.name.clone(),
                        r.host.clone(),
                        r.login.clone(),
                        r.profile.clone().unwrap_or_else(|| "-".into()),
                        duration(r.duration_secs as i64),
                        format!("{}/{}", approvals(r), r.approvals_needed),
                        time(r.created_at),
                        r.reason.clone(),
                    ]
                })
                .collect(),
        )
    }

    pub fn installed(g: &wire::Installed) -> String {
        format!(
            "installed grant {} of {} for {}, until {} ({} left)\n",
            g.jti,
            g.iss,
            g.login,
            time(g.expires_at),
            duration(g.expires_at - usher::grant::now())
        )
    }

    pub fn revoked(r: &wire::Revoked) -> String {
        if r.was_live {
            format!(
                "revoked grant {} of {}: its sessions and account are ended\n",
                r.jti, r.iss
            )
        } else {
            format!(
                "revoked grant {} of {} ahead of its arrival (this host does not hold it)\n",
                r.jti, r.iss
            )
        }
    }

    pub fn grants(grants: &[wire::GrantSummary]) -> String {
        if grants.is_empty() {
            return "no grants\n".into();
        }
        table(
            &[
                "JTI", "LOGIN", "SUBJECT", "ISSUER", "PROFILE", "EXPIRES", "LEFT", "SSH KEYS",
            ],
            grants
                .iter()
                .map(|g| {
                    vec![
                        g.jti.clone(),
                        g.login.clone(),
                        g.sub.clone(),
                        g.iss.clone(),
                        g.profile.clone(),
                        time(g.expires_at),
                        duration(g.remaining_secs),
                        g.ssh_keys.to_string(),
                    ]
                })
                .collect(),
        )
    }

    pub fn command_approvals(list: &[usher_wire::approval::CommandStatus]) -> String {
        if list.is_empty() {
            return "no commands wait for approval\n".into();
        }
        table(
            &[
                "ID",
                "STATE",
                "SESSION",
                "WHO",
                "COMMAND",
                "REQUESTED",
                "APPROVALS",
            ],
            list.iter()
                .map(|s| {
                    let r = &s.request;
                    let given = s.decisions.iter().filter(|d| d.approve).count();
                    vec![
                        r.id.clone(),
                        format!("{:?}", s.state).to_lowercase(),
                        r.session_id.clone(),
                        format!("{} ({})", r.sub, r.login),
                        r.command.clone(),
                        time(r.requested_at),
                        format!("{given}/{}", r.required),
                    ]
                })
                .collect(),
        )
    }

    pub fn decided(s: &usher_wire::approval::CommandStatus) -> String {
        let given = s.decisions.iter().filter(|d| d.approve).count();
        format!(
            "{}: {} ({given}/{} approvals): {}\n",
            s.request.id,
            format!("{:?}", s.state).to_lowercase(),
            s.request.required,
            s.request.command
        )
    }

    pub fn sessions(sessions: &[wire::SessionSummary]) -> String {
        if sessions.is_empty() {
            return "no live sessions\n".into();
        }
        table(
            &[
                "ID", "KIND", "LOGIN", "STARTED", "STATE", "COMMANDS", "GRANT", "ISSUER",
            ],
            sessions
                .iter()
                .map(|s| {
                    vec![
                        s.id.clone(),
                        match s.kind {
                            wire::SessionKind::Ssh => "ssh".into(),
                            wire::SessionKind::Console => "console".into(),
                            wire::SessionKind::Rdp => "rdp".into(),
                        },
                        s.login.clone(),
                        time(s.started_at),
                        if s.attached {
                            "attached".into()
                        } else {
                            "detached (left processes)".into()
                        },
                        s.commands.to_string(),
                        s.jti.clone(),
                        s.iss.clone(),
                    ]
                })
                .collect(),
        )
    }

    pub fn status(s: &wire::Status) -> String {
        let mode = match s.enforcement.mode {
            wire::EnforcementMode::Required => "required",
            wire::EnforcementMode::BestEffort => "best-effort",
            wire::EnforcementMode::Off => "off",
        };
        let collector = match &s.collector.shipping {
            _ if !s.collector.configured => "not configured".to_string(),
            None => "configured".to_string(),
            Some(shipping) => {
                let state = match (shipping.reachable, &shipping.last_error) {
                    (None, _) => "not contacted yet".to_string(),
                    (Some(_), Some(error)) => format!("failing: {error}"),
                    (Some(true), None) => "reachable".to_string(),
                    (Some(false), None) => "unreachable".to_string(),
                };
                format!(
                    "{state}; {} waiting to ship",
                    count(shipping.backlog_sessions as u64, "session")
                )
            }
        };
        let mut rows = vec![
            vec!["host".to_string(), s.host.clone()],
            vec!["version".into(), s.version.clone()],
            vec![
                "up since".into(),
                format!(
                    "{} ({})",
                    time(s.up_since),
                    duration(usher::grant::now() - s.up_since)
                ),
            ],
            vec![
                "enforcement".into(),
                format!(
                    "{mode}: {}; {} lost",
                    s.enforcement.path,
                    count(s.enforcement.lost_events, "exec event")
                ),
            ],
            vec!["grants".into(), s.grants.to_string()],
            vec![
                "rdp".into(),
                match &s.rdp_certificate {
                    Some(f) => format!("on; certificate SHA-256 {f}"),
                    None => "off".into(),
                },
            ],
            vec!["sessions".into(), s.sessions.to_string()],
            vec![
                "accounts".into(),
                if s.accounts.is_empty() {
                    "none".into()
                } else {
                    s.accounts.join(", ")
                },
            ],
            vec![
                "spool".into(),
                format!(
                    "{} in {} (limit {})",
                    bytes(s.spool.bytes),
                    count(s.spool.sessions as u64, "session"),
                    bytes(s.spool.max_bytes)
                ),
            ],
            vec!["collector".into(), collector],
        ];
        for a in &s.unmanaged_accounts {
            rows.push(vec![
                "unmanaged".into(),
                format!(
                    "{} (uid {}, home {}): not made by usher",
                    a.name, a.uid, a.home
                ),
            ]);
        }
        columns(&rows)
    }

    /// A header and rows, each column as wide as its widest cell.
    fn table(header: &[&str], rows: Vec<Vec<String>>) -> String {
        let mut all = vec![header.iter().map(|h| h.to_string()).collect()];
        all.extend(rows);
        columns(&all)
    }

    /// Cells two spaces apart, padded to their column's width; no trailing blanks.
    fn columns(rows: &[Vec<String>]) -> String {
        let mut widths: Vec<usize> = Vec::new();
        for row in rows {
            for (i, cell) in row.iter().enumerate() {
                let width = cell.chars().count();
                match widths.get_mut(i) {
                    Some(w) => *w = (*w).max(width),
                    None => widths.push(width),
                }
            }
        }
        let mut out = String::new();
        for row in rows {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str("  ");
                }
                line.push_str(cell);
                let pad = widths[i] - cell.chars().count();
                line.extend(std::iter::repeat_n(' ', pad));
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    /// Unix seconds as `2026-12-03 01:49:49 UTC`.
    fn time(unix: i64) -> String {
        let format =
            time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
        time::OffsetDateTime::from_unix_timestamp(unix)
            .ok()
            .and_then(|t| t.format(&format).ok())
            .unwrap_or_else(|| format!("{unix} (unix time)"))
    }

    /// Seconds as the two largest units: `45s`, `12m 05s`, `3h 20m`, `2d 04h`.
    fn duration(secs: i64) -> String {
        let secs = secs.max(0);
        let (d, h, m, s) = (secs / 86400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
        match (d, h, m) {
            (0, 0, 0) => format!("{s}s"),
            (0, 0, _) => format!("{m}m {s:02}s"),
            (0, _, _) => format!("{h}h {m:02}m"),
            _ => format!("{d}d {h:02}h"),
        }
    }

    /// Bytes in the largest binary unit that keeps a number of at least 1.
    fn bytes(n: u64) -> String {
        const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
        if n < 1024 {
            return format!("{n} B");
        }
        let mut value = n as f64 / 1024.0;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        format!("{value:.1} {}", UNITS[unit])
    }

    fn count(n: u64, what: &str) -> String {
        if n == 1 {
            format!("1 {what}")
        } else {
            format!("{n} {what}s")
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn columns_line_up_whatever_the_cells_hold() {
            let out = table(
                &["JTI", "LOGIN"],
                vec![
                    vec!["a-long-jti".into(), "jit-é".into()],
                    vec!["j".into(), "jit-alice".into()],
                ],
            );
            assert_eq!(
                out,
                "JTI         LOGIN\na-long-jti  jit-é\nj           jit-alice\n"
            );
        }

        #[test]
        fn durations_sizes_and_times_read_at_a_glance() {
            assert_eq!(duration(-5), "0s");
            assert_eq!(duration(45), "45s");
            assert_eq!(duration(725), "12m 05s");
            assert_eq!(duration(3 * 3600 + 20 * 60 + 9), "3h 20m");
            assert_eq!(duration(2 * 86400 + 4 * 3600), "2d 04h");
            assert_eq!(bytes(512), "512 B");
            assert_eq!(bytes(12 * 1024 + 100), "12.1 KiB");
            assert_eq!(bytes(1 << 30), "1.0 GiB");
            assert_eq!(time(0), "1970-01-01 00:00:00 UTC");
            assert_eq!(count(1, "session"), "1 session");
            assert_eq!(count(0, "session"), "0 sessions");
        }

        #[test]
        fn an_empty_list_says_so() {
            assert_eq!(grants(&[]), "no grants\n");
            assert_eq!(sessions(&[]), "no live sessions\n");
        }

        #[test]
        fn a_session_list_is_a_table_with_a_header() {
            let list = vec![wire::SessionSummary {
                id: "20261203T014949Z-0000002a".into(),
                kind: wire::SessionKind::Console,
                jti: "j1".into(),
                iss: "https://idp".into(),
                login: "jit-alice".into(),
                started_at: 0,
                attached: true,
                commands: 3,
            }];
            let out = sessions(&list);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 2, "{out}");
            assert!(lines[0].starts_with("ID  "), "{out}");
            assert_eq!(lines[0].find("KIND"), lines[1].find("console"), "{out}");
            assert_eq!(lines[0].find("LOGIN"), lines[1].find("jit-alice"), "{out}");
        }
    }
}
