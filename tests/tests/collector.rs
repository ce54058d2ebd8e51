//! Shipping to the collector, losing nothing: a collector that is down, an agent killed in
//! the middle of an upload, a tampered chunk, two agents at once, the local and S3
//! backends, and the replay page in a real browser.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usher_tests::*;

const VIEWER: &str = "viewer-secret-token";

/// A CA and a certificate for 127.0.0.1 it signed (the agent trusts the CA).
fn certs(dir: &Path) {
    let run = |args: &[&str]| {
        let st = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stderr(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "openssl {args:?}");
    };
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    run(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=usher test CA",
    ]);
    run(&[
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
    ]);
}

struct Collector {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
    config: PathBuf,
}

impl Collector {
    /// `agents`: (host, token, host key line). `storage`: extra TOML for [storage].
    fn new(agents: &[(String, String, String)], storage: &str) -> Collector {
        Self::new_on(free_port(), agents, storage)
    }

    fn new_on(port: u16, agents: &[(String, String, String)], storage: &str) -> Collector {
        let dir = PathBuf::from(format!(
            "/tmp/usher-collector-{}-{}",
            std::process::id(),
            free_port()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        certs(&dir);
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\ntls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\ndata_dir = \"{d}/data\"\n\
             viewer_tokens = [\"{VIEWER}\"]\nassets_dir = \"{a}\"\n{storage}\n",
            d = dir.display(),
            a = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-assets").display()
        );
        for (host, token, key) in agents {
            config.push_str(&format!(
                "[[agent]]\nhost = \"{host}\"\ntoken = \"{token}\"\nhost_key = \"{key}\"\n"
            ));
        }
        let config_path = dir.join("collector.toml");
        std::fs::write(&config_path, config).unwrap();
        Collector {
            dir,
            port,
            child: None,
            config: config_path,
        }
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collector.log"))
            .unwrap();
        self.child = Some(
            Command::new(bin("usher-collector"))
                .arg("--config")
                .arg(&self.config)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the collector did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collector.log")).unwrap_or_default()
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `curl` against the collector with the test CA.
    fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.dir.join("ca.pem"))
            .args(args)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    fn view(&self, path: &str) -> (u16, String) {
        self.curl(&[
            "-H",
            &format!("Authorization: Bearer {VIEWER}"),
            &format!("{}{path}", self.url()),
        ])
    }

    fn session(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.view(&format!("/api/v1/sessions/{id}")).1).unwrap_or_default()
    }

    fn wait_complete(&self, id: &str, secs: u64, agent: &TestAgent) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if self.session(id)["status"] == "complete" {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "session {id} not complete: {}\n--- collector ---\n{}\n--- agent ---\n{}",
                self.session(id),
                self.log(),
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// moto's S3-compatible server on a loopback port, with a bucket per test.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    fn start() -> Moto {
        let found = Command::new("sh")
            .arg("-c")
            .arg("command -v moto_server")
            .output()
            .unwrap();
        assert!(
            found.status.success(),
            "moto_server is missing: `cargo xtask setup` installs it (pip install 'moto[server]')"
        );
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    /// Makes `bucket` (a PUT on its name, as any S3 client would) and returns the
    /// collector's [storage] section for it.
    fn storage(&self, bucket: &str) -> String {
        let st = Command::new("curl")
            .args([
                "-s",
                "-X",
                "PUT",
                &format!("http://127.0.0.1:{}/{bucket}", self.port),
            ])
            .status()
            .unwrap();
        assert!(st.success());
        format!(
            "[storage]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"http://127.0.0.1:{}\"\nregion = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
            self.port
        )
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An agent that ships to `port` (whether or not a collector runs there yet), with its
/// token, and its host key line for the collector's config.
fn shipping_agent(port: u16, ca: &Path, chunk_bytes: usize) -> (TestAgent, String, String) {
    let token = format!("token-{}", free_port());
    let token_file = std::env::temp_dir().join(format!("usher-token-{token}"));
    std::fs::write(&token_file, &token).unwrap();
    let agent = TestAgent::start_with(Options {
        extra_config: format!(
            "[collector]\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = \"{}\"\nca_file = \"{}\"\nchunk_bytes = {chunk_bytes}\ninterval_secs = 1\n",
            token_file.display(),
            ca.display()
        ),
        ..Default::default()
    });
    let key = Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(agent.dir.join("state/ssh_host_ed25519_key"))
        .output()
        .unwrap();
    let key = String::from_utf8_lossy(&key.stdout).trim().to_string();
    (agent, token, key)
}

/// Tells the collector about `agent` (before it starts).
fn trust(collector: &Collector, agent: &TestAgent, token: &str, key: &str) {
    let config = std::fs::read_to_string(&collector.config).unwrap();
    let entry = format!(
        "[[agent]]\nhost = \"{}\"\ntoken = \"{token}\"\nhost_key = \"{key}\"\n",
        agent.host
    );
    std::fs::write(&collector.config, config + &entry).unwrap();
}

fn login(agent: &TestAgent, name: &str) -> String {
    let login = agent.login(name);
    assert!(agent
        .install(&agent.sign(&agent.claims(&login, 600)))
        .status
        .success());
    login
}

fn spool_sessions(agent: &TestAgent) -> usize {
    agent.recorded_sessions().len()
}

#[test]
fn a_session_recorded_while_the_collector_is_down_arrives_whole_once_it_is_up_local() {
    a_session_recorded_while_the_collector_is_down_arrives_whole_once_it_is_up("");
}

#[test]
fn a_session_recorded_while_the_collector_is_down_arrives_whole_once_it_is_up_s3() {
    let moto = Moto::start();
    a_session_recorded_while_the_collector_is_down_arrives_whole_once_it_is_up(
        &moto.storage("a-session-recorded-while-the-collector-i"),
    );
}

fn a_session_recorded_while_the_collector_is_down_arrives_whole_once_it_is_up(storage: &str) {
    let port = free_port();
    // The collector's directory (and CA) first, the process later.
    let mut collector = Collector::new_on(port, &[], storage);
    let (agent, token, key) = shipping_agent(port, &collector.dir.join("ca.pem"), 64 * 1024);
    let login = login(&agent, "offline");
    let out = agent.ssh(
        &login,
        "for i in $(seq 1 300); do echo offline-line-$i; done; id",
    );
    assert!(out.status.success());
    let id = agent.recorded_sessions().pop().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        spool_sessions(&agent),
        1,
        "nothing may leave the spool while the collector is down"
    );
    let status: serde_json::Value =
        serde_json::from_slice(&agent.usher(&["status"]).stdout).unwrap();
    assert_eq!(status["collector"]["reachable"], false, "{status}");

    // Now the collector comes up, knowing this host.
    trust(&collector, &agent, &token, &key);
    collector.start();
    collector.wait_complete(&id, 60, &agent);
    agent.wait_for(20, "the spool to be emptied", || {
        spool_sessions(&agent) == 0
    });
    let (code, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    assert_eq!(code, 200);
    for i in 1..=300 {
        assert_eq!(
            cast.matches(&format!("offline-line-{i}\\r\\n")).count()
                + cast.matches(&format!("offline-line-{i}\\n")).count(),
            1,
            "line {i}"
        );
    }
    let s = collector.session(&id);
    assert_eq!(s["meta"]["login"], login.as_str());
    assert!(
        s["commands"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["path"] == "/usr/bin/id"),
        "{s}"
    );
    // Search by person, host, login and command.
    for q in [
        "sub=alice@example.test".to_string(),
        format!("host={}", agent.host),
        format!("login={login}"),
        "command=/usr/bin/id".to_string(),
    ] {
        let (code, body) = collector.view(&format!("/api/v1/sessions?{q}"));
        assert_eq!(code, 200);
        assert!(body.contains(&id), "search {q}: {body}");
    }
    let (_, body) = collector.view("/api/v1/sessions?command=no-such-command");
    assert!(!body.contains(&id));
}

#[test]
fn an_agent_killed_mid_upload_delivers_everything_once_after_restart_local() {
    an_agent_killed_mid_upload_delivers_everything_once_after_restart("");
}

#[test]
fn an_agent_killed_mid_upload_delivers_everything_once_after_restart_s3() {
    let moto = Moto::start();
    an_agent_killed_mid_upload_delivers_everything_once_after_restart(
        &moto.storage("an-agent-killed-mid-upload-delivers-ever"),
    );
}

fn an_agent_killed_mid_upload_delivers_everything_once_after_restart(storage: &str) {
    let mut collector = Collector::new(&[], storage);
    let (mut agent, token, key) =
        shipping_agent(collector.port, &collector.dir.join("ca.pem"), 2048);
    trust(&collector, &agent, &token, &key);
    collector.start();
    let login = login(&agent, "killed");
    // About 1.5 MB in 2 KiB chunks: hundreds of uploads to be cut in the middle of.
    let out = agent.ssh(
        &login,
        "for i in $(seq 1 30000); do echo killed-line-$i-of-a-long-recording; done",
    );
    assert!(out.status.success());
    let id = agent.recorded_sessions().pop().unwrap();
    // Wait until part, not all, has arrived, then kill -9.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = collector.curl(&[
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("{}/api/v1/sessions/{id}/streams/cast", collector.url()),
        ]);
        let next = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["next_seq"].as_u64())
            .unwrap_or(0);
        if next >= 5 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the upload did not start: {}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.crash();
    assert!(
        collector.session(&id)["status"] == "live",
        "it was complete before the kill; make it longer"
    );
    agent.launch();
    collector.wait_complete(&id, 120, &agent);
    let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    let lines: Vec<&str> = cast.lines().collect();
    let header: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(header["version"], 2);
    let output: String = lines[1..]
        .iter()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("broken line {l:?}: {e}"))
        })
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    for i in [1, 2, 777, 15000, 29999, 30000] {
        assert_eq!(
            output.matches(&format!("killed-line-{i}-of-")).count(),
            1,
            "line {i} is not there exactly once"
        );
    }
    assert_eq!(output.matches("-of-a-long-recording").count(), 30000);
}

