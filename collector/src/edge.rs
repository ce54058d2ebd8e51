//! The service's connections, before any request: TLS (with client certificates when
//! `[tls] client_ca` is set), a cap on open connections, and closing connections that sit
//! idle (no request in flight, whatever bytes pass: HTTP/2 pings do not keep a connection
//! that asks nothing). HTTP's own limits (the time to send headers) are set on the
//! server's builder in `main.rs`.

use axum::http::Request;
use axum_server::accept::{Accept, DefaultAcceptor};
use axum_server::tls_rustls::{RustlsAcceptor, RustlsConfig};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use std::future::Future;
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use usher_collector::api::ClientCert;
use usher_collector::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS certificate {cert} / key {key}: {source} (`usher-collector init` makes a self-signed pair)")]
    ServerPair {
        cert: PathBuf,
        key: PathBuf,
        source: io::Error,
    },
    #[error("[tls] client_ca {path}: {why}")]
    ClientCa { path: PathBuf, why: String },
}

/// The server's TLS configuration: its certificate and key, ALPN h2 and http/1.1, and with
/// `[tls] client_ca` a verifier of client certificates chaining to it. A connection
/// without one is still taken (people's browsers have none); agent requests are held to
/// `require_client_cert` per request.
pub async fn server_tls(config: &Config) -> Result<Arc<rustls::ServerConfig>, TlsSetupError> {
    let pair = RustlsConfig::from_pem_file(&config.tls_cert, &config.tls_key)
        .await
        .map_err(|source| TlsSetupError::ServerPair {
            cert: config.tls_cert.clone(),
            key: config.tls_key.clone(),
            source,
        })?
        .get_inner();
    let Some(ca_path) = &config.tls.client_ca else {
        return Ok(pair);
    };
    let ca_error = |why: String| TlsSetupError::ClientCa {
        path: ca_path.clone(),
        why,
    };
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_path)
        .map_err(|e| ca_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ca_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(ca_error("no certificate in it".into()));
    }
    for cert in certs {
        roots.add(cert).map_err(|e| ca_error(e.to_string()))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
        .allow_unauthenticated()
        .build()
        .map_err(|e| ca_error(e.to_string()))?;
    let mut server = rustls::ServerConfig::builder()
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(pair.cert_resolver.clone());
    server.alpn_protocols = pair.alpn_protocols.clone();
    Ok(Arc::new(server))
}

/// The names a client certificate is valid for: its DNS names, or its subject's CN when
/// it has none.
pub fn certificate_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return Vec::new();
    };
    let dns: Vec<String> = parsed.valid_dns_names().map(String::from).collect();
    if !dns.is_empty() {
        return dns;
    }
    common_name(parsed.subject()).into_iter().collect()
}

/// One DER item: its tag, contents and what follows (definite lengths up to 64 KiB).
fn der_item(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (first as usize, rest)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 2 || rest.len() < n {
            return None;
        }
        let len = rest[..n].iter().fold(0usize, |a, b| (a << 8) | *b as usize);
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

/// The CN of a certificate's subject (the Name's contents, as webpki gives them).
fn common_name(mut name: &[u8]) -> Option<String> {
    const SET: u8 = 0x31;
    const SEQUENCE: u8 = 0x30;
    const OID: u8 = 0x06;
    const CN: [u8; 3] = [0x55, 0x04, 0x03];
    const STRINGS: [u8; 3] = [0x0c, 0x13, 0x16]; // UTF8String, PrintableString, IA5String
    while !name.is_empty() {
        let (tag, set, rest) = der_item(name)?;
        name = rest;
        if tag != SET {
            return None;
        }
        let mut attributes = set;
        while !attributes.is_empty() {
            let (tag, attribute, rest) = der_item(attributes)?;
            attributes = rest;
            if tag != SEQUENCE {
                return None;
            }
            let (tag, oid, value) = der_item(attribute)?;
            if tag == OID && oid == CN {
                let (tag, text, _) = der_item(value)?;
                return STRINGS
                    .contains(&tag)
                    .then(|| String::from_utf8(text.to_vec()).ok())
                    .flatten();
            }
        }
    }
    None
}

/// Accepts a connection: under the connection cap, TLS, then the request service of the
/// connection, which carries the client certificate's names into every request and
/// tells the idle watch when a request is in flight.
#[derive(Clone)]
pub struct EdgeAcceptor {
    tls: RustlsAcceptor<DefaultAcceptor>,
    connections: Arc<tokio::sync::Semaphore>,
    idle: Duration,
    client_certs: bool,
}

impl EdgeAcceptor {
    pub fn new(
        tls: RustlsConfig,
        max_connections: usize,
        idle: Duration,
        handshake: Duration,
        client_certs: bool,
    ) -> EdgeAcceptor {
        EdgeAcceptor {
            tls: RustlsAcceptor::new(tls).handshake_timeout(handshake),
            connections: Arc::new(tokio::sync::Semaphore::new(max_connections)),
            idle,
            client_certs,
        }
    }
}

type TlsStream = tokio_rustls::server::TlsStream<TcpStream>;

impl<S> Accept<TcpStream, S> for EdgeAcceptor
where
    S: Send + 'static,
{
    type Stream = Watched<TlsStream>;
    type Service = ConnectionService<S>;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let acceptor = self.clone();
        // Answers go out at once: with Nagle on, a small answer waits for the client's
        // delayed ACK (measured: ~8 ms a request, most of an agent's round trip).
        let _ = stream.set_nodelay(true);
        Box::pin(async move {
            // Over the cap, the connection is closed before its TLS handshake costs anything.
            let permit = acceptor
                .connections
                .clone()
                .try_acquire_owned()
                .map_err(|_| io::Error::other("too many connections"))?;
            let (stream, service) = acceptor.tls.accept(stream, service).await?;
            let cert = if acceptor.client_certs {
                stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(|leaf| ClientCert {
                        names: certificate_names(leaf),
                    })
            } else {
                None
            };
            let activity = Arc::new(Activity {
                in_flight: AtomicUsize::new(0),
                last: std::sync::Mutex::new(tokio::time::Instant::now()),
            });
            Ok((
                Watched {
                    inner: stream,
                    _permit: permit,
                    idle: acceptor.idle,
                    deadline: Box::pin(tokio::time::sleep(acceptor.idle)),
                    activity: activity.clone(),
                },
                ConnectionService {
                    inner: service,
                    cert,
                    activity,
                },
            ))
        })
    }
}

