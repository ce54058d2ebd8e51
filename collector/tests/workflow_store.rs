//! The workflow's decisions against its state store, with a fixed clock: N of M, no
//! self-approval under another name, denial, automatic approval in its window, the
//! duration cap, pending and grant expiry, who may revoke, exactly one grant under
//! concurrent approvals, and state that survives a restart. Every scenario runs on SQLite
//! and on a real PostgreSQL (started by the test in a scratch directory).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use usher_collector::config::{AgentConfig, Config, RequestPolicy, StateConfig};
use usher_collector::workflow::policy::PolicyRefusal;
use usher_collector::workflow::{SignedReview, Workflow, WorkflowError};
use usher_test_support::Postgres;
use usher_wire::grant::{Audience, Claims};
use usher_wire::jit::{Decision, NewRequest, Principal, RequestState, Review, Role};

/// 2026-01-01 at `hh:mm` UTC.
fn at(hh: i64, mm: i64) -> i64 {
    1_767_225_600 + hh * 3600 + mm * 60
}

fn key() -> String {
    usher_collector::uploader::openssh_public_line(&ed25519_dalek::SigningKey::from_bytes(&[9; 32]))
}

fn rule(name: &str, hosts: &[&str], approvals: u32) -> RequestPolicy {
    RequestPolicy {
        name: name.into(),
        groups: vec!["eng".into()],
        hosts: hosts.iter().map(|h| h.to_string()).collect(),
        host_labels: vec![],
        logins: vec!["jit-{user}".into()],
        profiles: vec!["restricted".into()],
        max_duration: 4 * 3600,
        reason_required: true,
        approvals,
        approver_groups: vec!["sre-leads".into()],
        auto_approve_groups: vec!["oncall".into()],
        auto_approve_hours: Some((8 * 60, 18 * 60)),
        pending_ttl: 3600,
    }
}

fn config(dir: &std::path::Path, state: StateConfig) -> Config {
    let host = |name: &str| AgentConfig {
        host: name.into(),
        token: format!("token-{name}"),
        host_key: usher_collector::uploader::openssh_public_line(
            &ed25519_dalek::SigningKey::from_bytes(&[1; 32]),
        ),
        labels: vec![],
    };
    Config {
        listen: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        public_url: Some("https://usher.test".into()),
        state,
        roles: BTreeMap::from([
            (Role::Requester, vec!["eng".into()]),
            (Role::Approver, vec!["sre-leads".into()]),
        ]),
        request_policies: vec![rule("two-of-m", &["web-*"], 2), rule("one", &["db-*"], 1)],
        agents: vec![host("web-1"), host("web-2"), host("db-1")],
        ..Config::default()
    }
}

fn who(sub: &str, name: &str, groups: &[&str], roles: &[Role]) -> Principal {
    Principal {
        sub: sub.into(),
        name: name.into(),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        roles: roles.iter().copied().collect(),
    }
}

fn alice() -> Principal {
    who("s-alice", "alice", &["eng"], &[Role::Requester])
}
fn approver(n: u32) -> Principal {
    who(
        &format!("s-approver-{n}"),
        &format!("approver{n}"),
        &["sre-leads"],
        &[Role::Approver],
    )
}

