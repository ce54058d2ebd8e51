//! Helpers shared by the end-to-end tests: an `usherd` of its own per test (own port, own
//! state and spool, own account prefix and UID range), an issuer key, an OpenSSH client key,
//! and the real `ssh`, `scp`, `sftp` to drive it. Dropping a `TestAgent` stops the agent and
//! removes every account, cgroup, process and file the test made.
//!
//! The binaries come from `target/debug` (or `$USHER_BIN_DIR`): run the tests with
//! `cargo xtask test`, which builds them first.
//!
//! What does not need the agent (ports, the test CA, the collector and moto, ssh client
//! options, waiting, the browser) is `usher-test-support`'s, re-exported here.

#![deny(unsafe_code)]

mod sweep;

use nix::sys::signal::Signal;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use usher::grant::{Audience, Claims, KeyAlg};
pub use usher_test_support::{
    built_binary as bin, client_options, free_port, poll_until, wait_for_file, wait_for_log_line,
    wait_for_port, wait_until, Backend, Browser, Collector, LogSource, Moto, SshClient,
    TrustedAgent,
};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Where the test agents' directories are: `usher-test-p<pid of the test process>-<n>`.
const TEST_DIR_PREFIX: &str = "/tmp/usher-test-";
/// The UIDs the test agents' accounts get (each agent a slice of 20).
const TEST_UIDS: std::ops::RangeInclusive<u32> = 64000..=64999;

pub fn now() -> i64 {
    usher::grant::now()
}

/// Extra lines for the agent's config file.
#[derive(Default, Clone)]
pub struct Options {
    pub extra_config: String,
    /// Profiles to write into the agent's policies directory: (file name, TOML).
    pub profiles: Vec<(String, String)>,
    /// Put the spool on a tmpfs of this many KiB (a disk that fills up).
    pub spool_tmpfs_kib: Option<u32>,
    /// `enforcement = ...` (default "best-effort").
    pub enforcement: Option<String>,
    /// Lines for the `[ssh]` table.
    pub ssh_config: String,
    /// `ssh.listen`, with `{port}` standing for the test's port (default: 127.0.0.1).
    pub listen: Vec<String>,
    /// Start usherd with this open-file limit, soft and hard (`prlimit`).
    pub nofile: Option<u64>,
    /// Files to write into the agent's directory before it starts (name, contents): they
    /// go with it. `{dir}` in `extra_config` stands for that directory.
    pub files: Vec<(String, String)>,
}

pub struct TestAgent {
    pub dir: PathBuf,
    pub port: u16,
    pub prefix: String,
    pub uid_min: u32,
    pub uid_max: u32,
    pub iss: String,
    pub host: String,
    issuer_key: String,
    pub client_key: PathBuf,
    pub config_path: PathBuf,
    nofile: Option<u64>,
    child: Option<Child>,
}

impl TestAgent {
    pub fn start() -> TestAgent {
        Self::start_with(Options::default())
    }

