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
    SessionDesktop { display, cookie }
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
    ToWorker::Hello {
        cert_pem: cert.0.clone(),
        key_pem: cert.1.clone(),
        security,
        login_grace_secs: grace,
        max_width: 1920,
        max_height: 1200,
    }
}

/// Accepts one connection on `listener` (bounded) and starts the worker on it.
fn start_worker(scratch: &mut Scratch, listener: &TcpListener) -> Worker {
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
        command.pre_exec(move || put_on_fd3(raw));
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
    let output = Command::new("xwd")
        .args(["-root", "-silent", "-display", display])
        .output()
        .expect("xwd runs");
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
    (matching, width * height)
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
        scratch.log("client.log").contains("ERRINFO_SERVER_DENIED_CONNECTION"),
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
