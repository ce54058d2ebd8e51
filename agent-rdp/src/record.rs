//! The desktop recording: the format is in README.md ("Recording format"). Frames arrive at
//! the client's rate; the recording keeps a copy of the screen and writes what changed at
//! most `max_fps` times a second, as PNG images, with a keyframe (the whole screen) first,
//! after a resize, and every `keyframe_secs` while the screen changes.
//!
//! Memory is bounded whatever the encoder's pace: the capture side only copies pixels into
//! the shadow screen and widens the dirty region, so a slow encoder writes fewer, larger
//! rectangles, never a queue of frames. Input events are queued up to a cap; beyond it they
//! are counted and a marker says how many were lost.

use base64::Engine;
use ironrdp_server::{DisplayUpdate, KeyboardEvent, MouseEvent, PixelFormat};
use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use usher_wire::rdp::RecordingSettings;

#[derive(Debug, Clone, thiserror::Error)]
pub enum RecordError {
    #[error("an image could not be encoded: {0}")]
    Encode(String),
    #[error("the recording's output is closed")]
    Closed,
    #[error("the screen is too large to record: {width}x{height}")]
    ScreenTooLarge { width: u16, height: u16 },
    #[error("the recorder's thread could not start: {0}")]
    Thread(String),
}

/// The largest screen recorded (pixels); larger is refused rather than allocated.
const MAX_PIXELS: usize = 8192 * 8192;
/// Raw RGB bytes in one image at most: a larger rectangle is cut into horizontal bands, so
/// that a line (PNG, base64) stays well under the shipper's and collector's 4 MiB chunk
/// (incompressible pixels: PNG ≈ raw + 0.1 %, base64 × 4/3 → about 2.7 MiB).
const MAX_IMAGE_BYTES: usize = 2 << 20;
/// Rectangles kept apart in the dirty region before they are merged into their bounds.
const MAX_DIRTY_RECTS: usize = 64;
/// Input events waiting for the encoder thread at most; more are counted, not kept.
const MAX_PENDING_EVENTS: usize = 4096;
/// Cursor shapes kept by the client's cache index (RDP caches are a few dozen).
const MAX_CACHED_CURSORS: usize = 64;

/// The output: one line of the recording (no newline) at a time.
pub type LineSink = Box<dyn FnMut(String) -> Result<(), RecordError> + Send>;

pub struct DesktopRecorder {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    clock: Clock,
    input: bool,
}

/// Seconds since the header's `timestamp` (a whole Unix second, so the fraction of the
/// start second is part of every time, and exec times line up with frames).
#[derive(Clone, Copy)]
struct Clock {
    started: Instant,
    offset: f64,
}

impl Clock {
    fn start() -> (Clock, u64) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let clock = Clock {
            started: Instant::now(),
            offset: f64::from(now.subsec_millis()) / 1000.0,
        };
        (clock, now.as_secs())
    }

    fn now(&self) -> f64 {
        self.offset + self.started.elapsed().as_secs_f64()
    }
}

struct Shared {
    state: Mutex<State>,
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rect {
    x: u16,
    y: u16,
    w: u16,
    h: u16,
}

impl Rect {
    fn right(&self) -> u32 {
        u32::from(self.x) + u32::from(self.w)
    }
    fn bottom(&self) -> u32 {
        u32::from(self.y) + u32::from(self.h)
    }
    fn contains(&self, o: &Rect) -> bool {
        self.x <= o.x && self.y <= o.y && self.right() >= o.right() && self.bottom() >= o.bottom()
    }
    fn union(&self, o: &Rect) -> Rect {
        let x = self.x.min(o.x);
        let y = self.y.min(o.y);
        Rect {
            x,
            y,
            w: (self.right().max(o.right()) - u32::from(x)) as u16,
            h: (self.bottom().max(o.bottom()) - u32::from(y)) as u16,
        }
    }
}

/// The screen as the client sees it, RGB.
struct Screen {
    width: u16,
    height: u16,
    rgb: Vec<u8>,
}

impl Screen {
    fn new(width: u16, height: u16) -> Result<Screen, RecordError> {
        let pixels = usize::from(width) * usize::from(height);
        if pixels > MAX_PIXELS {
            return Err(RecordError::ScreenTooLarge { width, height });
        }
        Ok(Screen {
            width,
            height,
            rgb: vec![0; pixels * 3],
        })
    }

    /// Copies a bitmap in, clipped to the screen and to the data there is; the part written.
    fn blit(&mut self, b: &ironrdp_server::BitmapUpdate) -> Option<Rect> {
        let bpp = usize::from(b.format.bytes_per_pixel());
        let stride = b.stride.get();
        let x0 = usize::from(b.x);
        let y0 = usize::from(b.y);
        let w = usize::from(b.width.get()).min(usize::from(self.width).saturating_sub(x0));
        let rows_in_data = if b.data.len() >= w * bpp {
            (b.data.len() - w * bpp) / stride + 1
        } else {
            0
        };
        let h = usize::from(b.height.get())
            .min(usize::from(self.height).saturating_sub(y0))
            .min(rows_in_data);
        if w == 0 || h == 0 || stride < w * bpp {
            return None;
        }
        let [ri, gi, bi, _] = b.format.channel_offsets();
        let screen_w = usize::from(self.width);
        for row in 0..h {
            let src = &b.data[row * stride..row * stride + w * bpp];
            let dst_start = ((y0 + row) * screen_w + x0) * 3;
            let dst = &mut self.rgb[dst_start..dst_start + w * 3];
            for (px, out) in src.chunks_exact(bpp).zip(dst.chunks_exact_mut(3)) {
                out[0] = px[ri];
                out[1] = px[gi];
                out[2] = px[bi];
            }
        }
        Some(Rect {
            x: b.x,
            y: b.y,
            w: w as u16,
            h: h as u16,
        })
    }

