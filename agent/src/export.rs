//! `usher export-video`: a desktop recording (agent-rdp/README.md, "Recording format") to a
//! video file. The recording is played onto a screen in memory, sampled `fps` times a
//! second with the cursor drawn on top, and the raw frames are piped to `ffmpeg`, which
//! encodes them as the output file's extension says.
//!
//! A recording is what the session's desktop showed, and the session's user may be the
//! attacker: every line is checked, images are decoded within the PNG decoder's memory
//! limit and clipped to the screen, and the screen's size is bounded.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The largest screen exported (as the recorder's bound).
const MAX_PIXELS: u64 = 8192 * 8192;
/// The largest cursor drawn.
const MAX_CURSOR: u32 = 512;

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("{path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: no such recording (a .desktop file, or a session id in the spool)")]
    NotFound(String),
    #[error("not a desktop recording: {0}")]
    Header(String),
    #[error("line {line}: {reason}")]
    Line { line: usize, reason: String },
    #[error("the frame rate must be between 1 and 60, not {0}")]
    Fps(u32),
    #[error("ffmpeg is not installed (`{0}` was not found); on Debian: apt install ffmpeg")]
    NoFfmpeg(String),
    #[error("ffmpeg: {0}")]
    Spawn(std::io::Error),
    #[error("ffmpeg failed ({status}): {stderr}")]
    Ffmpeg { status: String, stderr: String },
}

/// What was written.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub width: u32,
    pub height: u32,
    pub frames: u64,
    pub seconds: f64,
}

/// `recording` as a path: a file that exists, else `{spool}/{recording}.desktop` for a
/// session id.
pub fn resolve(recording: &str, spool: &Path) -> Result<PathBuf, ExportError> {
    let as_path = PathBuf::from(recording);
    if as_path.is_file() {
        return Ok(as_path);
    }
    let is_id = !recording.is_empty()
        && !recording.starts_with('.')
        && recording
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    let in_spool = spool.join(format!("{recording}.desktop"));
    if is_id && in_spool.is_file() {
        return Ok(in_spool);
    }
    Err(ExportError::NotFound(recording.to_string()))
}

/// Exports `input` to `output` at `fps` frames a second with the `ffmpeg` program given.
pub fn export_video(
    input: &Path,
    output: &Path,
    fps: u32,
    ffmpeg: &str,
) -> Result<Exported, ExportError> {
    if !(1..=60).contains(&fps) {
        return Err(ExportError::Fps(fps));
    }
    // A first pass for the video's size (the largest the screen was) and length.
    let plan = Plan::read(open(input)?)?;
    let (width, height) = (plan.width.div_ceil(2) * 2, plan.height.div_ceil(2) * 2);
    let frames = ((plan.duration * f64::from(fps)).ceil() as u64).max(1);
    let mut child = Command::new(ffmpeg)
        .args(["-hide_banner", "-loglevel", "error", "-nostdin", "-y"])
        .args(["-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{width}x{height}"), "-r", &fps.to_string()])
        .args(["-i", "pipe:0", "-pix_fmt", "yuv420p"])
        .arg(output)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => ExportError::NoFfmpeg(ffmpeg.to_string()),
            _ => ExportError::Spawn(e),
        })?;
    // Read while frames are written: an ffmpeg with much to say must not block on it.
    let mut stderr = child.stderr.take().map(|mut e| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = e.read_to_string(&mut text);
            text
        })
    });
    let mut stdin = child.stdin.take();
    let written = (|| {
        let pipe = stdin
            .as_mut()
            .ok_or_else(|| ExportError::Spawn(std::io::Error::other("no stdin")))?;
        let mut player = Player::new(width, height, plan.first_size);
        let mut events = Events::new(open(input)?);
        let mut frame = vec![0u8; width as usize * height as usize * 3];
        for i in 0..frames {
            let t = i as f64 / f64::from(fps);
            while let Some(event) = events.next_until(t)? {
                player.apply(&event.1).map_err(|reason| ExportError::Line {
                    line: event.0,
                    reason,
                })?;
            }
            player.render(&mut frame);
            if pipe.write_all(&frame).is_err() {
                // ffmpeg stopped reading: its exit status and words say why.
                return Ok(false);
            }
        }
        Ok(true)
    })();
    drop(stdin.take());
    let status = child.wait().map_err(ExportError::Spawn)?;
    let said = stderr
        .take()
        .and_then(|h| h.join().ok())
        .unwrap_or_default();
    let result = match written {
        // The recording's own error first: ffmpeg merely got fewer frames.
        Err(e) => Err(e),
        Ok(_) if !status.success() => Err(ExportError::Ffmpeg {
            status: status.to_string(),
            stderr: said.trim().to_string(),
        }),
        Ok(true) => Ok(Exported {
            width,
            height,
            frames,
            seconds: frames as f64 / f64::from(fps),
        }),
        Ok(false) => Err(ExportError::Ffmpeg {
            status: status.to_string(),
            stderr: format!("it stopped reading frames early. {}", said.trim()),
        }),
    };
    if result.is_err() {
        // No half a video left to be taken for the whole session.
        let _ = std::fs::remove_file(output);
    }
    result
}

