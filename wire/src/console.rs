//! The console socket, between `usher-shell` (the ephemeral accounts' login shell) and
//! `usherd`. The shell sends one [`OpenRequest`], with its stdin, stdout and stderr
//! attached (SCM_RIGHTS), then [`ShellControl`] lines; the agent answers with
//! [`ShellEvent`] lines. One JSON object per line.

pub use crate::line::LineError;
use crate::line::{from_line, to_line};
use serde::{Deserialize, Serialize};

/// The largest open request. It arrives in one `recvmsg` with the descriptors: the agent
/// reads into a buffer one byte larger, so that a longer request is seen as such instead
/// of being cut.
pub const MAX_OPEN_REQUEST_BYTES: usize = 8191;

/// The longest line the shell may send after the open request (a resize is ~20 bytes).
pub const MAX_CONTROL_LINE_BYTES: usize = 1024;

/// The longest event line the shell reads from the agent.
pub const MAX_EVENT_LINE_BYTES: usize = 64 << 10;

/// The first message: what to run. The account is the peer's UID (SO_PEERCRED), never
/// something the shell says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenRequest {
    /// `$TERM` of the login's terminal.
    pub term: Option<String>,
    /// `-c COMMAND` (`su -c`, `ssh` through a system sshd); a login shell without it.
    pub command: Option<String>,
}

impl OpenRequest {
    /// The request as sent: no newline (it is the only thing in its `sendmsg`).
    /// [`LineError::TooLarge`] when the command is too long to hand over.
    pub fn encode(&self) -> Result<Vec<u8>, LineError> {
        let bytes = serde_json::to_vec(self).map_err(LineError::Malformed)?;
        if bytes.len() > MAX_OPEN_REQUEST_BYTES {
            return Err(LineError::TooLarge {
                limit: MAX_OPEN_REQUEST_BYTES,
            });
        }
        Ok(bytes)
    }

    pub fn decode(payload: &[u8]) -> Result<OpenRequest, LineError> {
        from_line(payload, MAX_OPEN_REQUEST_BYTES)
    }
}

/// What the shell tells the agent after the open request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ShellControl {
    /// The login's terminal changed size (SIGWINCH): `{"resize":[cols,rows]}`.
    Resize(WindowSize),
}

impl ShellControl {
    /// The message as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        to_line(self)
    }

    pub fn decode(line: &[u8]) -> Result<ShellControl, LineError> {
        from_line(line, MAX_CONTROL_LINE_BYTES)
    }
}

/// A terminal's size, in character cells; `[cols, rows]` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "(u16, u16)", into = "(u16, u16)")]
pub struct WindowSize {
    pub cols: u16,
    pub rows: u16,
}

impl From<(u16, u16)> for WindowSize {
    fn from((cols, rows): (u16, u16)) -> WindowSize {
        WindowSize { cols, rows }
    }
}

impl From<WindowSize> for (u16, u16) {
    fn from(size: WindowSize) -> (u16, u16) {
        (size.cols, size.rows)
    }
}

/// What the agent tells the shell.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "EventOnWire", into = "EventOnWire")]
pub enum ShellEvent {
    /// No session: the reason is for the person at the terminal.
    Refused { reason: String },
    /// The session's process exited with this status.
    Exited { status: i32 },
    /// The session's process was killed by this signal.
    Killed { signal: i32 },
}

impl ShellEvent {
    /// The message as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        to_line(self)
    }

    pub fn decode(line: &[u8]) -> Result<ShellEvent, LineError> {
        from_line(line, MAX_EVENT_LINE_BYTES)
    }
}

/// `{"event":"refused","reason":…}` or `{"event":"exit","status":0,"signal":null}`, exactly
/// one of status and signal set.
#[derive(Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum EventOnWire {
    Refused {
        reason: String,
    },
    Exit {
        status: Option<i32>,
        signal: Option<i32>,
    },
}

impl TryFrom<EventOnWire> for ShellEvent {
    type Error = &'static str;

    fn try_from(event: EventOnWire) -> Result<ShellEvent, &'static str> {
        match event {
            EventOnWire::Refused { reason } => Ok(ShellEvent::Refused { reason }),
            EventOnWire::Exit {
                status: Some(status),
                signal: None,
            } => Ok(ShellEvent::Exited { status }),
            EventOnWire::Exit {
                status: None,
                signal: Some(signal),
            } => Ok(ShellEvent::Killed { signal }),
            EventOnWire::Exit { .. } => Err("an exit needs exactly one of status and signal"),
        }
    }
}