    fn copy(&self, r: Rect) -> Vec<u8> {
        let screen_w = usize::from(self.width);
        let mut out = Vec::with_capacity(usize::from(r.w) * usize::from(r.h) * 3);
        for row in usize::from(r.y)..usize::from(r.y) + usize::from(r.h) {
            let start = (row * screen_w + usize::from(r.x)) * 3;
            out.extend_from_slice(&self.rgb[start..start + usize::from(r.w) * 3]);
        }
        out
    }

    fn whole(&self) -> Rect {
        Rect {
            x: 0,
            y: 0,
            w: self.width,
            h: self.height,
        }
    }
}

#[derive(Clone)]
struct Cursor {
    hot_x: u16,
    hot_y: u16,
    width: u16,
    height: u16,
    rgba: Vec<u8>,
}

#[derive(Clone)]
enum CursorChange {
    Shape(Cursor),
    Hidden,
    Default,
}

struct State {
    screen: Screen,
    dirty: Vec<Rect>,
    /// The next batch must carry a keyframe (start, resize).
    keyframe_needed: bool,
    /// The screen changed since the last keyframe.
    changed_since_keyframe: bool,
    resized: bool,
    pointer: Option<(u16, u16)>,
    cursor: Option<CursorChange>,
    cursors: HashMap<u16, Cursor>,
    /// Input lines with their times, oldest first.
    events: VecDeque<String>,
    dropped_events: u64,
    closing: bool,
    /// The first error; once set nothing more is recorded.
    error: Option<RecordError>,
}

impl State {
    fn has_work(&self) -> bool {
        self.keyframe_needed
            || !self.dirty.is_empty()
            || self.pointer.is_some()
            || self.cursor.is_some()
            || !self.events.is_empty()
            || self.dropped_events > 0
    }

    fn mark_dirty(&mut self, r: Rect) {
        self.changed_since_keyframe = true;
        if self.keyframe_needed || self.dirty.iter().any(|d| d.contains(&r)) {
            return;
        }
        self.dirty.retain(|d| !r.contains(d));
        self.dirty.push(r);
        if self.dirty.len() > MAX_DIRTY_RECTS {
            let bounds = self
                .dirty
                .iter()
                .skip(1)
                .fold(self.dirty[0], |a, b| a.union(b));
            self.dirty = vec![bounds];
        }
    }

    fn event(&mut self, line: String) {
        if self.events.len() >= MAX_PENDING_EVENTS {
            self.dropped_events += 1;
        } else {
            self.events.push_back(line);
        }
    }

