//! `POST /api/v1/token`: RFC 8693 token exchange for workloads. The rules and the workload
//! token's verification come from usher-trust (helper jit-trust); until it is merged the
//! endpoint refuses every exchange with a reason.

use crate::api::App;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::sync::Arc;
use usher_wire::jit::OAuthError;

pub(crate) fn oauth_error(status: StatusCode, error: &str, description: String) -> Response {
    (
        status,
        Json(OAuthError {
            error: error.to_string(),
            error_description: Some(description),
            request_id: None,
        }),
    )
        .into_response()
}

pub async fn token(State(_app): State<Arc<App>>) -> Response {
    oauth_error(
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "token exchange is not available in this build yet".into(),
    )
}
