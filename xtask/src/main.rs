//! `cargo xtask`: set-up, eBPF build, running the agent, tests and benchmarks.

#![deny(unsafe_code)]

mod bench_exec;
mod bench_flood;
mod bench_mask;
mod bench_ship;
mod bench_ssh;
mod ebpf;
mod package;
mod package_test;
mod setup;
mod util;

use std::process::ExitCode;

const USAGE: &str = "usage: cargo xtask <command>
  setup          install what a fresh Debian machine lacks (idempotent)
  build-ebpf     build the eBPF programs
  run            set up, build and run usherd here with the built-in defaults
  test           build the binaries and run every test (as root)
  lint           rustfmt --check and clippy -D warnings, on the workspace and agent-rdp
  package        build the .deb and .rpm into target/package
  test-package   install, use, reload, upgrade and remove the .deb on a booted systemd
  bench ssh      usherd vs OpenSSH sshd: throughput, set-up latency, memory
  bench exec     exec overhead: no agent, usherd's eBPF, auditd
  bench ship     collector ingest from N agents; CPU of shipping vs recording
  bench flood    one session floods: server memory, others' set-up time, spool limit
  bench jit      request to usable grant, revoke to session end, token exchanges/s
  bench rdp      usherd vs xrdp: connect to first frame, frame rate and CPU, idle CPU, memory
  bench mask     inline masking on vs off: relay throughput, echo latency per keystroke";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::all(),
        Some("build-ebpf") => ebpf::build_ebpf(),
        Some("run") => setup::all().and_then(|()| setup::run_agent(&args[1..])),
        Some("test") => setup::test(&args[1..]),
        Some("lint") => lint(),
        Some("package") => package::run_package(),
        Some("test-package") => package_test::run_test(),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("ssh") => bench_ssh::run(),
            Some("exec") => ebpf::bench_exec(),
            Some("ship") => bench_ship::run(),
            Some("flood") => bench_flood::run(),
            Some("jit") => bench_in_tests_crate("bench_jit"),
            Some("rdp") => bench_rdp(),
            Some("mask") => bench_mask::run(),
            other => Err(format!(
                "unknown benchmark {other:?}; try: ssh, exec, ship, flood, jit, rdp, mask"
            )),
        },
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `bench jit` and `bench rdp` are programs of the tests' crate (they drive usherd through
/// the tests' harness): the release binaries, then that program, run against them.
fn bench_in_tests_crate(program: &str) -> Result<(), String> {
    if !util::is_root() {
        return Err("the benchmark runs as root".into());
    }
    util::build_binaries(util::Profile::Release)?;
    util::run(
        util::cargo()
            .args(["run", "--release", "-p", "usher-tests", "--bin", program])
            .env("USHER_BIN_DIR", util::release_dir()),
    )
}

/// What `bench rdp` runs: both servers' desktops, the client, and xrdp itself.
const RDP_BENCH_PACKAGES: &[&str] = &[
    "xvfb",
    "xterm",
    "openbox",
    "x11-utils",
    "x11-xserver-utils",
    "xdotool",
    "freerdp2-x11",
    "xrdp",
    "xorgxrdp",
];

/// `bench rdp`: usherd next to Debian's xrdp (tests/src/bin/bench_rdp.rs), which starts
/// its own xrdp from a scratch config (`ensure_packages` switches off the system xrdp that
/// Debian's package starts on install).
fn bench_rdp() -> Result<(), String> {
    if !util::is_root() {
        return Err("the benchmark runs as root".into());
    }
    setup::ensure_packages(RDP_BENCH_PACKAGES)?;
    bench_in_tests_crate("bench_rdp")
}

/// rustfmt and clippy over both cargo workspaces: the main one and the RDP worker's
/// (agent-rdp/, its own lock), which `--workspace` does not reach.
fn lint() -> Result<(), String> {
    let rdp = ["--manifest-path", "agent-rdp/Cargo.toml"];
    util::run(util::cargo().args(["fmt", "--all", "--check"]))?;
    util::run(util::cargo().args(["fmt", "--check"]).args(rdp))?;
    util::run(util::cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    util::run(
        util::cargo()
            .arg("clippy")
            .args(rdp)
            .arg("--target-dir")
            .arg(util::target_dir())
            .args(["--all-targets", "--", "-D", "warnings"]),
    )
}
