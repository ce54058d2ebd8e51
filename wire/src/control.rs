//! The control socket, between `usher` and `usherd`: one JSON request per line, one JSON
//! answer per line. An answer is `{"ok":true,"data":…}` or
//! `{"ok":false,"error":"what to do","code":"not_root","data":null}`; the data's shape is
//! fixed by the request (see [`Reply`]). Only root may use the socket: any other peer is
//! sent [`Refusal::not_root`] and dropped.

pub use crate::line::LineError;
use crate::line::{from_line, to_line};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The longest request line the agent reads. A grant token is a few KiB; a line longer
/// than this is refused and the connection closed.
pub const MAX_REQUEST_BYTES: usize = 1 << 20;

/// The longest answer line a client reads (a host with thousands of grants stays far below).
pub const MAX_ANSWER_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Answered with [`Installed`].
    Install { token: String },
    /// Answered with a list of [`GrantSummary`].
    List,
    /// Answered with [`Revoked`]. `iss` picks among grants of several issuers that share
    /// the jti.
    Revoke {
        jti: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iss: Option<String>,
    },
    /// Answered with [`Status`].
    Status,
    /// Answered with a list of [`SessionSummary`].
    Sessions,
    /// Answered with a list of [`crate::approval::CommandStatus`]: pending and recent.
    Approvals,
    /// Answered with the request's [`crate::approval::CommandStatus`] after the decision.
    /// The approver is the peer (its uid's name, or `as_user` from `SUDO_USER`).
    Decide {
        id: String,
        approve: bool,
        #[serde(default)]
        comment: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        as_user: Option<String>,
    },
}

impl Request {
    /// The request as one line, newline included.
    pub fn encode(&self) -> Vec<u8> {
        to_line(self)
    }

    /// One request line (its newline optional). Unknown operations and garbage are
    /// [`LineError::Malformed`]; a line over [`MAX_REQUEST_BYTES`] is
    /// [`LineError::TooLarge`].
    pub fn decode(line: &[u8]) -> Result<Request, LineError> {
        from_line(line, MAX_REQUEST_BYTES)
    }
}

/// `usher grant install`: the grant the agent now holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    pub jti: String,
    pub iss: String,
    pub login: String,
    /// Unix time, seconds.
    pub expires_at: i64,
}

/// `usher grant list`: one grant the agent holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantSummary {
    pub jti: String,
    pub iss: String,
    pub sub: String,
    pub login: String,
    /// The profile in force (the grant's, or the local default).
    pub profile: String,
    /// Unix time, seconds.
    pub expires_at: i64,
    pub remaining_secs: i64,
    /// How many SSH keys the grant binds.
    pub ssh_keys: usize,
}

/// `usher grant revoke`: which grant is revoked, and whether the agent held it (a grant
/// not seen yet is revoked ahead of its arrival).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    pub jti: String,
    pub iss: String,
    pub was_live: bool,
}

/// `usher sessions`: one live session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub id: String,
    pub kind: SessionKind,
    pub jti: String,
    pub iss: String,
    pub login: String,
    /// Unix time, seconds.
    pub started_at: i64,
    /// False once the main process ended but processes it left still run.
    pub attached: bool,
    /// Execs seen in the session.
    pub commands: u64,
}

/// The front end a session came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    Ssh,
    Console,
    Rdp,
}

/// `usher status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Status {
    /// The agent's version.
    pub version: String,
    pub host: String,
    pub enforcement: EnforcementStatus,
    /// How many grants the agent holds.
    pub grants: usize,
    /// How many sessions are live.
    pub sessions: usize,
    /// The accounts the agent made and holds.
    pub accounts: Vec<String>,
    /// In usher's fence (prefix and UID range) but not made by it: left alone, and no
    /// grant opens them. An administrator should look at each.
    pub unmanaged_accounts: Vec<UnmanagedAccount>,
    pub spool: SpoolStatus,
    pub collector: CollectorStatus,
    /// Unix time, seconds.
    pub up_since: i64,
    /// The RDP listener's certificate, when RDP is on: SHA-256 of its DER, hex pairs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rdp_certificate: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnforcementStatus {
    pub mode: EnforcementMode,
    /// The kernel mechanism in use, and why not a better one, in words.
    pub path: String,
    /// Exec events the kernel could not hand over, since start-up.
    pub lost_events: u64,
}

