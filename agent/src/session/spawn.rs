//! Starting a session's process: as the session's user, in the session's cgroup, on a PTY
//! or on pipes, with nothing inherited from the agent. The only `unsafe` of the session
//! stage lives here, behind `spawn` and `PtyMaster`.

use super::JoinFiles;
use crate::enforce::confine::{self, NoexecPlan, SessionUser};
use crate::enforce::ExecMode;
use crate::record::Keystrokes;
use std::ffi::OsString;
use std::io;
use std::os::fd::RawFd;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Stdio;
use tokio::io::unix::AsyncFd;

/// Everything about the process but its standard streams.
pub struct Launch {
    pub program: PathBuf,
    pub argv0: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// `cgroup.procs` of the session's cgroup and of the groups holding its limits,
    /// opened by the agent.
    pub cgroup_procs: JoinFiles,
    /// The profile's exec mode: allow and deny lists confine the session (noexec mounts,
    /// and for allow lists no loader variables).
    pub exec_mode: ExecMode,
    pub home: PathBuf,
}

pub enum Streams {
    /// The PTY's slave side becomes stdin, stdout, stderr and the controlling terminal.
    Pty(OwnedFd),
    Pipes,
}

pub fn spawn(launch: Launch, streams: Streams) -> io::Result<tokio::process::Child> {
    let (env, noexec) = exec_confinement(&launch)?;
    let mut cmd = tokio::process::Command::new(&launch.program);
    cmd.arg0(&launch.argv0)
        .args(&launch.args)
        .env_clear()
        .envs(
            env.iter()
                .map(|(k, v)| (OsString::from(k), OsString::from(v))),
        )
        .current_dir(&launch.cwd)
        .kill_on_drop(false);
    let pty = match streams {
        Streams::Pty(slave) => {
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            true
        }
        Streams::Pipes => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            false
        }
    };
    let procs_fd = launch.cgroup_procs.identity.as_raw_fd();
    let limit_fds: Vec<RawFd> = launch
        .cgroup_procs
        .limits
        .iter()
        .map(|f| f.as_raw_fd())
        .collect();
    let groups: Vec<libc::gid_t> = launch.groups.clone();
    let (uid, gid) = (launch.uid, launch.gid);
    let oom_score: Vec<u8> = session_oom_score_adj().to_string().into_bytes();
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls on values prepared before the fork; it allocates
    // nothing.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            if pty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            join_limit_groups(&limit_fds)?;
            // "0" moves the writing process. This happens while still root and before
            // exec, so the session's first exec is already attributed to its cgroup.
            if libc::write(procs_fd, b"0".as_ptr().cast(), 1) != 1 {
                return Err(io::Error::last_os_error());
            }
            set_oom_score(&oom_score)?;
            enter_confinement(noexec.as_ref())?;
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // Belt and braces: whatever descriptor the agent leaked without CLOEXEC does
            // not reach the session. (close_range, Linux 5.11.)
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    let child = cmd.spawn();
    drop(launch.cgroup_procs);
    child
}

type Environment = Vec<(String, String)>;

/// The session's environment and mount plan under its exec profile (see
/// `enforce::confine`): made before the fork, applied by `enter_confinement` after it.
fn exec_confinement(launch: &Launch) -> io::Result<(Environment, Option<NoexecPlan>)> {
    let mut env = launch.env.clone();
    confine::strip_loader_env(launch.exec_mode, &mut env);
    let user = SessionUser {
        uid: launch.uid,
        gids: &launch.groups,
        home: &launch.home,
    };
    let plan = NoexecPlan::for_session(launch.exec_mode, &user)?;
    if let Some(p) = &plan {
        let places: Vec<String> = p.places().map(|p| p.display().to_string()).collect();
        log::debug!(target: "usher::session", "noexec in the session's mount namespace: {}", places.join(" "));
    }
    Ok((env, plan))
}

/// In the child, still root, after joining the cgroup: the session's own mount namespace
/// with its writable places noexec. Fails the spawn (no session) if it cannot be made.
fn enter_confinement(plan: Option<&NoexecPlan>) -> io::Result<()> {
    match plan {
        Some(plan) => plan.enter(),
        None => Ok(()),
    }
}

