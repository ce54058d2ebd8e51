//! asciicast v2: a JSON header line, then one JSON array per event:
//! `[seconds, "o" | "i" | "r" | "m", data]`.

use super::Utf8Stream;
use crate::fsutil;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::path::Path;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct CastHeader {
    pub version: u32,
    pub width: u16,
    pub height: u16,
    /// Unix time of the start.
    pub timestamp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub env: BTreeMap<String, String>,
}

pub struct CastWriter {
    file: File,
    /// Bytes of whole events on disk: a failed write is cut back to here.
    len: u64,
    start: Instant,
    output: Utf8Stream,
    input: Utf8Stream,
}

impl CastWriter {
    pub fn create(path: &Path, header: &CastHeader) -> io::Result<CastWriter> {
        let mut file = fsutil::create_new(path, 0o600)?;
        let mut line = serde_json::to_vec(header).map_err(io::Error::other)?;
        line.push(b'\n');
        file.write_all(&line)?;
        Ok(CastWriter {
            len: line.len() as u64,
            file,
            start: Instant::now(),
            output: Utf8Stream::default(),
            input: Utf8Stream::default(),
        })
    }

    /// Bytes of whole events on disk.
    pub fn bytes(&self) -> u64 {
        self.len
    }

    pub fn output(&mut self, data: &[u8]) -> io::Result<()> {
        let text = self.output.push(data);
        self.event("o", &text)
    }

    pub fn input(&mut self, data: &[u8]) -> io::Result<()> {
        let text = self.input.push(data);
        self.event("i", &text)
    }

    pub fn resize(&mut self, cols: u16, rows: u16) -> io::Result<()> {
        self.event("r", &format!("{cols}x{rows}"))
    }

    pub fn marker(&mut self, label: &str) -> io::Result<()> {
        self.event("m", label)
    }

    fn event(&mut self, kind: &str, data: &str) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let t = (self.start.elapsed().as_secs_f64() * 1e6).round() / 1e6;
        let mut line = serde_json::to_vec(&(t, kind, data)).map_err(io::Error::other)?;
        line.push(b'\n');
        // One write per event: a crash loses at most the event being written, and a
        // full disk leaves no half event behind.
        crate::fsutil::append_whole(&mut self.file, &mut self.len, &line)
    }

    pub fn finish(mut self) -> io::Result<()> {
        let rest = self.output.finish();
        self.event("o", &rest)?;
        self.file.sync_all()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_header_and_events_as_json_lines() {
        let dir = std::env::temp_dir().join(format!("usher-cast-{}", std::process::id()));
        fsutil::private_dir(&dir, 0o700).unwrap();
        let path = dir.join("t.cast");
        let header = CastHeader {
            version: 2,
            width: 80,
            height: 24,
            timestamp: 1,
            command: Some("/bin/bash".into()),
            title: None,
            env: [("TERM".to_string(), "xterm".to_string())].into(),
        };
        let mut w = CastWriter::create(&path, &header).unwrap();
        w.output(b"caf\xc3").unwrap();
        w.output(b"\xa9 \"q\"\r\n\x1b[0m").unwrap();
        w.resize(100, 30).unwrap();
        w.marker("exec /bin/ls").unwrap();
        w.finish().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["version"], 2);
        assert_eq!(lines[0]["env"]["TERM"], "xterm");
        assert_eq!(lines[1][1], "o");
        assert_eq!(lines[1][2], "caf");
        assert_eq!(lines[2][2], "é \"q\"\r\n\u{1b}[0m");
        assert_eq!(lines[3][2], "100x30");
        assert_eq!(lines[4][1], "m");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
