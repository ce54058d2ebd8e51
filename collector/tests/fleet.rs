//! Several collector instances on one PostgreSQL index and one S3 bucket (moto), as a
//! fleet runs them behind a load balancer (collector/FLEET.md): agents alternating between
//! the instances chunk by chunk, one instance killed (SIGKILL) mid-upload and the uploads
//! finished on the other; and retention with a legal hold, swept by whichever instance
//! holds the lease.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::{host, Host};
use usher_collector::uploader::{Recording, UploadError, Uploader};
use usher_test_support::{poll_until, Collector, Moto, Postgres, TrustedAgent};

const BUCKET: &str = "usher-fleet";

/// One PostgreSQL (index and workflow state) and one bucket, shared by every instance.
struct Shared {
    postgres: Postgres,
    moto: Moto,
    /// The instances' `[storage]`, `[index]` and `[state]` sections.
    sections: String,
}

impl Shared {
    fn start() -> Shared {
        let postgres = Postgres::start().expect("PostgreSQL starts");
        let moto = Moto::start();
        // One name for the fleet (the balancer's): an API token minted against one
        // instance is good on every one.
        let sections = format!(
            "public_url = \"https://usher-fleet.test\"\n{}\n[index]\nbackend = \"postgres\"\nurl = \"{url}\"\n\n[state]\nbackend = \"postgres\"\nurl = \"{url}\"\n",
            moto.storage(BUCKET),
            url = postgres.url()
        );
        Shared {
            postgres,
            moto,
            sections,
        }
    }

    /// An instance (this package's binary) trusting `hosts`, not yet running.
    fn instance(&self, hosts: &[&Host]) -> Collector {
        let trusted: Vec<TrustedAgent> = hosts
            .iter()
            .map(|h| TrustedAgent {
                host: h.name.clone(),
                token: h.token.clone(),
                host_key: usher_collector::uploader::openssh_public_line(&h.key),
            })
            .collect();
        let mut c = Collector::new(&trusted, &self.sections);
        c.binary = PathBuf::from(env!("CARGO_BIN_EXE_usher-collector"));
        c
    }

    /// One number from the index (`psql`).
    fn count(&self, sql: &str) -> i64 {
        let out = self.postgres.psql(sql).expect("psql runs");
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{sql}: {out:?}"))
    }
}

fn uploader(c: &Collector, h: &Host) -> Uploader {
    let ca = std::fs::read(c.ca.ca_pem()).expect("the test CA");
    Uploader::new(&c.url(), &ca, &h.token, h.key.clone()).expect("an uploader")
}

fn rec(id: &str, host: &str, cast_kib: usize) -> Recording {
    Recording::fake(
        id,
        host,
        &format!("{host}@example.org"),
        "usher-fleet",
        &["ls -la", "systemctl restart nginx"],
        &format!("MARKER-{id}"),
        cast_kib << 10,
        16 << 10,
    )
}

/// Who acknowledged what: chunks stored by each instance.
#[derive(Default)]
struct Tally {
    stored: [AtomicUsize; 2],
}

