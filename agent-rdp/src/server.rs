//! One RDP connection: IronRDP's server, with the login decided by usherd and the desktop
//! read from the session's X display.
//!
//! Order of things in IronRDP 0.13 (`RdpServer::run_connection`): the display's `size()`
//! first (nobody has logged in yet: a provisional size), the whole connection sequence
//! (the client's credentials arrive in its Client Info PDU), then the credential validator,
//! then `request_initial_size` and `size()` again, then `updates()`. So the validator is
//! where the worker asks usherd and waits; once usherd's desktop is there, the display
//! answers with its real size and, if the client was told another one, the first update
//! resizes the client to it.
//!
//! NLA (CredSSP) is not offered: IronRDP's acceptor runs CredSSP with NTLM against
//! credentials it must hold beforehand (the password or its NT hash), and the
//! credential validator is skipped for Hybrid connections. usherd holds only a crypt(3)
//! hash of the one-time secret, from which NTLM cannot be checked; the delegated
//! password (TSCredentials) arrives only after NTLM has succeeded. A client that insists on
//! NLA gets the X.224 negotiation failure `SSL_REQUIRED_BY_SERVER`.

use crate::link::{EndCause, FromUsherd, Hello, ToUsherd, Verdict};
use crate::record::{DesktopRecorder, RecordError};
use crate::screen::{Input, Screen, XDisplay};
use crate::transport::{ClientStream, StreamNotes};
use anyhow::Context as _;
use ironrdp_displaycontrol::pdu::DisplayControlMonitorLayout;
use ironrdp_pdu::rdp::server_error_info::ProtocolIndependentCode;
use ironrdp_server::tokio_rustls::rustls;
use ironrdp_server::tokio_rustls::TlsAcceptor;
use ironrdp_server::{
    CredentialDecision, CredentialValidationError, CredentialValidator, Credentials, DesktopSize,
    DisplayUpdate, KeyboardEvent, MouseEvent, RdpServer, RdpServerDisplay, RdpServerDisplayUpdates,
    RdpServerInputHandler, ServerEvent, TransportTls,
};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, Notify};
use usher_wire::rdp::{Desktop, FromWorker, Security, MAX_LOGIN_LINE_BYTES};

/// How long IronRDP has to close the connection after being asked to quit.
const QUIT_GRACE: Duration = Duration::from_secs(3);

/// How long a closed connection's socket is drained of the client's last bytes.
const LINGER: Duration = Duration::from_secs(2);

/// How often a running recording is asked whether it has failed (it is asked at each frame
/// as well; this catches a failure while the screen is still).
const RECORDING_CHECK: Duration = Duration::from_millis(250);

/// The size a client is offered before the login when it asks for none IronRDP accepts.
const PROVISIONAL_SIZE: DesktopSize = DesktopSize {
    width: 1024,
    height: 768,
};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("the certificate or key usherd sent is unusable: {0}")]
    Identity(String),
    #[error("usherd allows no security protocol the worker offers (TLS): {0:?}")]
    NoSecurity(Vec<Security>),
    #[error("the RDP connection failed: {0:#}")]
    Rdp(anyhow::Error),
}

/// How the connection ended, when it ended in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The client went away (or IronRDP ended the connection).
    ClientLeft,
    /// usherd refused the login.
    Refused,
    /// The client did not log in within the login grace.
    LoginTimeout,
    /// usherd ended the session.
    Ended { reason: String },
    /// usherd's socket went away.
    UsherdLost,
    /// The recording failed; usherd was told.
    RecordingFailed,
}

