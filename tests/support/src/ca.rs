//! A throwaway certificate authority and a server certificate it signed, for a TLS server
//! on loopback that a client is told to trust. Made with the `openssl` command (Debian has
//! it; `cargo xtask setup` installs it otherwise), valid two days.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// The names the server certificate is valid for.
const SERVER_NAMES: &str = "IP:127.0.0.1,IP:::1,DNS:localhost";

/// `openssl req` options for a new P-256 key, unencrypted.
const NEW_P256_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// The three `openssl` steps, each with what it makes.
fn steps() -> [(&'static str, Vec<&'static str>); 3] {
    [
        (
            "the CA",
            [
                &["req", "-x509"][..],
                &NEW_P256_KEY,
                &["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"],
                &["-subj", "/CN=usher test CA"],
            ]
            .concat(),
        ),
        (
            "the server's key and request",
            [
                &["req"][..],
                &NEW_P256_KEY,
                &["-keyout", "server.key", "-out", "server.csr"],
                &["-subj", "/CN=localhost"],
            ]
            .concat(),
        ),
        (
            "the server certificate",
            vec![
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
            ],
        ),
    ]
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("openssl does not run ({0}): `cargo xtask setup` installs it")]
    NoOpenssl(std::io::Error),
    #[error("openssl could not make {what}: {status}")]
    Step {
        what: &'static str,
        status: ExitStatus,
    },
}

/// The files of a test CA in one directory: `ca.pem` (what clients trust), `server.pem`
/// and `server.key` (what the server presents, for 127.0.0.1, ::1 and localhost).
#[derive(Debug, Clone)]
pub struct TestCa {
    pub dir: PathBuf,
}

impl TestCa {
    /// Makes the CA and the server certificate in `dir` (which must exist).
    pub fn create(dir: &Path) -> Result<TestCa, CaError> {
        let extensions = dir.join("ext.cnf");
        std::fs::write(
            &extensions,
            format!("subjectAltName={SERVER_NAMES}\nbasicConstraints=CA:FALSE\n"),
        )
        .map_err(|source| CaError::Write {
            path: extensions,
            source,
        })?;
        for (what, args) in steps() {
            let status = Command::new("openssl")
                .args(&args)
                .current_dir(dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(CaError::NoOpenssl)?;
            if !status.success() {
                return Err(CaError::Step { what, status });
            }
        }
        Ok(TestCa {
            dir: dir.to_path_buf(),
        })
    }

    /// The CA certificate, PEM: what a client trusts.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A client certificate this CA signs, with subject CN `common_name` and, when given,
    /// the DNS name `dns_name`: its certificate then key (PEM, one file, as a TLS client
    /// presents it), written to `client-<file>.pem`.
    pub fn client_cert(
        &self,
        file: &str,
        common_name: &str,
        dns_name: Option<&str>,
    ) -> Result<PathBuf, CaError> {
        let write = |path: PathBuf, text: String| {
            std::fs::write(&path, text).map_err(|source| CaError::Write { path, source })
        };
        let ext = self.dir.join(format!("client-{file}.cnf"));
        let mut extensions = "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n".to_string();
        if let Some(dns) = dns_name {
            extensions.push_str(&format!("subjectAltName=DNS:{dns}\n"));
        }
        write(ext.clone(), extensions)?;
        let (key, csr, cert) = (
            format!("client-{file}.key"),
            format!("client-{file}.csr"),
            format!("client-{file}.crt"),
        );
        let subject = format!("/CN={common_name}");
        let ext_name = format!("client-{file}.cnf");
        let steps: [(&'static str, Vec<&str>); 2] = [
            (
                "the client's key and request",
                [
                    &["req"][..],
                    &NEW_P256_KEY,
                    &["-keyout", &key, "-out", &csr, "-subj", &subject],
                ]
                .concat(),
            ),
            (
                "the client certificate",
                vec![
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &cert,
                    "-days",
                    "2",
                    "-extfile",
                    &ext_name,
                ],
            ),
        ];
        for (what, args) in steps {
            let status = Command::new("openssl")
                .args(&args)
                .current_dir(&self.dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map_err(CaError::NoOpenssl)?;
            if !status.success() {
                return Err(CaError::Step { what, status });
            }
        }
        let read = |name: &str| {
            let path = self.dir.join(name);
            std::fs::read_to_string(&path).map_err(|source| CaError::Write { path, source })
        };
        let identity = self.dir.join(format!("client-{file}.pem"));
        write(identity.clone(), read(&cert)? + &read(&key)?)?;
        Ok(identity)
    }
}
