//! Builds the eBPF programs (`agent-ebpf/programs`, a build-dependency) for the kernel the
//! way the aya template does: aya-build runs nightly cargo with build-std and bpf-linker,
//! and leaves the object in OUT_DIR, where `enforce` embeds it (the release binary needs no
//! file beside it). `cargo xtask setup` installs the toolchain.
//!
//! What makes the programs stale, and re-runs this script: their sources (the
//! build-dependency, and aya-build's watch on their directory), bpf-linker (the programs'
//! own build script watches it), and the nightly toolchain (watched here).
//!
//! With `USHER_NO_EBPF=1` the agent is built without the programs (it then reports
//! enforcement as unavailable) and needs neither nightly nor bpf-linker.

use std::path::PathBuf;
use std::process::Command;

/// The package and binary target aya-build builds; the object is `OUT_DIR/<this name>`.
const PROGRAMS: &str = "usher-ebpf";
/// The toolchain aya-build runs (through `rustup run`), the one `cargo xtask setup` installs.
const TOOLCHAIN: &str = "nightly";

fn main() {
    println!("cargo:rerun-if-env-changed=USHER_NO_EBPF");
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    if std::env::var_os("USHER_NO_EBPF").is_some() {
        std::fs::write(out_dir.join(PROGRAMS), b"").expect("OUT_DIR is writable");
        return;
    }
    watch_toolchain();
    let manifest_dir =
        PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let programs_dir = manifest_dir.join("../agent-ebpf/programs");
    let programs_dir = programs_dir
        .to_str()
        .expect("the source tree has a UTF-8 path");
    let package = aya_build::Package {
        name: PROGRAMS,
        root_dir: programs_dir,
        // The binary target requires it (see agent-ebpf/programs/Cargo.toml).
        features: &["kernel"],
        ..Default::default()
    };
    // aya-build turns every line the inner cargo prints into a cargo warning (replayed on
    // each build): keep only what the compiler says.
    std::env::set_var("CARGO_TERM_QUIET", "true");
    if let Err(e) = aya_build::build_ebpf([package], aya_build::Toolchain::Custom(TOOLCHAIN)) {
        panic!(
            "building the eBPF programs failed: {e:#}\nRun `cargo xtask setup` (nightly with \
             rust-src, and bpf-linker), or build with USHER_NO_EBPF=1 for an agent without them."
        );
    }
}

/// The inner cargo rebuilds for a new compiler by itself, but only runs when this script
/// does: a change of the nightly toolchain (an update replaces its `rustc`) must re-run it.
fn watch_toolchain() {
    let rustc = Command::new("rustup")
        .args(["which", "--toolchain", TOOLCHAIN, "rustc"])
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    match rustc {
        Some(path) if !path.is_empty() => println!("cargo:rerun-if-changed={path}"),
        // No rustup (aya-build then uses the current toolchain) or no nightly yet (the build
        // fails below and re-runs next time): nothing to watch.
        _ => {}
    }
}
