//! `cargo xtask test-package`: the packages on a real systemd. A Debian tree made with
//! debootstrap boots under `systemd-nspawn -b` (sharing the host's network, so the host's
//! OpenSSH client can log in); the .deb is installed, used, reloaded, upgraded and removed.
//! The .rpm is checked with `rpm -qpl/-qpi/--scripts`.

use crate::util::{is_root, run, workspace_root};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usher_test_support::{free_port, SshClient};

const CACHE: &str = "/var/tmp/usher-nspawn";

struct Checks {
    passed: usize,
    failed: Vec<String>,
}

impl Checks {
    fn check(&mut self, what: &str, ok: bool, detail: impl FnOnce() -> String) {
        if ok {
            self.passed += 1;
            println!("package test: ok   {what}");
        } else {
            let d = detail();
            println!("package test: FAIL {what}\n{d}");
            self.failed.push(what.to_string());
        }
    }
}

struct Container {
    nspawn: Child,
    root: PathBuf,
    leader: u32,
}

impl Container {
    fn sh(&self, script: &str) -> (bool, String) {
        let out = Command::new("timeout")
            .args([
                "120",
                "nsenter",
                "-t",
                &self.leader.to_string(),
                "-a",
                "--",
                "/usr/bin/env",
                "-i",
            ])
            .args([
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "DEBIAN_FRONTEND=noninteractive",
                "LANG=C.UTF-8",
            ])
            .args(["/bin/sh", "-c", script])
            .stdin(Stdio::null())
            .output();
        match out {
            Ok(o) => (
                o.status.success(),
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                ),
            ),
            Err(e) => (false, e.to_string()),
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn for an orderly shutdown of the container.
        let _ = Command::new("kill")
            .arg(self.nspawn.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn base_tree() -> Result<PathBuf, String> {
    let base = Path::new(CACHE).join("bookworm");
    if base.join(".complete").exists() {
        return Ok(base);
    }
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(CACHE).map_err(|e| e.to_string())?;
    let start = Instant::now();
    run(Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus,passwd,login,openssh-sftp-server,procps",
            "bookworm",
        ])
        .arg(&base)
        .arg("http://deb.debian.org/debian")
        .stdout(Stdio::null()))?;
    std::fs::write(base.join(".complete"), "").map_err(|e| e.to_string())?;
    println!(
        "package test: debootstrap took {:.0} s",
        start.elapsed().as_secs_f64()
    );
    Ok(base)
}

fn find_leader(nspawn_pid: u32) -> Option<u32> {
    // The container's PID 1 (systemd) is a descendant of the nspawn process.
    let procs: Vec<(u32, u32, String)> = std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = stat.split('(').nth(1)?.split(')').next()?.to_string();
            let ppid: u32 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid, comm))
        })
        .collect();
    let mut frontier = vec![nspawn_pid];
    for _ in 0..4 {
        let mut next = Vec::new();
        for (pid, ppid, comm) in &procs {
            if frontier.contains(ppid) {
                if comm == "systemd" {
                    return Some(*pid);
                }
                next.push(*pid);
            }
        }
        frontier = next;
    }
    None
}