#[test]
fn a_tampered_chunk_is_refused_and_the_session_flagged_local() {
    a_tampered_chunk_is_refused_and_the_session_flagged("");
}

#[test]
fn a_tampered_chunk_is_refused_and_the_session_flagged_s3() {
    let moto = Moto::start();
    a_tampered_chunk_is_refused_and_the_session_flagged(
        &moto.storage("a-tampered-chunk-is-refused-and-the-sess"),
    );
}

fn a_tampered_chunk_is_refused_and_the_session_flagged(storage: &str) {
    let keyfile = std::env::temp_dir().join(format!("usher-tamper-key-{}", free_port()));
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&keyfile)
        .status()
        .unwrap();
    assert!(st.success());
    let host_key = std::fs::read_to_string(keyfile.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    let _ = std::fs::remove_file(&keyfile);
    let _ = std::fs::remove_file(keyfile.with_extension("pub"));
    let mut collector = Collector::new(&[("host-t".into(), "tok-t".into(), host_key)], storage);
    collector.start();
    let put = |seq: u64, prev: &str, hash: &str, body: &str| {
        collector.curl(&[
            "-X",
            "PUT",
            "-H",
            "Authorization: Bearer tok-t",
            "-H",
            &format!("X-Usher-Prev-Hash: {prev}"),
            "-H",
            &format!("X-Usher-Hash: {hash}"),
            "--data-binary",
            body,
            &format!(
                "{}/api/v1/sessions/s1/streams/cast/chunks/{seq}",
                collector.url()
            ),
        ])
    };
    use sha2_shim::*;
    let g = genesis("s1", "cast");
    let h0 = link(&g, b"{\"version\":2}\n");
    assert_eq!(put(0, &g, &h0, "{\"version\":2}\n").0, 201);
    assert_eq!(
        put(0, &g, &h0, "{\"version\":2}\n").0,
        200,
        "a chunk sent twice is stored once"
    );
    let (code, body) = put(
        1,
        &h0,
        &link(&h0, b"[0.1,\"o\",\"a\"]\n"),
        "[0.1,\"o\",\"b\"]\n",
    );
    assert_eq!(code, 422, "{body}");
    let s = collector.session("s1");
    assert_eq!(s["status"], "tampered", "{s}");
    assert!(s["problem"]
        .as_str()
        .unwrap()
        .contains("does not match its hash"));
    // Bad input: wrong token, bad ids, a gap, garbage.
    assert_eq!(
        collector
            .curl(&[
                "-H",
                "Authorization: Bearer nope",
                &format!("{}/api/v1/sessions/s1/streams/cast", collector.url())
            ])
            .0,
        401
    );
    assert_eq!(
        collector
            .curl(&[
                "-H",
                "Authorization: Bearer tok-t",
                &format!("{}/api/v1/sessions/..%2Fx/streams/cast", collector.url())
            ])
            .0,
        400
    );
    assert_eq!(
        collector
            .curl(&[
                "-H",
                "Authorization: Bearer tok-t",
                &format!("{}/api/v1/sessions/s1/streams/etc", collector.url())
            ])
            .0,
        400
    );
    assert_eq!(put(9, &h0, &h0, "x\n").0, 409);
    assert_eq!(
        collector
            .curl(&[
                "-X",
                "PUT",
                "-H",
                "Authorization: Bearer tok-t",
                "--data-binary",
                "not json",
                &format!("{}/api/v1/sessions/s1/meta", collector.url())
            ])
            .0,
        400
    );
    assert_eq!(collector.view("/api/v1/sessions").0, 200);
    assert_eq!(
        collector
            .curl(&[&format!("{}/api/v1/sessions", collector.url())])
            .0,
        401,
        "the search needs a viewer token"
    );
}