    /// What the encoder writes next: the pixels copied out so the lock is released while
    /// they are compressed.
    fn take(&mut self, time: f64, keyframe_due: bool) -> Batch {
        let mut batch = Batch {
            time,
            events: self.events.drain(..).collect(),
            dropped_events: std::mem::take(&mut self.dropped_events),
            resized: None,
            pointer: self.pointer.take(),
            cursor: self.cursor.take(),
            keyframe: false,
            images: Vec::new(),
        };
        if std::mem::take(&mut self.resized) {
            batch.resized = Some((self.screen.width, self.screen.height));
        }
        let keyframe = self.keyframe_needed
            || (keyframe_due && (self.changed_since_keyframe || !self.dirty.is_empty()));
        let rects = if keyframe {
            self.keyframe_needed = false;
            self.changed_since_keyframe = false;
            batch.keyframe = true;
            self.dirty.clear();
            vec![self.screen.whole()]
        } else {
            std::mem::take(&mut self.dirty)
        };
        for r in rects {
            for band in bands(r) {
                if band.w > 0 && band.h > 0 {
                    batch.images.push((band, self.screen.copy(band)));
                }
            }
        }
        batch
    }
}

/// `r` cut into horizontal bands of at most [`MAX_IMAGE_BYTES`] raw.
fn bands(r: Rect) -> Vec<Rect> {
    let row_bytes = usize::from(r.w).max(1) * 3;
    let rows = (MAX_IMAGE_BYTES / row_bytes).clamp(1, usize::from(u16::MAX)) as u16;
    let mut out = Vec::new();
    let mut y = r.y;
    let end = r.bottom();
    while u32::from(y) < end {
        let h = rows.min((end - u32::from(y)) as u16);
        out.push(Rect {
            x: r.x,
            y,
            w: r.w,
            h,
        });
        y += h;
    }
    out
}

struct Batch {
    time: f64,
    events: Vec<String>,
    dropped_events: u64,
    resized: Option<(u16, u16)>,
    pointer: Option<(u16, u16)>,
    cursor: Option<CursorChange>,
    keyframe: bool,
    images: Vec<(Rect, Vec<u8>)>,
}

impl DesktopRecorder {
    /// `out` receives each line of the recording (without its newline), the header first;
    /// an error from it stops the recording.
    pub fn start(
        width: u16,
        height: u16,
        settings: RecordingSettings,
        out: LineSink,
    ) -> DesktopRecorder {
        let (clock, timestamp) = Clock::start();
        let (screen, error) = match Screen::new(width, height) {
            Ok(s) => (s, None),
            Err(e) => (
                Screen {
                    width: 0,
                    height: 0,
                    rgb: Vec::new(),
                },
                Some(e),
            ),
        };
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                screen,
                dirty: Vec::new(),
                keyframe_needed: true,
                changed_since_keyframe: false,
                resized: false,
                pointer: None,
                cursor: None,
                cursors: HashMap::new(),
                events: VecDeque::new(),
                dropped_events: 0,
                closing: false,
                error,
            }),
            wake: Condvar::new(),
        });
        let header = serde_json::json!({
            "version": 1, "format": "usher-desktop", "width": width, "height": height,
            "timestamp": timestamp, "keyframe_secs": settings.keyframe_secs,
            "input": settings.input,
        })
        .to_string();
        let encoder = Encoder {
            shared: shared.clone(),
            clock,
            out,
            frame_interval: Duration::from_secs_f64(
                1.0 / f64::from(settings.max_fps.clamp(1, 120)),
            ),
            keyframe_interval: f64::from(settings.keyframe_secs.max(1)),
        };
        let thread = std::thread::Builder::new()
            .name("desktop-recorder".into())
            .spawn(move || encoder.run(header));
        let thread = match thread {
            Ok(t) => Some(t),
            Err(e) => {
                shared.lock().error = Some(RecordError::Thread(e.to_string()));
                None
            }
        };
        DesktopRecorder {
            shared,
            thread,
            clock,
            input: settings.input,
        }
    }

    /// What the client is sent, the recording sees too. Cheap: copies into the shadow
    /// screen; the encoding happens on the recorder's own thread.
    pub fn display(&self, update: &DisplayUpdate) {
        let mut st = self.shared.lock();
        if st.error.is_some() || st.closing {
            return;
        }
        match update {
            DisplayUpdate::Bitmap(b) => {
                if let Some(r) = st.screen.blit(b) {
                    st.mark_dirty(r);
                }
            }
            DisplayUpdate::Resize(size) => match Screen::new(size.width, size.height) {
                Ok(screen) => {
                    st.screen = screen;
                    st.dirty.clear();
                    st.resized = true;
                    st.keyframe_needed = true;
                }
                Err(e) => st.error = Some(e),
            },
            DisplayUpdate::PointerPosition(p) => st.pointer = Some((p.x, p.y)),
            DisplayUpdate::RGBAPointer(p) => {
                if let Some(c) = rgba_cursor(p) {
                    remember_cursor(&mut st.cursors, p.cache_index, &c);
                    st.cursor = Some(CursorChange::Shape(c));
                }
            }
            DisplayUpdate::ColorPointer(p) => {
                if let Some(c) = color_cursor(p) {
                    remember_cursor(&mut st.cursors, p.cache_index, &c);
                    st.cursor = Some(CursorChange::Shape(c));
                }
            }
            DisplayUpdate::CachedPointer(index) => {
                if let Some(c) = st.cursors.get(index).cloned() {
                    st.cursor = Some(CursorChange::Shape(c));
                }
            }
            DisplayUpdate::HidePointer => st.cursor = Some(CursorChange::Hidden),
            DisplayUpdate::DefaultPointer => st.cursor = Some(CursorChange::Default),
        }
        self.shared.wake.notify_one();
    }

    pub fn keyboard(&self, event: &KeyboardEvent) {
        if !self.input {
            return;
        }
        let t = self.clock.now();
        let line = match event {
            KeyboardEvent::Pressed { code, extended } => {
                format!("[{t:.3},\"i\",\"key\",{code},{extended},true]")
            }
            KeyboardEvent::Released { code, extended } => {
                format!("[{t:.3},\"i\",\"key\",{code},{extended},false]")
            }
            KeyboardEvent::UnicodePressed(c) => format!("[{t:.3},\"i\",\"unicode\",{c},true]"),
            KeyboardEvent::UnicodeReleased(c) => format!("[{t:.3},\"i\",\"unicode\",{c},false]"),
            KeyboardEvent::Synchronize(flags) => {
                format!("[{t:.3},\"i\",\"sync\",{}]", flags.bits())
            }
        };
        self.push_event(line);
    }

    /// Pointer moves are part of the picture (where the cursor is drawn) and always
    /// recorded, coalesced to one a frame; buttons and the wheel only when input is.
    pub fn mouse(&self, event: &MouseEvent) {
        if let MouseEvent::Move { x, y } = event {
            let mut st = self.shared.lock();
            if st.error.is_none() && !st.closing {
                st.pointer = Some((*x, *y));
                self.shared.wake.notify_one();
            }
            return;
        }
        if !self.input {
            return;
        }
        let t = self.clock.now();
        let button =
            |name: &str, down: bool| format!("[{t:.3},\"i\",\"button\",\"{name}\",{down}]");
        let line = match event {
            MouseEvent::Move { .. } => return,
            MouseEvent::LeftPressed => button("left", true),
            MouseEvent::LeftReleased => button("left", false),
            MouseEvent::RightPressed => button("right", true),
            MouseEvent::RightReleased => button("right", false),
            MouseEvent::MiddlePressed => button("middle", true),
            MouseEvent::MiddleReleased => button("middle", false),
            MouseEvent::Button4Pressed => button("back", true),
            MouseEvent::Button4Released => button("back", false),
            MouseEvent::Button5Pressed => button("forward", true),
            MouseEvent::Button5Released => button("forward", false),
            MouseEvent::VerticalScroll { value } => format!("[{t:.3},\"i\",\"wheel\",{value}]"),
            MouseEvent::Scroll { x, y } => format!("[{t:.3},\"i\",\"scroll\",{x},{y}]"),
            MouseEvent::RelMove { x, y } => format!("[{t:.3},\"i\",\"move_by\",{x},{y}]"),
        };
        self.push_event(line);
    }

    /// A marker in the recording (`reconnected`, …).
    pub fn marker(&self, label: &str) {
        let t = self.clock.now();
        let label = serde_json::Value::from(label).to_string();
        self.push_event(format!("[{t:.3},\"m\",{label}]"));
    }

    fn push_event(&self, line: String) {
        let mut st = self.shared.lock();
        if st.error.is_some() || st.closing {
            return;
        }
        st.event(line);
        self.shared.wake.notify_one();
    }

    /// The first error the recording met, while it runs (usherd is told at once when
    /// recording is required).
    pub fn failure(&self) -> Option<RecordError> {
        self.shared.lock().error.clone()
    }

    /// Writes what is pending and the end; the first error the recording met, if any.
    pub fn finish(mut self) -> Result<(), RecordError> {
        self.shared.lock().closing = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                let mut st = self.shared.lock();
                st.error
                    .get_or_insert(RecordError::Encode("the recorder's thread panicked".into()));
            }
        }
        match self.shared.lock().error.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for DesktopRecorder {
    fn drop(&mut self) {
        if let Some(t) = self.thread.take() {
            self.shared.lock().closing = true;
            self.shared.wake.notify_one();
            let _ = t.join();
        }
    }
}