    pub fn start_with(options: Options) -> TestAgent {
        assert!(
            nix_is_root(),
            "the end-to-end tests run as root (they create accounts and cgroups)"
        );
        // A killed run left its accounts, cgroups and mounts: gone before this run makes its own.
        sweep::once();
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = std::process::id() % 10000;
        let dir = PathBuf::from(format!("{TEST_DIR_PREFIX}p{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let port = free_port();
        // Letters only, so one test's prefix is never the start of another's.
        let prefix = format!("t{}{}-", (b'a' + (tag % 26) as u8) as char, letters(n));
        let uid_min = TEST_UIDS.start() + (n % 50) * 20;
        let uid_max = uid_min + 19;
        let (issuer_key, jwks) = usher::grant::keygen(KeyAlg::Ed25519, "k1").unwrap();
        std::fs::write(dir.join("issuer.jwks.json"), jwks).unwrap();
        let client_key = dir.join("id_ed25519");
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "test-client", "-f"])
            .arg(&client_key)
            .status()
            .unwrap();
        assert!(st.success());
        for (name, text) in &options.files {
            std::fs::write(dir.join(name), text).unwrap();
        }
        for (name, text) in &options.profiles {
            std::fs::write(dir.join("policies").join(name), text).unwrap();
        }
        let host = "usher-test-host".to_string();
        let iss = "https://issuer.test".to_string();
        let config = format!(
            r#"host_name = "{host}"
state_dir = "{d}/state"
spool_dir = "{d}/spool"
policies_dir = "{d}/policies"
control_socket = "{d}/control.sock"
console_socket = "{d}/console.sock"
enforcement = "{enforcement}"

[ssh]
listen = [{listen}]
{ssh_config}

[accounts]
login_shell = "{d}/usher-shell"
name_prefix = "{prefix}"
uid_min = {uid_min}
uid_max = {uid_max}

[[issuer]]
iss = "{iss}"
jwks = "{d}/issuer.jwks.json"

{extra}
"#,
            d = dir.display(),
            extra = options
                .extra_config
                .replace("{dir}", &dir.display().to_string()),
            ssh_config = options.ssh_config,
            listen = if options.listen.is_empty() {
                format!("\"127.0.0.1:{port}\"")
            } else {
                options
                    .listen
                    .iter()
                    .map(|a| format!("\"{}\"", a.replace("{port}", &port.to_string())))
                    .collect::<Vec<_>>()
                    .join(", ")
            },
            enforcement = options.enforcement.as_deref().unwrap_or("best-effort"),
        );
        // The accounts' login shell: usher-shell, pointed at this agent's console socket.
        let wrapper = dir.join("usher-shell");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nUSHER_CONSOLE_SOCKET={}/console.sock exec {} \"$@\"\n",
                dir.display(),
                bin("usher-shell").display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let config_path = dir.join("usherd.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut agent = TestAgent {
            dir,
            port,
            prefix,
            uid_min,
            uid_max,
            iss,
            host,
            issuer_key,
            client_key,
            config_path,
            nofile: options.nofile,
            child: None,
        };
        // Mounted once the agent exists: a start that fails from here on still unmounts it
        // (on drop).
        if let Some(kib) = options.spool_tmpfs_kib {
            mount_spool_tmpfs(&agent.spool(), kib);
        }
        agent.launch();
        agent
    }

