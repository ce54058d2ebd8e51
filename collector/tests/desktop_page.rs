//! A desktop (RDP) recording on the service: shipped through the agents' protocol as the
//! `desktop` stream, sealed with it, listed as a desktop session, and replayed in headless
//! Chromium by the page's canvas player: a pixel of the canvas has the keyframe's colour,
//! seeking forward and back redraws what the screen was then, and the exec timeline seeks.

mod support;

use base64::Engine;
use serde_json::{json, Value};
use support::{host, Backend, Collector};
use usher_collector::uploader::{Recording, START};
use usher_test_support::Browser;

const BLUE: [u8; 3] = [17, 140, 201];
const YELLOW: [u8; 3] = [250, 200, 0];
const GREEN: [u8; 3] = [30, 160, 60];

fn png(w: u32, h: u32, color: png::ColorType, pixel: &[u8]) -> String {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer
            .write_image_data(&pixel.repeat((w * h) as usize))
            .unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(out)
}

/// 320x200: blue from 0.5 s, a yellow 100x100 square top-left at 3 s, green from the
/// keyframe at 6 s; an 8x8 magenta cursor at (300, 180).
fn desktop_lines() -> Vec<String> {
    let rgb = png::ColorType::Rgb;
    vec![
        json!({"version": 1, "format": "usher-desktop", "width": 320, "height": 200,
               "timestamp": START, "keyframe_secs": 10, "input": false})
        .to_string(),
        format!(r#"[0.500,"k",0,0,320,200,"{}"]"#, png(320, 200, rgb, &BLUE)),
        format!(
            r#"[0.500,"c",0,0,8,8,"{}"]"#,
            png(8, 8, png::ColorType::Rgba, &[255, 0, 255, 255])
        ),
        r#"[0.500,"p",300,180]"#.to_string(),
        r#"[1.000,"i","key",30,false,true]"#.to_string(),
        format!(
            r#"[3.000,"f",0,0,100,100,"{}"]"#,
            png(100, 100, rgb, &YELLOW)
        ),
        format!(
            r#"[6.000,"k",0,0,320,200,"{}"]"#,
            png(320, 200, rgb, &GREEN)
        ),
        r#"[8.000,"m","end"]"#.to_string(),
    ]
}

/// The screen canvas's pixel at x, y as [r, g, b], or null while there is no canvas.
fn pixel(x: u32, y: u32) -> String {
    format!(
        "const c = document.getElementById('desktop-screen'); \
         return c ? [...c.getContext('2d').getImageData({x}, {y}, 1, 1).data].slice(0, 3) : null"
    )
}

fn is(color: [u8; 3]) -> impl Fn(&Value) -> bool {
    move |v| {
        v.as_array().is_some_and(|a| {
            a.len() == 3
                && a.iter().zip(color).all(|(got, want)| {
                    got.as_i64()
                        .is_some_and(|g| (g - i64::from(want)).abs() <= 2)
                })
        })
    }
}

/// Moves the player's seek bar to `t` as a person dragging it does.
fn seek(d: &Browser, t: f64) {
    d.js(&format!(
        "const s = document.getElementById('desktop-seek'); s.value = '{t}'; \
         s.dispatchEvent(new Event('input')); return true"
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_desktop_recording_is_shipped_listed_and_played_on_a_canvas_with_seek() {
    let h = host("rdp-1", 31);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    let desktop = Recording::fake(
        "desk-1",
        "rdp-1",
        "alice@example.org",
        "usher-alice",
        &["xterm", "firefox https://intranet"],
        "",
        0,
        4 << 10,
    )
    .with_desktop(&desktop_lines(), 300);
    assert!(desktop.desktop.len() > 3, "several chunks");
    let terminal = Recording::fake(
        "term-1",
        "rdp-1",
        "bob@example.org",
        "usher-bob",
        &["ls"],
        "TERMINAL",
        1 << 10,
        4 << 10,
    );
    up.ship(&desktop).await.unwrap();
    up.ship(&terminal).await.unwrap();

    // Sealed with its desktop stream; stored as shipped.
    let session = c.get("/api/v1/sessions/desk-1").await;
    assert_eq!(session.body["status"], "complete", "{}", session.text);
    assert_eq!(session.body["streams"], json!(["audit", "desktop"]));
    let stored = c.get("/api/v1/sessions/desk-1/desktop").await;
    assert_eq!(stored.status, 200);
    assert_eq!(
        stored.text.into_bytes(),
        desktop.desktop.concat(),
        "the desktop stream as shipped"
    );
    let listed = c.get("/api/v1/sessions?recording=desktop").await;
    let ids: Vec<&str> = listed.body["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["desk-1"]);
    assert_eq!(listed.body["sessions"][0]["desktop"], true);

    let d = Browser::start();
    d.sign_in_with_token(&c.url(), &c.viewer_token());
    d.open(&format!("{}/?play=desk-1", c.url()));
    let kinds = d.wait_for(
        "the sessions listed with their kind of recording",
        "return document.body.dataset.found ? [...document.querySelectorAll('#sessions tr')].map(r => r.dataset.id + ' ' + r.querySelector('td.recording').textContent).sort() : null",
        |v| v.is_array(),
    );
    assert_eq!(kinds, json!(["desk-1 desktop", "term-1 terminal"]));
    // It plays from the start: the keyframe's colour appears on the canvas.
    d.wait_for("the keyframe on the canvas", &pixel(200, 50), is(BLUE));
    d.wait_for(
        "the canvas at the recording's size",
        "const c = document.getElementById('desktop-screen'); return c ? [c.width, c.height] : null",
        |v| *v == json!([320, 200]),
    );
    d.js("player.pause(); return true");
    // Forward past the rectangle: yellow where it was drawn, blue beside it.
    seek(&d, 4.0);
    d.wait_for("the rectangle at 4 s", &pixel(50, 50), is(YELLOW));
    assert!(is(BLUE)(&d.js(&pixel(200, 50))));
    // The cursor, on its own canvas above the screen.
    let cursor = d.js(
        "const c = document.getElementById('desktop-cursor'); return [...c.getContext('2d').getImageData(302, 182, 1, 1).data]",
    );
    assert_eq!(cursor, json!([255, 0, 255, 255]));
    // Back before the rectangle: the keyframe is drawn again.
    seek(&d, 1.0);
    d.wait_for("the screen at 1 s", &pixel(50, 50), is(BLUE));
    // Past the second keyframe.
    seek(&d, 7.0);
    d.wait_for("the second keyframe", &pixel(50, 50), is(GREEN));
    assert!(is(GREEN)(&d.js(&pixel(319, 199))));
    // The exec timeline beside it seeks the player: `firefox` ran 1.5 s in.
    let timeline =
        d.js("return [...document.querySelectorAll('#timeline div')].map(e => e.textContent)");
    assert!(
        timeline[1]
            .as_str()
            .unwrap()
            .contains("firefox https://intranet"),
        "{timeline}"
    );
    d.click("#timeline div:nth-of-type(2)");
    let t = d.js("return player.getCurrentTime()").as_f64().unwrap();
    assert!(
        (1.4..3.0).contains(&t),
        "the player is at {t}, not near 1.5 s"
    );
    d.wait_for("the screen before the rectangle", &pixel(50, 50), is(BLUE));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seal_that_leaves_out_the_desktop_stream_flags_the_session() {
    let h = host("rdp-2", 32);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    let rec = Recording::fake(
        "desk-2",
        "rdp-2",
        "a@example.org",
        "usher-a",
        &["ls"],
        "",
        0,
        4 << 10,
    )
    .with_desktop(&desktop_lines(), 300);
    up.put_meta(&rec.id, &rec.meta).await.unwrap();
    let mut ends = Vec::new();
    for stream in ["audit", "cast", "desktop"] {
        let last = up.ship_stream(&rec, stream, usize::MAX).await.unwrap();
        ends.push((stream.to_string(), rec.stream(stream).len() as u64, last));
    }
    // A stream the collector does not know is refused.
    let other = up
        .put_chunk("desk-2", "video", 0, "00", "00", b"x\n".to_vec())
        .await
        .unwrap();
    assert_eq!(other.status, 400, "{}", other.text);
    ends.retain(|(name, _, _)| name != "desktop");
    let sealed = up.seal("desk-2", &ends).await.unwrap();
    assert_eq!(sealed.status, 422, "{}", sealed.text);
    let session = c.get("/api/v1/sessions/desk-2").await;
    assert_eq!(session.body["status"], "tampered");
    assert!(
        session.body["problem"]
            .as_str()
            .is_some_and(|p| p.contains("desktop")),
        "{}",
        session.text
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_desktop_is_followed_as_it_grows() {
    let h = host("rdp-3", 33);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    let rec = Recording::fake(
        "desk-3",
        "rdp-3",
        "a@example.org",
        "usher-a",
        &["ls"],
        "",
        0,
        4 << 10,
    )
    .with_desktop(&desktop_lines(), 300);
    // Up to the first keyframe and the cursor: the rest is not recorded yet.
    let first = rec
        .desktop
        .iter()
        .position(|c| c.windows(5).any(|w| w == b"\"p\",3"))
        .unwrap()
        + 1;
    up.put_meta(&rec.id, &rec.meta).await.unwrap();
    up.ship_stream(&rec, "audit", usize::MAX).await.unwrap();
    up.ship_stream(&rec, "desktop", first).await.unwrap();

    let d = Browser::start();
    d.sign_in_with_token(&c.url(), &c.viewer_token());
    d.open(&format!("{}/?play=desk-3", c.url()));
    d.wait_for(
        "a live session's status",
        "return document.body.dataset.status || ''",
        |v| v == "live",
    );
    d.wait_for("the first keyframe", &pixel(50, 50), is(BLUE));
    up.ship(&rec).await.unwrap();
    // The page fetches the recording again and plays on into what arrived.
    d.wait_for("the keyframe recorded later", &pixel(50, 50), is(GREEN));
}
