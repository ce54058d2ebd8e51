//! `usher play FILE`: replays an asciicast v2 recording on this terminal.

use std::io::{BufRead, Write};
use std::time::{Duration, Instant};

pub fn play(path: &std::path::Path, speed: f64, idle_limit: Option<f64>) -> Result<(), String> {
    if !(speed > 0.0 && speed.is_finite()) {
        return Err("speed must be a positive number".into());
    }
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut lines = std::io::BufReader::new(file).lines();
    let header = lines
        .next()
        .ok_or("empty file")?
        .map_err(|e| e.to_string())?;
    let header: serde_json::Value =
        serde_json::from_str(&header).map_err(|e| format!("bad header: {e}"))?;
    if header["version"] != 2 {
        return Err("not an asciicast v2 file".into());
    }
    let mut out = std::io::stdout().lock();
    let start = Instant::now();
    let (mut last_t, mut virtual_t) = (0.0f64, 0.0f64);
    for (n, line) in lines.enumerate() {
        let line = line.map_err(|e| e.to_string())?;
        if line.trim().is_empty() {
            continue;
        }
        let (t, kind, data): (f64, String, String) =
            serde_json::from_str(&line).map_err(|e| format!("line {}: bad event: {e}", n + 2))?;
        let mut gap = (t - last_t).max(0.0);
        if let Some(limit) = idle_limit {
            gap = gap.min(limit);
        }
        last_t = t;
        virtual_t += gap / speed;
        let due = start + Duration::from_secs_f64(virtual_t);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            out.flush().map_err(|e| e.to_string())?;
            std::thread::sleep(wait);
        }
        if kind == "o" {
            out.write_all(data.as_bytes()).map_err(|e| e.to_string())?;
        }
    }
    out.flush().map_err(|e| e.to_string())
}