    /// Starts (or restarts) `usherd` and waits until it accepts connections.
    pub fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("usherd.log"))
            .unwrap();
        let mut command = match self.nofile {
            Some(n) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={n}:{n}")).arg(bin("usherd"));
                c
            }
            None => Command::new(bin("usherd")),
        };
        let child = command
            .arg("--config")
            .arg(&self.config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("usherd starts");
        self.child = Some(child);
        let listening = || {
            std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                && self.dir.join("control.sock").exists()
        };
        let child = self.child.as_mut().unwrap();
        // Listening (None), or the exit status of an agent that did not get that far.
        let started = poll_until(
            "usherd to listen",
            Duration::from_secs(20),
            Duration::from_millis(50),
            || {
                if listening() {
                    return Some(None);
                }
                child.try_wait().unwrap().map(Some)
            },
        );
        match started {
            Ok(None) => {}
            Ok(Some(st)) => panic!("usherd exited with {st}:\n{}", self.log()),
            Err(e) => panic!("usherd did not start listening ({e}):\n{}", self.log()),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// `kill -9` of the agent, as a crash would.
    pub fn crash(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            send_signal(c.id() as i32, Signal::SIGTERM);
            let exited = wait_until("usherd to exit", Duration::from_secs(5), || {
                c.try_wait().ok().flatten().is_some()
            });
            if exited.is_err() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("usherd.log")).unwrap_or_default()
    }

    pub fn login(&self, name: &str) -> String {
        format!("{}{}", self.prefix, name)
    }

    pub fn client_public_key(&self) -> String {
        std::fs::read_to_string(self.client_key.with_extension("pub"))
            .unwrap()
            .trim()
            .to_string()
    }

    /// Claims for `login` valid now for `ttl` seconds, bound to the test's client key.
    pub fn claims(&self, login: &str, ttl: i64) -> Claims {
        let now = now();
        Claims {
            iss: self.iss.clone(),
            sub: "alice@example.test".into(),
            aud: Audience::One(self.host.clone()),
            jti: format!("jti-{}-{}", login, NEXT.fetch_add(1, Ordering::SeqCst)),
            iat: now,
            nbf: None,
            exp: now + ttl,
            login: login.into(),
            groups: vec![],
            ssh_keys: vec![self.client_public_key()],
            secret_hash: None,
            profile: None,
            approved_by: Some("bob@example.test".into()),
            reason: Some("end-to-end test".into()),
            request: None,
        }
    }

    pub fn sign(&self, claims: &Claims) -> String {
        usher::grant::sign(&self.issuer_key, "k1", claims).unwrap()
    }

    /// `usher <args>` against this agent's control socket.
    pub fn usher(&self, args: &[&str]) -> Output {
        Command::new(bin("usher"))
            .arg("--socket")
            .arg(self.dir.join("control.sock"))
            .args(args)
            .output()
            .unwrap()
    }

    pub fn install(&self, token: &str) -> Output {
        self.usher(&["grant", "install", token])
    }

    /// Installs a grant for `login(name)` under `profile`; returns the login and the
    /// grant's jti.
    pub fn grant(&self, name: &str, profile: Option<&str>) -> (String, String) {
        let login = self.login(name);
        let mut c = self.claims(&login, 600);
        c.profile = profile.map(String::from);
        let out = self.install(&self.sign(&c));
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        (login, c.jti)
    }

    /// The options of every test client (`ssh`, `scp`, `sftp`, `sshpass ssh`).
    pub fn ssh_base_args(&self) -> Vec<String> {
        client_options()
    }

    /// `ssh` with the test's key, batch mode, on this agent's port.
    pub fn ssh_command(&self, login: &str) -> Command {
        self.ssh_command_to(login, "127.0.0.1", self.port)
    }

    /// `ssh` with the test's key, batch mode, to another address or server.
    pub fn ssh_command_to(&self, login: &str, host: &str, port: u16) -> Command {
        SshClient::new(&self.client_key, port)
            .to_host(host)
            .command_within(60, login)
    }

    pub fn ssh(&self, login: &str, command: &str) -> Output {
        self.ssh_command(login)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// Logs in by presenting `token` at the password prompt (sshpass).
    pub fn ssh_with_password(&self, login: &str, token: &str, command: &str) -> Output {
        self.ssh_presenting(login, token, command, "password", None)
    }

    /// Logs in by presenting `token` at the keyboard-interactive "Grant:" prompt (sshpass).
    pub fn ssh_with_keyboard_interactive(&self, login: &str, token: &str, command: &str) -> Output {
        self.ssh_presenting(
            login,
            token,
            command,
            "keyboard-interactive",
            Some("Grant:"),
        )
    }

    /// `token` answers the one prompt of `method`; `prompt` is the text sshpass waits for
    /// (its default: a password prompt).
    fn ssh_presenting(
        &self,
        login: &str,
        token: &str,
        command: &str,
        method: &str,
        prompt: Option<&str>,
    ) -> Output {
        let mut cmd = Command::new("timeout");
        cmd.arg("60").arg("sshpass").arg("-e");
        if let Some(p) = prompt {
            cmd.args(["-P", p]);
        }
        cmd.arg("ssh")
            .args(self.ssh_base_args())
            .args([
                "-o",
                &format!("PreferredAuthentications={method}"),
                "-o",
                "PubkeyAuthentication=no",
                "-o",
                "NumberOfPasswordPrompts=1",
                "-p",
                &self.port.to_string(),
            ])
            .arg(format!("{login}@127.0.0.1"))
            .arg(command)
            .env("SSHPASS", token)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.join("spool")
    }

    /// Session ids with a metadata file in the spool, oldest first.
    pub fn recorded_sessions(&self) -> Vec<String> {
        let mut ids: Vec<String> = std::fs::read_dir(self.spool())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| {
                        let n = e.file_name().to_string_lossy().into_owned();
                        n.strip_suffix(".json")
                            .filter(|s| !s.ends_with(".ship"))
                            .map(|s| s.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        ids.sort();
        ids
    }

    /// The audit stream of a recorded session, one JSON value per line.
    pub fn audit(&self, id: &str) -> Vec<serde_json::Value> {
        std::fs::read_to_string(self.spool().join(format!("{id}.audit.jsonl")))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The exec events of a recorded session.
    pub fn execs(&self, id: &str) -> Vec<serde_json::Value> {
        self.audit(id)
            .into_iter()
            .filter(|e| e["event"] == "exec")
            .map(|e| e["exec"].clone())
            .collect()
    }

    pub fn meta(&self, id: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.spool().join(format!("{id}.json"))).unwrap())
            .unwrap()
    }

    /// Waits for `cond`, polling, up to `secs`.
    pub fn wait_for(&self, secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
        let held = poll_until(
            what,
            Duration::from_secs(secs),
            Duration::from_millis(100),
            || cond().then_some(()),
        );
        if let Err(e) = held {
            panic!("{e}\n--- usherd log ---\n{}", self.log());
        }
    }

    pub fn accounts_in_range(&self) -> Vec<(String, u32)> {
        passwd()
            .into_iter()
            .filter(|(_, uid)| (self.uid_min..=self.uid_max).contains(uid))
            .collect()
    }
}

/// Ends a client started with `ssh_command` as a user's ^C would: `timeout` passes the
/// SIGTERM on to `ssh`, which drops the connection.
pub fn hang_up(child: &mut Child) {
    send_signal(child.id() as i32, Signal::SIGTERM);
    let _ = child.wait();
}

pub fn passwd() -> Vec<(String, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some((f.first()?.to_string(), f.get(2)?.parse().ok()?))
        })
        .collect()
}

