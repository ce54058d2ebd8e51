//! `cargo xtask`: set-up, eBPF build, tests and benchmarks.

mod ebpf;

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("setup") => ebpf::setup(),
        Some("build-ebpf") => ebpf::build_ebpf(),
        Some("bench") => match args.get(1).map(String::as_str) {
            Some("exec") => ebpf::bench_exec(),
            other => Err(format!("unknown benchmark {other:?}; try: exec")),
        },
        _ => Err("usage: cargo xtask <setup|build-ebpf|test|bench NAME>".to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}
