//! Workload rules (`[[workload]]`, the same in the service's config and in usherd.toml):
//! which verified OIDC tokens from which issuer may become which grant.

use crate::jose::{shortened, VerifiedClaims};
use crate::IssuerConfig;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// One rule: a token of `issuer`, for `audience`, whose listed claims all match, may be
/// granted `login` (with `profile`) for at most `max_lifetime`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRule {
    pub name: String,
    /// The issuer's `iss`; its keys come by discovery unless configured otherwise.
    pub issuer: String,
    /// The token's `aud` must name this.
    pub audience: String,
    /// Every listed claim must be in the token and match (exactly, or as a glob with `*`
    /// and `?`); a claim listed here and missing from the token refuses.
    #[serde(default)]
    pub claims: BTreeMap<String, ClaimPattern>,
    /// Host names (globs) the rule grants access to. The service only: usherd grants its
    /// own host.
    #[serde(default)]
    pub hosts: Vec<String>,
    pub login: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    pub max_lifetime: HumanDuration,
    /// The service only: a human approves first.
    #[serde(default)]
    pub approval: bool,
    /// The service only: how long a request waiting for approval stays pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_ttl: Option<HumanDuration>,
}

/// What a rule wants of one claim: one pattern, or any of several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClaimPattern {
    One(String),
    AnyOf(Vec<String>),
}

impl ClaimPattern {
    fn patterns(&self) -> &[String] {
        match self {
            ClaimPattern::One(p) => std::slice::from_ref(p),
            ClaimPattern::AnyOf(ps) => ps,
        }
    }

    /// Whether a claim's value matches: a string as it is, a number or boolean as its JSON
    /// text, a list when any element does. Objects and null never match.
    pub fn matches(&self, value: &Value) -> bool {
        let matches_text = |text: &str| self.patterns().iter().any(|p| glob_match(p, text));
        match value {
            Value::String(s) => matches_text(s),
            Value::Number(_) | Value::Bool(_) => matches_text(&value.to_string()),
            Value::Array(items) => items.iter().any(|item| match item {
                Value::String(s) => matches_text(s),
                Value::Number(_) | Value::Bool(_) => matches_text(&item.to_string()),
                _ => false,
            }),
            Value::Null | Value::Object(_) => false,
        }
    }
}

impl std::fmt::Display for ClaimPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClaimPattern::One(p) => write!(f, "{p:?}"),
            ClaimPattern::AnyOf(ps) => write!(f, "one of {ps:?}"),
        }
    }
}

/// `*` matches any run of characters (`/` too), `?` one character; everything else itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    // Iterative matching with one backtrack point: linear in practice, never exponential.
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || (p[pi] != '*' && p[pi] == t[ti])) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// Why one rule does not take a token. `Display` names the rule and both sides, e.g.
/// `claim repository is "acme/other", rule deploy wants "acme/web"`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuleMiss {
    #[error("the token is for audience {token}, rule {rule} wants {want:?}")]
    Audience {
        rule: String,
        token: String,
        want: String,
    },
    #[error("the token has no claim {claim}, rule {rule} wants {want}")]
    MissingClaim {
        rule: String,
        claim: String,
        want: ClaimPattern,
    },
    #[error("claim {claim} is {got}, rule {rule} wants {want}")]
    Claim {
        rule: String,
        claim: String,
        /// The token's value as JSON, cut short.
        got: String,
        want: ClaimPattern,
    },
    #[error("rule {rule} does not cover host {host:?}")]
    Host { rule: String, host: String },
    #[error("rule {rule} grants login {want:?}, not {asked:?}")]
    Login {
        rule: String,
        want: String,
        asked: String,
    },
}

/// No rule takes the token: every rule of its issuer, each with its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoRule {
    pub iss: String,
    pub misses: Vec<RuleMiss>,
}

impl std::fmt::Display for NoRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.misses.is_empty() {
            return write!(f, "no workload rule trusts issuer {:?}", self.iss);
        }
        for (i, miss) in self.misses.iter().enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{miss}")?;
        }
        Ok(())
    }
}

impl std::error::Error for NoRule {}

