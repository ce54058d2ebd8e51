//! Hostile clients against the real collector binary (collector/FLEET.md, "Writes are the
//! host's, provably", "Limits", "Mutual TLS", "Reading"): bodies that are huge or never
//! come, unsigned and wrongly signed writes, one host's token against another's sessions,
//! slowloris, floods, client certificates, and the audit trail of replays.

mod support;

use std::time::{Duration, Instant};
use support::{host, Backend, Collector, Host};
use usher_collector::uploader::{Recording, Signature, UploadError, Uploader};
use usher_wire::chain::{genesis, genesis_bytes, next_bytes};

fn rec(id: &str, host: &str) -> Recording {
    Recording::fake(
        id,
        host,
        "zoe@example.org",
        "usher-zoe",
        &["id", "uname -a"],
        &format!("MARKER-{id}"),
        20 << 10,
        4 << 10,
    )
}

/// Adds sections (`[limits]`, `[tls]`) to a collector's configuration before it starts.
fn configure(c: &Collector, sections: &str) {
    let mut text = std::fs::read_to_string(&c.config).unwrap();
    text.push('\n');
    text.push_str(sections);
    std::fs::write(&c.config, text).unwrap();
}

fn started_with(hosts: &[&Host], sections: &str) -> Collector {
    let mut c = Collector::new(Backend::Local, hosts);
    configure(&c, sections);
    c.start();
    c
}

async fn session_of(c: &Collector, id: &str) -> serde_json::Value {
    c.get(&format!("/api/v1/sessions/{id}")).await.body
}

/// A body that never comes (the stream stays pending), under a declared length or none.
fn body_never_sent() -> reqwest::Body {
    reqwest::Body::wrap_stream(futures::stream::pending::<Result<Vec<u8>, std::io::Error>>())
}

/// A body that trickles: one byte every 300 ms, forever.
fn body_trickling() -> reqwest::Body {
    use futures::StreamExt;
    reqwest::Body::wrap_stream(
        futures::stream::unfold((), |()| async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            Some((Ok::<_, std::io::Error>(b"x".to_vec()), ()))
        })
        .boxed(),
    )
}

