//! `cargo xtask test-package`: the packages on a real systemd. A Debian tree made with
//! debootstrap boots under `systemd-nspawn -b` (sharing the host's network, so the host's
//! OpenSSH client can log in and the host's curl reach the service); the agent's .deb and
//! the service's (`usher-collector`) are installed side by side, used, reloaded, upgraded
//! and removed. The .rpms are checked with `rpm -qpl/-qpi/--scripts`.

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
    /// `script` run by `/bin/sh` inside the container: whether it exited 0, and its
    /// standard output and standard error apart.
    fn run(&self, script: &str) -> (bool, String, String) {
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
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            ),
            Err(e) => (false, String::new(), e.to_string()),
        }
    }

    /// `script` inside the container: whether it exited 0, and its output (standard output,
    /// then standard error).
    fn sh(&self, script: &str) -> (bool, String) {
        let (ok, stdout, stderr) = self.run(script);
        (ok, format!("{stdout}{stderr}"))
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
        "curl",
    ])?;
    let out = workspace_root().join("target/package");
    std::env::set_var("USHER_PKG_RELEASE", "2");
    crate::package::run_package()?;
    let deb2 = out.join(format!("usher_{}-2_amd64.deb", env!("CARGO_PKG_VERSION")));
    std::env::set_var("USHER_PKG_RELEASE", "1");
    crate::package::run_package()?;
    let deb1 = out.join(format!("usher_{}-1_amd64.deb", env!("CARGO_PKG_VERSION")));
    let rpm = out.join(format!("usher-{}-1.x86_64.rpm", env!("CARGO_PKG_VERSION")));
    let service = ServicePackages::at(&out);
    let mut checks = Checks {
        passed: 0,
        failed: vec![],
    };
    check_service_rpm(&service.rpm, &mut checks);

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
            "/usr/libexec/usher/usher-rdp",
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
    let recommends = q(&["-qp", "--recommends"]);
    checks.check(
        "rpm recommends the RDP desktop's X server, window manager and terminal",
        ["xorg-x11-server-Xvfb", "openbox", "xterm"]
            .iter()
            .all(|p| recommends.lines().any(|l| l.trim() == *p)),
        || recommends.clone(),
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
    // The RDP worker is installed where the packaged config's `[rdp] worker` points, and
    // every library it links is on a minimal Debian (none of the desktop packages it only
    // recommends).
    let (ok, text) = c.sh(
        "test -x /usr/libexec/usher/usher-rdp && ldd /usr/libexec/usher/usher-rdp \
         && ! ldd /usr/libexec/usher/usher-rdp | grep -q 'not found'",
    );
    checks.check(
        "usher-rdp is installed and its libraries resolve",
        ok,
        || text.clone(),
    );
    let control = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb1)
        .args(["Recommends"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    checks.check(
        "the .deb recommends the RDP desktop's X server, window manager and terminal",
        ["xvfb", "openbox", "xterm"]
            .iter()
            .all(|p| control.split(',').any(|d| d.trim() == *p)),
        || control.clone(),
    );
    let service_port = free_port();
    install_service(&c, &service, service_port, &mut checks)?;
    let (ok, text) = c.sh("for i in $(seq 1 50); do systemctl is-active --quiet usherd && break; sleep 0.2; done; systemctl show usherd -p ActiveState -p SubState -p Type -p NotifyAccess");
    checks.check(
        "usherd is active (Type=notify: it said READY)",
        ok && has_line(&text, "ActiveState=active") && has_line(&text, "Type=notify"),
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
    let (ok, text) = c.sh("systemctl reload usherd && echo \"state=$(systemctl is-active usherd)\" && echo \"reloaded=$(journalctl -u usherd --no-pager -o cat | grep -c 'configuration reloaded')\"");
    checks.check(
        "systemctl reload re-reads the configuration",
        ok && has_line(&text, "state=active")
            && labelled_number(&text, "reloaded").is_some_and(|n| n >= 1),
        || text.clone(),
    );
    let live_out = live.wait_with_output().map_err(|e| e.to_string())?;
    checks.check(
        "a live session survives the reload",
        String::from_utf8_lossy(&live_out.stdout).contains("still-here"),
        || String::from_utf8_lossy(&live_out.stdout).into_owned(),
    );

    reload_and_stop_service(&c, service_port, &mut checks);
    workflow_in_container(&c, port, service_port, &mut checks);

    // Upgrade with a live grant.
    let (_, spool_before) = c.sh("ls /var/spool/usher | wc -l");
    let (ok, text) =
        c.sh("dpkg -i --force-confold /root/usher-2.deb && dpkg-query -W -f='${Version}' usher");
    checks.check(
        "upgrade to the rebuilt package",
        ok && text.ends_with("-2"),
        || text.clone(),
    );
    // The administrator's edit (the listen line) is what says the config was kept.
    let (ok, text) = c.sh(&format!("for i in $(seq 1 50); do systemctl is-active --quiet usherd && break; sleep 0.2; done; echo \"state=$(systemctl is-active usherd)\"; usher grant list --json; getent passwd jit-pkg; echo \"edited-listen=$(grep -c -F 'listen = [\"127.0.0.1:{port}\"]' /etc/usher/usherd.toml)\"; echo \"default-listen=$(grep -c -F '0.0.0.0:2222' /etc/usher/usherd.toml)\""));
    checks.check(
        "after the upgrade: running, grant and account kept, config kept",
        ok && has_line(&text, "state=active")
            && text.contains("jit-pkg")
            && text.contains("pkg@test")
            && labelled_number(&text, "edited-listen") == Some(1)
            && labelled_number(&text, "default-listen") == Some(0),
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

    upgrade_service(&c, service_port, &mut checks);

    // Removal takes the accounts with it; purge takes the state.
    let (ok, text) = c.sh("dpkg -r usher; getent passwd jit-pkg || echo no-account; echo \"state=$(systemctl is-active usherd)\"; test -d /var/lib/usher && echo state-kept");
    checks.check(
        "dpkg -r stops the service and removes the ephemeral accounts",
        ok && has_line(&text, "no-account")
            && text.lines().any(|l| l.starts_with("state="))
            && !has_line(&text, "state=active"),
        || text.clone(),
    );
    checks.check(
        "remove keeps the state for a reinstall",
        text.contains("state-kept"),
        || text.clone(),
    );
    let (_, text) = c.sh("dpkg -P usher; test -e /var/lib/usher && echo state-left; test -e /etc/usher/usherd.toml && echo config-left; test -e /etc/usher/policies && echo policies-left; echo done");
    checks.check(
        "purge removes state and configuration",
        !text.contains("state-left")
            && !text.contains("config-left")
            && !text.contains("policies-left"),
        || text.clone(),
    );
    remove_service(&c, &mut checks);
    drop(c);

    println!("package test: {:.0} s in all", t0.elapsed().as_secs_f64());
    println!("{} passed, {} failed", checks.passed, checks.failed.len());
    if checks.failed.is_empty() {
        Ok(())
    } else {
        Err(format!("package test failed: {:?}", checks.failed))
    }
}

/// Whether `text` has `line` as a whole line (`active` must not match `inactive`).
fn has_line(text: &str, line: &str) -> bool {
    text.lines().any(|l| l.trim() == line)
}

/// The number on the `label=N` line of `text`.
fn labelled_number(text: &str, label: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        l.trim()
            .strip_prefix(label)?
            .strip_prefix('=')?
            .parse()
            .ok()
    })
}

/// The service's packages, built next to the agent's.
struct ServicePackages {
    deb1: PathBuf,
    deb2: PathBuf,
    rpm: PathBuf,
}

impl ServicePackages {
    fn at(out: &Path) -> ServicePackages {
        let v = env!("CARGO_PKG_VERSION");
        ServicePackages {
            deb1: out.join(format!("usher-collector_{v}-1_amd64.deb")),
            deb2: out.join(format!("usher-collector_{v}-2_amd64.deb")),
            rpm: out.join(format!("usher-collector-{v}-1.x86_64.rpm")),
        }
    }
}

const SERVICE_CONFIG: &str = "/etc/usher/collector.toml";
const SERVICE_CERT: &str = "var/lib/usher-collector/tls/cert.pem";

/// The service's .rpm: content, config file, scripts.
fn check_service_rpm(rpm: &Path, checks: &mut Checks) {
    let q = |args: &[&str]| {
        Command::new("rpm")
            .args(args)
            .arg(rpm)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let files = q(&["-qpl"]);
    checks.check(
        "service rpm contains the binary, unit, tmpfiles, sysusers, config and player",
        [
            "/usr/bin/usher-collector",
            "/lib/systemd/system/usher-collector.service",
            "/usr/lib/tmpfiles.d/usher-collector.conf",
            "/usr/lib/sysusers.d/usher-collector.conf",
            SERVICE_CONFIG,
            "/usr/share/usher-collector/assets/asciinema-player.min.js",
            "/usr/share/usher-collector/assets/asciinema-player.css",
        ]
        .iter()
        .all(|f| files.lines().any(|l| l == *f)),
        || files.clone(),
    );
    let config_files = q(&["-qpc"]);
    checks.check(
        "service rpm marks its config as a config file",
        has_line(&config_files, SERVICE_CONFIG),
        || config_files.clone(),
    );
    let scripts = q(&["-qp", "--scripts"]);
    checks.check(
        "service rpm scripts make the user and the TLS pair and enable the unit",
        scripts.contains("useradd --system")
            && scripts.contains("runuser -u usher-collector -- /usr/bin/usher-collector")
            && scripts.contains("collector.toml init")
            && scripts.contains("enable --now usher-collector"),
        || scripts.clone(),
    );
}

/// Whether the service answers HTTPS on `port` with the certificate its first install
/// made (checked against that certificate: a wrong name or a wrong key fails). Answers
/// the status codes of `/` and of the search API without a token.
fn https_status(c: &Container, port: u16) -> (bool, String) {
    let cert = c.root.join(SERVICE_CERT);
    let mut statuses = Vec::new();
    for path in ["/", "/api/v1/sessions"] {
        let out = Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .arg("--cacert")
            .arg(&cert)
            .arg(format!("https://localhost:{port}{path}"))
            .output();
        match out {
            Ok(o) => statuses.push(format!(
                "{path}={}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr).trim()
            )),
            Err(e) => return (false, format!("curl: {e}")),
        }
    }
    let text = statuses.join("\n");
    (
        has_line(&text, "/=200") && has_line(&text, "/api/v1/sessions=401"),
        text,
    )
}

/// Waits (bounded) for the service to be active; answers `systemctl show`'s lines.
const WAIT_ACTIVE: &str = "for i in $(seq 1 50); do systemctl is-active --quiet usher-collector && break; sleep 0.2; done";

/// The service next to usherd: the package makes its user and a self-signed pair, the
/// unit says READY, the journal has its fields, it serves HTTPS.
fn install_service(
    c: &Container,
    service: &ServicePackages,
    port: u16,
    checks: &mut Checks,
) -> Result<(), String> {
    std::fs::copy(&service.deb1, c.root.join("root/usher-collector-1.deb"))
        .map_err(|e| e.to_string())?;
    std::fs::copy(&service.deb2, c.root.join("root/usher-collector-2.deb"))
        .map_err(|e| e.to_string())?;
    // The administrator's one edit before installing: the port (the host's network is
    // shared) and loopback only.
    let default_conf =
        std::fs::read_to_string(workspace_root().join("packaging/collector/collector.toml"))
            .map_err(|e| e.to_string())?;
    let edited = default_conf.replace(
        "listen = \"0.0.0.0:8443\"",
        &format!("listen = \"127.0.0.1:{port}\""),
    );
    if edited == default_conf {
        return Err(
            "packaging/collector/collector.toml has no `listen = \"0.0.0.0:8443\"` line to edit"
                .into(),
        );
    }
    std::fs::write(c.root.join(SERVICE_CONFIG.trim_start_matches('/')), edited)
        .map_err(|e| e.to_string())?;
    let (ok, text) = c.sh("dpkg -i --force-confold /root/usher-collector-1.deb");
    checks.check(
        "dpkg -i installs the service's .deb next to usherd's",
        ok,
        || text.clone(),
    );
    let (ok, text) = c.sh(&format!("{WAIT_ACTIVE}; systemctl show usher-collector -p ActiveState -p Type -p NotifyAccess -p User; echo \"runs-as=$(ps -o user:32= -p $(systemctl show -p MainPID --value usher-collector))\"; echo \"usherd=$(systemctl is-active usherd)\""));
    checks.check(
        "usher-collector is active (Type=notify: it said READY) as its own user, next to usherd",
        ok && has_line(&text, "ActiveState=active")
            && has_line(&text, "Type=notify")
            && has_line(&text, "User=usher-collector")
            && has_line(&text, "runs-as=usher-collector")
            && has_line(&text, "usherd=active"),
        || text.clone(),
    );
    let (_, text) = c.sh(&format!("getent passwd usher-collector | cut -d: -f1,6,7; stat -c '%a %U:%G %n' /var/lib/usher-collector /{SERVICE_CERT} /var/lib/usher-collector/tls/key.pem {SERVICE_CONFIG}"));
    checks.check(
        "first install: the system user, a self-signed pair it owns, the config readable by it only",
        text.contains("usher-collector:/var/lib/usher-collector:/usr/sbin/nologin")
            && has_line(&text, "750 usher-collector:usher-collector /var/lib/usher-collector")
            && has_line(&text, &format!("644 usher-collector:usher-collector /{SERVICE_CERT}"))
            && has_line(&text, "600 usher-collector:usher-collector /var/lib/usher-collector/tls/key.pem")
            && has_line(&text, &format!("640 root:usher-collector {SERVICE_CONFIG}")),
        || text.clone(),
    );
    let (ok, text) = https_status(c, port);
    checks.check(
        "the service serves HTTPS with the certificate its install made",
        ok,
        || text.clone(),
    );
    // For the record, not a check: how exposed systemd thinks the unit is.
    let (_, exposure) = c.sh("systemd-analyze security usher-collector --no-pager | tail -1");
    println!(
        "package test: info systemd-analyze security usher-collector: {}",
        exposure.trim()
    );
    let (_, journal) = c.sh("journalctl --no-pager -o verbose SYSLOG_IDENTIFIER=usher-collector USHER_EVENT=service_ready");
    checks.check(
        "journalctl USHER_EVENT=service_ready finds the service, with its fields",
        journal.contains(&format!("LISTEN=127.0.0.1:{port}")) && journal.contains("VERSION="),
        || journal.clone(),
    );
    Ok(())
}

/// `systemctl reload`: a changed file is applied without a restart and the journal names
/// what changed; a broken file is refused and the old configuration kept. `systemctl
/// stop` is a clean, graceful exit.
fn reload_and_stop_service(c: &Container, port: u16, checks: &mut Checks) {
    let (ok, text) = c.sh(&format!("\
        pid=$(systemctl show -p MainPID --value usher-collector); \
        sed -i 's|^assets_dir = .*|assets_dir = \"/usr/share/usher-collector/assets/\"|' {SERVICE_CONFIG}; \
        systemctl reload usher-collector && echo reload-ok; \
        echo \"state=$(systemctl is-active usher-collector)\"; \
        test \"$pid\" = \"$(systemctl show -p MainPID --value usher-collector)\" && echo same-process; \
        journalctl --no-pager -o verbose SYSLOG_IDENTIFIER=usher-collector USHER_EVENT=config_reloaded | grep -E '^ *(CHANGED|MESSAGE)='"));
    checks.check(
        "systemctl reload re-reads the service's config in place; the journal names what changed",
        ok && has_line(&text, "reload-ok")
            && has_line(&text, "state=active")
            && has_line(&text, "same-process")
            && text.lines().any(|l| l.trim() == "CHANGED=assets_dir"),
        || text.clone(),
    );
    let (ok, text) = c.sh(&format!("\
        cp {SERVICE_CONFIG} /root/collector.toml.good; \
        echo 'listen = [not toml' >> {SERVICE_CONFIG}; \
        systemctl reload usher-collector; \
        echo \"state=$(systemctl is-active usher-collector)\"; \
        echo \"refused=$(journalctl --no-pager -o cat SYSLOG_IDENTIFIER=usher-collector USHER_EVENT=config_reload_failed | grep -c 'keeping the previous configuration')\"; \
        cp /root/collector.toml.good {SERVICE_CONFIG}"));
    let (serving, statuses) = https_status(c, port);
    checks.check(
        "a broken config is refused at reload: the old one stays and the service still serves",
        ok && has_line(&text, "state=active")
            && labelled_number(&text, "refused").is_some_and(|n| n >= 1)
            && serving,
        || format!("{text}{statuses}"),
    );
    let (_, text) = c.sh("\
        systemctl stop usher-collector; \
        systemctl show usher-collector -p Result -p ExecMainStatus -p ActiveState; \
        echo \"stopping=$(journalctl --no-pager -o cat SYSLOG_IDENTIFIER=usher-collector USHER_EVENT=service_stopping | grep -c SIGTERM)\"; \
        systemctl start usher-collector && echo started");
    checks.check(
        "systemctl stop: SIGTERM, a graceful stop, exit status 0",
        has_line(&text, "Result=success")
            && has_line(&text, "ExecMainStatus=0")
            && labelled_number(&text, "stopping").is_some_and(|n| n >= 1)
            && has_line(&text, "started"),
        || text.clone(),
    );
}

/// Both units' journals, for a failed workflow step.
fn journals(c: &Container) -> String {
    let (_, text) = c.sh("echo '--- journalctl -u usherd ---'; journalctl -u usherd --no-pager -o short-monotonic -n 80; echo '--- journalctl -u usher-collector ---'; journalctl -u usher-collector --no-pager -o short-monotonic -n 80");
    text
}

/// Records a workflow step; a failed one ends the workflow (each step needs the one
/// before), and its detail carries both units' journals.
fn step(
    c: &Container,
    checks: &mut Checks,
    what: &str,
    ok: bool,
    detail: impl FnOnce() -> String,
) -> Result<(), String> {
    checks.check(what, ok, || format!("{}\n{}", detail(), journals(c)));
    if ok {
        Ok(())
    } else {
        Err(what.to_string())
    }
}

/// A JSON document, or `Null` for anything else (the check that reads it then fails).
fn json_of(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or(serde_json::Value::Null)
}

/// A random token for the host at the service.
fn random_token() -> Result<String, String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| format!("/dev/urandom: {e}"))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// One person of the workflow: a Unix account in the container (only to run `usher` as
/// them), their identity at the service and the groups it holds.
struct Person {
    name: &'static str,
    sub: &'static str,
    groups: &'static [&'static str],
    roles: &'static [&'static str],
}