fn boot(base: &Path, name: &str) -> Result<Container, String> {
    let root = Path::new(CACHE).join(name);
    let _ = std::fs::remove_dir_all(&root);
    run(Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(base)
        .arg(&root))?;
    let log = std::fs::File::create(Path::new(CACHE).join(format!("{name}.log")))
        .map_err(|e| e.to_string())?;
    let nspawn = Command::new("systemd-nspawn")
        .args([
            "--quiet",
            "--register=no",
            "--keep-unit",
            "--boot",
            "--machine",
            name,
            "-D",
        ])
        .arg(&root)
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log)
        .spawn()
        .map_err(|e| format!("systemd-nspawn: {e}"))?;
    let pid = nspawn.id();
    let mut container = Container {
        nspawn,
        root,
        leader: 0,
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        if let Some(leader) = find_leader(pid) {
            container.leader = leader;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if container.leader == 0 {
        return Err("the container did not boot".into());
    }
    let (_, state) = container.sh("timeout 90 systemctl is-system-running --wait");
    println!("package test: container booted ({})", state.trim());
    Ok(container)
}

pub fn run_test() -> Result<(), String> {
    if !is_root() {
        return Err("the package test runs as root (it boots a container)".into());
    }
    let t0 = Instant::now();
    crate::setup::ensure_packages(&[
        "debootstrap",
        "systemd-container",
        "rpm",
        "openssh-client",
        "util-linux",
    ])?;
    let out = workspace_root().join("target/package");
    std::env::set_var("USHER_PKG_RELEASE", "2");
    crate::package::run_package()?;
    let deb2 = out.join(format!("usher_{}-2_amd64.deb", env!("CARGO_PKG_VERSION")));
    std::env::set_var("USHER_PKG_RELEASE", "1");
    crate::package::run_package()?;
    let deb1 = out.join(format!("usher_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")));
    let rpm = out.join(format!("usher-{}-1.x86_64.rpm", env!("CARGO_PKG_VERSION")));
    let mut checks = Checks {
        passed: 0,
        failed: vec![],
    };

    // The .rpm: content, metadata, scripts.
    let q = |args: &[&str]| {
        Command::new("rpm")
            .args(args)
            .arg(&rpm)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let files = q(&["-qpl"]);
    checks.check(
        "rpm contains the binaries, unit, tmpfiles and config",
        [
            "/usr/sbin/usherd",
            "/usr/bin/usher",
            "/usr/libexec/usher/usher-shell",
            "/lib/systemd/system/usherd.service",
            "/usr/lib/tmpfiles.d/usher.conf",
            "/etc/usher/usherd.toml",
        ]
        .iter()
        .all(|f| files.lines().any(|l| l == *f)),
        || files.clone(),
    );
    let info = q(&["-qpi"]);
    checks.check(
        "rpm metadata",
        info.contains("Name        : usher")
            && info.contains(&format!("Version     : {}", env!("CARGO_PKG_VERSION"))),
        || info.clone(),
    );
    let config_files = q(&["-qpc"]);
    checks.check(
        "rpm marks the config as a config file",
        config_files.contains("/etc/usher/usherd.toml"),
        || config_files.clone(),
    );
    let scripts = q(&["-qp", "--scripts"]);
    checks.check(
        "rpm scripts enable the unit and remove accounts on erase",
        scripts.contains("enable --now usherd") && scripts.contains("--remove-accounts"),
        || scripts.clone(),
    );

    // The .deb on a booted systemd.
    let base = base_tree()?;
    let name = format!("usher-pkgtest-{}", std::process::id());
    let c = boot(&base, &name)?;
    let port = free_port();
    let key = c.root.join("root/id_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key))?;
    std::fs::copy(&deb1, c.root.join("root/usher-1.deb")).map_err(|e| e.to_string())?;
    std::fs::copy(&deb2, c.root.join("root/usher-2.deb")).map_err(|e| e.to_string())?;
    // The one config file an administrator edits: here, the port (the container shares the
    // host's network).
    let default_conf = std::fs::read_to_string(workspace_root().join("packaging/usherd.toml"))
        .map_err(|e| e.to_string())?;
    std::fs::create_dir_all(c.root.join("etc/usher")).map_err(|e| e.to_string())?;
    std::fs::write(
        c.root.join("etc/usher/usherd.toml"),
        default_conf.replace(
            "listen = [\"0.0.0.0:2222\", \"[::]:2222\"]",
            &format!("listen = [\"127.0.0.1:{port}\"]"),
        ),
    )
    .map_err(|e| e.to_string())?;
    let (ok, text) = c.sh("dpkg -i --force-confold /root/usher-1.deb");
    checks.check("dpkg -i installs the .deb", ok, || text.clone());
    let (ok, text) = c.sh("for i in $(seq 1 50); do systemctl is-active --quiet usherd && break; sleep 0.2; done; systemctl show usherd -p ActiveState -p SubState -p Type -p NotifyAccess");
    checks.check(
        "usherd is active (Type=notify: it said READY)",
        ok && text.contains("ActiveState=active") && text.contains("Type=notify"),
        || text.clone(),
    );
    let (_, modes) =
        c.sh("stat -c '%a %n' /var/lib/usher /var/spool/usher /var/lib/usher/ssh_host_ed25519_key");
    checks.check(
        "state and spool are root-only",
        modes
            .lines()
            .all(|l| l.starts_with("700 ") || l.starts_with("600 "))
            && modes.lines().count() == 3,
        || modes.clone(),
    );

    let (ok, text) = c.sh("usher grant sign --local --sub pkg@test --login jit-pkg --ttl 3600 --ssh-key /root/id_ed25519.pub --reason 'package test' | usher grant install -");
    checks.check(
        "a grant is signed and installed with the local issuer",
        ok && text.contains("jit-pkg"),
        || text.clone(),
    );
    let client = SshClient::new(&key, port);
    let ssh = |cmd: &str| {
        client
            .command_within(60, "jit-pkg")
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
    };
    let out1 = ssh("id -un; cat /proc/self/cgroup").map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&out1.stdout).into_owned();
    checks.check(
        "OpenSSH logs in with the grant, in a session cgroup of the unit",
        out1.status.success()
            && text.starts_with("jit-pkg")
            && text.contains("usherd.service/usher-sessions/"),
        || format!("{text}{}", String::from_utf8_lossy(&out1.stderr)),
    );
    let (_, journal) = c.sh("journalctl -u usherd --no-pager -o cat; echo ---; journalctl --no-pager -o verbose USHER_EVENT=session_started | grep -E 'LOGIN=|SUB='");
    checks.check(
        "journalctl -u usherd shows who did what",
        journal.contains("pkg@test as jit-pkg") && journal.contains("account jit-pkg"),
        || journal.clone(),
    );
    checks.check(
        "journalctl USHER_EVENT=session_started finds the session",
        journal.contains("LOGIN=jit-pkg"),
        || journal.clone(),
    );

    // A live session across a reload.
    let live = client
        .command_within(120, "jit-pkg")
        .arg("sleep 20; echo still-here")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    std::thread::sleep(Duration::from_secs(2));
    let (ok, text) = c.sh("systemctl reload usherd && systemctl is-active usherd && journalctl -u usherd --no-pager -o cat | grep -c 'configuration reloaded'");
    checks.check(
        "systemctl reload re-reads the configuration",
        ok && text.contains("active"),
        || text.clone(),
    );
    let live_out = live.wait_with_output().map_err(|e| e.to_string())?;
    checks.check(
        "a live session survives the reload",
        String::from_utf8_lossy(&live_out.stdout).contains("still-here"),
        || String::from_utf8_lossy(&live_out.stdout).into_owned(),
    );

    // Upgrade with a live grant.
    let (_, spool_before) = c.sh("ls /var/spool/usher | wc -l");
    let (ok, text) =
        c.sh("dpkg -i --force-confold /root/usher-2.deb && dpkg-query -W -f='${Version}' usher");
    checks.check(
        "upgrade to the rebuilt package",
        ok && text.ends_with("-2"),
        || text.clone(),
    );
    let (ok, text) = c.sh("for i in $(seq 1 50); do systemctl is-active --quiet usherd && break; sleep 0.2; done; systemctl is-active usherd; usher grant list --json; getent passwd jit-pkg; grep -c 127.0.0.1 /etc/usher/usherd.toml; ls /var/spool/usher | wc -l");
    checks.check(
        "after the upgrade: running, grant and account kept, config kept",
        ok && text.contains("active") && text.contains("jit-pkg") && text.contains("pkg@test"),
        || text.clone(),
    );
    let (_, spool_after) = c.sh("ls /var/spool/usher | wc -l");
    checks.check(
        "the spool survives the upgrade",
        spool_after.trim().parse::<u32>().unwrap_or(0)
            >= spool_before.trim().parse::<u32>().unwrap_or(1),
        || format!("{spool_before} -> {spool_after}"),
    );
    let out2 = ssh("echo after-upgrade").map_err(|e| e.to_string())?;
    checks.check(
        "the grant still logs in after the upgrade",
        String::from_utf8_lossy(&out2.stdout).contains("after-upgrade"),
        || String::from_utf8_lossy(&out2.stderr).into_owned(),
    );

    // Removal takes the accounts with it; purge takes the state.
    let (ok, text) = c.sh("dpkg -r usher; getent passwd jit-pkg || echo no-account; systemctl is-active usherd || true; test -d /var/lib/usher && echo state-kept");
    checks.check(
        "dpkg -r stops the service and removes the ephemeral accounts",
        ok && text.contains("no-account") && !text.contains("\nactive"),
        || text.clone(),
    );
    checks.check(
        "remove keeps the state for a reinstall",
        text.contains("state-kept"),
        || text.clone(),
    );
    let (_, text) = c.sh("dpkg -P usher; test -e /var/lib/usher && echo state-left; test -e /etc/usher && echo config-left; echo done");
    checks.check(
        "purge removes state and configuration",
        !text.contains("state-left") && !text.contains("config-left"),
        || text.clone(),
    );
    drop(c);

    println!("package test: {:.0} s in all", t0.elapsed().as_secs_f64());
    println!("{} passed, {} failed", checks.passed, checks.failed.len());
    if checks.failed.is_empty() {
        Ok(())
    } else {
        Err(format!("package test failed: {:?}", checks.failed))
    }
}
