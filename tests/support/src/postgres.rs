//! A real PostgreSQL server from Debian's `postgresql` package, in a scratch directory of
//! its own: `initdb` and the server run as the `postgres` system user when the test is root
//! (the server refuses to run as root), listen on 127.0.0.1 on a free port and on a unix
//! socket in the scratch directory, and trust every local connection. The binaries come
//! from `/usr/lib/postgresql/<version>/bin` (the newest there), never from PATH.

use crate::ports::free_port;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// How long `pg_ctl` may wait for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "30";
/// The user the server runs as and the superuser a test connects as.
const SYSTEM_USER: &str = "postgres";

#[derive(Debug, thiserror::Error)]
pub enum PostgresError {
    #[error("no PostgreSQL in /usr/lib/postgresql/*/bin: `cargo xtask setup` installs Debian's postgresql")]
    NotInstalled,
    #[error("there is no `postgres` system user to run the server as: `cargo xtask setup` installs Debian's postgresql")]
    NoSystemUser,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {output}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        output: String,
    },
}

/// The server, running from `start` until `stop` or drop. Dropping it stops it
/// (`pg_ctl stop -m immediate`) and removes the directory (kept, with the log printed, when
/// the test is failing).
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    port: u16,
    database: String,
    /// uid and gid to run the server's programs as (None: as ourselves, not root).
    run_as: Option<(u32, u32)>,
    running: bool,
}

impl Postgres {
    /// A new cluster with a database named `usher`.
    pub fn start() -> Result<Postgres, PostgresError> {
        Self::start_with_database("usher")
    }

    /// A new cluster with a database named `database`.
    pub fn start_with_database(database: &str) -> Result<Postgres, PostgresError> {
        let bin = bin_dir().ok_or(PostgresError::NotInstalled)?;
        let run_as = if running_as_root() {
            Some(system_user().ok_or(PostgresError::NoSystemUser)?)
        } else {
            None
        };
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("usher-pg-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let io = |source| PostgresError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(dir.join("socket")).map_err(io)?;
        if let Some((uid, gid)) = run_as {
            for path in [dir.clone(), dir.join("socket")] {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid)).map_err(io)?;
            }
        }
        let mut postgres = Postgres {
            dir,
            bin,
            port,
            database: database.to_string(),
            run_as,
            running: false,
        };
        postgres.as_server_user("initdb", |c| {
            c.args(["--auth=trust", "--no-sync", "--encoding=UTF8", "--locale=C"])
                .arg(format!("--username={SYSTEM_USER}"))
                .arg("-D")
                .arg(postgres.data_dir())
        })?;
        postgres.start_again()?;
        postgres.psql_as("postgres", &format!("CREATE DATABASE \"{database}\""))?;
        Ok(postgres)
    }

    /// `postgres://postgres@127.0.0.1:PORT/DATABASE` (no password: loopback is trusted).
    pub fn url(&self) -> String {
        format!(
            "postgres://{SYSTEM_USER}@127.0.0.1:{}/{}",
            self.port, self.database
        )
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// The directory holding the unix socket (`.s.PGSQL.PORT`), for `host=` in a libpq
    /// connection string.
    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("socket")
    }

    /// The server's log: print it when a test fails.
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Runs `sql` with `psql` on the database as the superuser: what it printed, unaligned
    /// and without headers (`-At`), one row a line.
    pub fn psql(&self, sql: &str) -> Result<String, PostgresError> {
        self.psql_as(&self.database, sql)
    }

    /// A clean shutdown (`pg_ctl stop -m fast`): connections are refused until
    /// `start_again`.
    pub fn stop(&mut self) -> Result<(), PostgresError> {
        self.pg_ctl_stop("fast")
    }

    /// A crash (`pg_ctl stop -m immediate`): no checkpoint, recovery on the next start.
    pub fn kill(&mut self) -> Result<(), PostgresError> {
        self.pg_ctl_stop("immediate")
    }

    /// Starts the server (again, after `stop` or `kill`), same port, same data; returns
    /// once it accepts connections.
    pub fn start_again(&mut self) -> Result<(), PostgresError> {
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c max_connections=200",
            self.port,
            self.socket_dir().display()
        );
        self.as_server_user("pg_ctl", |c| {
            c.args(["start", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-D"])
                .arg(self.data_dir())
                .arg("-l")
                .arg(self.log_path())
                .arg("-o")
                .arg(&options)
        })?;
        self.running = true;
        Ok(())
    }

    fn pg_ctl_stop(&mut self, mode: &str) -> Result<(), PostgresError> {
        if !self.running {
            return Ok(());
        }
        self.as_server_user("pg_ctl", |c| {
            c.args(["stop", "-w", "-t", PG_CTL_TIMEOUT_SECS, "-m", mode, "-D"])
                .arg(self.data_dir())
        })?;
        self.running = false;
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn psql_as(&self, database: &str, sql: &str) -> Result<String, PostgresError> {
        let mut command = Command::new(self.bin.join("psql"));
        command
            .args([
                "-X",
                "-A",
                "-t",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SYSTEM_USER,
                "-d",
                database,
            ])
            .args(["-c", sql])
            .env("PGCONNECT_TIMEOUT", "10");
        let output = run(&mut command, "psql")?;
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs one of the server's programs as the server's user, in the scratch directory.
    fn as_server_user(
        &self,
        program: &str,
        args: impl FnOnce(&mut Command) -> &mut Command,
    ) -> Result<Output, PostgresError> {
        let mut command = Command::new(self.bin.join(program));
        command.current_dir(&self.dir).env("LC_ALL", "C");
        if let Some((uid, gid)) = self.run_as {
            command.uid(uid).gid(gid).env("HOME", &self.dir);
        }
        args(&mut command);
        run(&mut command, program)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.kill();
        if std::thread::panicking() {
            eprintln!(
                "postgres dir kept: {}\n--- server log ---\n{}",
                self.dir.display(),
                self.log()
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn run(command: &mut Command, program: &str) -> Result<Output, PostgresError> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .map_err(|source| PostgresError::Io {
            path: PathBuf::from(program),
            source,
        })?;
    if output.status.success() {
        return Ok(output);
    }
    Err(PostgresError::Failed {
        program: program.to_string(),
        status: output.status,
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    })
}

/// The newest `/usr/lib/postgresql/<version>/bin` that has `initdb`.
pub fn bin_dir() -> Option<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    std::fs::read_dir(root)
        .ok()?
        .flatten()
        .filter_map(|entry| {
            let version: u32 = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version)
        .map(|(_, bin)| bin)
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("Uid:"))
                .and_then(|line| line.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The uid and gid of the `postgres` user, from /etc/passwd.
fn system_user() -> Option<(u32, u32)> {
    std::fs::read_to_string("/etc/passwd")
        .ok()?
        .lines()
        .map(|line| line.split(':').collect::<Vec<_>>())
        .find(|fields| fields.first() == Some(&SYSTEM_USER))
        .and_then(|fields| Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?)))
}
