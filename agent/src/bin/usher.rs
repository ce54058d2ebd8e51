//! `usher`: the command-line tool — a small issuer (keygen, grant sign) and the client of
//! the local agent (grant install/list/revoke, status, sessions), and a cast player.

#![deny(unsafe_code)]

use clap::{Parser, Subcommand};
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;
use usher::control::{call, Request};
use usher::grant::{Audience, Claims, KeyAlg};

#[derive(Parser)]
#[command(
    version,
    about = "Usher: just-in-time access — issue grants, manage the local agent"
)]
struct Cli {
    /// The agent's control socket.
    #[arg(long, global = true, default_value = "/run/usher/control.sock")]
    socket: PathBuf,
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
            ExitCode::FAILURE
        }
    }
}

fn print(v: &serde_json::Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn run(cli: Cli) -> Result<(), String> {
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
            print(&call(
                &cli.socket,
                &Request::Install {
                    token: token.trim().to_string(),
                },
            )?);
            Ok(())
        }
        Command::Grant(GrantCommand::List) => {
            print(&call(&cli.socket, &Request::List)?);
            Ok(())
        }
        Command::Grant(GrantCommand::Revoke { jti, iss }) => {
            print(&call(&cli.socket, &Request::Revoke { jti, iss })?);
            Ok(())
        }
        Command::Status => {
            let status = call(&cli.socket, &Request::Status)?;
            print(&status);
            for a in status["unmanaged_accounts"]
                .as_array()
                .into_iter()
                .flatten()
            {
                eprintln!(
                    "usher: warning: account {} (uid {}) is in usher's name prefix and UID range but was not made by usher; it is left alone and no grant opens it",
                    a["name"].as_str().unwrap_or("?"),
                    a["uid"]
                );
            }
            Ok(())
        }
        Command::Sessions => {
            print(&call(&cli.socket, &Request::Sessions)?);
            Ok(())
        }
        Command::Play {
            file,
            speed,
            idle_limit,
        } => usher::play::play(&file, speed, idle_limit),
    }
}