pub async fn serve(
    tcp: TcpStream,
    hello: Hello,
    to_usherd: ToUsherd,
    from_usherd: FromUsherd,
) -> Result<Outcome, ServeError> {
    if !hello.security.contains(&Security::Tls) {
        return Err(ServeError::NoSecurity(hello.security));
    }
    if hello.security.contains(&Security::Hybrid) {
        log::info!(
            "NLA (CredSSP) is not offered: NTLM needs the password or its NT hash beforehand, \
             usherd holds a crypt hash; clients must use TLS security"
        );
    }
    let acceptor = tls_acceptor(&hello.cert_pem, &hello.key_pem)?;

    let session = Arc::new(SessionSlot::default());
    let notes = Arc::new(StreamNotes::default());
    let login_sent = Arc::new(Notify::new());
    let (failure_tx, mut recording_failed) = mpsc::unbounded_channel::<RecordError>();
    let max = DesktopSize {
        width: hello.max_width.max(1),
        height: hello.max_height.max(1),
    };
    let validator = UsherdValidator {
        to_usherd: to_usherd.clone(),
        verdict: Mutex::new(Some(from_usherd.verdict)),
        notes: notes.clone(),
        max,
        login_sent: login_sent.clone(),
        session: session.clone(),
    };
    let display = SessionDisplay {
        max,
        session: session.clone(),
        provisional: clamp(PROVISIONAL_SIZE, max),
        to_usherd: to_usherd.clone(),
        failure_tx: failure_tx.clone(),
        client_size: None,
    };
    let input = SessionInput {
        session: session.clone(),
        failure_tx: failure_tx.clone(),
    };
    let local = tcp
        .local_addr()
        .map_err(|error| ServeError::Rdp(anyhow::Error::new(error)))?;

    // No clipboard channel: IronRDP attaches channels before the login, so a per-grant
    // choice cannot be made, and there is no X11 clipboard backend; drives: IronRDP's
    // server has no rdpdr at all. Both stay off whatever the profile allows.
    let mut server = RdpServer::builder()
        .with_addr(local)
        .with_tls(acceptor.clone())
        .with_input_handler(input)
        .with_display_handler(display)
        .with_honor_client_desktop_size(true)
        .with_credential_validator(Some(Arc::new(validator)))
        .build();
    let quit = server.event_sender().clone();

    let stream = ClientStream::new(tcp, acceptor, notes.clone());
    let outcome = {
        let connection = server.run_connection_with(stream, TransportTls::AlreadyDone);
        tokio::pin!(connection);
        let grace = tokio::time::sleep(hello.login_grace);
        tokio::pin!(grace);
        let mut logged_in = false;
        let mut ended = from_usherd.ended;
        let mut recording_check = tokio::time::interval(RECORDING_CHECK);

        let outcome = loop {
            tokio::select! {
                result = &mut connection => {
                    break match result {
                        Ok(()) => Ok(session.outcome_or(Outcome::ClientLeft)),
                        Err(error) => match session.outcome() {
                            // IronRDP reports a refused login as an error; it is the expected end.
                            Some(outcome) => Ok(outcome),
                            None => Err(ServeError::Rdp(error)),
                        },
                    };
                }
                () = login_sent.notified(), if !logged_in => logged_in = true,
                () = &mut grace, if !logged_in => {
                    log::info!("the client did not log in within {:?}", hello.login_grace);
                    break Ok(Outcome::LoginTimeout);
                }
                cause = &mut ended => {
                    let outcome = match cause {
                        Ok(EndCause::Ended { reason }) => {
                            log::info!("usherd ends the session: {reason}");
                            Outcome::Ended { reason }
                        }
                        Ok(EndCause::Lost(error)) => {
                            log::warn!("the socket to usherd: {error}");
                            Outcome::UsherdLost
                        }
                        Err(_) => Outcome::UsherdLost,
                    };
                    finish_connection(&quit, &notes, connection.as_mut(), &outcome).await;
                    break Ok(outcome);
                }
                Some(error) = recording_failed.recv() => {
                    log::error!("the recording failed, ending the session: {error}");
                    session.set_outcome(Outcome::RecordingFailed);
                    let _ = to_usherd.send(FromWorker::RecordFailed { reason: error.to_string() }).await;
                    finish_connection(&quit, &notes, connection.as_mut(), &Outcome::RecordingFailed).await;
                    break Ok(Outcome::RecordingFailed);
                }
                _ = recording_check.tick() => {
                    if let Some(error) = session.recording_failure() {
                        let _ = failure_tx.send(error);
                    }
                }
            }
        };
        outcome
    };
    drop(server);
    if let Some(client) = notes.take_lingering() {
        drain(client).await;
    }

    // The recording's last lines (and its end) go out before the socket closes.
    if let Some(recorder) = session.take_recorder() {
        let finished = tokio::task::spawn_blocking(move || recorder.finish()).await;
        match finished {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                if !matches!(outcome, Ok(Outcome::RecordingFailed)) {
                    log::error!("the recording failed at its end: {error}");
                    let _ = to_usherd
                        .send(FromWorker::RecordFailed {
                            reason: error.to_string(),
                        })
                        .await;
                }
            }
            Err(error) => log::error!("the recording's end did not run: {error}"),
        }
    }
    outcome
}