pub fn user_exists(name: &str) -> bool {
    passwd().iter().any(|(n, _)| n == name)
}

/// Pids of processes whose real UID is `uid`.
pub fn pids_of_uid(uid: u32) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/status"))
                .map(|s| {
                    s.lines().any(|l| {
                        l.starts_with("Uid:")
                            && l.split_whitespace().nth(1) == Some(&uid.to_string())
                    }) && !s
                        .lines()
                        .any(|l| l.starts_with("State:") && l.contains('Z'))
                })
                .unwrap_or(false)
        })
        .collect()
}

fn letters(mut n: u32) -> String {
    let mut s = String::new();
    loop {
        s.push((b'a' + (n % 26) as u8) as char);
        n /= 26;
        if n == 0 {
            break;
        }
    }
    s
}

fn nix_is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Sends `signal` to `pid` (a negative `pid`: its process group); one already gone is fine.
pub(crate) fn send_signal(pid: i32, signal: Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal);
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.stop();
        remove_what_an_agent_left(&self.dir, &self.prefix, self.uid_min..=self.uid_max);
    }
}

impl LogSource for TestAgent {
    fn log(&self) -> String {
        TestAgent::log(self)
    }
}

/// Whatever a test agent in `dir` and its test left: the accounts in its fence (`prefix`,
/// `uids`) and their processes, its session cgroups, its pinned programs, its spool's
/// tmpfs, and the directory (unless `$USHER_KEEP_TEST_DIRS` is set).
fn remove_what_an_agent_left(dir: &Path, prefix: &str, uids: std::ops::RangeInclusive<u32>) {
    for (name, uid) in passwd() {
        if uids.contains(&uid) && name.starts_with(prefix) {
            remove_account(&name, uid);
        }
    }
    if let Ok(text) = std::fs::read_to_string(dir.join("state/sessions.json")) {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            for s in v.as_array().into_iter().flatten() {
                if let Some(cg) = s["cgroup"].as_str() {
                    let _ = std::fs::write(Path::new(cg).join("cgroup.kill"), "1");
                    remove_cgroup(Path::new(cg));
                }
                remove_limit_groups(s);
            }
        }
    }
    // The agent keeps its programs pinned across restarts; the test's agent is gone
    // for good, and so are they.
    let _ = usher::enforce::unpin(&dir.join("state"));
    let spool = dir.join("spool");
    let unmounted = Command::new("umount")
        .arg(&spool)
        .stderr(Stdio::null())
        .status();
    if unmounted.is_ok_and(|st| !st.success()) && is_mount_point(&spool) {
        // Busy (a process of the test still has a file open there): detached now, freed
        // when the last one closes, so the directory below can go.
        let _ = Command::new("umount").arg("--lazy").arg(&spool).status();
    }
    if std::env::var_os("USHER_KEEP_TEST_DIRS").is_none() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Whether `path` is where a file system is mounted.
