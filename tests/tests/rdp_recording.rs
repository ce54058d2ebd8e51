//! A desktop session's recording from end to end: the real xfreerdp against usherd, the
//! worker's recording written to the spool, shipped to the collector as the `desktop`
//! stream while the session is live, and a frame of it seen in the collector's page (a
//! canvas pixel of the desktop's colour) in headless Chromium.

use std::time::Duration;
use usher_test_support::rdp::{ClientDisplay, RdpClient, RdpOptions, Rgb};
use usher_tests::*;

/// Paints the root a known colour, an xterm top-left (about 480x320 pixels).
const DESKTOP: &str = "xsetroot -solid '#3366cc'; exec xterm -geometry 80x24+0+0";
const PROFILE: &str = "name = \"rdp\"\nrdp = true\n[exec]\nmode = \"audit\"\n";

#[test]
fn a_desktop_session_is_recorded_shipped_and_seen_in_the_collectors_player() {
    let mut collector = Collector::new(&[], "");
    let token = format!("token-{}", free_port());
    let token_file = std::env::temp_dir().join(format!("usher-token-{token}"));
    std::fs::write(&token_file, &token).unwrap();
    let rdp_port = free_port();
    let agent = TestAgent::start_with(Options {
        extra_config: format!(
            "[policy]\nallowed_profiles = [\"default\", \"rdp\"]\n\n\
             [rdp]\nlisten = [\"127.0.0.1:{rdp_port}\"]\ndesktop = {desktop}\n\n\
             [collector]\nurl = \"https://127.0.0.1:{port}\"\ntoken_file = \"{token_file}\"\n\
             ca_file = \"{ca}\"\nchunk_bytes = 65536\ninterval_secs = 1\n",
            desktop = serde_json::Value::String(DESKTOP.into()),
            port = collector.port,
            token_file = token_file.display(),
            ca = collector.dir.join("ca.pem").display(),
        ),
        profiles: vec![("rdp.toml".into(), PROFILE.into())],
        ..Default::default()
    });
    let _ = std::fs::remove_file(&token_file);
    if let Err(e) = wait_for_port(rdp_port, Duration::from_secs(20)) {
        panic!("{e}\n--- usherd log ---\n{}", agent.log());
    }
    let key = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(agent.dir.join("state/ssh_host_ed25519_key"))
        .output()
        .unwrap();
    collector.trust(&TrustedAgent {
        host: agent.host.clone(),
        token: token.clone(),
        host_key: String::from_utf8_lossy(&key.stdout).trim().to_string(),
    });
    collector.start();

    let login = agent.login("rec");
    let mut claims = agent.claims(&login, 600);
    claims.profile = Some("rdp".into());
    claims.secret_hash = Some(usher::grant::console_secret_hash("rdp-rec-secret").unwrap());
    let installed = agent.install(&agent.sign(&claims));
    assert!(
        installed.status.success(),
        "{}\n--- usherd log ---\n{}",
        String::from_utf8_lossy(&installed.stderr),
        agent.log()
    );

    let display = ClientDisplay::start().unwrap();
    let mut client = RdpClient::start(
        &display,
        RdpOptions::new(rdp_port, &login, "rdp-rec-secret"),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let colour = Rgb::hex("#3366cc").unwrap();
    if let Err(e) = client.wait_for_colour(colour, 4, 40, Duration::from_secs(45)) {
        panic!(
            "{e}\n--- xfreerdp ---\n{}\n--- usherd log ---\n{}",
            client.log(),
            agent.log()
        );
    }
    let mut id = String::new();
    agent.wait_for(20, "the RDP session in `usher sessions`", || {
        let out = agent.usher(&["sessions", "--json"]);
        let listed: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        match listed
            .as_array()
            .and_then(|a| a.iter().find(|s| s["login"] == login.as_str()))
        {
            Some(s) => {
                id = s["id"].as_str().unwrap_or_default().to_string();
                true
            }
            None => false,
        }
    });

    // Shipped while live: the collector holds a keyframe of the desktop.
    agent.wait_for(60, "a keyframe of the desktop at the collector", || {
        let (code, body) = collector.view(&format!("/api/v1/sessions/{id}/desktop"));
        code == 200 && body.contains("\"k\",0,0,")
    });
    let (_, recording) = collector.view(&format!("/api/v1/sessions/{id}/desktop"));
    let header: serde_json::Value =
        serde_json::from_str(recording.lines().next().unwrap_or_default()).unwrap();
    assert_eq!(header["format"], "usher-desktop", "{header}");
    assert_eq!(
        (header["width"].as_u64(), header["height"].as_u64()),
        (Some(1024), Some(768))
    );
    let session = collector.session(&id);
    assert_eq!(
        session["streams"],
        serde_json::json!(["audit", "desktop"]),
        "{session}"
    );

    let browser = Browser::start();
    browser.sign_in_with_token(&collector.url(), &collector.viewer_token());
    browser.open(&format!("{}/?play={id}", collector.url()));
    // Right of the xterm: the desktop's root colour, as the client showed it.
    let seen = browser.wait_for(
        "the desktop's colour on the player's canvas",
        "const c = document.getElementById('desktop-screen'); \
         return c ? [...c.getContext('2d').getImageData(900, 600, 1, 1).data].slice(0, 3) : null",
        |v| {
            v.as_array().is_some_and(|a| {
                a.len() == 3
                    && a.iter()
                        .zip([0x33, 0x66, 0xcc])
                        .all(|(got, want)| got.as_i64().is_some_and(|g| (g - want).abs() <= 4))
            })
        },
    );
    assert_eq!(seen.as_array().map(Vec::len), Some(3));
    drop(browser);
    drop(client);
}
