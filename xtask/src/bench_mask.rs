//! `cargo xtask bench mask`: inline masking's cost (issue 13), relay throughput and echo
//! latency with masking on and off. The measuring program is tests/src/bin/bench_mask.rs
//! (it drives usherd through the tests' harness); this builds the release binaries and runs
//! it against them, as `bench jit` does.

pub fn run() -> Result<(), String> {
    crate::bench_in_tests_crate("bench_mask")
}
