//! The SSH server: authentication from grants, and session channels handed to
//! `session::run`.

use super::SshOptions;
use crate::config::SshConfig;
use crate::grant::{Grant, GrantId};
use crate::session::{
    self, ClientIo, ClientSink, Control, Core, ExitOutcome, PtySpec, SessionCommand,
    SessionRequest, CONTROL_QUEUE,
};
use crate::system::signal;
use bytes::Bytes;
use russh::keys::PublicKey;
use russh::server::{Auth, Handle, Msg, Response, Session};
use russh::{Channel, ChannelId, ChannelWriteHalf, MethodKind, MethodSet, Sig};
use std::borrow::Cow;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};

/// The russh server settings every connection shares.
pub fn settings(ssh: &SshConfig, host_key: russh::keys::PrivateKey) -> Arc<russh::server::Config> {
    let mut methods = MethodSet::empty();
    methods.push(MethodKind::PublicKey);
    methods.push(MethodKind::KeyboardInteractive);
    methods.push(MethodKind::Password);
    Arc::new(russh::server::Config {
        server_id: russh::SshId::Standard(Cow::Borrowed(concat!(
            "SSH-2.0-Usher_",
            env!("CARGO_PKG_VERSION")
        ))),
        methods,
        auth_rejection_time: Duration::from_millis(500),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key],
        inactivity_timeout: Some(Duration::from_secs(ssh.idle_timeout_secs)),
        keepalive_interval: Some(Duration::from_secs(60)),
        max_auth_attempts: 6,
        nodelay: true,
        window_size: 8 * 1024 * 1024,
        ..Default::default()
    })
}

pub(super) struct Connection<C> {
    core: Arc<C>,
    options: Arc<SshOptions>,
    peer: Option<SocketAddr>,
    grant: Option<Grant>,
    channels: HashMap<ChannelId, ChannelState>,
    /// Tells the listener which grant this connection authenticated with.
    authenticated: watch::Sender<Option<GrantId>>,
}

#[derive(Default)]
struct ChannelState {
    /// Output goes through the channel's own writers, which wait for the client's
    /// window: a client that reads nothing stops the session's output, and nothing
    /// piles up in the agent's memory or in the recording.
    writer: Option<ChannelWriteHalf<Msg>>,
    pty: Option<PtySpec>,
    env: Vec<(String, String)>,
    stdin: Option<mpsc::Sender<Bytes>>,
    control: Option<mpsc::Sender<Control>>,
    started: bool,
}

type ChannelWriter = Box<dyn tokio::io::AsyncWrite + Send + Sync + Unpin>;

struct SshSink {
    handle: Handle,
    channel: ChannelId,
    stdout: tokio::sync::Mutex<ChannelWriter>,
    stderr: tokio::sync::Mutex<ChannelWriter>,
}

impl ClientSink for SshSink {
    async fn stdout(&self, data: Bytes) -> bool {
        self.stdout.lock().await.write_all(&data).await.is_ok()
    }

    async fn stderr(&self, data: Bytes) -> bool {
        self.stderr.lock().await.write_all(&data).await.is_ok()
    }

    async fn finish(&self, outcome: ExitOutcome) {
        match outcome {
            ExitOutcome::Status(s) => {
                let _ = self
                    .handle
                    .exit_status_request(self.channel, s as u32)
                    .await;
            }
            ExitOutcome::Signal(s) => {
                let _ = self
                    .handle
                    .exit_signal_request(
                        self.channel,
                        to_sig(s),
                        false,
                        String::new(),
                        String::new(),
                    )
                    .await;
            }
        }
        let _ = self.handle.eof(self.channel).await;
        let _ = self.handle.close(self.channel).await;
    }
}

/// A signal for an "exit-signal" message. russh writes a custom signal's name as given, so
/// every name goes out as SSH spells it.
fn to_sig(s: i32) -> Sig {
    Sig::Custom(signal::ssh_name_or_number(s))
}

/// The number of the signal a "signal" request names, if SSH names it.
fn from_sig(s: &Sig) -> Option<i32> {
    let name = match s {
        Sig::ABRT => "ABRT",
        Sig::ALRM => "ALRM",
        Sig::FPE => "FPE",
        Sig::HUP => "HUP",
        Sig::ILL => "ILL",
        Sig::INT => "INT",
        Sig::KILL => "KILL",
        Sig::PIPE => "PIPE",
        Sig::QUIT => "QUIT",
        Sig::SEGV => "SEGV",
        Sig::TERM => "TERM",
        Sig::USR1 => "USR1",
        Sig::Custom(name) => name,
    };
    signal::from_ssh_name(name).map(|s| s as i32)
}