fn is_mount_point(path: &Path) -> bool {
    let wanted = path.to_string_lossy();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split_whitespace().nth(4) == Some(&*wanted))
}

/// Kills the processes of account `name` (`uid`) and removes it, with its home and its
/// lines in the host's deny lists.
fn remove_account(name: &str, uid: u32) {
    for pid in pids_of_uid(uid) {
        send_signal(pid, Signal::SIGKILL);
    }
    // userdel refuses an account whose processes still run: give the killed ones (a
    // desktop's X server and terminal, left by a stopped agent) a moment to be reaped.
    for _ in 0..50 {
        if pids_of_uid(uid).is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = Command::new("userdel")
        .args(["--remove", "--", name])
        .output();
    // The agent lists its accounts in /etc/cron.deny and /etc/at.deny.
    let _ = usher::account::DenyLists::host().remove(name);
}

/// A shared object whose constructor appends "ran" to the file named by `$USHER_MARKER`
/// (compiled with the host's `cc` into `dir`): proof that a library was loaded and ran.
pub fn marker_library(dir: &Path) -> PathBuf {
    let src = dir.join("marker.c");
    std::fs::write(
        &src,
        r#"#include <fcntl.h>
#include <stdlib.h>
#include <unistd.h>
__attribute__((constructor)) static void usher_marker(void) {
    const char *path = getenv("USHER_MARKER");
    if (!path) return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND, 0644);
    if (fd >= 0) { write(fd, "ran\n", 4); close(fd); }
}
"#,
    )
    .unwrap();
    let out = dir.join("marker.so");
    let st = Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("cc (the test compiles a shared object)");
    assert!(st.success(), "cc failed");
    out
}

/// The home directory of `login`, from /etc/passwd.
pub fn home_of(login: &str) -> PathBuf {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&login)).then(|| PathBuf::from(f.get(5).unwrap_or(&"")))
        })
        .unwrap_or_else(|| panic!("{login} has no passwd entry"))
}

impl TestAgent {
    /// `claims` signed by the test's issuer under a JOSE header of the caller's making
    /// (`jsonwebtoken::Header` cannot say everything a hostile issuer could).
    pub fn sign_with_header(&self, header: &serde_json::Value, claims: &Claims) -> String {
        use base64::Engine;
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(serde_json::to_string(claims).unwrap().as_bytes())
        );
        let key = jsonwebtoken::EncodingKey::from_ed_pem(self.issuer_key.as_bytes()).unwrap();
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, jsonwebtoken::Algorithm::EdDSA)
                .unwrap();
        format!("{message}.{signature}")
    }

    /// An interactive login (`ssh -tt`) typed into through a pipe, as a person would
    /// type: each line after waiting for what the screen shows.
    pub fn terminal(&self, login: &str) -> Terminal {
        let mut child = self
            .ssh_command(login)
            .arg("-tt")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let screen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut stdout = child.stdout.take().unwrap();
        let sink = screen.clone();
        std::thread::spawn(move || {
            use std::io::Read;
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Terminal {
            child,
            screen,
            seen: 0,
        }
    }
}

/// See `TestAgent::terminal`. Dropping it hangs up.
pub struct Terminal {
    child: Child,
    screen: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// How far `expect` has read.
    seen: usize,
}

impl Terminal {
    /// Everything the client has shown so far.
    pub fn screen(&self) -> String {
        String::from_utf8_lossy(&self.screen.lock().unwrap()).into_owned()
    }

    /// Waits until `text` appears after what earlier calls matched.
    pub fn expect(&mut self, text: &str, secs: u64) {
        let seen = self.seen;
        let found = poll_until(
            &format!("{text:?}"),
            Duration::from_secs(secs),
            Duration::from_millis(50),
            || {
                let screen = self.screen.lock().unwrap();
                let rest = &screen[seen.min(screen.len())..];
                rest.windows(text.len()).position(|w| w == text.as_bytes())
            },
        );
        match found {
            Ok(at) => self.seen += at + text.len(),
            Err(e) => panic!("{e}; the screen:\n{}", self.screen()),
        }
    }

    pub fn send(&mut self, text: &str) {
        use std::io::Write;
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(text.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the client to exit.
    pub fn wait(&mut self, secs: u64) -> Option<std::process::ExitStatus> {
        poll_until(
            "the client to exit",
            Duration::from_secs(secs),
            Duration::from_millis(50),
            || self.child.try_wait().unwrap(),
        )
        .ok()
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            hang_up(&mut self.child);
        }
    }
}

// ---- Accounts: the host's databases, its daemons, and what a UID owns ----

/// The seven fields of `name`'s line in /etc/passwd.
pub fn passwd_line(name: &str) -> Option<Vec<String>> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap()
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect::<Vec<_>>())
        .find(|f| f.len() == 7 && f[0] == name)
}

