//! RDP: the real FreeRDP client (`xfreerdp`, on an Xvfb display of its own) against usherd
//! on loopback. The login is the grant's `login` and its one-time secret; the desktop is an
//! Xvfb, the desktop command and its processes as the grant's ephemeral account, in the
//! session's cgroup, every exec audited and policed like an SSH session's.
//!
//! Most tests use a desktop that paints its root a known colour and starts an xterm in the
//! top-left corner: the colour on the client's window proves the remote desktop is shown,
//! and the xterm is where keys are typed.

use std::time::Duration;
use usher_test_support::rdp::{
    CertCheck, ClientDisplay, Image, RdpClient, RdpError, RdpOptions, Rgb, Security,
};
use usher_tests::*;

/// The root colour the test desktop paints.
const DESKTOP_COLOUR: &str = "#3366cc";
/// Paints the root, then an xterm at the top-left (80x24 characters: about 480x320 pixels),
/// the user's shell in it. No window manager: the keyboard goes where the pointer is.
const DESKTOP: &str = "xsetroot -solid '#3366cc'; exec xterm -geometry 80x24+0+0";
/// Inside the xterm, whatever its font: a point to click before typing.
const IN_THE_TERMINAL: (u32, u32) = (120, 120);

/// RDP allowed; `id` is not.
const RDP_PROFILE: &str =
    "name = \"rdp\"\nrdp = true\n[exec]\nmode = \"deny\"\npaths = [\"/usr/bin/id\"]\n";
/// A shell profile that says nothing of RDP: RDP is refused.
const NO_RDP_PROFILE: &str = "name = \"nordp\"\n[exec]\nmode = \"audit\"\n";

/// From connect to the desktop on the client's screen: an Xvfb, the desktop command and
/// the first frames, on a loaded two-core machine.
const CONNECT: Duration = Duration::from_secs(45);
/// A refused client has been told (or dropped) by then.
const REFUSAL: Duration = Duration::from_secs(30);

/// usherd with RDP on a port of its own.
struct RdpAgent {
    /// Taken on drop, so that the X servers' leftovers are removed after it.
    agent: Option<TestAgent>,
    rdp_port: u16,
    /// `[rdp] runtime_dir`: the desktops' cookies, this agent's own (a stopped agent
    /// leaves its live sessions' there).
    runtime_dir: std::path::PathBuf,
}

impl std::ops::Deref for RdpAgent {
    type Target = TestAgent;
    fn deref(&self) -> &TestAgent {
        self.agent.as_ref().expect("the agent lives until drop")
    }
}

impl std::ops::DerefMut for RdpAgent {
    fn deref_mut(&mut self) -> &mut TestAgent {
        self.agent.as_mut().expect("the agent lives until drop")
    }
}

impl Drop for RdpAgent {
    fn drop(&mut self) {
        let Some(agent) = self.agent.take() else {
            return;
        };
        let uids = agent.uid_min..=agent.uid_max;
        // The agent, its accounts and their processes go first...
        drop(agent);
        // ...then what their X servers could not remove, killed: a lock file and a socket
        // per display, owned by a UID of the agent's, which would keep that UID from being
        // handed out again. Only displays no server listens on any more.
        remove_dead_x_servers_files(&uids);
        let _ = std::fs::remove_dir_all(&self.runtime_dir);
    }
}

