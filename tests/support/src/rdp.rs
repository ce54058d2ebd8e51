//! The RDP client side of the tests and the benchmark: a private X display for the client
//! (Xvfb with its own cookie), the real FreeRDP client (`xfreerdp`) on it, screenshots of
//! its window (`xwd`, parsed here) checked for a known colour, and typing into it with
//! `xdotool` (XTEST on the client's display, so FreeRDP sends real scancodes).
//!
//! One client per display: windows on an Xvfb without a window manager overlap, and a
//! screenshot of a covered window shows what covers it.

use crate::wait::{poll_until, TimedOut};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// The displays tried first for clients: usherd gives its desktops :20 and above, and
/// a client's X server there could be taken for a desktop's while it starts.
const CLIENT_DISPLAYS: std::ops::Range<u32> = 1..20;
/// How long Xvfb gets to say which display it took.
const XVFB_START: Duration = Duration::from_secs(15);
/// How often a client's window and screen are looked at again.
const LOOK_AGAIN: Duration = Duration::from_millis(250);
/// Milliseconds between two keys typed into the client (what a quick typist does; the
/// client and the worker see every key as its own event).
const TYPING_DELAY_MS: u32 = 40;

static NEXT_DIR: AtomicU32 = AtomicU32::new(0);

#[derive(Debug, thiserror::Error)]
pub enum RdpError {
    #[error("{program} does not run ({source}): `cargo xtask setup` installs it")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("Xvfb did not give a display: {log}")]
    NoDisplay { log: String },
    #[error(transparent)]
    TimedOut(#[from] TimedOut),
    #[error("xfreerdp exited ({status}) before {waiting_for}:\n{log}")]
    ClientExited {
        status: ExitStatus,
        waiting_for: String,
        log: String,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Tool {
        program: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("the client shows no window:\n{log}")]
    NoWindow { log: String },
    #[error("the screenshot cannot be read: {0}")]
    Screenshot(#[from] XwdError),
    #[error("the client's window never showed {colour} on {percent}% of it; it shows {shown}")]
    ColourNotShown {
        colour: Rgb,
        percent: u32,
        shown: String,
    },
}

/// A private X display for RDP clients: Xvfb on the first free display number below
/// usherd's (`CLIENT_DISPLAYS`), no TCP, its own MIT-MAGIC-COOKIE-1. Dropping it ends the server and
/// removes its directory.
pub struct ClientDisplay {
    /// `:N`.
    pub display: String,
    /// The cookie file the display's clients are given (`XAUTHORITY`).
    pub xauthority: PathBuf,
    /// The display's own scratch directory (clients' homes and logs go below it).
    pub dir: PathBuf,
    xvfb: Child,
    /// Xvfb wrote the display number here; kept open so that it never writes into a
    /// closed pipe.
    _displayfd: ChildStdout,
}

impl ClientDisplay {
    /// A 1600x1200 display, room for a client window of up to that size.
    pub fn start() -> Result<ClientDisplay, RdpError> {
        ClientDisplay::start_sized(1600, 1200)
    }

    pub fn start_sized(width: u16, height: u16) -> Result<ClientDisplay, RdpError> {
        let dir = std::env::temp_dir().join(format!(
            "usher-rdp-client-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|source| RdpError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })?;
        let xauthority = dir.join("Xauthority");
        std::fs::write(&xauthority, wildcard_cookie_entry(&random_cookie()?)).map_err(
            |source| RdpError::Io {
                what: format!("writing {}", xauthority.display()),
                source,
            },
        )?;
        let log_path = dir.join("Xvfb.log");
        // The display numbers usherd leaves to test rigs first, then whichever is free.
        let started = CLIENT_DISPLAYS.map(Some).chain([None]).find_map(|number| {
            start_xvfb(number, &xauthority, (width, height), &log_path).transpose()
        });
        let (xvfb, number, displayfd) = match started {
            Some(started) => started?,
            None => {
                return Err(RdpError::NoDisplay {
                    log: std::fs::read_to_string(&log_path).unwrap_or_default(),
                })
            }
        };
        Ok(ClientDisplay {
            display: format!(":{number}"),
            xauthority,
            dir,
            xvfb,
            _displayfd: displayfd,
        })
    }

    /// `program` with this display and its cookie in the environment.
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env("DISPLAY", &self.display)
            .env("XAUTHORITY", &self.xauthority);
        command
    }

    /// Runs `program args` on this display (bounded by `timeout(1)`), and returns its
    /// standard output.
    pub fn run(&self, program: &str, args: &[&str]) -> Result<Vec<u8>, RdpError> {
        let out = self
            .command("timeout")
            .arg("20")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RdpError::Spawn {
                program: program.into(),
                source,
            })?;
        if !out.status.success() {
            return Err(RdpError::Tool {
                program: format!("{program} {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// The whole screen of the display.
    pub fn screenshot(&self) -> Result<Image, RdpError> {
        Ok(Image::from_xwd(&self.run("xwd", &["-root", "-silent"])?)?)
    }
}

impl Drop for ClientDisplay {
    fn drop(&mut self) {
        end_process_group(&mut self.xvfb);
        if std::env::var_os("USHER_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Starts Xvfb on display `number` (None: the first free one), with the cookie file
/// `xauthority`; its display number once it accepts connections, or None if it could not
/// have that display.
fn start_xvfb(
    number: Option<u32>,
    xauthority: &Path,
    (width, height): (u16, u16),
    log_path: &Path,
) -> Result<Option<(Child, u32, ChildStdout)>, RdpError> {
    let log = std::fs::File::create(log_path).map_err(|source| RdpError::Io {
        what: format!("creating {}", log_path.display()),
        source,
    })?;
    let mut command = Command::new("Xvfb");
    if let Some(n) = number {
        command.arg(format!(":{n}"));
    }
    // `-displayfd`: it says the number once it listens. `-noreset`: an X server resets
    // when its last client leaves, and would forget the root's colour set by a client
    // that has exited.
    let mut xvfb = command
        .args(["-displayfd", "1", "-nolisten", "tcp", "-noreset", "-auth"])
        .arg(xauthority)
        .args(["-screen", "0", &format!("{width}x{height}x24")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        // Its own process group: it goes with the guard even when a test panics.
        .process_group(0)
        .spawn()
        .map_err(|source| RdpError::Spawn {
            program: "Xvfb".into(),
            source,
        })?;
    let listening = xvfb.stdout.take().and_then(read_display_number);
    match listening {
        Some((number, displayfd)) => Ok(Some((xvfb, number, displayfd))),
        None => {
            end_process_group(&mut xvfb);
            Ok(None)
        }
    }
}

/// Reads the display number Xvfb writes on its `-displayfd`, for at most `XVFB_START`.
fn read_display_number(stdout: ChildStdout) -> Option<(u32, ChildStdout)> {
    let (sender, receiver) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let number = read.ok().and_then(|_| line.trim().parse::<u32>().ok());
        let _ = sender.send((number, reader.into_inner()));
    });
    match receiver.recv_timeout(XVFB_START) {
        Ok((Some(number), stdout)) => Some((number, stdout)),
        _ => None,
    }
}

/// SIGTERM to the process group of `child` (it was started as a group leader), then
/// SIGKILL to whatever is left of it after two seconds.
fn end_process_group(child: &mut Child) {
    let group = format!("-{}", child.id());
    let _ = Command::new("kill")
        .args(["-TERM", "--", &group])
        .stderr(Stdio::null())
        .status();
    let _ = poll_until(
        "the process to exit",
        Duration::from_secs(2),
        Duration::from_millis(20),
        || child.try_wait().ok().flatten(),
    );
    let _ = Command::new("kill")
        .args(["-KILL", "--", &group])
        .stderr(Stdio::null())
        .status();
    let _ = child.kill();
    let _ = child.wait();
}

fn random_cookie() -> Result<[u8; 16], RdpError> {
    let mut cookie = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut random| random.read_exact(&mut cookie))
        .map_err(|source| RdpError::Io {
            what: "reading /dev/urandom".into(),
            source,
        })?;
    Ok(cookie)
}

/// One Xauthority entry for `cookie` that matches every display (FamilyWild, no address,
/// no display number): the display number is known only once Xvfb has chosen it, and the
/// server itself reads every entry of its `-auth` file whatever its address.
fn wildcard_cookie_entry(cookie: &[u8; 16]) -> Vec<u8> {
    const FAMILY_WILD: u16 = 0xffff;
    const PROTOCOL: &[u8] = b"MIT-MAGIC-COOKIE-1";
    let mut entry = Vec::new();
    entry.extend_from_slice(&FAMILY_WILD.to_be_bytes());
    entry.extend_from_slice(&0u16.to_be_bytes()); // address
    entry.extend_from_slice(&0u16.to_be_bytes()); // display number
    entry.extend_from_slice(&(PROTOCOL.len() as u16).to_be_bytes());
    entry.extend_from_slice(PROTOCOL);
    entry.extend_from_slice(&(cookie.len() as u16).to_be_bytes());
    entry.extend_from_slice(cookie);
    entry
}

/// How the client deals with the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertCheck {
    /// `/cert:ignore`: any certificate.
    Ignore,
    /// `/cert:fingerprint:sha256:HEX`: only the certificate with this SHA-256 (hex, with or
    /// without colons); any other is refused (the client would ask, and its stdin is
    /// empty: it exits with 143, its "TLS connect failed").
    Sha256(String),
    /// `/cert:tofu`: accepted and remembered in the client's home on first sight.
    TrustOnFirstUse,
}

/// The protocol security the client insists on (`/sec:`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Security {
    /// `/sec:tls`: TLS, the password in the Client Info PDU.
    Tls,
    /// `/sec:nla`: CredSSP over TLS.
    Nla,
    /// No `/sec:`: the client offers what it supports and the server chooses.
    Negotiated,
}

/// An `xfreerdp` command line against usherd on loopback.
#[derive(Debug, Clone)]
pub struct RdpOptions {
    pub port: u16,
    pub login: String,
    pub password: String,
    pub width: u16,
    pub height: u16,
    pub security: Security,
    pub cert: CertCheck,
    /// Further options, e.g. `/rfx`, `/gfx`, `/bpp:16`.
    pub extra: Vec<String>,
}

impl RdpOptions {
    /// `/sec:tls`, any certificate, 1024x768.
    pub fn new(port: u16, login: &str, password: &str) -> RdpOptions {
        RdpOptions {
            port,
            login: login.into(),
            password: password.into(),
            width: 1024,
            height: 768,
            security: Security::Tls,
            cert: CertCheck::Ignore,
            extra: Vec::new(),
        }
    }

    pub fn security(mut self, security: Security) -> RdpOptions {
        self.security = security;
        self
    }

    pub fn cert(mut self, cert: CertCheck) -> RdpOptions {
        self.cert = cert;
        self
    }

    pub fn size(mut self, width: u16, height: u16) -> RdpOptions {
        self.width = width;
        self.height = height;
        self
    }

    pub fn arg(mut self, arg: &str) -> RdpOptions {
        self.extra.push(arg.into());
        self
    }

    /// The arguments of `xfreerdp`.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            format!("/v:127.0.0.1:{}", self.port),
            format!("/u:{}", self.login),
            format!("/p:{}", self.password),
            format!("/size:{}x{}", self.width, self.height),
            match &self.cert {
                CertCheck::Ignore => "/cert:ignore".to_string(),
                CertCheck::Sha256(hex) => {
                    format!("/cert:fingerprint:sha256:{}", colon_separated(hex))
                }
                CertCheck::TrustOnFirstUse => "/cert:tofu".to_string(),
            },
            // A desktop that goes away is gone: no reconnection loop to wait out.
            "-auto-reconnect".to_string(),
        ];
        match self.security {
            Security::Tls => args.push("/sec:tls".into()),
            Security::Nla => args.push("/sec:nla".into()),
            Security::Negotiated => {}
        }
        args.extend(self.extra.iter().cloned());
        args
    }
}

/// A running `xfreerdp` on a `ClientDisplay`, its own process group, its own home (what it
/// remembers of servers) and its output in a log. Dropping it ends it.
pub struct RdpClient {
    pub options: RdpOptions,
    display: String,
    xauthority: PathBuf,
    home: PathBuf,
    log: PathBuf,
    child: Child,
    exit: Option<ExitStatus>,
}

impl RdpClient {
    /// Starts `xfreerdp` on `display`; it connects in the background (see
    /// `wait_for_desktop` and `wait_exit`).
    pub fn start(display: &ClientDisplay, options: RdpOptions) -> Result<RdpClient, RdpError> {
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let home = display.dir.join(format!("client-{n}"));
        std::fs::create_dir_all(&home).map_err(|source| RdpError::Io {
            what: format!("creating {}", home.display()),
            source,
        })?;
        RdpClient::start_in(display, options, &home)
    }

    /// As `start`, with `home` as the client's home: a second client there finds what
    /// the first remembered (`/cert:tofu`).
    pub fn start_in(
        display: &ClientDisplay,
        options: RdpOptions,
        home: &Path,
    ) -> Result<RdpClient, RdpError> {
        let n = NEXT_DIR.fetch_add(1, Ordering::SeqCst);
        let log = display.dir.join(format!("xfreerdp-{n}.log"));
        let out = std::fs::File::create(&log).map_err(|source| RdpError::Io {
            what: format!("creating {}", log.display()),
            source,
        })?;
        let err = out.try_clone().map_err(|source| RdpError::Io {
            what: "duplicating the log".into(),
            source,
        })?;
        let child = display
            .command("xfreerdp")
            .args(options.args())
            .env("HOME", home)
            .env_remove("XDG_CONFIG_HOME")
            // A certificate the client would ask about is refused, not waited on.
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| RdpError::Spawn {
                program: "xfreerdp".into(),
                source,
            })?;
        Ok(RdpClient {
            options,
            display: display.display.clone(),
            xauthority: display.xauthority.clone(),
            home: home.to_path_buf(),
            log,
            child,
            exit: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn home(&self) -> &Path {
        &self.home
    }

    /// What the client printed (FreeRDP logs to stdout and stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The client's exit status, once it has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit
    }

    /// Waits for the client to exit, for at most `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, TimedOut> {
        poll_until(
            "xfreerdp to exit",
            timeout,
            Duration::from_millis(50),
            || self.exited(),
        )
    }

    /// Ends the client as a user closing it would (SIGTERM), then for good.
    pub fn close(&mut self) {
        if self.exited().is_none() {
            end_process_group(&mut self.child);
        }
        self.exit = self.child.try_wait().ok().flatten();
    }

    fn tool(&self, program: &str, args: &[&str]) -> Result<Vec<u8>, RdpError> {
        let out = Command::new("timeout")
            .arg("20")
            .arg(program)
            .args(args)
            .env("DISPLAY", &self.display)
            .env("XAUTHORITY", &self.xauthority)
            .stdin(Stdio::null())
            .output()
            .map_err(|source| RdpError::Spawn {
                program: program.into(),
                source,
            })?;
        if !out.status.success() {
            return Err(RdpError::Tool {
                program: format!("{program} {}", args.join(" ")),
                status: out.status,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(out.stdout)
    }

    /// The client's visible top-level window, if it has one yet. FreeRDP opens it once
    /// the connection sequence is done (after the server accepted the login).
    pub fn window(&self) -> Option<String> {
        // `search` exits 1 when nothing matches.
        let found = self
            .tool(
                "xdotool",
                &[
                    "search",
                    "--onlyvisible",
                    "--pid",
                    &self.child.id().to_string(),
                ],
            )
            .or_else(|_| {
                self.tool(
                    "xdotool",
                    &["search", "--onlyvisible", "--name", "^FreeRDP"],
                )
            })
            .ok()?;
        String::from_utf8_lossy(&found)
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .map(str::to_string)
    }

    /// Waits until the client shows a window, for at most `timeout`; fails at once if the
    /// client exits first.
    pub fn wait_for_window(&mut self, timeout: Duration) -> Result<String, RdpError> {
        let mut exited = None;
        let found = poll_until("the client's window", timeout, LOOK_AGAIN, || {
            if let Some(status) = self.exited() {
                exited = Some(status);
                return Some(None);
            }
            self.window().map(Some)
        })?;
        match (found, exited) {
            (Some(window), _) => Ok(window),
            (None, Some(status)) => Err(RdpError::ClientExited {
                status,
                waiting_for: "its window".into(),
                log: self.log(),
            }),
            (None, None) => unreachable!("the probe yields a window or an exit"),
        }
    }

    /// What the client's window shows now.
    pub fn screenshot(&self) -> Result<Image, RdpError> {
        let window = self
            .window()
            .ok_or_else(|| RdpError::NoWindow { log: self.log() })?;
        Ok(Image::from_xwd(
            &self.tool("xwd", &["-id", &window, "-silent"])?,
        )?)
    }

    /// Waits until at least `percent`% of the window shows `colour` (each channel within
    /// `tolerance`): the remote desktop is on the screen. Returns that screenshot. Fails at
    /// once if the client exits first.
    pub fn wait_for_colour(
        &mut self,
        colour: Rgb,
        tolerance: u8,
        percent: u32,
        timeout: Duration,
    ) -> Result<Image, RdpError> {
        let mut last: Option<Image> = None;
        let mut exited = None;
        let seen = poll_until(
            &format!("{colour} on the client's window"),
            timeout,
            LOOK_AGAIN,
            || {
                if let Some(status) = self.exited() {
                    exited = Some(status);
                    return Some(None);
                }
                let shot = self.screenshot().ok()?;
                if shot.share_near(colour, tolerance) * 100.0 >= percent as f64 {
                    return Some(Some(shot));
                }
                last = Some(shot);
                None
            },
        );
        match (seen, exited) {
            (Ok(Some(shot)), _) => Ok(shot),
            (Ok(None), Some(status)) => Err(RdpError::ClientExited {
                status,
                waiting_for: format!("{colour} on its window"),
                log: self.log(),
            }),
            _ => Err(RdpError::ColourNotShown {
                colour,
                percent,
                shown: last
                    .map(|shot| shot.describe())
                    .unwrap_or_else(|| "no screenshot".into()),
            }),
        }
    }

    /// Gives the client's window the keyboard, moves the pointer to (`x`, `y`) of the
    /// remote desktop and clicks there (the remote window under it gets the focus).
    pub fn click(&self, x: u32, y: u32) -> Result<(), RdpError> {
        let window = self
            .window()
            .ok_or_else(|| RdpError::NoWindow { log: self.log() })?;
        self.tool("xdotool", &["windowfocus", "--sync", &window])?;
        self.tool(
            "xdotool",
            &[
                "mousemove",
                "--window",
                &window,
                &x.to_string(),
                &y.to_string(),
            ],
        )?;
        // The client sends the move before the click, and the remote pointer is there.
        std::thread::sleep(Duration::from_millis(200));
        self.tool("xdotool", &["click", "1"])?;
        Ok(())
    }

    /// Types `text` into the focused window of the client display through XTEST (real key
    /// events, not synthetic ones a client may ignore), then Return.
    pub fn type_line(&self, text: &str) -> Result<(), RdpError> {
        self.tool(
            "xdotool",
            &[
                "type",
                "--clearmodifiers",
                "--delay",
                &TYPING_DELAY_MS.to_string(),
                "--",
                text,
            ],
        )?;
        self.key("Return")
    }

    /// One key by its X name (`Return`, `ctrl+c`).
    pub fn key(&self, name: &str) -> Result<(), RdpError> {
        self.tool("xdotool", &["key", "--clearmodifiers", name])?;
        Ok(())
    }

    /// The SHA-256 of the certificate this client accepted with `/cert:tofu` (hex, no
    /// colons, lowercase), from what FreeRDP remembered in its home: a `known_hosts2` line
    /// (`host port fingerprint subject issuer`), or the certificate itself as PEM under
    /// `server/` (newer FreeRDP).
    pub fn remembered_fingerprint(&self) -> Option<String> {
        let config = self.home.join(".config/freerdp");
        let known_hosts = std::fs::read_to_string(config.join("known_hosts2")).unwrap_or_default();
        let port = self.options.port.to_string();
        let from_line = known_hosts.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() >= 3 && fields[1] == port).then(|| normalise_fingerprint(fields[2]))
        });
        from_line.or_else(|| {
            let dir = std::fs::read_dir(config.join("server")).ok()?;
            dir.flatten().find_map(|entry| {
                let pem = std::fs::read_to_string(entry.path()).ok()?;
                pem_certificate_sha256(&pem)
            })
        })
    }
}

impl Drop for RdpClient {
    fn drop(&mut self) {
        self.close();
    }
}

/// A fingerprint as FreeRDP 2 compares it: lowercase hex pairs joined by colons (it
/// ignores a fingerprint written without them, and asks the user instead).
fn colon_separated(hex: &str) -> String {
    let digits = normalise_fingerprint(hex);
    digits
        .as_bytes()
        .chunks(2)
        .map(|pair| String::from_utf8_lossy(pair).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

/// A fingerprint as hex without separators, lowercase.
pub fn normalise_fingerprint(text: &str) -> String {
    text.chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// The SHA-256 of the first certificate of `pem` (hex, lowercase).
pub fn pem_certificate_sha256(pem: &str) -> Option<String> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let body = pem
        .split("-----BEGIN CERTIFICATE-----")
        .nth(1)?
        .split("-----END CERTIFICATE-----")
        .next()?;
    let der = base64::engine::general_purpose::STANDARD
        .decode(body.split_whitespace().collect::<String>())
        .ok()?;
    Some(
        sha2::Sha256::digest(&der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

/// A colour, 8 bits a channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rgb(pub u8, pub u8, pub u8);

impl Rgb {
    /// `#rrggbb`.
    pub fn hex(text: &str) -> Option<Rgb> {
        let digits = text.strip_prefix('#')?;
        if digits.len() != 6 {
            return None;
        }
        let channel = |at: usize| u8::from_str_radix(digits.get(at..at + 2)?, 16).ok();
        Some(Rgb(channel(0)?, channel(2)?, channel(4)?))
    }

    /// Whether every channel is within `tolerance` of `other`'s (lossy codecs and 16-bit
    /// colour do not give back the exact colour).
    pub fn near(self, other: Rgb, tolerance: u8) -> bool {
        self.0.abs_diff(other.0) <= tolerance
            && self.1.abs_diff(other.1) <= tolerance
            && self.2.abs_diff(other.2) <= tolerance
    }
}

impl std::fmt::Display for Rgb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{:02x}{:02x}{:02x}", self.0, self.1, self.2)
    }
}

/// A screenshot: RGB pixels, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Image {
    pub width: u32,
    pub height: u32,
    pixels: Vec<Rgb>,
}

/// An XWD file this reader does not take.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum XwdError {
    #[error("{0} bytes: shorter than its header says")]
    Truncated(usize),
    #[error("XWD version {0}, not 7")]
    Version(u32),
    #[error("pixmap format {0}, not ZPixmap (2)")]
    Format(u32),
    #[error("{0} bits a pixel: only 16, 24 and 32 are read")]
    BitsPerPixel(u32),
    #[error("a {width}x{height} image is not plausible")]
    Size { width: u32, height: u32 },
}

impl Image {
    /// Reads an XWD image (what `xwd` writes: a big-endian header, the window's name, the
    /// colour map, then the pixels in the server's byte order) of a TrueColor visual.
    pub fn from_xwd(bytes: &[u8]) -> Result<Image, XwdError> {
        const HEADER_FIELDS: usize = 25;
        const COLOUR_ENTRY_BYTES: usize = 12;
        let field = |i: usize| -> Result<u32, XwdError> {
            bytes
                .get(i * 4..i * 4 + 4)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or(XwdError::Truncated(bytes.len()))
        };
        let header_size = field(0)? as usize;
        let version = field(1)?;
        if version != 7 {
            return Err(XwdError::Version(version));
        }
        let format = field(2)?;
        if format != 2 {
            return Err(XwdError::Format(format));
        }
        let (width, height) = (field(4)?, field(5)?);
        if width == 0 || height == 0 || width > 16384 || height > 16384 {
            return Err(XwdError::Size { width, height });
        }
        let lsb_first = field(7)? == 0;
        let bits_per_pixel = field(11)?;
        let bytes_per_line = field(12)? as usize;
        let masks = [field(14)?, field(15)?, field(16)?];
        let colours = field(19)? as usize;
        if header_size < HEADER_FIELDS * 4 {
            return Err(XwdError::Truncated(bytes.len()));
        }
        let bytes_per_pixel = match bits_per_pixel {
            16 => 2,
            24 => 3,
            32 => 4,
            other => return Err(XwdError::BitsPerPixel(other)),
        };
        if bytes_per_line < width as usize * bytes_per_pixel {
            return Err(XwdError::Truncated(bytes.len()));
        }
        let start = header_size
            .checked_add(colours.saturating_mul(COLOUR_ENTRY_BYTES))
            .ok_or(XwdError::Truncated(bytes.len()))?;
        let end = bytes_per_line
            .checked_mul(height as usize)
            .and_then(|n| n.checked_add(start))
            .ok_or(XwdError::Truncated(bytes.len()))?;
        let data = bytes
            .get(start..end)
            .ok_or(XwdError::Truncated(bytes.len()))?;
        let mut pixels = Vec::with_capacity(width as usize * height as usize);
        for row in data.chunks_exact(bytes_per_line) {
            for raw in row[..width as usize * bytes_per_pixel].chunks_exact(bytes_per_pixel) {
                let value = raw.iter().enumerate().fold(0u32, |value, (i, b)| {
                    let shift = if lsb_first {
                        8 * i
                    } else {
                        8 * (bytes_per_pixel - 1 - i)
                    };
                    value | (*b as u32) << shift
                });
                pixels.push(Rgb(
                    channel(value, masks[0]),
                    channel(value, masks[1]),
                    channel(value, masks[2]),
                ));
            }
        }
        Ok(Image {
            width,
            height,
            pixels,
        })
    }

    /// The pixel at (`x`, `y`), if inside.
    pub fn pixel(&self, x: u32, y: u32) -> Option<Rgb> {
        (x < self.width && y < self.height).then(|| self.pixels[(y * self.width + x) as usize])
    }

    /// The share (0 to 1) of pixels within `tolerance` of `colour`.
    pub fn share_near(&self, colour: Rgb, tolerance: u8) -> f64 {
        let near = self
            .pixels
            .iter()
            .filter(|p| p.near(colour, tolerance))
            .count();
        near as f64 / self.pixels.len().max(1) as f64
    }

    /// The `n` commonest colours and their shares, commonest first.
    pub fn commonest(&self, n: usize) -> Vec<(Rgb, f64)> {
        let mut counts = std::collections::HashMap::<Rgb, usize>::new();
        for p in &self.pixels {
            *counts.entry(*p).or_default() += 1;
        }
        let mut counts: Vec<(Rgb, usize)> = counts.into_iter().collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        counts
            .into_iter()
            .take(n)
            .map(|(c, k)| (c, k as f64 / self.pixels.len().max(1) as f64))
            .collect()
    }

    /// Size and commonest colours, for a failure message.
    pub fn describe(&self) -> String {
        let colours: Vec<String> = self
            .commonest(5)
            .iter()
            .map(|(c, share)| format!("{c} {:.1}%", share * 100.0))
            .collect();
        format!("{}x{}: {}", self.width, self.height, colours.join(", "))
    }

    /// Writes the image as a binary PPM (for a person looking at a failure).
    pub fn save_ppm(&self, path: &Path) -> std::io::Result<()> {
        let mut out = format!("P6\n{} {}\n255\n", self.width, self.height).into_bytes();
        for p in &self.pixels {
            out.extend_from_slice(&[p.0, p.1, p.2]);
        }
        std::fs::write(path, out)
    }
}

/// The channel under `mask` of a pixel value, scaled to 8 bits (16-bit visuals have 5 or
/// 6 bits a channel: the high bits are repeated into the low ones, as X does).
fn channel(value: u32, mask: u32) -> u8 {
    if mask == 0 {
        return 0;
    }
    let bits = mask.count_ones();
    let raw = (value & mask) >> mask.trailing_zeros();
    match bits {
        8 => raw as u8,
        b if b > 8 => (raw >> (b - 8)) as u8,
        b => {
            let mut scaled = raw << (8 - b);
            let mut have = b;
            while have < 8 {
                scaled |= scaled >> have;
                have *= 2;
            }
            scaled as u8
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An XWD file as `xwd` writes it on a little-endian 24-bit TrueColor server.
    fn xwd(width: u32, height: u32, pad: u32, pixels: &[u32]) -> Vec<u8> {
        let name = b"test\0\0\0\0";
        let header_size = 100 + name.len() as u32;
        let bytes_per_line = width * 4 + pad;
        let fields: [u32; 25] = [
            header_size,
            7,
            2,
            24,
            width,
            height,
            0,
            0, // LSBFirst
            32,
            0,
            32,
            32,
            bytes_per_line,
            4, // TrueColor
            0xff0000,
            0x00ff00,
            0x0000ff,
            8,
            256,
            2,
            width,
            height,
            0,
            0,
            0,
        ];
        let mut out: Vec<u8> = fields.iter().flat_map(|f| f.to_be_bytes()).collect();
        out.extend_from_slice(name);
        out.extend(std::iter::repeat_n(0u8, 2 * 12));
        for row in pixels.chunks(width as usize) {
            for p in row {
                out.extend_from_slice(&p.to_le_bytes());
            }
            out.extend(std::iter::repeat_n(0xeeu8, pad as usize));
        }
        out
    }

    #[test]
    fn an_xwd_image_reads_back_its_pixels_past_the_colour_map_and_row_padding() {
        let bytes = xwd(2, 2, 4, &[0x3366cc, 0x000000, 0xffffff, 0x3366cc]);
        let image = Image::from_xwd(&bytes).unwrap();
        assert_eq!((image.width, image.height), (2, 2));
        assert_eq!(image.pixel(0, 0), Some(Rgb(0x33, 0x66, 0xcc)));
        assert_eq!(image.pixel(1, 0), Some(Rgb(0, 0, 0)));
        assert_eq!(image.pixel(0, 1), Some(Rgb(255, 255, 255)));
        assert_eq!(image.pixel(2, 0), None);
        assert_eq!(image.share_near(Rgb::hex("#3366cc").unwrap(), 0), 0.5);
        assert_eq!(image.commonest(1)[0].0, Rgb(0x33, 0x66, 0xcc));
    }

    #[test]
    fn a_truncated_or_foreign_xwd_is_refused_not_read_past_its_end() {
        let bytes = xwd(4, 4, 0, &[0; 16]);
        assert!(matches!(
            Image::from_xwd(&bytes[..bytes.len() - 1]),
            Err(XwdError::Truncated(_))
        ));
        assert!(matches!(
            Image::from_xwd(&bytes[..50]),
            Err(XwdError::Truncated(_))
        ));
        let mut old = bytes.clone();
        old[7] = 6;
        assert_eq!(Image::from_xwd(&old), Err(XwdError::Version(6)));
        let mut huge = bytes;
        huge[16..20].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(Image::from_xwd(&huge), Err(XwdError::Size { .. })));
    }

    #[test]
    fn sixteen_bit_channels_are_scaled_to_eight_bits() {
        // RGB565 white and the 16-bit rendering of #3366cc.
        assert_eq!(channel(0xffff, 0xf800), 255);
        assert_eq!(channel(0xffff, 0x07e0), 255);
        assert_eq!(channel(6 << 11, 0xf800), 0x31);
        assert!(Rgb(0x31, 0x65, 0xce).near(Rgb::hex("#3366cc").unwrap(), 8));
        assert!(!Rgb(0, 0, 0).near(Rgb::hex("#3366cc").unwrap(), 8));
    }

    #[test]
    fn the_client_is_told_where_what_who_and_how_to_check_the_certificate() {
        let args = RdpOptions::new(3390, "jit-a", "s3cret")
            .arg("/rfx")
            .cert(CertCheck::Sha256("AB:cd:01".into()))
            .args();
        assert!(args.contains(&"/v:127.0.0.1:3390".to_string()));
        assert!(args.contains(&"/u:jit-a".to_string()));
        assert!(args.contains(&"/p:s3cret".to_string()));
        assert!(args.contains(&"/sec:tls".to_string()));
        assert!(args.contains(&"/size:1024x768".to_string()));
        assert!(args.contains(&"/cert:fingerprint:sha256:ab:cd:01".to_string()));
        assert_eq!(args.last().map(String::as_str), Some("/rfx"));
        let nla = RdpOptions::new(1, "u", "p").security(Security::Nla).args();
        assert!(nla.contains(&"/sec:nla".to_string()) && !nla.contains(&"/sec:tls".to_string()));
    }

    #[test]
    fn a_private_display_shows_what_is_drawn_on_it_and_goes_with_its_guard() {
        let display = ClientDisplay::start_sized(320, 200).unwrap();
        // Without the cookie, the display is closed.
        let stranger = Command::new("xdpyinfo")
            .env("DISPLAY", &display.display)
            .env("XAUTHORITY", "/dev/null")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(!stranger.success());
        display.run("xsetroot", &["-solid", "#3366cc"]).unwrap();
        let shot = display.screenshot().unwrap();
        assert_eq!((shot.width, shot.height), (320, 200));
        assert_eq!(shot.share_near(Rgb::hex("#3366cc").unwrap(), 0), 1.0);
        let number = display.display.trim_start_matches(':').to_string();
        let dir = display.dir.clone();
        drop(display);
        assert!(!Path::new(&format!("/tmp/.X11-unix/X{number}")).exists());
        assert!(!dir.exists());
    }
}
