//! System V IPC objects (shared memory segments, message queues, semaphore sets): what an
//! account leaves in the kernel beyond its processes and files.

use nix::errno::Errno;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IpcKind {
    SharedMemory,
    MessageQueue,
    Semaphores,
}

/// Removes the object `id` of `kind`. One already gone (removed meanwhile, or a segment
/// already marked for removal) counts as removed. A segment still attached somewhere goes
/// once its last user detaches.
pub fn remove(kind: IpcKind, id: i32) -> nix::Result<()> {
    use nix::libc::{msgctl, semctl, shmctl, IPC_RMID};
    // SAFETY: IPC_RMID takes no buffer (a null pointer is what the man pages prescribe) and
    // touches no memory of ours; a stale id only makes the call fail. nix has no wrappers.
    let rc = unsafe {
        match kind {
            IpcKind::SharedMemory => shmctl(id, IPC_RMID, std::ptr::null_mut()),
            IpcKind::MessageQueue => msgctl(id, IPC_RMID, std::ptr::null_mut()),
            IpcKind::Semaphores => semctl(id, 0, IPC_RMID),
        }
    };
    match Errno::result(rc) {
        Ok(_) | Err(Errno::EINVAL) | Err(Errno::EIDRM) => Ok(()),
        Err(e) => Err(e),
    }
}
