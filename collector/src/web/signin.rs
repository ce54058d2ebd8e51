//! Signing in and out: the page's authorization code flow (`/login`, `/callback`,
//! `/logout`) and the CLI's exchange of an ID token for an API token (`/api/v1/login`).
//!
//! Between `/login` and `/callback` the browser holds the flow's secrets (state, nonce,
//! PKCE verifier) in a cookie signed by the service's issuer key, valid 10 minutes,
//! `SameSite=Lax` because the callback is a cross-site top-level navigation from the
//! provider. The callback answers with a small page that moves on to `/`: the session
//! cookie is `SameSite=Strict`, and a navigation started by our own page is same-site.

use super::oidc::{self, Identity, OidcError, Provider};
use super::{audit, client_ip, html_page, issuer, json_error, Shared, Web};
use crate::auth;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::sync::Arc;
use usher_wire::jit::{ApiToken, IdToken, LoginConfig, Principal};

/// The cookie that carries one sign-in's secrets from `/login` to `/callback`.
pub const LOGIN_COOKIE: &str = "usher_login";
/// The audience of that cookie's signed content: it is nothing else.
const LOGIN_AUDIENCE: &str = "usher-login";
const LOGIN_TTL_SECS: i64 = 600;
/// How long a sign-in lasts (the API token's and the cookie's lifetime).
pub const SESSION_TTL_SECS: i64 = 12 * 3600;

#[derive(Serialize, Deserialize)]
struct LoginState {
    iss: String,
    aud: String,
    exp: i64,
    state: String,
    nonce: String,
    verifier: String,
}

