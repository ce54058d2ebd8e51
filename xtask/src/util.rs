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
