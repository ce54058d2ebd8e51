//! A real `usher-collector` process on a loopback port with a test CA, storing in a local
//! directory or in moto's S3-compatible server, and `curl` to ask it things as an auditor
//! (with an API token minted by `usher-collector token`) or as an agent.

use crate::ca::TestCa;
use crate::ports::free_port;
use crate::wait::{poll_until, wait_for_port};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The bucket a collector started with `Backend::S3` stores in (its moto is its own).
const BUCKET: &str = "usher-test";

/// Where the collector stores objects.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Local,
    S3,
}

/// An agent the collector accepts uploads from.
#[derive(Debug, Clone)]
pub struct TrustedAgent {
    pub host: String,
    pub token: String,
    /// Its host key as an OpenSSH public key line.
    pub host_key: String,
}

/// Whatever has a log worth showing when a wait for the collector fails (the agent that
/// was shipping, say).
pub trait LogSource {
    fn log(&self) -> String;
}

/// moto's S3-compatible server on a loopback port; stopped on drop.
pub struct Moto {
    child: Child,
    pub port: u16,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("moto_server does not run ({e}): `cargo xtask setup` installs it")
            });
        let moto = Moto { child, port };
        if let Err(e) = wait_for_port(port, Duration::from_secs(30)) {
            panic!("moto did not start: {e}");
        }
        moto
    }

    /// Makes `bucket` (a PUT on its name, as any S3 client would).
    pub fn bucket(&self, bucket: &str) {
        let status = Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{}/{bucket}", self.url())])
            .stdout(Stdio::null())
            .status()
            .expect("curl runs");
        assert!(status.success(), "moto could not make bucket {bucket}");
    }

    /// Makes `bucket` and returns the collector's `[storage]` section for it.
    pub fn storage(&self, bucket: &str) -> String {
        self.bucket(bucket);
        format!(
            "[storage]\nbackend = \"s3\"\nbucket = \"{bucket}\"\nendpoint = \"{}\"\nregion = \"us-east-1\"\n\
             access_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
            self.url()
        )
    }

    /// The listing (S3's XML) of the objects under `prefix`, straight from moto.
    pub fn list(&self, bucket: &str, prefix: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                &format!("{}/{bucket}?list-type=2&prefix={prefix}", self.url()),
            ])
            .output()
            .expect("curl runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A collector in a directory of its own (certificates, config, data, log). Configured by
/// `new`, running after `start`; dropping it kills it and removes the directory (kept, with
/// the log printed, when the test is failing).
pub struct Collector {
    pub dir: PathBuf,
    pub port: u16,
    pub config: PathBuf,
    pub ca: TestCa,
    /// The S3 server behind it, when it was made with `Backend::S3`.
    pub moto: Option<Moto>,
    /// The `usher-collector` binary to run: the built one unless a test says otherwise.
    pub binary: PathBuf,
    child: Option<Child>,
    /// An auditor's API token, minted on first use.
    viewer_token: std::sync::OnceLock<String>,
}

impl Collector {
    /// Configured for `agents`, with `storage` as its `[storage]` section ("" for a local
    /// directory), on a free port; not running yet.
    pub fn new(agents: &[TrustedAgent], storage: &str) -> Collector {
        Self::new_on(free_port(), agents, storage)
    }

    /// `new`, on `port`: an agent can be configured for it before it exists.
    pub fn new_on(port: u16, agents: &[TrustedAgent], storage: &str) -> Collector {
        let dir = std::env::temp_dir().join(format!(
            "usher-collector-test-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a scratch directory for the collector");
        let ca = TestCa::create(&dir).unwrap_or_else(|e| panic!("the test CA: {e}"));
        let assets = crate::workspace_root().join("target/web-assets");
        let config = dir.join("collector.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"127.0.0.1:{port}\"\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
                 data_dir = \"{d}/data\"\nassets_dir = \"{a}\"\n{storage}\n",
                cert = ca.server_cert().display(),
                key = ca.server_key().display(),
                d = dir.display(),
                a = assets.display()
            ),
        )
        .expect("the collector's config is written");
        let collector = Collector {
            dir,
            port,
            config,
            ca,
            moto: None,
            binary: PathBuf::new(),
            child: None,
            viewer_token: std::sync::OnceLock::new(),
        };
        for agent in agents {
            collector.trust(agent);
        }
        collector
    }

    /// `new` on `backend`: for S3, a moto of its own with one bucket.
    pub fn with_backend(backend: Backend, agents: &[TrustedAgent]) -> Collector {
        match backend {
            Backend::Local => Self::new(agents, ""),
            Backend::S3 => {
                let moto = Moto::start();
                let mut collector = Self::new(agents, &moto.storage(BUCKET));
                collector.moto = Some(moto);
                collector
            }
        }
    }

    /// The bucket objects go to, with `Backend::S3`.
    pub fn bucket(&self) -> &'static str {
        BUCKET
    }

    /// Accepts uploads from `agent` from the next start on.
    pub fn trust(&self, agent: &TrustedAgent) {
        let mut config = std::fs::read_to_string(&self.config).expect("the collector's config");
        config.push_str(&format!(
            "[[agent]]\nhost = \"{}\"\ntoken = \"{}\"\nhost_key = \"{}\"\n",
            agent.host, agent.token, agent.host_key
        ));
        std::fs::write(&self.config, config).expect("the collector's config is written");
    }

    /// Starts (or restarts) it and waits until it accepts connections.
    pub fn start(&mut self) {
        if self.binary.as_os_str().is_empty() {
            self.binary = crate::built_binary("usher-collector");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collector.log"))
            .expect("the collector's log opens");
        let child = Command::new(&self.binary)
            .arg("--config")
            .arg(&self.config)
            .stdout(log.try_clone().expect("the log's descriptor"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} does not start: {e}", self.binary.display()));
        self.child = Some(child);
        if let Err(e) = wait_for_port(self.port, Duration::from_secs(20)) {
            panic!("the collector did not start ({e}):\n{}", self.log());
        }
    }

    /// `kill -9`: nothing acknowledged may be lost.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collector.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// `curl ARGS` with the test CA trusted: the status code and the body.
    pub fn curl(&self, args: &[&str]) -> (u16, String) {
        let out = Command::new("curl")
            .args(["-s", "-o", "-", "-w", "\n%{http_code}", "--cacert"])
            .arg(self.ca.ca_pem())
            .args(args)
            .output()
            .expect("curl runs");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// `usher-collector token …` with this collector's config: an API token signed by its
    /// issuer key (the state store makes the key if the collector has not run yet).
    pub fn mint_token(&self, sub: &str, name: &str, roles: &str) -> String {
        let binary = if self.binary.as_os_str().is_empty() {
            crate::built_binary("usher-collector")
        } else {
            self.binary.clone()
        };
        let out = Command::new(&binary)
            .arg("--config")
            .arg(&self.config)
            .args([
                "token", "--sub", sub, "--name", name, "--roles", roles, "--ttl", "12h",
            ])
            .output()
            .expect("usher-collector token runs");
        assert!(
            out.status.success(),
            "usher-collector token: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// An auditor's API token (what reading recordings needs).
    pub fn viewer_token(&self) -> String {
        self.viewer_token
            .get_or_init(|| self.mint_token("test-auditor", "auditor", "auditor"))
            .clone()
    }

    /// GET `path` as an auditor.
    pub fn view(&self, path: &str) -> (u16, String) {
        self.curl(&[
            "-H",
            &format!("Authorization: Bearer {}", self.viewer_token()),
            &format!("{}{path}", self.url()),
        ])
    }

    /// What the collector says about session `id` (null when it says nothing readable).
    pub fn session(&self, id: &str) -> serde_json::Value {
        serde_json::from_str(&self.view(&format!("/api/v1/sessions/{id}")).1).unwrap_or_default()
    }

    /// Waits up to `secs` for session `id` to be complete; on failure shows the
    /// collector's log and `shipper`'s.
    pub fn wait_complete(&self, id: &str, secs: u64, shipper: &impl LogSource) {
        let complete = poll_until(
            &format!("session {id} to be complete"),
            Duration::from_secs(secs),
            Duration::from_millis(200),
            || (self.session(id)["status"] == "complete").then_some(()),
        );
        if let Err(e) = complete {
            panic!(
                "{e}: {}\n--- collector ---\n{}\n--- agent ---\n{}",
                self.session(id),
                self.log(),
                shipper.log()
            );
        }
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("collector dir kept: {}\n{}", self.dir.display(), self.log());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