fn remember_cursor(cache: &mut HashMap<u16, Cursor>, index: u16, c: &Cursor) {
    if cache.len() >= MAX_CACHED_CURSORS && !cache.contains_key(&index) {
        cache.clear();
    }
    cache.insert(index, c.clone());
}

/// IronRDP sends an `RGBAPointer` as a 32 bpp RDP pointer: BGRA rows, bottom row first.
fn rgba_cursor(p: &ironrdp_server::RGBAPointer) -> Option<Cursor> {
    let (w, h) = (usize::from(p.width), usize::from(p.height));
    if w == 0 || h == 0 || w > 512 || h > 512 || p.data.len() != w * h * 4 {
        return None;
    }
    let mut rgba = Vec::with_capacity(w * h * 4);
    for row in (0..h).rev() {
        for px in p.data[row * w * 4..(row + 1) * w * 4].chunks_exact(4) {
            rgba.extend_from_slice(&[px[2], px[1], px[0], px[3]]);
        }
    }
    Some(Cursor {
        hot_x: p.hot_x,
        hot_y: p.hot_y,
        width: p.width,
        height: p.height,
        rgba,
    })
}

/// A color pointer (MS-RDPBCGR 2.2.9.1.1.4.4): 24 bpp BGR rows and a 1 bpp AND mask, each
/// row padded to two bytes, bottom row first. AND set over black is transparent; AND set
/// over white inverts the screen, drawn here as black.
fn color_cursor(p: &ironrdp_server::ColorPointer) -> Option<Cursor> {
    let (w, h) = (usize::from(p.width), usize::from(p.height));
    if w == 0 || h == 0 || w > 512 || h > 512 {
        return None;
    }
    let xor_stride = (w * 3).div_ceil(2) * 2;
    let and_stride = w.div_ceil(16) * 2;
    if p.xor_mask.len() < xor_stride * h {
        return None;
    }
    let has_and = p.and_mask.len() >= and_stride * h;
    let mut rgba = Vec::with_capacity(w * h * 4);
    for row in (0..h).rev() {
        for col in 0..w {
            let px = &p.xor_mask[row * xor_stride + col * 3..row * xor_stride + col * 3 + 3];
            let and = has_and && p.and_mask[row * and_stride + col / 8] & (0x80 >> (col % 8)) != 0;
            let pixel = match (and, px) {
                (true, [0, 0, 0]) => [0, 0, 0, 0],
                (true, _) => [0, 0, 0, 255],
                (false, _) => [px[2], px[1], px[0], 255],
            };
            rgba.extend_from_slice(&pixel);
        }
    }
    Some(Cursor {
        hot_x: p.hot_x,
        hot_y: p.hot_y,
        width: p.width,
        height: p.height,
        rgba,
    })
}

/// The recorder's thread: wakes when something changed, writes it, and sleeps out the rest
/// of the frame so that at most `max_fps` batches a second are written.
struct Encoder {
    shared: Arc<Shared>,
    clock: Clock,
    out: LineSink,
    frame_interval: Duration,
    keyframe_interval: f64,
}

