//! `cargo xtask bench ssh`: usherd (recording on) next to OpenSSH's sshd, in one run, on
//! loopback, with the same client and the same key exchange and cipher on both (pinned:
//! left alone, OpenSSH picks sntrup761x25519 with sshd and russh falls back to
//! curve25519). Prints the numbers and the ratios. `USHER_BENCH_SCALE` shrinks the sizes
//! and counts for a smoke test.

use crate::util::{
    bench_scale_note, bench_scaled, build_binaries, install_signed_grant, is_root, release_dir,
    run as run_cmd, Profile,
};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usher_test_support::{free_port, wait_for_port, SshClient};

const UPLOAD_BYTES: u64 = 1 << 30;
const DOWNLOAD_BYTES: u64 = 256 << 20;
const SETUP_RUNS: u64 = 50;
const IDLE_SESSIONS: u64 = 100;
/// Transfers of each kind per server, interleaved between the servers.
const TRANSFER_ROUNDS: usize = 3;
const SSHD_USER: &str = "usherbench";
/// The key exchange and cipher both servers are held to (client and sshd_config).
const KEX: &str = "curve25519-sha256";
const CIPHER: &str = "chacha20-poly1305@openssh.com";
/// OpenSSH's server processes: the listener and, from 9.8 on, the per-connection
/// `sshd-session` (and `sshd-auth` from 10.0) it executes.
const SSHD_PROCESS_NAMES: [&str; 3] = ["sshd", "sshd-session", "sshd-auth"];

pub(crate) struct Target {
    pub name: &'static str,
    port: u16,
    user: String,
    /// Processes whose memory counts as the server's.
    pub server_pids: Box<dyn Fn() -> Vec<u32>>,
}

pub(crate) struct Bench {
    pub dir: PathBuf,
    key: PathBuf,
    children: Vec<Child>,
    /// The usherd binary, to end what the killed agent left (its sessions' cgroups, its
    /// pinned eBPF programs) with `--remove-accounts`.
    usherd: Option<PathBuf>,
}

impl Drop for Bench {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(usherd) = &self.usherd {
            let _ = Command::new(usherd)
                .arg("--config")
                .arg(self.dir.join("usherd.toml"))
                .arg("--remove-accounts")
                .stderr(Stdio::null())
                .status();
        }
        for user in [SSHD_USER, "bn-bench"] {
            let _ = Command::new("pkill")
                .args(["-KILL", "-u", user])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(100));
            let _ = Command::new("userdel")
                .args(["--remove", user])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub(crate) fn ssh_args(bench: &Bench, t: &Target) -> Vec<String> {
    // The pinned key exchange and cipher first: ssh takes the first value it is given.
    [
        "-o".to_string(),
        format!("KexAlgorithms={KEX}"),
        "-o".into(),
        format!("Ciphers={CIPHER}"),
    ]
    .into_iter()
    .chain(SshClient::new(&bench.key, t.port).args(&t.user))
    .collect()
}

/// Proportional set size: shared pages (libraries, sshd's per-connection forks) are
/// divided among the processes that share them, so sums over processes are honest.
pub(crate) fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Pss:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn pids_named(names: &[&str]) -> Vec<u32> {
    let Ok(proc) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    proc.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|c| names.contains(&c.trim()))
                .unwrap_or(false)
        })
        .collect()
}

/// The key exchange and cipher a connection to `t` negotiates, as the client reports them
/// (`ssh -v`: the same choice holds at both ends of a connection).
fn negotiated(bench: &Bench, t: &Target) -> Result<(String, String), String> {
    let out = Command::new("ssh")
        .arg("-v")
        .args(ssh_args(bench, t))
        .arg("true")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    let log = String::from_utf8_lossy(&out.stderr);
    let after = |prefix: &str| {
        log.lines().find_map(|l| {
            l.split_once(prefix)
                .map(|(_, rest)| rest.trim().to_string())
        })
    };
    let kex = after("kex: algorithm:").ok_or(format!("{}: no key exchange in ssh -v", t.name))?;
    let cipher = after("kex: server->client cipher:")
        .map(|c| c.split_whitespace().next().unwrap_or("").to_string())
        .ok_or(format!("{}: no cipher in ssh -v", t.name))?;
    Ok((kex, cipher))
}

