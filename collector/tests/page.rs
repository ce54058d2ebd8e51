//! The replay page in a real headless Chromium, driven over WebDriver (chromedriver, spoken
//! to directly with the JSON wire protocol): the page loads, a search finds the session, the
//! player renders the recorded text, and clicking a command in the timeline seeks the player;
//! a live session is followed by asking only for the chunks that arrived since.

mod support;

use serde_json::{json, Value};
use support::{host, Backend, Collector};
use usher_collector::uploader::Recording;
use usher_test_support::Browser;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_finds_a_session_plays_it_and_the_timeline_seeks() {
    let h = host("web-1", 11);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    // Two sessions; the search by command must find only the one that ran `terraform`.
    let wanted = Recording::fake(
        "page-1",
        "web-1",
        "alice@example.org",
        "usher-alice",
        &["ls -la", "terraform apply", "git status"],
        "PLAYED-IN-THE-BROWSER",
        300 << 10,
        32 << 10,
    );
    let other = Recording::fake(
        "page-2",
        "web-1",
        "bob@example.org",
        "usher-bob",
        &["uptime"],
        "OTHER",
        4 << 10,
        32 << 10,
    );
    up.ship(&wanted).await.unwrap();
    up.ship(&other).await.unwrap();

    let d = Browser::start();
    d.sign_in_with_token(&c.url(), &c.viewer_token());
    d.open(&format!("{}/?command=terraform&play=page-1", c.url()));
    // The search found exactly the session that ran the command.
    let rows = d
        .wait_for(
            "search results",
            "return document.body.dataset.found ? [...document.querySelectorAll('#sessions tr')].map(r => r.dataset.id) : null",
            |v| v.is_array(),
        );
    assert_eq!(rows, json!(["page-1"]));
    // The player rendered the recorded terminal text (not merely the page's HTML).
    d.wait_for(
        "the player rendering the recording",
        "const p = document.querySelector('#player .ap-player, #player .ap-wrapper'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains("of page-1: the quick brown fox"),
    );
    // The timeline lists the commands; clicking one seeks the player to it.
    let timeline = d.wait_for(
        "the timeline",
        "return [...document.querySelectorAll('#timeline div')].map(e => e.textContent)",
        |v| v.as_array().map(|a| a.len() == 3).unwrap_or(false),
    );
    assert!(
        timeline[1].as_str().unwrap().contains("terraform apply"),
        "{timeline}"
    );
    // Let it play past the commands (speed 4: a few seconds of recording per second).
    d.wait_for("playback", "return player.getCurrentTime()", |v| {
        v.as_f64().unwrap_or(0.0) > 8.0
    });
    d.click("#timeline div:nth-of-type(2)");
    // `terraform apply` ran 1.5 s into the session.
    let t = d.js("return player.getCurrentTime()").as_f64().unwrap();
    assert!(
        (1.4..6.0).contains(&t),
        "the player is at {t}, not near 1.5 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_session_is_watched_as_it_grows() {
    let h = host("web-2", 12);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    let live = Recording::fake(
        "live-1",
        "web-2",
        "carol@example.org",
        "usher-carol",
        &["tail -f /var/log/syslog"],
        "LIVE",
        12 << 10,
        2 << 10,
    );
    let n = live.cast.len();
    assert!(n >= 4);
    up.put_meta(&live.id, &live.meta).await.unwrap();
    up.ship_stream(&live, "audit", usize::MAX).await.unwrap();
    up.ship_stream(&live, "cast", n / 2).await.unwrap();

    let d = Browser::start();
    d.sign_in_with_token(&c.url(), &c.viewer_token());
    d.open(&format!("{}/?play=live-1", c.url()));
    d.wait_for(
        "a live session's status",
        "return document.body.dataset.status || ''",
        |v| v == "live",
    );
    d.wait_for(
        "the first half",
        "const p = document.querySelector('#player .ap-player'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains("of live-1: the quick"),
    );
    // The agent ships the rest while the page is open: its last line appears.
    let last_line: Value = serde_json::from_slice(
        live.cast[n - 1]
            .trim_ascii_end()
            .rsplit(|b| *b == b'\n')
            .next()
            .unwrap(),
    )
    .unwrap();
    let last_text = last_line[2].as_str().unwrap().trim_end().to_string();
    up.ship(&live).await.unwrap();
    d.wait_for(
        "the rest of the live session",
        "const p = document.querySelector('#player .ap-player'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains(&last_text),
    );
    // The browser's own record of the requests it made: the cast was fetched whole once,
    // then only from the chunk after those the page held.
    let fetched = d.js(
        "return performance.getEntriesByType('resource').map(e => e.name).filter(n => n.includes('/api/v1/sessions/live-1/cast'))",
    );
    let fetched: Vec<String> = fetched
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    let froms: Vec<Option<u64>> = fetched
        .iter()
        .map(|url| url.split_once("?from=").map(|(_, k)| k.parse().unwrap()))
        .collect();
    assert_eq!(froms.first(), Some(&None), "{fetched:?}");
    assert!(
        froms[1..]
            .iter()
            .all(|f| f.is_some_and(|k| k >= (n / 2) as u64)),
        "after the first read, only new chunks are asked for: {fetched:?}"
    );
    assert!(
        froms.contains(&Some((n / 2) as u64)),
        "the refresh asked from the first chunk it did not hold: {fetched:?}"
    );
}
