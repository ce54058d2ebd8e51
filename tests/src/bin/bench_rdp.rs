//! `cargo xtask bench rdp`: usherd's RDP next to Debian's xrdp (0.9 with xorgxrdp), one run,
//! on loopback, with the same desktop and the same client on both sides:
//!
//! - connect to first frame: from starting `xfreerdp` to the desktop's known colour on the
//!   client's own screen (an Xvfb whose framebuffer the bench reads from memory, `-fbdir`);
//! - a full-screen change loop at 1280x800: the desktop's terminal repaints all of its
//!   full-screen window `USHER_BENCH_RDP_HZ` times a second (default 60), each repaint in
//!   the next of 7 colours far apart; frames a second = colour changes the client's screen
//!   actually showed, and the server side's CPU meanwhile;
//! - CPU of an idle session (the same desktop, nothing changing);
//! - memory per session: PSS of the session's server-side processes, plus what the
//!   long-lived daemons grew by.
//!
//! Server side: usherd + its `usher-rdp` worker + the desktop's Xvfb, against xrdp (its
//! listener and per-connection process) + xrdp-sesman + the session's Xorg (xorgxrdp) +
//! xrdp-chansrv. The desktop's own programs (openbox, xterm, bash) are the same on both
//! sides and counted on neither.
//!
//! Runs are interleaved (usherd, xrdp, then xrdp, usherd, ...), each a fresh session ended
//! before the next; figures are medians. `USHER_BENCH_RUNS` (default 5) and
//! `USHER_BENCH_SCALE` (shrinks the runs and the measuring windows: a smoke test).
//! `USHER_BENCH_RDP_CLIENT` sets the client's codec flags, the same for both sides
//! (default `/bpp:32 -gfx`: xrdp 0.9 has no graphics pipeline). usherd runs with its
//! defaults (`max_fps` 30, recording on); `USHER_BENCH_RDP_MAX_FPS` sets its `max_fps`.
//!
//! xrdp runs from a scratch directory with its own xrdp.ini and sesman.ini (listening on
//! 127.0.0.1 only; sesman on 3350, the port xrdp 0.9 reads from the system's sesman.ini),
//! logs in a local account the bench makes with a password and removes at the end, and is
//! stopped at the end with everything it started.

#![deny(unsafe_code)]

use std::io::Write;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use usher_tests::*;

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;
/// The desktop's terminal background before the change loop: what "first frame" waits for.
const DESKTOP_RGB: (u8, u8, u8) = (0x2a, 0x6f, 0x97);
/// Where on the client's screen the bench looks: inside the terminal, away from its text
/// (top left) and from the client's pointer (the middle).
const PROBE: (u32, u32) = (900, 600);
/// xrdp 0.9 finds sesman through /etc/xrdp/sesman.ini's ListenPort, whatever xrdp.ini says.
const SESMAN_PORT: u16 = 3350;
const XRDP_USER: &str = "usherbenchrdp";
/// sesman's `X11DisplayOffset`: xrdp's sessions' displays are :60 and up.
const X11_DISPLAY_OFFSET: u32 = 60;

fn main() {
    if let Err(e) = run() {
        eprintln!("bench rdp: {e}");
        std::process::exit(1);
    }
}

