use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

/// Runs a command to completion; an error names the command.
pub fn run(cmd: &mut Command) -> Result<(), String> {
    let status = cmd
        .status()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?} failed: {status}"))
    }
}

pub fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(workspace_root());
    c
}

pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A benchmark's size or count times `USHER_BENCH_SCALE` (default 1, at least 1): a run
/// with a small scale (e.g. 0.01) proves the benchmark works, not what it measures.
pub fn bench_scaled(n: u64) -> u64 {
    let scale = std::env::var("USHER_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0);
    ((n as f64 * scale) as u64).max(1)
}

/// Whether `USHER_BENCH_SCALE` shrinks this run (its figures are then only a smoke test).
pub fn bench_scale_note() -> &'static str {
    match std::env::var("USHER_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
    {
        Some(s) if s != 1.0 => " [USHER_BENCH_SCALE set: a smoke test, not a measurement]",
        _ => "",
    }
}

/// Where cargo builds: `CARGO_TARGET_DIR` when set (relative to the workspace), else target/.
pub fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from) {
        Some(dir) if dir.is_absolute() => dir,
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

/// Where `cargo build --release` puts the binaries.
pub fn release_dir() -> PathBuf {
    target_dir().join("release")
}

/// Where `cargo build` (the dev profile) puts the binaries.
pub fn debug_dir() -> PathBuf {
    target_dir().join("debug")
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    Debug,
    Release,
}

/// The main workspace's binaries (`cargo build --bins`) and the RDP worker `usher-rdp`,
/// in one profile and one target directory, so that `usher-rdp` sits next to `usherd` (where
/// usherd looks for it). The worker is its own cargo workspace (agent-rdp/, its own lock:
/// ironrdp's crypto pins do not build next to russh), so it is a second cargo call.
pub fn build_binaries(profile: Profile) -> Result<(), String> {
    let release: &[&str] = match profile {
        Profile::Debug => &[],
        Profile::Release => &["--release"],
    };
    run(cargo()
        .args(["build", "--workspace", "--bins"])
        .args(release))?;
    build_rdp_worker(profile)
}

/// `usher-rdp` alone (see [`build_binaries`]), into the main workspace's target directory.
pub fn build_rdp_worker(profile: Profile) -> Result<(), String> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--manifest-path",
        "agent-rdp/Cargo.toml",
        "--target-dir",
    ])
    .arg(target_dir());
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    run(&mut cmd)
}

/// Runs `sign` (an `usher grant sign ...`) and installs the grant it prints with `usher`
/// through the agent's `control_socket`.
pub fn install_signed_grant(
    sign: &mut Command,
    usher: &Path,
    control_socket: &Path,
) -> Result<(), String> {
    let signed = sign
        .output()
        .map_err(|e| format!("{:?}: {e}", sign.get_program()))?;
    if !signed.status.success() {
        return Err(format!(
            "{sign:?} failed: {}",
            String::from_utf8_lossy(&signed.stderr).trim()
        ));
    }
    run(Command::new(usher)
        .arg("--socket")
        .arg(control_socket)
        .args([
            "grant",
            "install",
            String::from_utf8_lossy(&signed.stdout).trim(),
        ])
        .stdout(Stdio::null()))
}
