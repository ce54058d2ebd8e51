//! Shipping to the collector, losing nothing: a collector that is down, an agent killed in
//! the middle of an upload, a tampered chunk, two agents at once, the local and S3
//! backends, and the replay page in a real browser.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use usher_tests::*;
use usher_wire::collector::{chunk_signed_text, meta_signed_text, sha256_hex, sign_write};

/// An agent that ships to `port` (whether or not a collector runs there yet), with its
/// token, and its host key line for the collector's config.
fn shipping_agent(port: u16, ca: &Path, chunk_bytes: usize) -> (TestAgent, String, String) {
    shipping_agent_with(port, ca, &format!("chunk_bytes = {chunk_bytes}\n"))
}

/// As [`shipping_agent`], with `extra` in its `[collector]` section.
fn shipping_agent_with(port: u16, ca: &Path, extra: &str) -> (TestAgent, String, String) {
    let token = format!("token-{}", free_port());
    let agent = TestAgent::start_with(Options {
        extra_config: format!(
            "[collector]\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = \"{{dir}}/collector.token\"\nca_file = \"{}\"\n{extra}interval_secs = 1\n",
            ca.display()
        ),
        files: vec![("collector.token".into(), token.clone())],
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
    collector.trust(&TrustedAgent {
        host: agent.host.clone(),
        token: token.into(),
        host_key: key.into(),
    });
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
        serde_json::from_slice(&agent.usher(&["status", "--json"]).stdout).unwrap();
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
    // Small chunks even for a backlog (a finished session goes in 4 MiB chunks by
    // default), planned a few at a time, compressed.
    let (mut agent, token, key) = shipping_agent_with(
        collector.port,
        &collector.dir.join("ca.pem"),
        "chunk_bytes = 2048\nbacklog_chunk_bytes = 2048\n",
    );
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

/// A session recorded while the collector was away is a backlog: it goes in chunks of up to
/// 4 MiB (compressed), not in hundreds of `chunk_bytes` ones, and arrives whole.
#[test]
fn a_backlog_goes_in_large_chunks_and_arrives_whole() {
    let port = free_port();
    let mut collector = Collector::new_on(port, &[], "");
    let (agent, token, key) = shipping_agent(port, &collector.dir.join("ca.pem"), 4096);
    let login = login(&agent, "backlog");
    // About 6 MB of output: hundreds of chunks of 4 KiB, two or three of 4 MiB.
    let out = agent.ssh(&login, "seq 1 800000");
    assert!(out.status.success());
    let id = agent.recorded_sessions().pop().unwrap();
    trust(&collector, &agent, &token, &key);
    collector.start();
    collector.wait_complete(&id, 120, &agent);
    let (_, cast) = collector.view(&format!("/api/v1/sessions/{id}/cast"));
    let (_, status) = collector.curl(&[
        "-H",
        &format!("Authorization: Bearer {token}"),
        &format!("{}/api/v1/sessions/{id}/streams/cast", collector.url()),
    ]);
    let chunks = serde_json::from_str::<serde_json::Value>(&status).unwrap()["next_seq"]
        .as_u64()
        .unwrap();
    let most = cast.len() as u64 / (4 << 20) + 2;
    assert!(
        (2..=most).contains(&chunks),
        "{} bytes in {chunks} chunks",
        cast.len()
    );
    let output: String = cast
        .lines()
        .skip(1)
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e[1] == "o")
        .map(|e| e[2].as_str().unwrap().to_string())
        .collect();
    let numbers: Vec<&str> = output.split_whitespace().collect();
    assert_eq!(numbers.len(), 800000);
    assert_eq!((numbers[0], numbers[799999]), ("1", "800000"));
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
    // A host key as usherd makes and loads it: this test signs its writes as the host does.
    let keydir = std::env::temp_dir().join(format!("usher-tamper-key-{}", free_port()));
    std::fs::create_dir_all(&keydir).unwrap();
    let host = usher::ssh::load_or_create_host_key(&keydir).unwrap();
    let _ = std::fs::remove_dir_all(&keydir);
    let signing = usher::ssh::signing_key(&host).unwrap();
    let host_key = host.public_key().to_openssh().unwrap();
    let mut collector = Collector::new(
        &[TrustedAgent {
            host: "host-t".into(),
            token: "tok-t".into(),
            host_key,
        }],
        storage,
    );
    collector.start();
    let scratch = collector.dir.join("bodies");
    std::fs::create_dir_all(&scratch).unwrap();
    // A signed chunk PUT, its body from a file (binary); `extra` headers added.
    let put_in = |session: &str, seq: u64, prev: &str, hash: &str, body: &[u8], extra: &[&str]| {
        let signature = sign_write(
            &signing,
            &chunk_signed_text(session, "cast", seq, prev, hash),
        );
        let file = scratch.join(format!("{session}-{seq}"));
        std::fs::write(&file, body).unwrap();
        let mut args = vec![
            "-X".to_string(),
            "PUT".into(),
            "-H".into(),
            "Authorization: Bearer tok-t".into(),
            "-H".into(),
            format!("X-Usher-Prev-Hash: {prev}"),
            "-H".into(),
            format!("X-Usher-Hash: {hash}"),
            "-H".into(),
            format!("X-Usher-Signature: {signature}"),
            "--data-binary".into(),
            format!("@{}", file.display()),
        ];
        for h in extra {
            args.extend(["-H".to_string(), h.to_string()]);
        }
        args.push(format!(
            "{}/api/v1/sessions/{session}/streams/cast/chunks/{seq}",
            collector.url()
        ));
        collector.curl(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let put = |seq: u64, prev: &str, hash: &str, body: &str| {
        put_in("s1", seq, prev, hash, body.as_bytes(), &[])
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
    let not_json = sha256_hex(b"not json");
    assert_eq!(
        collector
            .curl(&[
                "-X",
                "PUT",
                "-H",
                "Authorization: Bearer tok-t",
                "-H",
                &format!("X-Usher-Hash: {not_json}"),
                "-H",
                &format!(
                    "X-Usher-Signature: {}",
                    sign_write(&signing, &meta_signed_text("s1", &not_json))
                ),
                "--data-binary",
                "not json",
                &format!("{}/api/v1/sessions/s1/meta", collector.url())
            ])
            .0,
        400
    );

    // Chunk bodies compressed as agents send them: stored, chained and read back decoded.
    let raw: Vec<u8> = (0..3000)
        .flat_map(|i| format!("[{i}.0,\"o\",\"zstd-line-{i}\\r\\n\"]\n").into_bytes())
        .collect();
    let packed = usher_wire::collector::compress_chunk(&raw).expect("terminal output compresses");
    let g2 = genesis("s2", "cast");
    let h2 = link(&g2, &raw);
    let (code, body) = put_in("s2", 0, &g2, &h2, &packed, &["Content-Encoding: zstd"]);
    assert_eq!(code, 201, "{body}");
    let (_, cast) = collector.view("/api/v1/sessions/s2/cast");
    assert_eq!(cast.as_bytes(), &raw[..], "read back decoded");
    // The same bytes hashed as sent (compressed) are not the chain: refused.
    let wrong = link(&h2, &packed);
    let (code, body) = put_in("s2", 1, &h2, &wrong, &packed, &["Content-Encoding: zstd"]);
    assert_eq!(code, 422, "{body}");
    // A bomb (64 MiB of zeros in a few KiB) is refused for its decoded size; garbage
    // labelled zstd and unknown encodings are refused; nothing of them is stored.
    let zeros = vec![0u8; 64 << 20];
    let bomb = usher_wire::collector::compress_chunk(&zeros).unwrap();
    assert!(bomb.len() < 64 << 10);
    let g3 = genesis("s3", "cast");
    let h3 = link(&g3, &zeros);
    let (code, body) = put_in("s3", 0, &g3, &h3, &bomb, &["Content-Encoding: zstd"]);
    assert_eq!(code, 413, "{body}");
    let line = b"[0.1,\"o\",\"x\"]\n";
    let h3 = link(&g3, line);
    let (code, body) = put_in("s3", 0, &g3, &h3, line, &["Content-Encoding: zstd"]);
    assert_eq!(code, 400, "{body}");
    let (code, body) = put_in("s3", 0, &g3, &h3, line, &["Content-Encoding: gzip"]);
    assert_eq!(code, 415, "{body}");
    let (_, status) = collector.curl(&[
        "-H",
        "Authorization: Bearer tok-t",
        &format!("{}/api/v1/sessions/s3/streams/cast", collector.url()),
    ]);
    assert!(status.contains("\"next_seq\":0"), "{status}");
    assert_eq!(collector.view("/api/v1/sessions").0, 200);
    assert_eq!(
        collector
            .curl(&[&format!("{}/api/v1/sessions", collector.url())])
            .0,
        401,
        "the search needs an auditor's token"
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
    trust(&collector, &a, &ta, &ka);
    collector.trust(&TrustedAgent {
        host: format!("{}-b", b.host),
        token: tb,
        host_key: kb,
    });
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
    let browser = Browser::start();
    browser.sign_in_with_token(&collector.url(), &collector.viewer_token());
    browser.open(&format!("{}/?login={login}&play={id}", collector.url()));
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
    let browser = Browser::start();
    browser.sign_in_with_token(&collector.url(), &collector.viewer_token());
    browser.open(&format!("{}/?play={id}", collector.url()));
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
