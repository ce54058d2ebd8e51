//! The exec part of a profile (`[exec]` in `policies/*.toml`) and its resolution into the
//! file identities the kernel programs compare against.

use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use usher_ebpf_common::{
    FileKey, FLAG_APPROVAL, FLAG_DENY_LOADER, FLAG_DENY_UNLINKED, MODE_ALLOW, MODE_AUDIT, MODE_DENY,
};

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ExecMode {
    /// Every exec is recorded, none is stopped.
    #[default]
    Audit,
    /// Only the listed files and the files in the listed directories may run.
    Allow,
    /// The listed files and the files in the listed directories may not run.
    Deny,
}

/// `[exec]` of a profile.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ExecPolicy {
    #[serde(default)]
    pub mode: ExecMode,
    /// Files or directories (a directory covers the files directly in it).
    #[serde(default)]
    pub paths: Vec<PathBuf>,
    /// Refuse images with no file on disk (memfd_create, deleted files). Default: on
    /// unless the mode is `audit`.
    pub deny_unlinked: Option<bool>,
    /// Refuse running the dynamic loader directly (`ld-linux.so prog`). Default: on unless
    /// the mode is `audit`.
    pub deny_loader: Option<bool>,
    /// Files or directories whose execs wait for a person's approval (guard/approval).
    #[serde(default)]
    pub approve: Vec<PathBuf>,
    /// Globs on an SSH exec request's command line that wait for approval before it starts.
    #[serde(default)]
    pub approve_commands: Vec<String>,
}

/// What goes into the kernel maps for one session.
#[derive(Debug, Clone, Default)]
pub struct Resolved {
    pub mode: u32,
    pub flags: u32,
    /// (file, index into `rule_names`).
    pub keys: Vec<(FileKey, u32)>,
    pub rule_names: Vec<String>,
    /// Files held for approval (the listed ones and the files of listed directories, and
    /// the directories themselves), with the index of the `approve` entry.
    pub approve: Vec<(FileKey, u32)>,
}

/// Files of a listed directory that are also keyed by their own identity, so that a hard
/// link elsewhere still matches.
const FILES_PER_DIRECTORY: usize = 8192;

/// The kernel's encoding of a device number (major << 20 | minor), as `s_dev` holds it.
pub fn kernel_dev(st_dev: u64) -> u32 {
    let major = libc::major(st_dev);
    let minor = libc::minor(st_dev);
    (major << 20) | (minor & 0xfffff)
}

pub fn file_key(path: &Path) -> std::io::Result<FileKey> {
    let m = std::fs::metadata(path)?;
    Ok(FileKey {
        dev: kernel_dev(m.dev()),
        _pad: 0,
        ino: m.ino(),
    })
}

impl ExecPolicy {
    /// The mode the session is enforced under. Holding programs for approval is a
    /// restriction: a profile that audits but holds some programs is enforced like an
    /// empty deny list (no copies in writable places, no memfd images, no direct loader
    /// runs), so that a copy of a held program does not run unasked.
    pub fn effective_mode(&self) -> ExecMode {
        if self.mode == ExecMode::Audit && !self.approve.is_empty() {
            ExecMode::Deny
        } else {
            self.mode
        }
    }

