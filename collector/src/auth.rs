//! Who is calling: a person (the page's session cookie, or an API token from `usher login`
//! as a bearer token). Agents are recognised by their own tokens in `api.rs`.
//!
//! A signed-in browser holds the API token in an HttpOnly, Secure, SameSite cookie; a
//! request that changes state with that cookie must also carry the CSRF token (derived
//! from the session token, so a page on another site can neither read nor forge it) in
//! the `X-Usher-CSRF` header. The page gets it rendered into its HTML.

use crate::workflow::issuer::{Issuer, TokenRefused};
use axum::http::{header, HeaderMap, Method};
use sha2::Digest;
use usher_wire::jit::{Principal, Role};

pub const SESSION_COOKIE: &str = "usher_session";
pub const CSRF_HEADER: &str = "x-usher-csrf";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("sign in first")]
    NoCredentials,
    #[error("the sign-in is not valid: {0}")]
    BadToken(#[from] TokenRefused),
    #[error("missing or wrong CSRF token")]
    Csrf,
    #[error("this needs the {0:?} role")]
    MissingRole(Role),
}

/// The CSRF token that goes with a session token.
pub fn csrf_token(session_token: &str) -> String {
    let digest = sha2::Sha256::digest(format!("usher-csrf-v1\n{session_token}"));
    hex::encode(&digest[..16])
}

/// The session cookie for a new sign-in.
pub fn session_cookie(token: &str, max_age_secs: i64) -> String {
    format!(
        "{SESSION_COOKIE}={token}; Path=/; Max-Age={max_age_secs}; HttpOnly; Secure; SameSite=Strict"
    )
}

/// The cookie that ends a sign-in.
pub fn clear_session_cookie() -> String {
    format!("{SESSION_COOKIE}=; Path=/; Max-Age=0; HttpOnly; Secure; SameSite=Strict")
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// The person behind a request. Bearer tokens are not sent by browsers on their own, so
/// only the cookie path needs the CSRF check.
pub fn principal(
    issuer: &Issuer,
    headers: &HeaderMap,
    method: &Method,
    now: i64,
) -> Result<Principal, AuthError> {
    if let Some(token) = bearer(headers) {
        return Ok(issuer.principal(token, now)?);
    }
    let token = cookie(headers, SESSION_COOKIE).ok_or(AuthError::NoCredentials)?;
    let principal = issuer.principal(token, now)?;
    let safe = matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe {
        let sent = headers.get(CSRF_HEADER).and_then(|v| v.to_str().ok());
        if sent != Some(csrf_token(token).as_str()) {
            return Err(AuthError::Csrf);
        }
    }
    Ok(principal)
}

/// `principal` holds `role` (admins hold every role).
pub fn require(principal: &Principal, role: Role) -> Result<(), AuthError> {
    if principal.roles.contains(&role) || principal.roles.contains(&Role::Admin) {
        Ok(())
    } else {
        Err(AuthError::MissingRole(role))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn setup() -> (Issuer, String, Principal) {
        let issuer = Issuer::new("https://usher.test", &Issuer::generate_secret()).unwrap();
        let p = Principal {
            sub: "s-alice".into(),
            name: "alice".into(),
            groups: vec![],
            roles: [Role::Requester].into(),
        };
        let now = crate::workflow::now();
        let token = issuer.api_token(&p, now, 600).unwrap();
        (issuer, token, p)
    }

    #[test]
    fn a_cookie_needs_the_csrf_token_to_change_anything() {
        let (issuer, token, p) = setup();
        let now = crate::workflow::now();
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_str(&format!("theme=dark; {SESSION_COOKIE}={token}")).unwrap(),
        );
        assert_eq!(principal(&issuer, &h, &Method::GET, now), Ok(p.clone()));
        assert_eq!(
            principal(&issuer, &h, &Method::POST, now),
            Err(AuthError::Csrf)
        );
        h.insert(CSRF_HEADER, HeaderValue::from_str("0000").unwrap());
        assert_eq!(
            principal(&issuer, &h, &Method::POST, now),
            Err(AuthError::Csrf)
        );
        h.insert(
            CSRF_HEADER,
            HeaderValue::from_str(&csrf_token(&token)).unwrap(),
        );
        assert_eq!(principal(&issuer, &h, &Method::POST, now), Ok(p));
    }

    #[test]
    fn a_bearer_token_needs_no_csrf_and_roles_are_checked() {
        let (issuer, token, p) = setup();
        let now = crate::workflow::now();
        let mut h = HeaderMap::new();
        assert_eq!(
            principal(&issuer, &h, &Method::GET, now),
            Err(AuthError::NoCredentials)
        );
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Bearer {token}")).unwrap(),
        );
        assert_eq!(principal(&issuer, &h, &Method::POST, now), Ok(p.clone()));
        assert_eq!(require(&p, Role::Requester), Ok(()));
        assert_eq!(
            require(&p, Role::Approver),
            Err(AuthError::MissingRole(Role::Approver))
        );
    }
}