/// Sends `req` and answers the status and how long the answer took; the test fails if it
/// takes longer than `within`.
async fn answered_within(
    up: &Uploader,
    req: reqwest::RequestBuilder,
    within: Duration,
) -> (u16, serde_json::Value, Duration) {
    let started = Instant::now();
    let a = tokio::time::timeout(within, up.send(req))
        .await
        .unwrap_or_else(|_| panic!("no answer within {within:?}"))
        .unwrap();
    (a.status, a.body, started.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_judged_on_its_headers_before_its_body_is_read() {
    let a = host("edge-a", 21);
    let c = started_with(&[&a], "[limits]\nbody_secs = 2\n");
    let chunk_url = format!("{}/api/v1/sessions/s1/streams/cast/chunks/0", c.url());
    let g = genesis("s1", "cast");
    let h0 = hex::encode(next_bytes(&genesis_bytes("s1", "cast"), b"x\n"));

    // An unknown token declaring 8 GiB that never sends it: 401 at once.
    let mut stranger = c.uploader(&a);
    stranger.token = "not-a-token".into();
    let (status, body, took) = answered_within(
        &stranger,
        stranger
            .client
            .put(&chunk_url)
            .header("content-length", (8u64 << 30).to_string())
            .header("x-usher-prev-hash", &g)
            .header("x-usher-hash", &h0)
            .body(body_never_sent()),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(body["code"], "unauthorized");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    // The same with a body that trickles in, with no declared length: 401 at once.
    let (status, _, took) = answered_within(
        &stranger,
        stranger
            .client
            .put(&chunk_url)
            .header("x-usher-prev-hash", &g)
            .header("x-usher-hash", &h0)
            .body(body_trickling()),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 401);
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    // The host's token without the host's signature: 403 at once, body unread.
    let up = c.uploader(&a);
    let (status, body, took) = answered_within(
        &up,
        up.client
            .put(&chunk_url)
            .header("content-length", (1u64 << 30).to_string())
            .header("x-usher-prev-hash", &g)
            .header("x-usher-hash", &h0)
            .body(body_never_sent()),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    // Signed, but declaring more than a chunk may be: 413 before the body.
    let sig = usher_wire::collector::sign_write(
        &a.key,
        &usher_wire::collector::chunk_signed_text("s1", "cast", 0, &g, &h0),
    );
    let (status, body, took) = answered_within(
        &up,
        up.client
            .put(&chunk_url)
            .header("content-length", ((4u64 << 20) + 1).to_string())
            .header("x-usher-prev-hash", &g)
            .header("x-usher-hash", &h0)
            .header("x-usher-signature", &sig)
            .body(body_never_sent()),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "too_large");
    assert!(took < Duration::from_secs(1), "answered after {took:?}");
    // Signed, and slow: cut at the body's time limit (2 s here), 408.
    let (status, body, took) = answered_within(
        &up,
        up.client
            .put(&chunk_url)
            .header("x-usher-prev-hash", &g)
            .header("x-usher-hash", &h0)
            .header("x-usher-signature", &sig)
            .body(body_trickling()),
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(status, 408, "{body}");
    assert_eq!(body["code"], "timeout");
    assert!(took >= Duration::from_secs(2), "cut after {took:?}");
    // Metadata and seals are small: a declared 65 KiB is 413.
    let (status, _, _) = answered_within(
        &up,
        up.client
            .post(format!("{}/api/v1/sessions/s1/seal", c.url()))
            .header("content-length", (65u64 << 10).to_string())
            .body(body_never_sent()),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(status, 413);
    // Nothing of it was stored, and the collector still takes the real thing.
    assert_eq!(up.status("s1", "cast").await.unwrap().0, 0);
    let r = rec("s1", "edge-a");
    up.ship(&r).await.unwrap();
    assert_eq!(session_of(&c, "s1").await["status"], "complete");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_not_signed_by_the_host_key_is_refused_and_flags_nothing() {
    let host_a = host("sig-a", 22);
    let c = started_with(&[&host_a], "");
    let up = c.uploader(&host_a);
    let r = rec("sig1", "sig-a");
    // A good start: metadata and two chunks.
    up.put_meta(&r.id, &r.meta).await.unwrap();
    up.ship_stream(&r, "cast", 2).await.unwrap();
    let hashes = r.hashes("cast");
    let (prev, hash) = (hex::encode(hashes[1]), hex::encode(hashes[2]));
    let thief_key = ed25519_dalek::SigningKey::from_bytes(&[99; 32]);
    let stolen = usher_wire::collector::sign_write(
        &thief_key,
        &usher_wire::collector::chunk_signed_text("sig1", "cast", 2, &prev, &hash),
    );
    let moved = usher_wire::collector::sign_write(
        &host_a.key,
        &usher_wire::collector::chunk_signed_text("sig1", "cast", 3, &prev, &hash),
    );
    for (how, what) in [
        (Signature::Missing, "no signature"),
        (Signature::Header("!!not base64".into()), "garbage"),
        (Signature::Header(stolen), "another key's"),
        (Signature::Header(moved), "the host's, for another chunk"),
    ] {
        let a = up
            .put_chunk_signed_as("sig1", "cast", 2, &prev, &hash, r.cast[2].clone(), &how)
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{what}: {:?}", a.body);
        assert_eq!(a.body["code"], "forbidden");
    }
    // A chunk that breaks the chain, unsigned: refused, and the session is not flagged.
    let a = up
        .put_chunk_signed_as(
            "sig1",
            "cast",
            2,
            &"00".repeat(32),
            &hash,
            b"rewritten\n".to_vec(),
            &Signature::Missing,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 403);
    assert_eq!(up.status("sig1", "cast").await.unwrap().0, 2);
    assert_eq!(session_of(&c, "sig1").await["status"], "live");
    // Metadata: unsigned, or whose body is not what was signed.
    let mut forged = r.meta.clone();
    forged["login"] = "root".into();
    let body = serde_json::to_vec(&forged).unwrap();
    let a = up
        .put_meta_signed_as("sig1", body.clone(), &Signature::Missing)
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    let signed_other = usher_wire::collector::sign_write(
        &host_a.key,
        &usher_wire::collector::meta_signed_text("sig1", &usher_wire::collector::sha256_hex(b"{}")),
    );
    let a = up
        .send(
            up.client
                .put(format!("{}/api/v1/sessions/sig1/meta", c.url()))
                .header("x-usher-hash", usher_wire::collector::sha256_hex(b"{}"))
                .header("x-usher-signature", signed_other)
                .body(body),
        )
        .await
        .unwrap();
    assert_eq!(
        a.status, 403,
        "a body that is not the signed one: {:?}",
        a.body
    );
    assert_eq!(session_of(&c, "sig1").await["meta"]["login"], "usher-zoe");
    // A seal by another key: refused, not flagged; a v1 seal (no metadata): 400.
    let last = up.ship_stream(&r, "cast", usize::MAX).await.unwrap();
    up.ship_stream(&r, "audit", usize::MAX).await.unwrap();
    let audit_last = hex::encode(*r.hashes("audit").last().unwrap());
    let ends = vec![
        ("audit".to_string(), r.audit.len() as u64, audit_last),
        ("cast".to_string(), r.cast.len() as u64, last),
    ];
    let mut impostor = c.uploader(&host_a);
    impostor.key = ed25519_dalek::SigningKey::from_bytes(&[99; 32]);
    let a = impostor
        .seal_over("sig1", up.sent_meta("sig1"), &ends)
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    assert_eq!(session_of(&c, "sig1").await["status"], "live");
    let a = up.seal_over("sig1", None, &ends).await.unwrap();
    assert_eq!(a.status, 400, "{:?}", a.body);
    assert_eq!(session_of(&c, "sig1").await["status"], "live");
    // The host's own seal closes it.
    let a = up.seal("sig1", &ends).await.unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(session_of(&c, "sig1").await["status"], "complete");
    // A chunk captured on the wire (headers, signature and body), replayed: as it was, it
    // is a duplicate; into another session or at another number its signature does not
    // hold, so it is refused and flags nothing.
    let h = r.hashes("cast");
    let captured_sig = usher_wire::collector::sign_write(
        &host_a.key,
        &usher_wire::collector::chunk_signed_text(
            "sig1",
            "cast",
            1,
            &hex::encode(h[0]),
            &hex::encode(h[1]),
        ),
    );
    let (prev1, hash1) = (hex::encode(h[0]), hex::encode(h[1]));
    let captured = Signature::Header(captured_sig);
    let replay = |id: &'static str, seq: u64| {
        up.put_chunk_signed_as(
            id,
            "cast",
            seq,
            &prev1,
            &hash1,
            r.cast[1].clone(),
            &captured,
        )
    };
    let a = replay("sig1", 1).await.unwrap();
    assert_eq!(
        (a.status, &a.body["duplicate"]),
        (200, &serde_json::json!(true))
    );
    let a = replay("sig1", 5).await.unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    let a = replay("sig2", 1).await.unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    assert_eq!(session_of(&c, "sig1").await["status"], "complete");
    // A seal by the host that leaves out the last chunk it shipped: flagged (a signed write
    // may flag its own host's session).
    let r3 = rec("sig3", "sig-a");
    up.put_meta(&r3.id, &r3.meta).await.unwrap();
    up.ship_stream(&r3, "audit", usize::MAX).await.unwrap();
    up.ship_stream(&r3, "cast", usize::MAX).await.unwrap();
    let h3 = r3.hashes("cast");
    let short = vec![
        (
            "audit".to_string(),
            r3.audit.len() as u64,
            hex::encode(*r3.hashes("audit").last().unwrap()),
        ),
        (
            "cast".to_string(),
            h3.len() as u64 - 1,
            hex::encode(h3[h3.len() - 2]),
        ),
    ];
    let a = up.seal("sig3", &short).await.unwrap();
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(session_of(&c, "sig3").await["status"], "tampered");
    // The refusals are logged with the writer: host and token fingerprint, not the token.
    let log = c.log();
    let fingerprint = usher_collector::store::Writer::token_id(&up.token);
    assert!(
        log.lines()
            .any(|l| l.contains("refused") && l.contains("sig-a") && l.contains(&fingerprint)),
        "{log}"
    );
    assert!(!log.contains(&up.token), "the token itself is never logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_after_the_seal_is_refused_and_only_the_hosts_own_attempt_flags() {
    let host_a = host("meta-a", 32);
    let c = started_with(&[&host_a], "");
    let up = c.uploader(&host_a);
    let r = rec("ms1", "meta-a");
    up.ship(&r).await.unwrap();
    assert_eq!(session_of(&c, "ms1").await["status"], "complete");
    let sealed_meta = serde_json::to_vec(&r.meta).unwrap();
    // The agent retrying its last metadata after the seal: answered 200, nothing changes.
    let a = up
        .put_meta_signed_as("ms1", sealed_meta.clone(), &Signature::Host)
        .await
        .unwrap();
    assert_eq!(a.status, 200, "{:?}", a.body);
    assert_eq!(session_of(&c, "ms1").await["status"], "complete");
    // What a holder of the host's token would rewrite: who, as whom, and when.
    let mut rewritten = r.meta.clone();
    rewritten["grant"]["sub"] = "nobody@example.org".into();
    rewritten["login"] = "usher-nobody".into();
    rewritten["started_at"] = "2020-01-01T00:00:00Z".into();
    let body = serde_json::to_vec(&rewritten).unwrap();
    // Without the host key (a stolen token): refused before the store, and no flag.
    let a = up
        .put_meta_signed_as("ms1", body.clone(), &Signature::Missing)
        .await
        .unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    let s = session_of(&c, "ms1").await;
    assert_eq!(s["status"], "complete", "{s}");
    // Signed by the host itself: refused 409 and the session flagged, naming the writer.
    let a = up
        .put_meta_signed_as("ms1", body, &Signature::Host)
        .await
        .unwrap();
    assert_eq!(
        (a.status, a.body["code"].as_str()),
        (409, Some("tampered")),
        "{:?}",
        a.body
    );
    let s = session_of(&c, "ms1").await;
    assert_eq!(s["status"], "tampered", "{s}");
    let by = s["flagged_by"].as_str().unwrap_or_default();
    let fingerprint = usher_collector::store::Writer::token_id(&up.token);
    assert!(
        by.contains("meta-a") && by.contains(&fingerprint) && by.contains("127.0.0.1"),
        "{by}"
    );
    // The sealed metadata is what is served, and the recording is whole.
    assert_eq!(s["meta"]["login"], "usher-zoe", "{s}");
    assert_eq!(s["meta"]["grant"]["sub"], r.meta["grant"]["sub"], "{s}");
    assert_eq!(s["meta"]["started_at"], r.meta["started_at"], "{s}");
    let cast = c.get("/api/v1/sessions/ms1/cast").await;
    assert_eq!(cast.text.as_bytes(), r.cast.concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hosts_token_can_neither_read_write_nor_flag_anothers_sessions() {
    let (a, b) = (host("scope-a", 23), host("scope-b", 24));
    let c = started_with(&[&a, &b], "");
    let (up_a, up_b) = (c.uploader(&a), c.uploader(&b));
    // B's session, complete and good.
    let good = rec("b-good", "scope-b");
    up_b.ship(&good).await.unwrap();
    // B's session, still live.
    let live = rec("b-live", "scope-b");
    up_b.put_meta(&live.id, &live.meta).await.unwrap();
    up_b.ship_stream(&live, "cast", 2).await.unwrap();

    for id in ["b-good", "b-live"] {
        // Reading B's upload status.
        let err = up_a.status(id, "cast").await.unwrap_err();
        assert!(
            matches!(err, UploadError::Refused { status: 403, .. }),
            "{id}: {err}"
        );
    }
    // Writing B's next chunk (signed with A's own key, as A).
    let hashes = live.hashes("cast");
    let a2 = up_a
        .put_chunk(
            "b-live",
            "cast",
            2,
            &hex::encode(hashes[1]),
            &hex::encode(hashes[2]),
            live.cast[2].clone(),
        )
        .await
        .unwrap();
    assert_eq!(a2.status, 403, "{:?}", a2.body);
    // Rewriting one of B's stored chunks, or breaking the chain of its sealed session: a
    // flag is what A would be after.
    for (id, rec) in [("b-live", &live), ("b-good", &good)] {
        let h = rec.hashes("cast");
        let a = up_a
            .put_chunk(
                id,
                "cast",
                1,
                &hex::encode(h[0]),
                &"ab".repeat(32),
                b"rewritten\n".to_vec(),
            )
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{id}: {:?}", a.body);
    }
    // B's metadata: A's token writing it (naming B, or naming A) is refused.
    let a = up_a.put_meta("b-live", &live.meta).await.unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    let mut as_a = live.meta.clone();
    as_a["host"] = "scope-a".into();
    let a = up_a.put_meta("b-live", &as_a).await.unwrap();
    assert_eq!(a.status, 403, "{:?}", a.body);
    // Sealing B's sessions with A's key (a bad seal would flag).
    for id in ["b-live", "b-good"] {
        let a = up_a
            .seal_over(
                id,
                Some("00".repeat(32)),
                &[("cast".into(), 1, "ab".repeat(32))],
            )
            .await
            .unwrap();
        assert_eq!(a.status, 403, "{id}: {:?}", a.body);
    }
    // B's sessions are as B left them: nothing flagged, nothing changed.
    let s = session_of(&c, "b-good").await;
    assert_eq!(s["status"], "complete", "{s}");
    assert_eq!(s["meta"]["host"], "scope-b");
    let s = session_of(&c, "b-live").await;
    assert_eq!(s["status"], "live", "{s}");
    assert_eq!(up_b.status("b-live", "cast").await.unwrap().0, 2);
    let cast = c.get("/api/v1/sessions/b-good/cast").await;
    assert_eq!(cast.text.as_bytes(), good.cast.concat());
    // And B finishes its live session.
    up_b.ship(&live).await.unwrap();
    assert_eq!(session_of(&c, "b-live").await["status"], "complete");
}

/// A TLS connection to the collector, HTTP/1.1 only, trusting the test CA.
async fn tls_connect(c: &Collector) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&c.ca) {
        roots.add(cert.unwrap()).unwrap();
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", c.port))
        .await
        .unwrap();
    connector
        .connect(
            rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

/// Reads until the server closes the connection; how long that took (None: still open
/// after `limit`).
async fn closed_within(
    stream: &mut tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    limit: Duration,
) -> Option<Duration> {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(
            tokio::time::Instant::from_std(started + limit),
            stream.read(&mut buf),
        )
        .await
        {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(started.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_is_cut_and_a_flooding_token_is_held_back_alone() {
    use tokio::io::AsyncWriteExt;
    let (a, b) = (host("rate-a", 25), host("rate-b", 26));
    let c = started_with(
        &[&a, &b],
        "[limits]\nheader_secs = 2\nagent_burst = 20\nagent_per_second = 1.0\n\
         unauthenticated_burst = 5\nunauthenticated_per_second = 0.1\nmax_connections = 8\n\
         reader_burst = 5\nreader_per_second = 0.1\n",
    );
    // Headers begun and never finished: the connection is closed at the header deadline.
    let mut slow = tls_connect(&c).await;
    slow.write_all(b"GET /api/v1/sessions HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
        .await
        .unwrap();
    slow.flush().await.unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(8))
        .await
        .expect("a slowloris connection is closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(5),
        "closed after {took:?}"
    );
    // Connections over the cap are closed as they come; the ones before stay usable.
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(tls_connect(&c).await);
    }
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", c.port))
        .await
        .unwrap();
    let mut probe = [0u8; 1];
    use tokio::io::AsyncReadExt;
    let mut tcp = tcp;
    let over = tokio::time::timeout(Duration::from_secs(3), tcp.read(&mut probe)).await;
    assert!(
        matches!(over, Ok(Ok(0)) | Ok(Err(_))),
        "a connection over max_connections is closed: {over:?}"
    );
    drop(held);
    tokio::time::sleep(Duration::from_millis(300)).await;

    // A's token floods: past its burst it gets 429, while B is served.
    let (up_a, up_b) = (c.uploader(&a), c.uploader(&b));
    let mut limited = 0;
    let flood = Instant::now();
    for _ in 0..40 {
        match up_a.status("ra", "cast").await {
            Ok(_) => {}
            Err(UploadError::Refused {
                status: 429, body, ..
            }) => {
                assert_eq!(body["code"], "rate_limited");
                limited += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    // The burst (20), and one a second since the flood began.
    let allowed = 20 + flood.elapsed().as_secs() as usize + 1;
    assert!(
        limited > 0 && 40 - limited <= allowed,
        "{} of 40 served in {:?}",
        40 - limited,
        flood.elapsed()
    );
    assert_eq!(up_b.status("rb", "cast").await.unwrap().0, 0);
    up_b.ship(&rec("rb", "rate-b")).await.unwrap();
    // Guessing tokens from one address: 401, then 429 past the burst.
    let mut guesser = c.uploader(&a);
    let mut codes = Vec::new();
    for i in 0..8 {
        guesser.token = format!("guess-{i}");
        match guesser.status("x", "cast").await {
            Err(UploadError::Refused { status, .. }) => codes.push(status),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(&codes[..5], &[401; 5], "{codes:?}");
    assert!(codes[5..].iter().all(|s| *s == 429), "{codes:?}");
    // A reviewer's reads: past the burst, 429 (one at a time: the connection cap is low).
    let mut reads = Vec::new();
    for _ in 0..7 {
        reads.push(c.get("/api/v1/sessions/rb").await.status);
    }
    assert_eq!(reads.iter().filter(|s| **s == 200).count(), 5, "{reads:?}");
    assert_eq!(reads.iter().filter(|s| **s == 429).count(), 2, "{reads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_binds_an_agent_to_its_certificate() {
    let (a, b) = (host("mtls-a", 27), host("mtls-b", 28));
    let mut c = Collector::new(Backend::Local, &[&a, &b]);
    // The test CA signs the collector's certificate and the agents' client certificates.
    let test_ca = std::ops::Deref::deref(&c).ca.clone();
    let ca_pem = test_ca.ca_pem();
    configure(
        &c,
        &format!(
            "[tls]\nclient_ca = \"{}\"\nrequire_client_cert = true\n",
            ca_pem.display()
        ),
    );
    c.start();
    let identity = |file: &str, cn: &str, dns: Option<&str>| {
        std::fs::read(test_ca.client_cert(file, cn, dns).unwrap()).unwrap()
    };
    let a_cert = identity("a", "mtls-a", Some("mtls-a"));
    let b_cert = identity("b", "mtls-b", Some("mtls-b"));
    let a_by_cn = identity("a-cn", "mtls-a", None);
    let uploader = |h: &Host, pem: Option<&[u8]>| {
        Uploader::with_identity(&c.url(), &c.ca, &h.token, h.key.clone(), pem).unwrap()
    };
    // A with its own certificate (named in a DNS SAN, or in the CN only): served.
    uploader(&a, Some(&a_cert))
        .ship(&rec("m1", "mtls-a"))
        .await
        .unwrap();
    uploader(&a, Some(&a_by_cn))
        .ship(&rec("m2", "mtls-a"))
        .await
        .unwrap();
    // A's token with B's certificate, or with none: 403.
    for (pem, what) in [
        (Some(&b_cert[..]), "B's certificate"),
        (None, "no certificate"),
    ] {
        let err = uploader(&a, pem).status("m3", "cast").await.unwrap_err();
        assert!(
            matches!(err, UploadError::Refused { status: 403, .. }),
            "{what}: {err}"
        );
    }
    // A certificate of another CA does not get through the handshake.
    let other_dir = c.dir.join("other-ca");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = usher_test_support::ca::TestCa::create(&other_dir).unwrap();
    let foreign = std::fs::read(other.client_cert("a", "mtls-a", Some("mtls-a")).unwrap()).unwrap();
    let err = uploader(&a, Some(&foreign))
        .status("m3", "cast")
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::Transport(_)), "{err}");
    // People need none: the auditor reads without a certificate.
    assert_eq!(session_of(&c, "m1").await["status"], "complete");
    assert!(c.log().contains("a client certificate is required"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replays_are_audited_and_need_the_auditor_role() {
    let a = host("view-a", 29);
    let c = started_with(&[&a], "");
    let up = c.uploader(&a);
    let r = rec("v1", "view-a");
    up.ship(&r).await.unwrap();
    // Not signed in, or signed in without the auditor role: refused, not recorded.
    let anonymous = c.curl(&[&format!("{}/api/v1/sessions/v1/cast", c.url())]);
    assert_eq!(anonymous.0, 401);
    let requester = c.mint_token("s-rita", "rita", "requester");
    let as_requester = c.curl(&[
        "-H",
        &format!("Authorization: Bearer {requester}"),
        &format!("{}/api/v1/sessions/v1/cast", c.url()),
    ]);
    assert_eq!(as_requester.0, 403, "{}", as_requester.1);
    // A token in the URL is not a credential.
    let in_url = c.curl(&[&format!(
        "{}/api/v1/sessions/v1/cast?token={}",
        c.url(),
        c.viewer_token()
    )]);
    assert_eq!(in_url.0, 401);
    // The auditor watches twice, reads the audit stream and the detail once.
    for _ in 0..2 {
        assert_eq!(c.get("/api/v1/sessions/v1/cast").await.status, 200);
    }
    assert_eq!(c.get("/api/v1/sessions/v1/audit").await.status, 200);
    assert_eq!(c.get("/api/v1/sessions/v1").await.status, 200);
    // Incremental reads (from > 0) are the same replay going on: not recorded again.
    assert_eq!(c.get("/api/v1/sessions/v1/cast?from=2").await.status, 200);
    let trail = c.get("/api/v1/audit").await;
    assert_eq!(trail.status, 200, "{:?}", trail.body);
    let views: Vec<&serde_json::Value> = trail
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["event"] == "recording_viewed")
        .collect();
    let seen: Vec<(String, String, String)> = views
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_string(),
                e["detail"]["session"].as_str().unwrap_or("").to_string(),
                e["detail"]["stream"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let want = |stream: &str| {
        (
            "test-auditor".to_string(),
            "v1".to_string(),
            stream.to_string(),
        )
    };
    assert_eq!(seen.len(), 3, "{seen:?}");
    for stream in ["cast", "audit", "detail"] {
        assert!(seen.contains(&want(stream)), "{stream}: {seen:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_is_read_from_a_chunk_on() {
    let a = host("from-a", 30);
    let c = started_with(&[&a], "");
    let up = c.uploader(&a);
    let r = rec("f1", "from-a");
    let n = r.cast.len();
    assert!(n >= 4);
    up.put_meta(&r.id, &r.meta).await.unwrap();
    up.ship_stream(&r, "cast", 3).await.unwrap();
    let viewer = c.viewer();
    let read = |from: &str| {
        let url = format!("{}/api/v1/sessions/f1/cast{from}", c.url());
        let req = viewer.client.get(url).bearer_auth(c.viewer_token());
        async move {
            let resp = req.send().await.unwrap();
            let status = resp.status().as_u16();
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_string()
            };
            let (next, session) = (
                header("x-usher-next-chunk"),
                header("x-usher-session-status"),
            );
            (status, next, session, resp.bytes().await.unwrap().to_vec())
        }
    };
    let (status, next, session, body) = read("").await;
    assert_eq!(
        (status, next.as_str(), session.as_str()),
        (200, "3", "live")
    );
    assert_eq!(body, r.cast[..3].concat());
    let (_, next, _, body) = read("?from=2").await;
    assert_eq!(next, "3");
    assert_eq!(body, r.cast[2].clone());
    let (_, next, _, body) = read("?from=3").await;
    assert_eq!((next.as_str(), body.len()), ("3", 0));
    let (status, _, _, _) = read("?from=-1").await;
    assert_eq!(status, 400);
    up.ship(&r).await.unwrap();
    let (_, next, session, body) = read("?from=3").await;
    assert_eq!((next, session.as_str()), (n.to_string(), "complete"));
    assert_eq!(body, r.cast[3..].concat());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_is_closed_but_a_long_poll_is_not() {
    use tokio::io::AsyncWriteExt;
    let a = host("idle-a", 31);
    let c = started_with(&[&a], "[limits]\nidle_secs = 2\n");
    // One request answered, then nothing: closed after about idle_secs (long before the
    // 10 s a keep-alive connection may wait for its next headers).
    let mut conn = tls_connect(&c).await;
    conn.write_all(b"GET /api/v1/sessions HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    conn.flush().await.unwrap();
    let took = closed_within(&mut conn, Duration::from_secs(8))
        .await
        .expect("an idle connection is closed");
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "closed after {took:?}"
    );
    // A long-poll of 4 s says nothing on its connection meanwhile: it is answered, not cut
    // (over HTTP/1.1 and over HTTP/2, whose pings would not count as a request).
    for http1 in [true, false] {
        let mut up = c.uploader(&a);
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&c.ca).unwrap());
        up.client = if http1 { client.http1_only() } else { client }
            .build()
            .unwrap();
        let started = Instant::now();
        let answer = up
            .send(up.client.get(format!(
                "{}/api/v1/agent/grants?since=1000000000&wait=4",
                c.url()
            )))
            .await
            .unwrap();
        assert_eq!(answer.status, 200, "http1 {http1}: {:?}", answer.body);
        assert!(started.elapsed() >= Duration::from_secs(4));
    }
}
