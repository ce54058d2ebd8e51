//! Reading the local user and group databases (files, not NSS: the agent's accounts are local).

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PasswdEntry {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
    pub shell: PathBuf,
}

pub fn read(path: &Path) -> std::io::Result<Vec<PasswdEntry>> {
    Ok(parse(&std::fs::read_to_string(path)?))
}

fn parse(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() != 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].into(),
                shell: f[6].into(),
            })
        })
        .collect()
}

/// The gid of a group by name, from the system's group database.
pub fn lookup_group(name: &str) -> Option<u32> {
    nix::unistd::Group::from_name(name)
        .ok()
        .flatten()
        .map(|g| g.gid.as_raw())
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_and_skips_garbage() {
        let v = super::parse("root:x:0:0:root:/root:/bin/bash\nbroken\njit-a:x:61000:61000::/home/jit-a:/bin/sh\nx:x:nan:1::/:/\n");
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].uid, 61000);
        assert_eq!(v[1].home, std::path::PathBuf::from("/home/jit-a"));
    }
}