    pub fn resolve(&self) -> Result<Resolved, String> {
        let effective = self.effective_mode();
        let mode = match effective {
            ExecMode::Audit => MODE_AUDIT,
            ExecMode::Allow => MODE_ALLOW,
            ExecMode::Deny => MODE_DENY,
        };
        let strict = effective != ExecMode::Audit;
        let mut flags = 0;
        if self.deny_unlinked.unwrap_or(strict) {
            flags |= FLAG_DENY_UNLINKED;
        }
        if self.deny_loader.unwrap_or(strict) {
            flags |= FLAG_DENY_LOADER;
        }
        let mut r = Resolved {
            mode,
            flags,
            ..Default::default()
        };
        for (index, path) in self.approve.iter().enumerate() {
            r.approve
                .extend(keys_of(path)?.into_iter().map(|k| (k, index as u32)));
        }
        if !r.approve.is_empty() {
            r.flags |= FLAG_APPROVAL;
        }
        if effective == ExecMode::Audit {
            return Ok(r);
        }
        for path in &self.paths {
            let index = r.rule_names.len() as u32;
            let verb = if self.mode == ExecMode::Allow {
                "allow"
            } else {
                "deny"
            };
            r.rule_names.push(format!("{verb} {}", path.display()));
            r.keys
                .extend(keys_of(path)?.into_iter().map(|k| (k, index)));
        }
        Ok(r)
    }
}

/// The identities a rule's path stands for: the file, or the directory and the files
/// directly in it (so that a hard link elsewhere still matches). A path that does not
/// exist here names nothing.
fn keys_of(path: &Path) -> Result<Vec<FileKey>, String> {
    let meta = match std::fs::metadata(path) {
        Ok(m) => m,
        Err(_) => return Ok(Vec::new()),
    };
    let mut keys = vec![file_key(path).map_err(|e| format!("{}: {e}", path.display()))?];
    if meta.is_dir() {
        let entries = std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
        for entry in entries.flatten().take(FILES_PER_DIRECTORY) {
            if let Ok(m) = std::fs::metadata(entry.path()) {
                if m.is_file() {
                    keys.push(FileKey {
                        dev: kernel_dev(m.dev()),
                        _pad: 0,
                        ino: m.ino(),
                    });
                }
            }
        }
    }
    Ok(keys)
}

/// The dynamic loaders of this host, by identity.
pub fn loaders() -> Vec<FileKey> {
    let mut keys: Vec<FileKey> = [
        "/lib64/ld-linux-x86-64.so.2",
        "/lib/ld-linux-aarch64.so.1",
        "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        "/lib/ld-musl-x86_64.so.1",
        "/lib/ld-linux.so.2",
    ]
    .iter()
    .filter_map(|p| file_key(Path::new(p)).ok())
    .collect();
    keys.sort_by_key(|k| (k.dev, k.ino));
    keys.dedup();
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn audit_is_the_default_and_strict_modes_refuse_tricks_by_default() {
        let p: ExecPolicy = toml::from_str("").unwrap();
        let r = p.resolve().unwrap();
        assert_eq!(r.mode, MODE_AUDIT);
        assert_eq!(r.flags, 0);
        let p: ExecPolicy =
            toml::from_str("mode = \"allow\"\npaths = [\"/bin/sh\", \"/usr/bin\"]").unwrap();
        let r = p.resolve().unwrap();
        assert_eq!(r.mode, MODE_ALLOW);
        assert_eq!(r.flags, FLAG_DENY_UNLINKED | FLAG_DENY_LOADER);
        assert!(r.keys.len() > 2, "directory files are keyed too");
        assert_eq!(r.rule_names, ["allow /bin/sh", "allow /usr/bin"]);
        let p: ExecPolicy =
            toml::from_str("mode = \"deny\"\npaths = [\"/nonexistent\"]\ndeny_loader = false")
                .unwrap();
        let r = p.resolve().unwrap();
        assert_eq!(r.flags, FLAG_DENY_UNLINKED);
        assert!(r.keys.is_empty());
        assert!(toml::from_str::<ExecPolicy>("mode = \"block\"").is_err());
        assert!(toml::from_str::<ExecPolicy>("typo = 1").is_err());
    }

    #[test]
    fn device_numbers_use_the_kernel_encoding() {
        // 8:1 (sda1) is 0x801 for userspace and 8 << 20 | 1 inside the kernel.
        assert_eq!(kernel_dev(libc::makedev(8, 1)), (8 << 20) | 1);
        assert_eq!(kernel_dev(libc::makedev(259, 3)), (259 << 20) | 3);
    }
}