// alice is an approver too: holding the role must not let her approve her own request.
const ALICE: Person = Person {
    name: "alice",
    sub: "pkgtest-sub-alice",
    groups: &["eng", "sre-leads"],
    roles: &["requester", "approver"],
};
const BOB: Person = Person {
    name: "bob",
    sub: "pkgtest-sub-bob",
    groups: &["sre-leads"],
    roles: &["approver"],
};

/// The workflow end to end in the container, with the installed packages only: the
/// service gets `public_url`, `[roles]`, a `[[request_policy]]` (one approval from
/// `sre-leads`) and this host as an `[[agent]]`; usherd trusts the service as an issuer by
/// discovery and fetches its grants from it (`[service]`). There is no identity provider
/// in the container: alice's and bob's API tokens are minted by `usher-collector token`
/// and kept where `usher login` keeps them. alice requests, may not approve her own
/// request, bob approves, the grant reaches usherd through its feed (not `usher grant
/// install`), alice's key logs in as the granted account, and `usher revoke` ends her
/// session and her access.
fn workflow_in_container(c: &Container, ssh_port: u16, service_port: u16, checks: &mut Checks) {
    let t0 = Instant::now();
    match workflow_steps(c, ssh_port, service_port, checks) {
        Ok(()) => println!(
            "package test: the workflow took {:.0} s",
            t0.elapsed().as_secs_f64()
        ),
        Err(stopped_at) => println!("package test: the workflow stopped at: {stopped_at}"),
    }
}