/// The members listed for `group` in /etc/group.
pub fn group_members(group: &str) -> Vec<String> {
    std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .find(|f| f.len() == 4 && f[0] == group)
        .map(|f| {
            f[3].split(',')
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// Every group that lists `name` as a member in /etc/group.
pub fn groups_listing(name: &str) -> Vec<String> {
    std::fs::read_to_string("/etc/group")
        .unwrap()
        .lines()
        .map(|l| l.split(':').collect::<Vec<_>>())
        .filter(|f| f.len() == 4 && f[3].split(',').any(|m| m == name))
        .map(|f| f[0].to_string())
        .collect()
}

/// The names listed in a cron/at style list (/etc/cron.deny), one per line.
pub fn listed_in(path: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| l.trim().to_string())
        .collect()
}

/// How many SysV IPC objects of a kind ("shm", "msg", "sem") `uid` owns or created.
pub fn sysvipc_of_uid(kind: &str, uid: u32) -> usize {
    let text = std::fs::read_to_string(format!("/proc/sysvipc/{kind}")).unwrap();
    let mut lines = text.lines();
    let header: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
    let uid_col = header.iter().position(|c| *c == "uid").unwrap();
    let cuid_col = header.iter().position(|c| *c == "cuid").unwrap();
    lines
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            [uid_col, cuid_col]
                .iter()
                .any(|&c| f.get(c) == Some(&uid.to_string().as_str()))
        })
        .count()
}

