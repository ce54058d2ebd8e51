//! Linking the programs runs `bpf-linker`, a binary cargo does not know about. Naming it
//! here makes cargo rebuild this crate (and, through the build-dependency, the agent's
//! embedded programs) when it is reinstalled, as the aya template does.
//! Without it on PATH (an agent built with `USHER_NO_EBPF=1`) nothing is named, and a
//! later install is noticed through PATH.

fn main() {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("bpf-linker"))
            .find(|candidate| candidate.is_file())
    });
    match found {
        Some(linker) => println!("cargo:rerun-if-changed={}", linker.display()),
        None => println!("cargo:rerun-if-env-changed=PATH"),
    }
}
