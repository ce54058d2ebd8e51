//! Which rule a request falls under, and whether it is allowed and approved at once: pure
//! functions of the configuration, the requester and the clock.

use crate::config::{AgentConfig, RequestPolicy};
use base64::Engine;
use usher_wire::jit::{NewRequest, Principal};

/// Why a request is refused by policy.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    #[error("no request policy covers your groups")]
    NoPolicy,
    #[error("no host {0:?} is known to this service")]
    UnknownHost(String),
    #[error("your policy does not cover host {0:?}")]
    HostNotAllowed(String),
    #[error("login {login:?} is not allowed under policy {policy:?}")]
    LoginNotAllowed { login: String, policy: String },
    #[error("profile {profile:?} is not allowed under policy {policy:?}")]
    ProfileNotAllowed { profile: String, policy: String },
    #[error("{asked} s is longer than policy {policy:?} allows ({max} s)")]
    TooLong {
        asked: u64,
        max: u64,
        policy: String,
    },
    #[error("the duration must be at least one second")]
    ZeroDuration,
    #[error("a reason is required")]
    ReasonRequired,
    #[error("the SSH key is not an OpenSSH public key: {0}")]
    BadSshKey(&'static str),
    #[error("a key (ssh_key) or a console secret (secret_hash) is required")]
    NoCredential,
    #[error("{0} is too long")]
    FieldTooLong(&'static str),
}

/// What the policy decided about an allowed request.
#[derive(Debug, Clone, PartialEq)]
pub struct Admitted<'a> {
    pub rule: &'a RequestPolicy,
    /// Approved at once, by this rule's automatic approval.
    pub auto_approved: bool,
}

/// The requester's name as it may appear in a login: the part before `@`, lowercase,
/// letters, digits, `-`, `_` and `.` kept and anything else made `-`.
pub fn sanitised_user(name: &str) -> String {
    let local = name.split('@').next().unwrap_or(name);
    local
        .chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(24)
        .collect()
}

pub use usher_wire::glob_match;

/// Whether `minute_of_day` (UTC) falls in `[from, to)`, wrapping past midnight.
pub fn in_window((from, to): (u32, u32), minute_of_day: u32) -> bool {
    if from <= to {
        (from..to).contains(&minute_of_day)
    } else {
        minute_of_day >= from || minute_of_day < to
    }
}

/// An OpenSSH public key line: a known type, base64 whose first field names the same type.
pub fn check_ssh_key(line: &str) -> Result<(), PolicyRefusal> {
    const TYPES: [&str; 8] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
        "rsa-sha2-512",
    ];
    if line.len() > 16 * 1024 || line.contains('\n') {
        return Err(PolicyRefusal::BadSshKey("not one line"));
    }
    let mut parts = line.split_whitespace();
    let kind = parts.next().ok_or(PolicyRefusal::BadSshKey("empty"))?;
    if !TYPES.contains(&kind) {
        return Err(PolicyRefusal::BadSshKey("unknown key type"));
    }
    let blob = base64::engine::general_purpose::STANDARD
        .decode(
            parts
                .next()
                .ok_or(PolicyRefusal::BadSshKey("no key data"))?,
        )
        .map_err(|_| PolicyRefusal::BadSshKey("key data is not base64"))?;
    let len = blob
        .get(..4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
        .ok_or(PolicyRefusal::BadSshKey("key data too short"))?;
    let named = blob
        .get(4..4 + len)
        .ok_or(PolicyRefusal::BadSshKey("key data too short"))?;
    if named != kind.as_bytes() {
        return Err(PolicyRefusal::BadSshKey("key data names another type"));
    }
    if blob.len() < 4 + len + 4 + 16 {
        return Err(PolicyRefusal::BadSshKey("key data too short"));
    }
    if kind == "ssh-ed25519" {
        crate::keys::parse_openssh_ed25519(line)
            .map_err(|_| PolicyRefusal::BadSshKey("not an Ed25519 public key"))?;
    }
    Ok(())
}

fn host_covered(rule: &RequestPolicy, host: &AgentConfig) -> bool {
    rule.hosts.iter().any(|g| glob_match(g, &host.host))
        || rule.host_labels.iter().any(|l| host.labels.contains(l))
}

