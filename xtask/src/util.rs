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

/// Where `cargo build --release` puts the binaries (`CARGO_TARGET_DIR` when set).
pub fn release_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|dir| {
            if dir.is_relative() {
                workspace_root().join(dir)
            } else {
                dir
            }
        })
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("release")
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
