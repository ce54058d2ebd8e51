//! `cargo xtask bench exec`: fork+exec of /bin/true in a loop inside a session's cgroup,
//! in rounds that interleave three set-ups: nothing attached (usherd stopped and its
//! programs unpinned, audit off); usherd's eBPF programs with a profile that allows the
//! loop (the loop runs in a real SSH session); and auditd with an execve rule, the peer.
//! A fourth set-up runs the loop in a session whose profile also holds /usr/sbin for
//! approval (guard/approval): what sessions with approval rules pay on execs that are not
//! held.
//! Each round checks that every exec was reported (usherd: every event in the session's
//! audit stream, nothing counted lost by the kernel or the session; auditd: the kernel's
//! `lost` counter unchanged): a figure that dropped events measured less work.
//! `USHER_BENCH_SCALE` shrinks the loop for a smoke test.

use crate::bench_ssh::median;
use crate::util::{
    bench_scale_note, bench_scaled, build_binaries, install_signed_grant, is_root, release_dir,
    run as run_cmd, Profile,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usher_test_support::{free_port, wait_until, SshClient};

const FULL_EXECS: u64 = 20_000;
const ROUNDS: usize = 5;

fn execs() -> u64 {
    bench_scaled(FULL_EXECS)
}

/// A shell loop that prints its own elapsed nanoseconds: the shell's cost is the same in
/// every scenario, and the SSH session's set-up is not counted.
fn loop_script() -> String {
    format!(
        "s=$(date +%s%N); i=0; while [ $i -lt {} ]; do /bin/true; i=$((i+1)); done; e=$(date +%s%N); echo $((e-s))",
        execs()
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

/// auditd's execve rule, after `-a` (add) or `-d` (delete).
const AUDIT_RULE: [&str; 7] = [
    "always,exit",
    "-F",
    "arch=b64",
    "-S",
    "execve",
    "-k",
    "usher-bench",
];

fn audit_rule(op: &str) -> Command {
    let mut cmd = Command::new("auditctl");
    cmd.arg(op).args(AUDIT_RULE);
    cmd
}

/// The kernel audit's count of records it dropped (`auditctl -s`: "lost N").
fn audit_lost() -> Result<u64, String> {
    let out = Command::new("auditctl")
        .arg("-s")
        .output()
        .map_err(|e| format!("auditctl -s: {e}"))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("lost ")?.trim().parse().ok())
        .ok_or_else(|| "auditctl -s shows no lost counter".to_string())
}

/// usherd for this benchmark: its binaries and config, and the agent while it runs.
struct Agent {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    key: PathBuf,
    usherd: Option<Child>,
}

impl Agent {
    fn usher(&self) -> Command {
        let mut cmd = Command::new(self.bin.join("usher"));
        cmd.arg("--socket").arg(self.dir.join("control.sock"));
        cmd
    }

    /// Starts usherd, with a grant for the benchmark's account.
    fn start(&mut self) -> Result<(), String> {
        let _ = std::fs::remove_file(self.dir.join("control.sock"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("usherd.log"))
            .map_err(|e| e.to_string())?;
        self.usherd = Some(
            Command::new(self.bin.join("usherd"))
                .arg("--config")
                .arg(self.dir.join("usherd.toml"))
                .stderr(log)
                .spawn()
                .map_err(|e| e.to_string())?,
        );
        let (port, control) = (self.port, self.dir.join("control.sock"));
        wait_until("usherd to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() && control.exists()
        })
        .map_err(|e| e.to_string())?;
        // Grants outlive the agent (its state); one is enough.
        let installed = self
            .status()
            .ok()
            .and_then(|s| s["grants"].as_u64().or(find_key(&s, "grants")?.as_u64()))
            .unwrap_or(0);
        if installed > 0 {
            return Ok(());
        }
        for (login, profile) in [("bx-bench", "bench"), ("bx-guard", "bench-approve")] {
            self.install(login, profile)?;
        }
        Ok(())
    }

    fn install(&self, login: &str, profile: &str) -> Result<(), String> {
        install_signed_grant(
            Command::new(self.bin.join("usher"))
                .args(["grant", "sign", "--local", "--state-dir"])
                .arg(self.dir.join("state"))
                .args([
                    "--aud",
                    "bench",
                    "--iss",
                    "usher-local:bench",
                    "--sub",
                    "bench",
                    "--login",
                    login,
                    "--profile",
                    profile,
                    "--ttl",
                    "3600",
                    "--ssh-key",
                ])
                .arg(self.key.with_extension("pub")),
            &self.bin.join("usher"),
            &self.dir.join("control.sock"),
        )
    }

    /// Stops the agent and detaches its programs (pinned, they would outlive it and
    /// check every exec of the host), removing its account and sessions' cgroups.
    fn stop_and_unpin(&mut self) {
        if let Some(mut u) = self.usherd.take() {
            let _ = Command::new("kill").arg(u.id().to_string()).status();
            let _ = u.wait();
        }
        let _ = Command::new(self.bin.join("usherd"))
            .arg("--config")
            .arg(self.dir.join("usherd.toml"))
            .arg("--remove-accounts")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// `usher status` as JSON (`--json` where the tool has it).
    fn status(&self) -> Result<serde_json::Value, String> {
        for json_flag in [true, false] {
            let mut cmd = self.usher();
            cmd.arg("status");
            if json_flag {
                cmd.arg("--json");
            }
            let out = cmd.output().map_err(|e| e.to_string())?;
            if let Ok(v) = serde_json::from_slice(&out.stdout) {
                return Ok(v);
            }
        }
        Err("usher status gave no JSON".into())
    }

    /// The loop in a real session of `login`; returns seconds.
    fn in_session(&self, login: &str) -> Result<f64, String> {
        let out = SshClient::new(&self.key, self.port)
            .command(login)
            // The same interpreter as the local runs: sh, not the login shell.
            .arg(format!("exec sh -c '{}'", loop_script()))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        parse_ns(&out.stdout)
    }

    /// The sessions' audit streams in the spool, read once each session has ended; the
    /// files are removed so that the next round counts its own.
    fn take_audit_lines(&self) -> Result<Vec<serde_json::Value>, String> {
        let spool = self.dir.join("spool");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let streams: Vec<PathBuf> = std::fs::read_dir(&spool)
                .map_err(|e| format!("{}: {e}", spool.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.to_string_lossy().ends_with(".audit.jsonl"))
                .collect();
            let texts: Vec<String> = streams
                .iter()
                .map(|p| std::fs::read_to_string(p).unwrap_or_default())
                .collect();
            let ended = !texts.is_empty()
                && texts
                    .iter()
                    .all(|t| t.contains("\"event\":\"session_ended\""));
            if ended || Instant::now() > deadline {
                if !ended {
                    return Err("the session's audit stream never said it ended".into());
                }
                for entry in std::fs::read_dir(&spool)
                    .map_err(|e| e.to_string())?
                    .flatten()
                {
                    let _ = std::fs::remove_file(entry.path());
                }
                return Ok(texts
                    .iter()
                    .flat_map(|t| t.lines())
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Finds `key` anywhere in a JSON document.
fn find_key<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    match v {
        serde_json::Value::Object(map) => map
            .get(key)
            .or_else(|| map.values().find_map(|inner| find_key(inner, key))),
        serde_json::Value::Array(items) => items.iter().find_map(|inner| find_key(inner, key)),
        _ => None,
    }
}

/// One usherd round: the loop in a session, and what the agent saw of it.
struct UsherRound {
    seconds: f64,
    /// Exec events of /bin/true in the session's audit stream.
    reported: u64,
    /// Counted lost by the kernel's ring buffer (all sessions) and by the session.
    lost_kernel: u64,
    lost_session: u64,
}

fn usher_round(agent: &mut Agent, login: &str) -> Result<UsherRound, String> {
    agent.start()?;
    let seconds = agent.in_session(login)?;
    let lost_kernel = find_key(&agent.status()?, "enforcement")
        .and_then(|e| e["lost_events"].as_u64())
        .ok_or("usher status shows no enforcement.lost_events")?;
    let lines = agent.take_audit_lines()?;
    agent.stop_and_unpin();
    let reported = lines
        .iter()
        .filter(|l| l["event"] == "exec")
        .filter(|l| {
            l["exec"]["filename"]
                .as_str()
                .is_some_and(|f| f.ends_with("/true"))
        })
        .count() as u64;
    let lost_session = lines
        .iter()
        .filter(|l| l["event"] == "exec_events_lost")
        .filter_map(|l| l["lost"].as_u64())
        .sum();
    Ok(UsherRound {
        seconds,
        reported,
        lost_kernel,
        lost_session,
    })
}

struct Cleanup {
    dir: PathBuf,
    cgroup: PathBuf,
    agent: Agent,
    auditd: Option<Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = audit_rule("-d")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = Command::new("auditctl")
            .args(["-e", "0"])
            .stdout(Stdio::null())
            .status();
        if let Some(mut a) = self.auditd.take() {
            let _ = Command::new("kill").arg(a.id().to_string()).status();
            let _ = a.wait();
        }
        self.agent.stop_and_unpin();
        // (The account is usually gone already: --remove-accounts took it.)
        for login in ["bx-bench", "bx-guard"] {
            let _ = Command::new("pkill")
                .args(["-KILL", "-u", login])
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(200));
        for login in ["bx-bench", "bx-guard"] {
            let _ = Command::new("userdel")
                .args(["--remove", login])
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir(&self.cgroup);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn run() -> Result<(), String> {
    if !is_root() {
        return Err("the benchmark runs as root".into());
    }
    crate::setup::ensure_packages(&["auditd"])?;
    build_binaries(Profile::Release)?;
    let bin = release_dir();
    let dir = PathBuf::from(format!("/tmp/usher-bench-exec-{}", std::process::id()));
    let cgroup = v2_mount()?.join(format!("usher-bench-exec-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("policies")).map_err(|e| e.to_string())?;
    std::fs::create_dir_all(&cgroup).map_err(|e| format!("{}: {e}", cgroup.display()))?;
    let port = free_port();
    let mut c = Cleanup {
        dir: dir.clone(),
        cgroup: cgroup.clone(),
        agent: Agent {
            bin: bin.clone(),
            dir: dir.clone(),
            port,
            key: dir.join("id_ed25519"),
            usherd: None,
        },
        auditd: None,
    };

    // usherd with an allow-list profile that lets the loop run.
    std::fs::write(
        dir.join("policies/bench.toml"),
        "name = \"bench\"\n[exec]\nmode = \"allow\"\npaths = [\"/bin\", \"/usr/bin\"]\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("policies/bench-approve.toml"),
        "name = \"bench-approve\"\n[exec]\nmode = \"allow\"\npaths = [\"/bin\", \"/usr/bin\"]\napprove = [\"/usr/sbin\"]\n",
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(
        dir.join("usherd.toml"),
        format!(
            "host_name = \"bench\"\nstate_dir = \"{d}/state\"\nspool_dir = \"{d}/spool\"\npolicies_dir = \"{d}/policies\"\n\
             control_socket = \"{d}/control.sock\"\nconsole_socket = \"{d}/console.sock\"\nenforcement = \"required\"\n\
             [ssh]\nlisten = [\"127.0.0.1:{port}\"]\n[accounts]\nname_prefix = \"bx-\"\nuid_min = 65100\nuid_max = 65199\n\
             [policy]\nallowed_profiles = [\"default\", \"bench\", \"bench-approve\"]\n",
            d = dir.display()
        ),
    )
    .map_err(|e| e.to_string())?;
    run_cmd(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&c.agent.key),
    )?;

    // A first session makes the account, whose numeric identity the local runs borrow
    // (after --remove-accounts too), and says which enforcement path this kernel allows.
    c.agent.start()?;
    c.agent.in_session("bx-bench")?;
    let path = c
        .agent
        .status()
        .ok()
        .and_then(|s| {
            find_key(&s, "enforcement")
                .and_then(|e| e["path"].as_str())
                .map(String::from)
        })
        .unwrap_or_default();
    let id_of = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .args([flag, "bx-bench"])
            .output()
            .map_err(|e| e.to_string())?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| "no bx-bench account".to_string())
    };
    let (uid, gid) = (id_of("-u")?, id_of("-g")?);
    c.agent.take_audit_lines()?;
    c.agent.stop_and_unpin();

    // auditd runs throughout; its rule and auditing are on only in its own runs.
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

    let execs = execs();
    let (mut none, mut usher, mut guarded, mut audit) = (vec![], vec![], vec![], vec![]);
    let mut incomplete = Vec::new();
    let mut audit_refused = None;
    // Interleaved, so that a noisy moment of the machine hits every set-up.
    for round in 1..=ROUNDS {
        none.push(local_loop(&cgroup, uid, gid)?);

        for (login, figures) in [("bx-bench", &mut usher), ("bx-guard", &mut guarded)] {
            let u = usher_round(&mut c.agent, login)?;
            if u.reported != execs || u.lost_kernel != 0 || u.lost_session != 0 {
                incomplete.push(format!(
                    "round {round}, usherd ({login}): {} of {execs} execs reported, {} lost in the kernel's ring buffer, {} lost by the session",
                    u.reported, u.lost_kernel, u.lost_session
                ));
            }
            figures.push(u.seconds);
        }

        let rule = audit_rule("-a").output().map_err(|e| e.to_string())?;
        if !rule.status.success() {
            audit_refused = Some(String::from_utf8_lossy(&rule.stderr).trim().to_string());
            continue;
        }
        let _ = Command::new("auditctl")
            .args(["-e", "1"])
            .stdout(Stdio::null())
            .status();
        let lost_before = audit_lost()?;
        audit.push(local_loop(&cgroup, uid, gid)?);
        let lost = audit_lost()?.saturating_sub(lost_before);
        let _ = audit_rule("-d").stdout(Stdio::null()).status();
        let _ = Command::new("auditctl")
            .args(["-e", "0"])
            .stdout(Stdio::null())
            .status();
        if lost != 0 {
            incomplete.push(format!(
                "round {round}, auditd: the kernel's audit lost {lost} records"
            ));
        }
    }

    let n = median(none);
    let per_exec = |s: f64| s * 1e6 / execs as f64;
    let over = |s: f64| (s / n - 1.0) * 100.0;
    println!(
        "{execs} fork+exec of /bin/true in a session's cgroup, median of {ROUNDS} interleaved rounds{}",
        bench_scale_note()
    );
    println!("enforcement path: {path}");
    println!(
        "nothing attached:            {:.3} s ({:.1} µs/exec) (usherd stopped, programs unpinned, audit off)",
        n,
        per_exec(n)
    );
    let u = median(usher);
    println!(
        "usherd, allow-list profile:  {:.3} s ({:.1} µs/exec), {:+.1}% over nothing attached",
        u,
        per_exec(u),
        over(u)
    );
    let g = median(guarded);
    println!(
        "usherd, + approval rules:    {:.3} s ({:.1} µs/exec), {:+.1}% over nothing attached, {:+.1}% over the profile without them",
        g,
        per_exec(g),
        over(g),
        (g / u - 1.0) * 100.0
    );
    if audit.is_empty() {
        println!(
            "auditd: the execve rule could not be added ({})",
            audit_refused.unwrap_or_default()
        );
    } else {
        let a = median(audit);
        println!(
            "auditd, execve rule:         {:.3} s ({:.1} µs/exec), {:+.1}% over nothing attached",
            a,
            per_exec(a),
            over(a)
        );
        println!("ratio usherd/auditd overhead: {:.2}", (u - n) / (a - n));
    }
    if incomplete.is_empty() {
        println!(
            "every exec was reported: usherd's events all arrived, nothing lost on either side"
        );
        Ok(())
    } else {
        for line in &incomplete {
            println!("INCOMPLETE: {line}");
        }
        Err("events were lost: the figures above measured less than every exec".into())
    }
}
