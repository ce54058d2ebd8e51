//! The RDP worker's socket, between `usherd` and `usher-rdp`. For every RDP connection
//! usherd starts one worker process (an unprivileged user, the TCP connection as its
//! stdin, this socket as fd 3): the worker speaks RDP to the client and X11 to the
//! session's desktop; usherd decides who logs in, runs the desktop as the grant's
//! account and writes the recording. One JSON object per line, each way.
//!
//! usherd → worker: [`ToWorker::Hello`] first, then one answer to the login
//! ([`ToWorker::Desktop`] or [`ToWorker::Refused`]), then at most [`ToWorker::End`].
//! worker → usherd: [`FromWorker::Login`] once, then [`FromWorker::Record`] lines and
//! [`FromWorker::Resized`] for as long as the desktop is shown.

pub use crate::line::LineError;
use crate::line::{from_line, to_line};
use serde::{Deserialize, Serialize};

/// The longest line either side reads: a recording line carries a keyframe, a compressed
/// image of the whole screen (base64), and the largest screen is 8192x8192.
pub const MAX_LINE_BYTES: usize = 64 << 20;

/// The longest login line usherd reads from a worker (it has not authenticated anyone yet).
pub const MAX_LOGIN_LINE_BYTES: usize = 8 << 10;

/// The fd the worker finds its socket to usherd on.
pub const WORKER_SOCKET_FD: i32 = 3;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Security {
    /// TLS, credentials in the Client Info PDU (`/sec:tls`).
    Tls,
    /// TLS then CredSSP (NLA), then the same check of the Client Info PDU.
    Hybrid,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToWorker {
    /// How to serve this connection.
    Hello {
        /// The server's certificate and PKCS#8 key, PEM.
        cert_pem: String,
        key_pem: String,
        security: Vec<Security>,
        /// Seconds the client has to log in.
        login_grace_secs: u64,
        /// The largest desktop a client may ask for.
        max_width: u16,
        max_height: u16,
    },
    /// The login is accepted: show this desktop.
    Desktop(Desktop),
    /// The login is refused; the client is told nothing more.
    Refused,
    /// The session ends (the grant ended, the desktop exited): disconnect the client.
    End { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Desktop {
    pub session_id: String,
    /// The X display, `:N`.
    pub display: String,
    /// The MIT-MAGIC-COOKIE-1 of that display, hex.
    pub cookie: String,
    pub width: u16,
    pub height: u16,
    /// True when this login took back a desktop left by a dropped connection.
    pub reconnected: bool,
    /// Frames a second sent to the client, at most.
    pub max_fps: u32,
    pub recording: Option<RecordingSettings>,
    /// Clipboard and drive redirection (they move data in and out).
    pub clipboard: bool,
    pub drives: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordingSettings {
    /// Frames a second written to the recording, at most.
    pub max_fps: u32,
    /// Seconds between keyframes (a whole screen), for seeking.
    pub keyframe_secs: u32,
    /// Record keystrokes and pointer events too.
    pub input: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FromWorker {
    /// What the client sent to log in, and the desktop size it asked for.
    Login {
        username: String,
        password: String,
        domain: String,
        width: u16,
        height: u16,
    },
    /// One line of the desktop recording (see `record` in usher-rdp), newline excluded.
    Record {
        line: String,
    },
    /// The recording could not be made (an image failed to encode); usherd ends the
    /// session when recording is required.
    RecordFailed {
        reason: String,
    },
    Resized {
        width: u16,
        height: u16,
    },
}

impl ToWorker {
    pub fn encode(&self) -> Vec<u8> {
        to_line(self)
    }
    pub fn decode(line: &[u8]) -> Result<ToWorker, LineError> {
        from_line(line, MAX_LINE_BYTES)
    }
}

impl FromWorker {
    pub fn encode(&self) -> Vec<u8> {
        to_line(self)
    }
    pub fn decode(line: &[u8], limit: usize) -> Result<FromWorker, LineError> {
        from_line(line, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_round_trips_and_a_long_one_is_refused() {
        let login = FromWorker::Login {
            username: "jit-alice".into(),
            password: "p\"w\n".into(),
            domain: String::new(),
            width: 1280,
            height: 800,
        };
        let line = login.encode();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(
            FromWorker::decode(&line, MAX_LOGIN_LINE_BYTES).unwrap(),
            login
        );
        let long = FromWorker::Record {
            line: "x".repeat(MAX_LOGIN_LINE_BYTES),
        };
        assert!(matches!(
            FromWorker::decode(&long.encode(), MAX_LOGIN_LINE_BYTES),
            Err(LineError::TooLarge { .. })
        ));
    }
}
