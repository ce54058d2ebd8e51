//! Builds the eBPF programs (agent-ebpf/programs) with nightly Rust and bpf-linker and puts
//! the object where `enforce` embeds it, so the release binary needs no file beside it.
//! `cargo xtask setup` installs the toolchain. With `USHER_NO_EBPF=1` the agent is built
//! without the programs (it then reports enforcement as unavailable).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("usher-ebpf.o");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let programs = manifest.join("../agent-ebpf/programs");
    for p in [
        "src",
        "Cargo.toml",
        "Cargo.lock",
        ".cargo/config.toml",
        "../src",
        "../Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", programs.join(p).display());
    }
    println!("cargo:rerun-if-env-changed=USHER_NO_EBPF");
    if std::env::var_os("USHER_NO_EBPF").is_some() {
        std::fs::write(&out, b"").unwrap();
        return;
    }
    // A clean environment: the outer cargo's settings (target, flags, wrappers) are for
    // the host build, not for this one.
    let mut cmd = Command::new("cargo");
    cmd.env_clear();
    for var in [
        "PATH",
        "HOME",
        "RUSTUP_HOME",
        "CARGO_HOME",
        "RUSTUP_TOOLCHAIN_DIR",
    ] {
        if let Some(v) = std::env::var_os(var) {
            cmd.env(var, v);
        }
    }
    let status = cmd
        .args(["+nightly", "build", "--release", "--quiet"])
        .current_dir(&programs)
        .status();
    let built = programs.join("target/bpfel-unknown-none/release/usher-ebpf");
    match status {
        Ok(s) if s.success() => {
            std::fs::copy(&built, &out).unwrap();
        }
        other => panic!(
            "building the eBPF programs failed ({other:?}). Run `cargo xtask setup` (nightly \
             rust-src and bpf-linker), or build with USHER_NO_EBPF=1 for an agent without them."
        ),
    }
}
