//! Turning a compact JWT into a `Grant`, or into a reason why not.
//!
//! The JOSE checks are `usher_trust`'s (the key decides the algorithm: a token whose header
//! names another algorithm than the one its key is for — `none`, HMAC keyed with a public
//! key, RS256 against an EdDSA key — is refused before any signature check); the keys come
//! from its per-issuer cache (a file, a URL, or discovery); what a grant must say and what
//! local policy allows are decided here.
//!
//! A token presented at the SSH prompt may also be a workload's OIDC token: when its issuer
//! is named by a `[[workload]]` rule (and is not a grant issuer), the rule that takes it
//! makes it a grant for the rule's login.

use super::{Audience, Claims, Grant, GrantId};
use crate::config::{Config, PolicyConfig};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::path::PathBuf;
use usher_trust::{Expect, IssuerKeys, NoRule, RefreshNote, TrustedIssuers, WorkloadRule};

pub use usher_trust::{Malformed, Part, UnusableKey};

/// Claims every grant carries; a token without one is malformed, whatever else it says.
const REQUIRED_CLAIMS: [&str; 7] = ["iss", "sub", "aud", "jti", "iat", "exp", "login"];

/// Why a grant was refused. The journal gets `Display`; the client only a generic line.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed token: {0}")]
    Malformed(#[from] Malformed),
    #[error("issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    #[error("no key {kid:?} for issuer {iss:?}")]
    UnknownKey { iss: String, kid: String },
    /// The kid was still unknown after the issuer's keys were refreshed (or could not be).
    #[error("unknown kid {kid:?} for issuer {iss:?} ({refresh})")]
    UnknownKeyAfterRefresh {
        iss: String,
        kid: String,
        refresh: RefreshNote,
    },
    #[error("token has no kid and issuer {0:?} has several keys")]
    MissingKid(String),
    #[error("issuer {iss:?}'s keys unavailable: {why}")]
    KeysUnavailable { iss: String, why: String },
    #[error("key {kid:?} of issuer {iss:?} cannot verify grants: {why}")]
    UnusableKey {
        iss: String,
        kid: String,
        why: UnusableKey,
    },
    #[error("algorithm {got:?} does not match the key's algorithm {want:?}")]
    AlgorithmMismatch {
        got: jsonwebtoken::Algorithm,
        want: jsonwebtoken::Algorithm,
    },
    #[error("bad signature")]
    BadSignature,
    #[error("audience does not include this host")]
    WrongAudience,
    #[error("expired")]
    Expired,
    #[error("not yet valid")]
    NotYetValid,
    #[error("lifetime {got}s exceeds the local cap of {cap}s")]
    LifetimeOverCap { got: i64, cap: u64 },
    #[error("group {0:?} is not allowed by local policy")]
    GroupNotAllowed(String),
    #[error("profile {0:?} is not allowed by local policy")]
    ProfileNotAllowed(String),
    #[error("login {0:?} is not a name this agent may manage")]
    BadLogin(String),
    #[error("invalid claim: {0}")]
    BadClaim(#[from] InvalidClaim),
    #[error("grant {0} is revoked")]
    Revoked(GrantId),
    #[error("the header marks {0} as critical; this host implements no JOSE extension")]
    CriticalHeader(String),
    /// A stored grant whose file is named for another (iss, jti) than its own.
    #[error("invalid claim: {}: the file name does not match the grant's (iss, jti)", .0.display())]
    Misfiled(PathBuf),
    /// A workload's OIDC token that its issuer's keys or claims refuse.
    #[error("workload token: {0}")]
    WorkloadToken(usher_trust::Refusal),
    /// A verified workload token that no `[[workload]]` rule takes.
    #[error("workload token: {0}")]
    NoWorkloadRule(NoRule),
    /// A workload token anywhere but at the SSH prompt (`usher grant install`, a stored
    /// grant after a restart): it becomes a grant only for the login it is presented for.
    #[error("a workload token of issuer {0:?} is accepted only at the SSH prompt, for the login it is presented for")]
    WorkloadTokenNotAtLogin(String),
}

impl From<usher_trust::Refusal> for Refusal {
    fn from(refusal: usher_trust::Refusal) -> Refusal {
        use usher_trust::Refusal as T;
        match refusal {
            T::Malformed(m) => Refusal::Malformed(m),
            T::UnknownIssuer(iss) => Refusal::UnknownIssuer(iss),
            T::UnknownKey {
                iss,
                kid,
                refresh: RefreshNote::NotAsked,
            } => Refusal::UnknownKey { iss, kid },
            T::UnknownKey { iss, kid, refresh } => {
                Refusal::UnknownKeyAfterRefresh { iss, kid, refresh }
            }
            T::MissingKid(iss) => Refusal::MissingKid(iss),
            T::KeysUnavailable { iss, why } => Refusal::KeysUnavailable { iss, why },
            T::UnusableKey { iss, kid, why } => Refusal::UnusableKey { iss, kid, why },
            T::AlgorithmMismatch { got, want } => Refusal::AlgorithmMismatch { got, want },
            T::BadSignature => Refusal::BadSignature,
            T::WrongAudience { .. } => Refusal::WrongAudience,
            T::Expired { .. } => Refusal::Expired,
            T::NotYetValid => Refusal::NotYetValid,
            T::CriticalHeader(what) => Refusal::CriticalHeader(what),
        }
    }
}

impl Refusal {
    /// Whether the issuer's keys may know better after a refresh.
    fn wants_fresh_keys(&self) -> bool {
        matches!(
            self,
            Refusal::UnknownKey { .. } | Refusal::KeysUnavailable { .. }
        )
    }
}

/// A claim that is present and typed right but not acceptable.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum InvalidClaim {
    #[error("exp is not after nbf/iat")]
    EndsBeforeItStarts,
    #[error("jti must be 1-128 characters of [A-Za-z0-9._-]")]
    Jti,
    #[error("sub must be 1-256 printable characters")]
    Sub,
    #[error("secret_hash must be a crypt(3) hash ($6$, $5$, $y$, $2b$)")]
    SecretHash,
    #[error("ssh_keys: {0}")]
    SshKey(String),
    #[error("request must be 1-128 printable characters")]
    Request,
}

/// An issuer that cannot be set up: a JWKS file that cannot be trusted for anything, a CA
/// file that is not one, a key source that is not safe.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("issuer {iss:?}: {source}")]
    Issuer {
        iss: String,
        source: usher_trust::SetupError,
    },
}

pub struct Verifier {
    /// Issuers whose grants this host accepts (`[[issuer]]`).
    issuers: TrustedIssuers,
    /// Issuers of workload tokens (`[[workload]]` rules' `issuer`).
    workload_issuers: TrustedIssuers,
    workloads: Vec<WorkloadRule>,
    audiences: Vec<String>,
    policy: PolicyConfig,
    name_prefix: String,
    known_profiles: BTreeSet<String>,
}

