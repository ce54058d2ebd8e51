//! Starting a session's process: as the session's user, in the session's cgroup, on a PTY
//! or on pipes, with nothing inherited from the agent. The system calls between fork and
//! exec are `system::process`'s; the PTY is `system::term`'s.

use super::JoinFiles;
use crate::enforce::confine::{self, NoexecPlan, SessionUser};
use crate::enforce::ExecMode;
use crate::record::Keystrokes;
use crate::system::process::{prepare_child, ChildSetup};
use crate::system::term;
use std::ffi::OsString;
use std::io;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::Stdio;

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
    // The v1 groups holding the limits first (hybrid hosts), then the session's own
    // cgroup, before anything of the user's runs, so no fork escapes them.
    let JoinFiles {
        mut limits,
        identity,
    } = launch.cgroup_procs;
    limits.push(identity);
    prepare_child(
        &mut cmd,
        ChildSetup {
            controlling_terminal: pty,
            join_cgroups: limits,
            oom_score_adj: session_oom_score_adj(),
            noexec: noexec.map(NoexecPlan::into_mounts),
            uid: launch.uid,
            gid: launch.gid,
            groups: launch.groups,
        },
    );
    // The cgroup files close with `cmd`, once the child has them.
    cmd.spawn()
}

type Environment = Vec<(String, String)>;

/// The session's environment and mount plan under its exec profile (see
/// `enforce::confine`): made before the fork, entered by the child (`system::process`).
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

/// The agent's side of a session's terminal.
pub struct PtyMaster {
    terminal: term::PtyMaster,
}

pub fn open_pty(cols: u16, rows: u16) -> io::Result<(PtyMaster, OwnedFd)> {
    let (terminal, slave) = term::open_pty(cols, rows)?;
    Ok((PtyMaster { terminal }, slave))
}

impl PtyMaster {
    /// Reads what the session wrote; `Ok(0)` once every slave descriptor is closed.
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.terminal.read(buf).await
    }

    pub async fn write_all(&self, data: &[u8]) -> io::Result<()> {
        self.terminal.write_all(data).await
    }

    pub fn resize(&self, cols: u16, rows: u16) -> io::Result<()> {
        self.terminal.resize(cols, rows)
    }

    /// What keystrokes arriving now are typed to. A password read (getpass(3), PAM's
    /// prompts, `read -s`, sudo) is canonical mode with ECHO off. Line editors (readline
    /// at every bash prompt, zsh's zle, vi) also turn ECHO off but read in non-canonical
    /// mode, and what is typed to them is what a reviewer wants to see. A terminal whose
    /// mode cannot be read counts as reading a secret.
    pub fn keystrokes(&self) -> Keystrokes {
        match self.terminal.local_flags() {
            Ok(flags) => keystrokes_for(flags),
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

/// The window size of the terminal behind `fd`, if it is one and has a size.
pub fn terminal_size(fd: std::os::fd::BorrowedFd<'_>) -> Option<(u16, u16)> {
    term::window_size(fd)
        .ok()
        .filter(|(cols, rows)| *cols > 0 && *rows > 0)
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
