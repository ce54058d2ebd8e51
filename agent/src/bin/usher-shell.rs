//! `usher-shell`: the login shell of Usher's ephemeral accounts. It runs no shell itself:
//! it hands its terminal to `usherd`, which opens a recorded, enforced session in its own
//! cgroup, and waits for it to end. Without the agent there is no session (fail closed).

#![deny(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::ExitCode;
use std::time::Duration;
use usher::system::{signal, socket, term};
use usher_wire::console::{
    OpenRequest, ShellControl, ShellEvent, WindowSize, MAX_EVENT_LINE_BYTES,
};

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
    let (stdin, stdout, stderr) = (std::io::stdin(), std::io::stdout(), std::io::stderr());
    let terminal = [stdin.as_fd(), stdout.as_fd(), stderr.as_fd()];
    if let Err(e) = socket::send_with_fds(&stream, &payload, &terminal) {
        return fail(&format!("cannot hand the terminal to usherd: {e}"));
    }
    let _ = signal::notice_window_changes();
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let mut writer = match stream.try_clone() {
        Ok(w) => w,
        Err(e) => return fail(&e.to_string()),
    };
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        if signal::window_changed() {
            if let Ok((cols, rows)) = term::window_size(std::io::stdin().as_fd()) {
                let resize = ShellControl::Resize(WindowSize { cols, rows });
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
