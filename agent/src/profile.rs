//! Profiles (`policies/*.toml`): what a session may do beyond having a shell — port
//! forwarding, the console, and the exec rules enforced in the kernel.

use crate::enforce::ExecPolicy;
use crate::session::budget::RecordingLimits;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// `ssh -L` (direct-tcpip) to any address the host can reach.
    #[serde(default)]
    pub port_forwarding: bool,
    /// Local logins at the console (see issue 6).
    #[serde(default)]
    pub console: bool,
    #[serde(default)]
    pub exec: ExecPolicy,
    /// How much a session's recording may take, and what happens at the limit.
    #[serde(default)]
    pub recording: RecordingLimits,
}

#[derive(Debug, Clone, Default)]
pub struct Profiles {
    by_name: BTreeMap<String, Profile>,
}

impl Profiles {
    /// Reads every `*.toml` of `dir`. Without the directory, only the built-in `default`
    /// profile (a shell, no forwarding, no exec restriction) exists.
    pub fn load(dir: &Path) -> Result<Profiles, String> {
        let mut by_name = BTreeMap::new();
        by_name.insert("default".to_string(), Profile::builtin_default());
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Profiles { by_name }),
            Err(e) => return Err(format!("{}: {e}", dir.display())),
        };
        let mut paths: Vec<_> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().and_then(|e| e.to_str()) == Some("toml"))
            .collect();
        paths.sort();
        for path in paths {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            let profile: Profile =
                toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
            by_name.insert(profile.name.clone(), profile);
        }
        Ok(Profiles { by_name })
    }

    pub fn get(&self, name: &str) -> Option<&Profile> {
        self.by_name.get(name)
    }

    pub fn names(&self) -> std::collections::BTreeSet<String> {
        self.by_name.keys().cloned().collect()
    }
}

impl Profile {
    fn builtin_default() -> Profile {
        Profile {
            name: "default".into(),
            description: "a shell; no forwarding; every exec audited, none blocked".into(),
            port_forwarding: false,
            console: false,
            exec: ExecPolicy::default(),
            recording: RecordingLimits::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_profiles_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies");
        let profiles = Profiles::load(&dir).unwrap();
        for name in ["default", "restricted", "no-network-tools"] {
            let p = profiles
                .get(name)
                .unwrap_or_else(|| panic!("{name} missing"));
            p.exec.resolve().unwrap();
        }
        assert_eq!(
            profiles.get("restricted").unwrap().exec.mode,
            crate::enforce::ExecMode::Allow
        );
    }

    #[test]
    fn a_broken_profile_is_an_error_with_its_file_name() {
        let dir = std::env::temp_dir().join(format!("usher-profiles-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("bad.toml"),
            "name = \"x\"\n[exec]\nmode = \"sometimes\"\n",
        )
        .unwrap();
        let err = Profiles::load(&dir).unwrap_err();
        assert!(err.contains("bad.toml"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