impl Verifier {
    /// Sets up every issuer: a JWKS file is read now, and a broken one stops the agent
    /// (better no logins than logins checked against the wrong keys); keys from a URL are
    /// fetched now, and a failure is logged, not fatal (the cache tries again). Inside a
    /// Tokio runtime, each URL issuer's keys are then kept fresh in the background.
    pub fn from_config(
        config: &Config,
        known_profiles: BTreeSet<String>,
    ) -> Result<Verifier, JwksError> {
        // Fetched keys are kept on disk: an agent restarted while an issuer (the central
        // service, say) is unreachable still verifies the grants it holds.
        let saved_keys = config.state_dir.join("issuer-keys");
        let setup = |configs: &[usher_trust::IssuerConfig]| {
            configs
                .iter()
                .map(|ic| {
                    IssuerKeys::new_saving(ic, Some(&saved_keys)).map_err(|source| {
                        JwksError::Issuer {
                            iss: ic.iss.clone(),
                            source,
                        }
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(TrustedIssuers::new)
        };
        let issuers = setup(&config.issuers)?;
        let workload_issuers = setup(&usher_trust::workload_issuers(
            &config.workloads,
            &config.workload_issuers,
        ))?;
        for set in [&issuers, &workload_issuers] {
            set.load_blocking();
            if tokio::runtime::Handle::try_current().is_ok() {
                set.spawn_refreshers();
            }
        }
        Ok(Verifier {
            issuers,
            workload_issuers,
            workloads: config.workloads.clone(),
            audiences: config.accepted_audiences(),
            policy: config.policy.clone(),
            name_prefix: config.accounts.name_prefix.clone(),
            known_profiles,
        })
    }

    /// The `iss` of every trusted grant issuer.
    pub fn issuers(&self) -> Vec<String> {
        self.issuers.iter().map(|i| i.iss().to_string()).collect()
    }

    /// The key cache of trusted grant issuer `iss`: the central service's, whose decisions
    /// on commands are checked with the same keys as its grants.
    pub fn issuer_keys(&self, iss: &str) -> Option<IssuerKeys> {
        self.issuers.get(iss).cloned()
    }

    /// The clock skew tolerated on tokens' times.
    pub fn leeway_secs(&self) -> u64 {
        self.policy.leeway_secs
    }

    /// What each issuer's key cache holds, grant issuers first.
    pub fn key_status(&self) -> Vec<usher_trust::KeyStatus> {
        self.issuers
            .iter()
            .chain(self.workload_issuers.iter())
            .map(IssuerKeys::status)
            .collect()
    }

    /// Verifies a grant with the keys at hand. A kid the keys lack (or keys not fetched
    /// yet) starts a rate-limited refresh in the background, so that the next try can
    /// succeed; `verify_refreshing` waits for it instead.
    pub fn verify(&self, token: &str, now: i64) -> Result<Grant, Refusal> {
        let token = token.trim();
        let issuer = self.grant_issuer_of(token)?;
        let result = self.verify_grant(issuer, token, now);
        if matches!(&result, Err(why) if why.wants_fresh_keys()) && issuer.is_fetched() {
            if let Ok(runtime) = tokio::runtime::Handle::try_current() {
                let keys = issuer.clone();
                runtime.spawn(async move {
                    keys.refresh_for_unknown_kid().await;
                });
            }
        }
        result
    }

    /// Verifies a grant; on an unknown kid (or no keys) the issuer's keys are refreshed
    /// (at most once per its `refresh_min_secs`) and the grant is checked once more.
    pub async fn verify_refreshing(&self, token: &str, now: i64) -> Result<Grant, Refusal> {
        let token = token.trim();
        let issuer = self.grant_issuer_of(token)?;
        match self.verify_grant(issuer, token, now) {
            Err(why) if why.wants_fresh_keys() && issuer.is_fetched() => {
                let note = issuer.refresh_for_unknown_kid().await;
                match self.verify_grant(issuer, token, now) {
                    Err(Refusal::UnknownKey { iss, kid }) => Err(Refusal::UnknownKeyAfterRefresh {
                        iss,
                        kid,
                        refresh: note,
                    }),
                    other => other,
                }
            }
            other => other,
        }
    }

    /// A token presented at the SSH password or keyboard-interactive prompt by a client
    /// logging in as `login`: a grant of a trusted issuer, or a workload's OIDC token that
    /// a `[[workload]]` rule for `login` takes.
    pub async fn verify_presented(
        &self,
        token: &str,
        login: &str,
        now: i64,
    ) -> Result<Grant, Refusal> {
        let token = token.trim();
        let iss = usher_trust::peek_issuer(token)?;
        if self.issuers.get(&iss).is_none() && self.workload_issuers.get(&iss).is_some() {
            return self.verify_workload(token, &iss, login, now).await;
        }
        self.verify_refreshing(token, now).await
    }

    fn grant_issuer_of(&self, token: &str) -> Result<&IssuerKeys, Refusal> {
        let iss = usher_trust::peek_issuer(token)?;
        match self.issuers.get(&iss) {
            Some(issuer) => Ok(issuer),
            None if self.workload_issuers.get(&iss).is_some() => {
                Err(Refusal::WorkloadTokenNotAtLogin(iss))
            }
            None => Err(Refusal::UnknownIssuer(iss)),
        }
    }

    fn expect(&self, now: i64) -> Expect<'_> {
        Expect {
            audiences: &self.audiences,
            leeway_secs: self.policy.leeway_secs,
            now,
        }
    }

    fn verify_grant(&self, issuer: &IssuerKeys, token: &str, now: i64) -> Result<Grant, Refusal> {
        let keys = issuer.current()?;
        let verified =
            usher_trust::verify_with_keys(token, issuer.iss(), &keys, &self.expect(now))?;
        if let Some(missing) = REQUIRED_CLAIMS
            .iter()
            .find(|name| verified.get(**name).is_none_or(Value::is_null))
        {
            return Err(Malformed::MissingClaim(missing.to_string()).into());
        }
        let claims: Claims = serde_json::from_value(Value::Object(verified))
            .map_err(|e| Malformed::ClaimType(e.to_string()))?;
        self.check_policy(claims, token, now)
    }

    /// A workload token: verified against its issuer's keys (refreshed on an unknown kid)
    /// for the audiences its rules name, then matched against the rules for `login`. The
    /// grant it becomes: the token's `sub`, a jti from the token, the rule's login and
    /// profile, and an end no later than the token's nor `max_lifetime` from now; then
    /// local policy, as for any grant.
    async fn verify_workload(
        &self,
        token: &str,
        iss: &str,
        login: &str,
        now: i64,
    ) -> Result<Grant, Refusal> {
        let issuer = self
            .workload_issuers
            .get(iss)
            .ok_or_else(|| Refusal::UnknownIssuer(iss.to_string()))?;
        let audiences = usher_trust::audiences_for(&self.workloads, iss);
        let expect = Expect {
            audiences: &audiences,
            leeway_secs: self.policy.leeway_secs,
            now,
        };
        let verified = issuer
            .verify(token, &expect)
            .await
            .map_err(Refusal::WorkloadToken)?;
        let rule = usher_trust::match_rule(&self.workloads, iss, &verified, None, Some(login))
            .map_err(Refusal::NoWorkloadRule)?;
        let sub = verified
            .get("sub")
            .and_then(Value::as_str)
            .ok_or_else(|| Malformed::MissingClaim("sub".into()))?;
        let token_exp = verified
            .get("exp")
            .and_then(Value::as_i64)
            .ok_or_else(|| Malformed::MissingClaim("exp".into()))?;
        let lifetime = i64::try_from(rule.max_lifetime_secs()).unwrap_or(i64::MAX / 4);
        let exp = token_exp.min(now.saturating_add(lifetime));
        if exp <= now {
            return Err(Refusal::Expired);
        }
        let claims = Claims {
            iss: iss.to_string(),
            sub: sub.to_string(),
            aud: Audience::One(self.audiences.first().cloned().unwrap_or_default()),
            jti: workload_jti(token, &verified),
            iat: now,
            nbf: None,
            exp,
            login: rule.login.clone(),
            groups: Vec::new(),
            ssh_keys: Vec::new(),
            secret_hash: None,
            profile: rule.profile.clone(),
            approved_by: None,
            reason: Some(format!("workload rule {}", rule.name)),
            request: None,
        };
        self.check_policy(claims, token, now)
    }

    fn check_policy(&self, claims: Claims, token: &str, now: i64) -> Result<Grant, Refusal> {
        let leeway = self.policy.leeway_secs as i64;
        if now >= claims.exp + leeway {
            return Err(Refusal::Expired);
        }
        if claims.starts_at() > now + leeway || claims.iat > now + leeway {
            return Err(Refusal::NotYetValid);
        }
        let lifetime = claims.exp - claims.starts_at();
        if lifetime <= 0 {
            return Err(InvalidClaim::EndsBeforeItStarts.into());
        }
        if lifetime as u64 > self.policy.max_lifetime_secs {
            return Err(Refusal::LifetimeOverCap {
                got: lifetime,
                cap: self.policy.max_lifetime_secs,
            });
        }
        if !crate::account::is_valid_name(&claims.login)
            || !claims.login.starts_with(&self.name_prefix)
            || claims.login.len() <= self.name_prefix.len()
        {
            return Err(Refusal::BadLogin(claims.login));
        }
        if !is_valid_jti(&claims.jti) {
            return Err(InvalidClaim::Jti.into());
        }
        if claims.sub.is_empty()
            || claims.sub.len() > 256
            || claims.sub.chars().any(char::is_control)
        {
            return Err(InvalidClaim::Sub.into());
        }
        if let Some(request) = &claims.request {
            if request.is_empty() || request.len() > 128 || request.chars().any(char::is_control) {
                return Err(InvalidClaim::Request.into());
            }
        }
        for group in &claims.groups {
            if !self.policy.allowed_groups.iter().any(|g| g == group) {
                return Err(Refusal::GroupNotAllowed(group.clone()));
            }
        }
        if let Some(h) = &claims.secret_hash {
            if !is_crypt_hash(h) {
                return Err(InvalidClaim::SecretHash.into());
            }
        }
        for line in &claims.ssh_keys {
            russh::keys::PublicKey::from_openssh(line)
                .map_err(|e| InvalidClaim::SshKey(e.to_string()))?;
        }
        let profile = claims
            .profile
            .clone()
            .unwrap_or_else(|| self.policy.default_profile.clone());
        let allowed = profile == self.policy.default_profile
            || self.policy.allowed_profiles.contains(&profile);
        if !allowed || !self.known_profiles.contains(&profile) {
            return Err(Refusal::ProfileNotAllowed(profile));
        }
        Ok(Grant {
            token: token.to_string(),
            claims,
            profile,
        })
    }
}

fn is_valid_jti(jti: &str) -> bool {
    !jti.is_empty()
        && jti.len() <= 128
        && jti
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// A workload grant's jti: the token's own when it is one a grant may carry, else a digest
/// of the token (the same token, presented twice, is the same grant).
fn workload_jti(token: &str, claims: &usher_trust::VerifiedClaims) -> String {
    match claims.get("jti").and_then(Value::as_str) {
        Some(jti) if is_valid_jti(jti) => jti.to_string(),
        _ => format!(
            "wl-{}",
            &hex::encode(Sha256::digest(token.as_bytes()))[..32]
        ),
    }
}

/// A crypt(3) hash of a kind the system's tools understand, with nothing that could break
/// the shadow file's format.
pub fn is_crypt_hash(h: &str) -> bool {
    ["$6$", "$5$", "$y$", "$2b$"]
        .iter()
        .any(|p| h.starts_with(p))
        && h.len() <= 256
        && h.chars()
            .all(|c| c.is_ascii_alphanumeric() || "./$=".contains(c))
}

#[cfg(test)]
mod tests {
    //! The refusal matrix, with no daemon and no root: each case names the `Refusal` it
    //! must give, and the clock is fixed so that time-bound cases are exact.

    use super::*;
    use crate::grant::{keygen, sign, Audience, KeyAlg};
    use base64::Engine;
    use jsonwebtoken::jwk::{Jwk, JwkSet};
    use jsonwebtoken::{Algorithm, EncodingKey};
    use usher_trust::{key_algorithm, FetchError, SetupError, MAX_TOKEN_BYTES};

    /// Reads a JWKS file the way the agent does at start-up: as an issuer's keys.
    fn read_jwks(path: &std::path::Path) -> Result<Verifier, JwksError> {
        let mut config = Config::default();
        config.issuers.push(usher_trust::IssuerConfig {
            jwks: Some(path.to_owned()),
            discovery: false,
            ..usher_trust::IssuerConfig::discovery(ISS)
        });
        Verifier::from_config(&config, BTreeSet::new())
    }

    fn file_error(result: Result<Verifier, JwksError>) -> FetchError {
        match result {
            Err(JwksError::Issuer {
                source: SetupError::File(e),
                ..
            }) => e,
            Err(other) => panic!("{other}"),
            Ok(_) => panic!("accepted"),
        }
    }
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://issuer.test";
    const LEEWAY: i64 = 30;
    const MAX_LIFETIME: i64 = 3600;

    struct TestKey {
        kid: &'static str,
        alg: Algorithm,
        pem: String,
        jwk: Jwk,
    }

    fn make_key(alg: KeyAlg, kid: &'static str) -> TestKey {
        let (pem, jwks) = keygen(alg, kid).unwrap();
        let mut set: JwkSet = serde_json::from_str(&jwks).unwrap();
        TestKey {
            kid,
            alg: key_algorithm(&set.keys[0]).unwrap(),
            pem,
            jwk: set.keys.remove(0),
        }
    }

    /// One key of each kind for the whole run: an RSA key takes seconds to make.
    fn ed() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Ed25519, "ed-1"))
    }

    fn es() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Es256, "es-1"))
    }

    fn rs() -> &'static TestKey {
        static KEY: OnceLock<TestKey> = OnceLock::new();
        KEY.get_or_init(|| make_key(KeyAlg::Rs256, "rs-1"))
    }

    fn policy() -> PolicyConfig {
        PolicyConfig {
            max_lifetime_secs: MAX_LIFETIME as u64,
            allowed_groups: vec!["users".into()],
            allowed_profiles: vec!["restricted".into(), "ghost".into()],
            default_profile: "default".into(),
            leeway_secs: LEEWAY as u64,
        }
    }

    fn verifier_with(jwks: Vec<Jwk>, policy: PolicyConfig) -> Verifier {
        Verifier {
            issuers: TrustedIssuers::new(vec![IssuerKeys::fixed(ISS, JwkSet { keys: jwks })]),
            workload_issuers: TrustedIssuers::default(),
            workloads: Vec::new(),
            audiences: vec!["host-a".into(), "group:web".into()],
            policy,
            name_prefix: "jit-".into(),
            // "ghost" is allowed by policy but no such profile file exists; "unlisted"
            // exists but policy does not allow it.
            known_profiles: ["default", "restricted", "unlisted"]
                .map(String::from)
                .into(),
        }
    }

    /// Trusts one issuer with an Ed25519, a P-256 and an RSA key.
    fn verifier() -> Verifier {
        verifier_with(
            vec![ed().jwk.clone(), es().jwk.clone(), rs().jwk.clone()],
            policy(),
        )
    }

    fn claims() -> Claims {
        Claims {
            iss: ISS.into(),
            sub: "alice@example.test".into(),
            aud: Audience::One("host-a".into()),
            jti: "grant-1".into(),
            iat: NOW - 60,
            nbf: None,
            exp: NOW + 600,
            login: "jit-alice".into(),
            groups: vec![],
            ssh_keys: vec![],
            secret_hash: None,
            profile: None,
            approved_by: None,
            reason: None,
            request: None,
        }
    }

    fn signed(key: &TestKey, claims: &Claims) -> String {
        sign(&key.pem, key.kid, claims).unwrap()
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn unb64(text: &str) -> Vec<u8> {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(text)
            .unwrap()
    }

    /// A token with any header and any claims, signed by the Ed25519 key.
    fn signed_raw(header: &Value, claims: &Value) -> String {
        let message = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let key = EncodingKey::from_ed_pem(ed().pem.as_bytes()).unwrap();
        let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::EdDSA).unwrap();
        format!("{message}.{sig}")
    }

    fn ed_header() -> Value {
        json!({"alg": "EdDSA", "kid": "ed-1", "typ": "JWT"})
    }

    fn claims_json() -> Value {
        serde_json::to_value(claims()).unwrap()
    }

    fn refusal(verifier: &Verifier, token: &str) -> Refusal {
        match verifier.verify(token, NOW) {
            Ok(grant) => panic!("accepted: {:?}", grant.claims),
            Err(why) => why,
        }
    }

    fn refusal_of(claims: &Claims) -> Refusal {
        refusal(&verifier(), &signed(ed(), claims))
    }

    fn accepts(claims: &Claims) -> Grant {
        verifier()
            .verify(&signed(ed(), claims), NOW)
            .unwrap_or_else(|why| panic!("refused: {why}"))
    }

    // --- what is accepted ---

    #[test]
    fn each_key_type_verifies_its_own_algorithm() {
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let grant = v
                .verify(&signed(key, &claims()), NOW)
                .unwrap_or_else(|why| panic!("{:?}: {why}", key.alg));
            assert_eq!(grant.claims, claims());
            assert_eq!(grant.profile, "default");
        }
    }

    #[test]
    fn without_kid_the_only_key_is_used_and_several_keys_need_one() {
        for header in [
            json!({"alg": "EdDSA"}),
            json!({"alg": "EdDSA", "kid": null}),
        ] {
            let token = signed_raw(&header, &claims_json());
            verifier_with(vec![ed().jwk.clone()], policy())
                .verify(&token, NOW)
                .unwrap();
            assert_eq!(
                refusal(&verifier(), &token),
                Refusal::MissingKid(ISS.into())
            );
        }
    }

    #[test]
    fn surrounding_whitespace_is_ignored() {
        let token = format!("  {}\n", signed(ed(), &claims()));
        verifier().verify(&token, NOW).unwrap();
    }

    // --- the algorithm is the key's ---

    #[test]
    fn alg_none_is_refused_signed_or_not() {
        let v = verifier();
        for header in [
            json!({"alg": "none", "typ": "JWT"}),
            json!({"alg": "none", "kid": "ed-1"}),
            json!({"alg": "None", "kid": "ed-1"}),
        ] {
            let unsigned = format!(
                "{}.{}.",
                b64(header.to_string().as_bytes()),
                b64(claims_json().to_string().as_bytes())
            );
            let name = header["alg"].as_str().unwrap().to_string();
            for token in [unsigned, signed_raw(&header, &claims_json())] {
                assert_eq!(
                    refusal(&v, &token),
                    Refusal::Malformed(Malformed::UnsupportedAlgorithm(name.clone())),
                    "{header}"
                );
            }
        }
        assert_eq!(
            refusal(&v, &signed_raw(&json!({"kid": "ed-1"}), &claims_json())),
            Refusal::Malformed(Malformed::NoAlgorithm)
        );
        assert_eq!(
            refusal(
                &v,
                &signed_raw(&json!({"alg": null, "kid": "ed-1"}), &claims_json())
            ),
            Refusal::Malformed(Malformed::NoAlgorithm)
        );
        assert!(matches!(
            refusal(
                &v,
                &signed_raw(&json!({"alg": 7, "kid": "ed-1"}), &claims_json())
            ),
            Refusal::Malformed(Malformed::UnsupportedAlgorithm(_))
        ));
    }

    #[test]
    fn hmac_keyed_with_a_public_key_is_refused() {
        // The classic key confusion: the public key's bytes, as text or raw, as an HMAC
        // secret under the key's kid.
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let public = serde_json::to_value(&key.jwk).unwrap();
            let text = public
                .get("x")
                .or_else(|| public.get("n"))
                .and_then(Value::as_str)
                .unwrap()
                .to_string();
            for secret in [
                text.as_bytes().to_vec(),
                unb64(&text),
                public.to_string().into_bytes(),
            ] {
                for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
                    let mut header = jsonwebtoken::Header::new(alg);
                    header.kid = Some(key.kid.into());
                    let token = jsonwebtoken::encode(
                        &header,
                        &claims(),
                        &EncodingKey::from_secret(&secret),
                    )
                    .unwrap();
                    assert_eq!(
                        refusal(&v, &token),
                        Refusal::AlgorithmMismatch {
                            got: alg,
                            want: key.alg
                        }
                    );
                }
            }
        }
    }

    #[test]
    fn a_token_of_another_algorithm_than_its_key_is_refused() {
        let v = verifier();
        // Each key signs under each other key's kid: RS256 and ES256 against the EdDSA key,
        // and every other pairing.
        for signer in [ed(), es(), rs()] {
            for named in [ed(), es(), rs()] {
                if signer.alg == named.alg {
                    continue;
                }
                let token = sign(&signer.pem, named.kid, &claims()).unwrap();
                assert_eq!(
                    refusal(&v, &token),
                    Refusal::AlgorithmMismatch {
                        got: signer.alg,
                        want: named.alg
                    }
                );
            }
        }
        // A header that lies about the algorithm of a genuine signature.
        let token = signed_raw(&json!({"alg": "RS256", "kid": "ed-1"}), &claims_json());
        assert_eq!(
            refusal(&v, &token),
            Refusal::AlgorithmMismatch {
                got: Algorithm::RS256,
                want: Algorithm::EdDSA
            }
        );
        // PS256 is the RSA key's family but not its algorithm.
        let token = signed_raw(&json!({"alg": "PS256", "kid": "rs-1"}), &claims_json());
        assert_eq!(
            refusal(&v, &token),
            Refusal::AlgorithmMismatch {
                got: Algorithm::PS256,
                want: Algorithm::RS256
            }
        );
    }

    #[test]
    fn a_symmetric_key_in_the_set_verifies_nothing() {
        let oct: Jwk =
            serde_json::from_value(json!({"kty": "oct", "k": "c2VjcmV0", "kid": "hs-1"})).unwrap();
        let v = verifier_with(vec![oct], policy());
        let mut header = jsonwebtoken::Header::new(Algorithm::HS256);
        header.kid = Some("hs-1".into());
        let token =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(b"secret")).unwrap();
        assert_eq!(
            refusal(&v, &token),
            Refusal::UnusableKey {
                iss: ISS.into(),
                kid: "hs-1".into(),
                why: UnusableKey::Symmetric
            }
        );
    }

    #[test]
    fn a_jwks_file_with_a_short_ed25519_key_is_refused_at_load() {
        let dir = std::env::temp_dir().join(format!("usher-jwks-short-{}", std::process::id()));
        crate::fsutil::private_dir(&dir, 0o700).unwrap();
        let path = dir.join("short.json");
        std::fs::write(
            &path,
            r#"{"keys": [{"kty": "OKP", "crv": "Ed25519", "x": "AAAA"}]}"#,
        )
        .unwrap();
        assert!(matches!(
            file_error(read_jwks(&path)),
            FetchError::UnusableKeyInFile {
                why: UnusableKey::Invalid(_),
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_key_that_is_no_key_verifies_nothing() {
        let broken: Jwk = serde_json::from_value(
            json!({"kty": "OKP", "crv": "Ed25519", "x": "AAAA", "kid": "bad-1"}),
        )
        .unwrap();
        let v = verifier_with(vec![broken], policy());
        let token = sign(&ed().pem, "bad-1", &claims()).unwrap();
        assert!(matches!(
            refusal(&v, &token),
            Refusal::UnusableKey {
                why: UnusableKey::Invalid(_),
                ..
            }
        ));
    }

    #[test]
    fn a_jwks_file_with_a_symmetric_key_is_refused_at_load() {
        let dir = std::env::temp_dir().join(format!("usher-jwks-{}", std::process::id()));
        crate::fsutil::private_dir(&dir, 0o700).unwrap();
        let path = dir.join("oct.json");
        std::fs::write(&path, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).unwrap();
        assert!(matches!(
            file_error(read_jwks(&path)),
            FetchError::UnusableKeyInFile {
                why: UnusableKey::Symmetric,
                ..
            }
        ));
        std::fs::write(&path, "{}").unwrap();
        assert!(matches!(
            file_error(read_jwks(&path)),
            FetchError::NotJwks { .. }
        ));
        assert!(matches!(
            file_error(read_jwks(&dir.join("absent.json"))),
            FetchError::Read { .. }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    // --- which key, which issuer ---

    #[test]
    fn an_unknown_kid_is_refused() {
        let token = sign(&ed().pem, "ed-9", &claims()).unwrap();
        assert_eq!(
            refusal(&verifier(), &token),
            Refusal::UnknownKey {
                iss: ISS.into(),
                kid: "ed-9".into()
            }
        );
    }

    #[test]
    fn an_unknown_or_absent_issuer_is_refused() {
        let mut c = claims();
        c.iss = "https://evil.test".into();
        assert_eq!(
            refusal_of(&c),
            Refusal::UnknownIssuer("https://evil.test".into())
        );
        // Issuers are compared exactly.
        c.iss = format!("{ISS}/");
        assert_eq!(refusal_of(&c), Refusal::UnknownIssuer(format!("{ISS}/")));
        for iss in [Value::Null, json!(7), json!([ISS])] {
            let mut c = claims_json();
            c["iss"] = iss;
            assert_eq!(
                refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                Refusal::Malformed(Malformed::MissingClaim("iss".into()))
            );
        }
        let mut c = claims_json();
        c.as_object_mut().unwrap().remove("iss");
        assert_eq!(
            refusal(&verifier(), &signed_raw(&ed_header(), &c)),
            Refusal::Malformed(Malformed::MissingClaim("iss".into()))
        );
    }

    // --- the signature ---

    #[test]
    fn a_flipped_byte_in_the_signature_is_refused() {
        let v = verifier();
        for key in [ed(), es(), rs()] {
            let token = signed(key, &claims());
            let (message, signature) = token.rsplit_once('.').unwrap();
            let mut sig = unb64(signature);
            for at in [0, sig.len() / 2, sig.len() - 1] {
                sig[at] ^= 0x01;
                let forged = format!("{message}.{}", b64(&sig));
                assert_eq!(refusal(&v, &forged), Refusal::BadSignature, "{:?}", key.alg);
                sig[at] ^= 0x01;
            }
            // Cut short, or gone.
            let forged = format!("{message}.{}", b64(&sig[..sig.len() - 1]));
            assert_eq!(refusal(&v, &forged), Refusal::BadSignature);
            assert_eq!(refusal(&v, &format!("{message}.")), Refusal::BadSignature);
        }
    }

    #[test]
    fn tampered_claims_are_refused() {
        let token = signed(ed(), &claims());
        let parts: Vec<&str> = token.split('.').collect();
        let mut c: Value = serde_json::from_slice(&unb64(parts[1])).unwrap();
        c["login"] = json!("jit-admin");
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            b64(c.to_string().as_bytes()),
            parts[2]
        );
        assert_eq!(refusal(&verifier(), &forged), Refusal::BadSignature);
        // A changed header is as bad as changed claims.
        let header = json!({"alg": "EdDSA", "kid": "ed-1", "typ": "at+jwt"});
        let forged = format!(
            "{}.{}.{}",
            b64(header.to_string().as_bytes()),
            parts[1],
            parts[2]
        );
        assert_eq!(refusal(&verifier(), &forged), Refusal::BadSignature);
    }

    #[test]
    fn another_key_under_a_trusted_kid_is_refused() {
        let v = verifier();
        for (alg, trusted) in [(KeyAlg::Ed25519, ed()), (KeyAlg::Es256, es())] {
            let stranger = make_key(alg, trusted.kid);
            assert_eq!(
                refusal(&v, &signed(&stranger, &claims())),
                Refusal::BadSignature
            );
        }
    }

    // --- the audience ---

    #[test]
    fn the_audience_must_name_this_host_or_one_of_its_selectors() {
        for aud in [
            Audience::One("host-a".into()),
            Audience::One("group:web".into()),
            Audience::Many(vec!["host-b".into(), "group:web".into()]),
            Audience::Many(vec!["host-a".into()]),
        ] {
            let mut c = claims();
            c.aud = aud.clone();
            accepts(&c);
        }
        for aud in [
            Audience::One("host-b".into()),
            Audience::One("HOST-A".into()),
            Audience::One("group:*".into()),
            Audience::One("group:db".into()),
            Audience::One("".into()),
            Audience::Many(vec!["host-b".into(), "group:db".into()]),
            Audience::Many(vec![]),
        ] {
            let mut c = claims();
            c.aud = aud.clone();
            assert_eq!(refusal_of(&c), Refusal::WrongAudience, "{aud:?}");
        }
        for aud in [None, Some(Value::Null), Some(json!(5))] {
            let mut c = claims_json();
            match aud {
                None => {
                    c.as_object_mut().unwrap().remove("aud");
                }
                Some(v) => c["aud"] = v,
            }
            assert_eq!(
                refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                Refusal::Malformed(Malformed::MissingClaim("aud".into()))
            );
        }
    }

    // --- time ---

    #[test]
    fn expiry_is_exact_with_the_leeway() {
        let mut c = claims();
        c.iat = NOW - 1000;
        c.exp = NOW - LEEWAY + 1;
        accepts(&c);
        c.exp = NOW - LEEWAY;
        assert_eq!(refusal_of(&c), Refusal::Expired);
        c.exp = NOW - 3600;
        c.iat = NOW - 4000;
        assert_eq!(refusal_of(&c), Refusal::Expired);
    }

    #[test]
    fn a_grant_that_has_not_started_is_refused() {
        let mut c = claims();
        c.nbf = Some(NOW + LEEWAY);
        accepts(&c);
        c.nbf = Some(NOW + LEEWAY + 1);
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
        // An iat in the future counts as a start too, nbf or not.
        let mut c = claims();
        c.iat = NOW + LEEWAY + 1;
        c.exp = NOW + 600;
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
        c.nbf = Some(NOW);
        assert_eq!(refusal_of(&c), Refusal::NotYetValid);
    }

    #[test]
    fn without_leeway_a_second_early_is_too_early() {
        let v = verifier_with(
            vec![ed().jwk.clone()],
            PolicyConfig {
                leeway_secs: 0,
                ..policy()
            },
        );
        let mut c = claims();
        c.nbf = Some(NOW);
        v.verify(&signed(ed(), &c), NOW).unwrap();
        c.nbf = Some(NOW + 1);
        assert_eq!(refusal(&v, &signed(ed(), &c)), Refusal::NotYetValid);
        let mut c = claims();
        c.exp = NOW;
        assert_eq!(refusal(&v, &signed(ed(), &c)), Refusal::Expired);
        c.exp = NOW + 1;
        v.verify(&signed(ed(), &c), NOW).unwrap();
    }

    #[test]
    fn the_lifetime_is_capped_by_local_policy() {
        let mut c = claims();
        c.iat = NOW - 60;
        c.exp = c.iat + MAX_LIFETIME;
        accepts(&c);
        c.exp = c.iat + MAX_LIFETIME + 1;
        assert_eq!(
            refusal_of(&c),
            Refusal::LifetimeOverCap {
                got: MAX_LIFETIME + 1,
                cap: MAX_LIFETIME as u64
            }
        );
        // Measured from nbf when there is one.
        c.nbf = Some(NOW);
        c.exp = NOW + MAX_LIFETIME;
        accepts(&c);
        c.exp = NOW + MAX_LIFETIME + 1;
        assert!(matches!(refusal_of(&c), Refusal::LifetimeOverCap { .. }));
        // A grant that ends before it starts has no lifetime at all.
        let mut c = claims();
        c.nbf = Some(NOW);
        c.exp = NOW;
        c.iat = NOW - 10;
        let v = verifier_with(
            vec![ed().jwk.clone()],
            PolicyConfig {
                leeway_secs: 60,
                ..policy()
            },
        );
        assert_eq!(
            refusal(&v, &signed(ed(), &c)),
            Refusal::BadClaim(InvalidClaim::EndsBeforeItStarts)
        );
    }

    // --- local policy ---

    #[test]
    fn groups_must_all_be_allowed() {
        let mut c = claims();
        c.groups = vec!["users".into()];
        accepts(&c);
        for groups in [vec!["sudo"], vec!["users", "sudo"], vec!["Users"], vec![""]] {
            c.groups = groups.iter().map(|g| g.to_string()).collect();
            let bad = groups.iter().find(|g| **g != "users").unwrap();
            assert_eq!(
                refusal_of(&c),
                Refusal::GroupNotAllowed(bad.to_string()),
                "{groups:?}"
            );
        }
    }

    #[test]
    fn the_profile_must_be_allowed_and_exist() {
        let mut c = claims();
        c.profile = Some("restricted".into());
        assert_eq!(accepts(&c).profile, "restricted");
        c.profile = Some("default".into());
        assert_eq!(accepts(&c).profile, "default");
        // Not allowed by policy; allowed but not on this host; neither.
        for name in ["unlisted", "ghost", "unrestricted-root"] {
            c.profile = Some(name.into());
            assert_eq!(refusal_of(&c), Refusal::ProfileNotAllowed(name.into()));
        }
    }

    #[test]
    fn the_login_must_be_a_valid_name_inside_the_prefix() {
        let mut c = claims();
        for login in [
            "root",
            "alice",
            "jit-",
            "xjit-alice",
            "JIT-alice",
            "jit-Alice",
            "jit-x;rm -rf",
            "jit-a b",
            "jit-a/../b",
            "jit-a\n",
            &format!("jit-{}", "a".repeat(40)),
        ] {
            c.login = login.into();
            assert_eq!(refusal_of(&c), Refusal::BadLogin(login.into()));
        }
    }

    #[test]
    fn claims_with_bad_values_are_refused() {
        let mut c = claims();
        for jti in ["", "a b", "a@b", "a/b", &"j".repeat(129)] {
            c.jti = jti.into();
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::Jti),
                "{jti:?}"
            );
        }
        let mut c = claims();
        for sub in ["", "a\nb", "a\u{0}", &"s".repeat(257)] {
            c.sub = sub.into();
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::Sub),
                "{sub:?}"
            );
        }
        let mut c = claims();
        for hash in ["plain", "$1$md5$x", "$6$salt$a:b", "$6$salt$a\nb"] {
            c.secret_hash = Some(hash.into());
            assert_eq!(
                refusal_of(&c),
                Refusal::BadClaim(InvalidClaim::SecretHash),
                "{hash:?}"
            );
        }
        c.secret_hash = Some(crate::grant::console_secret_hash("s3cret").unwrap());
        accepts(&c);
        let mut c = claims();
        c.ssh_keys = vec!["ssh-ed25519 not-a-key".into()];
        assert!(matches!(
            refusal_of(&c),
            Refusal::BadClaim(InvalidClaim::SshKey(_))
        ));
    }

    // --- form ---

    #[test]
    fn every_required_claim_must_be_there() {
        for name in REQUIRED_CLAIMS {
            for absent in [None, Some(Value::Null)] {
                let mut c = claims_json();
                match &absent {
                    None => {
                        c.as_object_mut().unwrap().remove(name);
                    }
                    Some(v) => c[name] = v.clone(),
                }
                assert_eq!(
                    refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                    Refusal::Malformed(Malformed::MissingClaim(name.into())),
                    "{name} {absent:?}"
                );
            }
        }
    }

    #[test]
    fn claims_of_the_wrong_type_are_malformed() {
        for (name, value) in [
            ("login", json!(5)),
            ("jti", json!(["a"])),
            ("iat", json!("now")),
            ("nbf", json!("later")),
            ("groups", json!("users")),
            ("aud", json!([1, 2])),
        ] {
            let mut c = claims_json();
            c[name] = value;
            assert!(
                matches!(
                    refusal(&verifier(), &signed_raw(&ed_header(), &c)),
                    Refusal::Malformed(Malformed::ClaimType(_) | Malformed::MissingClaim(_))
                ),
                "{name}"
            );
        }
        // A string exp is not an exp.
        let mut c = claims_json();
        c["exp"] = json!("tomorrow");
        assert_eq!(
            refusal(&verifier(), &signed_raw(&ed_header(), &c)),
            Refusal::Malformed(Malformed::MissingClaim("exp".into()))
        );
    }

    #[test]
    fn garbage_is_malformed_before_anything_is_trusted() {
        let v = verifier();
        let header = b64(ed_header().to_string().as_bytes());
        let body = b64(claims_json().to_string().as_bytes());
        let malformed = |token: &str| match refusal(&v, token) {
            Refusal::Malformed(m) => m,
            other => panic!("{token:.60}: {other:?}"),
        };
        for token in [
            "",
            " ",
            "\n",
            "abc",
            "a.b",
            "a.b.c.d",
            "...",
            &format!("{header}.{body}"),
        ] {
            assert_eq!(malformed(token), Malformed::NotThreeParts, "{token:?}");
        }
        for token in [
            "not.a.jwt".to_string(),
            "!!!.e30.AAAA".to_string(),
            format!("{}.{body}.AAAA", b64(b"not json")),
            format!("{}.{body}.AAAA", b64(b"[1]")),
            format!("{}.{body}.AAAA", b64(b"\xff\xfe")),
            format!("{}.{body}.AAAA", b64(br#"{"alg":"EdDSA","kid":5}"#)),
            format!("{}.{body}.AAAA", b64(br#"{"alg":"EdDSA","typ":5}"#)),
        ] {
            assert!(
                matches!(
                    malformed(&token),
                    Malformed::Undecodable {
                        part: Part::Header,
                        ..
                    }
                ),
                "{token}"
            );
        }
        for claims in [
            "!!!".to_string(),
            b64(b"not json"),
            b64(b"[]"),
            b64(b"\"x\""),
        ] {
            let token = format!("{header}.{claims}.AAAA");
            assert!(
                matches!(
                    malformed(&token),
                    Malformed::Undecodable {
                        part: Part::Claims,
                        ..
                    }
                ),
                "{token}"
            );
        }
        let token = format!("{header}.{body}.not*base64");
        assert!(matches!(
            malformed(&token),
            Malformed::Undecodable {
                part: Part::Signature,
                ..
            }
        ));
    }

    #[test]
    fn a_huge_token_is_refused_unread() {
        let v = verifier();
        assert_eq!(
            refusal(&v, &"a".repeat(20_000)),
            Refusal::Malformed(Malformed::TooLong)
        );
        // Even properly signed by a trusted key.
        let mut c = claims();
        c.reason = Some("r".repeat(MAX_TOKEN_BYTES));
        assert_eq!(
            refusal(&v, &signed(ed(), &c)),
            Refusal::Malformed(Malformed::TooLong)
        );
        // Just under the limit is fine.
        c.reason = Some("r".repeat(MAX_TOKEN_BYTES / 2));
        v.verify(&signed(ed(), &c), NOW).unwrap();
    }

    // --- crit ---

    #[test]
    fn a_header_with_crit_is_refused_whatever_its_value() {
        let v = verifier();
        // The same header without crit verifies: the refusals below are crit's alone.
        v.verify(
            &signed_raw(
                &json!({"alg": "EdDSA", "kid": "ed-1", "exp": 1, "b64": true}),
                &claims_json(),
            ),
            NOW,
        )
        .unwrap();
        for crit in [
            json!(["exp"]),
            json!(["b64"]),
            json!(["urn:example:unknown"]),
            json!([]),
            json!(null),
            json!("exp"),
            json!({"x": 1}),
            json!(0),
        ] {
            let token = signed_raw(
                &json!({"alg": "EdDSA", "kid": "ed-1", "crit": crit, "exp": 1, "b64": true}),
                &claims_json(),
            );
            assert!(
                matches!(refusal(&v, &token), Refusal::CriticalHeader(_)),
                "crit {crit}"
            );
        }
        // A duplicated name cannot hide it, nor can an algorithm the host refuses anyway.
        for header in [
            r#"{"alg":"EdDSA","kid":"ed-1","crit":["exp"],"crit":null}"#,
            r#"{"alg":"none","crit":null}"#,
        ] {
            let token = format!("{}.{}.AAAA", b64(header.as_bytes()), b64(b"{}"));
            assert!(
                matches!(refusal(&v, &token), Refusal::CriticalHeader(_)),
                "{header}"
            );
        }
    }

    #[test]
    fn a_long_crit_value_is_cut_short_in_the_reason() {
        let token = signed_raw(
            &json!({"alg": "EdDSA", "kid": "ed-1", "crit": ["x".repeat(5000)]}),
            &claims_json(),
        );
        let why = refusal(&verifier(), &token);
        assert!(matches!(why, Refusal::CriticalHeader(_)));
        assert!(why.to_string().len() < 200, "{why}");
    }
}

#[cfg(test)]
mod workload_tests {
    //! Workload tokens at the prompt, with the workload issuer's keys held fixed: which
    //! grant a token becomes, and which refusal when it becomes none.

    use super::*;
    use crate::grant::{keygen, sign, KeyAlg};
    use serde_json::json;

    const NOW: i64 = 1_800_000_000;
    const GRANT_ISS: &str = "https://issuer.test";
    const WL_ISS: &str = "https://token.actions.test";

    struct Keys {
        grant_pem: String,
        workload_pem: String,
        verifier: Verifier,
    }

    fn keys() -> Keys {
        let (grant_pem, grant_jwks) = keygen(KeyAlg::Ed25519, "g-1").unwrap();
        let (workload_pem, workload_jwks) = keygen(KeyAlg::Es256, "w-1").unwrap();
        let set = |text: &str| serde_json::from_str::<jsonwebtoken::jwk::JwkSet>(text).unwrap();
        let rule: WorkloadRule = serde_json::from_value(json!({
            "name": "deploy", "issuer": WL_ISS, "audience": "usher",
            "claims": {"repository": "acme/web", "ref": "refs/heads/*"},
            "login": "jit-deploy", "profile": "restricted", "max_lifetime": "10m",
        }))
        .unwrap();
        let mut long = rule.clone();
        long.name = "long".into();
        long.login = "jit-long".into();
        long.max_lifetime = usher_trust::HumanDuration::from_secs(7200);
        Keys {
            verifier: Verifier {
                issuers: TrustedIssuers::new(vec![IssuerKeys::fixed(GRANT_ISS, set(&grant_jwks))]),
                workload_issuers: TrustedIssuers::new(vec![IssuerKeys::fixed(
                    WL_ISS,
                    set(&workload_jwks),
                )]),
                workloads: vec![rule, long],
                audiences: vec!["host-a".into()],
                policy: PolicyConfig {
                    max_lifetime_secs: 3600,
                    allowed_groups: vec![],
                    allowed_profiles: vec!["restricted".into()],
                    default_profile: "default".into(),
                    leeway_secs: 30,
                },
                name_prefix: "jit-".into(),
                known_profiles: ["default", "restricted"].map(String::from).into(),
            },
            grant_pem,
            workload_pem,
        }
    }

    fn workload_claims() -> serde_json::Value {
        json!({
            "iss": WL_ISS, "aud": "usher", "sub": "repo:acme/web:ref:refs/heads/main",
            "repository": "acme/web", "ref": "refs/heads/main",
            "iat": NOW - 10, "exp": NOW + 300, "jti": "run-1.attempt-1",
        })
    }

    fn workload_token(k: &Keys, claims: &serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("w-1".into());
        jsonwebtoken::encode(
            &header,
            claims,
            &jsonwebtoken::EncodingKey::from_ec_pem(k.workload_pem.as_bytes()).unwrap(),
        )
        .unwrap()
    }

    async fn presented(
        k: &Keys,
        claims: &serde_json::Value,
        login: &str,
    ) -> Result<Grant, Refusal> {
        k.verifier
            .verify_presented(&workload_token(k, claims), login, NOW)
            .await
    }

    #[tokio::test]
    async fn a_matching_token_becomes_a_grant_for_the_rules_login() {
        let k = keys();
        let g = presented(&k, &workload_claims(), "jit-deploy")
            .await
            .unwrap();
        assert_eq!(g.login(), "jit-deploy");
        assert_eq!(g.profile, "restricted");
        assert_eq!(g.claims.sub, "repo:acme/web:ref:refs/heads/main");
        assert_eq!(g.claims.iss, WL_ISS);
        assert_eq!(g.jti(), "run-1.attempt-1");
        assert_eq!(
            g.claims.exp,
            NOW + 300,
            "the token's end, sooner than the rule's"
        );
        assert_eq!(g.claims.reason.as_deref(), Some("workload rule deploy"));
        // The rule's lifetime ends it sooner than the token would.
        let mut c = workload_claims();
        c["exp"] = json!(NOW + 3000);
        let g = presented(&k, &c, "jit-deploy").await.unwrap();
        assert_eq!(g.claims.exp, NOW + 600);
        // Without a usable jti, a digest of the token: the same token is the same grant.
        for jti in [json!(null), json!("a b/c"), json!(7)] {
            let mut c = workload_claims();
            c["jti"] = jti;
            let first = presented(&k, &c, "jit-deploy").await.unwrap();
            assert!(first.jti().starts_with("wl-"), "{}", first.jti());
            let token = workload_token(&k, &c);
            let again = k
                .verifier
                .verify_presented(&token, "jit-deploy", NOW)
                .await
                .unwrap();
            let twice = k
                .verifier
                .verify_presented(&token, "jit-deploy", NOW)
                .await
                .unwrap();
            assert_eq!(again.jti(), twice.jti());
        }
    }

    #[tokio::test]
    async fn a_token_no_rule_takes_is_refused_with_the_rules_reason() {
        let k = keys();
        let why = presented(&k, &workload_claims(), "jit-other")
            .await
            .unwrap_err();
        assert!(matches!(&why, Refusal::NoWorkloadRule(_)), "{why}");
        let mut c = workload_claims();
        c["repository"] = json!("acme/other");
        let why = presented(&k, &c, "jit-deploy").await.unwrap_err();
        assert_eq!(
            why.to_string(),
            r#"workload token: claim repository is "acme/other", rule deploy wants "acme/web""#
        );
        let mut c = workload_claims();
        c.as_object_mut().unwrap().remove("ref");
        assert!(matches!(
            presented(&k, &c, "jit-deploy").await,
            Err(Refusal::NoWorkloadRule(_))
        ));
        let mut c = workload_claims();
        c["aud"] = json!("host-a");
        assert!(matches!(
            presented(&k, &c, "jit-deploy").await,
            Err(Refusal::WorkloadToken(
                usher_trust::Refusal::WrongAudience { .. }
            ))
        ));
        let mut c = workload_claims();
        c["exp"] = json!(NOW - 60);
        assert!(matches!(
            presented(&k, &c, "jit-deploy").await,
            Err(Refusal::WorkloadToken(usher_trust::Refusal::Expired { .. }))
        ));
        // A rule may not give more than local policy allows any grant.
        let mut c = workload_claims();
        c["exp"] = json!(NOW + 7000);
        assert!(matches!(
            presented(&k, &c, "jit-long").await,
            Err(Refusal::LifetimeOverCap { .. })
        ));
    }

    #[tokio::test]
    async fn workload_tokens_are_grants_only_at_the_prompt_and_grants_stay_grants() {
        let k = keys();
        let token = workload_token(&k, &workload_claims());
        assert_eq!(
            k.verifier.verify(&token, NOW).unwrap_err(),
            Refusal::WorkloadTokenNotAtLogin(WL_ISS.into())
        );
        // A grant of a grant issuer presented at the prompt is a grant, as before.
        let claims = Claims {
            iss: GRANT_ISS.into(),
            sub: "alice".into(),
            aud: Audience::One("host-a".into()),
            jti: "g1".into(),
            iat: NOW - 10,
            nbf: None,
            exp: NOW + 600,
            login: "jit-alice".into(),
            groups: vec![],
            ssh_keys: vec![],
            secret_hash: None,
            profile: None,
            approved_by: None,
            reason: None,
            request: Some("req-42".into()),
        };
        let grant = sign(&k.grant_pem, "g-1", &claims).unwrap();
        let g = k
            .verifier
            .verify_presented(&grant, "jit-alice", NOW)
            .await
            .unwrap();
        assert_eq!(g.claims.request.as_deref(), Some("req-42"));
        // Neither kind of issuer.
        let mut c = workload_claims();
        c["iss"] = json!("https://stranger.test");
        assert_eq!(
            presented(&k, &c, "jit-deploy").await.unwrap_err(),
            Refusal::UnknownIssuer("https://stranger.test".into())
        );
    }
}
