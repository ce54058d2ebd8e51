//! Commands waiting for approval on the service's page, in a real headless Chromium: the
//! approver sees the pending command of a live session, follows its link to the session's
//! live replay, approves one command and denies another from the list, and the agent's
//! answers say so.

mod support;

use serde_json::{json, Value};
use support::{host, Backend, Collector};
use usher_collector::uploader::Recording;
use usher_test_support::Browser;

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn command(session: &str, line: &str) -> Value {
    let now = unix_now();
    json!({
        "id": format!("apr-{}", hex::encode(rand::random::<[u8; 16]>())),
        "host": "web-1", "session_id": session, "grant": "g-1", "sub": "s-alice",
        "login": "jit-alice", "kind": "exec", "program": "/usr/bin/systemctl",
        "command": line, "required": 1, "requested_at": now, "expires_at": now + 300,
    })
}

/// What a page element shows: `selector`'s text, or "" when it is not there.
fn shown(selector: &str) -> String {
    format!(
        "const e = document.querySelector({}); return e ? e.textContent : ''",
        serde_json::to_string(selector).unwrap()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approver_sees_the_command_watches_its_session_and_approves_or_denies() {
    let h = host("web-1", 31);
    let c = Collector::started(Backend::Local, &[&h]);
    let up = c.uploader(&h);
    // The session the command waits in: live (its recording still growing).
    let live = Recording::fake(
        "cmd-live-1",
        "web-1",
        "s-alice",
        "jit-alice",
        &["sudo systemctl restart nginx"],
        "WAITING-FOR-APPROVAL",
        12 << 10,
        2 << 10,
    );
    up.put_meta(&live.id, &live.meta).await.unwrap();
    up.ship_stream(&live, "audit", usize::MAX).await.unwrap();
    up.ship_stream(&live, "cast", live.cast.len() / 2)
        .await
        .unwrap();

    let agent = |method: reqwest::Method, path: String, body: Option<&Value>| {
        let mut req = up
            .client
            .request(method, format!("{}{path}", c.url()))
            .bearer_auth(&h.token);
        if let Some(b) = body {
            req = req.json(b);
        }
        async move {
            let a = req.send().await.unwrap();
            let status = a.status().as_u16();
            (status, a.json::<Value>().await.unwrap_or(Value::Null))
        }
    };
    let first = command("cmd-live-1", "systemctl restart nginx");
    let second = command("cmd-live-1", "reboot");
    for cmd in [&first, &second] {
        let (status, answer) = agent(
            reqwest::Method::POST,
            "/api/v1/agent/commands".into(),
            Some(cmd),
        )
        .await;
        assert_eq!(status, 201, "{answer}");
    }
    let (id1, id2) = (
        first["id"].as_str().unwrap().to_string(),
        second["id"].as_str().unwrap().to_string(),
    );

    let bob = c.mint_token("s-bob", "bob", "approver,auditor");
    let d = Browser::start();
    d.sign_in_with_token(&c.url(), &bob);
    d.open(&format!("{}/", c.url()));
    let row1 = format!("#commands tr[data-id='{id1}']");
    let row2 = format!("#commands tr[data-id='{id2}']");
    d.wait_for(
        "the pending command",
        &shown(&format!("{row1} td.command")),
        |v| v == "systemctl restart nginx",
    );
    assert_eq!(
        d.js(&shown(&format!("{row1} td:nth-child(2)"))),
        json!("s-alice")
    );
    assert_eq!(
        d.js(&shown(&format!("{row1} td:nth-child(3)"))),
        json!("jit-alice@web-1")
    );
    assert_eq!(
        d.js(&shown(&format!("{row1} td:nth-child(5)"))),
        json!("0 of 1")
    );

    // Its link is the session's live replay.
    let link = d.js(&format!(
        "const a = document.querySelector(\"{row1} a.session-link\"); return a ? a.getAttribute('href') : ''"
    ));
    let link = link.as_str().unwrap().to_string();
    assert!(
        link.contains("play=cmd-live-1") && link.contains("host=web-1"),
        "{link}"
    );
    d.click(&format!("{row1} a.session-link"));
    d.wait_for("the session's page", "return location.href", |v| {
        v.as_str().unwrap_or("").contains("play=cmd-live-1")
    });
    d.wait_for(
        "the live session playing",
        "return (document.body.dataset.playing || '') + ' ' + (document.body.dataset.status || '') + ' ' + document.getElementById('message').textContent",
        |v| v == "cmd-live-1 live ",
    );
    d.wait_for(
        "the recording so far in the player",
        "const p = document.querySelector('#player .ap-player, #player .ap-wrapper'); return p ? p.innerText : ''",
        |v| v.as_str().unwrap_or("").contains("of cmd-live-1: the quick"),
    );

    // Approve the first with a comment, deny the second.
    d.wait_for(
        "the list again",
        &shown(&format!("{row1} td.command")),
        |v| v == "systemctl restart nginx",
    );
    d.js(&format!(
        "document.querySelector(\"{row1} input.comment\").value = 'go, INC-42'; return true"
    ));
    d.click(&format!("{row1} button.approve"));
    d.wait_for(
        "the approval",
        "return document.body.dataset.commandReviewed || ''",
        |v| *v == json!(format!("{id1} approved")),
    );
    d.click(&format!("{row2} button.deny"));
    d.wait_for(
        "the denial",
        "return document.body.dataset.commandReviewed || ''",
        |v| *v == json!(format!("{id2} denied")),
    );
    d.wait_for(
        "both gone from the pending list",
        "return document.querySelectorAll('#commands tr').length",
        |v| *v == json!(0),
    );

    let (_, a1) = agent(
        reqwest::Method::GET,
        format!("/api/v1/agent/commands/{id1}"),
        None,
    )
    .await;
    assert_eq!(a1["state"], "approved", "{a1}");
    assert!(a1["decision"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
    let (_, a2) = agent(
        reqwest::Method::GET,
        format!("/api/v1/agent/commands/{id2}"),
        None,
    )
    .await;
    assert_eq!(a2["state"], "denied", "{a2}");
    let (_, decided) = agent(
        reqwest::Method::GET,
        "/api/v1/commands?state=approved".into(),
        None,
    )
    .await;
    assert_eq!(
        decided["code"], "unauthorized",
        "the agent's token lists nothing"
    );
    let d1 = d.call(
        "POST",
        "/execute/async",
        json!({"script": "const done = arguments[arguments.length - 1]; fetch('/api/v1/commands?state=approved').then(r => r.json()).then(done)", "args": []}),
    );
    let approved = d1.as_array().cloned().unwrap_or_default();
    let mine = approved
        .iter()
        .find(|s| s["request"]["id"] == id1.as_str())
        .unwrap_or_else(|| panic!("{d1}"));
    assert_eq!(mine["decisions"][0]["by"], "bob");
    assert_eq!(mine["decisions"][0]["comment"], "go, INC-42");
}
