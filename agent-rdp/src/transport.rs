//! The client's connection as IronRDP sees it. The worker does the TLS handshake itself
//! (IronRDP runs with `TransportTls::AlreadyDone`) so that it sees the plaintext on both
//! sides of IronRDP, for two things IronRDP 0.13 keeps to itself:
//!
//! - the desktop size the client asks for (GCC Client Core Data, in the MCS Connect
//!   Initial), which the login to usherd carries, while IronRDP only tells the display
//!   handler after the credentials are checked;
//! - a goodbye when usherd ends the session: IronRDP's `ServerEvent::Quit` only closes the
//!   stream, so the worker writes a Set Error Info PDU (the client shows why) and an MCS
//!   Disconnect Provider Ultimatum before the TLS close, when no PDU is half written.
//!
//! The stream: plaintext until IronRDP has written its X.224 Connection Confirm (the one
//! PDU before TLS), then the TLS handshake, then TLS.

use ironrdp_pdu::mcs::{self, DisconnectProviderUltimatum, SendDataIndication};
use ironrdp_pdu::nego;
use ironrdp_pdu::rdp::client_info::CompressionType;
use ironrdp_pdu::rdp::headers::{
    CompressionFlags, ShareControlHeader, ShareControlPdu, ShareDataHeader, ShareDataPdu,
    StreamPriority,
};
use ironrdp_pdu::rdp::server_error_info::{
    ErrorInfo, ProtocolIndependentCode, ServerSetErrorInfoPdu,
};
use ironrdp_pdu::x224::{X224Data, X224};
use ironrdp_server::tokio_rustls::server::TlsStream;
use ironrdp_server::tokio_rustls::{Accept, TlsAcceptor};
use ironrdp_server::DesktopSize;
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd as _;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// IronRDP's acceptor gives every connection these MCS channels (ironrdp-acceptor 0.10,
/// `USER_CHANNEL_ID` and `IO_CHANNEL_ID`, private there).
const USER_CHANNEL_ID: u16 = 1002;
const IO_CHANNEL_ID: u16 = 1003;

/// A TPKT is at most this long (its length is 16 bits).
const MAX_TPKT_BYTES: usize = u16::MAX as usize;

/// What the worker learns from the stream and asks of it, shared with the server.
#[derive(Default)]
pub struct StreamNotes {
    inner: Mutex<Notes>,
}

#[derive(Default)]
struct Notes {
    requested_size: Option<DesktopSize>,
    farewell: Option<ProtocolIndependentCode>,
    /// The login was refused: the client gets "access denied" and nothing else.
    denied: bool,
    /// The client's socket after IronRDP let go of it, write side shut, for the server to
    /// drain: closing a socket with unread input resets the connection, and the client
    /// would lose the goodbye it has not read yet.
    lingering: Option<TcpStream>,
}

impl StreamNotes {
    /// The size in the client's Client Core Data, once it has arrived.
    pub fn requested_size(&self) -> Option<DesktopSize> {
        self.lock().requested_size
    }

    /// Say `code` to the client before closing, if the stream allows and nothing else is to
    /// be said.
    pub fn set_farewell(&self, code: ProtocolIndependentCode) {
        self.lock().farewell.get_or_insert(code);
    }

    /// The client's socket, once the connection is over, if it is still open.
    pub fn take_lingering(&self) -> Option<TcpStream> {
        self.lock().lingering.take()
    }

