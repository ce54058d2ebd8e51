//! The OpenSSH client as the tests and the benchmarks run it against their throwaway
//! servers (usherd, sshd, the package's agent in a container).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Options for a server made a moment ago: its host key is new every run, so it is neither
/// checked nor remembered; only the key given with `-i` is offered (not the agent's or
/// ~/.ssh's); only errors are printed; a server that does not answer fails within 10 s.
const CLIENT_OPTIONS: [&str; 10] = [
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "IdentitiesOnly=yes",
    "-o",
    "ConnectTimeout=10",
];

/// The client options (see `CLIENT_OPTIONS`), for `ssh`, `scp`, `sftp` or `sshpass ssh`.
pub fn client_options() -> Vec<String> {
    CLIENT_OPTIONS.iter().map(|s| s.to_string()).collect()
}

/// `ssh` with one key to one server, never prompting (`BatchMode`).
#[derive(Debug, Clone)]
pub struct SshClient {
    pub key: PathBuf,
    pub host: String,
    pub port: u16,
}

impl SshClient {
    /// To `port` on 127.0.0.1 with the private key `key`.
    pub fn new(key: &Path, port: u16) -> SshClient {
        SshClient {
            key: key.to_path_buf(),
            host: "127.0.0.1".into(),
            port,
        }
    }

    /// The same client to another address.
    pub fn to_host(mut self, host: &str) -> SshClient {
        self.host = host.to_string();
        self
    }

    /// Every argument of `ssh` before the remote command: the options, batch mode, the
    /// key, the port and `login@host`.
    pub fn args(&self, login: &str) -> Vec<String> {
        let mut args = client_options();
        args.extend([
            "-o".into(),
            "BatchMode=yes".into(),
            "-i".into(),
            self.key.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            format!("{login}@{}", self.host),
        ]);
        args
    }

    /// `ssh ARGS`; the caller adds the remote command.
    pub fn command(&self, login: &str) -> Command {
        let mut command = Command::new("ssh");
        command.args(self.args(login));
        command
    }

    /// `timeout SECS ssh ARGS`: a client that hangs is ended (SIGTERM, which `ssh` turns
    /// into closing the connection) instead of hanging the test.
    pub fn command_within(&self, secs: u64, login: &str) -> Command {
        let mut command = Command::new("timeout");
        command
            .arg(secs.to_string())
            .arg("ssh")
            .args(self.args(login));
        command
    }

    /// `ssh ARGS` as one line for `sh -c`, each argument quoted.
    pub fn shell_line(&self, login: &str) -> String {
        std::iter::once("ssh".to_string())
            .chain(self.args(login).iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// `word` quoted for a POSIX shell.
pub fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=./@:,+".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_destination_comes_last_after_the_key_and_port() {
        let args = SshClient::new(Path::new("/tmp/k"), 2222).args("jit-a");
        assert_eq!(
            &args[args.len() - 5..],
            ["-i", "/tmp/k", "-p", "2222", "jit-a@127.0.0.1"]
        );
        assert!(args.contains(&"StrictHostKeyChecking=no".to_string()));
    }

    #[test]
    fn a_shell_line_quotes_what_the_shell_would_split() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote("LogLevel=ERROR"), "LogLevel=ERROR");
        let line = SshClient::new(Path::new("/tmp/my key"), 22).shell_line("u");
        assert!(line.starts_with("ssh -o StrictHostKeyChecking=no"));
        assert!(line.contains("-i '/tmp/my key'"));
    }
}