impl WorkloadRule {
    /// Whether this rule takes a verified token of its issuer. `host`: the host asked for
    /// (the service); `None` skips the check (usherd, where the rule means this host).
    /// `login`: the login asked for, which must be the rule's; `None` skips the check.
    pub fn check(
        &self,
        claims: &VerifiedClaims,
        host: Option<&str>,
        login: Option<&str>,
    ) -> Result<(), RuleMiss> {
        let aud = claims.get("aud");
        let aud_ok = match aud {
            Some(Value::String(a)) => *a == self.audience,
            Some(Value::Array(items)) => items
                .iter()
                .any(|a| a.as_str() == Some(self.audience.as_str())),
            _ => false,
        };
        if !aud_ok {
            return Err(RuleMiss::Audience {
                rule: self.name.clone(),
                token: shortened(&aud.map(Value::to_string).unwrap_or_else(|| "none".into())),
                want: self.audience.clone(),
            });
        }
        for (claim, want) in &self.claims {
            match claims.get(claim) {
                None | Some(Value::Null) => {
                    return Err(RuleMiss::MissingClaim {
                        rule: self.name.clone(),
                        claim: claim.clone(),
                        want: want.clone(),
                    })
                }
                Some(value) if !want.matches(value) => {
                    return Err(RuleMiss::Claim {
                        rule: self.name.clone(),
                        claim: claim.clone(),
                        got: shortened(&value.to_string()),
                        want: want.clone(),
                    })
                }
                Some(_) => {}
            }
        }
        if let Some(host) = host {
            if !self.hosts.iter().any(|h| glob_match(h, host)) {
                return Err(RuleMiss::Host {
                    rule: self.name.clone(),
                    host: host.to_string(),
                });
            }
        }
        if let Some(asked) = login {
            if asked != self.login {
                return Err(RuleMiss::Login {
                    rule: self.name.clone(),
                    want: self.login.clone(),
                    asked: shortened(asked),
                });
            }
        }
        Ok(())
    }

    /// The longest grant this rule gives, in seconds.
    pub fn max_lifetime_secs(&self) -> u64 {
        self.max_lifetime.as_secs()
    }
}

/// The first rule (in configuration order) of issuer `iss` that takes the verified token,
/// or why not: when `login` is given, the reasons of the rules for that login (or, when no
/// rule grants it, that each grants another); else of every rule of the issuer.
pub fn match_rule<'r>(
    rules: &'r [WorkloadRule],
    iss: &str,
    claims: &VerifiedClaims,
    host: Option<&str>,
    login: Option<&str>,
) -> Result<&'r WorkloadRule, NoRule> {
    let of_issuer = || rules.iter().filter(move |r| r.issuer == iss);
    let for_login = |r: &&WorkloadRule| login.is_none_or(|l| r.login == l);
    let mut misses = Vec::new();
    if login.is_some() && !of_issuer().any(|r| for_login(&r)) {
        let asked = shortened(login.unwrap_or_default());
        misses = of_issuer()
            .map(|r| RuleMiss::Login {
                rule: r.name.clone(),
                want: r.login.clone(),
                asked: asked.clone(),
            })
            .collect();
        return Err(NoRule {
            iss: shortened(iss),
            misses,
        });
    }
    for rule in of_issuer().filter(for_login) {
        match rule.check(claims, host, login) {
            Ok(()) => return Ok(rule),
            Err(miss) => misses.push(miss),
        }
    }
    Err(NoRule {
        iss: shortened(iss),
        misses,
    })
}

/// The audiences the rules of issuer `iss` accept: what its tokens are verified against.
pub fn audiences_for(rules: &[WorkloadRule], iss: &str) -> Vec<String> {
    let mut auds: Vec<String> = rules
        .iter()
        .filter(|r| r.issuer == iss)
        .map(|r| r.audience.clone())
        .collect();
    auds.sort();
    auds.dedup();
    auds
}

/// One issuer configuration per issuer the rules name: the one given in `explicit` (for a
/// CA, a JWKS file or other timings), else discovery with the defaults.
pub fn workload_issuers(rules: &[WorkloadRule], explicit: &[IssuerConfig]) -> Vec<IssuerConfig> {
    let mut seen = std::collections::BTreeSet::new();
    rules
        .iter()
        .filter(|r| seen.insert(r.issuer.clone()))
        .map(|r| {
            explicit
                .iter()
                .find(|c| c.iss == r.issuer)
                .cloned()
                .unwrap_or_else(|| IssuerConfig::discovery(&r.issuer))
        })
        .collect()
}

/// A span of time as people write it in configuration: `"15m"`, `"1h"`, `"1h30m"`,
/// `"90s"`, `"2d"`, or a number of seconds (`900` or `"900"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub std::time::Duration);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a duration (\"15m\", \"1h\", \"1h30m\", \"90s\", \"2d\" or seconds)")]
pub struct BadDuration(pub String);