fn scale() -> f64 {
    std::env::var("USHER_BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .filter(|s| *s > 0.0)
        .unwrap_or(1.0)
}

fn scaled(n: f64) -> f64 {
    (n * scale()).max(1.0)
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| x.is_finite());
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

// ---------------------------------------------------------------------------------------
// The desktop, the same on both sides.

/// The desktop command both servers run as the session's account: openbox, then one
/// xterm that openbox shows full-screen without decorations (its own rule: xterm's
/// `-fullscreen` leaves the window unmapped under openbox), whose shell is the change loop.
/// openbox drops a map request that arrives while it is still starting (the window stays
/// unmapped, measured here in 1 start of 3 under load), so the script maps the terminal
/// again until openbox manages it.
fn desktop_script(dir: &Path, hz: u32) -> String {
    let (r, g, b) = DESKTOP_RGB;
    format!(
        "#!/bin/sh\n\
         # The bench's desktop (the same on usherd and xrdp): a window manager, then one\n\
         # full-screen terminal whose shell repaints it on cue.\n\
         openbox --config-file {rc} >/dev/null 2>&1 &\n\
         until xprop -root _NET_SUPPORTING_WM_CHECK 2>/dev/null | grep -q window; do sleep 0.05; done\n\
         xterm -T {TITLE} -bg '#{r:02x}{g:02x}{b:02x}' -fg white -e bash {loop} {go} {hz} {out} &\n\
         term=$!\n\
         until xprop -name {TITLE} WM_STATE 2>/dev/null | grep -q Normal; do\n\
         \x20   kill -0 $term 2>/dev/null || exit 1\n\
         \x20   sleep 0.1\n\
         \x20   xdotool search --name '^{TITLE}$' windowmap >/dev/null 2>&1\n\
         done\n\
         wait $term\n",
        rc = dir.join("openbox.xml").display(),
        loop = dir.join("change-loop.sh").display(),
        go = dir.join("go").display(),
        out = dir.join("out").display(),
    )
}

const TITLE: &str = "usher-bench-desktop";

const OPENBOX_CONFIG: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<openbox_config xmlns="http://openbox.org/3.4/rc">
  <applications>
    <application class="XTerm">
      <decor>no</decor>
      <fullscreen>yes</fullscreen>
    </application>
  </applications>
</openbox_config>
"#;

/// Runs in the desktop's xterm: idle until the file `$1` exists, then repaints the whole
/// window `$2` times a second (OSC 11 sets the terminal's default background, and xterm
/// redraws all of the window), cycling through 7 colours far apart so that a frame the
/// server skips still shows as a change, until `$1` is gone; then writes how many repaints
/// it made to `$3/frames-<pid>`. Builtins only: no program is executed in the loop, so
/// usherd's exec auditing is not part of what is measured.
fn change_loop_script() -> String {
    let (r, g, b) = DESKTOP_RGB;
    format!(
        r#"go=$1 hz=$2 out=$3
exec {{pause}}<> <(:)
colours=(ff0000 00c000 0000ff ffff00 00ffff ff00ff ffffff)
period=$((1000000 / hz))
while :; do
    while [ ! -e "$go" ]; do read -t 0.5 -u "$pause"; done
    n=0
    start=${{EPOCHREALTIME/./}}
    while [ -e "$go" ]; do
        printf '\e]11;#%s\a' "${{colours[n % 7]}}"
        n=$((n + 1))
        wait_us=$((start + n * period - ${{EPOCHREALTIME/./}}))
        if ((wait_us > 0)); then
            printf -v secs '%d.%06d' $((wait_us / 1000000)) $((wait_us % 1000000))
            read -t "$secs" -u "$pause"
        fi
    done
    printf '\e]11;#{r:02x}{g:02x}{b:02x}\a'
    echo "$n" > "$out/frames-$$"
done
"#
    )
}

// ---------------------------------------------------------------------------------------
// The client's screen: an Xvfb whose framebuffer is a file (XWD), read without X.

struct ClientScreen {
    xvfb: Child,
    display: String,
    xauthority: PathBuf,
    fb: std::fs::File,
    pixel_offset: u64,
    bytes_per_line: u64,
}

impl Drop for ClientScreen {
    fn drop(&mut self) {
        stop_child(&mut self.xvfb, Duration::from_secs(3));
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl ClientScreen {
    fn start(dir: &Path) -> Result<ClientScreen, String> {
        let number = (170..260)
            .find(|n| {
                !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
                    && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
            })
            .ok_or("no free X display number")?;
        let display = format!(":{number}");
        let fbdir = dir.join("client-fb");
        std::fs::create_dir_all(&fbdir).map_err(|e| e.to_string())?;
        let xauthority = dir.join("client.xauth");
        let cookie: String = std::fs::read("/proc/sys/kernel/random/uuid")
            .map(|u| String::from_utf8_lossy(&u).replace(['-', '\n'], ""))
            .map_err(|e| e.to_string())?;
        let status = Command::new("xauth")
            .arg("-f")
            .arg(&xauthority)
            .args(["add", &display, ".", &cookie])
            .stderr(Stdio::null())
            .status()
            .map_err(|e| format!("xauth: {e}"))?;
        if !status.success() {
            return Err("xauth add failed".into());
        }
        let log = std::fs::File::create(dir.join("client-xvfb.log")).map_err(|e| e.to_string())?;
        let mut xvfb = Command::new("Xvfb")
            .arg(&display)
            .args(["-screen", "0", &format!("{WIDTH}x{HEIGHT}x24")])
            .args(["-nolisten", "tcp", "-br", "-auth"])
            .arg(&xauthority)
            .arg("-fbdir")
            .arg(&fbdir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("Xvfb: {e}"))?;
        match Self::attach(&mut xvfb, number, &fbdir) {
            Ok((fb, pixel_offset, bytes_per_line)) => Ok(ClientScreen {
                xvfb,
                display,
                xauthority,
                fb,
                pixel_offset,
                bytes_per_line,
            }),
            Err(e) => {
                stop_child(&mut xvfb, Duration::from_secs(3));
                Err(e)
            }
        }
    }

    /// Waits for the display and its framebuffer file; answers the file, where the pixels
    /// start and the bytes of a line.
    fn attach(
        xvfb: &mut Child,
        number: u32,
        fbdir: &Path,
    ) -> Result<(std::fs::File, u64, u64), String> {
        let fb_path = fbdir.join("Xvfb_screen0");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(fb_path.exists() && Path::new(&format!("/tmp/.X11-unix/X{number}")).exists()) {
            if let Ok(Some(status)) = xvfb.try_wait() {
                return Err(format!("the client's Xvfb exited: {status}"));
            }
            if Instant::now() > deadline {
                return Err("the client's Xvfb did not start".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let fb = std::fs::File::open(&fb_path).map_err(|e| e.to_string())?;
        // Xvfb fills the header in once its screen is up, a moment after the file exists.
        let mut header = [0u8; 100];
        while fb.read_exact_at(&mut header, 0).is_err() || be32(&header, 44) == 0 {
            if Instant::now() > deadline {
                return Err("the client's Xvfb framebuffer has no header".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // XWD: header_size, ..., byte_order @28, bits_per_pixel @44, bytes_per_line @48,
        // red/green/blue masks @56..68, ncolors @76; the pixels follow the colour map.
        let (byte_order, bpp) = (be32(&header, 28), be32(&header, 44));
        let masks = (be32(&header, 56), be32(&header, 60), be32(&header, 64));
        if byte_order != 0 || bpp != 32 || masks != (0xff0000, 0xff00, 0xff) {
            return Err(format!(
                "the client's framebuffer is not 32-bit LSB-first xRGB (byte order {byte_order}, {bpp} bpp, masks {masks:x?})"
            ));
        }
        let pixel_offset = be32(&header, 0) as u64 + be32(&header, 76) as u64 * 12;
        Ok((fb, pixel_offset, be32(&header, 48) as u64))
    }

    fn pixel(&self, (x, y): (u32, u32)) -> (u8, u8, u8) {
        let mut p = [0u8; 4];
        let at = self.pixel_offset + y as u64 * self.bytes_per_line + x as u64 * 4;
        match self.fb.read_exact_at(&mut p, at) {
            Ok(()) => (p[2], p[1], p[0]),
            Err(_) => (0, 0, 0),
        }
    }
}

fn distance(a: (u8, u8, u8), b: (u8, u8, u8)) -> u32 {
    (a.0 as i32 - b.0 as i32).unsigned_abs()
        + (a.1 as i32 - b.1 as i32).unsigned_abs()
        + (a.2 as i32 - b.2 as i32).unsigned_abs()
}

// ---------------------------------------------------------------------------------------
// Server-side processes: CPU and memory from /proc.

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Usherd,
    Xrdp,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Usherd => "usherd",
            Side::Xrdp => "xrdp",
        }
    }
}

struct Proc {
    pid: u32,
    ppid: u32,
    uid: u32,
    comm: String,
}

fn processes() -> Vec<Proc> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return vec![];
    };
    dir.flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let comm = stat.split_once('(')?.1.rsplit_once(')')?.0.to_string();
            let ppid = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()?;
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
            let uid = status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            Some(Proc {
                pid,
                ppid,
                uid,
                comm,
            })
        })
        .collect()
}

/// The pids under `roots` (themselves included) whose command is one of `comms`.
fn descendants(procs: &[Proc], roots: &[u32], comms: &[&str]) -> Vec<u32> {
    let mut family: Vec<u32> = roots.to_vec();
    loop {
        let before = family.len();
        for p in procs {
            if family.contains(&p.ppid) && !family.contains(&p.pid) {
                family.push(p.pid);
            }
        }
        if family.len() == before {
            break;
        }
    }
    procs
        .iter()
        .filter(|p| family.contains(&p.pid) && comms.contains(&p.comm.as_str()))
        .map(|p| p.pid)
        .collect()
}

/// CPU seconds (user + system, all threads) of `pids` so far; a pid gone counts 0.
fn cpu_seconds(pids: &[u32], ticks_per_sec: f64) -> f64 {
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
            // After the comm: state is field 3, utime 14 and stime 15 (1-based, man proc).
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / ticks_per_sec)
        })
        .sum()
}