/// `enforcement = "required" | "best-effort" | "off"` in the agent's configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum EnforcementMode {
    Required,
    BestEffort,
    Off,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmanagedAccount {
    pub name: String,
    pub uid: u32,
    pub home: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpoolStatus {
    /// Bytes of recordings waiting in the spool.
    pub bytes: u64,
    /// Sessions with files in the spool.
    pub sessions: usize,
    pub max_bytes: u64,
}

/// Shipping to the collector: `{"configured":false}` when there is none.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CollectorStatus {
    pub configured: bool,
    #[serde(flatten)]
    pub shipping: Option<Shipping>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shipping {
    /// Unknown until the first round.
    pub reachable: Option<bool>,
    pub backlog_sessions: usize,
    pub last_error: Option<String>,
}

/// What the agent answers, by request. On the wire only the data is sent: the client
/// knows what it asked and decodes the data as that request's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Reply {
    Installed(Installed),
    Grants(Vec<GrantSummary>),
    Revoked(Revoked),
    Status(Box<Status>),
    Sessions(Vec<SessionSummary>),
    Approvals(Vec<crate::approval::CommandStatus>),
    Decided(Box<crate::approval::CommandStatus>),
}

/// A request the agent did not carry out, with the message for the person who asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub kind: RefusalKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusalKind {
    /// The peer is not root; nothing it sent was read.
    NotRoot,
    /// The request line was not a request.
    BadRequest,
    /// The request line was longer than [`MAX_REQUEST_BYTES`]; the connection is closed.
    TooLarge,
    /// The grant did not verify, or local policy refuses it.
    GrantRefused,
    /// The grant is held, but its console account could not be prepared.
    ConsoleNotReady,
    /// The revocation could not be carried out (an ambiguous jti, a failed write).
    RevokeFailed,
    /// No such pending request, or this caller may not decide it (its own command, or a
    /// caller inside a session).
    ApprovalRefused,
    /// The agent could not put its answer into words (a bug).
    Internal,
    /// A kind this client does not know (a newer agent), or none (an older one).
    #[serde(other)]
    Unknown,
}

impl Refusal {
    pub fn new(kind: RefusalKind, message: impl Into<String>) -> Refusal {
        Refusal {
            kind,
            message: message.into(),
        }
    }

    /// Sent to any peer but root, before anything it sends is read.
    pub fn not_root() -> Refusal {
        Refusal::new(
            RefusalKind::NotRoot,
            "only root may use the control socket (run usher with sudo)",
        )
    }

    /// The answer to a request line that did not decode.
    pub fn bad_request(why: &LineError) -> Refusal {
        match why {
            LineError::TooLarge { .. } => Refusal::new(RefusalKind::TooLarge, why.to_string()),
            LineError::Malformed(e) => {
                Refusal::new(RefusalKind::BadRequest, format!("bad request: {e}"))
            }
        }
    }
}

/// One answer: what was asked for, or why not.
pub type Answer = Result<Reply, Refusal>;

/// The answer as one line, newline included.
pub fn encode_answer(answer: &Answer) -> Vec<u8> {
    let envelope = match answer {
        Ok(reply) => Envelope {
            ok: true,
            error: None,
            code: None,
            data: Some(reply),
        },
        Err(refusal) => Envelope {
            ok: false,
            error: Some(refusal.message.clone()),
            code: Some(refusal.kind),
            data: None,
        },
    };
    match serde_json::to_vec(&envelope) {
        Ok(mut line) => {
            line.push(b'\n');
            line
        }
        // Only a map with non-string keys fails to serialise, and no answer holds one.
        Err(e) => encode_answer(&Err(Refusal::new(
            RefusalKind::Internal,
            format!("the agent could not encode its answer: {e}"),
        ))),
    }
}

