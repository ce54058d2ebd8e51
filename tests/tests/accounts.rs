//! Accounts never outlive their grant and never touch what Usher did not make: accounts in
//! the fence that the agent did not make, UIDs handed out again, what an account leaves on
//! the host, the host's own cron, at and sshd, and granted groups.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;
use usher_tests::*;

fn text(out: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Installs a grant for `login` (bound to the test's key); returns its jti.
fn grant(agent: &TestAgent, login: &str) -> String {
    let claims = agent.claims(login, 600);
    let out = agent.install(&agent.sign(&claims));
    assert!(out.status.success(), "install: {}", text(&out));
    claims.jti
}

/// Logs in over SSH and returns the account's UID (the account is made at first login).
fn login_uid(agent: &TestAgent, login: &str) -> u32 {
    let out = agent.ssh(login, "id -u");
    assert!(
        out.status.success(),
        "{}\n--- usherd log ---\n{}",
        text(&out),
        agent.log()
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

fn revoke_and_wait(agent: &TestAgent, jti: &str, login: &str) {
    let out = agent.usher(&["grant", "revoke", jti]);
    assert!(out.status.success(), "revoke: {}", text(&out));
    agent.wait_for(15, "the account to be removed", || !user_exists(login));
}

/// Removes a host account the test made itself (not through usher).
struct HostAccount(String);

impl Drop for HostAccount {
    fn drop(&mut self) {
        let _ = Command::new("userdel")
            .args(["--remove", "--", &self.0])
            .output();
    }
}

#[test]
fn an_account_usher_did_not_make_is_left_alone_reported_and_refused() {
    let mut agent = TestAgent::start();
    let login = agent.login("native");
    // A grant naming it, installed while no such account exists yet.
    let jti = grant(&agent, &login);
    // The host's own account inside usher's fence: its prefix, a UID in its range.
    let uid = agent.uid_max;
    let st = Command::new("useradd")
        .args([
            "--uid",
            &uid.to_string(),
            "--create-home",
            "--shell",
            "/bin/sh",
            "--",
            &login,
        ])
        .status()
        .unwrap();
    assert!(st.success());
    let _cleanup = HostAccount(login.clone());
    let before = passwd_line(&login).unwrap();
    let notes = Path::new(&before[5]).join("notes.txt");
    std::fs::write(&notes, "mine, not usher's\n").unwrap();
    let intact = |agent: &TestAgent, when: &str| {
        assert_eq!(
            passwd_line(&login).as_ref(),
            Some(&before),
            "{when}: the account was changed or removed\n{}",
            agent.log()
        );
        assert!(notes.exists(), "{when}: its home lost a file");
    };

    // Start-up with a live grant naming it: not adopted, its shell not rewritten.
    agent.stop();
    agent.launch();
    std::thread::sleep(Duration::from_millis(2500));
    intact(&agent, "start-up with a live grant");
    let out = agent.ssh(&login, "id -u");
    assert!(
        !out.status.success() && !String::from_utf8_lossy(&out.stdout).contains(&uid.to_string()),
        "a grant opened an account usher did not make: {}",
        text(&out)
    );
    agent.wait_for(5, "the refusal's reason in the journal", || {
        agent.log().lines().any(|l| {
            l.contains("login_refused") && l.contains(&login) && l.contains("not made by usher")
        })
    });
    let status = agent.status();
    let unmanaged = status["unmanaged_accounts"].as_array().unwrap();
    assert!(
        unmanaged
            .iter()
            .any(|a| a["name"] == login.as_str() && a["uid"] == uid),
        "usher status does not report it: {status}"
    );
    let warning = agent.usher(&["status"]);
    assert!(
        String::from_utf8_lossy(&warning.stderr).contains(&login),
        "usher status does not warn about it"
    );

    // Its grant ends: the account is not usher's to remove.
    let out = agent.usher(&["grant", "revoke", &jti]);
    assert!(out.status.success());
    std::thread::sleep(Duration::from_millis(1500));
    intact(&agent, "the grant's end");

    // Start-up without any grant: not an orphan to delete either.
    agent.stop();
    agent.launch();
    std::thread::sleep(Duration::from_millis(1500));
    intact(&agent, "start-up without a grant");
    assert!(
        agent.log().lines().any(|l| l.contains("account_unmanaged")
            && l.contains(&login)
            && l.contains("left alone")),
        "start-up did not report it:\n{}",
        agent.log()
    );

    // A new grant naming it is refused, and the journal says why.
    let out = agent.install(&agent.sign(&agent.claims(&login, 600)));
    assert!(!out.status.success(), "accepted: {}", text(&out));
    assert!(
        agent
            .log()
            .lines()
            .filter(|l| l.contains("login_refused") && l.contains(&login))
            .count()
            >= 2,
        "{}",
        agent.log()
    );
    intact(&agent, "a refused grant");
}

#[test]
fn uids_are_not_handed_out_again_until_the_range_wraps() {
    let mut agent = TestAgent::start();
    let a = agent.login("first");
    let jti = grant(&agent, &a);
    let x = login_uid(&agent, &a);
    revoke_and_wait(&agent, &jti, &a);

    let b = agent.login("second");
    let jti = grant(&agent, &b);
    let y = login_uid(&agent, &b);
    assert_ne!(
        x, y,
        "the UID of an account just removed was handed out again"
    );
    revoke_and_wait(&agent, &jti, &b);

    // Something the next UID in line still owns on the host (a former holder's file): that
    // UID is passed over. And the high-water mark is in the state file: a restart does not
    // reset it.
    let next = y + 1;
    assert!(next <= agent.uid_max, "the test's range is too small");
    let leftover = std::env::temp_dir().join(format!("usher-uid-leftover-{}", agent.prefix));
    std::fs::write(&leftover, "").unwrap();
    std::os::unix::fs::chown(&leftover, Some(next), Some(next)).unwrap();
    agent.stop();
    agent.launch();
    let c = agent.login("third");
    grant(&agent, &c);
    let z = login_uid(&agent, &c);
    let _ = std::fs::remove_file(&leftover);
    assert!(
        ![x, y].contains(&z),
        "after a restart, {z} was handed out again ({x}, {y})"
    );
    assert_ne!(
        z, next,
        "a UID that still owns a file on the host was handed out"
    );
    assert!((agent.uid_min..=agent.uid_max).contains(&z));
}

#[test]
fn removal_takes_crontabs_at_jobs_ipc_objects_queues_mail_and_lingering() {
    let agent = TestAgent::start();
    let login = agent.login("leaves");
    let jti = grant(&agent, &login);
    let uid = login_uid(&agent, &login);
    // An administrator who lets the accounts use cron and at (usher lists them in the deny
    // lists; this host chose otherwise): what they leave must still go with them.
    usher::account::DenyLists::host().remove(&login).unwrap();
    let queue = format!("{login}-q");
    let script = format!(
        "set -e\n\
         echo '17 3 * * * true' | crontab -\n\
         echo true | at now + 1 hour 2>/dev/null\n\
         ipcmk -M 4096 >/dev/null\n\
         ipcmk -Q >/dev/null\n\
         ipcmk -S 1 >/dev/null\n\
         python3 -c \"import ctypes, os; libc = ctypes.CDLL(None, use_errno=True); \
         assert libc.mq_open(b'/{queue}', os.O_CREAT | os.O_RDWR, 0o600, None) >= 0, ctypes.get_errno()\"\n\
         touch /tmp/{login}-left /var/tmp/{login}-left /dev/shm/{login}-left\n\
         mkdir -p /var/tmp/{login}-dir/deeper && touch /var/tmp/{login}-dir/deeper/file\n\
         echo made\n"
    );
    let out = agent.ssh(&login, &script);
    assert!(
        text(&out).contains("made"),
        "{}\n{}",
        text(&out),
        agent.log()
    );
    // What the host's mail system and systemd would make for the account.
    let mail = format!("/var/mail/{login}");
    std::fs::write(&mail, "From: cron\n\nhello\n").unwrap();
    std::os::unix::fs::chown(&mail, Some(uid), None).unwrap();
    let linger = format!("/var/lib/systemd/linger/{login}");
    std::fs::create_dir_all("/var/lib/systemd/linger").unwrap();
    std::fs::write(&linger, "").unwrap();

    let crontab = format!("/var/spool/cron/crontabs/{login}");
    let present = || {
        vec![
            ("crontab", Path::new(&crontab).exists()),
            (
                "at job",
                !files_of_uid("/var/spool/cron/atjobs", uid).is_empty(),
            ),
            ("shared memory", sysvipc_of_uid("shm", uid) > 0),
            ("message queue (SysV)", sysvipc_of_uid("msg", uid) > 0),
            ("semaphores", sysvipc_of_uid("sem", uid) > 0),
            ("message queue (POSIX)", mqueue_exists(&queue)),
            ("mail spool", Path::new(&mail).exists()),
            ("lingering", Path::new(&linger).exists()),
            (
                "temporary file",
                Path::new(&format!("/tmp/{login}-left")).exists(),
            ),
            (
                "file in /var/tmp",
                Path::new(&format!("/var/tmp/{login}-left")).exists(),
            ),
            (
                "directory in /var/tmp",
                Path::new(&format!("/var/tmp/{login}-dir")).exists(),
            ),
            (
                "file in /dev/shm",
                Path::new(&format!("/dev/shm/{login}-left")).exists(),
            ),
        ]
    };
    for (what, there) in present() {
        assert!(there, "the session did not leave its {what}");
    }

    revoke_and_wait(&agent, &jti, &login);
    let left: Vec<&str> = present()
        .into_iter()
        .filter(|(_, there)| *there)
        .map(|(what, _)| what)
        .collect();
    // Clean up by hand whatever the agent left, before failing.
    if !left.is_empty() {
        let _ = std::fs::remove_file(&crontab);
        let _ = std::fs::remove_file(&mail);
        let _ = std::fs::remove_file(&linger);
        for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
            let _ = std::fs::remove_file(format!("{dir}/{login}-left"));
        }
        let _ = std::fs::remove_dir_all(format!("/var/tmp/{login}-dir"));
        for f in files_of_uid("/var/spool/cron/atjobs", uid) {
            let _ = std::fs::remove_file(f);
        }
        remove_sysvipc_of_uid(uid);
        let _ = Command::new("python3")
            .args([
                "-c",
                &format!("import ctypes; ctypes.CDLL(None).mq_unlink(b'/{queue}')"),
            ])
            .status();
    }
    assert!(left.is_empty(), "outlived the account: {left:?}");
}

#[test]
fn cron_at_and_the_host_sshd_turn_the_accounts_away() {
    let agent = TestAgent::start();
    let login = agent.login("sidedoor");
    let jti = grant(&agent, &login);
    let uid = login_uid(&agent, &login);

    // The deny lists that decide for it list it (Debian: no cron.allow, at.deny exists).
    if !Path::new("/etc/cron.allow").exists() {
        assert!(listed_in("/etc/cron.deny").contains(&login));
    }
    if !Path::new("/etc/at.allow").exists() && Path::new("/etc/at.deny").exists() {
        assert!(listed_in("/etc/at.deny").contains(&login));
    }

    // Why listing is not enough and the agent also deletes the account's jobs: atd does
    // not read at.deny when a job runs. A job queued while the name was not listed (an
    // administrator's choice, say) runs after it is listed again.
    let deny_lists = usher::account::DenyLists::host();
    deny_lists.remove(&login).unwrap();
    let marker = format!("/tmp/{login}-at-ran");
    let out = agent.ssh(&login, &format!("echo 'touch {marker}' | at now 2>&1"));
    deny_lists.add(&login).unwrap();
    assert!(text(&out).contains("job "), "{}", text(&out));
    assert!(listed_in("/etc/at.deny").contains(&login));

    // The real schedulers run while the account tries them.
    let _cron = Daemon::start(
        "cron",
        {
            let mut c = Command::new("/usr/sbin/cron");
            c.arg("-f");
            c
        },
        &agent.dir.join("cron.log"),
    );
    let _atd = Daemon::start(
        "atd",
        {
            let mut c = Command::new("/usr/sbin/atd");
            c.arg("-f");
            c
        },
        &agent.dir.join("atd.log"),
    );
    agent.wait_for(10, "atd to run the job queued before the listing", || {
        Path::new(&marker).exists()
    });
    let out = agent.ssh(
        &login,
        "echo '* * * * * touch /tmp/cron-ran' | crontab - 2>&1; echo crontab=$?; \
         echo 'touch /tmp/at-ran' | at now 2>&1; echo at=$?",
    );
    let said = text(&out);
    assert!(said.contains("crontab=1"), "crontab accepted a job: {said}");
    assert!(said.contains("not allowed to use this program"), "{said}");
    assert!(said.contains("at=1"), "at accepted a job: {said}");
    assert!(said.contains("do not have permission to use at"), "{said}");
    assert!(!Path::new(&format!("/var/spool/cron/crontabs/{login}")).exists());
    assert!(files_of_uid("/var/spool/cron/atjobs", uid).is_empty());

    // The host's sshd, with a key of the account's in its authorized_keys: first without
    // the drop-in usher ships (it lets the key in: the refusal below is the drop-in's),
    // then with it, the pattern set to this agent's prefix.
    let home = Path::new(&passwd_line(&login).unwrap()[5]).to_path_buf();
    let ssh_dir = home.join(".ssh");
    std::fs::create_dir_all(&ssh_dir).unwrap();
    std::fs::write(
        ssh_dir.join("authorized_keys"),
        format!("{}\n", agent.client_public_key()),
    )
    .unwrap();
    for p in [&ssh_dir, &ssh_dir.join("authorized_keys")] {
        std::os::unix::fs::chown(p, Some(uid), None).unwrap();
    }
    std::fs::set_permissions(&ssh_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let shipped = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/sshd_config.d/usher.conf"),
    )
    .unwrap();
    assert!(shipped.lines().any(|l| l.trim() == "DenyUsers jit-*"));
    let drop_in = agent.dir.join("sshd-usher.conf");
    std::fs::write(
        &drop_in,
        shipped.replace("jit-*", &format!("{}*", agent.prefix)),
    )
    .unwrap();
    let host_key = agent.dir.join("sshd_host_ed25519");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&host_key)
        .status()
        .unwrap();
    assert!(st.success());
    let made_run_sshd = !Path::new("/run/sshd").exists();
    std::fs::create_dir_all("/run/sshd").unwrap();

    let try_sshd = |include: bool| -> (std::process::Output, String) {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let name = if include { "with" } else { "without" };
        let config = agent.dir.join(format!("sshd_config-{name}"));
        std::fs::write(
            &config,
            format!(
                "{include}Port {port}\nListenAddress 127.0.0.1\nHostKey {key}\nPidFile {dir}/sshd-{name}.pid\n\
                 UsePAM yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\nLogLevel VERBOSE\n",
                include = if include {
                    format!("Include {}\n", drop_in.display())
                } else {
                    String::new()
                },
                key = host_key.display(),
                dir = agent.dir.display(),
            ),
        )
        .unwrap();
        let log = agent.dir.join(format!("sshd-{name}.log"));
        let mut c = Command::new("/usr/sbin/sshd");
        c.args(["-D", "-e", "-f"]).arg(&config);
        let sshd = Daemon::start("sshd", c, &log);
        let out = agent
            .ssh_command_to(&login, "127.0.0.1", port)
            .arg("true")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        drop(sshd);
        (out, std::fs::read_to_string(&log).unwrap_or_default())
    };
    let (_, log) = try_sshd(false);
    assert!(
        log.contains(&format!("Accepted publickey for {login}")),
        "the control sshd did not take the key, so the test proves nothing:\n{log}"
    );
    let (out, log) = try_sshd(true);
    assert_eq!(out.status.code(), Some(255), "{}", text(&out));
    assert!(
        log.contains(&format!(
            "User {login} from 127.0.0.1 not allowed because listed in DenyUsers"
        )),
        "{log}"
    );
    assert!(!log.contains("Accepted publickey"), "{log}");
    if made_run_sshd {
        let _ = std::fs::remove_dir("/run/sshd");
    }

    // The account's end takes it out of the lists again.
    revoke_and_wait(&agent, &jti, &login);
    assert!(!listed_in("/etc/cron.deny").contains(&login));
    assert!(!listed_in("/etc/at.deny").contains(&login));
}

#[test]
fn granted_groups_are_given_per_session_not_written_to_etc_group() {
    let group = format!("usher-g{}", std::process::id());
    let st = Command::new("groupadd").arg(&group).status().unwrap();
    assert!(st.success());
    struct Group(String);
    impl Drop for Group {
        fn drop(&mut self) {
            let _ = Command::new("groupdel").arg(&self.0).output();
        }
    }
    let _group = Group(group.clone());
    let agent = TestAgent::start_with(Options {
        extra_config: format!("[policy]\nallowed_groups = [\"{group}\"]\n"),
        ..Default::default()
    });
    let login = agent.login("member");
    let mut with_group = agent.claims(&login, 600);
    with_group.groups = vec![group.clone()];
    assert!(agent.install(&agent.sign(&with_group)).status.success());
    // A second grant for the same login, without the group, bound to another key.
    let other_key = agent.dir.join("id_other");
    let st = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(st.success());
    let mut without = agent.claims(&login, 600);
    without.ssh_keys = vec![std::fs::read_to_string(other_key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string()];
    assert!(agent.install(&agent.sign(&without)).status.success());

    let out = agent.ssh(&login, "id -Gn");
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log());
    let groups = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        groups.split_whitespace().any(|g| g == group),
        "the granted group is missing from the session: {groups}"
    );
    assert!(
        !group_members(&group).contains(&login) && groups_listing(&login).is_empty(),
        "/etc/group lists the account: {:?}",
        groups_listing(&login)
    );
    let out = agent.ssh_with_key(&other_key, &login, "id -Gn");
    assert!(out.status.success(), "{}\n{}", text(&out), agent.log());
    let groups = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !groups.split_whitespace().any(|g| g == group),
        "a grant without the group got it: {groups}"
    );
}

