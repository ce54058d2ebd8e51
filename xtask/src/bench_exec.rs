//! `cargo xtask bench exec`: fork+exec of /bin/true in a loop inside a session's cgroup,
//! in one run: no agent; usherd's eBPF programs attached with a profile that allows it
//! (the loop runs in a real SSH session); and auditd with an execve rule, the peer.

use crate::util::{cargo, install_signed_grant, is_root, run as run_cmd, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use usher_test_support::{free_port, wait_until, SshClient};

const EXECS: u32 = 20_000;
const ROUNDS: usize = 3;

/// A shell loop that prints its own elapsed nanoseconds: the shell's cost is the same in
/// every scenario, and the SSH session's set-up is not counted.
fn loop_script() -> String {
    format!(
        "s=$(date +%s%N); i=0; while [ $i -lt {EXECS} ]; do /bin/true; i=$((i+1)); done; e=$(date +%s%N); echo $((e-s))"
    )
}

fn v2_mount() -> Result<PathBuf, String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    info.lines()
        .find_map(|l| {
            let (left, right) = l.split_once(" - ")?;
            let mount = left.split_whitespace().nth(4)?;
            (right.split_whitespace().next()? == "cgroup2").then(|| PathBuf::from(mount))
        })
        .ok_or_else(|| "no cgroup2 mount".into())
}

/// Runs the loop in a cgroup of its own as the session's user, with an environment like a
/// session's (exec copies the environment, so its size counts); returns seconds.
fn local_loop(cgroup: &Path, uid: u32, gid: u32) -> Result<f64, String> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new("sh");
    cmd.arg("-c").arg(loop_script());
    cmd.env_clear()
        .env("HOME", "/home/bx-bench")
        .env("USER", "bx-bench")
        .env("LOGNAME", "bx-bench")
        .env("SHELL", "/bin/bash")
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("MAIL", "/var/mail/bx-bench")
        .env("USHER_SESSION", "00000000T000000Z-00000000")
        .env("SSH_CLIENT", "127.0.0.1:40000")
        .current_dir("/")
        // Become the user (with no supplementary groups: std drops them) before exec.
        .uid(uid)
        .gid(gid)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = spawn_in_cgroup(&mut cmd, cgroup)?;
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    parse_ns(&out.stdout)
}

/// Starts `cmd` inside `cgroup`: it is forked while this process stands in the cgroup, so
/// the child is there from its first exec on, and this process goes back where it was.
fn spawn_in_cgroup(cmd: &mut Command, cgroup: &Path) -> Result<Child, String> {
    let home = own_cgroup()?;
    let join = |dir: &Path| {
        std::fs::write(dir.join("cgroup.procs"), "0")
            .map_err(|e| format!("joining {}: {e}", dir.display()))
    };
    join(cgroup)?;
    let child = cmd
        .spawn()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()));
    let back = join(&home);
    let child = child?;
    back?;
    Ok(child)
}

/// The cgroup (v2) this process is in.
fn own_cgroup() -> Result<PathBuf, String> {
    let own = std::fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let relative = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("no cgroup v2 entry in /proc/self/cgroup")?;
    Ok(v2_mount()?.join(relative.trim_start_matches('/')))
}

