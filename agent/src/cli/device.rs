//! The OAuth 2.0 device authorization grant (RFC 8628) against the service's identity
//! provider, found by OpenID Connect discovery: the person opens a URL on any device,
//! enters a short code, signs in there; `usher login` waits for the provider's ID token.

use crate::service::{call, check_scheme, ServiceError};
use serde::Deserialize;
use std::time::{Duration, Instant};
use usher_wire::jit::LoginConfig;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("identity provider: {0}")]
    Provider(#[from] ServiceError),
    #[error("the provider's discovery document names issuer {got:?}, the service trusts {want:?}")]
    IssuerMismatch { got: String, want: String },
    #[error("the provider at {0} does not offer the device authorization grant")]
    NoDeviceFlow(String),
    #[error("the sign-in was refused at the provider ({0})")]
    Denied(String),
    #[error("the code expired before the sign-in was finished: run `usher login` again")]
    Expired,
    #[error("the provider answered without an ID token (is \"openid\" among the scopes?)")]
    NoIdToken,
}

#[derive(Deserialize)]
struct Discovery {
    issuer: String,
    token_endpoint: String,
    #[serde(default)]
    device_authorization_endpoint: Option<String>,
}

/// What the provider says to show the person.
#[derive(Debug, Clone, Deserialize)]
pub struct DeviceCode {
    device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    #[serde(default)]
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    #[serde(default)]
    interval: Option<u64>,
}

#[derive(Deserialize)]
struct Tokens {
    #[serde(default)]
    id_token: Option<String>,
}

/// A started sign-in: show [`DeviceCode`], then [`Pending::wait`].
pub struct Pending {
    http: reqwest::Client,
    token_endpoint: String,
    client_id: String,
    pub code: DeviceCode,
}

/// Discovers the provider and asks it for a device code.
pub async fn start(http: &reqwest::Client, config: &LoginConfig) -> Result<Pending, DeviceError> {
    let issuer = config.issuer.trim_end_matches('/');
    let discovery_url = format!("{issuer}/.well-known/openid-configuration");
    check_scheme(&discovery_url)?;
    let discovery: Discovery = call(&discovery_url, http.get(&discovery_url)).await?;
    if discovery.issuer.trim_end_matches('/') != issuer {
        return Err(DeviceError::IssuerMismatch {
            got: discovery.issuer,
            want: config.issuer.clone(),
        });
    }
    let device_endpoint = discovery
        .device_authorization_endpoint
        .ok_or_else(|| DeviceError::NoDeviceFlow(issuer.to_string()))?;
    check_scheme(&device_endpoint)?;
    check_scheme(&discovery.token_endpoint)?;
    let scope = config.scopes.join(" ");
    let request = http.post(&device_endpoint).form(&[
        ("client_id", config.client_id.as_str()),
        ("scope", scope.as_str()),
    ]);
    let code: DeviceCode = call(&device_endpoint, request).await?;
    Ok(Pending {
        http: http.clone(),
        token_endpoint: discovery.token_endpoint,
        client_id: config.client_id.clone(),
        code,
    })
}

/// RFC 8628 §3.5: five seconds unless the provider says otherwise.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);

impl Pending {
    /// Polls the token endpoint until the person has signed in (the ID token), refused,
    /// or the code expired.
    pub async fn wait(self) -> Result<String, DeviceError> {
        let deadline = Instant::now() + Duration::from_secs(self.code.expires_in);
        let mut interval = self
            .code
            .interval
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_INTERVAL)
            .max(Duration::from_secs(1));
        loop {
            if Instant::now() >= deadline {
                return Err(DeviceError::Expired);
            }
            tokio::time::sleep(interval).await;
            let request = self.http.post(&self.token_endpoint).form(&[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", self.code.device_code.as_str()),
                ("client_id", self.client_id.as_str()),
            ]);
            match call::<Tokens>(&self.token_endpoint, request).await {
                Ok(tokens) => return tokens.id_token.ok_or(DeviceError::NoIdToken),
                Err(ServiceError::Refused {
                    code: Some(code), ..
                }) if code == "authorization_pending" => {}
                Err(ServiceError::Refused {
                    code: Some(code), ..
                }) if code == "slow_down" => interval += Duration::from_secs(5),
                Err(ServiceError::Refused {
                    code: Some(code), ..
                }) if code == "expired_token" => return Err(DeviceError::Expired),
                Err(ServiceError::Refused {
                    code: Some(code),
                    message,
                    ..
                }) if code == "access_denied" => {
                    return Err(DeviceError::Denied(if message.is_empty() {
                        code
                    } else {
                        message
                    }))
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}
