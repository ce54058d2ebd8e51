//! A chat tool's incoming webhook, as far as a test needs one: plain HTTP on a loopback
//! port that records every POST (path, headers, JSON body) and answers with a status the
//! test chooses (204 unless told otherwise). A GET gets an empty 200 and is not recorded
//! (so a browser can land on it).

use crate::ports::free_port;
use crate::wait::{poll_until, TimedOut};
use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The largest body the sink reads; a bigger one is answered 413 and not recorded.
const MAX_BODY: usize = 1024 * 1024;

/// One POST the sink received.
#[derive(Debug, Clone)]
pub struct WebhookRequest {
    pub path: String,
    /// Header names in lower case, in the order sent.
    pub headers: Vec<(String, String)>,
    /// The body as JSON (`Value::Null` when it was not JSON; see `raw_body`).
    pub body: Value,
    pub raw_body: Vec<u8>,
}

impl WebhookRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<WebhookRequest>>,
    status: AtomicU16,
    stopping: AtomicBool,
}

/// The sink; dropping it stops its thread.
pub struct WebhookSink {
    port: u16,
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl WebhookSink {
    /// Listens on a free port of 127.0.0.1.
    pub fn start() -> std::io::Result<WebhookSink> {
        let listener = TcpListener::bind(("127.0.0.1", free_port()))
            .or_else(|_| TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        shared.status.store(204, Ordering::SeqCst);
        let serving = Arc::clone(&shared);
        let thread = std::thread::spawn(move || {
            for stream in listener.incoming() {
                if serving.stopping.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(stream) = stream {
                    // A connection of its own: a browser's idle preconnect must not hold
                    // up the next request.
                    let serving = Arc::clone(&serving);
                    std::thread::spawn(move || serve(stream, &serving));
                }
            }
        });
        Ok(WebhookSink {
            port,
            shared,
            thread: Some(thread),
        })
    }

    /// `http://127.0.0.1:PORT/hook` (any path is accepted and recorded).
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JSON bodies received so far, oldest first.
    pub fn received(&self) -> Vec<Value> {
        self.requests().into_iter().map(|r| r.body).collect()
    }

    /// Everything received so far, oldest first.
    pub fn requests(&self) -> Vec<WebhookRequest> {
        self.shared
            .received
            .lock()
            .map(|r| r.clone())
            .unwrap_or_default()
    }

    /// Answers every later POST with `status` (e.g. 500, to see the sender retry).
    pub fn respond_with(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    /// Waits until a received body satisfies `pred`, and returns it.
    pub fn wait_for(
        &self,
        pred: impl Fn(&Value) -> bool,
        timeout: Duration,
    ) -> Result<Value, TimedOut> {
        poll_until(
            &format!("a webhook POST to {} that matches", self.url()),
            timeout,
            Duration::from_millis(50),
            || self.received().into_iter().find(|body| pred(body)),
        )
    }
}

impl Drop for WebhookSink {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        // Wakes the accept loop so it sees `stopping`.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Reads one request (HTTP/1.1, Content-Length bodies) and answers it; one request per
/// connection.
fn serve(stream: TcpStream, shared: &Shared) -> std::io::Result<()> {
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_string();
    let path = parts.next().unwrap_or_default().to_string();
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
    let length = headers
        .iter()
        .find(|(name, _)| name == "content-length")
        .and_then(|(_, value)| value.parse::<usize>().ok())
        .unwrap_or(0);
    let status = if method == "GET" {
        200
    } else if method != "POST" {
        405
    } else if length > MAX_BODY {
        413
    } else {
        if headers
            .iter()
            .any(|(name, value)| name == "expect" && value.eq_ignore_ascii_case("100-continue"))
        {
            let mut writer = &stream;
            writer.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut raw_body = vec![0u8; length];
        reader.read_exact(&mut raw_body)?;
        let body = serde_json::from_slice(&raw_body).unwrap_or(Value::Null);
        if let Ok(mut received) = shared.received.lock() {
            received.push(WebhookRequest {
                path,
                headers,
                body,
                raw_body,
            });
        }
        shared.status.load(Ordering::SeqCst)
    };
    let mut stream = stream;
    write!(
        stream,
        "HTTP/1.1 {status} {}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
        reason(status)
    )?;
    stream.flush()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        204 => "No Content",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}
