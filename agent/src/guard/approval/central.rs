//! The central service's side of command approvals, as usherd sees it (../README.md,
//! "Requests and decisions"): a pending request is posted to `POST
//! /api/v1/agent/commands`, and its outcome long-polled from `GET
//! /api/v1/agent/commands/{id}?wait=N`, with the host's token of `[service]`.
//!
//! The outcome counts only as a JWT signed with the service's issuer key, checked as a
//! grant of that issuer is (the keys of its `[[issuer]]`, refreshed on an unknown `kid`),
//! with header `typ` `usher-command+jwt`, `aud` this host, `jti` the request's id. The
//! service's word without such a token (a stolen host token can make the service's
//! answers say anything) is never an approval: whatever does not verify is an error.

use crate::config::{ServiceEndpoint, ServiceToken};
use crate::grant::Verifier;
use crate::service::{call, check_scheme, http_client, ServiceError};
use std::time::Duration;
use usher_trust::{Expect, IssuerKeys};
use usher_wire::approval::{
    CommandRequest, CommandState, CommandStatus, DecisionAnswer, DecisionClaims, DECISION_JWT_TYPE,
};

/// Why no decision came from the service (never an approval).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the host's token: {0}")]
    Token(std::io::Error),
    #[error(
        "the service {0:?} is not a trusted [[issuer]] here: its decisions cannot be verified"
    )]
    IssuerNotTrusted(String),
    #[error("{0:?} is not a command request id")]
    BadId(String),
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// The request ended at the service without a decision (expired, or cancelled).
    #[error("the request ended without a decision: {0:?}")]
    NoDecision(CommandState),
    #[error("the service says {0:?} but sent no signed decision")]
    Unsigned(CommandState),
    #[error("the decision's header typ is {0:?}, not {DECISION_JWT_TYPE:?}")]
    WrongType(Option<String>),
    #[error("the decision does not verify: {0}")]
    Unverified(#[from] usher_trust::Refusal),
    #[error("the decision's claims are not a decision's: {0}")]
    Claims(String),
    #[error("the decision is for host {0:?}, not this one")]
    WrongHost(String),
    #[error("the decision is for request {got:?}, not {want:?}")]
    WrongRequest { got: String, want: String },
    #[error("a signed decision says {0:?}: only approved or denied is a decision")]
    NotADecision(CommandState),
    #[error("the service answered {answered:?} but its signed decision says {signed:?}")]
    Mismatch {
        answered: CommandState,
        signed: CommandState,
    },
}

/// The service, as far as command approvals go, for one host.
pub struct Central {
    http: reqwest::Client,
    base: String,
    token: String,
    host: String,
    keys: IssuerKeys,
    leeway_secs: u64,
    wait_secs: u64,
}

