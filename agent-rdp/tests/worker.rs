//! The worker for real, without usherd: the test plays usherd over a socketpair (fd 3),
//! hands the worker the accepted TCP connection as stdin, runs a real Xvfb as the
//! session's desktop (with its own cookie) and the real `xfreerdp` (freerdp2-x11) under
//! another Xvfb as the client, and looks at the client's screen.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use usher_wire::rdp::{
    Desktop, FromWorker, RecordingSettings, Security, ToWorker, MAX_LINE_BYTES,
    MAX_LOGIN_LINE_BYTES,
};

/// The session desktop's colour, chosen to be unlike anything else on a screen.
const DESKTOP_RGB: (u8, u8, u8) = (0x3c, 0x78, 0xb4);
const DESKTOP_COLOUR: &str = "#3c78b4";

/// A scratch directory and the processes of one test, removed and killed on drop.
struct Scratch {
    dir: PathBuf,
    children: Vec<(String, Child)>,
}

impl Scratch {
    fn new(name: &str) -> Scratch {
        static COUNTER: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "usher-rdp-{name}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch {
            dir,
            children: Vec::new(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn keep(&mut self, name: &str, child: Child) -> usize {
        self.children.push((name.into(), child));
        self.children.len() - 1
    }

    fn child(&mut self, index: usize) -> &mut Child {
        &mut self.children[index].1
    }

    /// Xvfb on a display it picks itself, `-nolisten tcp`, with `auth` when given.
    fn xvfb(&mut self, size: &str, auth: Option<&Path>) -> String {
        let (mut read, write) = UnixStream::pair().unwrap();
        let write_fd: OwnedFd = write.into();
        let raw = write_fd.as_raw_fd();
        let mut command = Command::new("Xvfb");
        command
            .args(["-screen", "0", &format!("{size}x24"), "-nolisten", "tcp"])
            // Without it the server resets when its last client leaves, and the root's
            // colour with it.
            .arg("-noreset")
            .args(["-displayfd", "3"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(auth) = auth {
            command.arg("-auth").arg(auth);
        }
        unsafe {
            command.pre_exec(move || put_on_fd3(raw));
        }
        let child = command.spawn().expect("Xvfb runs");
        drop(write_fd);
        self.keep("Xvfb", child);
        read.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut number = String::new();
        let mut byte = [0u8; 1];
        while read.read(&mut byte).unwrap_or(0) == 1 && byte[0] != b'\n' {
            number.push(byte[0] as char);
        }
        assert!(!number.is_empty(), "Xvfb did not say its display");
        format!(":{}", number.trim())
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// In a child before exec: `fd` becomes fd 3, inherited.
fn put_on_fd3(fd: i32) -> std::io::Result<()> {
    let result = if fd == 3 {
        unsafe { libc::fcntl(3, libc::F_SETFD, 0) }
    } else {
        unsafe { libc::dup2(fd, 3) }
    };
    if result < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn run_ok(command: &mut Command) {
    let output = command.output().expect("the command runs");
    assert!(
        output.status.success(),
        "{command:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The session's desktop: an Xvfb with a cookie, its root painted DESKTOP_COLOUR.
struct SessionDesktop {
    display: String,
    cookie: String,
    authority: PathBuf,
}

fn session_desktop(scratch: &mut Scratch, size: &str) -> SessionDesktop {
    let mut bytes = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    let cookie: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let authority = scratch.path("session.xauth");
    std::fs::write(&authority, b"").unwrap();
    let display = scratch.xvfb(size, Some(&authority));
    run_ok(Command::new("xauth").arg("-f").arg(&authority).args([
        "add",
        &display,
        "MIT-MAGIC-COOKIE-1",
        &cookie,
    ]));
    run_ok(
        Command::new("xsetroot")
            .args(["-solid", DESKTOP_COLOUR])
            .env("DISPLAY", &display)
            .env("XAUTHORITY", &authority),
    );
    // Without the cookie the display is closed: the worker must use the one it is given.
    let without = Command::new("xsetroot")
        .args(["-solid", "black"])
        .env("DISPLAY", &display)
        .env("XAUTHORITY", scratch.path("none"))
        .output()
        .unwrap();
    assert!(
        !without.status.success(),
        "the session display must need its cookie"
    );
    SessionDesktop {
        display,
        cookie,
        authority,
    }
}

fn certificate(scratch: &Scratch) -> (String, String) {
    let (cert, key) = (scratch.path("cert.pem"), scratch.path("key.pem"));
    run_ok(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=usher-rdp-test", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (
        std::fs::read_to_string(cert).unwrap(),
        std::fs::read_to_string(key).unwrap(),
    )
}

/// usherd's end of the worker's socket, and the worker.
struct Worker {
    index: usize,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Worker {
    fn send(&mut self, message: &ToWorker) {
        self.writer.write_all(&message.encode()).unwrap();
    }

    /// The next line, or None at the socket's end (or after `wait`).
    fn next(&mut self, limit: usize, wait: Duration) -> Option<FromWorker> {
        self.reader.get_ref().set_read_timeout(Some(wait)).unwrap();
        let mut line = Vec::new();
        match self.reader.read_until(b'\n', &mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(FromWorker::decode(&line, limit).expect("the worker's line parses")),
        }
    }
}

fn hello(cert: &(String, String), grace: u64, security: Vec<Security>) -> ToWorker {
    hello_with_max(cert, grace, security, (1920, 1200))
}

fn hello_with_max(
    cert: &(String, String),
    grace: u64,
    security: Vec<Security>,
    max: (u16, u16),
) -> ToWorker {
    ToWorker::Hello {
        cert_pem: cert.0.clone(),
        key_pem: cert.1.clone(),
        security,
        login_grace_secs: grace,
        max_width: max.0,
        max_height: max.1,
    }
}

/// Accepts one connection on `listener` (bounded) and starts the worker on it.
fn start_worker(scratch: &mut Scratch, listener: &TcpListener) -> Worker {
    start_worker_as(scratch, listener, None)
}

/// As `start_worker`, under another uid and gid when given (usherd runs workers as an
/// unprivileged user).
fn start_worker_as(
    scratch: &mut Scratch,
    listener: &TcpListener,
    user: Option<(u32, u32)>,
) -> Worker {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let tcp = loop {
        match listener.accept() {
            Ok((tcp, _)) => break tcp,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(50)),
            Err(error) => panic!("no client connected: {error}"),
        }
    };
    tcp.set_nonblocking(false).unwrap();
    let (usherd, worker_end) = UnixStream::pair().unwrap();
    let worker_fd: OwnedFd = worker_end.into();
    let raw = worker_fd.as_raw_fd();
    let stderr = std::fs::File::create(scratch.path("worker.log")).unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_usher-rdp"));
    command
        .stdin(Stdio::from(OwnedFd::from(tcp)))
        .stdout(Stdio::null())
        .stderr(stderr);
    unsafe {
        command.pre_exec(move || {
            put_on_fd3(raw)?;
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = command.spawn().expect("the worker starts");
    drop(worker_fd);
    let index = scratch.keep("usher-rdp", child);
    Worker {
        index,
        reader: BufReader::new(usherd.try_clone().unwrap()),
        writer: usherd,
    }
}

fn xfreerdp(scratch: &mut Scratch, display: &str, port: u16, args: &[&str], log: &str) -> usize {
    let out = std::fs::File::create(scratch.path(log)).unwrap();
    let child = Command::new("xfreerdp")
        .arg(format!("/v:127.0.0.1:{port}"))
        .args(["/cert:ignore", "/size:800x600"])
        .args(args)
        .env("DISPLAY", display)
        .env("HOME", &scratch.dir)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .expect("xfreerdp runs");
    scratch.keep("xfreerdp", child)
}

fn wait_exit(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Pixels of the display's root window close to `rgb`, out of all, from `xwd`.
fn count_colour(display: &str, rgb: (u8, u8, u8)) -> (usize, usize) {
    let shot = screenshot(display, None, rgb);
    (shot.matching, shot.width * shot.height)
}

struct Shot {
    width: usize,
    height: usize,
    matching: usize,
}

/// The display's root window from `xwd`: its size and how many pixels are close to `rgb`.
fn screenshot(display: &str, authority: Option<&Path>, rgb: (u8, u8, u8)) -> Shot {
    let mut command = Command::new("xwd");
    command.args(["-root", "-silent", "-display", display]);
    if let Some(authority) = authority {
        command.env("XAUTHORITY", authority);
    }
    let output = command.output().expect("xwd runs");
    assert!(
        output.status.success(),
        "xwd: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let xwd = output.stdout;
    let field = |i: usize| u32::from_be_bytes(xwd[i * 4..i * 4 + 4].try_into().unwrap()) as usize;
    let (header, width, height) = (field(0), field(4), field(5));
    let (byte_order, bits_per_pixel, bytes_per_line) = (field(7), field(11), field(12));
    let (red_mask, green_mask, blue_mask, ncolors) = (field(14), field(15), field(16), field(19));
    assert_eq!(
        bits_per_pixel, 32,
        "a 24-bit display is read as 32 bits a pixel"
    );
    let pixels = &xwd[header + ncolors * 12..];
    let channel = |pixel: usize, mask: usize| ((pixel & mask) >> mask.trailing_zeros()) as i32;
    let mut matching = 0;
    for y in 0..height {
        for x in 0..width {
            let at = y * bytes_per_line + x * 4;
            let bytes: [u8; 4] = pixels[at..at + 4].try_into().unwrap();
            let pixel = if byte_order == 0 {
                u32::from_le_bytes(bytes)
            } else {
                u32::from_be_bytes(bytes)
            } as usize;
            let close = |value: i32, want: u8| (value - i32::from(want)).abs() <= 12;
            if close(channel(pixel, red_mask), rgb.0)
                && close(channel(pixel, green_mask), rgb.1)
                && close(channel(pixel, blue_mask), rgb.2)
            {
                matching += 1;
            }
        }
    }
    Shot {
        width,
        height,
        matching,
    }
}

fn expect_login(worker: &mut Worker, scratch: &Scratch, user: &str, password: &str) {
    match worker.next(MAX_LOGIN_LINE_BYTES, Duration::from_secs(30)) {
        Some(FromWorker::Login {
            username,
            password: sent,
            width,
            height,
            ..
        }) => {
            assert_eq!(username, user);
            assert_eq!(sent, password);
            assert_eq!((width, height), (800, 600), "the client's /size");
        }
        other => panic!(
            "expected a Login, got {other:?}\nworker: {}\nclient: {}",
            scratch.log("worker.log"),
            scratch.log("client.log")
        ),
    }
}

fn assert_no_panic(scratch: &Scratch) {
    let log = scratch.log("worker.log");
    assert!(!log.contains("panicked"), "the worker panicked:\n{log}");
}

#[test]
fn a_refused_login_gets_the_client_nothing() {
    let mut scratch = Scratch::new("refused");
    let cert = certificate(&scratch);
    let client_display = scratch.xvfb("1024x768", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = xfreerdp(
        &mut scratch,
        &client_display,
        port,
        &["/u:jit-alice", "/p:wrong-secret", "/sec:tls"],
        "client.log",
    );
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls, Security::Hybrid]));
    expect_login(&mut worker, &scratch, "jit-alice", "wrong-secret");
    worker.send(&ToWorker::Refused);

    let status = wait_exit(scratch.child(client), Duration::from_secs(30));
    let status =
        status.unwrap_or_else(|| panic!("xfreerdp still runs:\n{}", scratch.log("client.log")));
    assert!(
        !status.success(),
        "xfreerdp must fail: {}",
        scratch.log("client.log")
    );
    assert!(
        scratch
            .log("client.log")
            .contains("ERRINFO_SERVER_DENIED_CONNECTION"),
        "the client was told access is denied:\n{}",
        scratch.log("client.log")
    );
    let worker_status = wait_exit(scratch.child(worker.index), Duration::from_secs(10))
        .expect("the worker exits after a refusal");
    assert!(worker_status.success(), "{}", scratch.log("worker.log"));
    assert!(
        worker
            .next(MAX_LINE_BYTES, Duration::from_secs(2))
            .is_none(),
        "nothing after a refusal"
    );
    // The client saw nothing of any desktop: its screen has no window left.
    assert_no_panic(&scratch);
}

#[test]
fn an_accepted_login_shows_the_desktop_records_it_and_end_disconnects() {
    let mut scratch = Scratch::new("desktop");
    let cert = certificate(&scratch);
    let desktop = session_desktop(&mut scratch, "800x600");
    let client_display = scratch.xvfb("1024x768", None);
    let (before, _) = count_colour(&client_display, DESKTOP_RGB);
    assert_eq!(before, 0, "the client's screen starts without the colour");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = xfreerdp(
        &mut scratch,
        &client_display,
        port,
        &["/u:jit-alice", "/p:one-time-secret", "/sec:tls"],
        "client.log",
    );
    // As usherd runs it: an unprivileged user (nobody).
    let mut worker = start_worker_as(&mut scratch, &listener, Some((65534, 65534)));
    worker.send(&hello(&cert, 30, vec![Security::Tls]));
    expect_login(&mut worker, &scratch, "jit-alice", "one-time-secret");
    worker.send(&ToWorker::Desktop(Desktop {
        session_id: "s-test".into(),
        display: desktop.display.clone(),
        cookie: desktop.cookie.clone(),
        width: 800,
        height: 600,
        reconnected: false,
        max_fps: 30,
        recording: Some(RecordingSettings {
            max_fps: 5,
            keyframe_secs: 10,
            input: true,
        }),
        clipboard: false,
        drives: false,
    }));

    // The recording's header and a keyframe arrive; meanwhile the client shows the desktop.
    let mut header = None;
    let mut keyframe = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    while (header.is_none() || !keyframe) && Instant::now() < deadline {
        match worker.next(MAX_LINE_BYTES, Duration::from_secs(30)) {
            Some(FromWorker::Record { line }) => {
                if header.is_none() {
                    header = Some(line);
                } else if line.contains("\"k\"") {
                    keyframe = true;
                }
            }
            Some(FromWorker::Resized { .. }) => {}
            other => panic!(
                "expected recording lines, got {other:?}\n{}",
                scratch.log("worker.log")
            ),
        }
    }
    let header = header.expect("a recording header");
    let header: serde_json::Value = serde_json::from_str(&header).unwrap();
    assert_eq!(header["format"], "usher-desktop");
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(800), Some(600))
    );
    assert!(
        keyframe,
        "a keyframe was recorded\n{}",
        scratch.log("worker.log")
    );

    // Keep reading the recording meanwhile, as usherd does, so the worker never stalls.
    let reader = worker.reader.get_ref().try_clone().unwrap();
    let drain = std::thread::spawn(move || {
        let mut reader = BufReader::new(reader);
        reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut lines = 0;
        let mut line = Vec::new();
        while reader
            .read_until(b'\n', &mut line)
            .map(|n| n > 0)
            .unwrap_or(false)
        {
            lines += 1;
            line.clear();
        }
        lines
    });

    let deadline = Instant::now() + Duration::from_secs(30);
    let mut shown = (0, 1);
    while Instant::now() < deadline {
        shown = count_colour(&client_display, DESKTOP_RGB);
        // The 800x600 desktop is most of what the client draws.
        if shown.0 >= 800 * 600 * 9 / 10 {
            break;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        shown.0 >= 800 * 600 * 9 / 10,
        "the client's screen shows {} of {} pixels in the desktop's colour\nworker: {}\nclient: {}",
        shown.0,
        shown.1,
        scratch.log("worker.log"),
        scratch.log("client.log")
    );

    worker.send(&ToWorker::End {
        reason: "the grant was revoked".into(),
    });
    let status = wait_exit(scratch.child(client), Duration::from_secs(20));
    assert!(
        status.is_some(),
        "End disconnects the client:\n{}",
        scratch.log("client.log")
    );
    let worker_status = wait_exit(scratch.child(worker.index), Duration::from_secs(20))
        .expect("the worker exits after End");
    assert!(worker_status.success(), "{}", scratch.log("worker.log"));
    assert!(
        scratch
            .log("client.log")
            .contains("ERRINFO_RPC_INITIATED_DISCONNECT"),
        "the client was told why:\n{}",
        scratch.log("client.log")
    );
    assert!(
        drain.join().unwrap() > 0,
        "the recording went on until the end"
    );
    assert_no_panic(&scratch);
}

#[test]
fn a_client_that_insists_on_nla_fails_cleanly_without_a_login() {
    let mut scratch = Scratch::new("nla");
    let cert = certificate(&scratch);
    let client_display = scratch.xvfb("1024x768", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = xfreerdp(
        &mut scratch,
        &client_display,
        port,
        &["/u:jit-alice", "/p:one-time-secret", "/sec:nla"],
        "client.log",
    );
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls, Security::Hybrid]));
    assert!(
        worker
            .next(MAX_LOGIN_LINE_BYTES, Duration::from_secs(20))
            .is_none(),
        "no login without TLS security"
    );
    let status = wait_exit(scratch.child(client), Duration::from_secs(20)).expect("xfreerdp ends");
    assert!(!status.success());
    let worker_status =
        wait_exit(scratch.child(worker.index), Duration::from_secs(10)).expect("the worker exits");
    assert!(!worker_status.success(), "a failed negotiation is an error");
    assert!(
        scratch.log("worker.log").contains("offered NLA"),
        "the worker says why:\n{}",
        scratch.log("worker.log")
    );
    assert_no_panic(&scratch);
}

#[test]
fn a_silent_client_is_dropped_after_the_login_grace() {
    let mut scratch = Scratch::new("grace");
    let cert = certificate(&scratch);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut worker = start_worker(&mut scratch, &listener);
    let started = Instant::now();
    worker.send(&hello(&cert, 2, vec![Security::Tls]));
    let status = wait_exit(scratch.child(worker.index), Duration::from_secs(15))
        .expect("the worker gives up on a silent client");
    assert!(started.elapsed() >= Duration::from_secs(2));
    assert!(status.success(), "{}", scratch.log("worker.log"));
    assert!(worker
        .next(MAX_LINE_BYTES, Duration::from_secs(2))
        .is_none());
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let _ = silent.read_to_end(&mut rest);
    assert!(rest.is_empty(), "the silent client got nothing");
    assert_no_panic(&scratch);
}

#[test]
fn garbage_from_the_client_or_usherd_going_away_ends_the_worker_cleanly() {
    let mut scratch = Scratch::new("garbage");
    let cert = certificate(&scratch);
    // A client that sends a TPKT of nonsense.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut hostile = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls]));
    let mut junk = vec![0x03, 0x00, 0x01, 0x00];
    junk.extend((0..252u32).map(|i| (i * 37 % 251) as u8));
    hostile.write_all(&junk).unwrap();
    let status =
        wait_exit(scratch.child(worker.index), Duration::from_secs(15)).expect("the worker exits");
    assert!(!status.success());
    assert!(worker
        .next(MAX_LINE_BYTES, Duration::from_secs(2))
        .is_none());
    assert_no_panic(&scratch);

    // A client that is mid-handshake when usherd goes away.
    let mut scratch = Scratch::new("usherd-gone");
    let client_display = scratch.xvfb("1024x768", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = xfreerdp(
        &mut scratch,
        &client_display,
        port,
        &["/u:jit-alice", "/p:one-time-secret", "/sec:tls"],
        "client.log",
    );
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls]));
    expect_login(&mut worker, &scratch, "jit-alice", "one-time-secret");
    drop(worker.writer);
    drop(worker.reader);
    let status =
        wait_exit(scratch.child(worker.index), Duration::from_secs(15)).expect("the worker exits");
    let _ = status;
    let client_status =
        wait_exit(scratch.child(client), Duration::from_secs(20)).expect("xfreerdp ends");
    assert!(!client_status.success(), "{}", scratch.log("client.log"));
    assert_no_panic(&scratch);
}

/// A client connected to a desktop usherd has accepted, the colour on its screen.
struct Connected {
    worker: Worker,
    client: usize,
    client_display: String,
    desktop: SessionDesktop,
}

fn connect_to_desktop(
    scratch: &mut Scratch,
    session_size: &str,
    desktop_size: (u16, u16),
    client_args: &[&str],
) -> Connected {
    let cert = certificate(scratch);
    let desktop = session_desktop(scratch, session_size);
    let client_display = scratch.xvfb("1280x1024", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let mut args = vec!["/u:jit-alice", "/p:one-time-secret", "/sec:tls"];
    args.extend_from_slice(client_args);
    let client = xfreerdp(scratch, &client_display, port, &args, "client.log");
    let mut worker = start_worker(scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls]));
    expect_login(&mut worker, scratch, "jit-alice", "one-time-secret");
    worker.send(&ToWorker::Desktop(Desktop {
        session_id: "s-test".into(),
        display: desktop.display.clone(),
        cookie: desktop.cookie.clone(),
        width: desktop_size.0,
        height: desktop_size.1,
        reconnected: false,
        max_fps: 30,
        recording: None,
        clipboard: false,
        drives: false,
    }));
    let connected = Connected {
        worker,
        client,
        client_display,
        desktop,
    };
    wait_for_colour(scratch, &connected, desktop_size);
    connected
}

/// Waits until the client's screen shows `size` worth of the desktop's colour.
fn wait_for_colour(scratch: &Scratch, connected: &Connected, size: (u16, u16)) {
    let want = usize::from(size.0) * usize::from(size.1) * 9 / 10;
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut shown = 0;
    while Instant::now() < deadline {
        shown = count_colour(&connected.client_display, DESKTOP_RGB).0;
        if shown >= want {
            return;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    panic!(
        "the client shows {shown} pixels of the desktop's colour, not {want}\nworker: {}\nclient: {}",
        scratch.log("worker.log"),
        scratch.log("client.log")
    );
}

fn end_and_wait(scratch: &mut Scratch, connected: &mut Connected) {
    connected.worker.send(&ToWorker::End {
        reason: "test over".into(),
    });
    let client = connected.client;
    assert!(
        wait_exit(scratch.child(client), Duration::from_secs(20)).is_some(),
        "End disconnects the client:\n{}",
        scratch.log("client.log")
    );
    let worker = connected.worker.index;
    let status =
        wait_exit(scratch.child(worker), Duration::from_secs(20)).expect("the worker exits");
    assert!(status.success(), "{}", scratch.log("worker.log"));
    assert_no_panic(scratch);
}

#[test]
fn codec_variants_show_the_desktop() {
    for variant in ["/rfx", "/gfx", "/bpp:16", "-gdi:sw"] {
        let mut scratch = Scratch::new("codec");
        let mut connected = connect_to_desktop(
            &mut scratch,
            "800x600",
            (800, 600),
            &["/size:800x600", variant],
        );
        end_and_wait(&mut scratch, &mut connected);
    }
}

#[test]
fn the_desktop_follows_the_client_window_and_usherd_hears_of_it() {
    let mut scratch = Scratch::new("resize");
    // Xvfb can shrink its screen and grow it back up to its start size, so usherd starts
    // it at the largest size and the worker brings it to the one asked for.
    let mut connected = connect_to_desktop(
        &mut scratch,
        "1280x1024",
        (800, 600),
        &["/size:800x600", "/dynamic-resolution"],
    );
    let session = screenshot(
        &connected.desktop.display,
        Some(&connected.desktop.authority),
        DESKTOP_RGB,
    );
    assert_eq!((session.width, session.height), (800, 600));

    let windows = Command::new("xdotool")
        .args(["search", "--class", "xfreerdp"])
        .env("DISPLAY", &connected.client_display)
        .output()
        .unwrap();
    let windows = String::from_utf8_lossy(&windows.stdout).to_string();
    for window in windows.split_whitespace() {
        let _ = Command::new("xdotool")
            .args(["windowsize", window, "1024", "700"])
            .env("DISPLAY", &connected.client_display)
            .status();
    }
    let mut resized = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    while resized.is_none() && Instant::now() < deadline {
        match connected
            .worker
            .next(MAX_LINE_BYTES, Duration::from_secs(30))
        {
            Some(FromWorker::Resized { width, height }) => resized = Some((width, height)),
            Some(_) => {}
            None => break,
        }
    }
    assert_eq!(
        resized,
        Some((1024, 700)),
        "usherd hears of the new size\nworker: {}\nclient: {}",
        scratch.log("worker.log"),
        scratch.log("client.log")
    );
    let session = screenshot(
        &connected.desktop.display,
        Some(&connected.desktop.authority),
        DESKTOP_RGB,
    );
    assert_eq!((session.width, session.height), (1024, 700));
    wait_for_colour(&scratch, &connected, (1024, 700));
    end_and_wait(&mut scratch, &mut connected);
}

/// `xdotool` on a display (with its cookie when given); its stdout.
fn xdotool(display: &str, authority: Option<&Path>, args: &[&str]) -> String {
    let mut command = Command::new("xdotool");
    command.args(args).env("DISPLAY", display);
    if let Some(authority) = authority {
        command.env("XAUTHORITY", authority);
    }
    let output = command.output().expect("xdotool runs");
    String::from_utf8_lossy(&output.stdout).to_string()
}

#[test]
fn the_clients_mouse_and_keyboard_reach_the_desktop() {
    let mut scratch = Scratch::new("input");
    let mut connected = connect_to_desktop(&mut scratch, "800x600", (800, 600), &["/size:800x600"]);
    let session = (
        connected.desktop.display.clone(),
        connected.desktop.authority.clone(),
    );
    // A terminal on the desktop that writes what is typed into a file.
    let typed = scratch.path("typed");
    let xterm = Command::new("xterm")
        .args(["-geometry", "80x24+0+0", "-e", "sh", "-c"])
        .arg(format!("cat > {}", typed.display()))
        .env("DISPLAY", &session.0)
        .env("XAUTHORITY", &session.1)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("xterm runs");
    scratch.keep("xterm", xterm);
    let deadline = Instant::now() + Duration::from_secs(20);
    while xdotool(
        &session.0,
        Some(&session.1),
        &["search", "--class", "xterm"],
    )
    .trim()
    .is_empty()
    {
        assert!(Instant::now() < deadline, "xterm did not start");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Where the client's window is on its screen (no window manager places it).
    let window = xdotool(
        &connected.client_display,
        None,
        &["search", "--class", "xfreerdp"],
    );
    let window = window
        .split_whitespace()
        .last()
        .expect("the client's window")
        .to_string();
    let geometry = xdotool(
        &connected.client_display,
        None,
        &["getwindowgeometry", "--shell", &window],
    );
    let field = |name: &str| -> i32 {
        geometry
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name}=")))
            .and_then(|value| value.trim().parse().ok())
            .unwrap_or(0)
    };
    let (left, top) = (field("X"), field("Y"));

    // The pointer moves on the desktop as on the client's window.
    let (x, y) = (left + 120, top + 90);
    xdotool(
        &connected.client_display,
        None,
        &["mousemove", &x.to_string(), &y.to_string()],
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut location = String::new();
    while Instant::now() < deadline {
        location = xdotool(
            &session.0,
            Some(&session.1),
            &["getmouselocation", "--shell"],
        );
        if location.contains("X=120\n") && location.contains("Y=90\n") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        location.contains("X=120\n") && location.contains("Y=90\n"),
        "the desktop's pointer is at {location:?}\n{}",
        scratch.log("worker.log")
    );

    // Keys typed on the client's screen (focus follows the pointer on both, no window
    // manager) reach the terminal, shifted characters and all.
    xdotool(
        &connected.client_display,
        None,
        &["type", "--delay", "60", "Hello-RDP_42"],
    );
    xdotool(&connected.client_display, None, &["key", "Return"]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut content = String::new();
    while Instant::now() < deadline {
        content = std::fs::read_to_string(&typed).unwrap_or_default();
        if content.contains('\n') {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(content, "Hello-RDP_42\n", "{}", scratch.log("worker.log"));
    end_and_wait(&mut scratch, &mut connected);
}

#[test]
fn a_recording_that_cannot_be_written_ends_the_session() {
    let mut scratch = Scratch::new("record-fails");
    let cert = certificate(&scratch);
    let desktop = session_desktop(&mut scratch, "800x600");
    let client_display = scratch.xvfb("1024x768", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let args = [
        "/u:jit-alice",
        "/p:one-time-secret",
        "/sec:tls",
        "/size:800x600",
    ];
    let client = xfreerdp(&mut scratch, &client_display, port, &args, "client.log");
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls]));
    expect_login(&mut worker, &scratch, "jit-alice", "one-time-secret");
    worker.send(&ToWorker::Desktop(Desktop {
        session_id: "s-test".into(),
        display: desktop.display.clone(),
        cookie: desktop.cookie.clone(),
        width: 800,
        height: 600,
        reconnected: false,
        max_fps: 30,
        recording: Some(RecordingSettings {
            max_fps: 10,
            keyframe_secs: 1,
            input: true,
        }),
        clipboard: false,
        drives: false,
    }));
    match worker.next(MAX_LINE_BYTES, Duration::from_secs(30)) {
        Some(FromWorker::Record { line }) => assert!(line.contains("usher-desktop")),
        other => panic!("expected the recording's header, got {other:?}"),
    }
    // usherd stops taking the recording: the worker's writes fail.
    worker.writer.shutdown(std::net::Shutdown::Read).unwrap();
    let status = wait_exit(scratch.child(client), Duration::from_secs(30));
    assert!(
        status.is_some(),
        "the client is disconnected when the recording fails:\n{}",
        scratch.log("worker.log")
    );
    let worker_status =
        wait_exit(scratch.child(worker.index), Duration::from_secs(15)).expect("the worker exits");
    let _ = worker_status;
    assert!(
        scratch.log("worker.log").contains("the recording failed"),
        "{}",
        scratch.log("worker.log")
    );
    assert_no_panic(&scratch);
}

#[test]
fn a_client_asking_for_more_than_allowed_gets_the_largest_size() {
    let mut scratch = Scratch::new("oversize");
    let cert = certificate(&scratch);
    let desktop = session_desktop(&mut scratch, "1024x768");
    let client_display = scratch.xvfb("1600x1200", None);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let args = [
        "/u:jit-alice",
        "/p:one-time-secret",
        "/sec:tls",
        "/size:1400x1000",
    ];
    let client = xfreerdp(&mut scratch, &client_display, port, &args, "client.log");
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello_with_max(&cert, 30, vec![Security::Tls], (1024, 768)));
    match worker.next(MAX_LOGIN_LINE_BYTES, Duration::from_secs(30)) {
        Some(FromWorker::Login { width, height, .. }) => assert_eq!((width, height), (1024, 768)),
        other => panic!(
            "expected a Login, got {other:?}\n{}",
            scratch.log("worker.log")
        ),
    }
    worker.send(&ToWorker::Desktop(Desktop {
        session_id: "s-test".into(),
        display: desktop.display.clone(),
        cookie: desktop.cookie.clone(),
        width: 1024,
        height: 768,
        reconnected: false,
        max_fps: 30,
        recording: None,
        clipboard: false,
        drives: false,
    }));
    let mut connected = Connected {
        worker,
        client,
        client_display,
        desktop,
    };
    wait_for_colour(&scratch, &connected, (1024, 768));
    // The client was told 1400x1000 at first and resized to the desktop's size.
    let window = xdotool(
        &connected.client_display,
        None,
        &["search", "--class", "xfreerdp"],
    );
    let window = window
        .split_whitespace()
        .last()
        .expect("the client's window")
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut geometry = String::new();
    while Instant::now() < deadline {
        geometry = xdotool(
            &connected.client_display,
            None,
            &["getwindowgeometry", "--shell", &window],
        );
        if geometry.contains("WIDTH=1024\n") && geometry.contains("HEIGHT=768\n") {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        geometry.contains("WIDTH=1024\n") && geometry.contains("HEIGHT=768\n"),
        "the client's window: {geometry}\n{}",
        scratch.log("client.log")
    );
    end_and_wait(&mut scratch, &mut connected);
}

#[test]
fn a_client_offering_only_nla_is_told_tls_is_required() {
    let mut scratch = Scratch::new("nla-only");
    let cert = certificate(&scratch);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let mut worker = start_worker(&mut scratch, &listener);
    worker.send(&hello(&cert, 30, vec![Security::Tls, Security::Hybrid]));
    // X.224 Connection Request with RDP_NEG_REQ, requestedProtocols = PROTOCOL_HYBRID.
    client
        .write_all(&[3, 0, 0, 19, 14, 0xe0, 0, 0, 0, 0, 0, 1, 0, 8, 0, 2, 0, 0, 0])
        .unwrap();
    client
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reply = Vec::new();
    let _ = client.read_to_end(&mut reply);
    // X.224 Connection Confirm with RDP_NEG_FAILURE, SSL_REQUIRED_BY_SERVER.
    assert_eq!(
        reply,
        [3, 0, 0, 19, 14, 0xd0, 0, 0, 0, 0, 0, 3, 0, 8, 0, 1, 0, 0, 0],
        "{}",
        scratch.log("worker.log")
    );
    assert!(worker
        .next(MAX_LINE_BYTES, Duration::from_secs(5))
        .is_none());
    assert!(
        scratch.log("worker.log").contains("only NLA"),
        "{}",
        scratch.log("worker.log")
    );
    assert_no_panic(&scratch);
}