/// Seconds to push `bytes` through `cat > /dev/null` on the server.
fn upload(bench: &Bench, t: &Target, bytes: u64) -> Result<f64, String> {
    let start = Instant::now();
    let st = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "head -c {bytes} /dev/zero | ssh {} 'cat > /dev/null'",
            ssh_args(bench, t).join(" ")
        ))
        .status()
        .map_err(|e| e.to_string())?;
    if !st.success() {
        return Err(format!("{} upload failed", t.name));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Seconds to bring `bytes` of terminal-like text back through `ssh host cmd`.
fn download(bench: &Bench, t: &Target, bytes: u64) -> Result<f64, String> {
    let start = Instant::now();
    let out = Command::new("ssh")
        .args(ssh_args(bench, t))
        .arg(format!(
            "yes 'the quick brown fox jumps over the lazy dog 0123456789' | head -c {bytes}"
        ))
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut n = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    let mut stdout = out.stdout.unwrap();
    loop {
        let r = stdout.read(&mut buf).map_err(|e| e.to_string())?;
        if r == 0 {
            break;
        }
        n += r as u64;
    }
    if n != bytes {
        return Err(format!("{} download: got {n} of {bytes} bytes", t.name));
    }
    Ok(start.elapsed().as_secs_f64())
}

/// Time from starting `ssh host echo x` to the first byte of its output.
pub(crate) fn first_byte(bench: &Bench, t: &Target) -> Result<f64, String> {
    let start = Instant::now();
    let mut child = Command::new("ssh")
        .args(ssh_args(bench, t))
        .arg("echo x")
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut b = [0u8; 1];
    let n = child
        .stdout
        .as_mut()
        .unwrap()
        .read(&mut b)
        .map_err(|e| e.to_string())?;
    let elapsed = start.elapsed().as_secs_f64();
    let _ = child.wait();
    if n != 1 {
        return Err(format!("{}: no output", t.name));
    }
    Ok(elapsed)
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Server memory (KiB, summed over its processes) with `IDLE_SESSIONS` idle sessions,
/// minus the same with none.
fn idle_memory(bench: &Bench, t: &Target) -> Result<(u64, u64), String> {
    let before: u64 = (t.server_pids)().iter().map(|p| pss_kib(*p)).sum();
    let idle_sessions = bench_scaled(IDLE_SESSIONS) as usize;
    let mut clients = Vec::new();
    for _ in 0..idle_sessions {
        clients.push(
            Command::new("ssh")
                .args(ssh_args(bench, t))
                .arg("exec sleep 3600")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| e.to_string())?,
        );
        std::thread::sleep(Duration::from_millis(30));
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let uid = uid_of(&t.user)?;
    loop {
        let sleeping = pids_named(&["sleep"])
            .into_iter()
            .filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/status"))
                    .map(|s| {
                        s.lines().any(|l| {
                            l.starts_with("Uid:")
                                && l.split_whitespace().nth(1) == Some(&uid.to_string())
                        })
                    })
                    .unwrap_or(false)
            })
            .count();
        if sleeping >= idle_sessions {
            break;
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{}: only {sleeping} of {idle_sessions} sessions started",
                t.name
            ));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(1));
    let after: u64 = (t.server_pids)().iter().map(|p| pss_kib(*p)).sum();
    for mut c in clients {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = Command::new("pkill")
        .args(["-KILL", "-u", &t.user, "sleep"])
        .status();
    std::thread::sleep(Duration::from_secs(2));
    Ok((before, after))
}

fn uid_of(user: &str) -> Result<u32, String> {
    let out = Command::new("id")
        .args(["-u", user])
        .output()
        .map_err(|e| e.to_string())?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| format!("no user {user}"))
}