/// Ships `r` alternating between the two instances chunk by chunk; once an instance is
/// unreachable (killed), everything goes to the other, resuming where the index says.
async fn ship_alternating(
    ups: &[Uploader; 2],
    dead: &[AtomicBool; 2],
    tally: &Tally,
    r: &Recording,
) -> Result<(), String> {
    let pick = |preferred: usize| {
        if dead[preferred].load(Ordering::SeqCst) {
            1 - preferred
        } else {
            preferred
        }
    };
    // The metadata to both (an agent retrying against another instance sends it again):
    // either can take the seal.
    for (i, up) in ups.iter().enumerate() {
        match up.put_meta(&r.id, &r.meta).await {
            Ok(a) if a.status == 200 => {}
            Ok(a) => return Err(format!("meta via {i}: {} {}", a.status, a.text)),
            Err(UploadError::Transport(_)) => dead[i].store(true, Ordering::SeqCst),
            Err(e) => return Err(e.to_string()),
        }
    }
    let mut ends = Vec::new();
    for stream in r.streams() {
        let hashes = r.hashes(stream);
        let mut prev = usher_wire::chain::genesis(&r.id, stream);
        for (seq, body) in r.stream(stream).iter().enumerate() {
            let hash = hex::encode(hashes[seq]);
            let mut tries = 0;
            loop {
                tries += 1;
                if tries > 4 {
                    return Err(format!("{}/{stream}/{seq}: no instance took it", r.id));
                }
                let i = pick(seq % 2);
                match ups[i]
                    .put_chunk(&r.id, stream, seq as u64, &prev, &hash, body.clone())
                    .await
                {
                    Ok(a) if a.status == 201 => {
                        tally.stored[i].fetch_add(1, Ordering::SeqCst);
                        break;
                    }
                    // Stored by the other instance before it died: not lost, not twice.
                    Ok(a) if a.status == 200 && a.body["duplicate"] == true => break,
                    Ok(a) => {
                        return Err(format!(
                            "{}/{stream}/{seq} via {i}: {} {}",
                            r.id, a.status, a.text
                        ))
                    }
                    Err(UploadError::Transport(_)) => dead[i].store(true, Ordering::SeqCst),
                    Err(e) => return Err(e.to_string()),
                }
            }
            prev = hash;
        }
        ends.push((stream.to_string(), r.stream(stream).len() as u64, prev));
    }
    for _ in 0..2 {
        let i = pick(1);
        match ups[i].seal(&r.id, &ends).await {
            Ok(a) if a.status == 200 => return Ok(()),
            Ok(a) => return Err(format!("seal of {} via {i}: {} {}", r.id, a.status, a.text)),
            Err(UploadError::Transport(_)) => dead[i].store(true, Ordering::SeqCst),
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("{}: no instance took the seal", r.id))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_share_one_index_and_bucket_and_survive_one_killed() {
    let shared = Shared::start();
    let hosts: Vec<Host> = (0..4)
        .map(|i| host(&format!("fleet-{i}"), 40 + i))
        .collect();
    let refs: Vec<&Host> = hosts.iter().collect();
    let mut a = shared.instance(&refs);
    let mut b = shared.instance(&refs);
    a.start();
    b.start();
    let dead = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    let tally = Arc::new(Tally::default());
    let mut all = Vec::new();
    let mut tasks = Vec::new();
    for h in &hosts {
        let ups = [uploader(&a, h), uploader(&b, h)];
        let recs: Vec<Recording> = (0..3)
            .map(|s| rec(&format!("{}-s{s}", h.name), &h.name, 160))
            .collect();
        all.extend(recs.clone());
        let (dead, tally) = (dead.clone(), tally.clone());
        tasks.push(tokio::spawn(async move {
            for r in &recs {
                ship_alternating(&ups, &dead, &tally, r).await?;
            }
            Ok::<(), String>(())
        }));
    }
    // Instance b dies mid-upload, with chunks of its own acknowledged.
    poll_until(
        "instance b to store some chunks",
        Duration::from_secs(60),
        Duration::from_millis(20),
        || (tally.stored[1].load(Ordering::SeqCst) >= 20).then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n--- b ---\n{}", b.log()));
    b.kill();
    for t in tasks {
        if let Err(e) = t.await.unwrap() {
            panic!("{e}\n--- a ---\n{}", a.log());
        }
    }
    let by_b = tally.stored[1].load(Ordering::SeqCst);
    let by_a = tally.stored[0].load(Ordering::SeqCst);
    assert!(by_a > 0 && by_b >= 20, "a stored {by_a}, b {by_b}");
    assert!(
        dead[1].load(Ordering::SeqCst),
        "the uploads noticed b was gone"
    );

    // Everything is whole and sealed, as the surviving instance serves it.
    let viewer = a.viewer_token();
    let ca = std::fs::read(a.ca.ca_pem()).unwrap();
    let reader = Uploader::new(
        &a.url(),
        &ca,
        &viewer,
        ed25519_dalek::SigningKey::from_bytes(&[0; 32]),
    )
    .unwrap();
    let get = |path: String| {
        let reader = &reader;
        async move {
            reader
                .send(reader.client.get(format!("{}{path}", reader.base)))
                .await
                .unwrap()
        }
    };
    let mut chunks = 0;
    for r in &all {
        let s = get(format!("/api/v1/sessions/{}", r.id)).await;
        assert_eq!(s.body["status"], "complete", "{}: {}", r.id, s.text);
        assert!(s.body["sealed_at"].is_i64(), "{}", s.text);
        assert_eq!(
            s.body["commands"].as_array().unwrap().len(),
            2,
            "{}",
            s.text
        );
        let cast = get(format!("/api/v1/sessions/{}/cast", r.id)).await;
        assert_eq!(cast.text.as_bytes(), r.cast.concat(), "cast of {}", r.id);
        let audit = get(format!("/api/v1/sessions/{}/audit", r.id)).await;
        assert_eq!(audit.text.as_bytes(), r.audit.concat(), "audit of {}", r.id);
        chunks += r.cast.len() + r.audit.len();
    }
    // Exactly once in the index: every session sealed once, every chunk and command once.
    let n = all.len() as i64;
    assert_eq!(
        shared.count("SELECT count(*) FROM usher_recordings.sessions WHERE sealed_at IS NOT NULL AND status = 'complete'"),
        n
    );
    assert_eq!(
        shared.count("SELECT count(*) FROM usher_recordings.sessions"),
        n
    );
    assert_eq!(
        shared.count("SELECT count(*) FROM usher_recordings.chunks"),
        chunks as i64
    );
    assert_eq!(
        shared.count("SELECT count(*) FROM usher_recordings.commands"),
        2 * n
    );
    // Every chunk's row names an object of the bucket.
    let listed = shared
        .moto
        .list(BUCKET, &format!("sessions/{}/cast/", all[0].id));
    assert!(
        listed.contains(&format!("sessions/{}/cast/0000000000.", all[0].id)),
        "{listed}"
    );
    // And the workflow's tables, in the same database, are untouched by the index's.
    assert_eq!(
        shared.count("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = 'commands'"),
        1
    );
}

fn rfc3339(secs: i64) -> String {
    usher_collector::store::retention::rfc3339_utc(secs)
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// `rec` started and ended at `ended` (Unix seconds).
fn aged(id: &str, host: &str, ended: i64) -> Recording {
    let mut r = rec(id, host, 20);
    r.meta["started_at"] = rfc3339(ended - 300).into();
    r.meta["ended_at"] = rfc3339(ended).into();
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_old_recordings_except_held_ones_on_one_instance_at_a_time() {
    let shared = Shared::start();
    let h = host("keeper", 60);
    let mut a = shared.instance(&[&h]);
    let mut b = shared.instance(&[&h]);
    a.start();
    let up = uploader(&a, &h);
    let old_free = aged("ret-old-free", "keeper", now() - 30 * 86400);
    let old_held = aged("ret-old-held", "keeper", now() - 40 * 86400);
    let recent = aged("ret-recent", "keeper", now() - 3600);
    for r in [&old_free, &old_held, &recent] {
        up.ship(r)
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", a.log()));
    }
    let auditor = a.mint_token("fleet-auditor", "auditor", "auditor");
    let requester = a.mint_token("fleet-requester", "requester", "requester");
    let hold = |c: &Collector, token: &str, method: &str, id: &str, body: &str| {
        let url = format!("{}/api/v1/sessions/{id}/hold", c.url());
        let auth = format!("Authorization: Bearer {token}");
        let mut args = vec!["-X", method, "-H", auth.as_str()];
        if !body.is_empty() {
            args.extend(["-H", "Content-Type: application/json", "-d", body]);
        }
        args.push(url.as_str());
        c.curl(&args)
    };
    // Who may hold: auditors (and admins); not a requester, not an agent.
    let reason = r#"{"reason": "case 7: litigation"}"#;
    assert_eq!(hold(&a, &requester, "PUT", "ret-old-held", reason).0, 403);
    assert_eq!(hold(&a, &h.token, "PUT", "ret-old-held", reason).0, 401);
    assert_eq!(hold(&a, &auditor, "PUT", "ret-old-held", "{}").0, 400);
    assert_eq!(hold(&a, &auditor, "PUT", "no-such-session", reason).0, 404);
    let (status, body) = hold(&a, &auditor, "PUT", "ret-old-held", reason);
    assert_eq!(status, 200, "{body}");

    // Both instances now sweep every second (one at a time, through the lease).
    a.kill();
    for c in [&a, &b] {
        let mut config = std::fs::read_to_string(&c.config).unwrap();
        config.push_str("\n[retention]\nmax_age_days = 7\nsweep_secs = 1\n");
        std::fs::write(&c.config, config).unwrap();
    }
    a.start();
    b.start();
    let gone = |id: &str| {
        shared.count(&format!(
            "SELECT count(*) FROM usher_recordings.sessions WHERE id = '{id}'"
        )) == 0
    };
    poll_until(
        "the old, free session to be deleted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || gone("ret-old-free").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    // Objects and rows gone, and said so once in the audit log.
    assert!(
        !shared
            .moto
            .list(BUCKET, "sessions/ret-old-free/")
            .contains("<Key>"),
        "objects left behind"
    );
    for table in ["chunks", "commands"] {
        assert_eq!(
            shared.count(&format!(
                "SELECT count(*) FROM usher_recordings.{table} WHERE session = 'ret-old-free'"
            )),
            0
        );
    }
    let deletions = |id: &str| {
        shared.count(&format!(
            "SELECT count(*) FROM audit WHERE event = 'recording_deleted' AND detail LIKE '%\"{id}\"%'"
        ))
    };
    assert_eq!(deletions("ret-old-free"), 1);
    assert_eq!(
        shared.count("SELECT count(*) FROM audit WHERE event = 'legal_hold_set' AND detail LIKE '%ret-old-held%'"),
        1
    );
    assert_eq!(a.view("/api/v1/sessions/ret-old-free").0, 404);
    // Held and recent: kept, across several sweeps of both instances.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(!gone("ret-old-held") && !gone("ret-recent"));
    assert!(shared
        .moto
        .list(BUCKET, "sessions/ret-old-held/")
        .contains("<Key>"));
    let held = a.session("ret-old-held");
    assert_eq!(held["hold"]["reason"], "case 7: litigation", "{held}");
    assert_eq!(held["status"], "complete");
    // Lifted: deleted at a next sweep; the recent one stays.
    let (status, body) = hold(&b, &auditor, "DELETE", "ret-old-held", "");
    assert_eq!(status, 200, "{body}");
    poll_until(
        "the formerly held session to be deleted",
        Duration::from_secs(30),
        Duration::from_millis(200),
        || gone("ret-old-held").then_some(()),
    )
    .unwrap_or_else(|e| panic!("{e}\n--- a ---\n{}\n--- b ---\n{}", a.log(), b.log()));
    assert_eq!(deletions("ret-old-held"), 1);
    assert_eq!(
        shared.count("SELECT count(*) FROM audit WHERE event = 'legal_hold_lifted'"),
        1
    );
    assert!(!gone("ret-recent"));
    assert_eq!(b.session("ret-recent")["status"], "complete");
}
