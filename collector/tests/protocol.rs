//! The agents' protocol against a real collector process, each test on both backends (a
//! local directory and moto's S3): many agents at once, tampering, duplicates, resumption,
//! a collector killed and restarted, and hostile input.

mod support;

use support::{host, Backend, Collector};
use usher_collector::uploader::{Recording, UploadError};
use usher_wire::chain::{genesis_bytes as genesis, next_bytes as next_hash};

fn rec(id: &str, host: &str, sub: &str, commands: &[&str], cast_kib: usize) -> Recording {
    Recording::fake(
        id,
        host,
        sub,
        &format!("usher-{sub}").replace('@', "-"),
        commands,
        &format!("MARKER-{id}"),
        cast_kib << 10,
        16 << 10,
    )
}

/// The stored cast and audit are exactly the chunks, in order, once each.
async fn assert_whole(c: &Collector, r: &Recording) {
    let cast = c.get(&format!("/api/v1/sessions/{}/cast", r.id)).await;
    assert_eq!(cast.status, 200);
    assert_eq!(cast.text.as_bytes(), r.cast.concat(), "cast of {}", r.id);
    let audit = c.get(&format!("/api/v1/sessions/{}/audit", r.id)).await;
    assert_eq!(audit.text.as_bytes(), r.audit.concat());
}

async fn status_of(c: &Collector, id: &str) -> String {
    let s = c.get(&format!("/api/v1/sessions/{id}")).await;
    s.body["status"].as_str().unwrap_or("?").to_string()
}

