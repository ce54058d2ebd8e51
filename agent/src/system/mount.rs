//! A session's own mount namespace, with the places its user can write to bound onto
//! themselves and remounted noexec and nosuid. What to confine is decided in
//! `enforce::confine`; this is how, between fork and exec.

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
#[error("a NUL byte in the path {0:?}")]
pub struct NulInPath(pub PathBuf);

/// The places to make noexec, as the system calls take them, made before the fork: the
/// child allocates nothing.
pub struct NoexecMounts {
    /// Each bound onto itself and remounted, in this order (parents before children: a
    /// child's bind is made inside its parent's copy).
    places: Vec<CString>,
}

impl NoexecMounts {
    pub fn new(places: &[PathBuf]) -> Result<NoexecMounts, NulInPath> {
        let places = places
            .iter()
            .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(|_| NulInPath(p.clone())))
            .collect::<Result<_, _>>()?;
        Ok(NoexecMounts { places })
    }

    pub fn places(&self) -> impl Iterator<Item = &Path> {
        self.places
            .iter()
            .map(|c| Path::new(OsStr::from_bytes(c.as_bytes())))
    }

    /// In the forked child, still root: a mount namespace of its own, whose changes never
    /// reach the host (everything slave), with every place noexec (and nosuid). System
    /// calls only, on memory prepared before the fork.
    pub(super) fn enter(&self) -> io::Result<()> {
        unshare(CloneFlags::CLONE_NEWNS)?;
        mount(
            None::<&OsStr>,
            c"/",
            None::<&OsStr>,
            MsFlags::MS_REC | MsFlags::MS_SLAVE,
            None::<&OsStr>,
        )?;
        for place in &self.places {
            mount(
                Some(place.as_c_str()),
                place.as_c_str(),
                None::<&OsStr>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&OsStr>,
            )?;
            // A bind remount sets the mount's flags as given: keep those it had.
            // (glibc's statvfs is statfs(2) plus a copy: the kernel reports the flags.)
            let kept = kept_flags(statvfs(place.as_c_str())?.flags());
            mount(
                None::<&OsStr>,
                place.as_c_str(),
                None::<&OsStr>,
                MsFlags::MS_BIND
                    | MsFlags::MS_REMOUNT
                    | MsFlags::MS_NOEXEC
                    | MsFlags::MS_NOSUID
                    | kept,
                None::<&OsStr>,
            )?;
        }
        Ok(())
    }
}

/// The mount flags (as statvfs reports them) a bind remount must repeat to keep them.
fn kept_flags(reported: FsFlags) -> MsFlags {
    const KEPT: [(FsFlags, MsFlags); 6] = [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NODEV, MsFlags::MS_NODEV),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
        (FsFlags::ST_SYNCHRONOUS, MsFlags::MS_SYNCHRONOUS),
    ];
    KEPT.iter()
        .filter(|(st, _)| reported.contains(*st))
        .fold(MsFlags::empty(), |acc, (_, ms)| acc | *ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remounts_keep_the_flags_a_mount_had() {
        assert_eq!(kept_flags(FsFlags::empty()), MsFlags::empty());
        assert_eq!(
            kept_flags(FsFlags::ST_NODEV | FsFlags::ST_RELATIME | FsFlags::ST_NOSUID),
            MsFlags::MS_NODEV | MsFlags::MS_RELATIME
        );
    }

    #[test]
    fn places_come_back_as_given() {
        let given = [PathBuf::from("/tmp"), PathBuf::from("/home/u")];
        let mounts = NoexecMounts::new(&given).unwrap();
        assert_eq!(
            mounts.places().collect::<Vec<_>>(),
            given.iter().map(PathBuf::as_path).collect::<Vec<_>>()
        );
        assert!(NoexecMounts::new(&[PathBuf::from(OsStr::from_bytes(b"/a\0b"))]).is_err());
    }
}