/// The few lines of hashing the test needs, without pulling the collector in.
mod sha2_shim {
    pub fn genesis(session: &str, stream: &str) -> String {
        usher::ship::chain::genesis(session, stream)
    }
    pub fn link(prev: &str, chunk: &[u8]) -> String {
        usher::ship::chain::next(prev, chunk).unwrap()
    }
}

#[test]
fn two_agents_ship_at_once_local() {
    two_agents_ship_at_once("");
}

#[test]
fn two_agents_ship_at_once_s3() {
    let moto = Moto::start();
    two_agents_ship_at_once(&moto.storage("two-agents-ship-at-once"));
}

fn two_agents_ship_at_once(storage: &str) {
    let mut collector = Collector::new(&[], storage);
    let ca = collector.dir.join("ca.pem");
    let (a, ta, ka) = shipping_agent(collector.port, &ca, 4096);
    let (b, tb, kb) = shipping_agent(collector.port, &ca, 4096);
    // Both are "usher-test-host" in their own config: give the second its own name.
    let config = std::fs::read_to_string(&collector.config).unwrap();
    std::fs::write(
        &collector.config,
        format!("{config}[[agent]]\nhost = \"{}\"\ntoken = \"{ta}\"\nhost_key = \"{ka}\"\n[[agent]]\nhost = \"{}-b\"\ntoken = \"{tb}\"\nhost_key = \"{kb}\"\n", a.host, b.host),
    )
    .unwrap();
    // The second agent names itself differently.
    let mut b = b;
    let cfg = std::fs::read_to_string(&b.config_path).unwrap().replacen(
        "host_name = \"usher-test-host\"",
        "host_name = \"usher-test-host-b\"",
        1,
    );
    std::fs::write(&b.config_path, cfg).unwrap();
    b.host = "usher-test-host-b".into();
    b.stop();
    b.launch();
    collector.start();
    let la = login(&a, "one");
    let lb = login(&b, "two");
    let ha = std::thread::spawn({
        let cmd = "for i in $(seq 1 5000); do echo agent-a-$i; done".to_string();
        let args = (a.ssh_command(&la), cmd);
        move || {
            let (mut c, cmd) = args;
            c.arg(cmd).stdin(Stdio::null()).output().unwrap()
        }
    });
    let out_b = b.ssh(&lb, "for i in $(seq 1 5000); do echo agent-b-$i; done");
    assert!(out_b.status.success());
    assert!(ha.join().unwrap().status.success());
    let ida = a.recorded_sessions().pop().unwrap();
    let idb = b.recorded_sessions().pop().unwrap();
    collector.wait_complete(&ida, 60, &a);
    collector.wait_complete(&idb, 60, &b);
    let (_, ca_) = collector.view(&format!("/api/v1/sessions/{ida}/cast"));
    let (_, cb_) = collector.view(&format!("/api/v1/sessions/{idb}/cast"));
    assert!(ca_.contains("agent-a-5000") && !ca_.contains("agent-b-"));
    assert!(cb_.contains("agent-b-5000") && !cb_.contains("agent-a-"));
    assert_eq!(collector.session(&idb)["host"], "usher-test-host-b");
}

