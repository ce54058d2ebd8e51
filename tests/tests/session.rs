//! What a session's process is: its cgroup, identity, environment and descriptors; what
//! the connection may do besides (forwarding); and what stays across restarts (host key).

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;
use usher_tests::*;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn each_session_runs_in_its_own_cgroup_as_the_account_with_a_clean_environment() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_groups = [\"users\"]\n".into(),
        ..Default::default()
    });
    let login = agent.login("gina");
    let mut c = agent.claims(&login, 600);
    c.groups = vec!["users".into()];
    assert!(agent.install(&agent.sign(&c)).status.success());

    let probe = "cat /proc/self/cgroup | grep '^0::'; id -Gn; ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; \
                 env | sort | grep -E '^(HOME|USER|LOGNAME|SHELL|PATH|LANG|USHER_SESSION|SECRET_TOKEN)=' ; echo \"uid=$(id -u) euid=$(id -u) \"";
    let run = || {
        agent
            .ssh_command(&login)
            .args(["-o", "SetEnv=LANG=C.UTF-8 SECRET_TOKEN=leak"])
            .arg(probe)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let a = run();
    let b = run();
    assert!(
        a.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&a.stderr),
        agent.log()
    );
    let (a, b) = (stdout(&a), stdout(&b));
    let cg_a = a.lines().next().unwrap();
    let cg_b = b.lines().next().unwrap();
    assert!(cg_a.contains("/usher-sessions/"), "{a}");
    assert_ne!(cg_a, cg_b, "two sessions shared a cgroup");
    let groups = a.lines().nth(1).unwrap();
    assert!(groups.split(' ').any(|g| g == "users"), "{groups}");
    assert!(groups.split(' ').any(|g| g == login), "{groups}");
    // 0, 1, 2, and the directory `ls` itself opened: nothing from the agent.
    let fds: Vec<&str> = a.lines().nth(2).unwrap().split_whitespace().collect();
    assert_eq!(fds, ["0", "1", "2", "3"], "inherited descriptors: {a}");
    assert!(a.contains(&format!("HOME=/home/{login}")), "{a}");
    assert!(a.contains(&format!("USER={login}")), "{a}");
    assert!(a.contains("LANG=C.UTF-8"), "allowed variable missing: {a}");
    assert!(
        !a.contains("SECRET_TOKEN"),
        "a variable outside the allowlist got through: {a}"
    );
    assert!(a.contains("USHER_SESSION="), "{a}");

    // While a session runs, its cgroup holds it; `usher sessions` lists it.
    let mut live = agent
        .ssh_command(&login)
        .arg("sleep 30")
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    agent.wait_for(10, "the session to be listed", || {
        stdout(&agent.usher(&["sessions", "--json"])).contains(&login)
    });
    let status: serde_json::Value =
        serde_json::from_slice(&agent.usher(&["status", "--json"]).stdout).unwrap();
    assert_eq!(status["sessions"], 1, "{status}");
    assert!(
        status["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == login.as_str()),
        "{status}"
    );
    assert!(status["enforcement"]["path"].is_string(), "{status}");
    hang_up(&mut live);
    // The client hung up: the session's process gets SIGHUP and the cgroup goes.
    agent.wait_for(10, "the session to end after the client hung up", || {
        !stdout(&agent.usher(&["sessions", "--json"])).contains(&login)
    });
}

#[test]
fn the_control_socket_answers_root_only() {
    let agent = TestAgent::start();
    // `nobody` may connect but is refused, whatever it asks.
    let sock = agent.dir.join("control.sock");
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(bin("usher"))
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("only root"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Garbage gets an error, not a crash.
    let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.write_all(b"{\"op\":\"format_disk\"}\nnot json at all\n")
        .unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert_eq!(answer.lines().count(), 2, "{answer}");
    assert!(
        answer.lines().all(|l| l.contains("\"ok\":false")),
        "{answer}"
    );
    assert!(agent.usher(&["status"]).status.success());
}

#[test]
fn the_host_key_is_made_once_private_and_kept_across_restarts() {
    let mut agent = TestAgent::start();
    let path = agent.dir.join("state/ssh_host_ed25519_key");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let scan = |port: u16| {
        let out = Command::new("ssh-keyscan")
            .args(["-t", "ed25519", "-p", &port.to_string(), "127.0.0.1"])
            .stderr(Stdio::null())
            .output()
            .unwrap();
        stdout(&out).split_whitespace().last().map(String::from)
    };
    let before = scan(agent.port).expect("a host key");
    agent.stop();
    agent.launch();
    assert_eq!(scan(agent.port).unwrap(), before);
}

fn forward_once(agent: &TestAgent, login: &str) -> Option<String> {
    // A loopback service for the forward to reach.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_port = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        if let Ok((mut s, _)) = target.accept() {
            let _ = s.write_all(b"hello through the tunnel\n");
        }
    });
    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut tunnel = agent
        .ssh_command(login)
        .args([
            "-N",
            "-L",
            &format!("127.0.0.1:{local_port}:127.0.0.1:{target_port}"),
        ])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut got = None;
    for _ in 0..50 {
        std::thread::sleep(Duration::from_millis(100));
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", local_port)) {
            s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf);
            got = Some(buf);
            break;
        }
    }
    let _ = tunnel.kill();
    let _ = tunnel.wait();
    got.filter(|s| !s.is_empty())
}