/// Entries directly in `dir` owned by `uid`.
pub fn files_of_uid(dir: &str, uid: u32) -> Vec<PathBuf> {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.metadata().map(|m| m.uid() == uid).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

/// Whether the POSIX message queue `/name` exists (opened by root, never created).
pub fn mqueue_exists(name: &str) -> bool {
    let script = format!(
        "import ctypes, os, sys\nlibc = ctypes.CDLL(None, use_errno=True)\n\
         fd = libc.mq_open(b'/{name}', os.O_RDONLY)\nsys.exit(0 if fd >= 0 else 1)\n"
    );
    Command::new("python3")
        .args(["-c", &script])
        .status()
        .unwrap()
        .success()
}

/// A host daemon the test started in the foreground, in its own process group; dropping
/// it ends the group (the daemon and whatever it forked).
pub struct Daemon {
    pub name: String,
    child: Child,
}

impl Daemon {
    /// Starts `command` (a daemon in its foreground mode) and fails the test if it exits
    /// within half a second, with what it said.
    pub fn start(name: &str, mut command: Command, log: &Path) -> Daemon {
        use std::os::unix::process::CommandExt;
        let out = std::fs::File::create(log).unwrap();
        let mut child = command
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("{name} does not start: {e}"));
        std::thread::sleep(Duration::from_millis(500));
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "{name} exited at once with {st}:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        Daemon {
            name: name.to_string(),
            child,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        send_signal(-pgid, Signal::SIGTERM);
        let _ = wait_until(
            &format!("{} to exit", self.name),
            Duration::from_secs(5),
            || self.child.try_wait().ok().flatten().is_some(),
        );
        send_signal(-pgid, Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

impl TestAgent {
    /// `usher status --json`, parsed.
    pub fn status(&self) -> serde_json::Value {
        let out = self.usher(&["status", "--json"]);
        assert!(
            out.status.success(),
            "usher status: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// `ssh` to this agent as `login` with the private key `key`, running `command`.
    pub fn ssh_with_key(&self, key: &Path, login: &str, command: &str) -> Output {
        SshClient::new(key, self.port)
            .command_within(60, login)
            .arg(command)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

/// Removes (`ipcrm`) the SysV IPC objects `uid` owns or created, and only those.
pub fn remove_sysvipc_of_uid(uid: u32) {
    for (kind, flag) in [("shm", "-m"), ("msg", "-q"), ("sem", "-s")] {
        let text = std::fs::read_to_string(format!("/proc/sysvipc/{kind}")).unwrap_or_default();
        let mut lines = text.lines();
        let Some(header) = lines.next() else { continue };
        let header: Vec<&str> = header.split_whitespace().collect();
        let cols: Vec<usize> = ["uid", "cuid"]
            .iter()
            .filter_map(|c| header.iter().position(|h| h == c))
            .collect();
        for l in lines {
            let f: Vec<&str> = l.split_whitespace().collect();
            if cols
                .iter()
                .any(|&c| f.get(c) == Some(&uid.to_string().as_str()))
            {
                let _ = Command::new("ipcrm").args([flag, f[1]]).output();
            }
        }
    }
}

/// The cgroup v1 groups (hybrid hosts) of a session left in `sessions.json`: killed and
/// removed, like its v2 cgroup.
fn remove_limit_groups(record: &serde_json::Value) {
    for dir in record["limit_cgroups"].as_array().into_iter().flatten() {
        if let Some(dir) = dir.as_str() {
            remove_cgroup(Path::new(dir));
        }
    }
}

/// Kills what is left in cgroup `dir` and removes it, trying again while its processes
/// die (a cgroup with a process in it cannot be removed); gives up after two seconds.
fn remove_cgroup(dir: &Path) {
    let _ = wait_until(
        &format!("{} to be removed", dir.display()),
        Duration::from_secs(2),
        || {
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                send_signal(pid, Signal::SIGKILL);
            }
            std::fs::remove_dir(dir).is_ok() || !dir.exists()
        },
    );
}

/// Where a session's cgroups are, as the host sees them, from the `/proc/self/cgroup`
/// lines a process of the session printed.
#[derive(Debug, Clone)]
pub struct SessionCgroups {
    /// The v2 cgroup: the session's identity.
    pub v2: PathBuf,
    /// The directory holding each controller's limit: the v2 cgroup on a pure v2 host, a
    /// cgroup v1 group on a hybrid one.
    pub pids: PathBuf,
    pub memory: PathBuf,
    pub cpu: PathBuf,
}

impl SessionCgroups {
    /// Reads /proc/self/mountinfo (the test shares the agent's mount namespace) to place
    /// each line of `proc_cgroup` on its hierarchy.
    pub fn from_proc_cgroup(proc_cgroup: &str) -> SessionCgroups {
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // (root, mount point, fstype, super options) of every cgroup mount.
        let cgroup_mounts: Vec<(String, PathBuf, String, Vec<String>)> = mounts
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                let left: Vec<&str> = left.split_whitespace().collect();
                let right: Vec<&str> = right.split_whitespace().collect();
                let fstype = right.first()?.to_string();
                fstype.starts_with("cgroup").then(|| {
                    (
                        left[3].to_string(),
                        PathBuf::from(left[4]),
                        fstype,
                        right
                            .get(2)
                            .unwrap_or(&"")
                            .split(',')
                            .map(String::from)
                            .collect(),
                    )
                })
            })
            .collect();
        let place = |mount: &(String, PathBuf, String, Vec<String>), path: &str| {
            let rel = path
                .strip_prefix(mount.0.trim_end_matches('/'))
                .unwrap_or(path);
            mount.1.join(rel.trim_start_matches('/'))
        };
        let lines: Vec<(&str, &str)> = proc_cgroup
            .lines()
            .filter_map(|l| {
                let mut p = l.splitn(3, ':');
                let _ = p.next()?;
                Some((p.next()?, p.next()?))
            })
            .collect();
        let v2_mount = cgroup_mounts
            .iter()
            .find(|m| m.2 == "cgroup2")
            .expect("a cgroup2 mount");
        let v2_path = lines
            .iter()
            .find(|(c, _)| c.is_empty())
            .map(|(_, p)| *p)
            .expect("a 0:: line in the session's /proc/self/cgroup");
        let v2 = place(v2_mount, v2_path);
        let of = |controller: &str| {
            let v1 = cgroup_mounts
                .iter()
                .find(|m| m.2 == "cgroup" && m.3.iter().any(|o| o == controller));
            let line = lines
                .iter()
                .find(|(c, _)| c.split(',').any(|x| x == controller));
            match (v1, line) {
                (Some(m), Some((_, path))) => place(m, path),
                _ => v2.clone(),
            }
        };
        SessionCgroups {
            pids: of("pids"),
            memory: of("memory"),
            cpu: of("cpu"),
            v2,
        }
    }

    /// Whether the limits live in cgroup v1 groups (a hybrid host).
    pub fn hybrid(&self) -> bool {
        self.pids != self.v2
    }

    /// Every directory of the session, v2 and v1.
    pub fn all(&self) -> Vec<PathBuf> {
        let mut all = vec![self.v2.clone()];
        for d in [&self.pids, &self.memory, &self.cpu] {
            if !all.contains(d) {
                all.push(d.clone());
            }
        }
        all
    }

    /// `pids.max`, as a number (`None` for "max").
    pub fn pids_max(&self) -> Option<u64> {
        read_trimmed(&self.pids.join("pids.max")).parse().ok()
    }

    /// The memory limit in bytes (`memory.max` or v1's `memory.limit_in_bytes`).
    pub fn memory_max(&self) -> Option<u64> {
        let file = if self.memory == self.v2 {
            "memory.max"
        } else {
            "memory.limit_in_bytes"
        };
        read_trimmed(&self.memory.join(file)).parse().ok()
    }

    /// `cpu.weight` on v2; v1's `cpu.shares` converted back (1024 is weight 100).
    pub fn cpu_weight(&self) -> Option<u64> {
        if self.cpu == self.v2 {
            read_trimmed(&self.cpu.join("cpu.weight")).parse().ok()
        } else {
            read_trimmed(&self.cpu.join("cpu.shares"))
                .parse::<u64>()
                .ok()
                .map(|s| s * 100 / 1024)
        }
    }

    /// How many processes the pids controller refused (the `max` line of `pids.events`).
    pub fn pids_refused(&self) -> u64 {
        event_count(&self.pids.join("pids.events"), "max")
    }

    /// How many processes the memory controller's OOM killer killed in the session.
    pub fn oom_kills(&self) -> u64 {
        if self.memory == self.v2 {
            event_count(&self.memory.join("memory.events"), "oom_kill")
        } else {
            event_count(&self.memory.join("memory.oom_control"), "oom_kill")
        }
    }
}

fn event_count(file: &Path, key: &str) -> u64 {
    read_trimmed(file)
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0)
}

/// A file's text without surrounding white space; empty if it cannot be read.
pub fn read_trimmed(path: &Path) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// Puts a tmpfs of `kib` KiB on `spool` (a disk that fills up).
fn mount_spool_tmpfs(spool: &Path, kib: u32) {
    std::fs::create_dir_all(spool).unwrap();
    let st = Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={kib}k,mode=0700"),
            "usher-test-spool",
        ])
        .arg(spool)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
}