#[test]
fn the_s3_backend_keeps_the_objects_in_the_bucket() {
    let moto = Moto::start();
    let s3_port = moto.port;
    let storage = moto.storage("usher-recordings");
    let mut collector = Collector::new(&[], &storage);
    let (agent, token, key) = shipping_agent(collector.port, &collector.dir.join("ca.pem"), 8192);
    trust(&collector, &agent, &token, &key);
    collector.start();
    let login = login(&agent, "s3");
    assert!(agent
        .ssh(&login, "for i in $(seq 1 2000); do echo s3-line-$i; done")
        .status
        .success());
    let id = agent.recorded_sessions().pop().unwrap();
    collector.wait_complete(&id, 60, &agent);
    let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    assert!(cast.contains("s3-line-2000"));
    // The objects are in the bucket, not on the collector's disk.
    let listing = Command::new("curl").args(["-s", &format!("http://127.0.0.1:{s3_port}/usher-recordings?list-type=2&prefix=sessions/{id}/cast/")]).output().unwrap();
    assert!(String::from_utf8_lossy(&listing.stdout)
        .contains(&format!("sessions/{id}/cast/0000000000")));
    assert!(!collector.dir.join("data/objects/sessions").exists());
}

/// Headless Chromium driven over WebDriver (chromedriver, spoken to with `curl`), in its own
/// process group: dropping it ends the driver and every browser it started.
struct Browser {
    child: Child,
    base: String,
    session: String,
    profile: PathBuf,
}