fn ask(host: &str, login: &str, secs: u64) -> NewRequest {
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

fn approve(comment: &str) -> Review {
    Review {
        decision: Decision::Approve,
        comment: comment.into(),
    }
}

/// Where a scenario keeps its state: a scratch directory (SQLite) and maybe a PostgreSQL.
struct Place {
    dir: PathBuf,
    state: StateConfig,
    _postgres: Option<Postgres>,
}

impl Place {
    fn new(name: &str, postgres: bool) -> Place {
        let dir = std::env::temp_dir().join(format!(
            "usher-workflow-store-{name}-{}-{}",
            if postgres { "pg" } else { "sqlite" },
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (state, pg) = if postgres {
            let pg = Postgres::start().unwrap_or_else(|e| panic!("PostgreSQL: {e}"));
            (StateConfig::Postgres { url: pg.url() }, Some(pg))
        } else {
            (StateConfig::Sqlite, None)
        };
        Place {
            dir,
            state,
            _postgres: pg,
        }
    }

    fn config(&self) -> Config {
        config(&self.dir, self.state.clone())
    }

    async fn open(&self) -> Arc<Workflow> {
        Arc::new(Workflow::open(&self.config()).await.unwrap())
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn n_of_m_issues_one_signed_grant(p: &Place) {
    let wf = p.open().await;
    let now = at(3, 0);
    let r = wf
        .create_request(&alice(), ask("web-1", "jit-alice", 3600), now)
        .await
        .unwrap();
    assert_eq!(r.state, RequestState::Pending);
    assert_eq!(r.approvals_needed, 2);
    let r1 = wf
        .review(&approver(1), &r.id, approve("ok"), now + 5)
        .await
        .unwrap();
    assert_eq!(r1.state, RequestState::Pending, "one of two approvals");
    assert!(wf.feed("web-1", now + 5).await.unwrap().grants.is_empty());
    let r2 = wf
        .review(&approver(2), &r.id, approve("fine"), now + 9)
        .await
        .unwrap();
    assert_eq!(r2.state, RequestState::Approved);
    assert_eq!(r2.expires_at, Some(now + 9 + 3600));
    // The requester gets the grant; an approver sees the request without it.
    let mine = wf.get(&alice(), &r.id, now + 10).await.unwrap();
    let jwt = mine.grant.clone().expect("the requester gets the grant");
    assert!(wf
        .get(&approver(1), &r.id, now + 10)
        .await
        .unwrap()
        .grant
        .is_none());
    let claims: Claims = wf.issuer.verify(&jwt).unwrap();
    assert_eq!(claims.iss, "https://usher.test");
    assert_eq!(claims.aud, Audience::One("web-1".into()));
    assert_eq!(claims.sub, "s-alice");
    assert_eq!(claims.login, "jit-alice");
    assert_eq!(claims.ssh_keys, vec![key()]);
    assert_eq!(claims.approved_by.as_deref(), Some("approver1, approver2"));
    assert_eq!(claims.reason.as_deref(), Some("INC-1234"));
    assert_eq!(claims.request.as_deref(), Some(r.id.as_str()));
    assert_eq!(Some(claims.jti.clone()), r2.grant_id);
    // Each review is signed by the service over what was decided.
    for review in &r2.reviews {
        let signed: SignedReview = wf.issuer.verify(&review.signature).unwrap();
        assert_eq!(
            (signed.sub.as_str(), signed.request.as_str()),
            (review.sub.as_str(), r.id.as_str())
        );
    }
    let feed = wf.feed("web-1", now + 10).await.unwrap();
    assert_eq!(feed.grants, vec![jwt]);
    assert!(wf.feed("web-2", now + 10).await.unwrap().grants.is_empty());
    assert_eq!(wf.request_for_grant(&claims.jti).await.unwrap().id, r.id);
    // Every step is in the audit trail.
    let auditor = who("s-aud", "aud", &[], &[Role::Auditor]);
    let events: Vec<String> = wf
        .audit(&auditor, Some(r.id.clone()), 0)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.event)
        .collect();
    assert_eq!(
        events,
        [
            "request.created",
            "review.approve",
            "review.approve",
            "grant.issued",
            "request.approved"
        ]
    );
    assert!(matches!(
        wf.audit(&alice(), None, 0).await,
        Err(WorkflowError::MissingRole(Role::Auditor))
    ));
}

async fn no_self_approval_no_second_review_and_only_the_rules_approvers(p: &Place) {
    let wf = p.open().await;
    let now = at(3, 0);
    let r = wf
        .create_request(&alice(), ask("web-1", "jit-alice", 600), now)
        .await
        .unwrap();
    // Alice under another name, with every role and the approvers' group: still alice.
    let disguised = who(
        "s-alice",
        "Alice Admin",
        &["sre-leads"],
        &[Role::Approver, Role::Admin],
    );
    assert!(matches!(
        wf.review(&disguised, &r.id, approve("me"), now).await,
        Err(WorkflowError::SelfApproval)
    ));
    let outsider = who("s-dave", "dave", &["other"], &[Role::Approver]);
    assert!(matches!(
        wf.review(&outsider, &r.id, approve("x"), now).await,
        Err(WorkflowError::NotAnApproverHere(_))
    ));
    let no_role = who("s-erin", "erin", &["sre-leads"], &[Role::Requester]);
    assert!(matches!(
        wf.review(&no_role, &r.id, approve("x"), now).await,
        Err(WorkflowError::MissingRole(Role::Approver))
    ));
    wf.review(&approver(1), &r.id, approve("ok"), now)
        .await
        .unwrap();
    assert!(matches!(
        wf.review(&approver(1), &r.id, approve("again"), now).await,
        Err(WorkflowError::AlreadyReviewed)
    ));
    assert_eq!(
        wf.get(&alice(), &r.id, now).await.unwrap().state,
        RequestState::Pending
    );
}

async fn a_denial_ends_the_request(p: &Place) {
    let wf = p.open().await;
    let now = at(3, 0);
    let r = wf
        .create_request(&alice(), ask("web-1", "jit-alice", 600), now)
        .await
        .unwrap();
    wf.review(&approver(1), &r.id, approve("ok"), now)
        .await
        .unwrap();
    let deny = Review {
        decision: Decision::Deny,
        comment: "not during the freeze".into(),
    };
    let denied = wf.review(&approver(2), &r.id, deny, now).await.unwrap();
    assert_eq!(denied.state, RequestState::Denied);
    assert!(matches!(
        wf.review(&approver(3), &r.id, approve("late"), now).await,
        Err(WorkflowError::NotPending(RequestState::Denied))
    ));
    assert!(wf.feed("web-1", now).await.unwrap().grants.is_empty());
}

async fn automatic_approval_only_in_its_window_and_the_duration_cap(p: &Place) {
    let wf = p.open().await;
    let olga = who("s-olga", "olga", &["eng", "oncall"], &[Role::Requester]);
    let day = wf
        .create_request(&olga, ask("web-1", "jit-olga", 600), at(12, 0))
        .await
        .unwrap();
    assert_eq!(day.state, RequestState::Approved);
    assert_eq!(day.auto_approved.as_deref(), Some("two-of-m"));
    assert!(day.grant_id.is_some());
    let night = wf
        .create_request(&olga, ask("web-1", "jit-olga", 600), at(20, 0))
        .await
        .unwrap();
    assert_eq!(night.state, RequestState::Pending);
    assert!(matches!(
        wf.create_request(&alice(), ask("web-1", "jit-alice", 4 * 3600 + 1), at(3, 0))
            .await,
        Err(WorkflowError::Policy(PolicyRefusal::TooLong {
            max: 14400,
            ..
        }))
    ));
    let nobody = who("s-nobody", "nobody", &["eng"], &[]);
    assert!(matches!(
        wf.create_request(&nobody, ask("web-1", "jit-nobody", 60), at(3, 0))
            .await,
        Err(WorkflowError::MissingRole(Role::Requester))
    ));
}

async fn pending_requests_and_grants_expire(p: &Place) {
    let wf = p.open().await;
    let t = at(3, 0);
    let pending = wf
        .create_request(&alice(), ask("web-1", "jit-alice", 600), t)
        .await
        .unwrap();
    let short = wf
        .create_request(&alice(), ask("db-1", "jit-alice", 60), t)
        .await
        .unwrap();
    wf.review(&approver(1), &short.id, approve("ok"), t)
        .await
        .unwrap();
    assert_eq!(wf.feed("db-1", t + 1).await.unwrap().grants.len(), 1);
    // A minute later the grant has run out; an hour later the pending request has too.
    assert_eq!(wf.expire_due(t + 59).await.unwrap(), 0);
    assert_eq!(wf.expire_due(t + 60).await.unwrap(), 1);
    assert_eq!(
        wf.get(&alice(), &short.id, t + 61).await.unwrap().state,
        RequestState::Expired
    );
    assert!(wf.feed("db-1", t + 61).await.unwrap().grants.is_empty());
    // Seen as expired before the sweep writes it ...
    assert_eq!(
        wf.get(&alice(), &pending.id, t + 3600).await.unwrap().state,
        RequestState::Expired
    );
    assert!(matches!(
        wf.review(&approver(1), &pending.id, approve("late"), t + 3600)
            .await,
        Err(WorkflowError::NotPending(RequestState::Expired))
    ));
    // ... and stored so by it.
    assert_eq!(wf.expire_due(t + 3600).await.unwrap(), 1);
    let listed = wf
        .list(&alice(), Some(RequestState::Expired), true, t + 3600)
        .await
        .unwrap();
    assert_eq!(listed.len(), 2);
}

async fn who_may_revoke_and_the_agents_hear_of_it(p: &Place) {
    let wf = p.open().await;
    let t = at(3, 0);
    let mut grants = vec![];
    for _ in 0..3 {
        let r = wf
            .create_request(&alice(), ask("db-1", "jit-alice", 600), t)
            .await
            .unwrap();
        let r = wf
            .review(&approver(1), &r.id, approve("ok"), t)
            .await
            .unwrap();
        grants.push(r.grant_id.unwrap());
    }
    let bystander = who("s-eve", "eve", &["eng"], &[Role::Requester]);
    assert!(matches!(
        wf.revoke(&bystander, &grants[0], "mine now", t + 1).await,
        Err(WorkflowError::MayNotRevoke)
    ));
    let before = wf.feed("db-1", t + 1).await.unwrap();
    assert_eq!(before.grants.len(), 3);
    // Her own grant, an approver, an admin.
    let admin = who("s-root", "root", &[], &[Role::Admin]);
    for (by, grant) in [
        (alice(), &grants[0]),
        (approver(2), &grants[1]),
        (admin, &grants[2]),
    ] {
        let r = wf.revoke(&by, grant, "done", t + 2).await.unwrap();
        assert_eq!(r.state, RequestState::Revoked);
        assert_eq!(r.revoked.unwrap().by.sub, by.sub);
    }
    assert!(matches!(
        wf.revoke(&alice(), &grants[0], "again", t + 3).await,
        Err(WorkflowError::NotLive(RequestState::Revoked))
    ));
    assert!(matches!(
        wf.revoke(&alice(), "g-nonexistent", "x", t + 3).await,
        Err(WorkflowError::NoSuchGrant(_))
    ));
    let after = wf.feed("db-1", t + 3).await.unwrap();
    assert!(after.revision > before.revision);
    assert!(after.grants.is_empty());
    let mut revoked: Vec<String> = after.revoked.iter().map(|r| r.jti.clone()).collect();
    revoked.sort();
    grants.sort();
    assert_eq!(revoked, grants);
    assert!(after
        .revoked
        .iter()
        .all(|r| r.exp == t + 600 && r.iss == "https://usher.test"));
    // Once they would have expired anyway, the agents may forget them.
    assert!(wf.feed("db-1", t + 600).await.unwrap().revoked.is_empty());
}

/// Ten approvers at once, split across two instances of the service on the same state:
/// two approvals are accepted, the grant is issued once, the rest are told it is decided.
async fn exactly_one_grant_under_concurrent_approvals(p: &Place) {
    let one = p.open().await;
    let two = p.open().await;
    assert_eq!(
        one.issuer.kid, two.issuer.kid,
        "one issuer key for every instance"
    );
    let t = at(3, 0);
    let r = one
        .create_request(&alice(), ask("web-1", "jit-alice", 600), t)
        .await
        .unwrap();
    let mut tasks = vec![];
    for n in 0..10 {
        let wf = if n % 2 == 0 { one.clone() } else { two.clone() };
        let id = r.id.clone();
        tasks.push(tokio::spawn(async move {
            wf.review(&approver(n), &id, approve("go"), t).await
        }));
    }
    let mut accepted = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => accepted += 1,
            Err(WorkflowError::NotPending(RequestState::Approved)) => {}
            Err(e) => panic!("unexpected refusal: {e}"),
        }
    }
    assert_eq!(accepted, 2);
    let done = two.get(&alice(), &r.id, t).await.unwrap();
    assert_eq!(done.state, RequestState::Approved);
    assert_eq!(done.reviews.len(), 2);
    assert_eq!(one.feed("web-1", t).await.unwrap().grants.len(), 1);
    let auditor = who("s-aud", "aud", &[], &[Role::Auditor]);
    let issued = one
        .audit(&auditor, Some(r.id.clone()), 0)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.event == "grant.issued")
        .count();
    assert_eq!(issued, 1);
}

async fn state_survives_a_restart(p: &Place) {
    let t = at(3, 0);
    let (id, kid, grant) = {
        let wf = p.open().await;
        let r = wf
            .create_request(&alice(), ask("db-1", "jit-alice", 600), t)
            .await
            .unwrap();
        let r = wf
            .review(&approver(1), &r.id, approve("ok"), t)
            .await
            .unwrap();
        (r.id, wf.issuer.kid.clone(), r.grant_id)
    };
    let wf = p.open().await;
    assert_eq!(wf.issuer.kid, kid, "the issuer key is kept");
    let r = wf.get(&alice(), &id, t + 1).await.unwrap();
    assert_eq!(r.state, RequestState::Approved);
    assert_eq!(r.grant_id, grant);
    assert_eq!(r.reviews.len(), 1);
    assert!(r.grant.is_some());
}

macro_rules! on_both {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let place = super::Place::new(stringify!($name), false);
                    super::$name(&place).await;
                }
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    let place = super::Place::new(stringify!($name), true);
                    super::$name(&place).await;
                }
            }
        )*
    };
}