fn open(path: &Path) -> Result<BufReader<std::fs::File>, ExportError> {
    std::fs::File::open(path)
        .map(BufReader::new)
        .map_err(|source| ExportError::Open {
            path: path.to_owned(),
            source,
        })
}

fn screen_size(w: u64, h: u64) -> Result<(u32, u32), String> {
    if w == 0 || h == 0 || w * h > MAX_PIXELS {
        return Err(format!("a screen of {w}x{h}"));
    }
    Ok((w as u32, h as u32))
}

/// The first pass: the header, the largest screen, the last time.
struct Plan {
    first_size: (u32, u32),
    width: u32,
    height: u32,
    duration: f64,
}

impl Plan {
    fn read(reader: impl BufRead) -> Result<Plan, ExportError> {
        let mut events = Events::new(reader);
        let first_size = events.first_size;
        let mut plan = Plan {
            first_size,
            width: first_size.0,
            height: first_size.1,
            duration: 0.0,
        };
        while let Some((line, event)) = events.next_until(f64::INFINITY)? {
            plan.duration = plan.duration.max(event.time());
            if let Event::Resize(w, h) = event {
                let (w, h) =
                    screen_size(w, h).map_err(|reason| ExportError::Line { line, reason })?;
                plan.width = plan.width.max(w);
                plan.height = plan.height.max(h);
            }
        }
        if u64::from(plan.width) * u64::from(plan.height) > MAX_PIXELS {
            return Err(ExportError::Header("the screen grew too large".into()));
        }
        Ok(plan)
    }
}

enum Event {
    /// `k` or `f`: x, y and the PNG.
    Image(f64, i64, i64, Vec<u8>),
    Resize(u64, u64),
    Pointer(i64, i64),
    Cursor(Option<(i64, i64, Vec<u8>)>),
    Other(f64),
}

impl Event {
    fn time(&self) -> f64 {
        match self {
            Event::Image(t, ..) | Event::Other(t) => *t,
            _ => 0.0,
        }
    }
}

/// The recording's lines, parsed one at a time (the file may be larger than memory).
struct Events<R: BufRead> {
    lines: std::io::Lines<R>,
    line: usize,
    first_size: (u32, u32),
    /// A line read past the time asked for.
    held: Option<(usize, f64, Event)>,
    error: Option<ExportError>,
}

impl<R: BufRead> Events<R> {
    fn new(reader: R) -> Events<R> {
        let mut events = Events {
            lines: reader.lines(),
            line: 1,
            first_size: (0, 0),
            held: None,
            error: None,
        };
        if let Err(e) = events.header() {
            events.error = Some(e);
        }
        events
    }

    fn header(&mut self) -> Result<(), ExportError> {
        let first = self
            .lines
            .next()
            .ok_or_else(|| ExportError::Header("the file is empty".into()))?
            .map_err(|e| ExportError::Header(e.to_string()))?;
        let h: serde_json::Value =
            serde_json::from_str(&first).map_err(|e| ExportError::Header(e.to_string()))?;
        if h["format"] != "usher-desktop" || h["version"] != 1 {
            return Err(ExportError::Header(
                "its header is not {\"format\":\"usher-desktop\",\"version\":1}".into(),
            ));
        }
        let (w, h) = (
            h["width"].as_u64().unwrap_or(0),
            h["height"].as_u64().unwrap_or(0),
        );
        self.first_size = screen_size(w, h).map_err(ExportError::Header)?;
        Ok(())
    }

