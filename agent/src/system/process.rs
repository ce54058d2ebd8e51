//! Starting a session's process: what its child does between fork and exec (a session of
//! its own, the controlling terminal, the cgroups, the OOM score, the mount namespace, the
//! user), prepared before the fork so that the child only makes system calls.

use super::mount::NoexecMounts;
use nix::unistd::{setgid, setgroups, setsid, setuid, write, Gid, Uid};
use std::fs::File;
use std::io;

/// Everything the child sets up before it runs the session's program, in this order.
pub struct ChildSetup {
    /// The PTY's slave side is the child's stdin: make it the controlling terminal.
    pub controlling_terminal: bool,
    /// `cgroup.procs` files opened by the agent, written "0" (the writer) one after the
    /// other: the v1 groups holding limits, then the session's own cgroup. While still
    /// root and before exec, so the session's first exec is already attributed.
    pub join_cgroups: Vec<File>,
    pub oom_score_adj: i32,
    pub noexec: Option<NoexecMounts>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

/// Makes `command`'s child set itself up as `setup` says before exec; a step that fails
/// fails the spawn. The files in `setup` stay open as long as `command` lives.
pub fn prepare_child(command: &mut tokio::process::Command, setup: ChildSetup) {
    let ChildSetup {
        controlling_terminal,
        join_cgroups,
        oom_score_adj,
        noexec,
        uid,
        gid,
        groups,
    } = setup;
    let oom_score = oom_score_adj.to_string().into_bytes();
    let groups: Vec<Gid> = groups.into_iter().map(Gid::from_raw).collect();
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let in_child = move || -> io::Result<()> {
        setsid()?;
        if controlling_terminal {
            take_controlling_terminal()?;
        }
        for procs in &join_cgroups {
            write_all_once(procs, b"0")?;
        }
        set_oom_score(&oom_score)?;
        if let Some(mounts) = &noexec {
            mounts.enter()?;
        }
        setgroups(&groups)?;
        setgid(gid)?;
        setuid(uid)?;
        close_inherited_on_exec();
        Ok(())
    };
    // SAFETY: the closure runs in the forked child before exec. It only makes system calls
    // (async-signal-safe) on values prepared before the fork and owned by the closure, so
    // they outlive the child's use; it allocates nothing (nix passes the prepared C
    // strings and slices through, and its errors are plain errno values).
    unsafe {
        command.pre_exec(in_child);
    }
}

/// One `write` of all of `data`; a short write is an error (a cgroup or proc file takes a
/// value whole or not at all).
fn write_all_once(file: &File, data: &[u8]) -> io::Result<()> {
    match write(file, data)? {
        n if n == data.len() => Ok(()),
        _ => Err(io::ErrorKind::WriteZero.into()),
    }
}

/// Stdin (the PTY's slave side) becomes the controlling terminal of the new session.
fn take_controlling_terminal() -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument (0: do not steal a terminal another
    // session holds) and touches no memory of ours; nix has no wrapper for it.
    if unsafe { nix::libc::ioctl(0, nix::libc::TIOCSCTTY, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes `score` (ASCII) to the calling process's `oom_score_adj`. It is opened here, in
/// the child: `/proc/self` names whoever opens it.
fn set_oom_score(score: &[u8]) -> io::Result<()> {
    use nix::fcntl::{open, OFlag};
    use nix::sys::stat::Mode;
    use std::os::fd::{FromRawFd, OwnedFd};
    let raw = open(
        c"/proc/self/oom_score_adj",
        OFlag::O_WRONLY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    // SAFETY: `open` just returned this descriptor and nothing else owns it.
    let file = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
    write_all_once(&file, score)
}

/// Belt and braces: whatever descriptor the agent leaked without CLOEXEC does not reach
/// the session. (close_range, Linux 5.11; on older kernels the call fails and the
/// descriptors the agent opens itself are CLOEXEC anyway.)
fn close_inherited_on_exec() {
    // SAFETY: close_range takes integers only; marking descriptors close-on-exec changes
    // nothing this process uses before its exec.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3u32,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}

/// Makes `command`'s child an unprivileged worker: `socket` becomes its fd 3 (every other
/// inherited descriptor above 2 closes at exec), it drops to `uid`/`gid` with no
/// supplementary groups, and it can never gain privileges again (no_new_privs).
pub fn prepare_worker(
    command: &mut tokio::process::Command,
    socket: std::os::fd::OwnedFd,
    uid: u32,
    gid: u32,
) {
    use std::os::fd::AsRawFd;
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    let in_child = move || -> io::Result<()> {
        setsid()?;
        // SAFETY: dup2 takes two integers; `socket` is owned by the closure and open.
        if unsafe { nix::libc::dup2(socket.as_raw_fd(), 3) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fcntl on fd 3 with integers; when the socket already was fd 3, dup2 left
        // its close-on-exec flag set.
        if unsafe { nix::libc::fcntl(3, nix::libc::F_SETFD, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        close_inherited_on_exec_above(4);
        setgroups(&[])?;
        setgid(gid)?;
        setuid(uid)?;
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes integers only.
        if unsafe { nix::libc::prctl(nix::libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    };
    // SAFETY: as in `prepare_child`: system calls only, on values the closure owns.
    unsafe {
        command.pre_exec(in_child);
    }
}

fn close_inherited_on_exec_above(first: u32) {
    // SAFETY: as in `close_inherited_on_exec`.
    unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            first,
            u32::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC,
        );
    }
}
