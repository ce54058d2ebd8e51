//! Grants known to this host, and the jtis revoked on it; both kept in the state directory.

use super::{Grant, Refusal, Verifier};
use crate::fsutil;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};

pub struct GrantStore {
    dir: PathBuf,
    grants: BTreeMap<String, Grant>,
}

impl GrantStore {
    /// Loads and re-verifies every stored grant. Grants that no longer verify (revoked,
    /// expired, their key rotated away) are dropped and returned with the reason.
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
            let name = path
                .file_stem()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned();
            let token = std::fs::read_to_string(&path)?;
            let verdict = verifier.verify(&token, now).and_then(|g| {
                if revocations.contains(g.jti()) {
                    Err(Refusal::Revoked(g.jti().to_string()))
                } else {
                    Ok(g)
                }
            });
            match verdict {
                Ok(grant) if grant.jti() == name => {
                    store.grants.insert(name, grant);
                }
                Ok(_) => dropped.push((name, Refusal::BadClaim("file name is not its jti".into()))),
                Err(why) => {
                    let _ = std::fs::remove_file(&path);
                    dropped.push((name, why));
                }
            }
        }
        Ok((store, dropped))
    }

    /// Keeps `grant`; a grant already known (same jti) is left as it is.
    pub fn insert(&mut self, grant: Grant) -> io::Result<bool> {
        if self.grants.contains_key(grant.jti()) {
            return Ok(false);
        }
        let path = self.dir.join(format!("{}.jwt", grant.jti()));
        fsutil::write_atomic(&path, grant.token.as_bytes(), 0o600)?;
        self.grants.insert(grant.jti().to_string(), grant);
        Ok(true)
    }

    pub fn remove(&mut self, jti: &str) -> Option<Grant> {
        let grant = self.grants.remove(jti)?;
        let _ = std::fs::remove_file(self.dir.join(format!("{jti}.jwt")));
        Some(grant)
    }

    pub fn get(&self, jti: &str) -> Option<&Grant> {
        self.grants.get(jti)
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

#[derive(Debug, Default, Serialize, Deserialize)]
struct RevocationFile {
    /// jti → the revoked grant's `exp` (0 when unknown), so old entries can be pruned.
    revoked: BTreeMap<String, i64>,
}

pub struct Revocations {
    path: PathBuf,
    file: RevocationFile,
}

impl Revocations {
    pub fn open(path: &Path) -> io::Result<Revocations> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                )
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => RevocationFile::default(),
            Err(e) => return Err(e),
        };
        Ok(Revocations {
            path: path.to_owned(),
            file,
        })
    }

    pub fn contains(&self, jti: &str) -> bool {
        self.file.revoked.contains_key(jti)
    }

    /// Records the revocation durably before it returns.
    pub fn add(&mut self, jti: &str, exp: Option<i64>, now: i64) -> io::Result<()> {
        // Entries for grants a day past their end can go: an expired grant is refused
        // anyway. Entries whose end is unknown stay.
        self.file
            .revoked
            .retain(|_, exp| if *exp == 0 { true } else { *exp + 86400 > now });
        self.file.revoked.insert(jti.to_string(), exp.unwrap_or(0));
        let bytes = serde_json::to_vec_pretty(&self.file).map_err(io::Error::other)?;
        fsutil::write_atomic(&self.path, &bytes, 0o600)
    }
}
