//! A headless Chromium driven over WebDriver: chromedriver on a loopback port, spoken to
//! with its JSON wire protocol through `curl`. Pages are checked by what they render (the
//! text a person would read), not by the HTML the server sent.

use crate::ports::free_port;
use crate::wait::poll_until;
use serde_json::{json, Value};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long a page gets to show what a test waits for.
const PAGE_TIMEOUT: Duration = Duration::from_secs(30);

/// One browser session; dropping it ends the session, chromedriver and every browser it
/// started, and removes the profile.
pub struct Browser {
    chromedriver: Child,
    base: String,
    session: String,
    profile: PathBuf,
}

impl Browser {
    pub fn start() -> Browser {
        let port = free_port();
        // Its own process group: the browsers it starts go with it, even when a test fails.
        let chromedriver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .process_group(0)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("chromedriver does not run ({e}): `cargo xtask setup` installs it")
            });
        let profile = std::env::temp_dir().join(format!("usher-chromium-{port}"));
        let mut browser = Browser {
            chromedriver,
            base: format!("http://127.0.0.1:{port}"),
            session: String::new(),
            profile,
        };
        let up = poll_until(
            "chromedriver to answer",
            Duration::from_secs(20),
            Duration::from_millis(100),
            || browser.request("GET", &format!("{}/status", browser.base), None),
        );
        if let Err(e) = up {
            panic!("{e}");
        }
        let mut args: Vec<String> = [
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
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.push(format!("--user-data-dir={}", browser.profile.display()));
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "acceptInsecureCerts": true,
            "goog:chromeOptions": {"binary": "/usr/bin/chromium", "args": args}
        }}});
        let session = browser.call("POST", "/session", capabilities);
        browser.session = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no WebDriver session: {session}"))
            .to_string();
        browser
    }

    /// One WebDriver command: `path` is relative to the session (`/session` itself starts
    /// one); returns its `value`.
    pub fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = if path == "/session" {
            format!("{}{path}", self.base)
        } else {
            format!("{}/session/{}{path}", self.base, self.session)
        };
        let body = (method == "POST").then(|| body.to_string());
        let text = self
            .request(method, &url, body.as_deref())
            .unwrap_or_else(|| panic!("chromedriver did not answer {method} {path}"));
        let answer: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver: {text}"));
        answer["value"].clone()
    }

    /// The body of an HTTP request to chromedriver, or None when it did not answer.
    fn request(&self, method: &str, url: &str, body: Option<&str>) -> Option<String> {
        let mut curl = Command::new("curl");
        curl.args(["-s", "-f", "--max-time", "60", "-X", method]);
        if let Some(body) = body {
            curl.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let out = curl.arg(url).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Loads `url` in the page.
    pub fn open(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url }));
    }

    /// Signs the browser in at `origin` with an API token, as the service's sign-in would:
    /// the session cookie (HttpOnly, Secure, SameSite=Strict). WebDriver sets cookies for
    /// the page it is on, so `origin` is opened first.
    pub fn sign_in_with_token(&self, origin: &str, token: &str) {
        self.open(&format!("{origin}/"));
        self.call(
            "POST",
            "/cookie",
            json!({"cookie": {"name": "usher_session", "value": token, "path": "/",
                              "secure": true, "httpOnly": true, "sameSite": "Strict"}}),
        );
    }

    /// Runs `script` (a function body: `return ...`) in the page; returns what it returned.
    pub fn js(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": []}),
        )
    }

    /// Runs `script` until `ok` holds for what it returns (30 s at most), and returns that.
    pub fn wait_for(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        let seen = poll_until(what, PAGE_TIMEOUT, Duration::from_millis(100), || {
            last = self.js(script);
            ok(&last).then(|| last.clone())
        });
        seen.unwrap_or_else(|e| panic!("{e}: last saw {last}"))
    }

    /// Clicks the first element matching the CSS `selector`. The page re-renders its lists
    /// as answers arrive, so an element found a moment ago can be gone (stale) when the
    /// click reaches it: find and click again, for up to 10 s.
    pub fn click(&self, selector: &str) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            let clicked = self.try_click(selector);
            match clicked {
                Ok(()) => return,
                Err(why) if std::time::Instant::now() > deadline => {
                    panic!("cannot click {selector}: {why}")
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(100)),
            }
        }
    }

    fn try_click(&self, selector: &str) -> Result<(), String> {
        let base = format!("{}/session/{}", self.base, self.session);
        let find = json!({"using": "css selector", "value": selector}).to_string();
        let found = self
            .request("POST", &format!("{base}/element"), Some(&find))
            .ok_or("no such element (yet)")?;
        let found: Value = serde_json::from_str(&found).map_err(|e| e.to_string())?;
        let id = found["value"]
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(Value::as_str)
            .ok_or_else(|| format!("no element: {found}"))?
            .to_string();
        self.request("POST", &format!("{base}/element/{id}/click"), Some("{}"))
            .map(|_| ())
            .ok_or_else(|| "the click was refused (stale or covered)".to_string())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.base, self.session);
            let _ = self.request("DELETE", &url, None);
        }
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.chromedriver.id())])
            .status();
        let _ = self.chromedriver.kill();
        let _ = self.chromedriver.wait();
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}
