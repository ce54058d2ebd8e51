//! Stage 5: recording. A terminal session becomes an asciicast v2 file, an audit stream
//! (JSON lines) and a metadata file, side by side in the spool directory, all 0600.

mod cast;
mod desktop;
mod meta;
mod utf8;

pub use cast::{CastHeader, CastWriter};
pub use desktop::{DesktopFile, MAX_LINE as MAX_DESKTOP_LINE};
pub use meta::{rfc3339_now, GrantInfo, SessionMeta};
pub use utf8::Utf8Stream;

use crate::fsutil;
use serde::Serialize;
use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

/// What the terminal was doing with keystrokes when they arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keystrokes {
    /// Typed to a line editor, a shell, an editor: recorded when input is.
    Recordable,
    /// Typed to a password-style read (canonical mode with ECHO off): never recorded.
    Secret,
}

/// The files of one session's recording.
pub struct Recording {
    pub cast: Option<CastWriter>,
    /// A desktop's recording (`{id}.desktop`): lines `usher-rdp` encoded.
    desktop: Option<DesktopFile>,
    audit: File,
    audit_len: u64,
    meta: SessionMeta,
    meta_path: PathBuf,
    record_input: bool,
}

impl Recording {
    /// Creates the files. Failing here means the session must not start when recording
    /// is required.
    pub fn create(
        spool: &Path,
        meta: SessionMeta,
        header: Option<CastHeader>,
        record_input: bool,
    ) -> io::Result<Recording> {
        fsutil::private_dir(spool, 0o700)?;
        let id = meta.session_id.clone();
        let paths = [
            spool.join(format!("{id}.cast")),
            spool.join(format!("{id}.audit.jsonl")),
            spool.join(format!("{id}.json")),
        ];
        let made = (|| {
            let cast = match header {
                Some(h) => Some(CastWriter::create(&paths[0], &h)?),
                None => None,
            };
            let audit = fsutil::create_new(&paths[1], 0o600)?;
            let rec = Recording {
                cast,
                desktop: None,
                audit,
                audit_len: 0,
                meta,
                meta_path: paths[2].clone(),
                record_input,
            };
            rec.write_meta()?;
            Ok(rec)
        })();
        if made.is_err() {
            // A recording that could not start leaves nothing half-made in the spool.
            for p in &paths {
                let _ = std::fs::remove_file(p);
            }
        }
        made
    }

    pub fn meta(&self) -> &SessionMeta {
        &self.meta
    }

    /// Bytes of whole events on disk, cast, desktop and audit stream together.
    pub fn bytes(&self) -> u64 {
        self.cast.as_ref().map(|c| c.bytes()).unwrap_or(0)
            + self.desktop.as_ref().map(|d| d.bytes()).unwrap_or(0)
            + self.audit_len
    }

    /// Makes this the recording of a desktop: its screen goes to `{id}.desktop`.
    pub fn add_desktop(&mut self) -> io::Result<()> {
        let dir = self.meta_path.parent().unwrap_or(Path::new("."));
        self.desktop = Some(DesktopFile::create(dir, &self.meta.session_id)?);
        Ok(())
    }

    /// One line of a desktop's recording; a line with a newline in it or too long to ship
    /// is refused (`InvalidInput`), nothing written.
    pub fn desktop(&mut self, line: &str) -> io::Result<()> {
        match &mut self.desktop {
            Some(d) => d.append(line).map(|_| ()),
            None => Ok(()),
        }
    }

    pub fn output(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.cast {
            Some(c) => c.output(data),
            None => Ok(()),
        }
    }

    /// Keystrokes, if the config records them and they are not a password being typed.
    pub fn input(&mut self, data: &[u8], keystrokes: Keystrokes) -> io::Result<()> {
        match &mut self.cast {
            Some(c) if self.record_input && keystrokes == Keystrokes::Recordable => c.input(data),
            _ => Ok(()),
        }
    }

    pub fn resize(&mut self, cols: u16, rows: u16) -> io::Result<()> {
        match &mut self.cast {
            Some(c) => c.resize(cols, rows),
            None => Ok(()),
        }
    }

    /// One line in the audit stream (and, for exec events, a marker in the cast).
    pub fn audit<T: Serialize>(&mut self, event: &T, marker: Option<&str>) -> io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(io::Error::other)?;
        line.push(b'\n');
        fsutil::append_whole(&mut self.audit, &mut self.audit_len, &line)?;
        if let (Some(c), Some(label)) = (&mut self.cast, marker) {
            c.marker(label)?;
        }
        Ok(())
    }

    pub fn meta_mut(&mut self) -> &mut SessionMeta {
        &mut self.meta
    }

    pub fn write_meta(&self) -> io::Result<()> {
        let bytes = serde_json::to_vec_pretty(&self.meta).map_err(io::Error::other)?;
        fsutil::write_atomic(&self.meta_path, &bytes, 0o600)
    }

    /// Flushes what is left and makes the files durable.
    pub fn finish(mut self) -> io::Result<()> {
        if let Some(c) = self.cast.take() {
            c.finish()?;
        }
        if let Some(d) = self.desktop.take() {
            d.finish()?;
        }
        self.audit.sync_all()?;
        self.write_meta()
    }
}