both_backends!(two_agents_ship_at_once_and_everything_is_found);
async fn two_agents_ship_at_once_and_everything_is_found(backend: Backend) {
    let (a, b) = (host("alpha", 1), host("beta", 2));
    let c = Collector::started(backend, &[&a, &b]);
    let mut tasks = Vec::new();
    for (h, sub, cmd) in [
        (&a, "alice@example.org", "vim /etc/hosts"),
        (&b, "bob@example.org", "systemctl restart nginx"),
    ] {
        let up = c.uploader(h);
        let recs: Vec<Recording> = (0..4)
            .map(|i| {
                rec(
                    &format!("{}-{i}", h.name),
                    &h.name,
                    sub,
                    &["ls -la", cmd],
                    200,
                )
            })
            .collect();
        tasks.push(tokio::spawn(async move {
            // Each agent ships its sessions concurrently too.
            let up = std::sync::Arc::new(up);
            let mut inner = Vec::new();
            for r in recs.clone() {
                let up = up.clone();
                inner.push(tokio::spawn(async move { up.ship(&r).await }));
            }
            for t in inner {
                t.await.unwrap().unwrap();
            }
            recs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    for r in &all {
        assert_eq!(status_of(&c, &r.id).await, "complete", "{}", c.log());
        assert_whole(&c, r).await;
    }
    // Search: by person, host, login, command, time; the metadata is kept whole.
    let ids = |a: &serde_json::Value| -> Vec<String> {
        let mut v: Vec<String> = a["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let by_sub = c.get("/api/v1/sessions?sub=alice@example.org").await;
    assert_eq!(
        ids(&by_sub.body),
        ["alpha-0", "alpha-1", "alpha-2", "alpha-3"]
    );
    assert_eq!(
        ids(&c.get("/api/v1/sessions?host=beta").await.body).len(),
        4
    );
    assert_eq!(
        ids(&c
            .get("/api/v1/sessions?login=usher-bob-example.org")
            .await
            .body)
        .len(),
        4
    );
    assert_eq!(
        ids(&c.get("/api/v1/sessions?command=nginx").await.body).len(),
        4
    );
    assert_eq!(
        ids(&c.get("/api/v1/sessions?command=/usr/bin/vim").await.body).len(),
        4
    );
    assert_eq!(
        ids(&c
            .get("/api/v1/sessions?from=2026-11-22T00:00:00Z&to=2026-11-23T00:00:00Z")
            .await
            .body)
        .len(),
        8
    );
    assert_eq!(
        ids(&c
            .get("/api/v1/sessions?from=2027-01-01T00:00:00Z")
            .await
            .body)
        .len(),
        0
    );
    let one = c.get("/api/v1/sessions/alpha-0").await.body;
    assert_eq!(
        one["meta"]["extra_field_kept"], "yes",
        "unknown fields are kept"
    );
    assert_eq!(one["commands"][1]["path"], "/usr/bin/vim");
    assert_eq!(one["commands"].as_array().unwrap().len(), 2);
    if let Some(m) = &c.moto {
        assert!(m
            .list("usher-test", "sessions/alpha-0/cast/")
            .contains("sessions/alpha-0/cast/0000000000"));
        assert!(!c.dir.join("data/objects/sessions").exists());
    }
}

both_backends!(a_tampered_chunk_is_refused_and_the_session_flagged);
async fn a_tampered_chunk_is_refused_and_the_session_flagged(backend: Backend) {
    let h = host("gamma", 3);
    let c = Collector::started(backend, &[&h]);
    let up = c.uploader(&h);
    // A body that does not match its hash: 422, flagged, nothing stored.
    let g = genesis("t1", "cast");
    let good = b"{\"version\":2}\n".to_vec();
    let h0 = next_hash(&g, &good);
    let a = up
        .put_chunk(
            "t1",
            "cast",
            0,
            &hex::encode(g),
            &hex::encode(h0),
            b"{\"version\":3}\n".to_vec(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 422, "{:?}", a.body);
    let s = c.get("/api/v1/sessions/t1").await.body;
    assert_eq!(s["status"], "tampered");
    assert!(
        s["problem"]
            .as_str()
            .unwrap()
            .contains("does not match its hash"),
        "{s}"
    );
    assert_eq!(up.status("t1", "cast").await.unwrap().0, 0);

    // A chunk that does not continue the chain: 422, flagged.
    let a = up
        .put_chunk(
            "t2",
            "cast",
            0,
            &hex::encode([7u8; 32]),
            &hex::encode(next_hash(&[7; 32], &good)),
            good.clone(),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 422);
    assert_eq!(status_of(&c, "t2").await, "tampered");

    // An old number with new content: 409, flagged; the stored chunk is unchanged.
    let r = rec("t3", "gamma", "carol", &["id"], 40);
    up.ship_stream(&r, "cast", 2).await.unwrap();
    let hashes = r.hashes("cast");
    let forged = b"[0.2,\"o\",\"rm -rf evidence\"]\n".to_vec();
    let a = up
        .put_chunk(
            "t3",
            "cast",
            1,
            &hex::encode(hashes[0]),
            &hex::encode(next_hash(&hashes[0], &forged)),
            forged,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 409, "{:?}", a.body);
    assert!(a.body["error"].as_str().unwrap().contains("tampered"));
    assert_eq!(status_of(&c, "t3").await, "tampered");
    let cast = c.get("/api/v1/sessions/t3/cast").await;
    assert_eq!(cast.text.as_bytes(), r.cast[..2].concat());

    // A seal that does not match what is stored, or is not signed by the host: 422, flagged.
    let r = rec("t4", "gamma", "carol", &["id"], 20);
    up.put_meta(&r.id, &r.meta).await.unwrap();
    let last = up.ship_stream(&r, "cast", usize::MAX).await.unwrap();
    let a = up
        .seal(
            "t4",
            &[("cast".into(), r.cast.len() as u64 + 1, last.clone())],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 422, "{:?}", a.body);
    assert_eq!(status_of(&c, "t4").await, "tampered");
    // A seal not signed by the host key (a stolen token): refused, and it flags nothing.
    let r = rec("t5", "gamma", "carol", &["id"], 20);
    up.put_meta(&r.id, &r.meta).await.unwrap();
    let last = up.ship_stream(&r, "cast", usize::MAX).await.unwrap();
    let mut impostor = c.uploader(&h);
    impostor.key = ed25519_dalek::SigningKey::from_bytes(&[99; 32]);
    let a = impostor
        .seal_over(
            "t5",
            up.sent_meta("t5"),
            &[("cast".into(), r.cast.len() as u64, last.clone())],
        )
        .await
        .unwrap();
    assert_eq!(a.status, 403);
    assert!(
        a.body["error"].as_str().unwrap().contains("signature"),
        "{:?}",
        a.body
    );
    assert_eq!(status_of(&c, "t5").await, "live");
    // A seal that leaves out a stream the collector holds: 422, flagged.
    let r = rec("t6", "gamma", "carol", &["id"], 20);
    up.put_meta(&r.id, &r.meta).await.unwrap();
    up.ship_stream(&r, "audit", usize::MAX).await.unwrap();
    let last = up.ship_stream(&r, "cast", usize::MAX).await.unwrap();
    let a = up
        .seal("t6", &[("cast".into(), r.cast.len() as u64, last)])
        .await
        .unwrap();
    assert_eq!(a.status, 422);
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .contains("leaves out the audit"),
        "{:?}",
        a.body
    );
    // A chunk after the seal: 409, flagged; the sealed recording is unchanged.
    let r = rec("t7", "gamma", "carol", &["id"], 20);
    up.ship(&r).await.unwrap();
    assert_eq!(status_of(&c, "t7").await, "complete");
    let n = r.cast.len() as u64;
    let last = r.hashes("cast")[n as usize - 1];
    let extra = b"[99.0,\"o\",\"appended later\"]\n".to_vec();
    let a = up
        .put_chunk(
            "t7",
            "cast",
            n,
            &hex::encode(last),
            &hex::encode(next_hash(&last, &extra)),
            extra,
        )
        .await
        .unwrap();
    assert_eq!(a.status, 409, "{:?}", a.body);
    assert_eq!(status_of(&c, "t7").await, "tampered");
    assert_eq!(
        c.get("/api/v1/sessions/t7/cast").await.text.as_bytes(),
        r.cast.concat()
    );
    // The search shows the flags (t5, refused without a flag, is still live).
    let flagged = c.get("/api/v1/sessions?host=gamma").await.body;
    assert!(
        flagged["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["status"] == "tampered" || s["id"] == "t5"),
        "{flagged}"
    );
}

both_backends!(a_chunk_sent_twice_is_stored_once);
async fn a_chunk_sent_twice_is_stored_once(backend: Backend) {
    let h = host("delta", 4);
    let c = Collector::started(backend, &[&h]);
    let up = c.uploader(&h);
    let r = rec("d1", "delta", "dave", &["uptime"], 60);
    let hashes = r.hashes("cast");
    let g = hex::encode(genesis("d1", "cast"));
    let first = up
        .put_chunk(
            "d1",
            "cast",
            0,
            &g,
            &hex::encode(hashes[0]),
            r.cast[0].clone(),
        )
        .await
        .unwrap();
    assert_eq!(
        (
            first.status,
            first.body["stored"].clone(),
            first.body["next_seq"].clone()
        ),
        (201, true.into(), 1.into())
    );
    let again = up
        .put_chunk(
            "d1",
            "cast",
            0,
            &g,
            &hex::encode(hashes[0]),
            r.cast[0].clone(),
        )
        .await
        .unwrap();
    assert_eq!(again.status, 200);
    assert_eq!(
        again.body,
        serde_json::json!({"stored": false, "duplicate": true})
    );
    // Sending the whole session twice changes nothing either.
    up.ship(&r).await.unwrap();
    up.ship(&r).await.unwrap();
    assert_eq!(status_of(&c, "d1").await, "complete");
    assert_whole(&c, &r).await;
    assert_eq!(
        up.status("d1", "cast").await.unwrap().0,
        r.cast.len() as u64
    );
}

both_backends!(a_resumed_upload_arrives_whole);
async fn a_resumed_upload_arrives_whole(backend: Backend) {
    let h = host("epsilon", 5);
    let c = Collector::started(backend, &[&h]);
    let r = rec("r1", "epsilon", "erin", &["make", "make install"], 300);
    assert!(r.cast.len() > 10);
    // An empty session's status is the chain's start.
    let (n, last) = c.uploader(&h).status("r1", "cast").await.unwrap();
    assert_eq!((n, last), (0, hex::encode(genesis("r1", "cast"))));
    c.uploader(&h).ship_stream(&r, "cast", 7).await.unwrap();
    // A new agent process: asks where to resume (ship_stream checks the hash it is told)...
    let up = c.uploader(&h);
    let (n, last) = up.status("r1", "cast").await.unwrap();
    assert_eq!((n, last), (7, hex::encode(r.hashes("cast")[6])));
    // ...a chunk past the end is a gap...
    let hashes = r.hashes("cast");
    let gap = up
        .put_chunk(
            "r1",
            "cast",
            9,
            &hex::encode(hashes[7]),
            &hex::encode(hashes[8]),
            r.cast[8].clone(),
        )
        .await
        .unwrap();
    assert_eq!(gap.status, 409);
    assert_eq!(
        gap.body,
        serde_json::json!({"code": "gap", "error": "gap", "next_seq": 7})
    );
    // ...and continues.
    assert_eq!(status_of(&c, "r1").await, "live");
    up.ship(&r).await.unwrap();
    assert_eq!(status_of(&c, "r1").await, "complete");
    assert_whole(&c, &r).await;
}

both_backends!(a_collector_killed_and_restarted_keeps_everything_acknowledged);
async fn a_collector_killed_and_restarted_keeps_everything_acknowledged(backend: Backend) {
    let h = host("zeta", 6);
    let mut c = Collector::started(backend, &[&h]);
    let r = rec("k1", "zeta", "zoe", &["ls"], 400);
    let up = c.uploader(&h);
    up.put_meta(&r.id, &r.meta).await.unwrap();
    // Upload chunk by chunk from another task, counting each chunk the collector
    // acknowledged, and kill -9 the collector in the middle of it.
    let acknowledged = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (r2, up2, acked) = (r.clone(), c.uploader(&h), acknowledged.clone());
    let upload = tokio::spawn(async move {
        let hashes = r2.hashes("cast");
        let mut prev = hex::encode(genesis(&r2.id, "cast"));
        for (seq, chunk) in r2.cast.iter().enumerate() {
            let hash = hex::encode(hashes[seq]);
            match up2
                .put_chunk(&r2.id, "cast", seq as u64, &prev, &hash, chunk.clone())
                .await
            {
                Ok(a) if a.status == 201 => {
                    acked.store(seq as u64 + 1, std::sync::atomic::Ordering::SeqCst)
                }
                _ => return,
            }
            prev = hash;
        }
    });
    while acknowledged.load(std::sync::atomic::Ordering::SeqCst) < 5 && !upload.is_finished() {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    c.kill();
    upload.await.unwrap();
    let acked = acknowledged.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        acked >= 5,
        "the upload stopped after {acked} chunks:\n{}",
        c.log()
    );
    c.start();
    // Every chunk acknowledged before the kill is there (one more may be, stored but not
    // yet acknowledged when the collector died).
    let (n, last) = up.status("k1", "cast").await.unwrap();
    assert!(
        n >= acked,
        "{acked} chunks were acknowledged before the kill, {n} are there after the restart"
    );
    assert_eq!(
        last,
        hex::encode(r.hashes("cast")[n as usize - 1]),
        "the chain survived"
    );
    let partial = c.get("/api/v1/sessions/k1/cast").await;
    assert_eq!(partial.text.as_bytes(), r.cast[..n as usize].concat());
    up.ship(&r).await.unwrap();
    assert_eq!(status_of(&c, "k1").await, "complete");
    assert_whole(&c, &r).await;
    // A second restart: the sealed session is still complete and whole.
    c.kill();
    c.start();
    assert_eq!(status_of(&c, "k1").await, "complete");
    assert_whole(&c, &r).await;
}

both_backends!(bad_input_gets_a_clear_error);
async fn bad_input_gets_a_clear_error(backend: Backend) {
    let (h, other) = (host("eta", 7), host("theta", 8));
    let c = Collector::started(backend, &[&h, &other]);
    let up = c.uploader(&h);
    let url = |p: &str| format!("{}{p}", c.url());
    let g = hex::encode(genesis("b1", "cast"));
    let h0 = hex::encode(next_hash(&genesis("b1", "cast"), b"x\n"));
    // Wrong or missing token.
    let mut stranger = c.uploader(&h);
    stranger.token = "not-a-token".into();
    let a = stranger.status("b1", "cast").await.unwrap_err();
    assert!(matches!(a, UploadError::Refused { status: 401, .. }), "{a}");
    let a = up
        .send(up.client.get(url("/api/v1/sessions")))
        .await
        .unwrap();
    assert_eq!(a.status, 401, "an agent token does not read");
    let anon = up
        .client
        .get(url("/api/v1/sessions/b1/streams/cast"))
        .send()
        .await
        .unwrap();
    assert_eq!(anon.status(), 401);
    // Bad ids and streams.
    for bad in ["..%2Fx", "..", "a%20b", "%2E%2E", &"x".repeat(129)] {
        let a = up
            .send(
                up.client
                    .get(url(&format!("/api/v1/sessions/{bad}/streams/cast"))),
            )
            .await
            .unwrap();
        assert!(a.status == 400 || a.status == 404, "{bad}: {}", a.status);
        let a = up
            .put_chunk(bad, "cast", 0, &g, &h0, b"x\n".to_vec())
            .await
            .unwrap();
        assert!(a.status == 400 || a.status == 404, "{bad}: {}", a.status);
    }
    let a = up
        .put_chunk("b1", "etc", 0, &g, &h0, b"x\n".to_vec())
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    assert_eq!(a.body["error"], "unknown stream");
    let a = up
        .send(
            up.client
                .put(url("/api/v1/sessions/b1/streams/cast/chunks/minus-one"))
                .body("x\n"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    // Missing or malformed chain headers.
    let a = up
        .send(
            up.client
                .put(url("/api/v1/sessions/b1/streams/cast/chunks/0"))
                .body("x\n"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    assert!(a.body["error"].as_str().unwrap().contains("X-Usher-Hash"));
    // A body over 4 MiB.
    let a = up
        .put_chunk("b1", "cast", 0, &g, &h0, vec![b'a'; (4 << 20) + 100 * 1024])
        .await
        .unwrap();
    assert_eq!(a.status, 413);
    assert_eq!(up.status("b1", "cast").await.unwrap().0, 0);
    // Garbage JSON for meta and seal; meta naming another host or session.
    let a = up
        .send(
            up.client
                .put(url("/api/v1/sessions/b1/meta"))
                .body("{not json"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    assert!(a.body["error"].is_string());
    let a = up
        .send(up.client.post(url("/api/v1/sessions/b1/seal")).body("[]]"))
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    let a = up
        .send(
            up.client
                .post(url("/api/v1/sessions/b1/seal"))
                .body("{\"streams\": 3}"),
        )
        .await
        .unwrap();
    assert_eq!(a.status, 400);
    let r = rec("b2", "theta", "mallory", &["id"], 4);
    let a = up.put_meta("b2", &r.meta).await.unwrap();
    assert_eq!(a.status, 403, "metadata for another host");
    let r = rec("b3", "eta", "mallory", &["id"], 4);
    let a = up.put_meta("b4", &r.meta).await.unwrap();
    assert_eq!(a.status, 400, "metadata for another session");
    // Another host's session cannot be written to.
    c.uploader(&other)
        .ship(&rec("owned", "theta", "tom", &["id"], 4))
        .await
        .unwrap();
    let a = up
        .put_chunk("owned", "audit", 1, &g, &h0, b"x\n".to_vec())
        .await
        .unwrap();
    assert_eq!(a.status, 403);
    // A session nobody shipped.
    let a = c.get("/api/v1/sessions/nobody").await;
    assert_eq!(a.status, 404);
    assert_eq!(a.body["error"], "no session nobody");
    // The collector is still fine.
    let r = rec("b5", "eta", "erin", &["id"], 8);
    up.ship(&r).await.unwrap();
    assert_whole(&c, &r).await;
}