on_both!(
    n_of_m_issues_one_signed_grant,
    no_self_approval_no_second_review_and_only_the_rules_approvers,
    a_denial_ends_the_request,
    automatic_approval_only_in_its_window_and_the_duration_cap,
    pending_requests_and_grants_expire,
    who_may_revoke_and_the_agents_hear_of_it,
    exactly_one_grant_under_concurrent_approvals,
    state_survives_a_restart,
);

/// A reload changes who may request and what roles groups give, at once; a request made
/// before keeps the approvers its rule named then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_takes_effect_for_new_requests_and_roles() {
    use usher_collector::workflow::Policy;
    let place = Place::new("reload", false);
    let wf = place.open().await;
    let t = at(3, 0);
    let before = wf
        .create_request(&alice(), ask("web-1", "jit-alice", 600), t)
        .await
        .unwrap();
    let mut config = place.config();
    config.request_policies.retain(|r| r.name != "two-of-m");
    config
        .roles
        .insert(Role::Approver, vec!["new-leads".into()]);
    wf.reload(Policy::from_config(&config));
    assert!(matches!(
        wf.create_request(&alice(), ask("web-1", "jit-alice", 600), t)
            .await,
        Err(WorkflowError::Policy(PolicyRefusal::HostNotAllowed(_)))
    ));
    // Roles come from the groups as the configuration says now.
    let lead = who("s-lead", "lead", &["sre-leads"], &[Role::Approver]);
    assert!(wf.effective(lead).roles.is_empty());
    let newcomer = wf.effective(who("s-new", "new", &["new-leads", "sre-leads"], &[]));
    assert!(newcomer.roles.contains(&Role::Approver));
    // The earlier request's approvers are still its rule's.
    wf.review(&newcomer, &before.id, approve("ok"), t)
        .await
        .unwrap();
    let no_groups = wf.effective(who("s-tok", "tok", &[], &[Role::Auditor]));
    assert_eq!(no_groups.roles, [Role::Auditor].into());
}

/// PostgreSQL restarted under a running service: the next transaction reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_reconnects_after_the_server_restarts() {
    let mut place = Place::new("reconnect", true);
    let wf = place.open().await;
    let t = at(3, 0);
    let r = wf
        .create_request(&alice(), ask("db-1", "jit-alice", 600), t)
        .await
        .unwrap();
    let pg = place._postgres.as_mut().unwrap();
    pg.kill().unwrap();
    pg.start_again().unwrap();
    let approved = wf
        .review(&approver(1), &r.id, approve("ok"), t)
        .await
        .unwrap();
    assert_eq!(approved.state, RequestState::Approved);
    assert_eq!(wf.feed("db-1", t).await.unwrap().grants.len(), 1);
}
