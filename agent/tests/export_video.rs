//! `usher export-video` as a person runs it: a session id looked up in the spool, the
//! video checked with ffprobe, and the errors a person meets (no ffmpeg, no recording).

use base64::Engine;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn png(w: u32, h: u32, pixel: [u8; 3]) -> String {
    let mut out = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut out, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().unwrap();
        writer
            .write_image_data(&pixel.repeat((w * h) as usize))
            .unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(out)
}

fn usher(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_usher"))
        .args(args)
        .output()
        .unwrap()
}

fn spool_with_recording() -> Scratch {
    let dir = std::env::temp_dir().join(format!("usher-export-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lines = [
        r#"{"version":1,"format":"usher-desktop","width":200,"height":150,"timestamp":1795000000,"keyframe_secs":10}"#.to_string(),
        format!(r#"[0.000,"k",0,0,200,150,"{}"]"#, png(200, 150, [0, 90, 200])),
        r#"[3.000,"m","end"]"#.to_string(),
    ];
    std::fs::write(
        dir.join("20261203T095000Z-0a1b2c3d.desktop"),
        lines.join("\n") + "\n",
    )
    .unwrap();
    Scratch(dir)
}

fn probe(video: &Path) -> String {
    let out = Command::new("ffprobe")
        .args(["-v", "error", "-select_streams", "v:0"])
        .args(["-show_entries", "stream=width,height:format=duration"])
        .args(["-of", "default=noprint_wrappers=1"])
        .arg(video)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_session_in_the_spool_exports_to_a_video_and_the_errors_say_what_to_do() {
    let spool = spool_with_recording();
    let dir = spool.0.to_str().unwrap();
    let video = spool.0.join("desktop.mp4");
    let out = usher(&[
        "export-video",
        "--spool",
        dir,
        "--fps",
        "5",
        "20261203T095000Z-0a1b2c3d",
        video.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("200x150, 15 frames, 3.0 s"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let probed = probe(&video);
    assert!(
        probed.contains("width=200") && probed.contains("height=150"),
        "{probed}"
    );
    let duration: f64 = probed
        .lines()
        .find_map(|l| l.strip_prefix("duration="))
        .unwrap()
        .parse()
        .unwrap();
    assert!((2.9..3.2).contains(&duration), "{duration}");

    let no_ffmpeg = usher(&[
        "export-video",
        "--spool",
        dir,
        "--ffmpeg",
        "/nonexistent/ffmpeg",
        "20261203T095000Z-0a1b2c3d",
        spool.0.join("other.mp4").to_str().unwrap(),
    ]);
    assert!(!no_ffmpeg.status.success());
    let said = String::from_utf8_lossy(&no_ffmpeg.stderr);
    assert!(
        said.contains("ffmpeg is not installed") && said.contains("apt install ffmpeg"),
        "{said}"
    );
    assert!(!spool.0.join("other.mp4").exists());

    let missing = usher(&["export-video", "--spool", dir, "no-such-session", "x.mp4"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("no such recording"),
        "{}",
        String::from_utf8_lossy(&missing.stderr)
    );
}