impl Browser {
    fn start(profile: PathBuf) -> Browser {
        use std::os::unix::process::CommandExt;
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver is missing: `cargo xtask setup` installs it (apt chromium-driver)",
            );
        let mut browser = Browser {
            child,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            profile,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,1024",
            "--disable-breakpad",
            &format!("--user-data-dir={}", browser.profile.display()),
        ];
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let v = browser.call("POST", "/session", &caps);
        browser.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        browser
    }

    /// One WebDriver command; its `value`.
    fn call(&self, method: &str, path: &str, body: &serde_json::Value) -> serde_json::Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let out = Command::new("curl")
            .args(["-s", "-X", method, "-H", "Content-Type: application/json"])
            .args(["--data-binary", &body.to_string(), &url])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("WebDriver: {}", String::from_utf8_lossy(&out.stdout)));
        v["value"].clone()
    }

    fn open(&self, url: &str) {
        self.call("POST", "/url", &serde_json::json!({ "url": url }));
    }

    /// Polls `script` (a function body) until `ok` holds for what it returns.
    fn wait_for(
        &self,
        what: &str,
        script: &str,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.call(
                "POST",
                "/execute/sync",
                &serde_json::json!({"script": script, "args": []}),
            );
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: last saw {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let _ = self.call("DELETE", "", &serde_json::json!({}));
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// The text the replay page's player has rendered (its terminal, not the page's HTML).
const PLAYER_TEXT: &str = "const p = document.querySelector('#player .ap-player, #player .ap-wrapper'); return p ? p.innerText : ''";

#[test]
fn the_page_finds_a_session_and_plays_it_in_chromium() {
    let mut collector = Collector::new(&[], "");
    let (agent, token, key) = shipping_agent(collector.port, &collector.dir.join("ca.pem"), 65536);
    trust(&collector, &agent, &token, &key);
    collector.start();
    let login = login(&agent, "page");
    // The marker is computed by the shell: it is in the recorded output, and nowhere in
    // the commands' argv that the timeline lists.
    assert!(agent
        .ssh(&login, "echo PLAYED-IN-THE-$((6*7))-BROWSER; id")
        .status
        .success());
    let id = agent.recorded_sessions().pop().unwrap();
    collector.wait_complete(&id, 60, &agent);
    let browser = Browser::start(collector.dir.join("chromium-profile"));
    browser.open(&format!(
        "{}/?token={VIEWER}&login={login}&play={id}",
        collector.url()
    ));
    // The search found it.
    let rows = browser.wait_for(
        "search results",
        "return document.body.dataset.found ? [...document.querySelectorAll('#sessions tr')].map(r => r.dataset.id) : null",
        |v| v.is_array(),
    );
    assert!(
        rows.as_array().unwrap().iter().any(|r| r == id.as_str()),
        "session not listed: {rows}"
    );
    // The player rendered the recorded terminal text.
    browser.wait_for("the player rendering the recording", PLAYER_TEXT, |v| {
        v.as_str()
            .unwrap_or("")
            .contains("PLAYED-IN-THE-42-BROWSER")
    });
    // The timeline lists the exec of `id` ("0.1s allowed id").
    browser.wait_for(
        "the timeline listing id",
        "return [...document.querySelectorAll('#timeline div')].map(e => e.textContent)",
        |v| {
            v.as_array().is_some_and(|rows| {
                rows.iter()
                    .any(|r| r.as_str().is_some_and(|r| r.ends_with(" allowed id")))
            })
        },
    );
}

/// A session still running is shipped as it grows: its output reaches the collector (and
/// the page) before it ends, and it is complete once it has.
#[test]
fn a_live_session_reaches_the_collector_while_it_runs() {
    let mut collector = Collector::new(&[], "");
    let (agent, token, key) = shipping_agent(collector.port, &collector.dir.join("ca.pem"), 4096);
    trust(&collector, &agent, &token, &key);
    collector.start();
    let login = login(&agent, "live");
    let mut client = agent
        .ssh_command(&login)
        // Several chunks of output, the marker last (on the player's screen), then the
        // session waits.
        .arg("seq 1 3000; echo LIVE-OUTPUT-$((6*7)); while [ ! -e \"$HOME/go\" ]; do sleep 0.2; done; echo LIVE-END-$((6*7))")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    agent.wait_for(20, "the session's recording in the spool", || {
        !agent.recorded_sessions().is_empty()
    });
    let id = agent.recorded_sessions().pop().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
        if cast.contains("LIVE-OUTPUT-42") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the live session's output did not reach the collector: {cast:?}\n--- agent ---\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        client.try_wait().unwrap().is_none(),
        "the session ended before its output was shipped"
    );
    assert_eq!(collector.session(&id)["status"], "live");
    let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    assert!(!cast.contains("LIVE-END-42"), "{cast}");
    // The page plays it while it runs.
    let browser = Browser::start(collector.dir.join("chromium-profile"));
    browser.open(&format!("{}/?token={VIEWER}&play={id}", collector.url()));
    browser.wait_for(
        "a live session's status",
        "return document.body.dataset.status || ''",
        |v| v == "live",
    );
    browser.wait_for("the live output in the player", PLAYER_TEXT, |v| {
        v.as_str().unwrap_or("").contains("LIVE-OUTPUT-42")
    });
    drop(browser);
    // The session ends: the rest arrives and the session is sealed.
    std::fs::write(home_of(&login).join("go"), "").unwrap();
    let out = client.wait_with_output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("LIVE-END-42"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    collector.wait_complete(&id, 60, &agent);
    let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    assert!(cast.contains("LIVE-OUTPUT-42") && cast.contains("LIVE-END-42"));
}