impl From<ShellEvent> for EventOnWire {
    fn from(event: ShellEvent) -> EventOnWire {
        match event {
            ShellEvent::Refused { reason } => EventOnWire::Refused { reason },
            ShellEvent::Exited { status } => EventOnWire::Exit {
                status: Some(status),
                signal: None,
            },
            ShellEvent::Killed { signal } => EventOnWire::Exit {
                status: None,
                signal: Some(signal),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_request_survives_the_socket() {
        for request in [
            OpenRequest {
                term: Some("xterm-256color".into()),
                command: None,
            },
            OpenRequest {
                term: None,
                command: Some("id -un; echo 'héllo'".into()),
            },
        ] {
            let payload = request.encode().unwrap();
            assert!(!payload.ends_with(b"\n"));
            assert_eq!(OpenRequest::decode(&payload).unwrap(), request);
        }
        // What older shells send.
        assert_eq!(
            OpenRequest::decode(br#"{"term":"linux","command":null}"#).unwrap(),
            OpenRequest {
                term: Some("linux".into()),
                command: None
            }
        );
    }

    #[test]
    fn events_survive_the_line_and_keep_their_wire_form() {
        for (event, wire) in [
            (
                ShellEvent::Refused {
                    reason: "no live grant".into(),
                },
                r#"{"event":"refused","reason":"no live grant"}"#,
            ),
            (
                ShellEvent::Exited { status: 7 },
                r#"{"event":"exit","status":7,"signal":null}"#,
            ),
            (
                ShellEvent::Killed { signal: 9 },
                r#"{"event":"exit","status":null,"signal":9}"#,
            ),
        ] {
            let line = event.encode();
            assert_eq!(line, format!("{wire}\n").into_bytes());
            assert_eq!(ShellEvent::decode(&line).unwrap(), event);
        }
    }

    #[test]
    fn a_resize_survives_the_line_and_keeps_its_wire_form() {
        let resize = ShellControl::Resize(WindowSize {
            cols: 132,
            rows: 43,
        });
        let line = resize.encode();
        assert_eq!(line, b"{\"resize\":[132,43]}\n");
        assert_eq!(ShellControl::decode(&line).unwrap(), resize);
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for garbage in [
            &b"not json"[..],
            b"",
            b"{\"resize\":null}",
            b"{\"resize\":[1]}",
            b"{\"resize\":[-1,5]}",
            b"{\"resize\":[70000,5]}",
            b"{\"format\":\"disk\"}",
        ] {
            assert!(
                matches!(ShellControl::decode(garbage), Err(LineError::Malformed(_))),
                "{garbage:?}"
            );
        }
        for garbage in [
            &b"{\"event\":\"exit\",\"status\":null,\"signal\":null}"[..],
            b"{\"event\":\"exit\",\"status\":0,\"signal\":9}",
            b"{\"event\":\"exit\"}",
            b"{\"event\":\"explode\"}",
            b"{\"reason\":\"x\"}",
            b"\xff",
        ] {
            let err = ShellEvent::decode(garbage).unwrap_err();
            assert!(matches!(err, LineError::Malformed(_)), "{garbage:?}");
            assert!(err.to_string().starts_with("the message is not understood"));
        }
        assert!(matches!(
            OpenRequest::decode(b"{\"term\":5}"),
            Err(LineError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_input_is_refused_before_it_is_parsed() {
        let long = OpenRequest {
            term: None,
            command: Some("x".repeat(MAX_OPEN_REQUEST_BYTES)),
        };
        assert!(matches!(
            long.encode(),
            Err(LineError::TooLarge { limit }) if limit == MAX_OPEN_REQUEST_BYTES
        ));
        let mut payload = br#"{"term":null,"command":""#.to_vec();
        payload.resize(MAX_OPEN_REQUEST_BYTES + 1, b'x');
        assert!(matches!(
            OpenRequest::decode(&payload),
            Err(LineError::TooLarge { .. })
        ));
        // The longest command that fits is handed over whole.
        let overhead = br#"{"term":null,"command":""}"#.len();
        let longest = OpenRequest {
            term: None,
            command: Some("x".repeat(MAX_OPEN_REQUEST_BYTES - overhead)),
        };
        let payload = longest.encode().unwrap();
        assert_eq!(payload.len(), MAX_OPEN_REQUEST_BYTES);
        assert_eq!(OpenRequest::decode(&payload).unwrap(), longest);

        let mut line = b"{\"resize\":[".to_vec();
        line.resize(MAX_CONTROL_LINE_BYTES + 1, b' ');
        let err = ShellControl::decode(&line).unwrap_err();
        assert!(matches!(err, LineError::TooLarge { .. }), "{err}");
        let mut line = b"{\"event\":\"refused\",\"reason\":\"".to_vec();
        line.resize(MAX_EVENT_LINE_BYTES + 1, b'x');
        assert!(matches!(
            ShellEvent::decode(&line),
            Err(LineError::TooLarge { .. })
        ));
    }
}
