//! The agent as an anonymous network peer, a local user without a grant and a grant
//! holder who floods would attack it: it stays up, no session outgrows its limits, and
//! when a grant ends every way in that it opened ends with it.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use usher_tests::*;

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

fn alive(agent: &mut TestAgent) -> bool {
    Command::new("kill")
        .args(["-0", &agent.pid().to_string()])
        .status()
        .unwrap()
        .success()
}

/// Blocks until the peer closes the connection (true) or `within` passes (false).
fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    stream.set_read_timeout(Some(within)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

fn logs_in(agent: &TestAgent, login: &str) -> bool {
    let out = agent.ssh(login, "echo in");
    String::from_utf8_lossy(&out.stdout).contains("in")
}

#[test]
fn a_flood_of_idle_connections_past_the_descriptor_limit_does_not_stop_the_agent() {
    // Caps as high as the descriptor limit allows, so the flood reaches EMFILE.
    let mut agent = TestAgent::start_with(Options {
        nofile: Some(256),
        ssh_config: "max_startups = 5000\nmax_startups_per_source = 5000\n".into(),
        ..Default::default()
    });
    let login = agent.login("flood");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let mut idle = Vec::new();
    for _ in 0..400 {
        match TcpStream::connect(("127.0.0.1", agent.port)) {
            Ok(s) => idle.push(s),
            Err(_) => break,
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(&mut agent), "usherd died:\n{}", agent.log());
    drop(idle);
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(&mut agent), "usherd died:\n{}", agent.log());
    agent.wait_for(20, "a login after the flood", || logs_in(&agent, &login));
    let log = agent.log();
    assert!(log.contains("accepting a connection failed"), "{log}");
    assert!(
        log.matches("accepting a connection failed").count() <= 3,
        "the accept error is said once per spell:\n{log}"
    );
}

#[test]
fn unauthenticated_connections_are_capped_per_source_and_get_a_grace_time() {
    let agent = TestAgent::start_with(Options {
        ssh_config: "login_grace_secs = 2\nmax_startups = 50\nmax_startups_per_source = 4\n".into(),
        listen: vec!["127.0.0.1:{port}".into(), "[::1]:{port}".into()],
        ..Default::default()
    });
    let login = agent.login("grace");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    // Four connections that say nothing are held; the fifth from the same address is
    // closed at once.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|_| TcpStream::connect(("127.0.0.1", agent.port)).unwrap())
        .collect();
    let opened = Instant::now();
    std::thread::sleep(Duration::from_millis(300));
    let mut fifth = TcpStream::connect(("127.0.0.1", agent.port)).unwrap();
    assert!(
        closed_within(&mut fifth, Duration::from_secs(1)),
        "a fifth unauthenticated connection from one address was kept"
    );
    // Another source address is not starved by the first.
    let out = agent
        .ssh_command_to(&login, "::1", agent.port)
        .arg("echo from-v6")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("from-v6"),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        agent.log()
    );
    // The grace time: a silent peer and one that stops after the version line.
    held[1].write_all(b"SSH-2.0-idle\r\n").unwrap();
    for s in held.iter_mut() {
        assert!(
            closed_within(s, Duration::from_secs(6)),
            "an unauthenticated connection outlived its grace time"
        );
    }
    let took = opened.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "closed before the grace time: {took:?}"
    );
    // With the slots free again, the first address logs in.
    assert!(logs_in(&agent, &login), "{}", agent.log());
}