/// Removes the lock files and sockets in /tmp of X displays owned by a UID in `uids` that
/// no X server listens on.
fn remove_dead_x_servers_files(uids: &std::ops::RangeInclusive<u32>) {
    use std::os::unix::fs::MetadataExt;
    let listening = std::fs::read_to_string("/proc/net/unix").unwrap_or_default();
    let live: Vec<String> = listening
        .lines()
        .filter_map(|l| l.split_whitespace().nth(7))
        .filter_map(|p| p.strip_prefix("@/tmp/.X11-unix/X"))
        .map(str::to_string)
        .collect();
    let live = |n: &str| live.iter().any(|l| l == n);
    let candidates = std::fs::read_dir("/tmp")
        .into_iter()
        .flatten()
        .chain(std::fs::read_dir("/tmp/.X11-unix").into_iter().flatten())
        .flatten();
    for entry in candidates {
        let name = entry.file_name().to_string_lossy().into_owned();
        let display = name
            .strip_prefix(".X")
            .and_then(|n| n.strip_suffix("-lock"))
            .or_else(|| name.strip_prefix('X'))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        let Some(display) = display else { continue };
        let owned = entry
            .path()
            .symlink_metadata()
            .is_ok_and(|m| uids.contains(&m.uid()));
        if owned && !live(display) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// usherd (exec enforcement required) with `[rdp]` on a free loopback port, the `rdp` and
/// `nordp` profiles, `desktop` as the desktop command (None: usherd's default) and `extra`
/// lines for the `[rdp]` table.
fn rdp_agent_with(desktop: Option<&str>, extra: &str) -> RdpAgent {
    let rdp_port = free_port();
    let runtime_dir =
        std::env::temp_dir().join(format!("usher-rdp-run-{}-{rdp_port}", std::process::id()));
    let desktop = desktop
        .map(|command| format!("desktop = {}\n", toml_string(command)))
        .unwrap_or_default();
    let agent = TestAgent::start_with(Options {
        enforcement: Some("required".into()),
        extra_config: format!(
            "[policy]\nallowed_profiles = [\"default\", \"rdp\", \"nordp\"]\n\n\
             [rdp]\nlisten = [\"127.0.0.1:{rdp_port}\"]\nruntime_dir = {}\n{desktop}{extra}\n",
            toml_string(&runtime_dir.display().to_string())
        ),
        profiles: vec![
            ("rdp.toml".into(), RDP_PROFILE.into()),
            ("nordp.toml".into(), NO_RDP_PROFILE.into()),
        ],
        ..Default::default()
    });
    if let Err(e) = wait_for_port(rdp_port, Duration::from_secs(20)) {
        panic!("{e}\n--- usherd log ---\n{}", agent.log());
    }
    RdpAgent {
        agent: Some(agent),
        rdp_port,
        runtime_dir,
    }
}

fn rdp_agent() -> RdpAgent {
    rdp_agent_with(Some(DESKTOP), "")
}

/// A TOML basic string (JSON's escapes are TOML's).
fn toml_string(text: &str) -> String {
    serde_json::Value::String(text.into()).to_string()
}

/// Installs a grant for `login(name)` under `profile` whose one-time secret is `secret`,
/// `ttl` seconds long; returns the login and the grant's jti.
fn rdp_grant(
    agent: &TestAgent,
    name: &str,
    secret: &str,
    profile: &str,
    ttl: i64,
) -> (String, String) {
    let login = agent.login(name);
    let mut claims = agent.claims(&login, ttl);
    claims.profile = Some(profile.into());
    claims.secret_hash = Some(usher::grant::console_secret_hash(secret).unwrap());
    let out = agent.install(&agent.sign(&claims));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (login, claims.jti)
}

fn colour() -> Rgb {
    Rgb::hex(DESKTOP_COLOUR).unwrap()
}

impl RdpAgent {
    fn client(&self, display: &ClientDisplay, options: RdpOptions) -> RdpClient {
        RdpClient::start(display, options).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `/sec:tls`, 1024x768, as `login` with `password`.
    fn options(&self, login: &str, password: &str) -> RdpOptions {
        RdpOptions::new(self.rdp_port, login, password)
    }

    /// Fails the test with what the client and usherd said.
    fn must<T>(&self, client: &RdpClient, result: Result<T, RdpError>) -> T {
        result.unwrap_or_else(|e| {
            panic!(
                "{e}\n--- xfreerdp ---\n{}\n--- usherd log ---\n{}",
                client.log(),
                self.log()
            )
        })
    }

    /// Waits until the client shows the test desktop's colour on most of its window.
    fn desktop_shown(&self, client: &mut RdpClient, tolerance: u8) -> Image {
        self.colour_shown(client, colour(), tolerance)
    }

    fn colour_shown(&self, client: &mut RdpClient, colour: Rgb, tolerance: u8) -> Image {
        let shown = client.wait_for_colour(colour, tolerance, 40, CONNECT);
        self.must(client, shown)
    }

    /// The client's exit status once it gave up; fails the test if it was let in.
    fn refused(&self, client: &mut RdpClient, what: &str) -> std::process::ExitStatus {
        let status = client.wait_exit(REFUSAL).unwrap_or_else(|e| {
            let shot = client.screenshot().map(|s| s.describe());
            panic!(
                "{what}: the client is still connected ({e}); it shows {shot:?}\n--- xfreerdp ---\n{}\n--- usherd log ---\n{}",
                client.log(),
                self.log()
            )
        });
        assert!(
            !status.success(),
            "{what}: xfreerdp exited with success\n--- xfreerdp ---\n{}",
            client.log()
        );
        eprintln!("{what}: refused, xfreerdp exited {status}");
        status
    }

    /// `usher sessions --json`.
    fn sessions(&self) -> Vec<serde_json::Value> {
        let out = self.usher(&["sessions", "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
    }

    /// The live session of `login`, once listed.
    fn session_of(&self, login: &str) -> serde_json::Value {
        let mut found = None;
        self.wait_for(
            20,
            &format!("a session of {login} in `usher sessions`"),
            || {
                found = self.sessions().into_iter().find(|s| s["login"] == login);
                found.is_some()
            },
        );
        found.unwrap()
    }

    /// Whether usherd runs.
    fn alive(&self) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.pid())).exists()
            && std::fs::read_to_string(format!("/proc/{}/stat", self.pid()))
                .map(|s| !s.contains(") Z "))
                .unwrap_or(false)
    }
}

/// How many lines of usherd's log say a connection failed or was refused.
fn failures_logged(agent: &TestAgent) -> usize {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("failed") || l.contains("refused"))
        .count()
}

/// The UID of `login`, from /etc/passwd.
fn uid_of(login: &str) -> u32 {
    passwd_line(login)
        .and_then(|fields| fields[2].parse().ok())
        .unwrap_or_else(|| panic!("{login} has no account"))
}

/// The program name (`comm`) of a process.
fn comm(pid: i32) -> String {
    read_trimmed(std::path::Path::new(&format!("/proc/{pid}/comm")))
}

/// The cgroup v2 path (`0::` line) of a process.
fn cgroup_of(pid: i32) -> String {
    read_trimmed(std::path::Path::new(&format!("/proc/{pid}/cgroup")))
        .lines()
        .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        .unwrap_or_default()
}

/// A desktop's own X server, seen by root with the session's cookie.
struct SessionDisplay {
    display: String,
    xauthority: std::path::PathBuf,
}

impl SessionDisplay {
    /// The display of the account's Xvfb, and the cookie usherd wrote for the session.
    fn of(uid: u32) -> SessionDisplay {
        let first_named = |name: &str| {
            pids_of_uid(uid)
                .into_iter()
                .find(|&p| comm(p) == name)
                .unwrap_or_else(|| panic!("the desktop's {name}"))
        };
        // The display the X server picked, as the desktop's terminal was told.
        let environ = std::fs::read(format!("/proc/{}/environ", first_named("xterm"))).unwrap();
        let display = environ
            .split(|&b| b == 0)
            .find_map(|v| v.strip_prefix(b"DISPLAY="))
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .expect("DISPLAY in the xterm's environment");
        // The cookie the X server reads.
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", first_named("Xvfb"))).unwrap();
        let args: Vec<String> = cmdline
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let xauthority = args
            .windows(2)
            .find(|w| w[0] == "-auth")
            .map(|w| std::path::PathBuf::from(&w[1]))
            .expect("Xvfb -auth");
        SessionDisplay {
            display,
            xauthority,
        }
    }

    /// `xwininfo -root -tree`: which windows the desktop has, mapped or not.
    fn windows(&self) -> String {
        std::process::Command::new("timeout")
            .args(["20", "xwininfo", "-root", "-tree"])
            .env("DISPLAY", &self.display)
            .env("XAUTHORITY", &self.xauthority)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    fn screenshot(&self) -> Option<Image> {
        let out = std::process::Command::new("timeout")
            .args(["20", "xwd", "-root", "-silent"])
            .env("DISPLAY", &self.display)
            .env("XAUTHORITY", &self.xauthority)
            .output()
            .ok()?;
        Image::from_xwd(&out.stdout).ok()
    }
}

/// Whether two screenshots of the same size show the same colours in about the same
/// amounts (each of the first's commonest colours within 3 points on the second).
fn looks_alike(desktop: &Image, client: &Image) -> bool {
    (desktop.width, desktop.height) == (client.width, client.height)
        && desktop
            .commonest(4)
            .iter()
            .filter(|(_, share)| *share > 0.02)
            .all(|(colour, share)| (client.share_near(*colour, 12) - share).abs() < 0.03)
}

/// Whether the pixel at `at` of the client's window is the xterm's white background: the
/// terminal is mapped and drawn.
fn terminal_shown(client: &RdpClient, at: (u32, u32)) -> bool {
    client
        .screenshot()
        .ok()
        .and_then(|shot| shot.pixel(at.0, at.1))
        .is_some_and(|p| p.near(Rgb(255, 255, 255), 24))
}

#[test]
fn the_secret_logs_in_to_a_desktop_of_the_account_whose_typed_commands_are_audited_and_policed() {
    let agent = rdp_agent();
    let (login, _) = rdp_grant(&agent, "desk", "rdp-secret-1", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "rdp-secret-1"));
    let shot = agent.desktop_shown(&mut client, 4);
    assert_eq!(
        (shot.width, shot.height),
        (1024, 768),
        "{}",
        shot.describe()
    );
    // The account is made at the login.
    let uid = uid_of(&login);

    // A normal session: listed as RDP, its desktop the account's, in the session's cgroup.
    let session = agent.session_of(&login);
    assert_eq!(session["kind"], "rdp", "{session}");
    let id = session["id"].as_str().unwrap().to_string();
    let processes = pids_of_uid(uid);
    let names: Vec<String> = processes.iter().map(|&p| comm(p)).collect();
    assert!(
        names.iter().any(|n| n == "Xvfb") && names.iter().any(|n| n == "xterm"),
        "the desktop's X server and terminal are not the account's: {names:?}"
    );
    for &pid in &processes {
        let cgroup = cgroup_of(pid);
        assert!(
            cgroup.contains("/usher-sessions/"),
            "{} ({pid}) of the account is outside the session's cgroup: {cgroup}",
            comm(pid)
        );
    }

    // Typing into the terminal: a file in the home, owned by the account.
    agent.wait_for(20, "the terminal on the client's screen", || {
        terminal_shown(&client, IN_THE_TERMINAL)
    });
    // The shell in it draws its prompt after the window: a moment for it.
    std::thread::sleep(Duration::from_secs(2));
    agent.must(&client, client.click(IN_THE_TERMINAL.0, IN_THE_TERMINAL.1));
    agent.must(&client, client.type_line("cd"));
    agent.must(&client, client.type_line("touch typed-over-rdp"));
    let typed = home_of(&login).join("typed-over-rdp");
    agent.wait_for(20, "the typed command's file", || typed.exists());
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&typed).unwrap().uid(), uid);

    // A program the profile denies is killed (the shell sees 137), shifted keys included.
    agent.must(
        &client,
        client.type_line("id > id-out; echo $? > id-status"),
    );
    let status_file = home_of(&login).join("id-status");
    agent.wait_for(20, "the denied program's status", || {
        std::fs::read_to_string(&status_file).is_ok_and(|s| s.ends_with('\n'))
    });
    assert_eq!(std::fs::read_to_string(&status_file).unwrap().trim(), "137");
    assert_eq!(
        std::fs::read_to_string(home_of(&login).join("id-out")).unwrap(),
        "",
        "the denied program ran"
    );

    // Both execs are in the session's audit stream, as the account's.
    agent.wait_for(10, "the execs in the session's audit stream", || {
        let execs = agent.execs(&id);
        execs.iter().any(|e| e["path"] == "/usr/bin/id")
            && execs.iter().any(|e| e["path"] == "/usr/bin/touch")
    });
    let execs = agent.execs(&id);
    let touch = execs
        .iter()
        .find(|e| e["path"] == "/usr/bin/touch")
        .unwrap();
    assert_eq!(touch["verdict"], "allowed", "{touch}");
    assert_eq!(touch["uid"], uid, "{touch}");
    assert!(
        touch["argv"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == "typed-over-rdp")),
        "{touch}"
    );
    let id_exec = execs.iter().find(|e| e["path"] == "/usr/bin/id").unwrap();
    assert_eq!(id_exec["verdict"], "killed", "{id_exec}");
    assert!(
        execs
            .iter()
            .any(|e| e["path"].as_str().is_some_and(|p| p.ends_with("/xterm"))),
        "the desktop's own execs are not in its audit stream: {execs:#?}"
    );
    assert_eq!(agent.meta(&id)["login"], login.as_str());
}