/// Why a sign-in was refused; what the audit record says.
#[derive(Debug, thiserror::Error)]
pub enum SignInRefused {
    #[error("sign-in with OpenID Connect is not configured")]
    NotConfigured,
    #[error("too many sign-in attempts from this address")]
    RateLimited,
    #[error("the sign-in expired or did not start here")]
    NoLoginState,
    #[error("the answer is not for this sign-in (state)")]
    WrongState,
    #[error("the identity provider said: {0}")]
    ProviderError(String),
    #[error("no code in the provider's answer")]
    NoCode,
    #[error("the body is not {{\"id_token\": …}}: {0}")]
    BadBody(String),
    #[error(transparent)]
    Oidc(#[from] OidcError),
    #[error("the service cannot sign: {0}")]
    Issuer(String),
}

impl SignInRefused {
    fn status(&self) -> StatusCode {
        match self {
            SignInRefused::NotConfigured => StatusCode::NOT_FOUND,
            SignInRefused::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            SignInRefused::Oidc(OidcError::IdToken(_)) => StatusCode::UNAUTHORIZED,
            SignInRefused::Oidc(_) => StatusCode::BAD_GATEWAY,
            SignInRefused::Issuer(_) => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            SignInRefused::NotConfigured => "not_found",
            SignInRefused::RateLimited => "rate_limited",
            SignInRefused::Oidc(OidcError::IdToken(_)) => "unauthorized",
            SignInRefused::Oidc(_) | SignInRefused::Issuer(_) => "internal",
            _ => "bad_request",
        }
    }
}

fn login_cookie(value: &str, max_age: i64) -> String {
    format!(
        "{LOGIN_COOKIE}={value}; Path=/callback; Max-Age={max_age}; HttpOnly; Secure; SameSite=Lax"
    )
}

/// The page's redirect URI at the provider.
fn redirect_uri(app: &crate::api::App) -> String {
    format!("{}/callback", app.config.public_url())
}

fn scopes(groups_claim: &str) -> Vec<String> {
    let mut scopes: Vec<String> = ["openid", "profile", "email"].map(String::from).to_vec();
    // Providers that put groups behind a scope of the same name (Dex, oidc-provider's
    // usual set-up) need it asked for; the others ignore it.
    if groups_claim == "groups" {
        scopes.push("groups".into());
    }
    scopes
}

/// The principal an identity is, with roles from `[roles]`.
pub fn principal_of(app: &crate::api::App, who: Identity) -> Principal {
    // The workflow maps groups to roles with the current (reloadable) `[roles]`; a
    // person without groups gets no role.
    app.workflow.effective(Principal {
        sub: who.sub,
        name: who.name,
        groups: who.groups,
        roles: Default::default(),
    })
}

fn rate_limit(web: &Web, extensions: &axum::http::Extensions) -> Result<(), SignInRefused> {
    // A request whose address is unknown counts against one shared bucket.
    let key = client_ip(extensions).map_or_else(|| "unknown".to_string(), |ip| ip.to_string());
    if web.limiter.allow(&key) {
        Ok(())
    } else {
        Err(SignInRefused::RateLimited)
    }
}

fn refused_page(r: &SignInRefused) -> Response {
    let body = format!(
        "<h1>Sign-in refused</h1><p id=\"refused\">{}</p><p><a href=\"/login\">Try again</a></p>",
        super::escape_html(&r.to_string())
    );
    html_page(r.status(), "Sign-in refused", &body)
}

async fn provider(app: &crate::api::App, web: &Web) -> Result<Arc<Provider>, SignInRefused> {
    let config = app
        .config
        .oidc
        .as_ref()
        .ok_or(SignInRefused::NotConfigured)?;
    web.provider(config).await.map_err(SignInRefused::from)
}

/// `GET /login`: off to the provider, with this sign-in's secrets in a cookie.
pub async fn login(
    State(app): State<Shared>,
    Extension(web): Extension<Arc<Web>>,
    extensions: axum::http::Extensions,
) -> Response {
    match start(&app, &web, &extensions).await {
        Ok(r) => r,
        Err(e) => {
            log::warn!(target: "usher", "sign-in not started: {e}");
            refused_page(&e)
        }
    }
}

async fn start(
    app: &crate::api::App,
    web: &Web,
    extensions: &axum::http::Extensions,
) -> Result<Response, SignInRefused> {
    rate_limit(web, extensions)?;
    let provider = provider(app, web).await?;
    let config = app
        .config
        .oidc
        .as_ref()
        .ok_or(SignInRefused::NotConfigured)?;
    let issuer = issuer(app);
    let secrets = LoginState {
        iss: issuer.iss.clone(),
        aud: LOGIN_AUDIENCE.into(),
        exp: crate::workflow::now() + LOGIN_TTL_SECS,
        state: oidc::random_token(),
        nonce: oidc::random_token(),
        verifier: oidc::random_token(),
    };
    let signed = issuer
        .sign(&secrets)
        .map_err(|e| SignInRefused::Issuer(e.to_string()))?;
    let to = provider.authorization_url(
        &config.client_id,
        &redirect_uri(app),
        &scopes(&config.roles_claim),
        &secrets.state,
        &secrets.nonce,
        &secrets.verifier,
    );
    let mut response = StatusCode::SEE_OTHER.into_response();
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&to) {
        headers.insert(header::LOCATION, v);
    }
    if let Ok(v) = HeaderValue::from_str(&login_cookie(&signed, LOGIN_TTL_SECS)) {
        headers.insert(header::SET_COOKIE, v);
    }
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[derive(Deserialize)]
pub struct CallbackQuery {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

/// `GET /callback`: the provider sends the browser back with a code.
pub async fn callback(
    State(app): State<Shared>,
    Extension(web): Extension<Arc<Web>>,
    extensions: axum::http::Extensions,
    headers: HeaderMap,
    Query(q): Query<CallbackQuery>,
) -> Response {
    let result = finish(&app, &web, &extensions, &headers, q).await;
    let mut response = match result {
        Ok(principal) => {
            audit(
                &app,
                "login",
                &principal.name,
                json!({"via": "web", "sub": principal.sub,
                "groups": principal.groups, "roles": principal.roles}),
            )
            .await;
            match issuer(&app).api_token(&principal, crate::workflow::now(), SESSION_TTL_SECS) {
                Ok(token) => signed_in_page(&token),
                Err(e) => refused_page(&SignInRefused::Issuer(e.to_string())),
            }
        }
        Err(e) => {
            log::warn!(target: "usher", "sign-in refused: {e}");
            if !matches!(e, SignInRefused::RateLimited) {
                audit(
                    &app,
                    "login.refused",
                    "unknown",
                    json!({"via": "web", "reason": e.to_string()}),
                )
                .await;
            }
            refused_page(&e)
        }
    };
    // One use only, whatever the outcome.
    if let Ok(v) = HeaderValue::from_str(&login_cookie("", 0)) {
        response.headers_mut().append(header::SET_COOKIE, v);
    }
    response
}

async fn finish(
    app: &crate::api::App,
    web: &Web,
    extensions: &axum::http::Extensions,
    headers: &HeaderMap,
    q: CallbackQuery,
) -> Result<Principal, SignInRefused> {
    rate_limit(web, extensions)?;
    let config = app
        .config
        .oidc
        .as_ref()
        .ok_or(SignInRefused::NotConfigured)?;
    let issuer = issuer(app);
    let now = crate::workflow::now();
    let secrets: LoginState = auth::cookie(headers, LOGIN_COOKIE)
        .and_then(|c| issuer.verify::<LoginState>(c).ok())
        .filter(|s| s.aud == LOGIN_AUDIENCE && s.iss == issuer.iss && now < s.exp)
        .ok_or(SignInRefused::NoLoginState)?;
    // The state is checked before anything else the answer says, errors included: an
    // answer for another sign-in is not ours to act on.
    if q.state.as_deref() != Some(secrets.state.as_str()) {
        return Err(SignInRefused::WrongState);
    }
    if let Some(error) = q.error {
        let description = q.error_description.unwrap_or_default();
        return Err(SignInRefused::ProviderError(
            format!("{error} {description}").trim().to_string(),
        ));
    }
    let code = q
        .code
        .filter(|c| !c.is_empty())
        .ok_or(SignInRefused::NoCode)?;
    let provider = provider(app, web).await?;
    let (id_token, access_token) = provider
        .exchange_code(
            &config.client_id,
            config.client_secret.as_deref(),
            &redirect_uri(app),
            &code,
            &secrets.verifier,
        )
        .await?;
    let (mut who, claims) = provider
        .verify_id_token(
            &id_token,
            &config.client_id,
            Some(&secrets.nonce),
            &config.roles_claim,
            now,
        )
        .await?;
    // Providers that keep scope claims out of ID tokens answer them at userinfo.
    if oidc::groups(&claims, &config.roles_claim).is_none() {
        if let Some(access) = access_token {
            if let Some(info) = provider.userinfo(&access).await? {
                if info.get("sub").and_then(|s| s.as_str()) == Some(who.sub.as_str()) {
                    who.groups = oidc::groups(&info, &config.roles_claim).unwrap_or_default();
                }
            }
        }
    }
    Ok(principal_of(app, who))
}

/// The callback's answer: the session cookie, and a page that moves on to `/` by itself
/// (a same-site navigation, so the Strict cookie goes with it).
fn signed_in_page(token: &str) -> Response {
    let mut response = html_page(
        StatusCode::OK,
        "Signed in",
        "<p id=\"signed-in\">Signed in. <a href=\"/\">Continue</a></p>",
    );
    let headers = response.headers_mut();
    headers.insert(header::REFRESH, HeaderValue::from_static("0; url=/"));
    if let Ok(v) = HeaderValue::from_str(&auth::session_cookie(token, SESSION_TTL_SECS)) {
        headers.append(header::SET_COOKIE, v);
    }
    response
}

/// `POST /logout`: the cookie goes. With a cookie, the CSRF header is needed (a page on
/// another site must not sign people out).
pub async fn logout(State(app): State<Shared>, method: Method, headers: HeaderMap) -> Response {
    let now = crate::workflow::now();
    match auth::principal(issuer(&app), &headers, &method, now) {
        Ok(p) => audit(&app, "logout", &p.name, json!({"sub": p.sub})).await,
        Err(auth::AuthError::Csrf) => {
            return json_error(
                StatusCode::FORBIDDEN,
                "forbidden",
                "missing or wrong CSRF token",
            )
        }
        // Nothing valid to end: the cookie is cleared all the same.
        Err(_) => {}
    }
    let mut response = Json(json!({"ok": true})).into_response();
    if let Ok(v) = HeaderValue::from_str(&auth::clear_session_cookie()) {
        response.headers_mut().insert(header::SET_COOKIE, v);
    }
    response
}

/// `GET /api/v1/login/config`: what `usher login` needs for the device flow.
pub async fn login_config(State(app): State<Shared>) -> Response {
    match &app.config.oidc {
        Some(c) => Json(LoginConfig {
            issuer: c.issuer.trim_end_matches('/').to_string(),
            client_id: c
                .cli_client_id
                .clone()
                .unwrap_or_else(|| c.client_id.clone()),
            scopes: scopes(&c.roles_claim),
        })
        .into_response(),
        None => json_error(
            StatusCode::NOT_FOUND,
            "not_found",
            "sign-in is not configured",
        ),
    }
}

/// `POST /api/v1/login {id_token}`: an ID token the provider issued to the CLI's client,
/// exchanged for the service's API token.
pub async fn login_with_id_token(
    State(app): State<Shared>,
    Extension(web): Extension<Arc<Web>>,
    extensions: axum::http::Extensions,
    body: axum::body::Bytes,
) -> Response {
    let result = exchange(&app, &web, &extensions, &body).await;
    match result {
        Ok(answer) => {
            audit(
                &app,
                "login",
                &answer.principal.name,
                json!({"via": "cli",
                "sub": answer.principal.sub, "groups": answer.principal.groups,
                "roles": answer.principal.roles}),
            )
            .await;
            Json(answer).into_response()
        }
        Err(e) => {
            log::warn!(target: "usher", "CLI sign-in refused: {e}");
            if !matches!(e, SignInRefused::RateLimited) {
                audit(
                    &app,
                    "login.refused",
                    "unknown",
                    json!({"via": "cli", "reason": e.to_string()}),
                )
                .await;
            }
            json_error(e.status(), e.code(), &e.to_string())
        }
    }
}

async fn exchange(
    app: &crate::api::App,
    web: &Web,
    extensions: &axum::http::Extensions,
    body: &[u8],
) -> Result<ApiToken, SignInRefused> {
    rate_limit(web, extensions)?;
    let config = app
        .config
        .oidc
        .as_ref()
        .ok_or(SignInRefused::NotConfigured)?;
    let IdToken { id_token } =
        serde_json::from_slice(body).map_err(|e| SignInRefused::BadBody(e.to_string()))?;
    let provider = provider(app, web).await?;
    let client_id = config.cli_client_id.as_deref().unwrap_or(&config.client_id);
    let now = crate::workflow::now();
    let (who, _) = provider
        .verify_id_token(&id_token, client_id, None, &config.roles_claim, now)
        .await?;
    let principal = principal_of(app, who);
    let token = issuer(app)
        .api_token(&principal, now, SESSION_TTL_SECS)
        .map_err(|e| SignInRefused::Issuer(e.to_string()))?;
    Ok(ApiToken {
        token,
        expires_at: now + SESSION_TTL_SECS,
        principal,
    })
}

/// `GET /api/v1/me`: who the caller is.
pub async fn me(State(app): State<Shared>, method: Method, headers: HeaderMap) -> Response {
    match auth::principal(issuer(&app), &headers, &method, crate::workflow::now()) {
        Ok(p) => Json(app.workflow.effective(p)).into_response(),
        Err(e) => json_error(StatusCode::UNAUTHORIZED, "unauthorized", &e.to_string()),
    }
}