#[test]
fn ipv4_and_ipv6_wildcards_on_one_port_are_both_bound_and_reported() {
    let agent = TestAgent::start_with(Options {
        listen: vec!["0.0.0.0:{port}".into(), "[::]:{port}".into()],
        ..Default::default()
    });
    let log = agent.log();
    let ready = log
        .lines()
        .find(|l| l.contains("ready"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        ready.contains(&format!("0.0.0.0:{}", agent.port))
            && ready.contains(&format!("[::]:{}", agent.port)),
        "{ready}"
    );
    assert!(!log.contains("cannot listen"), "{log}");
    for addr in ["127.0.0.1", "::1"] {
        let mut s = TcpStream::connect((addr, agent.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut banner = [0u8; 8];
        s.read_exact(&mut banner).unwrap();
        assert_eq!(&banner, b"SSH-2.0-", "{addr}");
    }
}

/// A process as `nobody` that connects to a Unix socket, sends nothing, and prints what
/// it read and how long until the agent closed it.
fn as_nobody_connect(path: &std::path::Path) -> (String, f64) {
    let script = format!(
        "import socket,time\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(10)\ns.connect({:?})\nt=time.time()\nd=b''\nwhile True:\n  c=s.recv(4096)\n  if not c: break\n  d+=c\nprint(repr(d)); print(time.time()-t)\n",
        path.display().to_string()
    );
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            &script,
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut lines = text.lines();
    let said = lines.next().unwrap_or_default().to_string();
    let secs = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("{text}{}", String::from_utf8_lossy(&out.stderr)));
    (said, secs)
}

#[test]
fn local_peers_without_business_on_the_sockets_are_dropped_at_once() {
    let agent = TestAgent::start();
    // The socket directory is the test's; let nobody reach the sockets in it.
    Command::new("chmod")
        .args(["755"])
        .arg(&agent.dir)
        .status()
        .unwrap();
    let (said, secs) = as_nobody_connect(&agent.dir.join("control.sock"));
    assert!(secs < 1.0, "control socket kept a non-root peer {secs} s");
    assert!(said.contains("only root"), "{said}");
    let (said, secs) = as_nobody_connect(&agent.dir.join("console.sock"));
    assert!(
        secs < 1.0,
        "console socket kept a peer outside the accounts {secs} s"
    );
    assert_eq!(said, "b''");
    // Root's own console connections are capped too: the ninth idle one is dropped.
    let held: Vec<_> = (0..8)
        .map(|_| std::os::unix::net::UnixStream::connect(agent.dir.join("console.sock")).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut ninth =
        std::os::unix::net::UnixStream::connect(agent.dir.join("console.sock")).unwrap();
    ninth
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 16];
    assert_eq!(
        ninth.read(&mut buf).unwrap_or(1),
        0,
        "a ninth idle console connection was kept"
    );
    drop(held);
    // And the control socket still answers root.
    assert!(agent.usher(&["status"]).status.success());
}

#[test]
fn a_client_that_reads_nothing_holds_neither_memory_nor_spool() {
    let agent = TestAgent::start();
    let login = agent.login("zero");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    assert!(logs_in(&agent, &login));
    let before = rss_kib(agent.pid());
    // `ssh host 'cat /dev/zero' | sleep`: the client's stdout is a pipe nobody reads.
    let mut client = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "{} | sleep 12",
            shell_words(&agent.ssh_command(&login), "cat /dev/zero")
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let grown = rss_kib(agent.pid()).saturating_sub(before);
    let spool = usher::ship::spool_bytes(&agent.spool());
    let _ = Command::new("pkill")
        .args(["-f", &format!("{login}@127.0.0.1")])
        .status();
    let _ = client.kill();
    let _ = client.wait();
    assert!(
        grown < 64 * 1024,
        "usherd grew by {grown} KiB under a client that reads nothing"
    );
    assert!(
        spool < 64 << 20,
        "the spool grew to {spool} bytes under a client that reads nothing"
    );
}

/// An `ssh …` command line for `sh -c`.
fn shell_words(command: &Command, remote: &str) -> String {
    let mut words = vec![command.get_program().to_string_lossy().into_owned()];
    words.extend(command.get_args().map(|a| a.to_string_lossy().into_owned()));
    words.push(remote.to_string());
    words
        .iter()
        .map(|w| format!("'{}'", w.replace('\'', "'\\''")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn the_spool_limit_holds_while_a_session_floods_and_the_session_is_told() {
    let max = 4u64 << 20;
    let agent = TestAgent::start_with(Options {
        extra_config: format!("[spool]\nmax_bytes = {max}\n"),
        ..Default::default()
    });
    let login = agent.login("spool");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let out = agent.ssh(&login, "head -c 40000000 /dev/urandom | base64");
    let spool = usher::ship::spool_bytes(&agent.spool());
    assert!(
        spool <= max + 256 * 1024,
        "spool at {spool} bytes, over its limit of {max}"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("spool reached its limit"), "{err}");
    assert!(out.stdout.len() < (max as usize), "{}", out.stdout.len());
    let id = agent.recorded_sessions().pop().unwrap();
    assert!(
        agent
            .audit(&id)
            .iter()
            .any(|e| e["event"] == "recording_limit"),
        "the audit stream does not say why the session ended"
    );
}

fn profile(name: &str, recording: &str) -> (String, String) {
    (
        format!("{name}.toml"),
        format!("name = \"{name}\"\n[recording]\n{recording}\n"),
    )
}

#[test]
fn a_sessions_recording_budget_ends_or_truncates_it_as_its_profile_says() {
    let agent = TestAgent::start_with(Options {
        profiles: vec![
            profile("capped", "max_bytes = 1048576"),
            profile("cut", "max_bytes = 1048576\nat_limit = \"truncate\""),
            profile("slow", "max_bytes_per_sec = 300000"),
        ],
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"capped\", \"cut\", \"slow\"]\n"
            .into(),
        ..Default::default()
    });
    let flood = "seq 1 1000000";

    // End: the client sees the reason, never more than was recorded.
    let login = agent.grant("capped", Some("capped")).0;
    let out = agent.ssh(&login, flood);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("reached its limit of 1048576 bytes"), "{err}");
    assert!(!out.status.success());
    let id = session_of(&agent, "capped");
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    assert!(cast.len() < 1048576 + 64 * 1024, "{}", cast.len());
    assert!(cast.contains("session closed: the session's recording reached its limit"));
    let recorded = recorded_output(&cast);
    let seen = String::from_utf8_lossy(&out.stdout);
    assert!(
        recorded.starts_with(&*seen),
        "the client saw output the recording does not have"
    );

    // Truncate: the session runs to its end; the cast says where it was cut.
    let login = agent.grant("cut", Some("cut")).0;
    let out = agent.ssh(&login, flood);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).ends_with("1000000\n"));
    let id = session_of(&agent, "cut");
    let meta = agent.meta(&id);
    assert!(
        meta["truncated"]
            .as_str()
            .unwrap_or_default()
            .contains("reached its limit"),
        "{meta}"
    );
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    assert!(cast.len() < 1048576 + 64 * 1024);
    assert!(cast.contains("recording truncated"));

    // Rate: 1.2 MB of output at 300 kB/s takes seconds, all of it delivered.
    let login = agent.grant("slow", Some("slow")).0;
    let start = Instant::now();
    let out = agent.ssh(&login, "head -c 900000 /dev/zero | base64 -w 100");
    let took = start.elapsed();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), 1200000 + 12000);
    assert!(took >= Duration::from_secs(2), "not slowed down: {took:?}");
}

