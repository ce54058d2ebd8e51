//! Retention and legal hold (collector/FLEET.md, "Retention").
//!
//! A sweep deletes the sessions whose end (or start, or, without metadata, first contact)
//! is older than `[retention] max_age_days` and that are not under legal hold: each is
//! first marked `deleting` under its row lock (a hold can no longer be set on it, no write
//! lands in it), then its objects are deleted, then its rows; each deletion is an audit
//! event (`recording_deleted`). A sweep interrupted half-way is finished by the next one.
//! One instance sweeps at a time: the sweep holds a lease row in the index.
//!
//! `PUT /api/v1/sessions/{id}/hold` (`{"reason": "…"}`) and `DELETE …/hold`, for auditors
//! and admins, set and lift a hold; both are audit events (`legal_hold_set`,
//! `legal_hold_lifted`).

use super::{index, Inner, Objects, Refused, StoreEvent, DELETING};
use crate::api::App;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::put;
use axum::{Json, Router};
use futures::StreamExt;
use std::sync::Arc;
use usher_wire::collector::ErrorCode;

const LEASE: &str = "retention";
/// How long a sweeper keeps the lease without renewing it (it renews after each
/// session): another instance takes over when a sweeper dies.
const LEASE_SECS: i64 = 300;
/// Sessions taken per round of a sweep.
const ROUND: i64 = 100;

/// Sweeps every `every` while the store lives.
pub(super) fn start(inner: &Arc<Inner>, max_age_days: u64, every: std::time::Duration) {
    let weak = Arc::downgrade(inner);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(inner) = weak.upgrade() else {
                return;
            };
            match sweep(&inner, max_age_days, super::now()).await {
                Ok(deleted) if !deleted.is_empty() => {
                    log::info!(target: "usher", "retention: deleted {} sessions older than {max_age_days} days", deleted.len());
                }
                Ok(_) => {}
                Err(e) => log::warn!(target: "usher", "retention sweep: {e}"),
            }
        }
    });
}

/// One sweep, if this instance gets the lease: the sessions deleted.
pub(super) async fn sweep(
    inner: &Arc<Inner>,
    max_age_days: u64,
    now: i64,
) -> Result<Vec<String>, Refused> {
    let holder = inner.instance.clone();
    if !renew(inner, &holder, now).await? {
        return Ok(Vec::new());
    }
    let result = sweep_held(inner, &holder, max_age_days, now).await;
    let released = {
        let holder = holder.clone();
        inner
            .index
            .transaction(move |tx| index::release_lease(tx, LEASE, &holder).map_err(Refused::from))
            .await
    };
    let deleted = result?;
    released?;
    Ok(deleted)
}

async fn renew(inner: &Arc<Inner>, holder: &str, now: i64) -> Result<bool, Refused> {
    let holder = holder.to_string();
    inner
        .index
        .transaction(move |tx| {
            index::take_lease(tx, LEASE, &holder, now, now + LEASE_SECS).map_err(Refused::from)
        })
        .await
}

/// A session retention is about to delete.
struct Doomed {
    id: String,
    host: String,
    sub: Option<String>,
    bytes: i64,
}

async fn sweep_held(
    inner: &Arc<Inner>,
    holder: &str,
    max_age_days: u64,
    now: i64,
) -> Result<Vec<String>, Refused> {
    let cutoff = now.saturating_sub((max_age_days as i64).saturating_mul(86400));
    let cutoff_text = rfc3339_utc(cutoff);
    let dialect = inner.dialect;
    let mut deleted = Vec::new();
    loop {
        let cutoff_text = cutoff_text.clone();
        let doomed: Vec<Doomed> = inner
            .index
            .transaction(move |tx| -> Result<_, Refused> {
                let candidates = tx.query(
                    &format!(
                        "SELECT id FROM sessions WHERE hold = 0 AND (status = '{DELETING}'
                            OR COALESCE(ended_at, started_at) < $1
                            OR (ended_at IS NULL AND started_at IS NULL AND created_at < $2))
                         ORDER BY id LIMIT $3"
                    ),
                    &[cutoff_text.clone().into(), cutoff.into(), ROUND.into()],
                )?;
                let mut doomed = Vec::new();
                for c in &candidates {
                    let Some(id) = c[0].text() else { continue };
                    // Under the row lock: a hold set since the query keeps it.
                    let rows = tx.query(
                        &format!(
                            "SELECT host, sub, hold FROM sessions WHERE id = $1{}",
                            dialect.for_update()
                        ),
                        &[id.into()],
                    )?;
                    let Some(row) = rows.first() else { continue };
                    if row[2].int().unwrap_or(0) != 0 {
                        continue;
                    }
                    tx.execute(
                        &format!("UPDATE sessions SET status = '{DELETING}' WHERE id = $1"),
                        &[id.into()],
                    )?;
                    let bytes = tx
                        .query(
                            "SELECT CAST(COALESCE(SUM(size), 0) AS BIGINT) FROM chunks WHERE session = $1",
                            &[id.into()],
                        )?
                        .first()
                        .and_then(|r| r[0].int().or_else(|| r[0].text().and_then(|t| t.parse().ok())))
                        .unwrap_or(0);
                    doomed.push(Doomed {
                        id: id.to_string(),
                        host: row[0].text().unwrap_or_default().to_string(),
                        sub: row[1].text().map(String::from),
                        bytes,
                    });
                }
                Ok(doomed)
            })
            .await?;
        if doomed.is_empty() {
            return Ok(deleted);
        }
        for d in doomed {
            delete_objects(&inner.objects, &d.id).await?;
            let id = d.id.clone();
            inner
                .index
                .transaction(move |tx| -> Result<(), Refused> {
                    tx.execute(
                        "DELETE FROM chunks WHERE session = $1",
                        &[id.clone().into()],
                    )?;
                    tx.execute(
                        "DELETE FROM commands WHERE session = $1",
                        &[id.clone().into()],
                    )?;
                    tx.execute(
                        &format!("DELETE FROM sessions WHERE id = $1 AND status = '{DELETING}'"),
                        &[id.clone().into()],
                    )?;
                    Ok(())
                })
                .await?;
            log::info!(target: "usher", "retention: deleted session {} of {} ({} bytes)", d.id, d.host, d.bytes);
            inner.emit(StoreEvent {
                event: "recording_deleted",
                actor: "retention".into(),
                detail: serde_json::json!({
                    "session": d.id, "host": d.host, "sub": d.sub, "bytes": d.bytes,
                    "max_age_days": max_age_days,
                }),
            });
            deleted.push(d.id);
            if !renew(inner, holder, super::now()).await? {
                // Another instance took over (this one was too slow): it finishes.
                return Ok(deleted);
            }
        }
    }
}