/// Asks IronRDP to quit (it then closes the stream, which says goodbye when asked) and
/// gives it a moment; after that the connection is dropped, which closes the socket.
async fn finish_connection<F>(
    quit: &mpsc::UnboundedSender<ServerEvent>,
    notes: &StreamNotes,
    connection: std::pin::Pin<&mut F>,
    outcome: &Outcome,
) where
    F: std::future::Future<Output = anyhow::Result<()>>,
{
    // The client is told the server ended the session ("an administrative tool on the
    // server"): RDP carries codes, not text; the reason is in the journal.
    notes.set_farewell(ProtocolIndependentCode::RpcInitiatedDisconnect);
    let _ = quit.send(ServerEvent::Quit(format!("{outcome:?}")));
    if tokio::time::timeout(QUIT_GRACE, connection).await.is_err() {
        log::info!("the connection did not close within {QUIT_GRACE:?}; dropping it");
    }
}

/// Reads what the client still sends, for a moment, so that closing does not reset the
/// connection before the client has read its last PDUs (the goodbye).
async fn drain(mut client: TcpStream) {
    use tokio::io::AsyncReadExt as _;
    let mut buffer = [0u8; 4096];
    let _ = tokio::time::timeout(LINGER, async {
        while matches!(client.read(&mut buffer).await, Ok(n) if n > 0) {}
    })
    .await;
}