#[test]
fn port_forwarding_only_when_the_profile_allows_it() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"tunnel\"]\n".into(),
        profiles: vec![(
            "tunnel.toml".into(),
            "name = \"tunnel\"\ndescription = \"shell and local forwarding\"\nport_forwarding = true\n".into(),
        )],
        ..Default::default()
    });
    let plain = agent.login("plain");
    assert!(agent
        .install(&agent.sign(&agent.claims(&plain, 600)))
        .status
        .success());
    assert_eq!(
        forward_once(&agent, &plain),
        None,
        "forwarding allowed by the default profile"
    );
    assert!(agent.log().contains("USHER_EVENT=forward_refused"));

    let tunnel = agent.login("tunnel");
    let mut c = agent.claims(&tunnel, 600);
    c.profile = Some("tunnel".into());
    assert!(agent.install(&agent.sign(&c)).status.success());
    assert_eq!(
        forward_once(&agent, &tunnel).as_deref(),
        Some("hello through the tunnel\n")
    );
}

/// `ssh` as `login`, like `TestAgent::ssh_command` but saying what the server refused
/// (LogLevel INFO), with the command's arguments still to add before the login.
fn ssh_telling_info(agent: &TestAgent, login: &str) -> Command {
    let mut base = agent.ssh_base_args();
    for arg in base.iter_mut() {
        if arg.starts_with("LogLevel=") {
            *arg = "LogLevel=INFO".into();
        }
    }
    let mut c = Command::new("timeout");
    c.arg("60").arg("ssh").args(base);
    c.args(["-o", "BatchMode=yes", "-i"])
        .arg(&agent.client_key)
        .args(["-p", &agent.port.to_string()])
        .arg(format!("{login}@127.0.0.1"));
    c
}

/// Whether something accepts connections on the loopback `port`.
fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

#[test]
fn remote_forwarding_agent_forwarding_and_x11_are_refused_even_when_the_profile_forwards() {
    // A profile that allows local forwarding: the others must still be refused.
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"tunnel\"]\n".into(),
        profiles: vec![(
            "tunnel.toml".into(),
            "name = \"tunnel\"\nport_forwarding = true\n".into(),
        )],
        ..Default::default()
    });
    let login = agent.login("nofwd");
    let mut c = agent.claims(&login, 600);
    c.profile = Some("tunnel".into());
    assert!(agent.install(&agent.sign(&c)).status.success());

    // -R: the agent would listen on the host's loopback for the client.
    let remote_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = agent
        .ssh_command(&login)
        .args([
            "-o",
            "ExitOnForwardFailure=yes",
            "-R",
            &format!("127.0.0.1:{remote_port}:127.0.0.1:9"),
        ])
        .arg("echo SHOULD-NOT-RUN-$((40+2))")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (out_text, err_text) = (
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        err_text.contains("remote port forwarding failed"),
        "-R was not refused: {out_text}{err_text}"
    );
    assert!(!out_text.contains("SHOULD-NOT-RUN-42"), "{out_text}");
    assert!(
        !listening(remote_port),
        "the agent listens for a -R forward"
    );

    // Agent forwarding: a running ssh-agent on the client's side, asked for with -A.
    let agent_socket = agent.dir.join("client-agent.sock");
    let mut ssh_agent = Command::new("ssh-agent")
        .arg("-D")
        .arg("-a")
        .arg(&agent_socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    agent.wait_for(10, "the client's ssh-agent", || agent_socket.exists());
    let out = agent
        .ssh_command(&login)
        .args(["-o", "ForwardAgent=yes"])
        .arg("echo \"sock:${SSH_AUTH_SOCK:-none}\"; ssh-add -l >/dev/null 2>&1; echo \"add:$?\"")
        .env("SSH_AUTH_SOCK", &agent_socket)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = ssh_agent.kill();
    let _ = ssh_agent.wait();
    let shown = stdout(&out);
    assert!(
        shown.contains("sock:none"),
        "agent forwarding was set up: {shown}"
    );
    // 2: no agent to reach (1 would be an agent with no keys).
    assert!(shown.contains("add:2"), "an agent was reachable: {shown}");

    // X11: a display on the client's side, asked for with -X (trusted, so that no xauth
    // run on the client can stop the request from being sent). The client says it sent it;
    // the session has no display, and the client is told its request failed.
    let out = ssh_telling_info(&agent, &login)
        .args(["-o", "ForwardX11=yes", "-o", "ForwardX11Trusted=yes"])
        .arg("echo \"display:${DISPLAY:-none}\"")
        .env("DISPLAY", ":93")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let (shown, said) = (
        stdout(&out),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        said.contains("X11 forwarding"),
        "the client did not ask for X11 forwarding: {said}"
    );
    assert!(
        shown.contains("display:none"),
        "X11 forwarding was set up: {shown}{said}"
    );
    assert!(
        said.contains("X11 forwarding request failed"),
        "the client was not told X11 forwarding was refused: {said}"
    );
}