fn parse_ns(out: &[u8]) -> Result<f64, String> {
    String::from_utf8_lossy(out)
        .trim()
        .lines()
        .last()
        .and_then(|l| l.trim().parse::<f64>().ok())
        .map(|ns| ns / 1e9)
        .ok_or_else(|| format!("no timing in {:?}", String::from_utf8_lossy(out)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

struct Cleanup {
    dir: PathBuf,
    cgroup: PathBuf,
    usherd: Option<Child>,
    /// `usherd --remove-accounts` for this config: the agent's programs stay pinned (and
    /// attached) after it stops, until this removes them.
    remove: Option<Command>,
    audit_rule: bool,
    auditd: Option<Child>,
}

/// Stops the agent and detaches its programs (pinned, they would outlive it).
fn stop_usherd(usherd: &mut Option<Child>, remove: &mut Option<Command>) {
    if let Some(mut u) = usherd.take() {
        let _ = Command::new("kill").arg(u.id().to_string()).status();
        let _ = u.wait();
    }
    if let Some(mut r) = remove.take() {
        let _ = r.stdout(Stdio::null()).stderr(Stdio::null()).status();
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.audit_rule {
            let _ = Command::new("auditctl")
                .args([
                    "-d",
                    "always,exit",
                    "-F",
                    "arch=b64",
                    "-S",
                    "execve",
                    "-k",
                    "usher-bench",
                ])
                .stdout(Stdio::null())
                .status();
        }
        if let Some(mut a) = self.auditd.take() {
            let _ = Command::new("kill").arg(a.id().to_string()).status();
            let _ = a.wait();
            let _ = Command::new("auditctl")
                .args(["-e", "0"])
                .stdout(Stdio::null())
                .status();
        }
        stop_usherd(&mut self.usherd, &mut self.remove);
        // (The account is usually gone already: --remove-accounts took it.)
        let _ = Command::new("pkill")
            .args(["-KILL", "-u", "bx-bench"])
            .stderr(Stdio::null())
            .status();
        std::thread::sleep(Duration::from_millis(200));
        let _ = Command::new("userdel")
            .args(["--remove", "bx-bench"])
            .stderr(Stdio::null())
            .status();
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run() -> Result<(), String> {
    if !is_root() {
        return Err("the benchmark runs as root".into());
    }
    crate::setup::ensure_packages(&["auditd"])?;
    run_cmd(cargo().args(["build", "--release", "--bins"]))?;
    let bin = workspace_root().join("target/release");
    let dir = PathBuf::from(format!("/tmp/usher-bench-exec-{}", std::process::id()));
    let cgroup = v2_mount()?.join(format!("usher-bench-exec-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
    let mut c = Cleanup {
        dir: dir.clone(),
        cgroup: cgroup.clone(),
        usherd: None,
        remove: None,
        audit_rule: false,
        auditd: None,
    };

    // usherd with an allow-list profile that lets the loop run.
    std::fs::write(
        dir.join("policies/bench.toml"),
        "name = \"bench\"\n[exec]\nmode = \"allow\"\npaths = [\"/bin\", \"/usr/bin\"]\n",
    )
    .map_err(|e| e.to_string())?;
    let port = free_port();
    std::fs::write(
        dir.join("usherd.toml"),
        format!(
            "host_name = \"bench\"\nstate_dir = \"{d}/state\"\nspool_dir = \"{d}/spool\"\npolicies_dir = \"{d}/policies\"\n\
             control_socket = \"{d}/control.sock\"\nconsole_socket = \"{d}/console.sock\"\nenforcement = \"required\"\n\
             [ssh]\nlisten = [\"127.0.0.1:{port}\"]\n[accounts]\nname_prefix = \"bx-\"\nuid_min = 65100\nuid_max = 65199\n\
             [policy]\nallowed_profiles = [\"default\", \"bench\"]\n",
            d = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    let key = dir.join("id_ed25519");
    run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key),
    )?;
    let mut remove = Command::new(bin.join("usherd"));
    remove
        .arg("--config")
        .arg(dir.join("usherd.toml"))
        .arg("--remove-accounts");
    c.remove = Some(remove);
    c.usherd = Some(
        Command::new(bin.join("usherd"))
            .arg("--config")
            .arg(dir.join("usherd.toml"))
            .stderr(std::fs::File::create(dir.join("usherd.log")).map_err(|e| e.to_string())?)
            .spawn()
            .map_err(|e| e.to_string())?,
    );
    wait_until("usherd to listen", Duration::from_secs(20), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
            && dir.join("control.sock").exists()
    })
    .map_err(|e| e.to_string())?;
    install_signed_grant(
        Command::new(bin.join("usher"))
            .args(["grant", "sign", "--local", "--state-dir"])
            .arg(dir.join("state"))
            .args([
                "--aud",
                "bench",
                "--iss",
                "usher-local:bench",
                "--sub",
                "bench",
                "--login",
                "bx-bench",
                "--profile",
                "bench",
                "--ttl",
                "3600",
                "--ssh-key",
            ])
            .arg(key.with_extension("pub")),
        &bin.join("usher"),
        &dir.join("control.sock"),
    )?;
    let in_session = || -> Result<f64, String> {
        let out = SshClient::new(&key, port)
            .command("bx-bench")
            // The same interpreter as the local runs: sh, not the login shell.
            .arg(format!("exec sh -c '{}'", loop_script()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        parse_ns(&out.stdout)
    };

    let status = Command::new(bin.join("usher"))
        .arg("--socket")
        .arg(dir.join("control.sock"))
        .args(["status", "--json"])
        .output()
        .map_err(|e| e.to_string())?;
    let path = String::from_utf8_lossy(&status.stdout)
        .lines()
        .find(|l| l.contains("\"path\""))
        .unwrap_or("")
        .trim()
        .to_string();

    // A first session makes the account, whose identity the local runs borrow.
    in_session()?;
    let ids = Command::new("id")
        .args(["-u", "bx-bench"])
        .output()
        .map_err(|e| e.to_string())?;
    let uid: u32 = String::from_utf8_lossy(&ids.stdout)
        .trim()
        .parse()
        .map_err(|_| "no bx-bench account")?;
    let gids = Command::new("id")
        .args(["-g", "bx-bench"])
        .output()
        .map_err(|e| e.to_string())?;
    let gid: u32 = String::from_utf8_lossy(&gids.stdout)
        .trim()
        .parse()
        .map_err(|_| "no bx-bench group")?;
    let (mut none, mut usher) = (vec![], vec![]);
    for _ in 0..ROUNDS {
        none.push(local_loop(&cgroup, uid, gid)?);
        usher.push(in_session()?);
    }
    // Without the agent's programs in the way: the agent stops and unpins them (the
    // loops below borrow the account's numeric ids only), the same loop again.
    stop_usherd(&mut c.usherd, &mut c.remove);
    // auditd with an execve rule, the peer a user would otherwise pick.
    let _ = Command::new("auditctl")
        .args(["-D"])
        .stdout(Stdio::null())
        .status();
    c.auditd = Command::new("auditd")
        .arg("-n")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok();
    std::thread::sleep(Duration::from_secs(1));
    let rule = Command::new("auditctl")
        .args([
            "-a",
            "always,exit",
            "-F",
            "arch=b64",
            "-S",
            "execve",
            "-k",
            "usher-bench",
        ])
        .output()
        .map_err(|e| e.to_string())?;
    c.audit_rule = rule.status.success();
    let mut audit = vec![];
    if c.audit_rule {
        let _ = Command::new("auditctl")
            .args(["-e", "1"])
            .stdout(Stdio::null())
            .status();
        for _ in 0..ROUNDS {
            audit.push(local_loop(&cgroup, uid, gid)?);
        }
    }
    let (n, u) = (median(none), median(usher));
    println!(
        "{EXECS} fork+exec of /bin/true in a session's cgroup, median of {ROUNDS} rounds, one run"
    );
    println!("enforcement path: {path}");
    println!(
        "no agent:                    {:.3} s ({:.1} µs/exec)",
        n,
        n * 1e6 / EXECS as f64
    );
    println!(
        "usherd, allow-list profile:  {:.3} s ({:.1} µs/exec), {:+.1}% over no agent",
        u,
        u * 1e6 / EXECS as f64,
        (u / n - 1.0) * 100.0
    );
    if audit.is_empty() {
        println!(
            "auditd: the execve rule could not be added ({})",
            String::from_utf8_lossy(&rule.stderr).trim()
        );
    } else {
        let a = median(audit);
        println!(
            "auditd, execve rule:         {:.3} s ({:.1} µs/exec), {:+.1}% over no agent",
            a,
            a * 1e6 / EXECS as f64,
            (a / n - 1.0) * 100.0
        );
        println!("ratio usherd/auditd overhead: {:.2}", (u - n) / (a - n));
    }
    Ok(())
}