#[test]
fn a_wrong_secret_no_grant_an_expired_grant_and_a_profile_without_rdp_are_refused() {
    let agent = rdp_agent();
    let display = ClientDisplay::start().unwrap();
    let (login, _) = rdp_grant(&agent, "ok", "right-secret", "rdp", 600);

    // The wrong secret: no session, nothing of the account runs, the reason in the log.
    let mut client = agent.client(&display, agent.options(&login, "wrong-secret"));
    agent.refused(&mut client, "a wrong secret");
    assert!(
        agent
            .sessions()
            .iter()
            .all(|s| s["login"] != login.as_str()),
        "{:?}",
        agent.sessions()
    );
    assert!(!user_exists(&login), "a refused login left an account");
    agent.wait_for(10, "the refusal in usherd's log", || {
        agent
            .log()
            .lines()
            .any(|l| l.contains(&login) && l.contains("refused"))
    });
    // Nothing useful to the client: the secret is not named, right or wrong.
    assert!(!client.log().contains("right-secret"));

    // No grant at all: no account is made for the name.
    let stranger = agent.login("nogrant");
    let mut client = agent.client(&display, agent.options(&stranger, "right-secret"));
    agent.refused(&mut client, "a login without a grant");
    assert!(!user_exists(&stranger));

    // An expired grant: the secret no longer opens anything.
    let (expired, _) = rdp_grant(&agent, "exp", "old-secret", "rdp", 2);
    std::thread::sleep(Duration::from_secs(3));
    let mut client = agent.client(&display, agent.options(&expired, "old-secret"));
    agent.refused(&mut client, "an expired grant");
    assert!(!user_exists(&expired));

    // A profile that does not allow RDP (the same grant would open an SSH session).
    let (no_rdp, _) = rdp_grant(&agent, "nordp", "nordp-secret", "nordp", 600);
    let mut client = agent.client(&display, agent.options(&no_rdp, "nordp-secret"));
    agent.refused(&mut client, "a profile without rdp");
    assert!(!user_exists(&no_rdp), "a refused login left an account");
    assert!(agent.sessions().is_empty(), "{:?}", agent.sessions());

    // And the right secret opens the desktop: the refusals were refusals, not a broken
    // server, and usherd outlived them.
    assert!(agent.alive());
    let mut client = agent.client(&display, agent.options(&login, "right-secret"));
    agent.desktop_shown(&mut client, 4);
}

