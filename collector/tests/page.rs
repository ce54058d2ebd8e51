//! The replay page in a real headless Chromium, driven over WebDriver (chromedriver, spoken
//! to directly with the JSON wire protocol): the page loads, a search finds the session, the
//! player renders the recorded text, and clicking a command in the timeline seeks the player.

mod support;

use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{host, Backend, Collector, VIEWER};
use usher_collector::uploader::Recording;

struct Driver {
    child: Child,
    base: String,
    session: String,
    http: reqwest::Client,
    _profile: tempdir::Dir,
}

mod tempdir {
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = support::free_port();
        // Its own process group: the browsers it starts go with it, even when a test fails.
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver is missing: run collector/setup.sh (apt chromium-driver)");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        while http.get(format!("{base}/status")).send().await.is_err() {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let profile = std::env::temp_dir().join(format!("usher-chromium-{port}"));
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
        ];
        let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        args.push(format!("--user-data-dir={}", profile.display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let mut d = Driver {
            child,
            base,
            session: String::new(),
            http,
            _profile: tempdir::Dir(profile),
        };
        let v = d.call("POST", "/session", caps).await;
        d.session = v["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {v}"))
            .to_string();
        d
    }

    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let req = match method {
            "POST" => self
                .http
                .post(url)
                .header("Content-Type", "application/json")
                .body(body.to_string()),
            "DELETE" => self.http.delete(url),
            _ => self.http.get(url),
        };
        let text = req.send().await.unwrap().text().await.unwrap();
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver: {text}"));
        v["value"].clone()
    }

    async fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
        .await
    }

    /// Polls `script` until `ok` holds for what it returns.
    async fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let v = self.js(script).await;
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: last saw {v}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_finds_a_session_plays_it_and_the_timeline_seeks() {
    let h = host("web-1", 11);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    // Two sessions; the search by command must find only the one that ran `terraform`.
    let wanted = Recording::fake(
        "page-1",
        "web-1",
        "alice@example.org",
        "usher-alice",
        &["ls -la", "terraform apply", "git status"],
        "PLAYED-IN-THE-BROWSER",
        300 << 10,
        32 << 10,
    );
    let other = Recording::fake(
        "page-2",
        "web-1",
        "bob@example.org",
        "usher-bob",
        &["uptime"],
        "OTHER",
        4 << 10,
        32 << 10,
    );
    up.ship(&wanted).await.unwrap();
    up.ship(&other).await.unwrap();

    let d = Driver::start().await;
    d.call(
        "POST",
        "/url",
        json!({"url": format!("{}/?token={VIEWER}&command=terraform&play=page-1", c.url())}),
    )
    .await;
    // The search found exactly the session that ran the command.
    let rows = d
        .wait_for(
            "search results",
            "return document.body.dataset.found ? [...document.querySelectorAll('#sessions tr')].map(r => r.dataset.id) : null",
            |v| v.is_array(),
        )
        .await;
    assert_eq!(rows, json!(["page-1"]));
    // The player rendered the recorded terminal text (not merely the page's HTML).
    d.wait_for(
        "the player rendering the recording",
        "const p = document.querySelector('#player .ap-player, #player .ap-wrapper'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains("of page-1: the quick brown fox"),
    )
    .await;
    // The timeline lists the commands; clicking one seeks the player to it.
    let timeline = d
        .wait_for(
            "the timeline",
            "return [...document.querySelectorAll('#timeline div')].map(e => e.textContent)",
            |v| v.as_array().map(|a| a.len() == 3).unwrap_or(false),
        )
        .await;
    assert!(
        timeline[1].as_str().unwrap().contains("terraform apply"),
        "{timeline}"
    );
    // Let it play past the commands (speed 4: a few seconds of recording per second).
    d.wait_for("playback", "return player.getCurrentTime()", |v| {
        v.as_f64().unwrap_or(0.0) > 8.0
    })
    .await;
    let el = d
        .call(
            "POST",
            "/element",
            json!({"using": "css selector", "value": "#timeline div:nth-of-type(2)"}),
        )
        .await;
    let el = el
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no timeline entry: {el}"))
        .to_string();
    d.call("POST", &format!("/element/{el}/click"), json!({}))
        .await;
    // `terraform apply` ran 1.5 s into the session.
    let t = d
        .js("return player.getCurrentTime()")
        .await
        .as_f64()
        .unwrap();
    assert!(
        (1.4..6.0).contains(&t),
        "the player is at {t}, not near 1.5 s"
    );
    let _ = d.call("DELETE", "", json!({})).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_watched_as_it_grows() {
    let h = host("web-2", 12);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    let live = Recording::fake(
        "live-1",
        "web-2",
        "carol@example.org",
        "usher-carol",
        &["tail -f /var/log/syslog"],
        "LIVE",
        12 << 10,
        2 << 10,
    );
    let n = live.cast.len();
    assert!(n >= 4);
    up.put_meta(&live.id, &live.meta).await.unwrap();
    up.ship_stream(&live, "audit", usize::MAX).await.unwrap();
    up.ship_stream(&live, "cast", n / 2).await.unwrap();

    let d = Driver::start().await;
    d.call(
        "POST",
        "/url",
        json!({"url": format!("{}/?token={VIEWER}&play=live-1", c.url())}),
    )
    .await;
    d.wait_for(
        "a live session's status",
        "return document.body.dataset.status || ''",
        |v| v == "live",
    )
    .await;
    d.wait_for(
        "the first half",
        "const p = document.querySelector('#player .ap-player'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains("of live-1: the quick"),
    )
    .await;
    // The agent ships the rest while the page is open: its last line appears.
    let last_line: Value = serde_json::from_slice(
        live.cast[n - 1]
            .trim_ascii_end()
            .rsplit(|b| *b == b'\n')
            .next()
            .unwrap(),
    )
    .unwrap();
    let last_text = last_line[2].as_str().unwrap().trim_end().to_string();
    up.ship(&live).await.unwrap();
    d.wait_for(
        "the rest of the live session",
        "const p = document.querySelector('#player .ap-player'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains(&last_text),
    )
    .await;
    let _ = d.call("DELETE", "", json!({})).await;
}
