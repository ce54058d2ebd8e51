//! `cargo xtask`: set-up, eBPF build, running the agent, tests and benchmarks.

#![deny(unsafe_code)]

mod bench_exec;
mod bench_flood;
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
  package        build the .deb and .rpm into target/package
  test-package   install, use, reload, upgrade and remove the .deb on a booted systemd
  bench ssh      usherd vs OpenSSH sshd: throughput, set-up latency, memory
  bench exec     exec overhead: no agent, usherd's eBPF, auditd
  bench ship     collector ingest from N agents; CPU of shipping vs recording
  bench flood    one session floods: server memory, others' set-up time, spool limit
  bench jit      request to usable grant, revoke to session end, token exchanges/s";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => setup::all(),
        Some("build-ebpf") => ebpf::build_ebpf(),
        Some("run") => setup::all().and_then(|()| setup::run_agent(&args[1..])),
        Some("test") => setup::test(&args[1..]),
        Some("package") => package::run_package(),
        Some("test-package") => package_test::run_test(),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("ssh") => bench_ssh::run(),
            Some("exec") => ebpf::bench_exec(),
            Some("ship") => bench_ship::run(),
            Some("flood") => bench_flood::run(),
            Some("jit") => bench_jit(),
            other => Err(format!(
                "unknown benchmark {other:?}; try: ssh, exec, ship, flood, jit"
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

/// `bench jit` is a program of the tests' crate (it drives usherd through the tests'
/// harness): the release binaries, then that program, run against them.
fn bench_jit() -> Result<(), String> {
    if !util::is_root() {
        return Err("the benchmark runs as root".into());
    }
    util::run(util::cargo().args(["build", "--release", "--bins"]))?;
    util::run(
        util::cargo()
            .args([
                "run",
                "--release",
                "-p",
                "usher-tests",
                "--bin",
                "bench_jit",
            ])
            .env("USHER_BIN_DIR", util::release_dir()),
    )
}