#[test]
fn two_clients_at_once_each_get_their_own_desktop_and_session() {
    let agent = rdp_agent();
    let (first, _) = rdp_grant(&agent, "one", "first-secret", "rdp", 600);
    let (second, _) = rdp_grant(&agent, "two", "second-secret", "rdp", 600);
    let first_display = ClientDisplay::start().unwrap();
    let second_display = ClientDisplay::start().unwrap();
    let mut first_client = agent.client(&first_display, agent.options(&first, "first-secret"));
    let mut second_client = agent.client(
        &second_display,
        agent.options(&second, "second-secret").size(800, 600),
    );
    agent.desktop_shown(&mut first_client, 4);
    let shot = agent.desktop_shown(&mut second_client, 4);
    assert_eq!((shot.width, shot.height), (800, 600));
    // Both still up while the other runs.
    assert!(first_client.exited().is_none() && second_client.exited().is_none());
    let one = agent.session_of(&first);
    let two = agent.session_of(&second);
    assert_ne!(one["id"], two["id"]);
    for login in [&first, &second] {
        let names: Vec<String> = pids_of_uid(uid_of(login))
            .iter()
            .map(|&p| comm(p))
            .collect();
        assert!(
            names.iter().any(|n| n == "Xvfb"),
            "{login} has no X server of its own: {names:?}"
        );
    }
    // One client leaving does not take the other's desktop.
    first_client.close();
    std::thread::sleep(Duration::from_secs(1));
    assert!(second_client.exited().is_none(), "{}", second_client.log());
    agent.desktop_shown(&mut second_client, 4);
}

