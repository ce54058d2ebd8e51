//! Setting up the eBPF toolchain, building the programs, and the exec benchmark.

pub fn setup() -> Result<(), String> {
    Ok(())
}

pub fn build_ebpf() -> Result<(), String> {
    Err("not yet".into())
}

pub fn bench_exec() -> Result<(), String> {
    Err("not yet".into())
}