/// Moves the calling process into the cgroup v1 groups that hold the session's limits
/// (hybrid hosts), before it runs anything of the user's, so no fork escapes them.
///
/// # Safety
/// Runs in a forked child before exec: only `write` on descriptors opened before the fork.
unsafe fn join_limit_groups(procs_fds: &[RawFd]) -> io::Result<()> {
    for fd in procs_fds {
        if libc::write(*fd, b"0".as_ptr().cast(), 1) != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The `oom_score_adj` usherd gives itself: when the host runs out of memory the kernel
/// kills almost anything before the agent, yet not -1000, so that a runaway agent itself
/// can still be stopped (the unit restarts it).
pub const AGENT_OOM_SCORE_ADJ: i32 = -900;

/// A session's `oom_score_adj`: children inherit the agent's, so each session is set back
/// to the ordinary 0. Where the agent could not lower its own (it lacks
/// CAP_SYS_RESOURCE), sessions get the same distance above it instead (900), so that under
/// memory pressure the kernel still picks a session's hog, never the agent.
pub fn session_oom_score_adj() -> i32 {
    let agent: i32 = std::fs::read_to_string("/proc/self/oom_score_adj")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    (agent - AGENT_OOM_SCORE_ADJ).clamp(0, 1000)
}

/// Writes `score` (ASCII) to the calling process's `oom_score_adj`. A session that cannot
/// be given its score is not started.
///
/// # Safety
/// Runs in a forked child before exec: only `open`, `write` and `close`, on a constant
/// path and bytes prepared before the fork.
unsafe fn set_oom_score(score: &[u8]) -> io::Result<()> {
    let fd = libc::open(
        c"/proc/self/oom_score_adj".as_ptr(),
        libc::O_WRONLY | libc::O_CLOEXEC,
    );
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let written = libc::write(fd, score.as_ptr().cast(), score.len());
    let error = io::Error::last_os_error();
    libc::close(fd);
    if written != score.len() as isize {
        return Err(error);
    }
    Ok(())
}

/// The agent's side of a session's terminal.
pub struct PtyMaster {
    fd: AsyncFd<OwnedFd>,
}

pub fn open_pty(cols: u16, rows: u16) -> io::Result<(PtyMaster, OwnedFd)> {
    let size = winsize(cols, rows);
    let pair = nix::pty::openpty(Some(&size), None).map_err(io::Error::from)?;
    let flags = nix::fcntl::fcntl(pair.master.as_raw_fd(), nix::fcntl::FcntlArg::F_GETFL)?;
    let flags = nix::fcntl::OFlag::from_bits_truncate(flags) | nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(
        pair.master.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(flags),
    )?;
    // SAFETY: the AsyncFd owns the descriptor, so it stays open for as long as it is
    // registered and is deregistered before it is closed.
    let fd = unsafe { AsyncFd::register(pair.master)? };
    Ok((PtyMaster { fd }, pair.slave))
}

fn winsize(cols: u16, rows: u16) -> nix::pty::Winsize {
    nix::pty::Winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

impl PtyMaster {
    /// Reads what the session wrote; `Ok(0)` once every slave descriptor is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let mut guard = self.fd.readable().await?;
            match guard.try_io(|fd| nix::unistd::read(fd.as_raw_fd(), buf).map_err(io::Error::from))
            {
                Ok(Ok(n)) => return Ok(n),
                // EIO is how Linux says the slave side is closed.
                Ok(Err(e)) if e.raw_os_error() == Some(libc::EIO) => return Ok(0),
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }

    pub async fn write_all(&self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let mut guard = self.fd.writable().await?;
            match guard.try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(io::Error::from))
            {
                Ok(Ok(n)) => data = &data[n..],
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
        Ok(())
    }

    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        let size = winsize(cols, rows);
        // SAFETY: TIOCSWINSZ reads one winsize from a valid pointer.
        let r = unsafe { libc::ioctl(self.fd.get_ref().as_raw_fd(), libc::TIOCSWINSZ, &size) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// What keystrokes arriving now are typed to. A password read (getpass(3), PAM's
    /// prompts, `read -s`, sudo) is canonical mode with ECHO off. Line editors (readline
    /// at every bash prompt, zsh's zle, vi) also turn ECHO off but read in non-canonical
    /// mode, and what is typed to them is what a reviewer wants to see. A terminal whose
    /// mode cannot be read counts as reading a secret.
    pub fn keystrokes(&self) -> Keystrokes {
        match nix::sys::termios::tcgetattr(self.fd.get_ref().as_fd()) {
            Ok(t) => keystrokes_for(t.local_flags),
            Err(_) => Keystrokes::Secret,
        }
    }
}

fn keystrokes_for(flags: nix::sys::termios::LocalFlags) -> Keystrokes {
    use nix::sys::termios::LocalFlags;
    if flags.contains(LocalFlags::ICANON) && !flags.contains(LocalFlags::ECHO) {
        Keystrokes::Secret
    } else {
        Keystrokes::Recordable
    }
}

/// The window size of the terminal behind `fd`, if it is one.
pub fn terminal_size(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u16, u16)> {
    let mut size = winsize(0, 0);
    // SAFETY: TIOCGWINSZ writes one winsize into a valid pointer.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut size) };
    (r == 0 && size.ws_col > 0 && size.ws_row > 0).then_some((size.ws_col, size.ws_row))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::termios::{self, LocalFlags, SetArg};

    /// The modes set on a real PTY by the programs that read from it.
    #[tokio::test]
    async fn only_a_canonical_read_without_echo_is_secret() {
        let (master, slave) = open_pty(80, 24).unwrap();
        let set = |f: &dyn Fn(&mut LocalFlags)| {
            let mut t = termios::tcgetattr(&slave).unwrap();
            f(&mut t.local_flags);
            termios::tcsetattr(&slave, SetArg::TCSANOW, &t).unwrap();
        };
        // A fresh terminal: cooked, echoing (`cat` reading a line).
        assert_eq!(master.keystrokes(), Keystrokes::Recordable);
        // readline at a bash prompt: non-canonical, ECHO off.
        set(&|l| l.remove(LocalFlags::ICANON | LocalFlags::ECHO));
        assert_eq!(master.keystrokes(), Keystrokes::Recordable);
        // getpass(3), PAM, `read -s`: canonical, ECHO off (ECHONL may stay on).
        set(&|l| {
            l.insert(LocalFlags::ICANON | LocalFlags::ECHONL);
            l.remove(LocalFlags::ECHO)
        });
        assert_eq!(master.keystrokes(), Keystrokes::Secret);
        // Raw with echo (rare, but nothing is hidden from the screen).
        set(&|l| {
            l.remove(LocalFlags::ICANON);
            l.insert(LocalFlags::ECHO)
        });
        assert_eq!(master.keystrokes(), Keystrokes::Recordable);
    }
}
