//! Grants known to this host, and the grants revoked on it; both kept in the state
//! directory and both keyed by (iss, jti).

use super::{Grant, GrantId, Refusal, Verifier};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub struct GrantStore {
    dir: PathBuf,
    grants: BTreeMap<GrantId, Grant>,
}

/// The file that holds a grant: `JTI@ISSUER-TAG.jwt`. The issuer is any string (a URL,
/// often), so it goes into the name as a digest; `@` never occurs in a jti (verify allows
/// only `[A-Za-z0-9._-]`), so names of different pairs never meet.
fn file_stem(id: &GrantId) -> String {
    let digest = Sha256::digest(id.iss.as_bytes());
    format!("{}@{}", id.jti, hex::encode(&digest[..16]))
}

impl GrantStore {
    /// Loads and re-verifies every stored grant. Grants that no longer verify (revoked,
    /// expired, their key rotated away) are dropped and returned with the reason, named by
    /// their jti. Files from before grants were keyed by issuer (`JTI.jwt`, written when
    /// one issuer owned each jti) are loaded and renamed.
    pub fn open(
        dir: &Path,
        verifier: &Verifier,
        revocations: &Revocations,
        now: i64,
    ) -> io::Result<(GrantStore, Vec<(String, Refusal)>)> {
        fsutil::private_dir(dir, 0o700)?;
        let mut store = GrantStore {
            dir: dir.to_owned(),
            grants: BTreeMap::new(),
        };
        let mut dropped = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("jwt") {
                continue;
            }
            let stem = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let jti_part = stem.split('@').next().unwrap_or_default().to_string();
            let token = std::fs::read_to_string(&path)?;
            let verdict = verifier.verify(&token, now).and_then(|g| {
                if revocations.contains(&g.id()) {
                    Err(Refusal::Revoked(g.id()))
                } else {
                    Ok(g)
                }
            });
            match verdict {
                Ok(grant) if file_stem(&grant.id()) == stem => {
                    store.grants.insert(grant.id(), grant);
                }
                Ok(grant) if grant.jti() == stem => {
                    let renamed = store.path_of(&grant.id());
                    fsutil::write_atomic(&renamed, grant.token.as_bytes(), 0o600)?;
                    std::fs::remove_file(&path)?;
                    store.grants.insert(grant.id(), grant);
                }
                Ok(_) => dropped.push((jti_part, Refusal::Misfiled(path.clone()))),
                // The issuer's keys could not be fetched: the grant may be good, so its
                // file stays for a start that can check it.
                Err(why @ Refusal::KeysUnavailable { .. }) => dropped.push((jti_part, why)),
                Err(why) => {
                    let _ = std::fs::remove_file(&path);
                    dropped.push((jti_part, why));
                }
            }
        }
        Ok((store, dropped))
    }

    fn path_of(&self, id: &GrantId) -> PathBuf {
        self.dir.join(format!("{}.jwt", file_stem(id)))
    }

    /// Keeps `grant`; a grant already known (same issuer and jti) is left as it is.
    pub fn insert(&mut self, grant: Grant) -> io::Result<bool> {
        let id = grant.id();
        if self.grants.contains_key(&id) {
            return Ok(false);
        }
        fsutil::write_atomic(&self.path_of(&id), grant.token.as_bytes(), 0o600)?;
        self.grants.insert(id, grant);
        Ok(true)
    }

    pub fn remove(&mut self, id: &GrantId) -> Option<Grant> {
        let grant = self.grants.remove(id)?;
        let _ = std::fs::remove_file(self.path_of(id));
        Some(grant)
    }

    pub fn get(&self, id: &GrantId) -> Option<&Grant> {
        self.grants.get(id)
    }

    /// Every stored grant with this jti, whatever its issuer.
    pub fn with_jti(&self, jti: &str) -> Vec<&Grant> {
        self.grants.values().filter(|g| g.jti() == jti).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Grant> {
        self.grants.values()
    }

    /// Live grants for `login`, newest end first.
    pub fn live_for_login(&self, login: &str, now: i64) -> Vec<&Grant> {
        let mut v: Vec<&Grant> = self
            .grants
            .values()
            .filter(|g| g.login() == login && g.is_live(now))
            .collect();
        v.sort_by_key(|g| std::cmp::Reverse(g.expires_at()));
        v
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Revoked {
    /// None for entries from before revocations named their issuer: those revoke the jti
    /// whatever the issuer (the old meaning, and the one that fails closed).
    #[serde(default)]
    iss: Option<String>,
    jti: String,
    /// The revoked grant's `exp` (0 when unknown), so old entries can be pruned.
    exp: i64,
}

impl Revoked {
    fn covers(&self, id: &GrantId) -> bool {
        self.jti == id.jti && self.iss.as_ref().is_none_or(|iss| *iss == id.iss)
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RevokedOnDisk {
    Pairs(Vec<Revoked>),
    /// The first format: jti → exp.
    ByJti(BTreeMap<String, i64>),
}

#[derive(Debug, Deserialize)]
struct RevocationFileIn {
    revoked: RevokedOnDisk,
}

#[derive(Debug, Serialize)]
struct RevocationFileOut<'a> {
    revoked: &'a [Revoked],
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationsError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a revocation list ({{\"revoked\": [{{\"iss\", \"jti\", \"exp\"}}]}}): {source}", path.display())]
    NotAList {
        path: PathBuf,
        source: serde_json::Error,
    },
}

pub struct Revocations {
    path: PathBuf,
    revoked: Vec<Revoked>,
}

impl Revocations {
    pub fn open(path: &Path) -> Result<Revocations, RevocationsError> {
        let revoked = match std::fs::read(path) {
            Ok(bytes) => Self::parse(&bytes).map_err(|source| RevocationsError::NotAList {
                path: path.to_owned(),
                source,
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(source) => {
                return Err(RevocationsError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        Ok(Revocations {
            path: path.to_owned(),
            revoked,
        })
    }

    fn parse(bytes: &[u8]) -> Result<Vec<Revoked>, serde_json::Error> {
        let file: RevocationFileIn = serde_json::from_slice(bytes)?;
        Ok(match file.revoked {
            RevokedOnDisk::Pairs(v) => v,
            RevokedOnDisk::ByJti(map) => map
                .into_iter()
                .map(|(jti, exp)| Revoked {
                    iss: None,
                    jti,
                    exp,
                })
                .collect(),
        })
    }

    pub fn contains(&self, id: &GrantId) -> bool {
        self.revoked.iter().any(|r| r.covers(id))
    }

    /// Records the revocation durably before it returns.
    pub fn add(&mut self, id: &GrantId, exp: Option<i64>, now: i64) -> io::Result<()> {
        // Entries for grants a day past their end can go: an expired grant is refused
        // anyway. Entries whose end is unknown stay.
        self.revoked.retain(|r| {
            if r.exp == 0 {
                true
            } else {
                r.exp + 86400 > now
            }
        });
        let entry = Revoked {
            iss: Some(id.iss.clone()),
            jti: id.jti.clone(),
            exp: exp.unwrap_or(0),
        };
        self.revoked
            .retain(|r| !(r.iss == entry.iss && r.jti == entry.jti));
        self.revoked.push(entry);
        let bytes = serde_json::to_vec_pretty(&RevocationFileOut {
            revoked: &self.revoked,
        })
        .map_err(io::Error::other)?;
        fsutil::write_atomic(&self.path, &bytes, 0o600)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(iss: &str, jti: &str) -> GrantId {
        GrantId {
            iss: iss.into(),
            jti: jti.into(),
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("usher-rev-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        fsutil::private_dir(&dir, 0o700).unwrap();
        dir
    }

    #[test]
    fn a_revocation_names_its_issuer() {
        let dir = scratch("pair");
        let path = dir.join("revoked.json");
        let mut r = Revocations::open(&path).unwrap();
        r.add(&id("https://a", "42"), Some(2_000_000_000), 1)
            .unwrap();
        assert!(r.contains(&id("https://a", "42")));
        assert!(!r.contains(&id("https://b", "42")));
        let again = Revocations::open(&path).unwrap();
        assert!(again.contains(&id("https://a", "42")));
        assert!(!again.contains(&id("https://b", "42")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_list_keyed_by_jti_alone_still_loads_and_revokes_that_jti_of_any_issuer() {
        let dir = scratch("legacy");
        let path = dir.join("revoked.json");
        std::fs::write(&path, r#"{"revoked": {"old-1": 0, "old-2": 1700000000}}"#).unwrap();
        let mut r = Revocations::open(&path).unwrap();
        assert!(r.contains(&id("https://a", "old-1")));
        assert!(r.contains(&id("https://b", "old-1")));
        assert!(!r.contains(&id("https://a", "new")));
        // Writing keeps the old entries in the new form; old-2 is long expired and goes.
        r.add(&id("https://a", "new"), None, 1_800_000_000).unwrap();
        let again = Revocations::open(&path).unwrap();
        assert!(again.contains(&id("https://b", "old-1")));
        assert!(!again.contains(&id("https://b", "old-2")));
        assert!(again.contains(&id("https://a", "new")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_broken_list_is_an_error_not_an_empty_list() {
        let dir = scratch("broken");
        let path = dir.join("revoked.json");
        std::fs::write(&path, r#"{"revoked": 7}"#).unwrap();
        assert!(matches!(
            Revocations::open(&path),
            Err(RevocationsError::NotAList { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A verifier trusting one Ed25519 key, its private key, and a grant's claims.
    fn trusting_one_key(dir: &Path) -> (Verifier, String, crate::grant::Claims) {
        let (key, jwks) = crate::grant::keygen(crate::grant::KeyAlg::Ed25519, "k1").unwrap();
        std::fs::write(dir.join("jwks.json"), jwks).unwrap();
        let config = crate::config::Config::parse(&format!(
            "host_name = \"h\"\n[[issuer]]\niss = \"https://i\"\njwks = \"{}/jwks.json\"\n",
            dir.display()
        ))
        .unwrap();
        let verifier = Verifier::from_config(&config, ["default".to_string()].into()).unwrap();
        let now = crate::grant::now();
        let claims = crate::grant::Claims {
            iss: "https://i".into(),
            sub: "alice".into(),
            aud: crate::grant::Audience::One("h".into()),
            jti: "j-1".into(),
            iat: now,
            nbf: None,
            exp: now + 600,
            login: "jit-alice".into(),
            groups: vec![],
            ssh_keys: vec![],
            secret_hash: None,
            profile: None,
            approved_by: None,
            reason: None,
            request: None,
        };
        (verifier, key, claims)
    }

    #[test]
    fn at_open_stored_grants_are_verified_again_and_dropped_with_their_refusal() {
        let dir = scratch("open");
        let grants = dir.join("grants");
        let (verifier, key, claims) = trusting_one_key(&dir);
        let now = crate::grant::now();
        let token = |jti: &str, exp: i64| {
            let mut c = claims.clone();
            c.jti = jti.into();
            c.exp = exp;
            crate::grant::sign(&key, "k1", &c).unwrap()
        };
        let id_of = |jti: &str| id("https://i", jti);
        fsutil::private_dir(&grants, 0o700).unwrap();
        let write = |name: String, token: String| std::fs::write(grants.join(name), token).unwrap();
        write(
            format!("{}.jwt", file_stem(&id_of("live"))),
            token("live", now + 600),
        );
        // From before grants were keyed by issuer: loaded and renamed.
        write("old.jwt".into(), token("old", now + 600));
        write(
            format!("{}.jwt", file_stem(&id_of("gone"))),
            token("gone", now - 3600),
        );
        write(
            format!("{}.jwt", file_stem(&id_of("revoked"))),
            token("revoked", now + 600),
        );
        write(
            format!("{}.jwt", file_stem(&id_of("other"))),
            token("misfiled", now + 600),
        );
        let mut revocations = Revocations::open(&dir.join("revoked.json")).unwrap();
        revocations.add(&id_of("revoked"), None, now).unwrap();

        let (store, mut dropped) = GrantStore::open(&grants, &verifier, &revocations, now).unwrap();
        let mut kept: Vec<&str> = store.iter().map(|g| g.jti()).collect();
        kept.sort();
        assert_eq!(kept, ["live", "old"]);
        assert!(grants
            .join(format!("{}.jwt", file_stem(&id_of("old"))))
            .exists());
        assert!(!grants.join("old.jwt").exists());
        dropped.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(dropped.len(), 3, "{dropped:?}");
        assert_eq!(dropped[0].1, Refusal::Expired);
        assert!(
            matches!(&dropped[1].1, Refusal::Misfiled(path) if path.ends_with(format!("{}.jwt", file_stem(&id_of("other")))))
        );
        assert_eq!(dropped[2].1, Refusal::Revoked(id_of("revoked")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn file_names_differ_per_issuer_and_never_collide_with_old_names() {
        let a = file_stem(&id("https://a", "42"));
        let b = file_stem(&id("https://b", "42"));
        assert_ne!(a, b);
        assert!(a.starts_with("42@") && a.len() == 3 + 32, "{a}");
    }
}