    /// The login is refused: from the next write on, the client is sent Server Denied
    /// Connection (in place of what IronRDP writes for it) and nothing more.
    pub fn deny(&self) {
        let mut notes = self.lock();
        notes.farewell = Some(ProtocolIndependentCode::ServerDeniedConnection);
        notes.denied = true;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Notes> {
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

enum State {
    Plain(TcpStream),
    Handshaking(Pin<Box<Accept<TcpStream>>>),
    Tls(Box<TlsStream<TcpStream>>),
    /// The handshake failed; the error was returned once.
    Broken,
}

pub struct ClientStream {
    state: State,
    acceptor: TlsAcceptor,
    notes: Arc<StreamNotes>,
    /// Where IronRDP's output stands in its PDUs: the confirm before TLS, and whether a
    /// goodbye can go in between two PDUs.
    outgoing: PduFraming,
    /// The client's X.224 Connection Request, until read.
    connection_request: Option<Vec<u8>>,
    /// The client offered NLA (CredSSP), which the worker does not: the usual reason a
    /// client then drops the TLS handshake.
    offered_nla: bool,
    offered_tls: bool,
    /// The first TLS-protected PDU the client sends (the MCS Connect Initial), until read.
    first_pdu: Option<Vec<u8>>,
    farewell: Option<(Vec<u8>, usize)>,
}

impl ClientStream {
    pub fn new(tcp: TcpStream, acceptor: TlsAcceptor, notes: Arc<StreamNotes>) -> ClientStream {
        ClientStream {
            state: State::Plain(tcp),
            acceptor,
            notes,
            outgoing: PduFraming::default(),
            connection_request: Some(Vec::new()),
            offered_nla: false,
            offered_tls: false,
            first_pdu: Some(Vec::new()),
            farewell: None,
        }
    }

    /// Drives the handshake when it is due; Ready once the stream is in a settled state.
    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let State::Handshaking(accept) = &mut self.state {
            match ready!(accept.as_mut().poll(cx)) {
                Ok(tls) => self.state = State::Tls(Box::new(tls)),
                Err(error) => {
                    self.state = State::Broken;
                    if self.offered_nla {
                        log::warn!(
                            "TLS handshake with the client failed ({error}): it offered NLA \
                             (CredSSP), which is not offered here, and would not take TLS alone"
                        );
                    } else {
                        log::warn!("TLS handshake with the client failed: {error}");
                    }
                    return Poll::Ready(Err(error));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn start_tls_if_due(&mut self) {
        if matches!(self.state, State::Plain(_)) && self.outgoing.at_boundary_after_a_pdu() {
            if let State::Plain(tcp) = std::mem::replace(&mut self.state, State::Broken) {
                self.state = State::Handshaking(Box::pin(self.acceptor.accept(tcp)));
            }
        }
    }

    fn note_connection_request(&mut self, bytes: &[u8]) {
        let Some(buffer) = self.connection_request.as_mut() else {
            return;
        };
        buffer.extend_from_slice(bytes);
        match tpkt_length(buffer) {
            Some(length) if buffer.len() >= length => {
                let request =
                    ironrdp_core::decode::<X224<nego::ConnectionRequest>>(&buffer[..length]);
                if let Ok(request) = request {
                    let offered = request.0.protocol;
                    self.offered_nla = offered.intersects(
                        nego::SecurityProtocol::HYBRID | nego::SecurityProtocol::HYBRID_EX,
                    );
                    self.offered_tls = offered.contains(nego::SecurityProtocol::SSL);
                }
                self.connection_request = None;
            }
            Some(_) => {}
            None if buffer.len() >= 4 => self.connection_request = None,
            None => {}
        }
    }

    fn note_incoming(&mut self, bytes: &[u8]) {
        let Some(buffer) = self.first_pdu.as_mut() else {
            return;
        };
        buffer.extend_from_slice(bytes);
        let Some(length) = tpkt_length(buffer) else {
            if buffer.len() >= 4 {
                // Not a TPKT: IronRDP will refuse it; nothing to learn.
                self.first_pdu = None;
            }
            return;
        };
        if buffer.len() < length {
            return;
        }
        let size = client_core_size(&buffer[..length]);
        self.first_pdu = None;
        if let Some(size) = size {
            self.notes.lock().requested_size = Some(size);
        }
    }

    fn prepare_farewell(&mut self) {
        if self.farewell.is_some() {
            return;
        }
        let Some(code) = self.notes.lock().farewell.take() else {
            return;
        };
        if !self.outgoing.at_boundary() {
            log::info!("no goodbye to the client: a PDU is half written");
            return;
        }
        match farewell_bytes(code) {
            Ok(bytes) => self.farewell = Some((bytes, 0)),
            Err(error) => log::warn!("cannot encode the goodbye to the client: {error}"),
        }
    }

    /// Writes the goodbye, if there is one, whole.
    fn poll_farewell(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if matches!(self.state, State::Tls(_)) {
            self.prepare_farewell();
        }
        let (State::Tls(tls), Some((bytes, sent))) = (&mut self.state, &mut self.farewell) else {
            return Poll::Ready(Ok(()));
        };
        while *sent < bytes.len() {
            match ready!(Pin::new(&mut **tls).poll_write(cx, &bytes[*sent..])) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => *sent += n,
                Err(error) => return Poll::Ready(Err(error)),
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_handshake(cx))?;
        let before = buf.filled().len();
        match &mut this.state {
            State::Plain(tcp) => {
                ready!(Pin::new(tcp).poll_read(cx, buf))?;
                let fresh = buf.filled()[before..].to_vec();
                this.note_connection_request(&fresh);
                return Poll::Ready(Ok(()));
            }
            State::Tls(tls) => ready!(Pin::new(&mut **tls).poll_read(cx, buf))?,
            State::Handshaking(_) => return Poll::Pending,
            State::Broken => return Poll::Ready(Err(broken())),
        }
        let fresh = buf.filled()[before..].to_vec();
        this.note_incoming(&fresh);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        ready!(this.poll_handshake(cx))?;
        if this.notes.lock().denied || this.farewell.is_some() {
            // What IronRDP writes after a refusal (its own access-denied, which FreeRDP
            // cannot parse) is replaced by the goodbye and then dropped.
            ready!(this.poll_farewell(cx))?;
            return Poll::Ready(Ok(data.len()));
        }
        let written = match &mut this.state {
            State::Plain(tcp) => ready!(Pin::new(tcp).poll_write(cx, data))?,
            State::Tls(tls) => ready!(Pin::new(&mut **tls).poll_write(cx, data))?,
            State::Handshaking(_) => return Poll::Pending,
            State::Broken => return Poll::Ready(Err(broken())),
        };
        this.outgoing.advance(&data[..written]);
        this.start_tls_if_due();
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.state {
            State::Plain(tcp) => Pin::new(tcp).poll_flush(cx),
            State::Tls(tls) => Pin::new(&mut **tls).poll_flush(cx),
            State::Handshaking(_) | State::Broken => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if let Err(error) = ready!(this.poll_farewell(cx)) {
            log::info!("the goodbye to the client was not written: {error}");
        }
        match &mut this.state {
            State::Plain(tcp) => Pin::new(tcp).poll_shutdown(cx),
            State::Tls(tls) => Pin::new(&mut **tls).poll_shutdown(cx),
            State::Handshaking(_) | State::Broken => Poll::Ready(Ok(())),
        }
    }
}

impl ClientStream {
    /// IronRDP's acceptor answers a client without a protocol in common (NLA only, or
    /// standard RDP security) with an error and a closed socket, its RDP_NEG_FAILURE left
    /// unsent; the client is told here that TLS is required, so it can say so.
    fn refuse_negotiation(&self, tcp: &TcpStream) {
        if self.outgoing.pdus_started > 0 || self.connection_request.is_some() || self.offered_tls {
            return;
        }
        log::info!(
            "the client does not offer TLS security{}: told SSL_REQUIRED_BY_SERVER",
            if self.offered_nla {
                " (only NLA, which is not offered here)"
            } else {
                ""
            }
        );
        let failure = nego::ConnectionConfirm::Failure {
            code: nego::FailureCode::SSL_REQUIRED_BY_SERVER,
        };
        if let Ok(bytes) = ironrdp_core::encode_vec(&X224(failure)) {
            let _ = tcp.try_write(&bytes);
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let tcp = match std::mem::replace(&mut self.state, State::Broken) {
            State::Plain(tcp) => {
                self.refuse_negotiation(&tcp);
                tcp
            }
            State::Tls(tls) => {
                let (tcp, mut connection) = tls.into_inner();
                // Best effort, without waiting: the close_notify IronRDP did not send.
                connection.send_close_notify();
                let mut writer = NonBlockingWriter(&tcp);
                while connection.wants_write() {
                    if !matches!(connection.write_tls(&mut writer), Ok(n) if n > 0) {
                        break;
                    }
                }
                tcp
            }
            State::Handshaking(_) | State::Broken => return,
        };
        // SAFETY: shutdown(2) on the socket this struct owns; it stays open.
        unsafe { libc::shutdown(tcp.as_raw_fd(), libc::SHUT_WR) };
        self.notes.lock().lingering = Some(tcp);
    }
}

struct NonBlockingWriter<'a>(&'a TcpStream);

impl io::Write for NonBlockingWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.0.try_write(bytes)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn broken() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "the TLS handshake failed")
}

/// Follows the server's PDUs through its writes: TPKT (X.224) or fast-path, each with its
/// length in its first bytes.
#[derive(Default)]
struct PduFraming {
    header: Vec<u8>,
    remaining: usize,
    pdus_started: u64,
    /// A length that made no sense: never assume a boundary again.
    lost: bool,
}

impl PduFraming {
    fn at_boundary(&self) -> bool {
        !self.lost && self.remaining == 0 && self.header.is_empty()
    }

    fn at_boundary_after_a_pdu(&self) -> bool {
        self.at_boundary() && self.pdus_started > 0
    }

    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.lost {
            if self.remaining > 0 {
                let take = self.remaining.min(bytes.len());
                self.remaining -= take;
                bytes = &bytes[take..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            match pdu_length(&self.header) {
                PduLength::NeedMore => {}
                PduLength::Known(length) if length >= self.header.len() => {
                    self.remaining = length - self.header.len();
                    self.header.clear();
                    self.pdus_started += 1;
                }
                PduLength::Known(_) | PduLength::Invalid => self.lost = true,
            }
        }
    }
}

enum PduLength {
    NeedMore,
    Known(usize),
    Invalid,
}

fn pdu_length(header: &[u8]) -> PduLength {
    let Some(&first) = header.first() else {
        return PduLength::NeedMore;
    };
    if first == 0x03 {
        return match tpkt_length(header) {
            Some(length) => PduLength::Known(length),
            None if header.len() < 4 => PduLength::NeedMore,
            None => PduLength::Invalid,
        };
    }
    // Fast-path: the action (low two bits) is 0; the length follows in one byte, or two
    // when the first has its top bit set ([MS-RDPBCGR] 2.2.9.1.2).
    if first & 0x03 != 0 {
        return PduLength::Invalid;
    }
    match header {
        [_] => PduLength::NeedMore,
        [_, short, ..] if short & 0x80 == 0 => PduLength::Known(usize::from(*short)),
        [_, _] => PduLength::NeedMore,
        [_, high, low, ..] => PduLength::Known((usize::from(high & 0x7f) << 8) | usize::from(*low)),
        [] => PduLength::NeedMore,
    }
}

fn tpkt_length(bytes: &[u8]) -> Option<usize> {
    match bytes {
        [0x03, 0x00, high, low, ..] => {
            let length = usize::from(u16::from_be_bytes([*high, *low]));
            (4..=MAX_TPKT_BYTES).contains(&length).then_some(length)
        }
        _ => None,
    }
}

/// The desktop size in an MCS Connect Initial's Client Core Data.
fn client_core_size(tpkt: &[u8]) -> Option<DesktopSize> {
    let x224: X224<X224Data<'_>> = ironrdp_core::decode(tpkt).ok()?;
    let initial: mcs::ConnectInitial = ironrdp_core::decode(x224.0.data.as_ref()).ok()?;
    let core = initial.conference_create_request.into_gcc_blocks().core;
    Some(DesktopSize {
        width: core.desktop_width,
        height: core.desktop_height,
    })
}

/// Set Error Info (why), then Disconnect Provider Ultimatum (the end), as IronRDP's acceptor
/// writes its own access-denied.
fn farewell_bytes(code: ProtocolIndependentCode) -> Result<Vec<u8>, ironrdp_core::EncodeError> {
    let info = ServerSetErrorInfoPdu(ErrorInfo::ProtocolIndependentCode(code));
    // In a Share Data header, as [MS-RDPBCGR] 2.2.5.1.1 has it (IronRDP's own access-denied
    // sends the bare code, which FreeRDP cannot parse).
    let share_data = ShareControlHeader {
        share_id: 0,
        pdu_source: IO_CHANNEL_ID,
        share_control_pdu: ShareControlPdu::Data(ShareDataHeader {
            share_data_pdu: ShareDataPdu::ServerSetErrorInfo(info),
            stream_priority: StreamPriority::Undefined,
            compression_flags: CompressionFlags::empty(),
            compression_type: CompressionType::K8,
        }),
    };
    let indication = SendDataIndication {
        initiator_id: USER_CHANNEL_ID,
        channel_id: IO_CHANNEL_ID,
        user_data: ironrdp_core::encode_vec(&share_data)?.into(),
    };
    let mut bytes = ironrdp_core::encode_vec(&X224(indication))?;
    let ultimatum =
        DisconnectProviderUltimatum::from_reason(mcs::DisconnectReason::ProviderInitiated);
    bytes.extend(ironrdp_core::encode_vec(&X224(ultimatum))?);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_follows_tpkt_and_fast_path_across_split_writes() {
        let mut framing = PduFraming::default();
        assert!(!framing.at_boundary_after_a_pdu());
        // A 7-byte TPKT written in two pieces.
        framing.advance(&[0x03, 0x00]);
        assert!(!framing.at_boundary());
        framing.advance(&[0x00, 0x07, 1, 2]);
        assert!(!framing.at_boundary());
        framing.advance(&[3]);
        assert!(framing.at_boundary_after_a_pdu());
        // Fast-path, short then long length.
        framing.advance(&[0x00, 0x03, 9]);
        assert!(framing.at_boundary());
        framing.advance(&[0x00, 0x81, 0x00]);
        assert!(!framing.at_boundary());
        framing.advance(&vec![0; 0x100 - 3]);
        assert!(framing.at_boundary());
        // Nonsense: never a boundary again.
        framing.advance(&[0x03, 0x00, 0x00, 0x01]);
        assert!(!framing.at_boundary());
        framing.advance(&[0x00, 0x02]);
        assert!(!framing.at_boundary());
    }

    #[test]
    fn farewell_encodes() {
        let bytes = farewell_bytes(ProtocolIndependentCode::RpcInitiatedDisconnect).unwrap();
        let mut framing = PduFraming::default();
        framing.advance(&bytes);
        assert!(framing.at_boundary());
        assert_eq!(framing.pdus_started, 2);
    }
}