#[test]
fn revoking_the_grant_disconnects_the_client_and_removes_the_account_and_its_desktop() {
    let agent = rdp_agent();
    let (login, jti) = rdp_grant(&agent, "rev", "revoke-me", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "revoke-me"));
    agent.desktop_shown(&mut client, 4);
    let uid = uid_of(&login);
    agent.session_of(&login);
    let processes = pids_of_uid(uid);
    assert!(!processes.is_empty());
    let cgroup_dir = SessionCgroups::from_proc_cgroup(&read_trimmed(std::path::Path::new(
        &format!("/proc/{}/cgroup", processes[0]),
    )))
    .v2;
    assert!(cgroup_dir.exists(), "{}", cgroup_dir.display());

    let out = agent.usher(&["grant", "revoke", &jti]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let exited = client.wait_exit(Duration::from_secs(20));
    let status = agent.must(&client, exited.map_err(RdpError::from));
    // It left on its own (the server ended the connection), not by a signal.
    assert!(status.code().is_some(), "xfreerdp: {status}");
    agent.wait_for(20, "the account to go", || !user_exists(&login));
    agent.wait_for(10, "the account's processes to go", || {
        pids_of_uid(uid).is_empty()
    });
    agent.wait_for(10, "the session's cgroup to go", || !cgroup_dir.exists());
    agent.wait_for(10, "the session to end", || agent.sessions().is_empty());
    // Nothing the desktop made outlives it: not even its X server's lock file and socket,
    // which would keep the UID from being handed out again.
    let left: Vec<_> = ["/tmp", "/tmp/.X11-unix", "/var/tmp", "/dev/shm"]
        .iter()
        .flat_map(|dir| files_of_uid(dir, uid))
        .collect();
    assert!(left.is_empty(), "the revoked desktop left {left:?}");
    // And the secret opens nothing any more.
    let mut again = agent.client(&display, agent.options(&login, "revoke-me"));
    agent.refused(&mut again, "a revoked grant");
}

#[test]
fn the_codecs_colour_depths_and_negotiation_a_client_can_ask_for_all_show_the_desktop() {
    let agent = rdp_agent();
    // (what, extra options, security, how far a lossy codec may shift the colour)
    let variants: [(&str, &[&str], Security, u8); 5] = [
        ("default", &[], Security::Tls, 4),
        ("/rfx", &["/rfx"], Security::Tls, 16),
        ("/gfx", &["/gfx"], Security::Tls, 16),
        ("/bpp:16", &["/bpp:16"], Security::Tls, 10),
        ("no /sec (negotiated)", &[], Security::Negotiated, 4),
    ];
    let mut failures = Vec::new();
    for (n, (what, extra, security, tolerance)) in variants.iter().enumerate() {
        let secret = format!("codec-secret-{n}");
        let (login, _) = rdp_grant(&agent, &format!("c{n}"), &secret, "rdp", 600);
        let display = ClientDisplay::start().unwrap();
        let mut options = agent.options(&login, &secret).security(*security);
        for arg in extra.iter() {
            options = options.arg(arg);
        }
        let mut client = agent.client(&display, options);
        match client.wait_for_colour(colour(), *tolerance, 40, CONNECT) {
            Ok(shot) => eprintln!("{what}: shown ({})", shot.describe()),
            Err(e) => failures.push(format!("{what}: {e}\n--- xfreerdp ---\n{}", client.log())),
        }
        client.close();
    }
    assert!(
        failures.is_empty(),
        "{}\n--- usherd log ---\n{}",
        failures.join("\n\n"),
        agent.log()
    );
}