impl HumanDuration {
    pub fn from_secs(secs: u64) -> HumanDuration {
        HumanDuration(std::time::Duration::from_secs(secs))
    }

    pub fn as_secs(&self) -> u64 {
        self.0.as_secs()
    }

    pub fn parse(text: &str) -> Result<HumanDuration, BadDuration> {
        let bad = || BadDuration(shortened(text));
        let text = text.trim();
        if text.is_empty() {
            return Err(bad());
        }
        if let Ok(secs) = text.parse::<u64>() {
            return Ok(HumanDuration::from_secs(secs));
        }
        let mut total: u64 = 0;
        let mut number = String::new();
        for c in text.chars() {
            if c.is_ascii_digit() {
                number.push(c);
                continue;
            }
            let unit = match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                _ => return Err(bad()),
            };
            let n: u64 = number.parse().map_err(|_| bad())?;
            number.clear();
            total = n
                .checked_mul(unit)
                .and_then(|s| total.checked_add(s))
                .ok_or_else(bad)?;
        }
        if !number.is_empty() {
            return Err(bad());
        }
        Ok(HumanDuration::from_secs(total))
    }
}

impl std::fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.as_secs();
        for (unit, size) in [("d", 86400), ("h", 3600), ("m", 60)] {
            if secs != 0 && secs.is_multiple_of(size) {
                return write!(f, "{}{unit}", secs / size);
            }
        }
        write!(f, "{secs}s")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Seconds(u64),
            Text(String),
        }
        match Written::deserialize(d)? {
            Written::Seconds(s) => Ok(HumanDuration::from_secs(s)),
            Written::Text(t) => HumanDuration::parse(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rule() -> WorkloadRule {
        serde_json::from_value(json!({
            "name": "deploy",
            "issuer": "https://token.actions.example",
            "audience": "usher",
            "claims": {"repository": "acme/web", "ref": "refs/heads/*", "environment": ["prod", "staging"]},
            "hosts": ["web-*"],
            "login": "jit-deploy",
            "profile": "restricted",
            "max_lifetime": "15m",
        }))
        .unwrap()
    }

    fn token() -> VerifiedClaims {
        json!({
            "iss": "https://token.actions.example", "aud": "usher", "sub": "repo:acme/web:ref:refs/heads/main",
            "repository": "acme/web", "ref": "refs/heads/main", "environment": "prod", "repository_id": 42,
        })
        .as_object()
        .unwrap()
        .clone()
    }

    #[test]
    fn a_token_with_every_claim_matches() {
        let rules = [rule()];
        let got = match_rule(
            &rules,
            "https://token.actions.example",
            &token(),
            Some("web-1"),
            Some("jit-deploy"),
        )
        .unwrap();
        assert_eq!(got.name, "deploy");
        assert_eq!(got.max_lifetime_secs(), 900);
        // usherd asks without a host.
        assert!(rule().check(&token(), None, None).is_ok());
        // aud as a list.
        let mut t = token();
        t.insert("aud".into(), json!(["other", "usher"]));
        assert!(rule().check(&t, None, None).is_ok());
    }

    #[test]
    fn each_mismatch_says_which_claim_and_what_the_rule_wants() {
        let mut t = token();
        t.insert("repository".into(), json!("acme/other"));
        let miss = rule().check(&t, None, None).unwrap_err();
        assert_eq!(
            miss.to_string(),
            r#"claim repository is "acme/other", rule deploy wants "acme/web""#
        );
        let mut t = token();
        t.insert("ref".into(), json!("refs/tags/v1"));
        assert!(
            matches!(rule().check(&t, None, None), Err(RuleMiss::Claim { claim, .. }) if claim == "ref")
        );
        let mut t = token();
        t.remove("environment");
        assert!(matches!(
            rule().check(&t, None, None),
            Err(RuleMiss::MissingClaim { claim, .. }) if claim == "environment"
        ));
        let mut t = token();
        t.insert("environment".into(), json!(null));
        assert!(matches!(
            rule().check(&t, None, None),
            Err(RuleMiss::MissingClaim { .. })
        ));
        let mut t = token();
        t.insert("environment".into(), json!({"name": "prod"}));
        assert!(matches!(
            rule().check(&t, None, None),
            Err(RuleMiss::Claim { .. })
        ));
        let mut t = token();
        t.insert("aud".into(), json!("someone-else"));
        assert!(matches!(
            rule().check(&t, None, None),
            Err(RuleMiss::Audience { .. })
        ));
        assert!(matches!(
            rule().check(&token(), Some("db-1"), None),
            Err(RuleMiss::Host { .. })
        ));
        assert!(matches!(
            rule().check(&token(), None, Some("jit-root")),
            Err(RuleMiss::Login { .. })
        ));
    }

    #[test]
    fn numbers_and_lists_match_by_their_text() {
        let mut r = rule();
        r.claims
            .insert("repository_id".into(), ClaimPattern::One("42".into()));
        assert!(r.check(&token(), None, None).is_ok());
        r.claims
            .insert("repository_id".into(), ClaimPattern::One("4".into()));
        assert!(r.check(&token(), None, None).is_err());
        let mut r = rule();
        r.claims
            .insert("groups".into(), ClaimPattern::One("deployers".into()));
        let mut t = token();
        t.insert("groups".into(), json!(["devs", "deployers"]));
        assert!(r.check(&t, None, None).is_ok());
        t.insert("groups".into(), json!(["devs"]));
        assert!(r.check(&t, None, None).is_err());
    }

    #[test]
    fn first_rule_of_the_issuer_wins_and_no_rule_lists_every_reason() {
        let mut second = rule();
        second.name = "staging".into();
        second.claims.clear();
        second.login = "jit-staging".into();
        let mut other_issuer = rule();
        other_issuer.name = "elsewhere".into();
        other_issuer.issuer = "https://other".into();
        let rules = [other_issuer, rule(), second];
        let iss = "https://token.actions.example";
        assert_eq!(
            match_rule(&rules, iss, &token(), None, None).unwrap().name,
            "deploy"
        );
        // The login the client asked for picks among rules that match.
        assert_eq!(
            match_rule(&rules, iss, &token(), None, Some("jit-staging"))
                .unwrap()
                .name,
            "staging"
        );
        let none = match_rule(&rules, iss, &token(), None, Some("jit-x")).unwrap_err();
        assert_eq!(none.misses.len(), 2, "{none}");
        assert!(none.to_string().contains("rule deploy grants login"));
        let none = match_rule(&rules, "https://nobody", &token(), None, None).unwrap_err();
        assert_eq!(
            none.to_string(),
            r#"no workload rule trusts issuer "https://nobody""#
        );
        assert_eq!(audiences_for(&rules, iss), vec!["usher".to_string()]);
        let issuers = workload_issuers(&rules, &[]);
        assert_eq!(issuers.len(), 2);
        assert!(issuers.iter().all(|c| c.discovery));
    }

    #[test]
    fn globs() {
        for (p, t) in [
            ("*", ""),
            ("*", "anything/at/all"),
            ("refs/heads/*", "refs/heads/main"),
            ("refs/heads/*", "refs/heads/feature/x"),
            ("web-?", "web-1"),
            ("a*b*c", "aXbYc"),
            ("exact", "exact"),
        ] {
            assert!(glob_match(p, t), "{p} {t}");
        }
        for (p, t) in [
            ("refs/heads/*", "refs/tags/v1"),
            ("web-?", "web-10"),
            ("exact", "exact2"),
            ("exact", "Exact"),
            ("a*b*c", "aXbY"),
            ("", "x"),
        ] {
            assert!(!glob_match(p, t), "{p} {t}");
        }
        // No exponential blow-up on hostile input.
        assert!(!glob_match(
            &"*a".repeat(50),
            &format!("{}b", "a".repeat(5000))
        ));
    }

    #[test]
    fn durations() {
        for (text, secs) in [
            ("15m", 900),
            ("1h", 3600),
            ("1h30m", 5400),
            ("90s", 90),
            ("2d", 172800),
            ("900", 900),
        ] {
            assert_eq!(
                HumanDuration::parse(text).unwrap().as_secs(),
                secs,
                "{text}"
            );
        }
        for bad in [
            "",
            "m",
            "15x",
            "1.5h",
            "-1m",
            "1h30",
            "99999999999999999999d",
        ] {
            assert!(HumanDuration::parse(bad).is_err(), "{bad}");
        }
        let r: WorkloadRule = serde_json::from_value(json!({
            "name": "n", "issuer": "i", "audience": "a", "login": "jit-x", "max_lifetime": 600
        }))
        .unwrap();
        assert_eq!(r.max_lifetime.as_secs(), 600);
        assert_eq!(HumanDuration::from_secs(900).to_string(), "15m");
        assert_eq!(HumanDuration::from_secs(61).to_string(), "61s");
    }
}