impl<C: Core> Connection<C> {
    pub(super) fn new(
        core: Arc<C>,
        options: Arc<SshOptions>,
        peer: Option<SocketAddr>,
        authenticated: watch::Sender<Option<GrantId>>,
    ) -> Connection<C> {
        Connection {
            core,
            options,
            peer,
            grant: None,
            channels: HashMap::new(),
            authenticated,
        }
    }

    fn accept(&mut self, grant: Grant) -> Auth {
        self.authenticated.send_replace(Some(grant.id()));
        self.grant = Some(grant);
        Auth::Accept
    }

    /// The connection's grant, if it still lives: checked at every channel open, so
    /// nothing new starts under a grant that is ending.
    fn live_grant(&self) -> Option<&Grant> {
        self.grant.as_ref().filter(|g| self.core.is_live(&g.id()))
    }

    fn peer_string(&self) -> String {
        self.peer
            .map(|p| p.to_string())
            .unwrap_or_else(|| "?".into())
    }

    /// A grant presented at the password or keyboard-interactive prompt.
    async fn presented(&mut self, user: &str, token: &str) -> Auth {
        let how = format!("ssh-password from {}", self.peer_string());
        match self.core.admit_presented(user, token, &how).await {
            Ok(g) if g.login() == user => self.accept(g),
            Ok(g) => {
                log::warn!(target: "usher::audit", usher_event = "grant_refused", jti = g.jti(); "grant {} is for {}, not {user}", g.jti(), g.login());
                Auth::reject()
            }
            Err(_) => Auth::reject(),
        }
    }

    fn accepts_env(&self, name: &str) -> bool {
        self.options
            .config
            .accept_env
            .iter()
            .any(|pat| match pat.strip_suffix('*') {
                Some(prefix) => name.starts_with(prefix),
                None => pat == name,
            })
    }

    async fn start(
        &mut self,
        channel: ChannelId,
        command: SessionCommand,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(grant) = self.live_grant().cloned() else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        let Some(state) = self.channels.get_mut(&channel) else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        if state.started {
            session.channel_failure(channel)?;
            return Ok(());
        }
        let Some(writer) = state.writer.take() else {
            session.channel_failure(channel)?;
            return Ok(());
        };
        state.started = true;
        let (stdin_tx, stdin_rx) = mpsc::channel(64);
        // Bounded: a client that floods window changes or signals while its session waits
        // on it loses the surplus instead of growing the agent.
        let (control_tx, control_rx) = mpsc::channel(CONTROL_QUEUE);
        state.stdin = Some(stdin_tx);
        state.control = Some(control_tx);
        let request = SessionRequest {
            kind: session::SessionKind::Ssh,
            command,
            pty: state.pty.clone(),
            env: state.env.clone(),
            peer: self.peer.map(|p| p.to_string()),
        };
        session.channel_success(channel)?;
        let sink = Arc::new(SshSink {
            handle: session.handle(),
            channel,
            stdout: tokio::sync::Mutex::new(Box::new(writer.make_writer())),
            stderr: tokio::sync::Mutex::new(Box::new(writer.make_writer_ext(Some(1)))),
        });
        tokio::spawn(session::run(
            self.core.clone(),
            grant,
            request,
            ClientIo {
                stdin: stdin_rx,
                control: control_rx,
                sink,
                desktop: None,
            },
        ));
        Ok(())
    }
}

