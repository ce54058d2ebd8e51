//! `usher-shell`: the login shell of Usher's ephemeral accounts. It runs no shell itself:
//! it hands its terminal to `usherd`, which opens a recorded, enforced session in its own
//! cgroup, and waits for it to end. Without the agent there is no session (fail closed).

use std::io::{BufRead, BufReader, IoSlice, Read, Write};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use usher_wire::console::{
    OpenRequest, ShellControl, ShellEvent, WindowSize, MAX_EVENT_LINE_BYTES,
};

static WINDOW_CHANGED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_winch(_: libc::c_int) {
    WINDOW_CHANGED.store(true, Ordering::SeqCst);
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // `login` runs us as `-usher-shell`; `su -c CMD` and `ssh` to a system sshd as `-c CMD`.
    let command = match args.iter().position(|a| a == "-c") {
        Some(i) => match args.get(i + 1) {
            Some(c) => Some(c.clone()),
            None => return fail("-c needs a command"),
        },
        None => None,
    };
    let socket =
        std::env::var("USHER_CONSOLE_SOCKET").unwrap_or_else(|_| "/run/usher/console.sock".into());
    let stream = match UnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot reach usherd ({e}): no session without it")),
    };
    let stdin = std::io::stdin();
    let saved = nix::sys::termios::tcgetattr(stdin.as_fd()).ok();
    if let Some(t) = &saved {
        // The agent's PTY interprets keys (^C, ^Z) for the session; this terminal passes
        // them through untouched.
        let mut raw = t.clone();
        nix::sys::termios::cfmakeraw(&mut raw);
        let _ =
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSADRAIN, &raw);
    }
    let code = run(stream, command);
    if let Some(t) = &saved {
        let _ =
            nix::sys::termios::tcsetattr(stdin.as_fd(), nix::sys::termios::SetArg::TCSADRAIN, t);
    }
    code
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("usher: {msg}");
    ExitCode::from(1)
}

fn run(stream: UnixStream, command: Option<String>) -> ExitCode {
    let request = OpenRequest {
        term: std::env::var("TERM").ok(),
        command,
    };
    let payload = match request.encode() {
        Ok(p) => p,
        Err(e) => return fail(&format!("cannot ask usherd for a session: {e}")),
    };
    let fds: [RawFd; 3] = [0, 1, 2];
    let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
    if let Err(e) = nix::sys::socket::sendmsg::<()>(
        stream.as_raw_fd(),
        &[IoSlice::new(&payload)],
        &cmsg,
        nix::sys::socket::MsgFlags::empty(),
        None,
    ) {
        return fail(&format!("cannot hand the terminal to usherd: {e}"));
    }
    // SAFETY: installing a handler that only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGWINCH, on_winch as *const () as libc::sighandler_t);
    }
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(&e.to_string()),
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if WINDOW_CHANGED.swap(false, Ordering::SeqCst) {
            let mut size: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ fills a winsize.
            if unsafe { libc::ioctl(0, libc::TIOCGWINSZ, &mut size) } == 0 {
                let resize = ShellControl::Resize(WindowSize {
                    cols: size.ws_col,
                    rows: size.ws_row,
                });
                let _ = writer.write_all(&resize.encode());
            }
        }
        // A line may arrive in pieces between timeouts: `line` keeps what came so far.
        let room = (MAX_EVENT_LINE_BYTES + 1).saturating_sub(line.len()) as u64;
        match (&mut reader).take(room).read_until(b'\n', &mut line) {
            Ok(0) if line.is_empty() => return fail("usherd closed the session"),
            // The rest of the line is still on its way.
            Ok(n) if n > 0 && !line.ends_with(b"\n") && line.len() <= MAX_EVENT_LINE_BYTES => {}
            Ok(_) => {
                let event = ShellEvent::decode(&line);
                line.clear();
                match event {
                    Ok(ShellEvent::Refused { reason }) => {
                        return fail(&format!("console login refused: {reason}"))
                    }
                    Ok(ShellEvent::Exited { status }) => {
                        return ExitCode::from(status.clamp(0, 255) as u8)
                    }
                    Ok(ShellEvent::Killed { signal }) => {
                        return ExitCode::from((128 + signal).clamp(0, 255) as u8)
                    }
                    // An event of a newer agent: the session goes on.
                    Err(_) => {}
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return fail(&format!("lost usherd: {e}")),
        }
    }
}
