//! A real `usher-collector` process on a loopback port with a test CA, on either backend
//! (a local directory, or moto's S3-compatible server started for the test), and agents
//! played by `usher_collector::uploader`.

#![allow(dead_code)]

use ed25519_dalek::SigningKey;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use usher_collector::uploader::{openssh_public_line, Answer, Uploader};

pub const VIEWER: &str = "viewer-secret-token";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Backend {
    Local,
    S3,
}

/// One simulated host: its name, token and host key.
pub struct Host {
    pub name: String,
    pub token: String,
    pub key: SigningKey,
}

pub fn host(name: &str, seed: u8) -> Host {
    Host {
        name: name.into(),
        token: format!("token-of-{name}"),
        key: SigningKey::from_bytes(&[seed; 32]),
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// moto's S3 server on a loopback port; stopped on drop.
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
            .expect("moto_server is missing: run collector/setup.sh (pip install 'moto[server]')");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "moto did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Moto { child, port }
    }

    /// Makes the bucket (as any S3 client would: PUT on its name).
    pub fn bucket(&self, name: &str) {
        let st = Command::new("curl")
            .args([
                "-sf",
                "-X",
                "PUT",
                &format!("http://127.0.0.1:{}/{name}", self.port),
            ])
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "could not make bucket {name}");
    }

    /// The object names under `prefix`, straight from moto.
    pub fn list(&self, bucket: &str, prefix: &str) -> String {
        let out = Command::new("curl")
            .args([
                "-s",
                &format!(
                    "http://127.0.0.1:{}/{bucket}?list-type=2&prefix={prefix}",
                    self.port
                ),
            ])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Collector {
    pub dir: PathBuf,
    pub port: u16,
    pub ca: Vec<u8>,
    pub moto: Option<Moto>,
    child: Option<Child>,
    config: PathBuf,
}

impl Collector {
    /// Configured for `hosts`, not yet running.
    pub fn new(backend: Backend, hosts: &[&Host]) -> Collector {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!(
            "usher-collector-test-{}-{port}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        usher_collector::bench::make_certs(&dir).unwrap();
        let (moto, storage) = match backend {
            Backend::Local => (None, String::new()),
            Backend::S3 => {
                let moto = Moto::start();
                moto.bucket("usher-test");
                let s = format!(
                    "[storage]\nbackend = \"s3\"\nbucket = \"usher-test\"\nendpoint = \"http://127.0.0.1:{}\"\n\
                     region = \"us-east-1\"\naccess_key_id = \"test\"\nsecret_access_key = \"test\"\nallow_http = true\n",
                    moto.port
                );
                (Some(moto), s)
            }
        };
        let assets = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/web-assets");
        let mut config = format!(
            "listen = \"127.0.0.1:{port}\"\ntls_cert = \"{d}/server.pem\"\ntls_key = \"{d}/server.key\"\n\
             data_dir = \"{d}/data\"\nviewer_tokens = [\"{VIEWER}\"]\nassets_dir = \"{a}\"\n{storage}\n",
            d = dir.display(),
            a = assets.display()
        );
        for h in hosts {
            config.push_str(&format!(
                "[[agent]]\nhost = \"{}\"\ntoken = \"{}\"\nhost_key = \"{}\"\n",
                h.name,
                h.token,
                openssh_public_line(&h.key)
            ));
        }
        let config_path = dir.join("collector.toml");
        std::fs::write(&config_path, config).unwrap();
        Collector {
            ca: std::fs::read(dir.join("ca.pem")).unwrap(),
            dir,
            port,
            moto,
            child: None,
            config: config_path,
        }
    }

    pub fn started(backend: Backend, hosts: &[&Host]) -> Collector {
        let mut c = Collector::new(backend, hosts);
        c.start();
        c
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("collector.log"))
            .unwrap();
        self.child = Some(
            Command::new(env!("CARGO_BIN_EXE_usher-collector"))
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
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `kill -9`: nothing acknowledged may be lost.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("collector.log")).unwrap_or_default()
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    pub fn uploader(&self, h: &Host) -> Uploader {
        Uploader::new(&self.url(), &self.ca, &h.token, h.key.clone()).unwrap()
    }

    /// A client with the viewer token.
    pub fn viewer(&self) -> Uploader {
        Uploader::new(
            &self.url(),
            &self.ca,
            VIEWER,
            SigningKey::from_bytes(&[0; 32]),
        )
        .unwrap()
    }

    pub async fn get(&self, path: &str) -> Answer {
        let v = self.viewer();
        v.send(v.client.get(format!("{}{path}", self.url())))
            .await
            .unwrap()
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.kill();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("collector dir kept: {}\n{}", self.dir.display(), self.log());
        }
    }
}

/// Runs an async test body once per backend, as two `#[test]`s.
#[macro_export]
macro_rules! both_backends {
    ($name:ident) => {
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn local() {
                super::$name($crate::support::Backend::Local).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn s3() {
                super::$name($crate::support::Backend::S3).await
            }
        }
    };
}
