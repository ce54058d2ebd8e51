//! A desktop session's recording in the spool (`{id}.desktop`, shipped as the `desktop`
//! stream): the lines the RDP worker encodes (agent-rdp/README.md, "Recording format"),
//! written as they come. usherd writes, the worker never touches the file; so a line is
//! checked here before it lands: one line (no newline in it) and small enough to ship.

use crate::fsutil;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// The longest line: with its newline it must fit one shipping chunk, which is cut at line
/// boundaries and refused by the collector above 4 MiB. The worker cuts images into bands
/// well under this (2 MiB of raw pixels a line).
pub const MAX_LINE: usize = crate::ship::MAX_CHUNK - 1;

pub struct DesktopFile {
    file: File,
    path: PathBuf,
    /// Bytes of whole lines on disk: a failed write is cut back to here.
    len: u64,
}

impl DesktopFile {
    /// `{spool}/{id}.desktop`, new (never an existing file), 0600.
    pub fn create(spool: &Path, id: &str) -> io::Result<DesktopFile> {
        fsutil::private_dir(spool, 0o700)?;
        let path = spool.join(format!("{id}.desktop"));
        let file = fsutil::create_new(&path, 0o600)?;
        Ok(DesktopFile { file, path, len: 0 })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of whole lines on disk.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    /// Appends `line` and a newline; the bytes written. A line with a newline in it, or
    /// longer than [`MAX_LINE`], is refused (`InvalidInput`) and nothing is written; a
    /// failed write (a full disk) leaves no half line behind.
    pub fn append(&mut self, line: &str) -> io::Result<u64> {
        if line.len() > MAX_LINE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a recording line of {} bytes (at most {MAX_LINE})",
                    line.len()
                ),
            ));
        }
        if line.contains('\n') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a recording line with a newline in it",
            ));
        }
        let mut bytes = Vec::with_capacity(line.len() + 1);
        bytes.extend_from_slice(line.as_bytes());
        bytes.push(b'\n');
        fsutil::append_whole(&mut self.file, &mut self.len, &bytes)?;
        Ok(bytes.len() as u64)
    }

    /// Makes what was written durable.
    pub fn finish(self) -> io::Result<()> {
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn lines_are_appended_whole_and_bad_ones_refused() {
        let dir = std::env::temp_dir().join(format!("usher-desktop-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut f = DesktopFile::create(&dir, "s1").unwrap();
        assert_eq!(f.append("{\"version\":1}").unwrap(), 14);
        assert_eq!(f.append("[0.1,\"p\",1,2]").unwrap(), 14);
        let refused = f
            .append("[0.2,\"m\",\"a\"]\n[0.3,\"m\",\"b\"]")
            .unwrap_err();
        assert_eq!(refused.kind(), io::ErrorKind::InvalidInput);
        let long = "x".repeat(MAX_LINE + 1);
        assert_eq!(
            f.append(&long).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(f.bytes(), 28);
        let path = f.path().to_owned();
        f.finish().unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            "{\"version\":1}\n[0.1,\"p\",1,2]\n"
        );
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never over an existing recording.
        assert!(DesktopFile::create(&dir, "s1").is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