/// What a connection's requests are doing: how many are in flight (until their answer's
/// body is sent or dropped), and when the last one ended.
pub struct Activity {
    in_flight: AtomicUsize,
    last: std::sync::Mutex<tokio::time::Instant>,
}

impl Activity {
    fn last(&self) -> tokio::time::Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A connection's stream: it holds its place under the connection cap, and fails (closing
/// the connection) once no request was in flight for `idle`.
pub struct Watched<S> {
    inner: S,
    _permit: tokio::sync::OwnedSemaphorePermit,
    idle: Duration,
    deadline: Pin<Box<tokio::time::Sleep>>,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    /// Pending while the connection may stay; an error once it has been idle too long.
    fn poll_idle(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.deadline.as_mut().poll(cx).is_ready() {
            let now = tokio::time::Instant::now();
            let next = if self.activity.in_flight.load(Ordering::Relaxed) > 0 {
                now + self.idle
            } else {
                self.activity.last() + self.idle
            };
            if next <= now {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "idle connection closed",
                )));
            }
            self.deadline.as_mut().reset(next);
        }
        Poll::Pending
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(r) => Poll::Ready(r),
            Poll::Pending => this.poll_idle(cx),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The request service of one connection.
#[derive(Clone)]
pub struct ConnectionService<S> {
    inner: S,
    cert: Option<ClientCert>,
    activity: Arc<Activity>,
}

/// Counts a request in flight until its answer's body is sent (or dropped).
struct InFlight(Arc<Activity>);

impl InFlight {
    fn start(activity: &Arc<Activity>) -> InFlight {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = tokio::time::Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An answer's body that holds its request in flight while it is sent (a large recording
/// streamed for minutes is not an idle connection).
struct TrackedBody {
    inner: axum::body::Body,
    _in_flight: InFlight,
}

impl http_body::Body for TrackedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl<S, B> tower::Service<Request<B>> for ConnectionService<S>
where
    S: tower::Service<Request<B>, Response = axum::response::Response>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        if let Some(cert) = &self.cert {
            req.extensions_mut().insert(cert.clone());
        }
        let in_flight = InFlight::start(&self.activity);
        let answer = self.inner.call(req);
        Box::pin(async move {
            let response = answer.await?;
            Ok(response.map(|inner| {
                axum::body::Body::new(TrackedBody {
                    inner,
                    _in_flight: in_flight,
                })
            }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_common_name_is_read_and_hostile_der_is_not() {
        // SET { SEQUENCE { OID 2.5.4.6, PrintableString "DE" } },
        // SET { SEQUENCE { OID 2.5.4.3, UTF8String "web-1" } }
        let name = [
            0x31, 0x0b, 0x30, 0x09, 0x06, 0x03, 0x55, 0x04, 0x06, 0x13, 0x02, b'D', b'E', 0x31,
            0x0e, 0x30, 0x0c, 0x06, 0x03, 0x55, 0x04, 0x03, 0x0c, 0x05, b'w', b'e', b'b', b'-',
            b'1',
        ];
        assert_eq!(common_name(&name), Some("web-1".to_string()));
        assert_eq!(common_name(&name[..name.len() - 1]), None, "cut short");
        assert_eq!(common_name(&[0x31, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(common_name(&[]), None);
    }
}