    /// The next event at or before `t`, with its line number.
    fn next_until(&mut self, t: f64) -> Result<Option<(usize, Event)>, ExportError> {
        if let Some(e) = self.error.take() {
            return Err(e);
        }
        if self.held.is_none() {
            loop {
                let Some(text) = self.lines.next() else {
                    return Ok(None);
                };
                self.line += 1;
                let line = self.line;
                let text = text.map_err(|e| ExportError::Line {
                    line,
                    reason: e.to_string(),
                })?;
                if text.trim().is_empty() {
                    continue;
                }
                let (time, event) =
                    parse(&text).map_err(|reason| ExportError::Line { line, reason })?;
                self.held = Some((line, time, event));
                break;
            }
        }
        match self.held.take() {
            Some((line, time, event)) if time <= t => Ok(Some((line, event))),
            held => {
                self.held = held;
                Ok(None)
            }
        }
    }
}

fn parse(text: &str) -> Result<(f64, Event), String> {
    let v: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
    let a = v.as_array().ok_or("not an event array")?;
    let time = a
        .first()
        .and_then(|t| t.as_f64())
        .filter(|t| t.is_finite() && *t >= 0.0)
        .ok_or("no time")?;
    let kind = a.get(1).and_then(|k| k.as_str()).ok_or("no kind")?;
    let int = |i: usize| {
        a.get(i)
            .and_then(|n| n.as_i64())
            .ok_or(format!("field {i} is not a number"))
    };
    let png = |i: usize| -> Result<Vec<u8>, String> {
        use base64::Engine;
        let text = a.get(i).and_then(|s| s.as_str()).ok_or("no image")?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| format!("image: {e}"))
    };
    let event = match kind {
        "k" | "f" => Event::Image(time, int(2)?, int(3)?, png(6)?),
        "s" => Event::Resize(int(2)?.max(0) as u64, int(3)?.max(0) as u64),
        "p" => Event::Pointer(int(2)?, int(3)?),
        "c" if a.get(2).is_some_and(|s| s.is_string()) => Event::Cursor(None),
        "c" => Event::Cursor(Some((int(2)?, int(3)?, png(6)?))),
        _ => Event::Other(time),
    };
    Ok((time, event))
}

/// An image, decoded to RGBA.
struct Image {
    width: u32,
    height: u32,
    rgba: Vec<u8>,
}

fn decode(png_bytes: &[u8]) -> Result<Image, String> {
    let mut decoder = png::Decoder::new(std::io::Cursor::new(png_bytes));
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().map_err(|e| format!("image: {e}"))?;
    let size = reader.output_buffer_size().ok_or("image: too large")?;
    let mut buf = vec![0; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| format!("image: {e}"))?;
    let (w, h) = (info.width, info.height);
    let pixels = w as usize * h as usize;
    let src = &buf[..info.buffer_size()];
    let rgba: Vec<u8> = match info.color_type {
        png::ColorType::Rgba => src.to_vec(),
        png::ColorType::Rgb => src
            .chunks_exact(3)
            .flat_map(|p| [p[0], p[1], p[2], 255])
            .collect(),
        png::ColorType::Grayscale => src.iter().flat_map(|g| [*g, *g, *g, 255]).collect(),
        png::ColorType::GrayscaleAlpha => src
            .chunks_exact(2)
            .flat_map(|p| [p[0], p[0], p[0], p[1]])
            .collect(),
        png::ColorType::Indexed => return Err("image: an indexed image".into()),
    };
    if rgba.len() != pixels * 4 {
        return Err("image: rows of an unexpected length".into());
    }
    Ok(Image {
        width: w,
        height: h,
        rgba,
    })
}

/// The screen as the recording draws it, in a video frame of a fixed size.
struct Player {
    video: (u32, u32),
    size: (u32, u32),
    rgb: Vec<u8>,
    pointer: Option<(i64, i64)>,
    cursor: Option<(i64, i64, Image)>,
}

impl Player {
    fn new(video_w: u32, video_h: u32, size: (u32, u32)) -> Player {
        Player {
            video: (video_w, video_h),
            size,
            rgb: vec![0; video_w as usize * video_h as usize * 3],
            pointer: None,
            cursor: None,
        }
    }

