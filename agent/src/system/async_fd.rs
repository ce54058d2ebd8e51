//! Waiting for descriptors with tokio: only for values that own their descriptor, so it
//! cannot be closed or replaced while tokio watches it.

use aya::maps::{MapData, RingBuf};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use tokio::io::unix::AsyncFd;

mod sealed {
    pub trait Sealed {}
}

/// A value that owns one descriptor for its whole life and always reports that one.
pub trait OwnsItsDescriptor: AsRawFd + sealed::Sealed {}

impl sealed::Sealed for OwnedFd {}
impl OwnsItsDescriptor for OwnedFd {}
// A ring buffer map owns its map's descriptor until it is dropped.
impl sealed::Sealed for RingBuf<MapData> {}
impl OwnsItsDescriptor for RingBuf<MapData> {}
// The programs' logger reads its own ring buffer map, which it owns.
impl<T> sealed::Sealed for aya_log::EbpfLogger<T> {}
impl<T> OwnsItsDescriptor for aya_log::EbpfLogger<T> {}

/// Registers `inner` with the current tokio runtime's reactor.
pub fn register<T: OwnsItsDescriptor>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: AsyncFd needs the descriptor open, the same file, and reported the same for
    // as long as it is registered; `OwnsItsDescriptor` is implemented only for types that
    // own their descriptor (the AsyncFd then owns them, so nothing else can close it) and
    // always report that one.
    unsafe { AsyncFd::register(inner) }.map_err(io::Error::from)
}