#[test]
fn a_client_insisting_on_nla_is_answered_and_usherd_keeps_serving() {
    let agent = rdp_agent();
    let (login, _) = rdp_grant(&agent, "nla", "nla-secret", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let said_before = failures_logged(&agent);
    let mut client = agent.client(
        &display,
        agent.options(&login, "nla-secret").security(Security::Nla),
    );
    // Either CredSSP logs in (the desktop shows), or the client is told at the
    // negotiation that NLA is not offered (usherd's worker cannot do CredSSP without the
    // password's NT hash): FreeRDP 2 exits 133, its "negotiation failure". Never a client
    // left hanging, a crashed daemon or a silent journal.
    let outcome = client.wait_for_colour(colour(), 4, 40, CONNECT);
    match &outcome {
        Ok(_) => eprintln!("/sec:nla: logged in"),
        Err(RdpError::ClientExited { status, .. }) => {
            eprintln!("/sec:nla: refused, xfreerdp exited {status}");
            assert_eq!(
                status.code(),
                Some(133),
                "not refused at the negotiation\n--- xfreerdp ---\n{}\n--- usherd log ---\n{}",
                client.log(),
                agent.log()
            );
            assert!(!user_exists(&login), "a refused login left an account");
            agent.wait_for(10, "the refused connection in usherd's log", || {
                failures_logged(&agent) > said_before
            });
        }
        Err(e) => panic!(
            "/sec:nla neither logged in nor was refused: {e}\n--- xfreerdp ---\n{}\n--- usherd log ---\n{}",
            client.log(),
            agent.log()
        ),
    }
    client.close();
    assert!(agent.alive(), "usherd died:\n{}", agent.log());
    // The next client, over TLS, still gets in.
    let mut client = agent.client(&display, agent.options(&login, "nla-secret"));
    agent.desktop_shown(&mut client, 4);
}

#[test]
fn the_certificate_is_kept_across_restarts_and_its_fingerprint_is_in_usher_status() {
    let mut agent = rdp_agent();
    let (login, _) = rdp_grant(&agent, "cert", "cert-secret", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    // The client remembers what it was shown on first use.
    let mut first = agent.client(
        &display,
        agent
            .options(&login, "cert-secret")
            .cert(CertCheck::TrustOnFirstUse),
    );
    agent.desktop_shown(&mut first, 4);
    let fingerprint = first
        .remembered_fingerprint()
        .unwrap_or_else(|| panic!("the client remembered no certificate:\n{}", first.log()));
    first.close();
    assert_eq!(fingerprint.len(), 64, "{fingerprint}");
    let status_shows = |agent: &TestAgent| {
        let out = agent.usher(&["status"]);
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        text.replace(':', "").contains(&fingerprint)
    };
    assert!(
        status_shows(&agent),
        "`usher status` does not show the certificate's SHA-256 {fingerprint}:\n{}",
        String::from_utf8_lossy(&agent.usher(&["status"]).stdout)
    );

    // A client that insists on another certificate is not fooled (it would ask, and it
    // has no one to ask).
    let wrong = format!(
        "{}{}",
        &fingerprint[..63],
        if fingerprint.ends_with('0') { '1' } else { '0' }
    );
    let mut doubter = agent.client(
        &display,
        agent
            .options(&login, "cert-secret")
            .cert(CertCheck::Sha256(wrong)),
    );
    let status = agent.refused(&mut doubter, "a client pinned to another certificate");
    // FreeRDP 2's "TLS connect failed": it stopped at the certificate.
    assert_eq!(status.code(), Some(143), "{}", doubter.log());

    // Restarted, usherd presents the same certificate.
    agent.stop();
    agent.launch();
    wait_for_port(agent.rdp_port, Duration::from_secs(20)).unwrap();
    assert!(
        status_shows(&agent),
        "the fingerprint changed across a restart"
    );
    let mut pinned = agent.client(
        &display,
        agent
            .options(&login, "cert-secret")
            .cert(CertCheck::Sha256(fingerprint.clone())),
    );
    agent.desktop_shown(&mut pinned, 4);
}

#[test]
fn the_default_desktop_is_a_window_manager_and_a_terminal_of_the_account() {
    let agent = rdp_agent_with(None, "");
    let (login, _) = rdp_grant(&agent, "dflt", "default-secret", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "default-secret"));
    let window = client.wait_for_window(CONNECT);
    agent.must(&client, window);
    // FreeRDP opens its window before usherd has decided: the session says it has.
    agent.session_of(&login);
    let uid = uid_of(&login);
    agent.wait_for(
        30,
        "the window manager and the terminal as the account",
        || {
            let names: Vec<String> = pids_of_uid(uid).iter().map(|&p| comm(p)).collect();
            names.iter().any(|n| n == "xterm") && names.iter().any(|n| n == "openbox")
        },
    );
    // What the desktop's own X server shows (its root colour and a terminal), the client
    // shows too.
    let desktop = SessionDisplay::of(uid);
    let mut last = (String::new(), String::new());
    let same = poll_until(
        "the client to show what the desktop shows",
        Duration::from_secs(20),
        Duration::from_millis(500),
        || {
            let theirs = desktop.screenshot()?;
            let ours = client.screenshot().ok()?;
            last = (theirs.describe(), ours.describe());
            let root = Rgb::hex("#2f4f6f").unwrap();
            (theirs.share_near(root, 0) > 0.2
                && theirs.share_near(root, 0) < 0.98
                && looks_alike(&theirs, &ours))
            .then_some(())
        },
    );
    if let Err(e) = same {
        panic!(
            "{e}: the desktop shows {}; the client shows {}\n--- the desktop's windows ---\n{}\n--- the account's processes ---\n{:?}\n--- usherd log ---\n{}",
            last.0,
            last.1,
            desktop.windows(),
            pids_of_uid(uid).iter().map(|&p| (p, comm(p))).collect::<Vec<_>>(),
            agent.log()
        );
    }
    assert!(client.exited().is_none(), "{}", client.log());
}

#[test]
fn two_agents_starting_desktops_at_the_same_moment_each_show_their_own() {
    // Two usherds on one host (or usherd beside any other X server that starts): each
    // desktop's X server must be its own, whatever display number the other took. (Each
    // usherd once picked the lowest free number itself, and both took the same one.)
    let blue = rdp_agent_with(Some(DESKTOP), "");
    let orange = rdp_agent_with(
        Some("xsetroot -solid '#cc6633'; exec xterm -geometry 80x24+0+0"),
        "",
    );
    // Each round, both pick the lowest display number free at that moment.
    for round in 0..3 {
        let (blue_login, _) = rdp_grant(&blue, &format!("blue{round}"), "blue-secret", "rdp", 600);
        let (orange_login, _) = rdp_grant(
            &orange,
            &format!("orange{round}"),
            "orange-secret",
            "rdp",
            600,
        );
        let blue_display = ClientDisplay::start().unwrap();
        let orange_display = ClientDisplay::start().unwrap();
        let mut blue_client = blue.client(&blue_display, blue.options(&blue_login, "blue-secret"));
        let mut orange_client = orange.client(
            &orange_display,
            orange.options(&orange_login, "orange-secret"),
        );
        blue.desktop_shown(&mut blue_client, 4);
        orange.colour_shown(&mut orange_client, Rgb::hex("#cc6633").unwrap(), 4);
    }
}

#[test]
fn a_dropped_client_that_comes_back_gets_its_desktop_and_an_abandoned_one_ends() {
    let agent = rdp_agent_with(Some(DESKTOP), "reconnect_secs = 4\n");
    let (login, _) = rdp_grant(&agent, "back", "back-secret", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "back-secret"));
    agent.desktop_shown(&mut client, 4);
    let first = agent.session_of(&login);
    let uid = uid_of(&login);
    let x_servers = |uid: u32| -> Vec<i32> {
        pids_of_uid(uid)
            .into_iter()
            .filter(|&p| comm(p) == "Xvfb")
            .collect()
    };
    let x_server = x_servers(uid);
    assert_eq!(x_server.len(), 1, "{x_server:?}");

    // Dropped: the desktop waits, and the same login gets the same desktop back.
    client.close();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(agent.sessions().len(), 1, "{:?}", agent.sessions());
    let mut back = agent.client(&display, agent.options(&login, "back-secret"));
    agent.desktop_shown(&mut back, 4);
    assert_eq!(agent.session_of(&login)["id"], first["id"]);
    assert_eq!(
        x_servers(uid),
        x_server,
        "a new X server, not the desktop back"
    );

    // The wrong secret takes nothing over: the client showing it stays.
    let other_display = ClientDisplay::start().unwrap();
    let mut thief = agent.client(&other_display, agent.options(&login, "not-the-secret"));
    agent.refused(&mut thief, "a wrong secret for a live desktop");
    assert!(back.exited().is_none(), "{}", back.log());
    agent.desktop_shown(&mut back, 4);

    // Dropped and not come back within reconnect_secs: the desktop ends.
    back.close();
    agent.wait_for(20, "the abandoned desktop to end", || {
        agent.sessions().is_empty()
    });
    agent.wait_for(10, "its X server to go", || x_servers(uid).is_empty());
}

