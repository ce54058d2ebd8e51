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
    workflow_in_container(&c, &mut checks);

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

/// The workflow end to end in the container: alice requests, bob approves on the page,
/// alice logs in with her key.
///
/// NOT YET: this needs the pieces other branches of issue 11 build (the service's OIDC
/// sign-in and request API, `usher login`/`usher request`, usherd's `[[issuer]] discovery =
/// true` and its grant feed from the service), and an OpenID provider in the container.
/// The integrator fills it in: install `oidc-provider` (npm) in the container or run it on
/// the host's loopback (the network is shared), configure `[oidc]`, `[roles]`,
/// `[[request_policy]]` and an `[[agent]]` in /etc/usher/collector.toml and
/// `[[issuer]] iss = public_url, discovery = true, ca = /var/lib/usher-collector/tls/cert.pem`
/// plus `[collector]` in usherd.toml, `systemctl reload` both, then: `usher login`, `usher
/// request --host … --login jit-alice --for 10m --reason pkgtest`, approve as bob through
/// `POST /api/v1/requests/{id}/review`, and `ssh jit-alice@…` with alice's key: the grant
/// must have come through the agent's feed, not `usher grant install`.
fn workflow_in_container(_c: &Container, _checks: &mut Checks) {
    println!(
        "package test: SKIP the workflow (request, approve, log in): not built on this branch yet"
    );
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