/// The numbers of the lines that are whole (a cut can end in the middle of one).
fn whole_lines(text: &str) -> Vec<u64> {
    text.split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// The session recorded under `profile`.
fn session_of(agent: &TestAgent, profile: &str) -> String {
    agent
        .recorded_sessions()
        .into_iter()
        .find(|id| agent.meta(id)["grant"]["profile"] == profile)
        .unwrap_or_else(|| panic!("no session recorded under {profile}"))
}

/// The terminal output of a cast, concatenated.
fn recorded_output(cast: &str) -> String {
    cast.lines()
        .skip(1)
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap_or_default().to_string())
        .collect()
}

#[test]
fn on_a_full_disk_the_client_never_sees_a_line_the_recording_lacks() {
    let agent = TestAgent::start_with(Options {
        spool_tmpfs_kib: Some(512),
        ..Default::default()
    });
    let login = agent.login("disk");
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    let out = agent.ssh(&login, "seq 1 2000000");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("recording failed"), "{err}");
    let seen = String::from_utf8_lossy(&out.stdout);
    let id = agent.recorded_sessions().pop().unwrap();
    let cast = std::fs::read_to_string(agent.spool().join(format!("{id}.cast"))).unwrap();
    let recorded = recorded_output(&cast);
    let numbers = whole_lines(&recorded);
    for (i, n) in numbers.iter().enumerate() {
        assert_eq!(*n, i as u64 + 1, "a hole in the recording at line {i}");
    }
    let last_recorded = *numbers.last().unwrap_or(&0);
    let last_seen = whole_lines(&seen).last().copied().unwrap_or(0);
    assert!(
        last_seen <= last_recorded,
        "the client saw line {last_seen}; the recording ends at {last_recorded}"
    );
    assert!(recorded.starts_with(&*seen));
}

#[test]
fn a_revoked_grant_closes_its_forwards_and_its_connection() {
    let agent = TestAgent::start_with(Options {
        profiles: vec![(
            "fwd.toml".into(),
            "name = \"fwd\"\nport_forwarding = true\n".into(),
        )],
        extra_config: "[policy]\nallowed_profiles = [\"default\", \"fwd\"]\n".into(),
        ..Default::default()
    });
    // A loopback echo service as the forward's target.
    let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let target_port = target.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in target.incoming().flatten() {
            std::thread::spawn(move || {
                let mut s = s;
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 || s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    let login = agent.login("fwd");
    let mut c = agent.claims(&login, 600);
    c.profile = Some("fwd".into());
    let jti = c.jti.clone();
    assert!(agent.install(&agent.sign(&c)).status.success());
    let local_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut forward = agent
        .ssh_command(&login)
        .args([
            "-N",
            "-o",
            "ExitOnForwardFailure=yes",
            "-L",
            &format!("127.0.0.1:{local_port}:127.0.0.1:{target_port}"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let echo = |s: &mut TcpStream| -> bool {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 5];
        s.write_all(b"hello").is_ok() && s.read_exact(&mut buf).is_ok() && &buf == b"hello"
    };
    let mut open = None;
    agent.wait_for(15, "the forward to carry data", || {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", local_port)) else {
            return false;
        };
        let works = echo(&mut s);
        open = works.then_some(s);
        works
    });
    let mut open = open.unwrap();
    assert!(agent.log().contains(&format!("127.0.0.1:{target_port}")));

    assert!(agent.usher(&["grant", "revoke", &jti]).status.success());
    // The connection that carried the forward is closed, and no new one gets through.
    agent.wait_for(10, "the ssh client to be disconnected", || {
        forward.try_wait().unwrap().is_some()
    });
    assert!(
        !echo(&mut open),
        "a forwarded connection outlived its grant"
    );
    let through = TcpStream::connect(("127.0.0.1", local_port))
        .map(|mut s| echo(&mut s))
        .unwrap_or(false);
    assert!(
        !through,
        "a new forwarded connection got through after revocation"
    );
    assert!(agent.log().contains("its grant"), "{}", agent.log());
    let _ = forward.kill();
    let _ = forward.wait();
}