    fn apply(&mut self, event: &Event) -> Result<(), String> {
        match event {
            Event::Image(_, x, y, png) => {
                let image = decode(png)?;
                self.draw(*x, *y, &image, false);
            }
            Event::Resize(w, h) => {
                self.size = screen_size(*w, *h)?;
                self.rgb.fill(0);
            }
            Event::Pointer(x, y) => self.pointer = Some((*x, *y)),
            Event::Cursor(None) => self.cursor = None,
            Event::Cursor(Some((hx, hy, png))) => {
                let image = decode(png)?;
                if image.width > MAX_CURSOR || image.height > MAX_CURSOR {
                    return Err("a cursor larger than 512 pixels".into());
                }
                self.cursor = Some((*hx, *hy, image));
            }
            Event::Other(_) => {}
        }
        Ok(())
    }

    /// Draws `image` at `x, y` into `self.rgb`, clipped to the screen.
    fn draw(&mut self, x: i64, y: i64, image: &Image, blend: bool) {
        let target = &mut self.rgb;
        draw_into(target, self.video.0, self.size, x, y, image, blend);
    }

    fn render(&self, frame: &mut [u8]) {
        frame.copy_from_slice(&self.rgb);
        if let (Some((px, py)), Some((hx, hy, image))) = (self.pointer, &self.cursor) {
            draw_into(
                frame,
                self.video.0,
                self.size,
                px - hx,
                py - hy,
                image,
                true,
            );
        }
    }
}