/// PSS in KiB of each of `pids` (smaps_rollup); a pid gone counts 0.
fn pss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

// ---------------------------------------------------------------------------------------
// xrdp from a scratch directory.

struct Xrdp {
    dir: PathBuf,
    port: u16,
    sesman: Option<Child>,
    xrdp: Option<Child>,
    user_made: bool,
    password: String,
}

impl Xrdp {
    fn start(dir: &Path) -> Result<Xrdp, String> {
        for addr in ["127.0.0.1", "::1"] {
            if std::net::TcpStream::connect((addr, SESMAN_PORT)).is_ok() {
                return Err(format!(
                    "something already listens on {addr} port {SESMAN_PORT} (a system xrdp-sesman?): \
                     xrdp 0.9 reaches its sesman only there; stop it for the bench"
                ));
            }
        }
        let dir = dir.join("xrdp");
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let port = free_port();
        let password = format!(
            "Bench-{}",
            std::fs::read_to_string("/proc/sys/kernel/random/uuid")
                .map_err(|e| e.to_string())?
                .trim()
        );
        let mut xrdp = Xrdp {
            dir: dir.clone(),
            port,
            sesman: None,
            xrdp: None,
            user_made: false,
            password,
        };
        if user_exists(XRDP_USER) {
            // A killed run's account: gone first, so that the password is this run's.
            remove_bench_user();
        }
        run_ok(Command::new("useradd").args(["-m", "-s", "/bin/bash", XRDP_USER]))?;
        xrdp.user_made = true;
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .map_err(|e| format!("chpasswd: {e}"))?;
        chpasswd
            .stdin
            .take()
            .ok_or("chpasswd: no stdin")?
            .write_all(format!("{XRDP_USER}:{}\n", xrdp.password).as_bytes())
            .map_err(|e| e.to_string())?;
        if !chpasswd.wait().map_err(|e| e.to_string())?.success() {
            return Err("chpasswd failed".into());
        }
        run_ok(
            Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                ])
                .args(["-subj", "/CN=localhost", "-keyout"])
                .arg(dir.join("key.pem"))
                .arg("-out")
                .arg(dir.join("cert.pem"))
                .stderr(Stdio::null()),
        )?;
        std::fs::write(dir.join("xrdp.ini"), xrdp_ini(&dir, port)).map_err(|e| e.to_string())?;
        std::fs::write(
            dir.join("sesman.ini"),
            sesman_ini(&dir, &dir.parent().unwrap_or(&dir).join("desktop.sh")),
        )
        .map_err(|e| e.to_string())?;
        let spawn = |program: &str, config: &str, log: &str| {
            let log = std::fs::File::create(dir.join(log)).map_err(|e| e.to_string())?;
            Command::new(program)
                .args(["--nodaemon", "--config"])
                .arg(dir.join(config))
                .stdin(Stdio::null())
                .stdout(log.try_clone().map_err(|e| e.to_string())?)
                .stderr(log)
                .spawn()
                .map_err(|e| format!("{program}: {e}"))
        };
        xrdp.sesman = Some(spawn("xrdp-sesman", "sesman.ini", "sesman.out")?);
        xrdp.xrdp = Some(spawn("xrdp", "xrdp.ini", "xrdp.out")?);
        wait_for_port(port, Duration::from_secs(10))
            .map_err(|e| format!("xrdp did not listen: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !["127.0.0.1", "::1"]
            .iter()
            .any(|a| std::net::TcpStream::connect((*a, SESMAN_PORT)).is_ok())
        {
            if Instant::now() > deadline {
                return Err("xrdp-sesman did not listen".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(xrdp)
    }

    fn roots(&self) -> Vec<u32> {
        [&self.xrdp, &self.sesman]
            .iter()
            .filter_map(|c| c.as_ref().map(|c| c.id()))
            .collect()
    }

    /// Ends the bench user's session as an administrator would (SIGTERM: the X server
    /// removes its socket and lock), SIGKILL for what is left; sesman tears down the rest.
    fn end_session(&self) {
        signal_user("-TERM");
        if !wait_user_gone(XRDP_USER, 5) {
            signal_user("-KILL");
        }
        remove_stale_x_locks(X11_DISPLAY_OFFSET..X11_DISPLAY_OFFSET + 50);
    }

    fn log_tail(&self) -> String {
        let mut s = String::new();
        for f in ["xrdp.log", "sesman.log"] {
            let t = std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            s += &format!(
                "--- {f}\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    }
}

impl Drop for Xrdp {
    fn drop(&mut self) {
        for mut child in [self.xrdp.take(), self.sesman.take()].into_iter().flatten() {
            stop_child(&mut child, Duration::from_secs(5));
        }
        if self.user_made {
            remove_bench_user();
        }
    }
}

fn signal_user(signal: &str) {
    let _ = Command::new("pkill")
        .args([signal, "-u", XRDP_USER])
        .status();
}

/// The lock and socket of each display in `displays` whose X server is dead (killed
/// before it could remove them): xrdp's sessions take display numbers from 60 on.
fn remove_stale_x_locks(displays: std::ops::Range<u32>) {
    for n in displays {
        let lock = format!("/tmp/.X{n}-lock");
        let Ok(text) = std::fs::read_to_string(&lock) else {
            continue;
        };
        let Ok(pid) = text.trim().parse::<u32>() else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{n}"));
            let _ = std::fs::remove_file(&lock);
        }
    }
}

fn remove_bench_user() {
    signal_user("-TERM");
    wait_user_gone(XRDP_USER, 3);
    for _ in 0..20 {
        signal_user("-KILL");
        std::thread::sleep(Duration::from_millis(100));
        let left = Command::new("pgrep")
            .args(["-u", XRDP_USER])
            .stdout(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if !left {
            break;
        }
    }
    let home = if user_exists(XRDP_USER) {
        home_of(XRDP_USER)
    } else {
        PathBuf::from("/home").join(XRDP_USER)
    };
    // A chansrv killed with the session leaves its FUSE mount (drive redirection) behind.
    if let Ok(mounts) = std::fs::read_to_string("/proc/mounts") {
        for mount_point in mounts.lines().filter_map(|l| l.split_whitespace().nth(1)) {
            if Path::new(mount_point).starts_with(&home) {
                let _ = Command::new("umount").args(["-l", mount_point]).status();
            }
        }
    }
    let _ = Command::new("userdel")
        .args(["-r", XRDP_USER])
        .stderr(Stdio::null())
        .status();
    // userdel leaves the home when something in it was busy; the account is ours.
    if home.starts_with("/home/") && home.ends_with(XRDP_USER) {
        let _ = std::fs::remove_dir_all(&home);
    }
    remove_stale_x_locks(X11_DISPLAY_OFFSET..X11_DISPLAY_OFFSET + 50);
}

fn xrdp_ini(dir: &Path, port: u16) -> String {
    format!(
        "[Globals]\n\
         ini_version=1\n\
         fork=true\n\
         port=tcp://127.0.0.1:{port}\n\
         use_vsock=false\n\
         tcp_nodelay=true\n\
         tcp_keepalive=true\n\
         security_layer=tls\n\
         crypt_level=none\n\
         certificate={d}/cert.pem\n\
         key_file={d}/key.pem\n\
         ssl_protocols=TLSv1.2, TLSv1.3\n\
         autorun=Xorg\n\
         allow_channels=true\n\
         allow_multimon=false\n\
         bitmap_cache=true\n\
         bitmap_compression=true\n\
         bulk_compression=true\n\
         max_bpp=32\n\
         new_cursors=true\n\
         use_fastpath=both\n\
         \n\
         [Logging]\n\
         LogFile={d}/xrdp.log\n\
         LogLevel=INFO\n\
         EnableSyslog=false\n\
         \n\
         # Like usherd without clipboard and drive redirection: no channel moves data.\n\
         [Channels]\n\
         rdpdr=false\n\
         rdpsnd=false\n\
         drdynvc=false\n\
         cliprdr=false\n\
         rail=false\n\
         xrdpvr=false\n\
         tcutils=false\n\
         \n\
         [Xorg]\n\
         name=Xorg\n\
         lib=libxup.so\n\
         username=ask\n\
         password=ask\n\
         ip=127.0.0.1\n\
         port=-1\n\
         code=20\n",
        d = dir.display()
    )
}

fn sesman_ini(dir: &Path, desktop: &Path) -> String {
    format!(
        "[Globals]\n\
         ListenAddress=127.0.0.1\n\
         ListenPort={SESMAN_PORT}\n\
         EnableUserWindowManager=false\n\
         UserWindowManager=startwm.sh\n\
         DefaultWindowManager={desktop}\n\
         ReconnectScript=/bin/true\n\
         \n\
         [Security]\n\
         AllowRootLogin=false\n\
         MaxLoginRetry=4\n\
         TerminalServerUsers=tsusers\n\
         TerminalServerAdmins=tsadmins\n\
         AlwaysGroupCheck=false\n\
         \n\
         [Sessions]\n\
         X11DisplayOffset={X11_DISPLAY_OFFSET}\n\
         MaxSessions=50\n\
         KillDisconnected=true\n\
         DisconnectedTimeLimit=0\n\
         IdleTimeLimit=0\n\
         Policy=Default\n\
         \n\
         [Logging]\n\
         LogFile={d}/sesman.log\n\
         LogLevel=INFO\n\
         EnableSyslog=false\n\
         \n\
         [Xorg]\n\
         param=/usr/lib/xorg/Xorg\n\
         param=-config\n\
         param=xrdp/xorg.conf\n\
         param=-noreset\n\
         param=-nolisten\n\
         param=tcp\n\
         param=-logfile\n\
         param=.xorgxrdp.%s.log\n\
         \n\
         [Chansrv]\n\
         EnableFuseMount=false\n\
         FuseMountName=thinclient_drives\n\
         FileUmask=077\n\
         \n\
         [ChansrvLogging]\n\
         LogLevel=INFO\n\
         EnableSyslog=false\n\
         \n\
         [SessionVariables]\n",
        desktop = desktop.display(),
        d = dir.display()
    )
}

/// SIGTERM (a server removes its socket and lock, a client says goodbye), then SIGKILL
/// after `grace`.
fn stop_child(child: &mut Child, grace: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn run_ok(cmd: &mut Command) -> Result<(), String> {
    let st = cmd
        .status()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("{cmd:?}: {st}"))
    }
}

// ---------------------------------------------------------------------------------------
// usherd.

/// usherd's RDP configuration for the bench: loopback, the bench's desktop command, the
/// same largest size as the client asks for.
fn usherd_rdp_config(port: u16, desktop: &Path) -> String {
    let mut config = format!(
        "[policy]\nallowed_profiles = [\"default\", \"bench-rdp\"]\n\n\
         [rdp]\nlisten = [\"127.0.0.1:{port}\"]\ndesktop = \"{}\"\n",
        desktop.display()
    );
    if let Ok(fps) = std::env::var("USHER_BENCH_RDP_MAX_FPS") {
        config += &format!("max_fps = {fps}\n");
    }
    config
}

/// Desktops allowed; every exec audited, none blocked (as the default profile).
const USHERD_PROFILE: &str = "name = \"bench-rdp\"\nrdp = true\n[exec]\nmode = \"audit\"\n";

// ---------------------------------------------------------------------------------------
// One run on one side.

struct Figures {
    connect_ms: f64,
    fps: f64,
    repaints_per_sec: f64,
    loop_cpu_pct: f64,
    idle_cpu_pct: f64,
    pss_mib: f64,
}

struct Bench {
    dir: PathBuf,
    client: ClientScreen,
    client_flags: Vec<String>,
    idle_secs: f64,
    loop_secs: f64,
    ticks: f64,
}

/// One session on one server: connect, idle, change loop, end.
struct Session<'a> {
    bench: &'a Bench,
    side: Side,
    port: u16,
    user: String,
    password: String,
    /// The long-lived server processes (not the session's own).
    daemons: Vec<u32>,
}

const USHERD_SIDE: &[&str] = &["usherd", "usher-rdp", "Xvfb"];
const XRDP_SIDE: &[&str] = &["xrdp", "xrdp-sesman", "Xorg", "xrdp-chansrv"];

impl Session<'_> {
    fn server_pids(&self) -> Vec<u32> {
        let procs = processes();
        let comms = match self.side {
            Side::Usherd => USHERD_SIDE,
            Side::Xrdp => XRDP_SIDE,
        };
        let mut pids = descendants(&procs, &self.daemons, comms);
        if self.side == Side::Usherd {
            // The desktop's X server runs as the session's account, wherever usherd
            // parented it.
            if let Some(uid) = uid_of(&self.user) {
                for p in &procs {
                    if p.uid == uid && p.comm == "Xvfb" && !pids.contains(&p.pid) {
                        pids.push(p.pid);
                    }
                }
            }
        }
        pids
    }

    fn measure(&self) -> Result<Figures, String> {
        let b = self.bench;
        let daemons_pss_before: u64 = self.daemons.iter().map(|p| pss_kib(*p)).sum();
        // The previous client is gone and its window with it: the screen is the client
        // display's black root again, not the desktop's colour.
        let deadline = Instant::now() + Duration::from_secs(10);
        while distance(b.client.pixel(PROBE), DESKTOP_RGB) < 24 {
            if Instant::now() > deadline {
                return Err("the client's screen still shows a desktop before connecting".into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut client = Command::new("xfreerdp");
        client
            .arg(format!("/v:127.0.0.1:{}", self.port))
            .arg(format!("/u:{}", self.user))
            .arg(format!("/p:{}", self.password))
            .args(["/cert:ignore", "/sec:tls", "-clipboard", "/log-level:WARN"])
            .arg(format!("/size:{WIDTH}x{HEIGHT}"))
            .args(&b.client_flags)
            .env("DISPLAY", &b.client.display)
            .env("XAUTHORITY", &b.client.xauthority)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(b.dir.join(format!("client-{}.log", self.side.name())))
                    .map_err(|e| e.to_string())?,
            );
        let start = Instant::now();
        let mut client = client.spawn().map_err(|e| format!("xfreerdp: {e}"))?;
        let connected = loop {
            if distance(b.client.pixel(PROBE), DESKTOP_RGB) < 24 {
                break Some(start.elapsed());
            }
            if start.elapsed() > Duration::from_secs(60) {
                break None;
            }
            if let Ok(Some(st)) = client.try_wait() {
                return Err(format!(
                    "xfreerdp exited with {st} before the desktop showed"
                ));
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let result = (|| {
            let connect = connected.ok_or_else(|| {
                let (r, g, b) = b.client.pixel(PROBE);
                format!(
                    "the desktop did not show within 60 s (the client's screen shows #{r:02x}{g:02x}{b:02x} at {PROBE:?})"
                )
            })?;
            // The desktop settles (the window manager, the terminal's first paints).
            std::thread::sleep(Duration::from_secs(2));
            let pids = self.server_pids();
            if pids.len() <= self.daemons.len() {
                return Err("no session process of the server found".to_string());
            }

            let cpu0 = cpu_seconds(&pids, b.ticks);
            let t0 = Instant::now();
            std::thread::sleep(Duration::from_secs_f64(b.idle_secs));
            let idle_cpu_pct =
                100.0 * (cpu_seconds(&pids, b.ticks) - cpu0) / t0.elapsed().as_secs_f64();

            let session_pss: u64 = pids
                .iter()
                .filter(|p| !self.daemons.contains(p))
                .map(|p| pss_kib(*p))
                .sum();
            let daemons_growth = self
                .daemons
                .iter()
                .map(|p| pss_kib(*p))
                .sum::<u64>()
                .saturating_sub(daemons_pss_before);
            let pss_mib = (session_pss + daemons_growth) as f64 / 1024.0;

            let go = b.dir.join("go");
            std::fs::write(&go, "").map_err(|e| e.to_string())?;
            // The loop starts within its half-second poll; then a second to warm up.
            std::thread::sleep(Duration::from_millis(1500));
            let pids = self.server_pids();
            let stop = Arc::new(AtomicBool::new(false));
            let changes = std::thread::scope(|s| {
                let counter = s.spawn(|| {
                    let mut last = b.client.pixel(PROBE);
                    let mut changes = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let now = b.client.pixel(PROBE);
                        if distance(now, last) > 96 {
                            changes += 1;
                            last = now;
                        }
                        std::thread::sleep(Duration::from_micros(500));
                    }
                    changes
                });
                let cpu0 = cpu_seconds(&pids, b.ticks);
                let t0 = Instant::now();
                std::thread::sleep(Duration::from_secs_f64(b.loop_secs));
                let cpu = cpu_seconds(&pids, b.ticks) - cpu0;
                let secs = t0.elapsed().as_secs_f64();
                stop.store(true, Ordering::Relaxed);
                let changes = counter.join().unwrap_or(0);
                (changes as f64 / secs, 100.0 * cpu / secs)
            });
            let _ = std::fs::remove_file(&go);
            let (fps, loop_cpu_pct) = changes;
            // The loop's own count: how many repaints the desktop made (all of its time
            // with the file present, warm-up included).
            let repaints_per_sec = read_repaints(&b.dir.join("out"), b.loop_secs + 1.5);
            Ok(Figures {
                connect_ms: connect.as_secs_f64() * 1000.0,
                fps,
                repaints_per_sec,
                loop_cpu_pct,
                idle_cpu_pct,
                pss_mib,
            })
        })();
        // xfreerdp closes the connection and its window as a user's client would.
        stop_child(&mut client, Duration::from_secs(5));
        result
    }
}

/// The change loop's repaints a second, from the file it writes when the go file goes
/// (waits a little for it); NaN when it did not write one.
fn read_repaints(out: &Path, secs: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let total: Option<u64> = std::fs::read_dir(out).ok().and_then(|d| {
            let files: Vec<PathBuf> = d.flatten().map(|e| e.path()).collect();
            if files.is_empty() {
                return None;
            }
            Some(
                files
                    .iter()
                    .filter_map(|f| std::fs::read_to_string(f).ok()?.trim().parse::<u64>().ok())
                    .sum(),
            )
        });
        if let Some(n) = total {
            if let Ok(d) = std::fs::read_dir(out) {
                for e in d.flatten() {
                    let _ = std::fs::remove_file(e.path());
                }
            }
            return n as f64 / secs;
        }
        if Instant::now() > deadline {
            return f64::NAN;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn uid_of(user: &str) -> Option<u32> {
    passwd()
        .into_iter()
        .find(|(name, _)| name == user)
        .map(|(_, uid)| uid)
}

/// Waits until no process of `user` is left (the session ended), at most `secs`.
fn wait_user_gone(user: &str, secs: u64) -> bool {
    let Some(uid) = uid_of(user) else {
        return true;
    };
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if pids_of_uid(uid).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

// ---------------------------------------------------------------------------------------

fn run() -> Result<(), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the benchmark runs as root (it starts xrdp and makes accounts)".into());
    }
    let runs = (env_or("USHER_BENCH_RUNS", 5.0) * scale()).round().max(1.0) as usize;
    let idle_secs = scaled(10.0);
    let loop_secs = scaled(10.0);
    let hz: u32 = env_or("USHER_BENCH_RDP_HZ", 60);
    let client_flags: Vec<String> = std::env::var("USHER_BENCH_RDP_CLIENT")
        .unwrap_or_else(|_| "/bpp:32 -gfx".into())
        .split_whitespace()
        .map(String::from)
        .collect();

    let dir = PathBuf::from(format!("/var/tmp/usher-bench-rdp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("out")).map_err(|e| e.to_string())?;
    let _cleanup = RemoveDir(dir.clone());
    // The session accounts of both servers read the scripts and write the loop's count.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    std::fs::set_permissions(dir.join("out"), std::fs::Permissions::from_mode(0o1777))
        .map_err(|e| e.to_string())?;
    let desktop = dir.join("desktop.sh");
    std::fs::write(&desktop, desktop_script(&dir, hz)).map_err(|e| e.to_string())?;
    std::fs::set_permissions(&desktop, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| e.to_string())?;
    std::fs::write(dir.join("change-loop.sh"), change_loop_script()).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("openbox.xml"), OPENBOX_CONFIG).map_err(|e| e.to_string())?;

    let client = ClientScreen::start(&dir)?;
    let bench = Bench {
        dir: dir.clone(),
        client,
        client_flags,
        idle_secs,
        loop_secs,
        ticks: ticks_per_sec(),
    };

    let xrdp = Xrdp::start(&dir)?;
    let rdp_port = free_port();
    let agent = TestAgent::start_with(Options {
        extra_config: usherd_rdp_config(rdp_port, &desktop),
        profiles: vec![("bench-rdp.toml".into(), USHERD_PROFILE.into())],
        ..Default::default()
    });
    wait_for_port(rdp_port, Duration::from_secs(20))
        .map_err(|e| format!("usherd's RDP port: {e}\n{}", agent.log()))?;

    let mut figures: Vec<(Side, Figures)> = Vec::new();
    for run in 0..runs {
        let order = if run % 2 == 0 {
            [Side::Usherd, Side::Xrdp]
        } else {
            [Side::Xrdp, Side::Usherd]
        };
        for side in order {
            let f = match side {
                Side::Usherd => {
                    let secret = format!("bench-secret-{run}");
                    let login = agent.login(&format!("rdp{run}"));
                    let mut claims = agent.claims(&login, 3600);
                    claims.profile = Some("bench-rdp".into());
                    claims.secret_hash = Some(
                        usher::grant::console_secret_hash(&secret)
                            .map_err(|e| format!("secret hash: {e}"))?,
                    );
                    let out = agent.install(&agent.sign(&claims));
                    if !out.status.success() {
                        return Err(format!(
                            "grant install: {}",
                            String::from_utf8_lossy(&out.stderr)
                        ));
                    }
                    let session = Session {
                        bench: &bench,
                        side,
                        port: rdp_port,
                        user: login.clone(),
                        password: secret,
                        daemons: vec![agent.pid()],
                    };
                    let f = session.measure();
                    // The grant's end ends the desktop and removes the account.
                    agent.usher(&["grant", "revoke", &claims.jti]);
                    if !wait_user_gone(&login, 30) {
                        eprintln!(
                            "bench rdp: usherd's session of {login} outlived its grant by 30 s"
                        );
                    }
                    f.map_err(|e| format!("{e}\nusherd log:\n{}", tail(&agent.log(), 30)))?
                }
                Side::Xrdp => {
                    let session = Session {
                        bench: &bench,
                        side,
                        port: xrdp.port,
                        user: XRDP_USER.into(),
                        password: xrdp.password.clone(),
                        daemons: xrdp.roots(),
                    };
                    let f = session.measure();
                    xrdp.end_session();
                    if !wait_user_gone(XRDP_USER, 30) {
                        eprintln!("bench rdp: xrdp's session outlived its end by 30 s");
                    }
                    f.map_err(|e| format!("{e}\n{}", xrdp.log_tail()))?
                }
            };
            eprintln!(
                "bench rdp: run {}/{runs} {:6}: first frame {:7.1} ms, {:5.1} fps shown ({:5.1} repaints/s), loop CPU {:5.1} %, idle CPU {:4.2} %, {:6.1} MiB",
                run + 1,
                side.name(),
                f.connect_ms,
                f.fps,
                f.repaints_per_sec,
                f.loop_cpu_pct,
                f.idle_cpu_pct,
                f.pss_mib
            );
            figures.push((side, f));
        }
    }
    drop(agent);
    drop(xrdp);

    report(&figures, runs, hz, &bench);
    Ok(())
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

struct RemoveDir(PathBuf);

impl Drop for RemoveDir {
    fn drop(&mut self) {
        if std::env::var_os("USHER_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A line of the table: its label, the figure, which way is better.
type Row = (&'static str, fn(&Figures) -> f64, &'static str);

/// usherd's figure over xrdp's; a ratio to 0 has no meaning.
fn ratio(usherd: f64, xrdp: f64) -> String {
    if xrdp > 0.0 && usherd.is_finite() {
        format!("{:.2}x", usherd / xrdp)
    } else {
        "-".to_string()
    }
}

fn report(figures: &[(Side, Figures)], runs: usize, hz: u32, bench: &Bench) {
    let pick = |side: Side, f: fn(&Figures) -> f64| {
        median(
            figures
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, x)| f(x))
                .collect(),
        )
    };
    let smoke = if scale() != 1.0 {
        " [USHER_BENCH_SCALE set: a smoke test, not a measurement]"
    } else {
        ""
    };
    println!(
        "usher bench rdp: usherd vs xrdp 0.9 + xorgxrdp, {runs} interleaved runs each, medians{smoke}"
    );
    println!("  {:44} {:>10} {:>10} {:>8}", "", "usherd", "xrdp", "ratio");
    let rows: [Row; 6] = [
        (
            "connect to first frame (ms)",
            |f| f.connect_ms,
            "lower is better",
        ),
        (
            "frames shown per second, change loop",
            |f| f.fps,
            "higher is better",
        ),
        (
            "  desktop's repaints per second",
            |f| f.repaints_per_sec,
            "the offered load",
        ),
        (
            "server CPU during the loop (% of a core)",
            |f| f.loop_cpu_pct,
            "lower is better",
        ),
        (
            "server CPU, idle session (% of a core)",
            |f| f.idle_cpu_pct,
            "lower is better",
        ),
        (
            "memory per session, PSS (MiB)",
            |f| f.pss_mib,
            "lower is better",
        ),
    ];
    for (label, f, note) in rows {
        let (u, x) = (pick(Side::Usherd, f), pick(Side::Xrdp, f));
        println!(
            "  {label:44} {u:>10.2} {x:>10.2} {:>8}  ({note})",
            ratio(u, x)
        );
    }
    let cpu_per_frame = |side: Side| {
        median(
            figures
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, f)| 10.0 * f.loop_cpu_pct / f.fps)
                .collect(),
        )
    };
    let (u, x) = (cpu_per_frame(Side::Usherd), cpu_per_frame(Side::Xrdp));
    println!(
        "  {:44} {u:>10.2} {x:>10.2} {:>8}  (lower is better)",
        "server CPU per frame shown (ms)",
        ratio(u, x)
    );
    println!(
        "  (CPU from /proc counts clock ticks, {:.0} a second: below {:.2} % over the idle \
         window reads as 0)",
        bench.ticks,
        100.0 / bench.ticks / bench.idle_secs
    );
    println!(
        "How it was made fair: the same desktop command on both (openbox, then a full-screen \
         xterm whose shell repaints it in 7 colours at {hz} Hz with builtins only), the same \
         client (xfreerdp {} /sec:tls -clipboard /size:{WIDTH}x{HEIGHT}, in its own Xvfb whose \
         framebuffer the bench reads directly: a frame is a colour change the client's screen \
         showed), loopback only, runs interleaved (usherd first in runs 1, 3, 5..., xrdp first in 2, 4...), \
         each a fresh session ended before the next. Server side: usherd + usher-rdp + Xvfb \
         against xrdp + xrdp-sesman + Xorg (xorgxrdp) + xrdp-chansrv, CPU from /proc (user + \
         system), memory as PSS of the session's processes plus the daemons' growth; the \
         desktop's own programs are counted on neither. xrdp's channels are off (usherd has no \
         clipboard or drives unless a profile allows them). Differences left in: usherd records \
         the desktop (recording on, as deployed) and makes the session's account at login (its \
         accounts live only with a grant); xrdp records nothing and its account exists.",
        bench.client_flags.join(" ")
    );
}