/// A request id as the agent makes them: `apr-` and 32 lowercase hex digits.
fn is_request_id(id: &str) -> bool {
    id.strip_prefix("apr-").is_some_and(|hex| {
        hex.len() == 32
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

fn read_token(token: &ServiceToken) -> Result<String, Error> {
    match token {
        ServiceToken::Inline(t) => Ok(t.clone()),
        ServiceToken::File(path) => std::fs::read_to_string(path)
            .map(|t| t.trim().to_string())
            .map_err(|e| {
                Error::Token(std::io::Error::new(
                    e.kind(),
                    format!("{}: {e}", path.display()),
                ))
            }),
    }
}

impl Central {
    /// `endpoint` (`[service]`), this host's name (the decisions' `aud`), and the keys of
    /// the service's issuer, whose `iss` the decisions must carry.
    pub fn new(
        endpoint: &ServiceEndpoint,
        host: &str,
        keys: IssuerKeys,
        leeway_secs: u64,
    ) -> Result<Central, Error> {
        check_scheme(&endpoint.url)?;
        let wait_secs = endpoint.wait_secs.clamp(1, 60);
        Ok(Central {
            http: http_client(endpoint.ca.as_deref(), Duration::from_secs(wait_secs + 20))?,
            base: endpoint.url.trim_end_matches('/').to_string(),
            token: read_token(&endpoint.token)?,
            host: host.to_string(),
            keys,
            leeway_secs,
            wait_secs,
        })
    }

    /// As `new`, with the keys the agent's verifier holds for the issuer named like the
    /// service (`[[issuer]] iss` = `[service] url`, as collector/WORKFLOW.md sets it up)
    /// and its clock leeway.
    pub fn from_verifier(
        endpoint: &ServiceEndpoint,
        host: &str,
        verifier: &Verifier,
    ) -> Result<Central, Error> {
        let iss = endpoint.url.trim_end_matches('/');
        let keys = verifier
            .issuer_keys(iss)
            .ok_or_else(|| Error::IssuerNotTrusted(iss.to_string()))?;
        Central::new(endpoint, host, keys, verifier.leeway_secs())
    }

    /// Posts a pending request (its `host` must be this one: the service refuses others).
    /// Posting the same request again is harmless.
    pub async fn submit(&self, request: &CommandRequest) -> Result<(), Error> {
        if !is_request_id(&request.id) {
            return Err(Error::BadId(request.id.clone()));
        }
        let url = format!("{}/api/v1/agent/commands", self.base);
        let post = self.http.post(&url).bearer_auth(&self.token).json(request);
        let _: CommandStatus = call(&url, post).await?;
        Ok(())
    }

    /// Waits up to `[service] wait_secs` for the decision on request `id`: `None` while it
    /// is pending (ask again), the verified claims once decided (`decision` is `Approved`
    /// or `Denied`); an error when it ended without one or anything fails to verify.
    pub async fn wait(&self, id: &str) -> Result<Option<DecisionClaims>, Error> {
        if !is_request_id(id) {
            return Err(Error::BadId(id.to_string()));
        }
        let url = format!("{}/api/v1/agent/commands/{id}", self.base);
        let get = self
            .http
            .get(&url)
            .query(&[("wait", self.wait_secs)])
            .bearer_auth(&self.token);
        let answer: DecisionAnswer = call(&url, get).await?;
        match answer.state {
            CommandState::Pending => Ok(None),
            CommandState::Expired | CommandState::Cancelled => Err(Error::NoDecision(answer.state)),
            answered @ (CommandState::Approved | CommandState::Denied) => {
                let token = answer.decision.ok_or(Error::Unsigned(answered))?;
                let claims = verify_decision(
                    &token,
                    &self.keys,
                    &self.host,
                    id,
                    crate::grant::now(),
                    self.leeway_secs,
                )
                .await?;
                if claims.decision != answered {
                    return Err(Error::Mismatch {
                        answered,
                        signed: claims.decision,
                    });
                }
                Ok(Some(claims))
            }
        }
    }

    /// Tells the service the host no longer waits for request `id` (the user cancelled,
    /// the process or session went away). Its answer: the state the request ended in.
    pub async fn cancel(&self, id: &str) -> Result<CommandState, Error> {
        if !is_request_id(id) {
            return Err(Error::BadId(id.to_string()));
        }
        let url = format!("{}/api/v1/agent/commands/{id}/cancel", self.base);
        let post = self.http.post(&url).bearer_auth(&self.token);
        let answer: DecisionAnswer = call(&url, post).await?;
        Ok(answer.state)
    }
}

/// Checks a decision JWT as a grant of the service's issuer is checked (signature by one of
/// `keys`, refreshed on an unknown `kid`; `iss`; `exp` with the leeway), and what makes it
/// a decision on this host's request `id`: `typ`, `aud` = `host`, `jti` = `id`, a decision.
pub async fn verify_decision(
    token: &str,
    keys: &IssuerKeys,
    host: &str,
    id: &str,
    now: i64,
    leeway_secs: u64,
) -> Result<DecisionClaims, Error> {
    let token = token.trim();
    if token.len() > usher_trust::MAX_TOKEN_BYTES {
        return Err(usher_trust::Refusal::from(usher_trust::Malformed::TooLong).into());
    }
    // Before the signature: a grant (typ JWT) signed by the same key is not a decision,
    // whatever its claims say.
    let header = jsonwebtoken::decode_header(token).map_err(|e| {
        usher_trust::Refusal::from(usher_trust::Malformed::Undecodable {
            part: usher_trust::Part::Header,
            why: e.to_string(),
        })
    })?;
    if header.typ.as_deref() != Some(DECISION_JWT_TYPE) {
        return Err(Error::WrongType(header.typ));
    }
    let audiences = [host.to_string()];
    let expect = Expect {
        audiences: &audiences,
        leeway_secs,
        now,
    };
    let verified = keys.verify(token, &expect).await?;
    let claims: DecisionClaims = serde_json::from_value(serde_json::Value::Object(verified))
        .map_err(|e| Error::Claims(e.to_string()))?;
    if claims.iss != keys.iss() {
        return Err(Error::Claims(format!("iss {:?}", claims.iss)));
    }
    if claims.aud != host {
        return Err(Error::WrongHost(claims.aud));
    }
    if claims.jti != id {
        return Err(Error::WrongRequest {
            got: claims.jti,
            want: id.to_string(),
        });
    }
    if !matches!(
        claims.decision,
        CommandState::Approved | CommandState::Denied
    ) {
        return Err(Error::NotADecision(claims.decision));
    }
    Ok(claims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use usher_collector::config::{AgentConfig, Config};
    use usher_collector::workflow::commands::SignedDecision;
    use usher_collector::workflow::issuer::Issuer;
    use usher_wire::approval::CommandKind;
    use usher_wire::jit::{Decision, Principal, Review, Role};

    const ISS: &str = "https://usher.test";

    fn request_id() -> String {
        format!("apr-{}", hex::encode(rand::random::<[u8; 16]>()))
    }

    fn request(id: &str, host: &str) -> CommandRequest {
        let now = crate::grant::now();
        CommandRequest {
            id: id.into(),
            host: host.into(),
            session_id: "sess-1".into(),
            grant: "g-1".into(),
            sub: "s-alice".into(),
            login: "jit-alice".into(),
            kind: CommandKind::Exec,
            program: "/usr/bin/systemctl".into(),
            command: "systemctl restart nginx".into(),
            approvers: vec![],
            required: 1,
            requested_at: now,
            expires_at: now + 120,
        }
    }

    fn claims(id: &str, aud: &str, decision: CommandState, now: i64) -> SignedDecision {
        SignedDecision {
            claims: DecisionClaims {
                iss: ISS.into(),
                aud: aud.into(),
                jti: id.into(),
                iat: now,
                exp: now + 60,
                decision,
                by: vec!["bob".into()],
                comment: String::new(),
            },
            sub: "s-alice".into(),
        }
    }

    fn keys_of(issuer: &Issuer) -> IssuerKeys {
        IssuerKeys::fixed(&issuer.iss, issuer.jwks())
    }

    async fn check(
        token: &str,
        keys: &IssuerKeys,
        id: &str,
        now: i64,
    ) -> Result<DecisionClaims, Error> {
        verify_decision(token, keys, "web-1", id, now, 30).await
    }

    #[tokio::test]
    async fn only_a_decision_of_the_services_key_for_this_host_and_request_verifies() {
        let service = Issuer::new(ISS, &Issuer::generate_secret()).unwrap();
        let stranger = Issuer::new(ISS, &Issuer::generate_secret()).unwrap();
        let keys = keys_of(&service);
        let (id, now) = (request_id(), crate::grant::now());
        let good = service
            .sign_typed(
                DECISION_JWT_TYPE,
                &claims(&id, "web-1", CommandState::Approved, now),
            )
            .unwrap();
        let c = check(&good, &keys, &id, now).await.unwrap();
        assert_eq!(
            (c.decision, c.by.as_slice()),
            (CommandState::Approved, &["bob".to_string()][..])
        );

        // Another request of this host, or the same id for another host.
        assert!(matches!(
            check(&good, &keys, &request_id(), now).await,
            Err(Error::WrongRequest { .. })
        ));
        let other_host = service
            .sign_typed(
                DECISION_JWT_TYPE,
                &claims(&id, "web-2", CommandState::Approved, now),
            )
            .unwrap();
        assert!(matches!(
            check(&other_host, &keys, &id, now).await,
            Err(Error::Unverified(
                usher_trust::Refusal::WrongAudience { .. }
            ))
        ));
        // The right claims under another typ (a grant's), or none.
        let as_grant = service
            .sign(&claims(&id, "web-1", CommandState::Approved, now))
            .unwrap();
        assert!(matches!(
            check(&as_grant, &keys, &id, now).await,
            Err(Error::WrongType(Some(t))) if t == "JWT"
        ));
        // Signed by another key, under the service's kid or its own.
        let forged = stranger
            .sign_typed(
                DECISION_JWT_TYPE,
                &claims(&id, "web-1", CommandState::Approved, now),
            )
            .unwrap();
        assert!(matches!(
            check(&forged, &keys, &id, now).await,
            Err(Error::Unverified(usher_trust::Refusal::UnknownKey { .. }))
        ));
        let parts: Vec<&str> = forged.split('.').collect();
        let good_header = good.split('.').next().unwrap();
        let under_our_kid = format!("{good_header}.{}.{}", parts[1], parts[2]);
        assert!(matches!(
            check(&under_our_kid, &keys, &id, now).await,
            Err(Error::Unverified(usher_trust::Refusal::BadSignature))
        ));
        // Tampered claims: "denied" made "approved".
        let denied = service
            .sign_typed(
                DECISION_JWT_TYPE,
                &claims(&id, "web-1", CommandState::Denied, now),
            )
            .unwrap();
        let approved_body = good.split('.').nth(1).unwrap();
        let d: Vec<&str> = denied.split('.').collect();
        let flipped = format!("{}.{approved_body}.{}", d[0], d[2]);
        assert!(matches!(
            check(&flipped, &keys, &id, now).await,
            Err(Error::Unverified(usher_trust::Refusal::BadSignature))
        ));
        // Out of date; a state that is no decision; another issuer's name.
        assert!(matches!(
            check(&good, &keys, &id, now + 600).await,
            Err(Error::Unverified(usher_trust::Refusal::Expired { .. }))
        ));
        let pending = service
            .sign_typed(
                DECISION_JWT_TYPE,
                &claims(&id, "web-1", CommandState::Pending, now),
            )
            .unwrap();
        assert!(matches!(
            check(&pending, &keys, &id, now).await,
            Err(Error::NotADecision(CommandState::Pending))
        ));
        let elsewhere = Issuer::new("https://elsewhere.test", &Issuer::generate_secret()).unwrap();
        let mut c = claims(&id, "web-1", CommandState::Approved, now);
        c.claims.iss = elsewhere.iss.clone();
        let from_elsewhere = elsewhere.sign_typed(DECISION_JWT_TYPE, &c).unwrap();
        assert!(matches!(
            check(&from_elsewhere, &keys, &id, now).await,
            Err(Error::Unverified(usher_trust::Refusal::UnknownIssuer(_)))
        ));
        assert!(matches!(
            check("not.a.token", &keys, &id, now).await,
            Err(Error::Unverified(_))
        ));
    }

    /// The real service (the collector's router, in this process, on loopback), its keys
    /// found by discovery as usherd finds them: submit, an approver approves, `wait` gets
    /// the verified decision; web-2's client cannot read it; a denial and a cancel.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_real_services_decision_verifies_and_another_hosts_does_not() {
        let dir = std::env::temp_dir().join(format!("usher-central-{}", request_id()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let agent = |host: &str| AgentConfig {
            host: host.into(),
            token: format!("token-{host}"),
            host_key: usher_collector::uploader::openssh_public_line(
                &ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
            ),
            labels: vec![],
        };
        let config = Config {
            listen: "127.0.0.1:0".into(),
            data_dir: dir.clone(),
            public_url: Some(url.clone()),
            roles: BTreeMap::from([(Role::Approver, vec!["sre".into()])]),
            agents: vec![agent("web-1"), agent("web-2")],
            ..Config::default()
        };
        let app = Arc::new(usher_collector::api::App::new(config).await.unwrap());
        let router = usher_collector::api::router(app.clone());
        let server = tokio::spawn(async move { axum::serve(listener, router).await });

        let endpoint = |host: &str| ServiceEndpoint {
            url: url.clone(),
            token: ServiceToken::Inline(format!("token-{host}")),
            ca: None,
            wait_secs: 2,
        };
        let discovered = IssuerKeys::new(&usher_trust::IssuerConfig::discovery(&url)).unwrap();
        let web1 = Central::new(&endpoint("web-1"), "web-1", discovered.clone(), 30).unwrap();
        let web2 = Central::new(&endpoint("web-2"), "web-2", discovered.clone(), 30).unwrap();
        let bob = Principal {
            sub: "s-bob".into(),
            name: "bob".into(),
            groups: vec!["sre".into()],
            roles: [Role::Approver].into(),
        };
        let review = |decision| Review {
            decision,
            comment: "ok".into(),
        };

        let id = request_id();
        web1.submit(&request(&id, "web-1")).await.unwrap();
        web1.submit(&request(&id, "web-1")).await.unwrap();
        assert!(matches!(
            web2.submit(&request(&request_id(), "web-1")).await,
            Err(Error::Service(e)) if e.status() == Some(403)
        ));
        assert_eq!(
            web1.wait(&id).await.unwrap(),
            None,
            "pending: no decision yet"
        );
        app.workflow
            .review_command(&bob, &id, review(Decision::Approve), crate::grant::now())
            .await
            .unwrap();
        let decided = web1.wait(&id).await.unwrap().expect("a decision");
        assert_eq!(decided.decision, CommandState::Approved);
        assert_eq!(
            (decided.aud.as_str(), decided.jti.as_str()),
            ("web-1", id.as_str())
        );
        assert_eq!(decided.iss, url);
        assert_eq!(decided.by, vec!["bob".to_string()]);
        assert!(matches!(
            web2.wait(&id).await,
            Err(Error::Service(e)) if e.status() == Some(404)
        ));
        // A client of this host that trusts another key refuses the same decision.
        let stranger = Issuer::new(&url, &Issuer::generate_secret()).unwrap();
        let fooled = Central::new(&endpoint("web-1"), "web-1", keys_of(&stranger), 30).unwrap();
        assert!(matches!(
            fooled.wait(&id).await,
            Err(Error::Unverified(usher_trust::Refusal::UnknownKey { .. }))
        ));
        // A client that thinks it is another host refuses it too.
        let confused = Central::new(&endpoint("web-1"), "web-2", discovered.clone(), 30).unwrap();
        assert!(matches!(
            confused.wait(&id).await,
            Err(Error::Unverified(
                usher_trust::Refusal::WrongAudience { .. }
            ))
        ));

        let denied = request_id();
        web1.submit(&request(&denied, "web-1")).await.unwrap();
        app.workflow
            .review_command(&bob, &denied, review(Decision::Deny), crate::grant::now())
            .await
            .unwrap();
        let d = web1.wait(&denied).await.unwrap().expect("a decision");
        assert_eq!(d.decision, CommandState::Denied);

        let cancelled = request_id();
        web1.submit(&request(&cancelled, "web-1")).await.unwrap();
        assert_eq!(
            web1.cancel(&cancelled).await.unwrap(),
            CommandState::Cancelled
        );
        assert!(matches!(
            web1.wait(&cancelled).await,
            Err(Error::NoDecision(CommandState::Cancelled))
        ));
        assert!(matches!(web1.wait("../grants").await, Err(Error::BadId(_))));

        server.abort();
        drop(app);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