fn draw_into(
    target: &mut [u8],
    stride_px: u32,
    clip: (u32, u32),
    x: i64,
    y: i64,
    image: &Image,
    blend: bool,
) {
    let (cw, ch) = (i64::from(clip.0), i64::from(clip.1));
    for row in 0..i64::from(image.height) {
        let ty = y + row;
        if !(0..ch).contains(&ty) {
            continue;
        }
        for col in 0..i64::from(image.width) {
            let tx = x + col;
            if !(0..cw).contains(&tx) {
                continue;
            }
            let s = ((row * i64::from(image.width) + col) * 4) as usize;
            let d = ((ty * i64::from(stride_px) + tx) * 3) as usize;
            let src = &image.rgba[s..s + 4];
            let dst = &mut target[d..d + 3];
            if blend {
                let a = u16::from(src[3]);
                for c in 0..3 {
                    dst[c] = ((u16::from(src[c]) * a + u16::from(dst[c]) * (255 - a)) / 255) as u8;
                }
            } else {
                dst.copy_from_slice(&src[..3]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn png_of(w: u32, h: u32, color: png::ColorType, pixel: &[u8]) -> String {
        let mut out = Vec::new();
        {
            let mut enc = png::Encoder::new(&mut out, w, h);
            enc.set_color(color);
            enc.set_depth(png::BitDepth::Eight);
            let mut writer = enc.write_header().unwrap();
            writer
                .write_image_data(&pixel.repeat((w * h) as usize))
                .unwrap();
        }
        base64::engine::general_purpose::STANDARD.encode(out)
    }

    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("usher-export-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// 320x240: red until 1 s, then the left half green; a 16x16 blue cursor at (300, 10);
    /// two seconds long.
    fn synthetic(dir: &Path) -> PathBuf {
        let lines = [
            r#"{"version":1,"format":"usher-desktop","width":320,"height":240,"timestamp":1795000000,"keyframe_secs":10}"#.to_string(),
            format!(r#"[0.000,"k",0,0,320,240,"{}"]"#, png_of(320, 240, png::ColorType::Rgb, &[255, 0, 0])),
            format!(r#"[0.000,"c",0,0,16,16,"{}"]"#, png_of(16, 16, png::ColorType::Rgba, &[0, 0, 255, 255])),
            r#"[0.000,"p",300,10]"#.to_string(),
            format!(r#"[1.000,"f",0,0,160,240,"{}"]"#, png_of(160, 240, png::ColorType::Rgb, &[0, 255, 0])),
            r#"[1.500,"i","key",30,false,true]"#.to_string(),
            r#"[2.000,"m","end"]"#.to_string(),
        ];
        let path = dir.join("s1.desktop");
        std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        path
    }

    fn ffprobe(path: &Path, entries: &str) -> String {
        let out = Command::new("ffprobe")
            .args([
                "-v",
                "error",
                "-select_streams",
                "v:0",
                "-show_entries",
                entries,
            ])
            .args(["-of", "default=noprint_wrappers=1:nokey=1"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn pixel_at(video: &Path, seconds: f64, x: usize, y: usize, width: usize) -> [u8; 3] {
        let out = Command::new("ffmpeg")
            .args(["-v", "error", "-ss", &seconds.to_string(), "-i"])
            .arg(video)
            .args([
                "-frames:v",
                "1",
                "-f",
                "rawvideo",
                "-pix_fmt",
                "rgb24",
                "pipe:1",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let p = (y * width + x) * 3;
        [out.stdout[p], out.stdout[p + 1], out.stdout[p + 2]]
    }

    fn near(got: [u8; 3], want: [u8; 3]) -> bool {
        got.iter()
            .zip(want)
            .all(|(g, w)| (i16::from(*g) - i16::from(w)).abs() <= 24)
    }

    #[test]
    fn a_synthetic_recording_exports_to_a_video_of_its_size_length_and_colours() {
        let scratch = Scratch::new("video");
        let input = synthetic(&scratch.0);
        // By session id in the spool, as `usher export-video ID` finds it.
        assert_eq!(resolve("s1", &scratch.0).unwrap(), input);
        let out = scratch.0.join("out.mp4");
        let exported = export_video(&input, &out, 10, "ffmpeg").unwrap();
        assert_eq!(
            exported,
            Exported {
                width: 320,
                height: 240,
                frames: 20,
                seconds: 2.0
            }
        );
        assert_eq!(ffprobe(&out, "stream=width,height"), "320\n240\n");
        let duration: f64 = ffprobe(&out, "format=duration").trim().parse().unwrap();
        assert!((1.9..2.2).contains(&duration), "{duration} s");
        let early = pixel_at(&out, 0.5, 240, 120, 320);
        assert!(near(early, [255, 0, 0]), "red at 0.5 s: {early:?}");
        let late_left = pixel_at(&out, 1.5, 40, 120, 320);
        assert!(
            near(late_left, [0, 255, 0]),
            "green at 1.5 s: {late_left:?}"
        );
        let late_right = pixel_at(&out, 1.5, 240, 120, 320);
        assert!(near(late_right, [255, 0, 0]), "still red: {late_right:?}");
        let cursor = pixel_at(&out, 1.5, 308, 18, 320);
        assert!(near(cursor, [0, 0, 255]), "the cursor: {cursor:?}");
    }

    #[test]
    fn a_missing_ffmpeg_and_broken_recordings_are_told_apart() {
        let scratch = Scratch::new("errors");
        let input = synthetic(&scratch.0);
        let out = scratch.0.join("out.mp4");
        let missing = export_video(&input, &out, 10, "/nonexistent/ffmpeg").unwrap_err();
        assert!(matches!(missing, ExportError::NoFfmpeg(_)), "{missing}");
        assert!(missing.to_string().contains("not installed"));
        assert!(matches!(
            export_video(&input, &out, 0, "ffmpeg"),
            Err(ExportError::Fps(0))
        ));
        assert!(matches!(
            resolve("../s1", &scratch.0),
            Err(ExportError::NotFound(_))
        ));
        let cast = scratch.0.join("x.cast");
        std::fs::write(&cast, "{\"version\":2,\"width\":80,\"height\":24}\n").unwrap();
        assert!(matches!(
            export_video(&cast, &out, 10, "ffmpeg"),
            Err(ExportError::Header(_))
        ));
        let text = std::fs::read_to_string(&input).unwrap();
        // A broken image and a hostile screen size name their line.
        let bad_image = text.replacen("\"k\",0,0,320,240,\"", "\"k\",0,0,320,240,\"AAAA", 1);
        std::fs::write(&input, bad_image).unwrap();
        let error = export_video(&input, &out, 10, "ffmpeg").unwrap_err();
        assert!(
            matches!(error, ExportError::Line { line: 2, .. }),
            "{error}"
        );
        let huge = text.replacen("[1.500,\"i\"", "[1.400,\"s\",70000,70000]\n[1.500,\"i\"", 1);
        std::fs::write(&input, huge).unwrap();
        let error = export_video(&input, &out, 10, "ffmpeg").unwrap_err();
        assert!(
            matches!(error, ExportError::Line { line: 6, .. }),
            "{error}"
        );
        // An image outside the screen is clipped, not a crash.
        let outside = text.replacen("\"f\",0,0,", "\"f\",-100,200,", 1);
        std::fs::write(&input, outside).unwrap();
        export_video(&input, &out, 10, "ffmpeg").unwrap();
    }
}