/// The processes named `name` (`comm`).
fn pids_named(name: &str) -> Vec<i32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
                .filter(|&p| comm(p) == name)
                .collect()
        })
        .unwrap_or_default()
}

/// A field of /proc/PID/status.
fn status_field(pid: i32, field: &str) -> String {
    read_trimmed(std::path::Path::new(&format!("/proc/{pid}/status")))
        .lines()
        .find_map(|l| {
            l.strip_prefix(&format!("{field}:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_default()
}

#[test]
fn a_killed_worker_takes_only_its_connection_and_the_client_gets_its_desktop_back() {
    let agent = rdp_agent();
    let (login, _) = rdp_grant(&agent, "again", "rdp-secret-again", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "rdp-secret-again"));
    agent.desktop_shown(&mut client, 4);
    let session = agent.session_of(&login)["id"].as_str().unwrap().to_string();

    // The connection's worker runs unprivileged, and can never gain privileges back.
    let workers = pids_named("usher-rdp");
    let worker = *workers
        .iter()
        .find(|&&p| status_field(p, "PPid") == agent.pid().to_string())
        .unwrap_or_else(|| panic!("no usher-rdp child of usherd: {workers:?}"));
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap().uid;
    assert!(
        status_field(worker, "Uid")
            .split_whitespace()
            .all(|u| u == nobody.to_string()),
        "the worker runs as {}",
        status_field(worker, "Uid")
    );
    assert_eq!(status_field(worker, "NoNewPrivs"), "1");

    // The desktop's X server listens on no TCP port, and its cookie is the account's only.
    let uid = uid_of(&login);
    let xvfb = *pids_of_uid(uid)
        .iter()
        .find(|&&p| comm(p) == "Xvfb")
        .expect("the desktop's Xvfb");
    let cmdline = std::fs::read(format!("/proc/{xvfb}/cmdline")).unwrap();
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w[0] == "-nolisten" && w[1] == "tcp"),
        "{args:?}"
    );
    let auth = args
        .windows(2)
        .find(|w| w[0] == "-auth")
        .map(|w| std::path::PathBuf::from(&w[1]))
        .expect("Xvfb -auth");
    let meta = std::fs::metadata(&auth).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(
        (meta.uid(), meta.permissions().mode() & 0o777),
        (uid, 0o600)
    );
    // The display the X server picked, as the desktop's terminal was told.
    let xterm = *pids_of_uid(uid)
        .iter()
        .find(|&&p| comm(p) == "xterm")
        .expect("the desktop's xterm");
    let environ = std::fs::read(format!("/proc/{xterm}/environ")).unwrap();
    let display_arg = environ
        .split(|&b| b == 0)
        .find_map(|v| v.strip_prefix(b"DISPLAY="))
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .expect("DISPLAY in the xterm's environment");
    // Another local user, without the cookie, is turned away by the X server.
    let stranger = std::process::Command::new("setpriv")
        .args([
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            "xdpyinfo",
            "-display",
        ])
        .arg(&display_arg)
        .env_remove("XAUTHORITY")
        .output()
        .unwrap();
    assert!(
        !stranger.status.success(),
        "a stranger opened the desktop's display"
    );

    // The worker dies: usherd and the desktop stay, the client is dropped.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker),
        nix::sys::signal::SIGKILL,
    )
    .unwrap();
    let _ = client.wait_exit(REFUSAL);
    assert!(agent.alive(), "usherd died with its worker");
    assert!(
        std::path::Path::new(&format!("/proc/{xvfb}")).exists(),
        "the desktop died with the worker"
    );

    // Logging in again under the same grant brings the same desktop back.
    let mut again = agent.client(&display, agent.options(&login, "rdp-secret-again"));
    agent.desktop_shown(&mut again, 4);
    let sessions: Vec<_> = agent
        .sessions()
        .into_iter()
        .filter(|s| s["login"] == login.as_str())
        .collect();
    assert_eq!(sessions.len(), 1, "{sessions:?}");
    assert_eq!(sessions[0]["id"], session.as_str());
    assert!(agent.log().contains("(reconnected)"), "{}", agent.log());
    again.close();
}