/// The account's expiry day (days since 1970, the eighth field of its shadow line), by
/// `getent shadow`.
fn shadow_expiry_day(login: &str) -> Option<i64> {
    let out = Command::new("getent")
        .args(["shadow", login])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .split(':')
        .nth(7)
        .and_then(|f| f.parse().ok())
}

#[test]
fn the_account_expires_with_its_grant_and_a_longer_grant_moves_the_date() {
    let agent = TestAgent::start_with(Options {
        extra_config: "[policy]\nmax_lifetime_secs = 864000\n".into(),
        ..Default::default()
    });
    let login = agent.login("expiring");
    let first = agent.claims(&login, 600);
    assert!(agent.install(&agent.sign(&first)).status.success());
    login_uid(&agent, &login);
    // The fence: the day after the one the grant ends in, the account no longer opens
    // (the date is a whole day; the agent removes the account at `exp` itself).
    let day = shadow_expiry_day(&login).expect("an expiry date in the account's shadow line");
    assert_eq!(
        day,
        first.exp.div_euclid(86400) + 1,
        "the expiry day does not follow the grant's exp {}",
        first.exp
    );
    let chage = Command::new("chage").args(["-l", &login]).output().unwrap();
    let chage = String::from_utf8_lossy(&chage.stdout).into_owned();
    let expires = chage
        .lines()
        .find(|l| l.starts_with("Account expires"))
        .unwrap_or_else(|| panic!("chage -l says nothing of expiry: {chage}"));
    assert!(!expires.contains("never"), "{chage}");
    // A second grant for the account, ending five days later: the fence moves with it.
    let mut second = agent.claims(&login, 5 * 86400);
    second.jti = format!("{}-longer", first.jti);
    assert!(agent.install(&agent.sign(&second)).status.success());
    login_uid(&agent, &login);
    assert_eq!(
        shadow_expiry_day(&login),
        Some(second.exp.div_euclid(86400) + 1),
        "the expiry day did not follow the longer grant's exp {}",
        second.exp
    );
}
