//! Bringing a fresh machine to where Usher builds, runs and is tested.

use crate::util::{
    build_binaries, cargo, debug_dir, is_root, release_dir, run, target_dir, workspace_root,
    Profile,
};
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
    "chromium",
    "chromium-driver",
    "curl",
    "openssl",
    // The accounts tests drive the host's own schedulers (cron.deny, at.deny, job removal).
    "cron",
    "at",
    // The service's PostgreSQL tests start a server of their own in a scratch directory
    // (from /usr/lib/postgresql/<version>/bin).
    "postgresql",
    // RDP: the desktop usherd starts for a session (an X server, the default desktop's
    // window manager and terminal, and `xsetroot` the tests paint the root with); the
    // client the tests drive on an X server of its own, typed into with xdotool and
    // photographed with xwd (x11-apps), xdpyinfo (x11-utils); ffmpeg exports recordings
    // to video; xrdp is the benchmark's point of comparison.
    "xvfb",
    "xauth",
    "openbox",
    "xterm",
    "x11-xserver-utils",
    "freerdp2-x11",
    "xdotool",
    "x11-apps",
    "x11-utils",
    "ffmpeg",
    "xrdp",
];

pub fn all() -> Result<(), String> {
    packages()?;
    crate::ebpf::setup()?;
    player_assets()?;
    oidc_provider()?;
    moto()
}

/// Whether `sh -c script` succeeds.
fn shell_succeeds(script: &str) -> bool {
    Command::new("sh")
        .args(["-c", script])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// moto's S3-compatible server (PyPI), for the collector's S3 tests.
pub fn moto() -> Result<(), String> {
    if shell_succeeds("command -v moto_server") {
        return Ok(());
    }
    // pip may come from elsewhere than Debian's packages; it only has to run.
    if !shell_succeeds("python3 -m pip --version") {
        ensure_packages(&["python3-pip"])?;
    }
    let pip_install = || {
        let mut c = Command::new("python3");
        c.args(["-m", "pip", "install", "--quiet", "moto[server]"]);
        c
    };
    // Debian 12's own Python refuses pip into the system (PEP 668) unless told otherwise.
    run(&mut pip_install()).or_else(|_| run(pip_install().arg("--break-system-packages")))
}

/// asciinema-player (from the npm registry) for the collector's replay page, in
/// target/web-assets; the collector serves it from there (`assets_dir`).
pub fn player_assets() -> Result<(), String> {
    let dest = workspace_root().join("target/web-assets");
    if ["asciinema-player.min.js", "asciinema-player.css"]
        .iter()
        .all(|f| dest.join(f).exists())
    {
        return Ok(());
    }
    // Node may come from elsewhere than Debian's packages; it only has to run.
    if Command::new("npm").arg("--version").output().is_err() {
        ensure_packages(&["nodejs", "npm"])?;
    }
    let npm_dir = workspace_root().join("target/npm");
    std::fs::create_dir_all(&npm_dir).map_err(|e| e.to_string())?;
    run(Command::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&npm_dir)
        .arg("asciinema-player@3"))?;
    let bundle = npm_dir.join("node_modules/asciinema-player/dist/bundle");
    std::fs::create_dir_all(&dest).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(&bundle)
        .map_err(|e| format!("{}: {e}", bundle.display()))?
        .flatten()
    {
        std::fs::copy(entry.path(), dest.join(entry.file_name())).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The npm `oidc-provider` package, at the version tests/support/oidc pins (package.json and
/// its lock), in `<target dir>/oidc-provider/node_modules`: the OpenID provider the tests
/// run (tests/support/src/oidc.rs looks for it there). The target dir is `CARGO_TARGET_DIR`
/// when set, so worktrees sharing one find one copy.
pub fn oidc_provider() -> Result<(), String> {
    let pinned = workspace_root().join("tests/support/oidc");
    let dest = target_dir().join("oidc-provider");
    let lock = std::fs::read(pinned.join("package-lock.json"))
        .map_err(|e| format!("{}: {e}", pinned.display()))?;
    let installed_lock = std::fs::read(dest.join("package-lock.json")).ok();
    if installed_lock.as_deref() == Some(&lock[..])
        && dest
            .join("node_modules/oidc-provider/package.json")
            .exists()
    {
        return Ok(());
    }
    if Command::new("npm").arg("--version").output().is_err() {
        ensure_packages(&["nodejs", "npm"])?;
    }
    std::fs::create_dir_all(&dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    for file in ["package.json", "package-lock.json"] {
        std::fs::copy(pinned.join(file), dest.join(file))
            .map_err(|e| format!("{file} to {}: {e}", dest.display()))?;
    }
    run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--silent", "--prefix"])
        .arg(&dest))
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
    // Debian starts sshd and xrdp (with xrdp-sesman on 3350) on install; the benchmarks run
    // their own, so leave the ports free.
    let _ = Command::new("sh")
        .args([
            "-c",
            "command -v systemctl >/dev/null || exit 0; \
             for unit in ssh xrdp xrdp-sesman; do systemctl disable --now $unit 2>/dev/null; done; true",
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
    build_binaries(Profile::Release)?;
    let bin = release_dir();
    eprintln!(
        "\nusherd is starting. In another terminal, give yourself a 1-hour grant and log in:\n\
         \n  sudo {b}/usher grant sign --local --sub \"$USER\" --login jit-$USER --ssh-key ~/.ssh/id_ed25519.pub \\\n      | sudo {b}/usher grant install -\
         \n  ssh -p 2222 jit-$USER@localhost\n",
        b = bin.display()
    );
    run(Command::new(bin.join("usherd")).args(extra))
}

/// Builds the binaries the end-to-end tests drive (usher-rdp too), runs every test, then
/// the packages on a booted systemd (skipped with USHER_SKIP_PACKAGE_TEST=1).
pub fn test(extra: &[String]) -> Result<(), String> {
    build_binaries(Profile::Debug)?;
    // The tests find the binaries through USHER_BIN_DIR (tests/support's `built_binary`):
    // the same directory the build above wrote, `CARGO_TARGET_DIR` or not.
    run(cargo()
        .args(["test", "--workspace"])
        .args(extra)
        .env("USHER_BIN_DIR", debug_dir()))?;
    // The RDP worker's own tests (a real Xvfb and xfreerdp), in its own workspace.
    run(cargo()
        .args([
            "test",
            "--manifest-path",
            "agent-rdp/Cargo.toml",
            "--target-dir",
        ])
        .arg(target_dir())
        .args(extra))?;
    if std::env::var_os("USHER_SKIP_PACKAGE_TEST").is_some() {
        eprintln!("xtask: package test skipped (USHER_SKIP_PACKAGE_TEST)");
        return Ok(());
    }
    crate::package_test::run_test()
}
