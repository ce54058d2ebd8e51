//! Webhooks: each event POSTed as a `WebhookEvent` to the hooks that asked for it, in the
//! background, with a few retries; never holding up the request that caused it.

use super::{Event, Subject, Workflow};
use std::sync::Weak;
use std::time::Duration;
use usher_wire::approval::CommandWebhookEvent;
use usher_wire::jit::WebhookEvent;

/// Events waiting to be sent; past this, new ones are dropped (and logged).
const QUEUE: usize = 256;
const ATTEMPTS: u32 = 4;
const TIMEOUT: Duration = Duration::from_secs(5);

/// Starts the sender for `workflow`; it ends when the workflow is dropped.
pub fn spawn(workflow: &std::sync::Arc<Workflow>, public_url: String, extra_root: Option<Vec<u8>>) {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Event>(QUEUE);
    workflow.set_event_sink(tx);
    let weak: Weak<Workflow> = std::sync::Arc::downgrade(workflow);
    let mut builder = reqwest::Client::builder().timeout(TIMEOUT);
    if let Some(pem) = extra_root.and_then(|p| reqwest::Certificate::from_pem(&p).ok()) {
        builder = builder.add_root_certificate(pem);
    }
    let client = match builder.build() {
        Ok(c) => c,
        Err(e) => {
            log::error!(target: "usher", "webhooks disabled: {e}");
            return;
        }
    };
    tokio::spawn(async move {
        while let Some(event) = rx.recv().await {
            let Some(workflow) = weak.upgrade() else {
                return;
            };
            let hooks = workflow.policy().webhooks.clone();
            drop(workflow);
            let body = match event.subject {
                Subject::Request(request) => serde_json::to_value(WebhookEvent {
                    event: event.name.to_string(),
                    url: format!("{public_url}/requests/{}", request.id),
                    request,
                }),
                Subject::Command(command) => serde_json::to_value(CommandWebhookEvent {
                    event: event.name.to_string(),
                    url: format!("{public_url}/?commands=pending"),
                    command,
                }),
            };
            let body = match body {
                Ok(b) => b,
                Err(e) => {
                    log::error!(target: "usher", "webhook {}: {e}", event.name);
                    continue;
                }
            };
            for hook in hooks
                .iter()
                .filter(|h| h.events.is_empty() || h.events.iter().any(|e| e == event.name))
            {
                let (client, url, body) = (client.clone(), hook.url.clone(), body.clone());
                // Each delivery on its own, so one slow hook does not delay the others.
                tokio::spawn(async move { deliver(&client, &url, &body).await });
            }
        }
    });
}

async fn deliver(client: &reqwest::Client, url: &str, body: &serde_json::Value) {
    let mut pause = Duration::from_millis(500);
    let json = match serde_json::to_vec(body) {
        Ok(j) => j,
        Err(e) => return log::error!(target: "usher", "webhook {url}: {e}"),
    };
    for attempt in 1..=ATTEMPTS {
        let post = client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json.clone());
        match post.send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => {
                log::warn!(target: "usher", "webhook {url}: {} (attempt {attempt})", r.status())
            }
            Err(e) => log::warn!(target: "usher", "webhook {url}: {e} (attempt {attempt})"),
        }
        tokio::time::sleep(pause).await;
        pause *= 2;
    }
    log::error!(target: "usher", "webhook {url}: {} not delivered", body["event"]);
}
