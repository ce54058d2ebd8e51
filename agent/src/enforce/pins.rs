//! The programs' state in bpffs: one directory per agent instance, named from its state
//! directory (two agents on one host, as the tests run them, never share one), holding the
//! pinned maps and links. A pinned link keeps its program attached with no process holding
//! it, so enforcement does not pause while the agent restarts; only removing the directory
//! (`usherd --remove-accounts`, the package's removal) detaches the programs.

use aya::programs::links::{FdLink, PinnedLink};
use sha2::{Digest, Sha256};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

const BPFFS: &str = "/sys/fs/bpf";
/// bpffs's magic number (statfs f_type).
const BPF_FS_MAGIC: libc::__fsword_t = 0xcafe4a11;

/// Where the agent whose state lives in `state_dir` pins its programs.
pub fn pin_dir(state_dir: &Path) -> PathBuf {
    let digest = Sha256::digest(state_dir.as_os_str().as_bytes());
    Path::new(BPFFS)
        .join("usher")
        .join(hex::encode(&digest[..8]))
}

/// Detaches the programs of the agent whose state lives in `state_dir` and frees its maps
/// (their pins are the last references once no agent runs). True if there was anything.
pub fn unpin(state_dir: &Path) -> io::Result<bool> {
    remove(&pin_dir(state_dir))
}

pub(super) fn remove(dir: &Path) -> io::Result<bool> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            log::info!(target: "usher::enforce", "unpinned the programs and maps in {}", dir.display());
            Ok(true)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// Mounts bpffs if the host has not, and makes the instance's directory (root only).
pub(super) fn prepare(dir: &Path) -> Result<(), String> {
    let root = Path::new(BPFFS);
    if !is_bpffs(root) {
        nix::mount::mount(
            Some("bpf"),
            root,
            Some("bpf"),
            nix::mount::MsFlags::MS_NOSUID
                | nix::mount::MsFlags::MS_NODEV
                | nix::mount::MsFlags::MS_NOEXEC,
            Some("mode=0700"),
        )
        .map_err(|e| format!("cannot mount bpffs at {BPFFS}: {e}"))?;
        log::info!(target: "usher::enforce", "mounted bpffs at {BPFFS}");
    }
    for d in [dir.parent().unwrap_or(root), dir] {
        match std::fs::create_dir(d) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(format!("{}: {e}", d.display())),
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("{}: {e}", d.display()))?;
    }
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    nix::sys::statfs::statfs(path)
        .map(|s| s.filesystem_type().0 == BPF_FS_MAGIC)
        .unwrap_or(false)
}

/// Whether a previous agent left attached programs here.
pub(super) fn holds_links(dir: &Path) -> bool {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("link-"))
        })
        .unwrap_or(false)
}

/// The pin of a map, named for the layout of the types the programs and the agent share:
/// an agent built with other types never reads a map laid out for these.
pub(super) fn map_path(dir: &Path, name: &str) -> PathBuf {
    use usher_ebpf_common::{ExecEvent, Offsets, RuleKey, SessionPolicy};
    let layout = [
        std::mem::size_of::<ExecEvent>(),
        std::mem::size_of::<Offsets>(),
        std::mem::size_of::<RuleKey>(),
        std::mem::size_of::<SessionPolicy>(),
    ]
    .map(|n| n.to_string())
    .join("-");
    dir.join(format!("map-{name}-{layout}"))
}

/// Unpins maps other than `current` (of an older layout); their programs' links are
/// replaced by this agent's, and the kernel frees them once nothing refers to them.
pub(super) fn remove_other_maps(dir: &Path, current: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let is_map = entry.file_name().to_string_lossy().starts_with("map-");
        if is_map && !current.contains(&path.as_path()) {
            log::info!(target: "usher::enforce", "unpinning {} (another layout)", path.display());
            let _ = std::fs::remove_file(&path);
        }
    }
}

fn link_path(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link-{program}"))
}

/// Pins `link` as the program's link, in place of a previous agent's: the new program is
/// attached already, and the rename drops the old pin (and with it the old attachment) in
/// one step, so the hook is never empty.
pub(super) fn replace_link(dir: &Path, program: &str, link: FdLink) -> Result<PinnedLink, String> {
    let path = link_path(dir, program);
    let fresh = dir.join(format!("new-{program}"));
    let _ = std::fs::remove_file(&fresh);
    let pinned = link
        .pin(&fresh)
        .map_err(|e| format!("pinning the {program} link: {e}"))?;
    std::fs::rename(&fresh, &path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(pinned)
}

/// Detaches whatever is pinned for `program` (a hook this kernel no longer offers).
pub(super) fn remove_link(dir: &Path, program: &str) {
    let _ = std::fs::remove_file(link_path(dir, program));
}