fn write(path: &Path, text: &str) -> Result<(), String> {
    std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn run() -> Result<(), String> {
    let (bench, sshd_t, usher_t) = start_servers("")?;
    measure(&bench, &sshd_t, &usher_t)
}

/// OpenSSH's sshd and usherd (recording on, `usherd_extra` appended to its config), each
/// with a user the benchmark's key logs in as.
pub(crate) fn start_servers(usherd_extra: &str) -> Result<(Bench, Target, Target), String> {
    if !is_root() {
        return Err("the benchmark runs as root (it starts sshd and usherd)".into());
    }
    crate::setup::packages()?;
    build_binaries(Profile::Release)?;
    let bin = release_dir();
    let dir = PathBuf::from(format!("/tmp/usher-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let mut bench = Bench {
        key: dir.join("id_ed25519"),
        dir: dir.clone(),
        children: vec![],
        usherd: None,
    };
    run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&bench.key),
    )?;
    let pubkey =
        std::fs::read_to_string(bench.key.with_extension("pub")).map_err(|e| e.to_string())?;

    // OpenSSH's sshd, its own config, a normal local user.
    let sshd_port = free_port();
    let _ = Command::new("userdel")
        .args(["--remove", SSHD_USER])
        .stderr(Stdio::null())
        .status();
    run_cmd(Command::new("useradd").args(["--create-home", "--shell", "/bin/bash", SSHD_USER]))?;
    let _ = Command::new("usermod")
        .args(["-p", "*", SSHD_USER])
        .status();
    let home = PathBuf::from(format!("/home/{SSHD_USER}"));
    std::fs::create_dir_all(home.join(".ssh")).map_err(|e| e.to_string())?;
    write(&home.join(".ssh/authorized_keys"), &pubkey)?;
    run_cmd(
        Command::new("chown")
            .args(["-R", &format!("{SSHD_USER}:{SSHD_USER}")])
            .arg(home.join(".ssh")),
    )?;
    run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(dir.join("sshd_host_key")),
    )?;
    let _ = std::fs::create_dir_all("/run/sshd");
    write(
        &dir.join("sshd_config"),
        &format!(
            "Port {sshd_port}\nListenAddress 127.0.0.1\nHostKey {d}/sshd_host_key\nPidFile {d}/sshd.pid\n\
             UsePAM no\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n\
             AuthorizedKeysFile .ssh/authorized_keys\nMaxStartups 200\nMaxSessions 200\nSubsystem sftp internal-sftp\n\
             KexAlgorithms {KEX}\nCiphers {CIPHER}\n",
            d = dir.display()
        ),
    )?;
    let sshd = Command::new("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(dir.join("sshd_config"))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("sshd: {e}"))?;
    let sshd_pid = sshd.id();
    bench.children.push(sshd);

    // usherd, recording on, its own issuer.
    let usher_port = free_port();
    run_cmd(
        Command::new(bin.join("usher"))
            .args(["keygen", "--kid", "b1", "--out-dir"])
            .arg(dir.join("issuer")),
    )?;
    write(
        &dir.join("usherd.toml"),
        &format!(
            "host_name = \"bench\"\nstate_dir = \"{d}/state\"\nspool_dir = \"{d}/spool\"\npolicies_dir = \"{d}/policies\"\n\
             control_socket = \"{d}/control.sock\"\nenforcement = \"best-effort\"\n[ssh]\nlisten = [\"127.0.0.1:{usher_port}\"]\n\
             [accounts]\nname_prefix = \"bn-\"\nuid_min = 65000\nuid_max = 65099\n[recording]\nrequired = true\n\
             [[issuer]]\niss = \"bench\"\njwks = \"{d}/issuer/issuer.jwks.json\"\n{usherd_extra}\n",
            d = dir.display()
        ),
    )?;
    let usherd = Command::new(bin.join("usherd"))
        .arg("--config")
        .arg(dir.join("usherd.toml"))
        .stderr(std::fs::File::create(dir.join("usherd.log")).map_err(|e| e.to_string())?)
        .spawn()
        .map_err(|e| e.to_string())?;
    let usherd_pid = usherd.id();
    bench.children.push(usherd);
    bench.usherd = Some(bin.join("usherd"));
    for port in [sshd_port, usher_port] {
        wait_for_port(port, Duration::from_secs(20)).map_err(|e| e.to_string())?;
    }
    std::thread::sleep(Duration::from_millis(300));
    install_signed_grant(
        Command::new(bin.join("usher"))
            .args(["grant", "sign", "--key"])
            .arg(dir.join("issuer/issuer.key"))
            .args([
                "--kid",
                "b1",
                "--iss",
                "bench",
                "--aud",
                "bench",
                "--sub",
                "bench",
                "--login",
                "bn-bench",
                "--ttl",
                "7200",
                "--ssh-key",
            ])
            .arg(bench.key.with_extension("pub")),
        &bin.join("usher"),
        &dir.join("control.sock"),
    )?;

    let sshd_t = Target {
        name: "sshd",
        port: sshd_port,
        user: SSHD_USER.into(),
        server_pids: Box::new(move || {
            pids_named(&SSHD_PROCESS_NAMES)
                .into_iter()
                .filter(|p| *p == sshd_pid || is_descendant(*p, sshd_pid))
                .collect()
        }),
    };
    let usher_t = Target {
        name: "usherd",
        port: usher_port,
        user: "bn-bench".into(),
        server_pids: Box::new(move || vec![usherd_pid]),
    };
    Ok((bench, sshd_t, usher_t))
}