fn tls_acceptor(cert_pem: &str, key_pem: &str) -> Result<TlsAcceptor, ServeError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| ServeError::Identity(format!("certificate: {error}")))?;
    if certs.is_empty() {
        return Err(ServeError::Identity("no certificate in the PEM".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|error| ServeError::Identity(format!("key: {error}")))?;
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    // No key log: the default config would honour SSLKEYLOGFILE.
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|error| ServeError::Identity(error.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|error| ServeError::Identity(error.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// A size from the client's monitor layout, as the X screen will take it: within
/// [MS-RDPEDISP]'s 200..=8192 and the largest allowed, the width a multiple of 4 (IronRDP's
/// bitmap encoder wants it).
fn layout_size(width: u32, height: u32, max: DesktopSize) -> DesktopSize {
    let bound = |value: u32, max: u16| {
        let max = u32::from(max).clamp(200, 8192);
        u16::try_from(value.clamp(200, max)).unwrap_or(200)
    };
    DesktopSize {
        width: bound(width, max.width) & !3,
        height: bound(height, max.height),
    }
}

fn clamp(size: DesktopSize, max: DesktopSize) -> DesktopSize {
    DesktopSize {
        width: size.width.clamp(1, max.width),
        height: size.height.clamp(1, max.height),
    }
}

/// The desktop once usherd has given it: shared by the validator (which opens it), the
/// display and the input handler.
#[derive(Default)]
struct SessionSlot {
    inner: Mutex<SlotState>,
}

#[derive(Default)]
struct SlotState {
    session: Option<Session>,
    outcome: Option<Outcome>,
}

struct Session {
    desktop: Desktop,
    screen: Screen,
    input: Input,
    recorder: Option<Arc<DesktopRecorder>>,
}

impl SessionSlot {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set_outcome(&self, outcome: Outcome) {
        self.lock().outcome.get_or_insert(outcome);
    }

    fn outcome(&self) -> Option<Outcome> {
        self.lock().outcome.clone()
    }

    fn outcome_or(&self, default: Outcome) -> Outcome {
        self.outcome().unwrap_or(default)
    }

    fn recording_failure(&self) -> Option<RecordError> {
        let state = self.lock();
        state.session.as_ref()?.recorder.as_ref()?.failure()
    }

    fn take_recorder(&self) -> Option<DesktopRecorder> {
        let recorder = self.lock().session.as_mut()?.recorder.take()?;
        // The display and input handlers are gone with the server; this is the last one.
        Arc::into_inner(recorder)
    }
}

struct UsherdValidator {
    to_usherd: ToUsherd,
    verdict: Mutex<Option<oneshot::Receiver<Verdict>>>,
    notes: Arc<StreamNotes>,
    max: DesktopSize,
    login_sent: Arc<Notify>,
    session: Arc<SessionSlot>,
}

#[derive(Debug, thiserror::Error)]
enum LoginError {
    #[error("the client sent credentials twice")]
    Repeated,
    #[error("usherd is gone")]
    UsherdGone,
    #[error("the desktop usherd gave cannot be opened: {0}")]
    Desktop(String),
}

#[async_trait::async_trait]
impl CredentialValidator for UsherdValidator {
    async fn validate(
        &self,
        credentials: &Credentials,
    ) -> Result<CredentialDecision, CredentialValidationError> {
        let verdict = self
            .verdict
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        let Some(verdict) = verdict else {
            self.notes.deny();
            return Err(CredentialValidationError::new(LoginError::Repeated));
        };
        let requested = self.notes.requested_size().unwrap_or(PROVISIONAL_SIZE);
        let size = clamp(requested, self.max);
        log::info!(
            "login as {:?} (domain {:?}), desktop {}x{} (asked {}x{})",
            credentials.username,
            credentials.domain.as_deref().unwrap_or(""),
            size.width,
            size.height,
            requested.width,
            requested.height
        );
        let login = FromWorker::Login {
            username: credentials.username.clone(),
            password: credentials.password.clone(),
            domain: credentials.domain.clone().unwrap_or_default(),
            width: size.width,
            height: size.height,
        };
        if login.encode().len() > MAX_LOGIN_LINE_BYTES {
            // usherd would refuse the line (and with it this worker); RDP allows user names
            // and passwords far longer than any login here.
            log::info!("the client's credentials are too long to be a login: refused");
            self.notes.deny();
            self.session.set_outcome(Outcome::Refused);
            return Ok(CredentialDecision::Reject);
        }
        if !self.to_usherd.send(login).await {
            self.notes.deny();
            self.session.set_outcome(Outcome::UsherdLost);
            return Err(CredentialValidationError::new(LoginError::UsherdGone));
        }
        self.login_sent.notify_one();
        let desktop = match verdict.await {
            Ok(Verdict::Desktop(desktop)) => *desktop,
            Ok(Verdict::Refused) => {
                log::info!("usherd refused the login");
                self.notes.deny();
                self.session.set_outcome(Outcome::Refused);
                return Ok(CredentialDecision::Reject);
            }
            Err(_) => {
                self.notes.deny();
                self.session.set_outcome(Outcome::UsherdLost);
                return Err(CredentialValidationError::new(LoginError::UsherdGone));
            }
        };
        let to_usherd = self.to_usherd.clone();
        let opened = tokio::task::spawn_blocking(move || open_session(desktop, to_usherd))
            .await
            .map_err(|error| LoginError::Desktop(error.to_string()))
            .and_then(|opened| opened);
        match opened {
            Ok(session) => {
                log::info!(
                    "desktop {} of session {} ({}x{}){}",
                    session.desktop.display,
                    session.desktop.session_id,
                    session.screen.size().0,
                    session.screen.size().1,
                    if session.recorder.is_some() {
                        ", recorded"
                    } else {
                        ""
                    }
                );
                self.session.lock().session = Some(session);
                Ok(CredentialDecision::Accept)
            }
            Err(error) => {
                log::error!("{error}");
                self.notes.deny();
                Err(CredentialValidationError::new(error))
            }
        }
    }
}

/// Connects to the desktop's X server and starts the recording before any of it is shown.
fn open_session(desktop: Desktop, to_usherd: ToUsherd) -> Result<Session, LoginError> {
    let cookie = hex_decode(&desktop.cookie)
        .ok_or_else(|| LoginError::Desktop("the X cookie is not hex".into()))?;
    let display = XDisplay {
        display: desktop.display.clone(),
        cookie,
    };
    let screen = Screen::connect(&display).map_err(|e| LoginError::Desktop(e.to_string()))?;
    // usherd may start the X server larger than asked (Xvfb's RandR can shrink a screen
    // and grow it back, never beyond its start size), so that a client can resize later.
    if screen.size() != (desktop.width, desktop.height) && desktop.width > 0 && desktop.height > 0 {
        match screen.resize(desktop.width, desktop.height) {
            Ok(size) => log::info!("desktop resized to {}x{}", size.0, size.1),
            Err(error) => log::warn!(
                "the desktop stays {}x{}: {error}",
                screen.size().0,
                screen.size().1
            ),
        }
    }
    let input = screen
        .input()
        .map_err(|e| LoginError::Desktop(e.to_string()))?;
    let recorder = desktop.recording.clone().map(|settings| {
        let (width, height) = screen.size();
        let out = to_usherd.clone();
        let recorder = DesktopRecorder::start(
            width,
            height,
            settings,
            Box::new(move |line| {
                if out.send_blocking(FromWorker::Record { line }) {
                    Ok(())
                } else {
                    Err(RecordError::Closed)
                }
            }),
        );
        if desktop.reconnected {
            recorder.marker("reconnected");
        }
        Arc::new(recorder)
    });
    Ok(Session {
        desktop,
        screen,
        input,
        recorder,
    })
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

struct SessionDisplay {
    max: DesktopSize,
    session: Arc<SessionSlot>,
    provisional: DesktopSize,
    to_usherd: ToUsherd,
    failure_tx: mpsc::UnboundedSender<RecordError>,
    /// The size the client was last told (Demand Active), when IronRDP says.
    client_size: Option<DesktopSize>,
}

#[async_trait::async_trait]
impl RdpServerDisplay for SessionDisplay {
    async fn size(&mut self) -> DesktopSize {
        match &self.session.lock().session {
            Some(session) => {
                let (width, height) = session.screen.size();
                DesktopSize { width, height }
            }
            None => self.provisional,
        }
    }

    async fn request_initial_size(&mut self, client_size: DesktopSize) -> DesktopSize {
        self.client_size = Some(client_size);
        self.size().await
    }

    async fn updates(&mut self) -> anyhow::Result<Box<dyn RdpServerDisplayUpdates>> {
        // Fail closed: without a desktop opened by a login usherd accepted, nothing is shown.
        let state = self.session.lock();
        let session = state
            .session
            .as_ref()
            .context("no accepted login: nothing to show")?;
        let (width, height) = session.screen.size();
        let screen_size = DesktopSize { width, height };
        let frames = session
            .screen
            .capture(session.desktop.max_fps)
            .context("capturing the desktop")?;
        let recorder = session.recorder.clone();
        drop(state);
        let resize_first = match self.client_size {
            Some(told) if told != screen_size => {
                log::info!(
                    "the client has {}x{}, the desktop is {}x{}: resizing the client",
                    told.width,
                    told.height,
                    width,
                    height
                );
                Some(DisplayUpdate::Resize(screen_size))
            }
            _ => None,
        };
        // After the resize IronRDP reactivates and asks again; the client then has this size.
        self.client_size = Some(screen_size);
        Ok(Box::new(SessionUpdates {
            frames,
            resize_first,
            recorder,
            to_usherd: self.to_usherd.clone(),
            failure_tx: self.failure_tx.clone(),
            failed: false,
        }))
    }

    /// The client resized its window (display control channel, `/dynamic-resolution`):
    /// the X screen follows, within the largest size allowed and what the X server can do;
    /// the capture then sends the resize, which IronRDP passes on to the client.
    fn request_layout(&mut self, layout: DisplayControlMonitorLayout) {
        let monitors = layout.monitors();
        let Some(primary) = monitors
            .iter()
            .find(|monitor| monitor.is_primary())
            .or(monitors.first())
        else {
            return;
        };
        let (width, height) = primary.dimensions();
        let size = layout_size(width, height, self.max);
        let state = self.session.lock();
        let Some(session) = state.session.as_ref() else {
            return;
        };
        match session.screen.resize(size.width, size.height) {
            Ok((width, height)) => log::info!(
                "the client asked for {}x{}: the desktop is now {width}x{height}",
                size.width,
                size.height
            ),
            Err(error) => log::warn!(
                "the client asked for {}x{}, the desktop cannot: {error}",
                size.width,
                size.height
            ),
        }
    }
}

struct SessionUpdates {
    frames: mpsc::Receiver<DisplayUpdate>,
    resize_first: Option<DisplayUpdate>,
    recorder: Option<Arc<DesktopRecorder>>,
    to_usherd: ToUsherd,
    failure_tx: mpsc::UnboundedSender<RecordError>,
    failed: bool,
}

impl SessionUpdates {
    /// Hands `update` to the recording; false when the recording has failed, in which
    /// case the update must not be shown.
    fn recorded(&mut self, update: &DisplayUpdate) -> bool {
        let Some(recorder) = &self.recorder else {
            return true;
        };
        if let Some(error) = recorder.failure() {
            if !self.failed {
                self.failed = true;
                let _ = self.failure_tx.send(error);
            }
            return false;
        }
        recorder.display(update);
        true
    }
}

#[async_trait::async_trait]
impl RdpServerDisplayUpdates for SessionUpdates {
    async fn next_update(&mut self) -> anyhow::Result<Option<DisplayUpdate>> {
        // Cancel safe: the only await is the channel's `recv`.
        let update = match self.resize_first.take() {
            Some(update) => update,
            None => match self.frames.recv().await {
                Some(update) => update,
                None => {
                    log::info!("the desktop's capture ended");
                    return Ok(None);
                }
            },
        };
        if !self.recorded(&update) {
            // `Ok(None)` ends IronRDP's client loop (an `Err` would only be logged).
            return Ok(None);
        }
        if let DisplayUpdate::Resize(size) = &update {
            let _ = self.to_usherd.try_send(FromWorker::Resized {
                width: size.width,
                height: size.height,
            });
        }
        Ok(Some(update))
    }
}

struct SessionInput {
    session: Arc<SessionSlot>,
    failure_tx: mpsc::UnboundedSender<RecordError>,
}

impl SessionInput {
    /// Records, then plays, an input event; drops it when there is no desktop yet or the
    /// recording has failed (nothing happens on the desktop unrecorded).
    fn play(&mut self, record: impl FnOnce(&DesktopRecorder), play: impl FnOnce(&mut Input)) {
        let mut state = self.session.lock();
        let Some(session) = state.session.as_mut() else {
            return;
        };
        if let Some(recorder) = &session.recorder {
            if let Some(error) = recorder.failure() {
                let _ = self.failure_tx.send(error);
                return;
            }
            record(recorder);
        }
        play(&mut session.input);
    }
}

impl RdpServerInputHandler for SessionInput {
    fn keyboard(&mut self, event: KeyboardEvent) {
        self.play(|r| r.keyboard(&event), |input| input.keyboard(&event));
    }

    fn mouse(&mut self, event: MouseEvent) {
        self.play(|r| r.mouse(&event), |input| input.mouse(&event));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_decode_from_hex_only() {
        assert_eq!(hex_decode("00ff10"), Some(vec![0, 255, 16]));
        assert_eq!(hex_decode("0"), None);
        assert_eq!(hex_decode("zz"), None);
        assert_eq!(hex_decode("é1"), None);
    }

    #[test]
    fn layout_sizes_stay_within_bounds_with_widths_a_multiple_of_four() {
        let max = DesktopSize {
            width: 1920,
            height: 1080,
        };
        let size = |w, h| {
            let s = layout_size(w, h, max);
            (s.width, s.height)
        };
        assert_eq!(size(1023, 767), (1020, 767));
        assert_eq!(size(10, 10), (200, 200));
        assert_eq!(size(u32::MAX, 5000), (1920, 1080));
    }

    #[test]
    fn sizes_are_clamped_to_the_largest_allowed() {
        let max = DesktopSize {
            width: 1920,
            height: 1080,
        };
        let asked = DesktopSize {
            width: 4000,
            height: 600,
        };
        assert_eq!(
            clamp(asked, max),
            DesktopSize {
                width: 1920,
                height: 600
            }
        );
    }
}