impl<C: Core> russh::server::Handler for Connection<C> {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        user: &str,
        key: &PublicKey,
    ) -> Result<Auth, Self::Error> {
        Ok(match self.core.grant_for_key(user, key) {
            Some(_) => Auth::Accept,
            None => Auth::reject(),
        })
    }

    async fn auth_publickey(&mut self, user: &str, key: &PublicKey) -> Result<Auth, Self::Error> {
        // Called after the client proved it holds the key.
        match self.core.grant_for_key(user, key) {
            Some(g) => {
                log::info!(target: "usher::audit", usher_event = "login", jti = g.jti(), login = user, method = "publickey"; "{user} logged in with a key bound to grant {} from {}", g.jti(), self.peer_string());
                Ok(self.accept(g))
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn auth_password(&mut self, user: &str, password: &str) -> Result<Auth, Self::Error> {
        Ok(self.presented(user, password).await)
    }

    async fn auth_keyboard_interactive<'a>(
        &'a mut self,
        user: &str,
        _submethods: &str,
        response: Option<Response<'a>>,
    ) -> Result<Auth, Self::Error> {
        match response {
            None => Ok(Auth::Partial {
                name: Cow::Borrowed("Usher"),
                instructions: Cow::Borrowed("Present your access grant."),
                prompts: Cow::Owned(vec![(Cow::Borrowed("Grant: "), false)]),
            }),
            Some(mut answers) => {
                let token = answers
                    .next()
                    .map(|b| String::from_utf8_lossy(&b).into_owned())
                    .unwrap_or_default();
                Ok(self.presented(user, &token).await)
            }
        }
    }

    async fn authentication_banner(&mut self) -> Result<Option<String>, Self::Error> {
        Ok(None)
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        if self.live_grant().is_none() || self.channels.len() >= 10 {
            return Ok(false);
        }
        // Data arrives through the `data` callback; the read half is not read, and
        // dropping it keeps russh from queueing messages for it.
        let (_, writer) = channel.split();
        self.channels.insert(
            writer.id(),
            ChannelState {
                writer: Some(writer),
                ..Default::default()
            },
        );
        Ok(true)
    }

    async fn channel_open_direct_tcpip(
        &mut self,
        channel: Channel<Msg>,
        host: &str,
        port: u32,
        _originator: &str,
        _originator_port: u32,
        _session: &mut Session,
    ) -> Result<bool, Self::Error> {
        let Some(grant) = self.live_grant() else {
            return Ok(false);
        };
        let profile = self.core.profile(&grant.profile);
        if !profile.port_forwarding || port > 65535 {
            log::info!(target: "usher::audit", usher_event = "forward_refused", jti = grant.jti(), target = format!("{host}:{port}").as_str(); "port forwarding to {host}:{port} refused by profile {}", profile.name);
            return Ok(false);
        }
        log::info!(target: "usher::audit", usher_event = "forward_opened", jti = grant.jti(), target = format!("{host}:{port}").as_str(); "forwarding to {host}:{port} for grant {}", grant.jti());
        let target = (host.to_string(), port as u16);
        tokio::spawn(async move {
            if let Ok(mut tcp) = tokio::net::TcpStream::connect(target).await {
                let mut stream = channel.into_stream();
                let _ = tokio::io::copy_bidirectional(&mut stream, &mut tcp).await;
            }
        });
        Ok(true)
    }

    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = term.len() <= 64 && term.chars().all(|c| c.is_ascii_graphic());
        match self.channels.get_mut(&channel) {
            Some(state) if ok && !state.started => {
                state.pty = Some(PtySpec {
                    term: term.to_string(),
                    // 0 means "unknown" (a client without a terminal of its own).
                    cols: if cols == 0 { 80 } else { cols.min(1000) as u16 },
                    rows: if rows == 0 { 24 } else { rows.min(1000) as u16 },
                });
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let ok = self.accepts_env(name) && value.len() <= 4096 && !value.contains('\0');
        match self.channels.get_mut(&channel) {
            Some(state) if ok && state.env.len() < 64 => {
                state.env.push((name.to_string(), value.to_string()));
                session.channel_success(channel)?;
            }
            _ => session.channel_failure(channel)?,
        }
        Ok(())
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.start(channel, SessionCommand::Shell, session).await
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match std::str::from_utf8(data) {
            Ok(cmd) if !cmd.contains('\0') => {
                self.start(channel, SessionCommand::Exec(cmd.to_string()), session)
                    .await
            }
            _ => {
                session.channel_failure(channel)?;
                Ok(())
            }
        }
    }

    async fn subsystem_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        match (name, self.options.sftp_server.clone()) {
            ("sftp", Some(program)) => {
                self.start(channel, SessionCommand::Subsystem(program), session)
                    .await
            }
            _ => {
                session.channel_failure(channel)?;
                Ok(())
            }
        }
    }

    /// X11 forwarding is never set up: the client is told so (russh's default sends no
    /// answer at all, and OpenSSH would take the next reply for this one).
    async fn x11_request(
        &mut self,
        channel: ChannelId,
        _single_connection: bool,
        _x11_auth_protocol: &str,
        _x11_auth_cookie: &str,
        _x11_screen_number: u32,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(grant) = self.grant.as_ref() {
            log::info!(target: "usher::audit", usher_event = "forward_refused", jti = grant.jti(), target = "x11"; "X11 forwarding refused for grant {}", grant.jti());
        }
        session.channel_failure(channel)?;
        Ok(())
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        _pix_width: u32,
        _pix_height: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&channel) {
            let (cols, rows) = (cols.clamp(1, 1000) as u16, rows.clamp(1, 1000) as u16);
            if let Some(c) = &state.control {
                let _ = c.try_send(Control::Resize(cols, rows));
            } else if let Some(p) = &mut state.pty {
                p.cols = cols;
                p.rows = rows;
            }
        }
        Ok(())
    }

    async fn signal(
        &mut self,
        channel: ChannelId,
        signal: Sig,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let (Some(state), Some(sig)) = (self.channels.get(&channel), from_sig(&signal)) {
            if let Some(c) = &state.control {
                let _ = c.try_send(Control::Signal(sig));
            }
        }
        Ok(())
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.channels.get(&channel).and_then(|s| s.stdin.clone()) {
            let _ = tx.send(Bytes::copy_from_slice(data)).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(state) = self.channels.get_mut(&channel) {
            state.stdin = None;
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&channel);
        Ok(())
    }
}