/// Decides a new request: the first rule whose groups include one of the requester's and
/// that covers the host decides; its logins, profiles, longest duration and reason rule
/// must all hold. `now` is Unix seconds (for the automatic approval's window).
pub fn admit<'a>(
    rules: &'a [RequestPolicy],
    hosts: &[AgentConfig],
    who: &Principal,
    new: &NewRequest,
    now: i64,
) -> Result<Admitted<'a>, PolicyRefusal> {
    if new.reason.len() > 2000 {
        return Err(PolicyRefusal::FieldTooLong("reason"));
    }
    if new.login.len() > 64 || new.host.len() > 255 {
        return Err(PolicyRefusal::FieldTooLong("host or login"));
    }
    if new.secret_hash.as_ref().is_some_and(|s| s.len() > 512) {
        return Err(PolicyRefusal::FieldTooLong("secret_hash"));
    }
    let in_group = |groups: &[String]| groups.iter().any(|g| who.groups.contains(g));
    let mine: Vec<&RequestPolicy> = rules.iter().filter(|r| in_group(&r.groups)).collect();
    if mine.is_empty() {
        return Err(PolicyRefusal::NoPolicy);
    }
    let host = hosts
        .iter()
        .find(|h| h.host == new.host)
        .ok_or_else(|| PolicyRefusal::UnknownHost(new.host.clone()))?;
    let rule = mine
        .into_iter()
        .find(|r| host_covered(r, host))
        .ok_or_else(|| PolicyRefusal::HostNotAllowed(new.host.clone()))?;
    let user = sanitised_user(&who.name);
    let login_ok = rule
        .logins
        .iter()
        .any(|pattern| glob_match(&pattern.replace("{user}", &user), &new.login));
    if !login_ok || new.login.is_empty() {
        return Err(PolicyRefusal::LoginNotAllowed {
            login: new.login.clone(),
            policy: rule.name.clone(),
        });
    }
    if let Some(profile) = &new.profile {
        if !rule.profiles.contains(profile) {
            return Err(PolicyRefusal::ProfileNotAllowed {
                profile: profile.clone(),
                policy: rule.name.clone(),
            });
        }
    }
    if new.duration_secs == 0 {
        return Err(PolicyRefusal::ZeroDuration);
    }
    if new.duration_secs > rule.max_duration {
        return Err(PolicyRefusal::TooLong {
            asked: new.duration_secs,
            max: rule.max_duration,
            policy: rule.name.clone(),
        });
    }
    if rule.reason_required && new.reason.trim().is_empty() {
        return Err(PolicyRefusal::ReasonRequired);
    }
    match &new.ssh_key {
        Some(key) => check_ssh_key(key)?,
        None if new.secret_hash.is_none() => return Err(PolicyRefusal::NoCredential),
        None => {}
    }
    let minute_of_day = (now.rem_euclid(86400) / 60) as u32;
    let auto_approved = in_group(&rule.auto_approve_groups)
        && rule
            .auto_approve_hours
            .is_none_or(|w| in_window(w, minute_of_day));
    Ok(Admitted {
        rule,
        auto_approved,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use usher_wire::jit::Role;

    /// A real Ed25519 public key line.
    pub fn key() -> String {
        crate::uploader::openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[7; 32]))
    }

    pub fn rule() -> RequestPolicy {
        RequestPolicy {
            name: "engineers".into(),
            groups: vec!["eng".into()],
            hosts: vec!["web-*".into()],
            host_labels: vec!["env=staging".into()],
            logins: vec!["jit-{user}".into()],
            profiles: vec!["restricted".into()],
            max_duration: 4 * 3600,
            reason_required: true,
            approvals: 2,
            approver_groups: vec!["sre-leads".into()],
            auto_approve_groups: vec!["oncall".into()],
            auto_approve_hours: Some((8 * 60, 18 * 60)),
            pending_ttl: 3600,
        }
    }

    pub fn hosts() -> Vec<AgentConfig> {
        let h = |name: &str, labels: &[&str]| AgentConfig {
            host: name.into(),
            token: format!("t-{name}"),
            host_key: String::new(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
        };
        vec![
            h("web-1", &[]),
            h("web-2", &[]),
            h("db-1", &["env=staging"]),
            h("db-2", &["env=prod"]),
        ]
    }

    pub fn person(sub: &str, name: &str, groups: &[&str]) -> Principal {
        Principal {
            sub: sub.into(),
            name: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            roles: [Role::Requester, Role::Approver].into(),
        }
    }

    pub fn ask(host: &str, login: &str, secs: u64) -> NewRequest {
        NewRequest {
            host: host.into(),
            login: login.into(),
            profile: Some("restricted".into()),
            duration_secs: secs,
            reason: "INC-1234".into(),
            ssh_key: Some(key()),
            secret_hash: None,
        }
    }

    /// 2026-01-01 at `hh:mm` UTC.
    pub fn at(hh: i64, mm: i64) -> i64 {
        1_767_225_600 + hh * 3600 + mm * 60
    }

    #[test]
    fn hosts_by_glob_or_label_and_logins_by_pattern() {
        let rules = [rule()];
        let alice = person("s-a", "Alice@example.org", &["eng"]);
        let ok = admit(
            &rules,
            &hosts(),
            &alice,
            &ask("web-1", "jit-alice", 3600),
            at(3, 0),
        );
        assert_eq!(ok.map(|a| a.auto_approved), Ok(false));
        assert!(admit(&rules, &hosts(), &alice, &ask("db-1", "jit-alice", 60), 0).is_ok());
        assert_eq!(
            admit(&rules, &hosts(), &alice, &ask("db-2", "jit-alice", 60), 0),
            Err(PolicyRefusal::HostNotAllowed("db-2".into()))
        );
        assert_eq!(
            admit(&rules, &hosts(), &alice, &ask("web-9", "jit-alice", 60), 0),
            Err(PolicyRefusal::UnknownHost("web-9".into()))
        );
        assert!(matches!(
            admit(&rules, &hosts(), &alice, &ask("web-1", "jit-bob", 60), 0),
            Err(PolicyRefusal::LoginNotAllowed { .. })
        ));
        let outsider = person("s-m", "mallory", &["sales"]);
        assert_eq!(
            admit(
                &rules,
                &hosts(),
                &outsider,
                &ask("web-1", "jit-mallory", 60),
                0
            ),
            Err(PolicyRefusal::NoPolicy)
        );
    }

    #[test]
    fn duration_reason_profile_and_key_are_checked() {
        let rules = [rule()];
        let alice = person("s-a", "alice", &["eng"]);
        assert!(matches!(
            admit(
                &rules,
                &hosts(),
                &alice,
                &ask("web-1", "jit-alice", 4 * 3600 + 1),
                0
            ),
            Err(PolicyRefusal::TooLong { max: 14400, .. })
        ));
        assert!(admit(
            &rules,
            &hosts(),
            &alice,
            &ask("web-1", "jit-alice", 4 * 3600),
            0
        )
        .is_ok());
        let mut no_reason = ask("web-1", "jit-alice", 60);
        no_reason.reason = "  ".into();
        assert_eq!(
            admit(&rules, &hosts(), &alice, &no_reason, 0),
            Err(PolicyRefusal::ReasonRequired)
        );
        let mut other_profile = ask("web-1", "jit-alice", 60);
        other_profile.profile = Some("admin".into());
        assert!(matches!(
            admit(&rules, &hosts(), &alice, &other_profile, 0),
            Err(PolicyRefusal::ProfileNotAllowed { .. })
        ));
        for bad in [
            "ssh-ed25519",
            "ssh-ed25519 !!!",
            "ssh-dss AAAAB3NzaC1kc3MAAACBAP",
            "ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIHJlHa/Qs5kdqR43dzk8yRt4BYVvnkFmZHEewsIQ9GvR",
        ] {
            let mut r = ask("web-1", "jit-alice", 60);
            r.ssh_key = Some(bad.into());
            assert!(
                matches!(
                    admit(&rules, &hosts(), &alice, &r, 0),
                    Err(PolicyRefusal::BadSshKey(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn automatic_approval_by_group_within_its_window() {
        let rules = [rule()];
        let oncall = person("s-o", "olga", &["eng", "oncall"]);
        let r = ask("web-1", "jit-olga", 600);
        let auto = |now| admit(&rules, &hosts(), &oncall, &r, now).map(|a| a.auto_approved);
        assert_eq!(auto(at(8, 0)), Ok(true));
        assert_eq!(auto(at(17, 59)), Ok(true));
        assert_eq!(auto(at(18, 0)), Ok(false));
        assert_eq!(auto(at(7, 59)), Ok(false));
        let alice = person("s-a", "alice", &["eng"]);
        let r = ask("web-1", "jit-alice", 600);
        assert_eq!(
            admit(&rules, &hosts(), &alice, &r, at(12, 0)).map(|a| a.auto_approved),
            Ok(false)
        );
        assert!(in_window((22 * 60, 6 * 60), 23 * 60) && in_window((22 * 60, 6 * 60), 60));
        assert!(!in_window((22 * 60, 6 * 60), 12 * 60));
    }

    #[test]
    fn globs() {
        assert!(glob_match("web-*", "web-1"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYc"));
        assert!(!glob_match("web-?", "web-10"));
        assert!(!glob_match("web-*", "db-web-1"));
        assert_eq!(sanitised_user("Jean Luc@x"), "jean-luc");
    }
}
