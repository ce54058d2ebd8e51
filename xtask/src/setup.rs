//! Bringing a fresh machine to where Usher builds, runs and is tested.

use crate::util::{cargo, is_root, run, workspace_root};
use std::process::Command;

/// Debian packages the agent, its tests and its benchmarks use.
const PACKAGES: &[&str] = &[
    "openssh-client",
    "openssh-server",
    "openssh-sftp-server",
    "sshpass",
    "asciinema",
    "python3",
    "util-linux",
    "passwd",
    "procps",
    "login",
    "debootstrap",
    "systemd-container",
    "rpm",
];

pub fn all() -> Result<(), String> {
    packages()?;
    crate::ebpf::setup()
}

fn installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

pub fn packages() -> Result<(), String> {
    ensure_packages(PACKAGES)
}

/// Installs whichever of `wanted` is missing (apt), and nothing when all are there.
pub fn ensure_packages(wanted: &[&str]) -> Result<(), String> {
    let missing: Vec<&str> = wanted.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        return Err(format!(
            "missing packages {missing:?}: run as root to install them"
        ));
    }
    eprintln!("xtask: installing {missing:?}");
    run(Command::new("apt-get").arg("update").arg("-qq"))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Debian starts sshd on install; the benchmark runs its own, so leave the port free.
    let _ = Command::new("sh")
        .args([
            "-c",
            "command -v systemctl >/dev/null && systemctl disable --now ssh 2>/dev/null; true",
        ])
        .status();
    Ok(())
}

/// Builds and runs `usherd` in the foreground with the built-in defaults: a local issuer
/// key in /var/lib/usher, SSH on port 2222, recordings in /var/spool/usher.
pub fn run_agent(extra: &[String]) -> Result<(), String> {
    if !is_root() {
        return Err("usherd runs as root: sudo cargo xtask run".into());
    }
    run(cargo().args(["build", "--release", "--bins"]))?;
    let bin = workspace_root().join("target/release");
    eprintln!(
        "\nusherd is starting. In another terminal, give yourself a 1-hour grant and log in:\n\
         \n  sudo {b}/usher grant sign --local --sub \"$USER\" --login jit-$USER --ssh-key ~/.ssh/id_ed25519.pub \\\n      | sudo {b}/usher grant install -\
         \n  ssh -p 2222 jit-$USER@localhost\n",
        b = bin.display()
    );
    run(Command::new(bin.join("usherd")).args(extra))
}

/// Builds the binaries the end-to-end tests drive, runs every test, then the packages on
/// a booted systemd (skipped with USHER_SKIP_PACKAGE_TEST=1).
pub fn test(extra: &[String]) -> Result<(), String> {
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    run(cargo().args(["test", "--workspace"]).args(extra))?;
    if std::env::var_os("USHER_SKIP_PACKAGE_TEST").is_some() {
        eprintln!("xtask: package test skipped (USHER_SKIP_PACKAGE_TEST)");
        return Ok(());
    }
    crate::package_test::run_test()
}