fn measure(bench: &Bench, sshd_t: &Target, usher_t: &Target) -> Result<(), String> {
    println!(
        "usherd (recording on) vs OpenSSH sshd {}, one run on loopback, same ssh client{}",
        sshd_version(),
        bench_scale_note()
    );
    for t in [sshd_t, usher_t] {
        let (kex, cipher) = negotiated(bench, t)?;
        println!("{}: key exchange {kex}, cipher {cipher}", t.name);
        if kex != KEX || cipher != CIPHER {
            return Err(format!(
                "{} negotiated {kex}/{cipher}, not the pinned {KEX}/{CIPHER}",
                t.name
            ));
        }
    }
    let first_use = first_byte(bench, usher_t)?;
    println!(
        "first use of a grant (account created): {:.1} ms",
        first_use * 1e3
    );

    // Memory first, while both servers are fresh: bulk transfers leave allocator
    // high-water marks behind.
    let idle_sessions = bench_scaled(IDLE_SESSIONS);
    let (sb, sa) = idle_memory(bench, sshd_t)?;
    let (ub, ua) = idle_memory(bench, usher_t)?;
    let per = |b: u64, a: u64| a.saturating_sub(b) as f64 / idle_sessions as f64;
    println!(
        "{idle_sessions} idle sessions, server memory (PSS): sshd {} -> {} KiB ({:.0} KiB/session), usherd {} -> {} KiB ({:.0} KiB/session), ratio {:.2}x",
        sb,
        sa,
        per(sb, sa),
        ub,
        ua,
        per(ub, ua),
        per(ub, ua) / per(sb, sa)
    );
    println!("(sshd's figure sums its listener and per-connection sshd/sshd-session/sshd-auth processes; the sessions' own shells are not counted on either side)");

    // Interleave the runs so that a noisy moment hits both.
    let setup_runs = bench_scaled(SETUP_RUNS);
    let (mut s_setup, mut u_setup) = (vec![], vec![]);
    for _ in 0..setup_runs {
        s_setup.push(first_byte(bench, sshd_t)?);
        u_setup.push(first_byte(bench, usher_t)?);
    }
    let (s_med, u_med) = (median(s_setup), median(u_setup));
    println!(
        "set-up to first byte, median of {setup_runs}: sshd {:.1} ms, usherd {:.1} ms, ratio {:.2}x",
        s_med * 1e3,
        u_med * 1e3,
        u_med / s_med
    );

    let (download_bytes, upload_bytes) = (bench_scaled(DOWNLOAD_BYTES), bench_scaled(UPLOAD_BYTES));
    let (mut s_down, mut u_down, mut s_up, mut u_up) = (vec![], vec![], vec![], vec![]);
    for _ in 0..TRANSFER_ROUNDS {
        s_down.push(download(bench, sshd_t, download_bytes)?);
        u_down.push(download(bench, usher_t, download_bytes)?);
        s_up.push(upload(bench, sshd_t, upload_bytes)?);
        u_up.push(upload(bench, usher_t, upload_bytes)?);
    }
    let mib = |b: u64, s: f64| b as f64 / (1 << 20) as f64 / s;
    let (s_down, u_down) = (median(s_down), median(u_down));
    // The headline: output is what usherd records (the asciicast of the session).
    println!(
        "{} MiB of text out of a command, recorded by usherd, median of {TRANSFER_ROUNDS}: sshd {:.0} MiB/s, usherd {:.0} MiB/s, ratio {:.2}x",
        download_bytes >> 20,
        mib(download_bytes, s_down),
        mib(download_bytes, u_down),
        s_down / u_down
    );
    let (s_up, u_up) = (median(s_up), median(u_up));
    println!(
        "{} MiB into `cat > /dev/null`, NOT recorded (usherd does not record the stdin of exec sessions: transport only), median of {TRANSFER_ROUNDS}: sshd {:.0} MiB/s, usherd {:.0} MiB/s, ratio {:.2}x",
        upload_bytes >> 20,
        mib(upload_bytes, s_up),
        mib(upload_bytes, u_up),
        s_up / u_up
    );

    Ok(())
}

fn is_descendant(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..16 {
        let stat = match std::fs::read_to_string(format!("/proc/{p}/stat")) {
            Ok(s) => s,
            Err(_) => return false,
        };
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .and_then(|r| r.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if ppid == ancestor {
            return true;
        }
        if ppid <= 1 {
            return false;
        }
        p = ppid;
    }
    false
}

fn sshd_version() -> String {
    Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}