impl Encoder {
    fn run(mut self, header: String) {
        if self.shared.lock().error.is_some() {
            return;
        }
        if let Err(e) = (self.out)(header) {
            self.fail(e);
            return;
        }
        let mut last_keyframe = f64::NEG_INFINITY;
        loop {
            let batch = {
                let mut st = self.shared.lock();
                while !st.closing && !st.has_work() && st.error.is_none() {
                    st = self.shared.wake.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                if st.error.is_some() {
                    return;
                }
                let closing = st.closing;
                let now = self.clock.now();
                let batch = st.take(now, now - last_keyframe >= self.keyframe_interval);
                (batch, closing)
            };
            let (batch, closing) = batch;
            let tick = Instant::now();
            if batch.keyframe {
                last_keyframe = batch.time;
            }
            let written = self.write(&batch).and_then(|()| {
                if closing {
                    let t = self.clock.now();
                    (self.out)(format!("[{t:.3},\"m\",\"end\"]"))
                } else {
                    Ok(())
                }
            });
            if let Err(e) = written {
                self.fail(e);
                return;
            }
            if closing {
                return;
            }
            // Changes during the rest of the frame coalesce into the dirty region.
            if let Some(rest) = self.frame_interval.checked_sub(tick.elapsed()) {
                std::thread::sleep(rest);
            }
        }
    }

    fn fail(&self, e: RecordError) {
        let mut st = self.shared.lock();
        st.error.get_or_insert(e);
    }

    fn write(&mut self, batch: &Batch) -> Result<(), RecordError> {
        for line in &batch.events {
            (self.out)(line.clone())?;
        }
        let t = batch.time;
        if batch.dropped_events > 0 {
            (self.out)(format!(
                "[{t:.3},\"m\",\"{} input events not recorded (the recorder fell behind)\"]",
                batch.dropped_events
            ))?;
        }
        if let Some((w, h)) = batch.resized {
            (self.out)(format!("[{t:.3},\"s\",{w},{h}]"))?;
        }
        for (i, (r, rgb)) in batch.images.iter().enumerate() {
            let png = encode_png(r.w, r.h, png::ColorType::Rgb, rgb)?;
            // A keyframe's first band is its `k`; the other bands follow as `f` at the
            // same time.
            let kind = if batch.keyframe && i == 0 { "k" } else { "f" };
            (self.out)(image_line(t, kind, [r.x, r.y, r.w, r.h], &png))?;
        }
        match &batch.cursor {
            Some(CursorChange::Shape(c)) => {
                let png = encode_png(c.width, c.height, png::ColorType::Rgba, &c.rgba)?;
                (self.out)(image_line(
                    t,
                    "c",
                    [c.hot_x, c.hot_y, c.width, c.height],
                    &png,
                ))?;
            }
            Some(CursorChange::Hidden) => (self.out)(format!("[{t:.3},\"c\",\"hidden\"]"))?,
            Some(CursorChange::Default) => (self.out)(format!("[{t:.3},\"c\",\"default\"]"))?,
            None => {}
        }
        if let Some((x, y)) = batch.pointer {
            (self.out)(format!("[{t:.3},\"p\",{x},{y}]"))?;
        }
        Ok(())
    }
}

fn image_line(t: f64, kind: &str, [a, b, c, d]: [u16; 4], png: &[u8]) -> String {
    let mut line = String::with_capacity(png.len() * 4 / 3 + 64);
    let _ = write!(line, "[{t:.3},\"{kind}\",{a},{b},{c},{d},\"");
    base64::engine::general_purpose::STANDARD.encode_string(png, &mut line);
    line.push_str("\"]");
    line
}

/// PNG at the fastest compression: screens are mostly flat colour, which even fast
/// deflate shrinks well, and the encoder must keep up with the frame rate. Paeth, because
/// on a desktop-like 1280x800 screen it was both the fastest and the smallest of the
/// filters with fast deflate (`encode_cpu_per_1280x800_keyframe`: Paeth 13 ms / 336 KiB,
/// Sub 18 ms / 440 KiB, Up 28 ms / 517 KiB): the better the filter, the less to deflate.
fn encode_png(w: u16, h: u16, color: png::ColorType, data: &[u8]) -> Result<Vec<u8>, RecordError> {
    encode_png_with(png::FilterType::Paeth, w, h, color, data)
}

fn encode_png_with(
    filter: png::FilterType,
    w: u16,
    h: u16,
    color: png::ColorType,
    data: &[u8],
) -> Result<Vec<u8>, RecordError> {
    let err = |e: png::EncodingError| RecordError::Encode(e.to_string());
    let mut out = Vec::with_capacity(data.len() / 8 + 1024);
    {
        let mut enc = png::Encoder::new(&mut out, u32::from(w), u32::from(h));
        enc.set_color(color);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_compression(png::Compression::Fast);
        enc.set_filter(filter);
        let mut writer = enc.write_header().map_err(err)?;
        writer.write_image_data(data).map_err(err)?;
        writer.finish().map_err(err)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ironrdp_server::{BitmapUpdate, DesktopSize, RGBAPointer};
    use std::num::{NonZeroU16, NonZeroUsize};

    type Lines = Arc<Mutex<Vec<String>>>;

    fn recorder(
        w: u16,
        h: u16,
        max_fps: u32,
        keyframe_secs: u32,
        input: bool,
    ) -> (DesktopRecorder, Lines) {
        let lines: Lines = Arc::default();
        let sink = lines.clone();
        let rec = DesktopRecorder::start(
            w,
            h,
            RecordingSettings {
                max_fps,
                keyframe_secs,
                input,
            },
            Box::new(move |l| {
                sink.lock().unwrap().push(l);
                Ok(())
            }),
        );
        (rec, lines)
    }

    /// A bitmap of one colour in `format` (with a stride wider than the row, as X gives).
    fn bitmap(format: PixelFormat, x: u16, y: u16, w: u16, h: u16, rgb: [u8; 3]) -> DisplayUpdate {
        let stride = usize::from(w) * 4 + 8;
        let mut data = vec![0xEEu8; stride * usize::from(h)];
        let [ri, gi, bi, ai] = format.channel_offsets();
        for row in 0..usize::from(h) {
            for col in 0..usize::from(w) {
                let p = &mut data[row * stride + col * 4..][..4];
                p[ri] = rgb[0];
                p[gi] = rgb[1];
                p[bi] = rgb[2];
                p[ai] = 0x11;
            }
        }
        DisplayUpdate::Bitmap(BitmapUpdate {
            x,
            y,
            width: NonZeroU16::new(w).unwrap(),
            height: NonZeroU16::new(h).unwrap(),
            format,
            data: Bytes::from(data),
            stride: NonZeroUsize::new(stride).unwrap(),
        })
    }

    fn decode_png(b64: &str) -> (u32, u32, png::ColorType, Vec<u8>) {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let mut reader = png::Decoder::new(&bytes[..]).read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).unwrap();
        buf.truncate(info.buffer_size());
        (info.width, info.height, info.color_type, buf)
    }

    /// Plays the recording's lines up to `until` onto a screen, as a player does.
    fn replay(lines: &[String], until: f64) -> (u16, u16, Vec<u8>) {
        let header: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        let mut w = header["width"].as_u64().unwrap() as usize;
        let mut screen = vec![0u8; w * header["height"].as_u64().unwrap() as usize * 3];
        let mut h = screen.len() / 3 / w;
        for line in &lines[1..] {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            if v[0].as_f64().unwrap() > until {
                break;
            }
            match v[1].as_str().unwrap() {
                "s" => {
                    w = v[2].as_u64().unwrap() as usize;
                    h = v[3].as_u64().unwrap() as usize;
                    screen = vec![0; w * h * 3];
                }
                "k" | "f" => {
                    let (x, y) = (
                        v[2].as_u64().unwrap() as usize,
                        v[3].as_u64().unwrap() as usize,
                    );
                    let (pw, ph, color, px) = decode_png(v[6].as_str().unwrap());
                    assert_eq!(color, png::ColorType::Rgb);
                    assert_eq!(
                        (pw, ph),
                        (v[4].as_u64().unwrap() as u32, v[5].as_u64().unwrap() as u32)
                    );
                    for row in 0..ph as usize {
                        let dst = ((y + row) * w + x) * 3;
                        screen[dst..dst + pw as usize * 3].copy_from_slice(
                            &px[row * pw as usize * 3..(row + 1) * pw as usize * 3],
                        );
                    }
                }
                _ => {}
            }
        }
        (w as u16, h as u16, screen)
    }

    fn kinds(lines: &[String]) -> Vec<(f64, String)> {
        lines[1..]
            .iter()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                (v[0].as_f64().unwrap(), v[1].as_str().unwrap().to_string())
            })
            .collect()
    }

    fn pixel(screen: &[u8], w: u16, x: usize, y: usize) -> [u8; 3] {
        let i = (y * usize::from(w) + x) * 3;
        [screen[i], screen[i + 1], screen[i + 2]]
    }

    #[test]
    fn a_synthetic_sequence_decodes_back_to_the_same_pixels_in_every_pixel_format() {
        let (rec, lines) = recorder(64, 48, 1000, 10, false);
        let formats = [
            PixelFormat::BgrX32,
            PixelFormat::BgrA32,
            PixelFormat::XRgb32,
            PixelFormat::ARgb32,
            PixelFormat::XBgr32,
            PixelFormat::ABgr32,
            PixelFormat::RgbX32,
            PixelFormat::RgbA32,
        ];
        let mut expected = vec![0u8; 64 * 48 * 3];
        for (i, format) in formats.iter().enumerate() {
            let (x, y, w, h) = (i as u16 * 7, i as u16 * 5, 9, 6);
            let rgb = [10 + i as u8 * 30, 200 - i as u8 * 20, 7 * i as u8];
            rec.display(&bitmap(*format, x, y, w, h, rgb));
            for row in y..y + h {
                for col in x..x + w {
                    let p = (usize::from(row) * 64 + usize::from(col)) * 3;
                    expected[p..p + 3].copy_from_slice(&rgb);
                }
            }
            std::thread::sleep(Duration::from_millis(3));
        }
        // Clipped at the screen's edge, and with less data than its height claims.
        rec.display(&bitmap(PixelFormat::BgrX32, 60, 44, 10, 10, [1, 2, 3]));
        for row in 44..48 {
            for col in 60..64 {
                let p = (row * 64 + col) * 3;
                expected[p..p + 3].copy_from_slice(&[1, 2, 3]);
            }
        }
        let DisplayUpdate::Bitmap(mut short) = bitmap(PixelFormat::BgrX32, 0, 40, 4, 4, [9, 9, 9])
        else {
            unreachable!()
        };
        short.data = short.data.slice(..short.stride.get() * 2 - 8);
        rec.display(&DisplayUpdate::Bitmap(short));
        for row in 40..42 {
            for col in 0..4 {
                let p = (row * 64 + col) * 3;
                expected[p..p + 3].copy_from_slice(&[9, 9, 9]);
            }
        }
        rec.finish().unwrap();
        let lines = lines.lock().unwrap().clone();
        let header: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
        assert_eq!(header["format"], "usher-desktop");
        assert_eq!(
            (header["width"].as_u64(), header["height"].as_u64()),
            (Some(64), Some(48))
        );
        let k = kinds(&lines);
        assert_eq!(k[0].1, "k", "a keyframe first: {k:?}");
        assert!(
            k.iter().filter(|(_, kind)| kind == "f").count() >= 1,
            "{k:?}"
        );
        assert_eq!(k.last().unwrap().1, "m");
        assert!(
            k.windows(2).all(|w| w[0].0 <= w[1].0),
            "times only grow: {k:?}"
        );
        let (_, _, screen) = replay(&lines, f64::MAX);
        assert!(
            screen == expected,
            "the replayed screen differs from what was drawn"
        );
    }

    #[test]
    fn a_keyframe_is_written_at_the_interval_while_the_screen_changes() {
        let (rec, lines) = recorder(32, 32, 50, 1, false);
        let started = Instant::now();
        let mut i = 0u8;
        while started.elapsed() < Duration::from_millis(2600) {
            rec.display(&bitmap(
                PixelFormat::BgrX32,
                u16::from(i % 16),
                3,
                4,
                4,
                [i, 0, 255 - i],
            ));
            i = i.wrapping_add(1);
            std::thread::sleep(Duration::from_millis(20));
        }
        rec.finish().unwrap();
        let lines = lines.lock().unwrap().clone();
        let keyframes: Vec<f64> = kinds(&lines)
            .into_iter()
            .filter(|(_, k)| k == "k")
            .map(|(t, _)| t)
            .collect();
        assert!(keyframes.len() >= 3, "{keyframes:?}");
        for pair in keyframes.windows(2) {
            let gap = pair[1] - pair[0];
            assert!((0.99..1.3).contains(&gap), "keyframes {keyframes:?}");
        }
        // Seeking to any time: the last keyframe and what follows give the screen then.
        let frames = kinds(&lines).iter().filter(|(_, k)| k == "f").count();
        assert!(frames > 20, "rectangles between keyframes: {frames}");
        // At most max_fps batches a second: far fewer image lines than updates.
        assert!(
            frames + keyframes.len() < usize::from(i) + 5,
            "{frames} for {i} updates"
        );
    }

    #[test]
    fn an_idle_screen_gets_no_more_keyframes() {
        let (rec, lines) = recorder(16, 16, 50, 1, false);
        std::thread::sleep(Duration::from_millis(1500));
        rec.finish().unwrap();
        let k = kinds(&lines.lock().unwrap());
        assert_eq!(k.iter().filter(|(_, kind)| kind == "k").count(), 1, "{k:?}");
    }

    #[test]
    fn input_events_are_recorded_only_when_the_settings_say_so() {
        for input in [false, true] {
            let (rec, lines) = recorder(16, 16, 100, 10, input);
            rec.keyboard(&KeyboardEvent::Pressed {
                code: 30,
                extended: false,
            });
            rec.keyboard(&KeyboardEvent::Released {
                code: 0x48,
                extended: true,
            });
            rec.keyboard(&KeyboardEvent::UnicodePressed(233));
            rec.mouse(&MouseEvent::LeftPressed);
            rec.mouse(&MouseEvent::VerticalScroll { value: -120 });
            rec.mouse(&MouseEvent::Move { x: 5, y: 6 });
            rec.finish().unwrap();
            let lines = lines.lock().unwrap().clone();
            let inputs: Vec<serde_json::Value> = lines[1..]
                .iter()
                .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
                .filter(|v| v[1] == "i")
                .collect();
            let pointer = lines.iter().any(|l| l.ends_with("\"p\",5,6]"));
            assert!(pointer, "the pointer is part of the picture: {lines:?}");
            if !input {
                assert!(inputs.is_empty(), "{inputs:?}");
                continue;
            }
            let shown: Vec<String> = inputs.iter().map(|v| v.to_string()).collect();
            assert_eq!(inputs.len(), 5, "{shown:?}");
            assert_eq!(
                inputs[0].as_array().unwrap()[1..],
                serde_json::json!(["i", "key", 30, false, true])
                    .as_array()
                    .unwrap()[..]
            );
            assert_eq!(
                inputs[1].as_array().unwrap()[2..],
                serde_json::json!(["key", 72, true, false])
                    .as_array()
                    .unwrap()[..]
            );
            assert_eq!(
                inputs[3].as_array().unwrap()[2..],
                serde_json::json!(["button", "left", true])
                    .as_array()
                    .unwrap()[..]
            );
            assert_eq!(
                inputs[4].as_array().unwrap()[2..],
                serde_json::json!(["wheel", -120]).as_array().unwrap()[..]
            );
        }
    }

    #[test]
    fn a_resize_is_followed_by_a_keyframe_of_the_new_size_and_cursors_decode() {
        let (rec, lines) = recorder(32, 32, 1000, 10, false);
        std::thread::sleep(Duration::from_millis(10));
        rec.display(&DisplayUpdate::Resize(DesktopSize {
            width: 40,
            height: 20,
        }));
        rec.display(&bitmap(PixelFormat::XRgb32, 30, 10, 10, 10, [0, 128, 255]));
        // 2x2 cursor, BGRA bottom row first: bottom-left red, top-left green (half alpha).
        let data = vec![0, 0, 255, 255, 0, 0, 0, 0, 0, 255, 0, 128, 0, 0, 0, 0];
        let pointer = RGBAPointer {
            cache_index: 3,
            width: 2,
            height: 2,
            hot_x: 1,
            hot_y: 0,
            data,
        };
        rec.display(&DisplayUpdate::RGBAPointer(pointer));
        std::thread::sleep(Duration::from_millis(20));
        rec.display(&DisplayUpdate::HidePointer);
        std::thread::sleep(Duration::from_millis(20));
        rec.display(&DisplayUpdate::CachedPointer(3));
        rec.finish().unwrap();
        let lines = lines.lock().unwrap().clone();
        let k = kinds(&lines);
        let s = k
            .iter()
            .position(|(_, kind)| kind == "s")
            .expect("a resize line");
        assert_eq!(k[s + 1].1, "k", "{k:?}");
        let (w, h, screen) = replay(&lines, f64::MAX);
        assert_eq!((w, h), (40, 20));
        assert_eq!(pixel(&screen, w, 35, 15), [0, 128, 255]);
        assert_eq!(pixel(&screen, w, 29, 15), [0, 0, 0]);
        let cursors: Vec<serde_json::Value> = lines[1..]
            .iter()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v[1] == "c")
            .collect();
        assert_eq!(cursors.len(), 3, "{cursors:?}");
        assert_eq!(cursors[1][2], "hidden");
        assert_eq!(cursors[0][6], cursors[2][6], "the cached shape comes back");
        let (cw, ch, color, rgba) = decode_png(cursors[0][6].as_str().unwrap());
        assert_eq!((cw, ch, color), (2, 2, png::ColorType::Rgba));
        assert_eq!(&rgba[0..4], &[0, 255, 0, 128], "top-left");
        assert_eq!(&rgba[8..12], &[255, 0, 0, 255], "bottom-left");
        assert_eq!(
            (cursors[0][2].as_u64(), cursors[0][3].as_u64()),
            (Some(1), Some(0))
        );
    }

    #[test]
    fn a_large_screen_is_cut_into_lines_that_fit_a_chunk() {
        // Noise does not compress: the worst case for a line's size.
        let (w, h) = (2560u16, 1600u16);
        let (rec, lines) = recorder(w, h, 10, 10, false);
        let mut seed = 0x1234_5678u32;
        let stride = usize::from(w) * 4;
        let data: Vec<u8> = (0..stride * usize::from(h))
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 17;
                seed ^= seed << 5;
                seed as u8
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50));
        rec.display(&DisplayUpdate::Bitmap(BitmapUpdate {
            x: 0,
            y: 0,
            width: NonZeroU16::new(w).unwrap(),
            height: NonZeroU16::new(h).unwrap(),
            format: PixelFormat::BgrX32,
            data: Bytes::from(data.clone()),
            stride: NonZeroUsize::new(stride).unwrap(),
        }));
        rec.finish().unwrap();
        let lines = lines.lock().unwrap().clone();
        let longest = lines.iter().map(String::len).max().unwrap();
        assert!(longest < 3 << 20, "a line of {longest} bytes");
        let (_, _, screen) = replay(&lines, f64::MAX);
        assert_eq!(pixel(&screen, w, 1234, 1111), {
            let p = (1111 * usize::from(w) + 1234) * 4;
            [data[p + 2], data[p + 1], data[p]]
        });
    }

    #[test]
    fn a_closed_output_is_the_error_finish_reports_and_recording_stops() {
        let writes = Arc::new(Mutex::new(0));
        let counted = writes.clone();
        let rec = DesktopRecorder::start(
            16,
            16,
            RecordingSettings {
                max_fps: 100,
                keyframe_secs: 10,
                input: true,
            },
            Box::new(move |_| {
                let mut n = counted.lock().unwrap();
                *n += 1;
                if *n > 1 {
                    Err(RecordError::Closed)
                } else {
                    Ok(())
                }
            }),
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(matches!(rec.failure(), Some(RecordError::Closed)));
        rec.display(&bitmap(PixelFormat::BgrX32, 0, 0, 4, 4, [1, 1, 1]));
        rec.keyboard(&KeyboardEvent::Pressed {
            code: 1,
            extended: false,
        });
        assert!(matches!(rec.finish(), Err(RecordError::Closed)));
        assert_eq!(
            *writes.lock().unwrap(),
            2,
            "nothing written after the error"
        );
    }

    #[test]
    fn a_screen_too_large_is_refused_not_allocated() {
        let (rec, _) = recorder(16, 16, 100, 10, false);
        rec.display(&DisplayUpdate::Resize(DesktopSize {
            width: 65535,
            height: 65535,
        }));
        assert!(matches!(
            rec.finish(),
            Err(RecordError::ScreenTooLarge { .. })
        ));
    }

    /// Not a check: the figure for the design note (`--nocapture`).
    #[test]
    fn encode_cpu_per_1280x800_keyframe() {
        let (w, h) = (1280usize, 800usize);
        // A desktop-like screen: a flat background, a terminal full of text (8x16 glyphs
        // of scattered dots, a fifth of the cells blank), a window with a gradient.
        let glyph = |cell_x: usize, cell_y: usize, gx: usize, gy: usize| {
            let mut v =
                (cell_x as u32).wrapping_mul(2_654_435_761) ^ (cell_y as u32).wrapping_mul(40_503);
            v ^= v >> 13;
            let blank = v.is_multiple_of(5);
            let bits = v
                .wrapping_mul(2_246_822_519)
                .rotate_left((gy * 3 + gx) as u32 % 32);
            !blank && (2..14).contains(&gy) && (1..7).contains(&gx) && bits & 3 == 0
        };
        let mut rgb = vec![0u8; w * h * 3];
        for y in 0..h {
            for x in 0..w {
                let p = (y * w + x) * 3;
                let c: [u8; 3] = if (100..700).contains(&x) && (80..600).contains(&y) {
                    if glyph(x / 8, y / 16, x % 8, y % 16) {
                        [20, 20, 20]
                    } else {
                        [250, 250, 250]
                    }
                } else if (750..1200).contains(&x) && (200..500).contains(&y) {
                    [(x % 256) as u8, (y % 256) as u8, 128]
                } else {
                    [40, 70, 120]
                };
                rgb[p..p + 3].copy_from_slice(&c);
            }
        }
        let cpu = || {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: a valid out-pointer to a timespec.
            unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
            t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
        };
        let runs = 10;
        for filter in [
            png::FilterType::Up,
            png::FilterType::Sub,
            png::FilterType::Paeth,
            png::FilterType::NoFilter,
        ] {
            let before = cpu();
            let mut size = 0;
            for _ in 0..runs {
                let png =
                    encode_png_with(filter, w as u16, h as u16, png::ColorType::Rgb, &rgb).unwrap();
                size = image_line(0.0, "k", [0, 0, w as u16, h as u16], &png).len();
            }
            let per = (cpu() - before) / f64::from(runs);
            println!(
                "encode CPU per 1280x800 keyframe ({filter:?}): {:.1} ms, line {} KiB",
                per * 1000.0,
                size >> 10
            );
        }
    }
}