/// One answer line, its data read as the answer to the request the client sent (`T` is
/// that request's answer type: [`Installed`], `Vec<GrantSummary>`, …).
pub fn decode_answer<T: DeserializeOwned>(line: &[u8]) -> Result<Result<T, Refusal>, LineError> {
    let envelope: Envelope<serde_json::Value> = from_line(line, MAX_ANSWER_BYTES)?;
    if envelope.ok {
        let data = envelope.data.unwrap_or(serde_json::Value::Null);
        return Ok(Ok(
            serde_json::from_value(data).map_err(LineError::Malformed)?
        ));
    }
    Ok(Err(Refusal {
        kind: envelope.code.unwrap_or(RefusalKind::Unknown),
        message: envelope
            .error
            .unwrap_or_else(|| "usherd refused without saying why".into()),
    }))
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<D> {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    code: Option<RefusalKind>,
    #[serde(default)]
    data: Option<D>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status() -> Status {
        Status {
            version: "0.1.0".into(),
            host: "web-1".into(),
            enforcement: EnforcementStatus {
                mode: EnforcementMode::BestEffort,
                path: "bpf-lsm (execs and executable mappings)".into(),
                lost_events: 3,
            },
            grants: 2,
            sessions: 1,
            accounts: vec!["jit-alice".into()],
            unmanaged_accounts: vec![UnmanagedAccount {
                name: "jit-old".into(),
                uid: 60001,
                home: "/home/jit-old".into(),
            }],
            spool: SpoolStatus {
                bytes: 4096,
                sessions: 1,
                max_bytes: 1 << 30,
            },
            collector: CollectorStatus {
                configured: true,
                shipping: Some(Shipping {
                    reachable: Some(false),
                    backlog_sessions: 2,
                    last_error: Some("collector unreachable: refused".into()),
                }),
            },
            up_since: 1_700_000_000,
            rdp_certificate: Some("AB:CD".into()),
        }
    }

    fn round_trip<T: DeserializeOwned>(reply: Reply) -> T {
        let line = encode_answer(&Ok(reply));
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        decode_answer::<T>(&line).unwrap().unwrap()
    }

    #[test]
    fn every_request_survives_the_line() {
        for request in [
            Request::Install {
                token: "eyJ.a.b".into(),
            },
            Request::List,
            Request::Revoke {
                jti: "j1".into(),
                iss: None,
            },
            Request::Revoke {
                jti: "j1".into(),
                iss: Some("https://idp".into()),
            },
            Request::Status,
            Request::Sessions,
        ] {
            let line = request.encode();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(Request::decode(&line).unwrap(), request);
        }
    }

    #[test]
    fn requests_keep_their_wire_names() {
        assert_eq!(Request::Status.encode(), b"{\"op\":\"status\"}\n");
        assert_eq!(
            Request::decode(br#"{"op":"revoke","jti":"x"}"#).unwrap(),
            Request::Revoke {
                jti: "x".into(),
                iss: None
            }
        );
    }

    #[test]
    fn every_reply_survives_the_line() {
        let installed = Installed {
            jti: "j1".into(),
            iss: "i".into(),
            login: "jit-a".into(),
            expires_at: 5,
        };
        assert_eq!(
            round_trip::<Installed>(Reply::Installed(installed.clone())),
            installed
        );
        let grants = vec![GrantSummary {
            jti: "j1".into(),
            iss: "i".into(),
            sub: "alice@example.com".into(),
            login: "jit-a".into(),
            profile: "default".into(),
            expires_at: 5,
            remaining_secs: 0,
            ssh_keys: 1,
        }];
        assert_eq!(
            round_trip::<Vec<GrantSummary>>(Reply::Grants(grants.clone())),
            grants
        );
        let revoked = Revoked {
            jti: "j1".into(),
            iss: "i".into(),
            was_live: true,
        };
        assert_eq!(
            round_trip::<Revoked>(Reply::Revoked(revoked.clone())),
            revoked
        );
        assert_eq!(
            round_trip::<Status>(Reply::Status(Box::new(status()))),
            status()
        );
        let sessions = vec![SessionSummary {
            id: "20260101T000000Z-0000002a".into(),
            kind: SessionKind::Console,
            jti: "j1".into(),
            iss: "i".into(),
            login: "jit-a".into(),
            started_at: 7,
            attached: false,
            commands: 12,
        }];
        assert_eq!(
            round_trip::<Vec<SessionSummary>>(Reply::Sessions(sessions.clone())),
            sessions
        );
        assert_eq!(
            round_trip::<Vec<SessionSummary>>(Reply::Sessions(vec![])),
            vec![]
        );
    }

    #[test]
    fn an_unconfigured_collector_is_one_field() {
        let mut s = status();
        s.collector = CollectorStatus {
            configured: false,
            shipping: None,
        };
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["collector"], serde_json::json!({"configured": false}));
        assert_eq!(json["enforcement"]["mode"], "best-effort");
        assert_eq!(round_trip::<Status>(Reply::Status(Box::new(s.clone()))), s);
        // A configured one before its first round: reachability unknown.
        s.collector = CollectorStatus {
            configured: true,
            shipping: Some(Shipping {
                reachable: None,
                backlog_sessions: 0,
                last_error: None,
            }),
        };
        assert_eq!(round_trip::<Status>(Reply::Status(Box::new(s.clone()))), s);
    }

    #[test]
    fn a_refusal_keeps_its_kind_and_its_words() {
        let line = encode_answer(&Err(Refusal::not_root()));
        let text = String::from_utf8(line.clone()).unwrap();
        // What a peer that does not speak the protocol sees (tests read it as text).
        assert!(text.starts_with("{\"ok\":false,"), "{text}");
        assert!(text.contains("only root"), "{text}");
        let refusal = decode_answer::<Status>(&line).unwrap().unwrap_err();
        assert_eq!(refusal.kind, RefusalKind::NotRoot);
        assert_eq!(refusal, Refusal::not_root());
    }

    #[test]
    fn a_refusal_from_an_older_or_newer_agent_is_unknown_not_an_error() {
        let old = decode_answer::<Status>(
            br#"{"ok":false,"error":"grant refused: expired","data":null}"#,
        )
        .unwrap()
        .unwrap_err();
        assert_eq!(old.kind, RefusalKind::Unknown);
        assert_eq!(old.message, "grant refused: expired");
        let newer = decode_answer::<Status>(br#"{"ok":false,"error":"busy","code":"try_later"}"#)
            .unwrap()
            .unwrap_err();
        assert_eq!(newer.kind, RefusalKind::Unknown);
        let silent = decode_answer::<Status>(br#"{"ok":false}"#)
            .unwrap()
            .unwrap_err();
        assert!(!silent.message.is_empty());
    }

    #[test]
    fn garbage_is_a_clear_error() {
        for garbage in [
            &b"not json at all"[..],
            b"",
            b"\n",
            b"{\"op\":\"format_disk\"}",
            b"{\"op\":\"install\"}",
            b"[1,2,3]",
            b"{\"op\":\"status\"}{\"op\":\"list\"}",
            b"\xff\xfe",
        ] {
            let err = Request::decode(garbage).unwrap_err();
            assert!(matches!(err, LineError::Malformed(_)), "{garbage:?}: {err}");
            let refusal = Refusal::bad_request(&err);
            assert_eq!(refusal.kind, RefusalKind::BadRequest);
            assert!(refusal.message.starts_with("bad request: "), "{refusal}");
        }
        // An answer whose data is not what was asked for.
        let line = encode_answer(&Ok(Reply::Grants(vec![])));
        assert!(matches!(
            decode_answer::<Status>(&line),
            Err(LineError::Malformed(_))
        ));
        assert!(matches!(
            decode_answer::<Status>(b"garbage"),
            Err(LineError::Malformed(_))
        ));
    }

    #[test]
    fn oversized_input_is_refused_before_it_is_parsed() {
        let mut line = br#"{"op":"install","token":""#.to_vec();
        line.resize(MAX_REQUEST_BYTES + 1, b'a');
        let err = Request::decode(&line).unwrap_err();
        assert!(
            matches!(err, LineError::TooLarge { limit } if limit == MAX_REQUEST_BYTES),
            "{err}"
        );
        assert_eq!(Refusal::bad_request(&err).kind, RefusalKind::TooLarge);
        assert!(err.to_string().contains(&MAX_REQUEST_BYTES.to_string()));
        // Exactly the limit, plus its newline, is still a request.
        let token_len = MAX_REQUEST_BYTES - br#"{"op":"install","token":""}"#.len();
        let request = Request::Install {
            token: "a".repeat(token_len),
        };
        let line = request.encode();
        assert_eq!(line.len(), MAX_REQUEST_BYTES + 1);
        assert_eq!(Request::decode(&line).unwrap(), request);

        let mut answer = b"{\"ok\":true,\"data\":\"".to_vec();
        answer.resize(MAX_ANSWER_BYTES + 1, b'a');
        assert!(matches!(
            decode_answer::<String>(&answer),
            Err(LineError::TooLarge { .. })
        ));
    }
}