fn workflow_steps(
    c: &Container,
    ssh_port: u16,
    service_port: u16,
    checks: &mut Checks,
) -> Result<(), String> {
    // The certificate's names include 127.0.0.1; the service listens there only.
    let public_url = format!("https://127.0.0.1:{service_port}");
    let service_cert = format!("/{SERVICE_CERT}");
    let (_, host) = c.sh("cat /proc/sys/kernel/hostname");
    let host = host.trim().to_string();
    let host_key = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(c.root.join("var/lib/usher/ssh_host_ed25519_key"))
        .output();
    let host_key = match host_key {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
        other => {
            return step(
                c,
                checks,
                "usherd's SSH host key is readable",
                false,
                || format!("{other:?}"),
            )
        }
    };
    let agent_token = random_token()?;

    // The service: the workflow's sections, then a restart (public_url is its issuer name).
    let service_sections = format!(
        r#"
[roles]
requester = ["eng"]
approver = ["sre-leads"]

[[request_policy]]
name = "pkgtest"
groups = ["eng"]
hosts = ["{host}"]
logins = ["jit-{{user}}"]
max_duration = "1h"
reason_required = true
approvals = 1
approver_groups = ["sre-leads"]
pending_ttl = "15m"

[[agent]]
host = "{host}"
token = "{agent_token}"
host_key = "{host_key}"
"#
    );
    std::fs::write(
        c.root.join("root/collector-workflow.toml"),
        service_sections,
    )
    .map_err(|e| e.to_string())?;
    let (ok, text) = c.sh(&format!("\
        sed -i '1i public_url = \"{public_url}\"' {SERVICE_CONFIG} && \
        cat /root/collector-workflow.toml >> {SERVICE_CONFIG} && rm /root/collector-workflow.toml && \
        systemctl restart usher-collector; {WAIT_ACTIVE}; \
        echo \"state=$(systemctl is-active usher-collector)\""));
    let discovery = Command::new("curl")
        .args(["-sS", "--max-time", "10", "--cacert"])
        .arg(c.root.join(SERVICE_CERT))
        .arg(format!("{public_url}/.well-known/openid-configuration"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let published = json_of(&discovery);
    step(
        c,
        checks,
        "workflow: the service restarts with public_url, [roles], a request policy and this host as an agent, and publishes its issuer",
        ok && has_line(&text, "state=active")
            && published["issuer"] == public_url.as_str()
            && published["jwks_uri"] == format!("{public_url}/jwks.json").as_str(),
        || format!("{text}\ndiscovery: {discovery}"),
    )?;

    // usherd: the service as an issuer (by discovery, its self-signed certificate as the
    // CA) and as its grant feed. The local issuer is listed too, as any [[issuer]] replaces
    // it: the grant signed with it earlier must keep working.
    let usherd_sections = format!(
        r#"
[[issuer]]
iss = "usher-local:{host}"
jwks = "/var/lib/usher/issuer/issuer.jwks.json"

[[issuer]]
iss = "{public_url}"
discovery = true
ca = "{service_cert}"

[service]
url = "{public_url}"
token = "{agent_token}"
ca = "{service_cert}"
wait_secs = 20
"#
    );
    {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(c.root.join("etc/usher/usherd.toml"))
            .and_then(|mut f| f.write_all(usherd_sections.as_bytes()))
            .map_err(|e| format!("usherd.toml: {e}"))?;
    }
    let (ok, text) = c.sh("systemctl restart usherd; for i in $(seq 1 50); do systemctl is-active --quiet usherd && break; sleep 0.2; done; echo \"state=$(systemctl is-active usherd)\"; usher --json grant list");
    step(
        c,
        checks,
        "workflow: usherd restarts with the service as issuer and grant feed; the local grant stays",
        ok && has_line(&text, "state=active") && text.contains("pkg@test"),
        || text.clone(),
    )?;

    // The people: an account each to run `usher` as, a sign-in file as `usher login`
    // writes it (the service's CA beside it), alice's SSH key.
    let alice_key = c.root.join("root/alice_ed25519");
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "alice@pkgtest", "-f"])
        .arg(&alice_key))?;
    let (ok, text) = c.sh(&format!("\
        useradd -m -s /bin/sh alice && useradd -m -s /bin/sh bob && \
        install -d -o alice -g alice -m 700 /home/alice/.ssh && \
        install -o alice -g alice -m 644 /root/alice_ed25519.pub /home/alice/.ssh/id_ed25519.pub && \
        for p in alice bob; do install -o $p -g $p -m 644 {service_cert} /home/$p/service-ca.pem || exit 1; done"));
    step(
        c,
        checks,
        "workflow: alice and bob have accounts to run usher as",
        ok,
        || text.clone(),
    )?;
    for person in [&ALICE, &BOB] {
        let (ok, token, err) = c.run(&format!(
            "runuser -u usher-collector -- usher-collector token --sub {} --name {} --groups {} --ttl 1h",
            person.sub,
            person.name,
            person.groups.join(",")
        ));
        let token = token.trim().to_string();
        step(
            c,
            checks,
            &format!(
                "workflow: `usher-collector token` mints {}'s API token",
                person.name
            ),
            ok && !token.is_empty() && !token.contains(char::is_whitespace),
            || format!("{token}\n{err}"),
        )?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let credentials = serde_json::json!({
            "url": public_url,
            "ca": format!("/home/{}/service-ca.pem", person.name),
            "token": token,
            "expires_at": now + 3600,
            "principal": {
                "sub": person.sub,
                "name": person.name,
                "groups": person.groups,
                "roles": person.roles,
            },
        });
        let dir = c.root.join(format!("home/{}/.config/usher", person.name));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        std::fs::write(dir.join("service.json"), credentials.to_string())
            .map_err(|e| e.to_string())?;
        let (ok, text) = c.sh(&format!(
            "chown -R {p}:{p} /home/{p}/.config && chmod 700 /home/{p}/.config/usher && chmod 600 /home/{p}/.config/usher/service.json",
            p = person.name
        ));
        step(
            c,
            checks,
            "workflow: the sign-in file is the person's, 0600",
            ok,
            || text.clone(),
        )?;
        let (ok, out, err) = usher_as(c, person, "whoami");
        let me = json_of(&out);
        step(
            c,
            checks,
            &format!(
                "workflow: `usher whoami` as {}: the service accepts the token, with the roles of [roles]",
                person.name
            ),
            ok && me["sub"] == person.sub
                && me["name"] == person.name
                && person
                    .roles
                    .iter()
                    .all(|r| me["roles"].as_array().is_some_and(|a| a.iter().any(|x| x == r))),
            || format!("{out}{err}"),
        )?;
    }

    // alice asks for access; the policy decides which login she may have.
    let ask = |login: &str| {
        usher_as(
            c,
            &ALICE,
            &format!("request --host {host} --login {login} --for 10m --reason 'package test' --ssh-key /home/alice/.ssh/id_ed25519.pub"),
        )
    };
    let (ok, out, err) = ask("jit-bob");
    step(
        c,
        checks,
        "workflow: alice may not ask for another person's login (jit-bob)",
        !ok && json_of(&out)["id"].is_null(),
        || format!("{out}{err}"),
    )?;
    let (ok, out, err) = ask("jit-alice");
    let request = json_of(&out);
    let id = request["id"].as_str().unwrap_or_default().to_string();
    step(
        c,
        checks,
        "workflow: `usher request` as alice: a pending request for jit-alice on this host, needing one approval",
        ok && !id.is_empty()
            && request["state"] == "pending"
            && request["login"] == "jit-alice"
            && request["host"] == host.as_str()
            && request["approvals_needed"] == 1,
        || format!("{out}{err}"),
    )?;
    let client = SshClient::new(&alice_key, ssh_port);
    let ssh = |cmd: &str| {
        client
            .command_within(60, "jit-alice")
            .arg(cmd)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("ssh: {e}"))
    };
    let early = ssh("id -un")?;
    step(
        c,
        checks,
        "workflow: before any approval, alice's key does not log in",
        !early.status.success(),
        || String::from_utf8_lossy(&early.stdout).into_owned(),
    )?;

    // alice may not approve her own request, approver or not.
    let (ok, out, err) = usher_as(c, &ALICE, &format!("review {id} --approve"));
    let (_, listed, list_err) = usher_as(c, &BOB, "requests --pending");
    let still = json_of(&listed)
        .as_array()
        .and_then(|all| all.iter().find(|r| r["id"] == id.as_str()).cloned())
        .unwrap_or(serde_json::Value::Null);
    step(
        c,
        checks,
        "workflow: alice's approval of her own request is refused; it stays pending, with no review",
        !ok && still["state"] == "pending"
            && still["reviews"].as_array().is_some_and(|r| r.is_empty()),
        || format!("review: {out}{err}\nrequests as bob: {listed}{list_err}"),
    )?;

    // bob approves: the grant reaches usherd through its feed.
    let (ok, out, err) = usher_as(
        c,
        &BOB,
        &format!("review {id} --approve --comment 'package test'"),
    );
    let approved = json_of(&out);
    let grant_id = approved["grant_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    step(
        c,
        checks,
        "workflow: `usher review --approve` as bob approves it, with a grant",
        ok && approved["state"] == "approved"
            && !grant_id.is_empty()
            && approved["reviews"][0]["name"] == "bob",
        || format!("{out}{err}"),
    )?;
    let feed_start = Instant::now();
    let mut fed = serde_json::Value::Null;
    let mut last = String::new();
    while feed_start.elapsed() < Duration::from_secs(30) {
        let (_, out, err) = c.run("usher --json grant list");
        if let Some(g) = json_of(&out)
            .as_array()
            .and_then(|all| all.iter().find(|g| g["jti"] == grant_id.as_str()).cloned())
        {
            fed = g;
            break;
        }
        last = format!("{out}{err}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let fed_in = feed_start.elapsed();
    step(
        c,
        checks,
        "workflow: the approved grant reaches usherd through its feed from the service",
        fed["iss"] == public_url.as_str() && fed["sub"] == ALICE.sub && fed["login"] == "jit-alice",
        || format!("after {:.1} s: {fed}\n{last}", fed_in.as_secs_f64()),
    )?;
    println!(
        "package test: info the grant reached usherd {:.1} s after the approval",
        fed_in.as_secs_f64()
    );
    let login = ssh("id -un")?;
    step(
        c,
        checks,
        "workflow: alice's key logs in over SSH as the granted account jit-alice",
        login.status.success() && String::from_utf8_lossy(&login.stdout).trim() == "jit-alice",
        || {
            format!(
                "{}{}",
                String::from_utf8_lossy(&login.stdout),
                String::from_utf8_lossy(&login.stderr)
            )
        },
    )?;

    // `usher revoke` ends a live session and the access.
    let mut live = client
        .command_within(90, "jit-alice")
        .arg("sleep 60; echo survived")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("ssh: {e}"))?;
    std::thread::sleep(Duration::from_secs(2));
    let (ok, out, err) = usher_as(
        c,
        &ALICE,
        &format!("revoke {id} --reason 'package test over'"),
    );
    let revoked = json_of(&out);
    let revoke_ok = ok && revoked["state"] == "revoked";
    let revoked_at = Instant::now();
    let mut live_ended = None;
    while revoked_at.elapsed() < Duration::from_secs(30) {
        if let Ok(Some(_)) = live.try_wait() {
            live_ended = Some(revoked_at.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    if live_ended.is_none() {
        let _ = live.kill();
    }
    let live_out = live.wait_with_output().map_err(|e| e.to_string())?;
    step(
        c,
        checks,
        "workflow: `usher revoke` as alice revokes the grant",
        revoke_ok,
        || format!("{out}{err}"),
    )?;
    step(
        c,
        checks,
        "workflow: the revocation ends alice's live session within 30 s",
        live_ended.is_some() && !String::from_utf8_lossy(&live_out.stdout).contains("survived"),
        || {
            format!(
                "ended after {live_ended:?}: {}",
                String::from_utf8_lossy(&live_out.stdout)
            )
        },
    )?;
    if let Some(after) = live_ended {
        println!(
            "package test: info the revocation ended the live session in {:.1} s",
            after.as_secs_f64()
        );
    }
    let mut gone = String::new();
    while revoked_at.elapsed() < Duration::from_secs(45) {
        let (_, out, _) = c.run(
            "usher --json grant list; getent passwd jit-alice >/dev/null && echo account-left",
        );
        gone = out;
        if !gone.contains(&grant_id) && !gone.contains("account-left") {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let again = ssh("id -un")?;
    step(
        c,
        checks,
        "workflow: after the revocation the grant and jit-alice are gone and alice's key is refused",
        !gone.contains(&grant_id) && !gone.contains("account-left") && !again.status.success(),
        || {
            format!(
                "{gone}\nssh: {}{}",
                String::from_utf8_lossy(&again.stdout),
                String::from_utf8_lossy(&again.stderr)
            )
        },
    )
}

/// `usher --json ARGS` as `person` (their account, their sign-in file): whether it
/// exited 0, its standard output and standard error.
fn usher_as(c: &Container, person: &Person, args: &str) -> (bool, String, String) {
    c.run(&format!(
        "cd /home/{p} && runuser -u {p} -- env HOME=/home/{p} usher --json {args}",
        p = person.name
    ))
}

/// An upgrade keeps the administrator's config and the certificate, and restarts the
/// service on the new binary.
fn upgrade_service(c: &Container, port: u16, checks: &mut Checks) {
    let (_, before) = c.sh(&format!("sha256sum /{SERVICE_CERT} | cut -d' ' -f1"));
    let (ok, text) = c.sh(&format!("\
        dpkg -i --force-confold /root/usher-collector-2.deb && dpkg-query -W -f='version=${{Version}}\\n' usher-collector; \
        {WAIT_ACTIVE}; echo \"state=$(systemctl is-active usher-collector)\"; \
        echo \"cert=$(sha256sum /{SERVICE_CERT} | cut -d' ' -f1)\"; \
        echo \"edited-listen=$(grep -c -F 'listen = \"127.0.0.1:{port}\"' {SERVICE_CONFIG})\""));
    let (serving, statuses) = https_status(c, port);
    checks.check(
        "service upgrade: running the new package, config and certificate kept, serving",
        ok && text
            .lines()
            .any(|l| l.starts_with("version=") && l.ends_with("-2"))
            && has_line(&text, "state=active")
            && has_line(&text, &format!("cert={}", before.trim()))
            && labelled_number(&text, "edited-listen") == Some(1)
            && serving,
        || format!("{text}{statuses}"),
    );
}

/// Removing usherd leaves the service alone (its config in the shared /etc/usher too);
/// removing the service stops it; purging takes its state and config.
fn remove_service(c: &Container, checks: &mut Checks) {
    let (_, text) = c.sh(&format!("echo \"state=$(systemctl is-active usher-collector)\"; test -f {SERVICE_CONFIG} && echo config-kept"));
    checks.check(
        "purging usherd's package leaves the service running and its config in place",
        has_line(&text, "state=active") && has_line(&text, "config-kept"),
        || text.clone(),
    );
    let (ok, text) = c.sh("dpkg -r usher-collector; echo \"state=$(systemctl is-active usher-collector)\"; test -d /var/lib/usher-collector && echo state-kept");
    checks.check(
        "dpkg -r stops the service and keeps its state",
        ok && text.lines().any(|l| l.starts_with("state="))
            && !has_line(&text, "state=active")
            && has_line(&text, "state-kept"),
        || text.clone(),
    );
    let (_, text) = c.sh("dpkg -P usher-collector; test -e /var/lib/usher-collector && echo state-left; test -e /etc/usher && echo config-left; echo done");
    checks.check(
        "purging the service removes its state and the last of /etc/usher",
        !text.contains("state-left") && !text.contains("config-left"),
        || text.clone(),
    );
}