#[test]
fn unauthenticated_connections_are_capped_timed_out_and_garbage_does_not_hurt() {
    use std::io::{Read, Write};
    let agent = rdp_agent_with(
        Some(DESKTOP),
        "max_startups_per_source = 3\nlogin_grace_secs = 3\n",
    );
    let addr = format!("127.0.0.1:{}", agent.rdp_port);
    // Three silent connections are held; the fourth is closed at once.
    let held: Vec<_> = (0..3)
        .map(|_| std::net::TcpStream::connect(&addr).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let mut fourth = std::net::TcpStream::connect(&addr).unwrap();
    fourth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        matches!(fourth.read(&mut buf), Ok(0) | Err(_)),
        "a fourth unauthenticated connection from one address was served"
    );
    // The held ones are closed when the login grace time is over.
    for mut c in held {
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let started = std::time::Instant::now();
        let end = c.read(&mut buf);
        assert!(
            matches!(end, Ok(0) | Err(_)) && started.elapsed() < Duration::from_secs(9),
            "a silent connection outlived the login grace time: {end:?}"
        );
    }
    // Garbage instead of a connection request: the worker drops it, usherd stays.
    for junk in [
        &b"\x03\x00\xff\xff garbage"[..],
        &[0u8; 4096][..],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        let _ = c.write_all(junk);
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.read(&mut buf);
    }
    assert!(agent.alive());
    // And a real client still gets in.
    let (login, _) = rdp_grant(&agent, "after", "rdp-secret-after", "rdp", 600);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "rdp-secret-after"));
    agent.desktop_shown(&mut client, 4);
    client.close();
}

#[test]
fn the_grant_expiring_disconnects_the_client_and_ends_the_desktop() {
    let agent = rdp_agent();
    let (login, _) = rdp_grant(&agent, "brief", "rdp-secret-brief", "rdp", 40);
    let display = ClientDisplay::start().unwrap();
    let mut client = agent.client(&display, agent.options(&login, "rdp-secret-brief"));
    agent.desktop_shown(&mut client, 4);
    let uid = uid_of(&login);
    let status = client
        .wait_exit(Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("the client outlived its grant: {e}\n{}", agent.log()));
    assert!(
        !status.success() || client.log().contains("ERRINFO"),
        "{}",
        client.log()
    );
    agent.wait_for(20, "the desktop's processes to end", || {
        pids_of_uid(uid).is_empty()
    });
    assert!(agent.log().contains("rdp_disconnected"), "{}", agent.log());
}
