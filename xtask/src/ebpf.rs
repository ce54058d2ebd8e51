//! The eBPF toolchain (nightly rust-src, bpf-linker against the nightly's own LLVM), the
//! programs' build, and the exec benchmark.

use crate::util::run;
use std::path::PathBuf;
use std::process::Command;

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cargo")
        });
    home.join("bin").join(name)
}

/// Installs what building the programs needs; does nothing when it is there.
pub fn setup() -> Result<(), String> {
    let has_nightly = output(Command::new("rustup").args(["toolchain", "list"]))
        .map(|l| l.lines().any(|t| t.starts_with("nightly")))
        .unwrap_or(false);
    if !has_nightly {
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))
    .unwrap_or_default();
    if !components.lines().any(|c| c.starts_with("rust-src")) {
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let linker = cargo_bin("bpf-linker");
    if linker.exists() {
        return Ok(());
    }
    // bpf-linker links against an LLVM; the nightly toolchain ships one (libLLVM-*.so)
    // but without the unversioned name the build looks for.
    let sysroot = PathBuf::from(
        output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))
            .ok_or("no nightly sysroot")?,
    );
    let lib = sysroot.join("lib");
    let llvm = std::fs::read_dir(&lib)
        .map_err(|e| format!("{}: {e}", lib.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("libLLVM") && n.contains(".so"))
        .min_by_key(|n| n.len())
        .ok_or("the nightly toolchain has no libLLVM")?;
    let major = llvm
        .trim_start_matches("libLLVM")
        .trim_start_matches(['-', '.'])
        .trim_start_matches("so.")
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap_or("")
        .to_string();
    let link = lib.join("libLLVM.so");
    if !link.exists() {
        std::os::unix::fs::symlink(&llvm, &link).map_err(|e| format!("{}: {e}", link.display()))?;
    }
    eprintln!("xtask: installing bpf-linker against the nightly's LLVM {major} ({llvm})");
    run(Command::new("cargo")
        .args([
            "+nightly",
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
        ])
        .arg(format!("llvm-{major}"))
        .env("LLVM_PREFIX", &sysroot))
}

/// Builds the programs the way every agent build does (agent/build.rs, with aya-build) and
/// prints where the object is.
pub fn build_ebpf() -> Result<(), String> {
    setup()?;
    let out = crate::util::cargo()
        .args([
            "build",
            "--release",
            "--package",
            "usher-agent",
            "--message-format=json",
        ])
        .stderr(std::process::Stdio::inherit())
        .output()
        .map_err(|e| format!("cargo: {e}"))?;
    if !out.status.success() {
        return Err(format!("building the agent failed: {}", out.status));
    }
    // The object is in the agent's build-script OUT_DIR, which only cargo knows.
    let out_dir = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["reason"] == "build-script-executed")
        .filter(|m| {
            m["package_id"]
                .as_str()
                .is_some_and(|id| id.contains("#usher-agent@") || id.starts_with("usher-agent "))
        })
        .find_map(|m| m["out_dir"].as_str().map(PathBuf::from))
        .ok_or("cargo did not report the agent's build script")?;
    println!("{}", out_dir.join("usher-ebpf").display());
    Ok(())
}

pub fn bench_exec() -> Result<(), String> {
    crate::bench_exec::run()
}