/// Every object of session `id` (chunks, metadata, seal).
async fn delete_objects(objects: &Objects, id: &str) -> Result<(), Refused> {
    match objects {
        Objects::Local { root, .. } => {
            let dir = root.join("sessions").join(id);
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(Refused::Internal(format!("{}: {e}", dir.display()))),
            }
        }
        Objects::S3(store) => {
            let prefix = object_store::path::Path::from(format!("sessions/{id}"));
            let listed: Vec<_> = store
                .list(Some(&prefix))
                .collect::<Vec<_>>()
                .await
                .into_iter()
                .collect::<Result<_, _>>()
                .map_err(super::internal)?;
            for meta in listed {
                match store.delete(&meta.location).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                    Err(e) => return Err(super::internal(e)),
                }
            }
            Ok(())
        }
    }
}

/// `secs` (Unix time) as `YYYY-MM-DDTHH:MM:SSZ`, the form session times are compared in.
/// A time before year 0 (a cut-off that far back) reads as year 0: older than any session.
pub fn rfc3339_utc(secs: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_else(|| "0000-01-01T00:00:00Z".to_string())
}

/// The legal-hold routes, merged into the API's router.
pub fn routes() -> Router<Arc<App>> {
    Router::new().route(
        "/api/v1/sessions/{id}/hold",
        put(set_hold).delete(lift_hold),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HoldRequest {
    reason: String,
}

/// The person asking, if they may hold recordings (the auditor role), and the session id
/// checked. A refusal is answered with its Response (the handlers' idiom, on a cold path).
#[allow(clippy::result_large_err)]
fn holder(
    app: &App,
    headers: &HeaderMap,
    method: &Method,
    id: &str,
) -> Result<usher_wire::jit::Principal, Response> {
    let p = crate::api::auditor_for(app, headers, method)?;
    crate::api::check_ids(id, None)?;
    Ok(p)
}

/// Records a hold's change in the audit trail; a failure is logged (the hold stands).
async fn audit_hold(
    app: &App,
    event: &'static str,
    who: &usher_wire::jit::Principal,
    id: &str,
    detail: serde_json::Value,
) {
    if let Err(e) = app
        .workflow
        .record(event, &who.sub, None, detail, crate::workflow::now())
        .await
    {
        log::error!(target: "usher", "{event} on {id}, but not audited: {e}");
    }
}

async fn set_hold(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let p = match holder(&app, &headers, &Method::PUT, &id) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let reason = match serde_json::from_slice::<HoldRequest>(&body) {
        Ok(h) if !h.reason.trim().is_empty() && h.reason.len() <= 1000 => h.reason,
        _ => {
            return crate::api::error(
                StatusCode::BAD_REQUEST,
                ErrorCode::BadRequest,
                "a hold needs {\"reason\": \"…\"} (at most 1000 characters)",
            )
        }
    };
    if let Err(e) = app.store.set_hold(&id, &p.sub, &reason).await {
        return crate::api::refused(e);
    }
    let detail = serde_json::json!({"session": id, "reason": reason, "name": p.name});
    audit_hold(&app, "legal_hold_set", &p, &id, detail).await;
    Json(serde_json::json!({"session": id, "hold": true, "reason": reason})).into_response()
}

async fn lift_hold(
    State(app): State<Arc<App>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let p = match holder(&app, &headers, &Method::DELETE, &id) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if let Err(e) = app.store.lift_hold(&id).await {
        return crate::api::refused(e);
    }
    let detail = serde_json::json!({"session": id, "name": p.name});
    audit_hold(&app, "legal_hold_lifted", &p, &id, detail).await;
    Json(serde_json::json!({"session": id, "hold": false})).into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times_read_as_rfc3339() {
        assert_eq!(super::rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(super::rfc3339_utc(1795000000), "2026-11-18T11:06:40Z");
        assert_eq!(super::rfc3339_utc(951782400), "2000-02-29T00:00:00Z");
        assert_eq!(super::rfc3339_utc(1893456000 - 1), "2029-12-31T23:59:59Z");
    }
}
