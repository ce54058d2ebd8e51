//! The session's X display as the worker sees it: what changed on the screen (XDamage,
//! read through MIT-SHM), the cursor's shape (XFixes), and the client's keyboard and
//! mouse played into it (XTEST).
//!
//! Every piece opens its own X connection (the Screen's for size and resize, one per
//! `capture()` thread, one per `Input`), so a capture that ends, or a client that
//! reconnects, never leaves state behind on a connection another piece still uses.

use std::collections::{HashMap, HashSet};
use std::num::{NonZeroU16, NonZeroUsize};
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ironrdp_server::{
    BitmapUpdate, DesktopSize, DisplayUpdate, KeyboardEvent, MouseEvent, PixelFormat, RGBAPointer,
};
use tokio::sync::mpsc;
use x11rb::connection::{Connection, RequestConnection};
use x11rb::errors::{ConnectError, ConnectionError, ReplyError, ReplyOrIdError};
use x11rb::protocol::damage::{self, ConnectionExt as _};
use x11rb::protocol::randr::{self, ConnectionExt as _};
use x11rb::protocol::shm::{self, ConnectionExt as _};
use x11rb::protocol::xfixes::{self, ConnectionExt as _};
use x11rb::protocol::xproto::{self, ConnectionExt as _};
use x11rb::protocol::xtest::ConnectionExt as _;
use x11rb::protocol::Event;
use x11rb::rust_connection::{DefaultStream, RustConnection};

#[path = "keymap.rs"]
mod keymap;

use keymap::{char_keysym, keysym, scancode_keysyms, Utf16Joiner};

/// Where the session's X server is and the cookie that opens it.
#[derive(Clone)]
pub struct XDisplay {
    /// `:N`
    pub display: String,
    /// MIT-MAGIC-COOKIE-1
    pub cookie: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScreenError {
    #[error("cannot connect to X display {display}: {reason}")]
    Connect { display: String, reason: String },
    #[error("the X server lacks the {0} extension")]
    MissingExtension(&'static str),
    #[error("X protocol error: {0}")]
    Protocol(String),
    /// The root window's pixels are not 32-bit true colour (Xvfb must run at depth 24).
    #[error("the X server's screen format is not supported: {0}")]
    UnsupportedFormat(String),
    /// `Screen::resize` to a size the X server refuses (Xvfb cannot grow beyond the size
    /// it was started with).
    #[error("the X server cannot change its screen to {width}x{height}: {reason}")]
    Resize {
        width: u16,
        height: u16,
        reason: String,
    },
}

impl From<ConnectionError> for ScreenError {
    fn from(error: ConnectionError) -> Self {
        ScreenError::Protocol(error.to_string())
    }
}

impl From<ReplyError> for ScreenError {
    fn from(error: ReplyError) -> Self {
        ScreenError::Protocol(error.to_string())
    }
}

impl From<ReplyOrIdError> for ScreenError {
    fn from(error: ReplyOrIdError) -> Self {
        ScreenError::Protocol(error.to_string())
    }
}

/// How many updates the capture channel holds. A batch of changed rectangles is only read
/// from the X server when the channel has room for a whole batch, so at most two batches
/// wait for the consumer; while it is behind, damage keeps accumulating in the X server
/// (one region, whatever the number of changes) instead of here.
const MAX_RECTANGLES_PER_BATCH: usize = 8;
const CHANNEL_CAPACITY: usize = 2 * MAX_RECTANGLES_PER_BATCH + 2;

/// RDP clients without the large-pointer capability accept pointers up to 96x96.
const MAX_POINTER_SIDE: u16 = 96;

/// How long the capture thread sleeps at most between checks that its receiver is still
/// there.
const IDLE_WAKEUP: Duration = Duration::from_millis(200);

/// One connection to the session's X server, authorised by the session's cookie.
///
/// The connection goes to the abstract socket `@/tmp/.X11-unix/XN` first: the worker may
/// live in another mount namespace than the session (its /tmp is not the session's), and
/// the abstract namespace belongs to the network namespace, which they share. The path
/// socket is the fallback for servers started with `-nolisten local`.
fn connect(display: &XDisplay) -> Result<RustConnection, ScreenError> {
    let failed = |reason: String| ScreenError::Connect {
        display: display.display.clone(),
        reason,
    };
    let number = display_number(&display.display)
        .ok_or_else(|| failed("not a local display of the form :N".into()))?;
    let socket_path = format!("/tmp/.X11-unix/X{number}");
    let stream = match connect_abstract(&socket_path) {
        Ok(stream) => stream,
        Err(abstract_error) => UnixStream::connect(&socket_path).map_err(|path_error| {
            failed(format!(
                "abstract socket: {abstract_error}; {socket_path}: {path_error}"
            ))
        })?,
    };
    let (stream, _peer) =
        DefaultStream::from_unix_stream(stream).map_err(|e| failed(e.to_string()))?;
    RustConnection::connect_to_stream_with_auth_info(
        stream,
        0,
        b"MIT-MAGIC-COOKIE-1".to_vec(),
        display.cookie.clone(),
    )
    .map_err(|error| match error {
        ConnectError::SetupFailed(failed_setup) => failed(
            String::from_utf8_lossy(&failed_setup.reason)
                .trim()
                .to_string(),
        ),
        ConnectError::SetupAuthenticate(auth) => {
            failed(String::from_utf8_lossy(&auth.reason).trim().to_string())
        }
        other => failed(other.to_string()),
    })
}

fn connect_abstract(path: &str) -> std::io::Result<UnixStream> {
    use std::os::linux::net::SocketAddrExt;
    let address = std::os::unix::net::SocketAddr::from_abstract_name(path.as_bytes())?;
    UnixStream::connect_addr(&address)
}

/// `:N` or `:N.S` (only screen 0 exists on Xvfb); nothing with a host part.
fn display_number(display: &str) -> Option<u32> {
    let rest = display.strip_prefix(':')?;
    let number = rest
        .split_once('.')
        .map_or(rest, |(number, _screen)| number);
    if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    number.parse().ok()
}

fn require_extension(conn: &RustConnection, name: &'static str) -> Result<(), ScreenError> {
    match conn.extension_information(name)? {
        Some(_) => Ok(()),
        None => Err(ScreenError::MissingExtension(name)),
    }
}

/// The pixel layout of the root window's ZPixmap images, as IronRDP names it.
fn pixel_format(conn: &RustConnection) -> Result<PixelFormat, ScreenError> {
    let setup = conn.setup();
    let root = &setup.roots[0];
    let bits_per_pixel = setup
        .pixmap_formats
        .iter()
        .find(|format| format.depth == root.root_depth)
        .map(|format| format.bits_per_pixel)
        .unwrap_or(0);
    let visual = root
        .allowed_depths
        .iter()
        .flat_map(|depth| depth.visuals.iter())
        .find(|visual| visual.visual_id == root.root_visual)
        .ok_or_else(|| ScreenError::UnsupportedFormat("the root visual is not listed".into()))?;
    if bits_per_pixel != 32 || !(24..=32).contains(&root.root_depth) {
        return Err(ScreenError::UnsupportedFormat(format!(
            "depth {} at {} bits per pixel (start Xvfb with -screen 0 WxHx24)",
            root.root_depth, bits_per_pixel
        )));
    }
    let lsb_first = setup.image_byte_order == xproto::ImageOrder::LSB_FIRST;
    match (
        visual.red_mask,
        visual.green_mask,
        visual.blue_mask,
        lsb_first,
    ) {
        // 0x00RRGGBB in the server's byte order: B G R X in memory on little-endian.
        (0xff_0000, 0xff00, 0xff, true) => Ok(PixelFormat::BgrX32),
        (0xff_0000, 0xff00, 0xff, false) => Ok(PixelFormat::XRgb32),
        (0xff, 0xff00, 0xff_0000, true) => Ok(PixelFormat::RgbX32),
        (0xff, 0xff00, 0xff_0000, false) => Ok(PixelFormat::XBgr32),
        (red, green, blue, _) => Err(ScreenError::UnsupportedFormat(format!(
            "colour masks {red:#x}/{green:#x}/{blue:#x}"
        ))),
    }
}

fn root_size(conn: &RustConnection, root: xproto::Window) -> Result<(u16, u16), ScreenError> {
    let geometry = conn.get_geometry(root)?.reply()?;
    Ok((geometry.width, geometry.height))
}

/// The session's screen.
pub struct Screen {
    display: XDisplay,
    conn: RustConnection,
    root: xproto::Window,
    format: PixelFormat,
}

impl Screen {
    /// Connects and checks that the server has what capture and input need (DAMAGE,
    /// XFIXES, XTEST; MIT-SHM is used when present) and a screen format RDP can carry.
    pub fn connect(x: &XDisplay) -> Result<Screen, ScreenError> {
        let conn = connect(x)?;
        for name in [
            damage::X11_EXTENSION_NAME,
            xfixes::X11_EXTENSION_NAME,
            x11rb::protocol::xtest::X11_EXTENSION_NAME,
        ] {
            require_extension(&conn, name)?;
        }
        let format = pixel_format(&conn)?;
        let root = conn.setup().roots[0].root;
        Ok(Screen {
            display: x.clone(),
            conn,
            root,
            format,
        })
    }

    /// Width and height of the screen now.
    pub fn size(&self) -> (u16, u16) {
        match root_size(&self.conn, self.root) {
            Ok(size) => size,
            Err(error) => {
                log::warn!("cannot read the screen's size: {error}");
                let root = &self.conn.setup().roots[0];
                (root.width_in_pixels, root.height_in_pixels)
            }
        }
    }

    /// The pixel format of the bitmaps `capture` sends.
    pub fn pixel_format(&self) -> PixelFormat {
        self.format
    }

    /// Starts capturing on a thread of its own: the whole screen first (a client that
    /// (re)connects needs it), then the rectangles that changed, at most `max_fps` batches
    /// a second, the cursor's shape when it changes. Capturing stops when the receiver is
    /// dropped, and the channel closes when the X server goes away.
    ///
    /// Bitmaps are `self.pixel_format()` (BgrX32 on a little-endian Xvfb at depth 24).
    /// `RGBAPointer.data` is what RDP's 32-bit pointer carries and IronRDP sends as is:
    /// BGRA bytes, straight (not premultiplied) alpha, rows bottom-up. A screen size change
    /// (RandR, `Screen::resize`) is sent as `DisplayUpdate::Resize`, then the whole screen.
    pub fn capture(&self, max_fps: u32) -> Result<mpsc::Receiver<DisplayUpdate>, ScreenError> {
        let capture = Capture::start(&self.display, self.format)?;
        let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY);
        let interval = Duration::from_secs(1) / max_fps.clamp(1, 1000);
        std::thread::Builder::new()
            .name("screen-capture".into())
            .spawn(move || capture.run(sender, interval))
            .map_err(|e| ScreenError::Protocol(format!("cannot start the capture thread: {e}")))?;
        Ok(receiver)
    }

    /// A connection of its own for input.
    pub fn input(&self) -> Result<Input, ScreenError> {
        Input::connect(&self.display)
    }

    /// Changes the X screen's size through RandR, for a client that resized its window.
    ///
    /// Xvfb (xorg-server 21.1, Debian 12) implements RandR 1.2 over a framebuffer fixed at
    /// start: its size range is 1x1 up to the `-screen` size it was started with, so a
    /// screen can shrink and grow back, never beyond that. Start Xvfb at the largest size a
    /// client may ask for and resize down to the client's. The size is clamped to that
    /// range; the size in effect is returned. A running capture sees the change (root
    /// ConfigureNotify) and sends `DisplayUpdate::Resize` and a whole frame.
    pub fn resize(&self, width: u16, height: u16) -> Result<(u16, u16), ScreenError> {
        let refused = |reason: String| ScreenError::Resize {
            width,
            height,
            reason,
        };
        require_extension(&self.conn, randr::X11_EXTENSION_NAME)?;
        let conn = &self.conn;
        conn.randr_query_version(1, 3)?.reply()?;
        let range = conn.randr_get_screen_size_range(self.root)?.reply()?;
        let width = width.clamp(range.min_width.max(1), range.max_width.max(1));
        let height = height.clamp(range.min_height.max(1), range.max_height.max(1));
        let current = root_size(conn, self.root)?;
        if current == (width, height) {
            return Ok(current);
        }
        let resources = conn
            .randr_get_screen_resources_current(self.root)?
            .reply()?;
        let (Some(&crtc), Some(&output)) = (resources.crtcs.first(), resources.outputs.first())
        else {
            return Err(refused("the X server has no CRTC or output".into()));
        };
        let mode = match resources
            .modes
            .iter()
            .find(|mode| mode.width == width && mode.height == height)
        {
            Some(mode) => mode.id,
            None => {
                let name = format!("{width}x{height}");
                let info = mode_info(width, height, name.len());
                let mode = conn
                    .randr_create_mode(self.root, info, name.as_bytes())?
                    .reply()
                    .map_err(|e| refused(format!("CreateMode: {e}")))?
                    .mode;
                conn.randr_add_output_mode(output, mode)?
                    .check()
                    .map_err(|e| refused(format!("AddOutputMode: {e}")))?;
                mode
            }
        };
        // The CRTC must fit in the screen at every step: grow the screen before the CRTC,
        // shrink it after.
        let interim = (current.0.max(width), current.1.max(height));
        if interim != current {
            self.set_screen_size(interim)
                .map_err(|e| refused(format!("SetScreenSize: {e}")))?;
        }
        let status = conn
            .randr_set_crtc_config(
                crtc,
                x11rb::CURRENT_TIME,
                resources.config_timestamp,
                0,
                0,
                mode,
                randr::Rotation::ROTATE0,
                &[output],
            )?
            .reply()
            .map_err(|e| refused(format!("SetCrtcConfig: {e}")))?
            .status;
        if status != randr::SetConfig::SUCCESS {
            return Err(refused(format!("SetCrtcConfig answered {status:?}")));
        }
        if interim != (width, height) {
            self.set_screen_size((width, height))
                .map_err(|e| refused(format!("SetScreenSize: {e}")))?;
        }
        root_size(conn, self.root)
    }

    fn set_screen_size(&self, (width, height): (u16, u16)) -> Result<(), ReplyError> {
        // Millimetres for 96 dots per inch, what desktops assume of a virtual screen.
        let millimetres = |pixels: u16| (u32::from(pixels) * 254 + 480) / 960;
        self.conn
            .randr_set_screen_size(
                self.root,
                width,
                height,
                millimetres(width),
                millimetres(height),
            )?
            .check()
    }
}

/// A mode for a virtual screen: the timings mean nothing to Xvfb, but a refresh rate of
/// 60 Hz keeps clients that compute one from dividing by zero.
fn mode_info(width: u16, height: u16, name_len: usize) -> randr::ModeInfo {
    let htotal = width.saturating_add(160);
    let vtotal = height.saturating_add(30);
    randr::ModeInfo {
        id: 0,
        width,
        height,
        dot_clock: u32::from(htotal) * u32::from(vtotal) * 60,
        hsync_start: width.saturating_add(48),
        hsync_end: width.saturating_add(80),
        htotal,
        hskew: 0,
        vsync_start: height.saturating_add(3),
        vsync_end: height.saturating_add(8),
        vtotal,
        name_len: u16::try_from(name_len).unwrap_or(u16::MAX),
        mode_flags: randr::ModeFlag::from(0u32),
    }
}

/// Reads rectangles of the root window: through a shared memory segment when the X server
/// offers MIT-SHM (the pixels do not cross the socket), else with GetImage.
struct Grabber {
    root: xproto::Window,
    format: PixelFormat,
    shared: Option<SharedImage>,
}

/// A segment the X server writes images into. Preferably a memfd passed over the socket
/// (MIT-SHM 1.2): SysV segments are checked against the uid of the X server and of the
/// client, which differ here (the worker runs as its own user, Xvfb as the session's
/// account), and a SysV segment readable by both would be readable by every local user.
struct SharedImage {
    segment: shm::Seg,
    memory: system::SharedMemory,
}

/// Why one rectangle could not be read: the X server refused the request (a rectangle
/// outside a screen that just shrank) or the connection is gone.
enum ReadError {
    Refused(String),
    Lost(ConnectionError),
}

impl From<ReplyError> for ReadError {
    fn from(error: ReplyError) -> Self {
        match error {
            ReplyError::ConnectionError(lost) => ReadError::Lost(lost),
            ReplyError::X11Error(refused) => ReadError::Refused(format!("{refused:?}")),
        }
    }
}

impl From<ConnectionError> for ReadError {
    fn from(error: ConnectionError) -> Self {
        ReadError::Lost(error)
    }
}

impl Grabber {
    fn new(conn: &RustConnection, format: PixelFormat, size: (u16, u16)) -> Grabber {
        let mut grabber = Grabber {
            root: conn.setup().roots[0].root,
            format,
            shared: None,
        };
        grabber.prepare_shared(conn, size);
        grabber
    }

    /// (Re)creates the shared segment for a screen of `size`; without one, GetImage.
    fn prepare_shared(&mut self, conn: &RustConnection, (width, height): (u16, u16)) {
        if let Some(old) = self.shared.take() {
            let _ = conn.shm_detach(old.segment);
        }
        let bytes = usize::from(width) * usize::from(height) * 4;
        match SharedImage::attach(conn, bytes) {
            Ok(shared) => {
                // The server may accept the segment and still fail to use it (a SysV
                // segment it cannot map): try one pixel before relying on it.
                let probe = conn
                    .shm_get_image(
                        self.root,
                        0,
                        0,
                        1,
                        1,
                        !0,
                        xproto::ImageFormat::Z_PIXMAP.into(),
                        shared.segment,
                        0,
                    )
                    .map_err(ReplyError::from)
                    .and_then(|cookie| cookie.reply());
                match probe {
                    Ok(_) => self.shared = Some(shared),
                    Err(error) => {
                        log::info!("MIT-SHM unusable ({error}); capturing with GetImage");
                        let _ = conn.shm_detach(shared.segment);
                    }
                }
            }
            Err(reason) => log::info!("MIT-SHM unavailable ({reason}); capturing with GetImage"),
        }
    }

    fn uses_shared_memory(&self) -> bool {
        self.shared.is_some()
    }

    fn read(&self, conn: &RustConnection, rect: Rect) -> Result<BitmapUpdate, ReadError> {
        let (Some(width), Some(height)) =
            (NonZeroU16::new(rect.width), NonZeroU16::new(rect.height))
        else {
            return Err(ReadError::Refused("empty rectangle".into()));
        };
        let stride = usize::from(rect.width) * 4;
        let length = stride * usize::from(rect.height);
        let data = match &self.shared {
            Some(shared) if length <= shared.memory.len() => {
                let reply = conn
                    .shm_get_image(
                        self.root,
                        rect.x as i16,
                        rect.y as i16,
                        rect.width,
                        rect.height,
                        !0,
                        xproto::ImageFormat::Z_PIXMAP.into(),
                        shared.segment,
                        0,
                    )?
                    .reply()?;
                if (reply.size as usize) < length {
                    return Err(ReadError::Refused(format!(
                        "the server wrote {} bytes for {length}",
                        reply.size
                    )));
                }
                Bytes::copy_from_slice(&shared.memory.bytes()[..length])
            }
            _ => {
                let reply = conn
                    .get_image(
                        xproto::ImageFormat::Z_PIXMAP,
                        self.root,
                        rect.x as i16,
                        rect.y as i16,
                        rect.width,
                        rect.height,
                        !0,
                    )?
                    .reply()?;
                if reply.data.len() < length {
                    return Err(ReadError::Refused(format!(
                        "the server sent {} bytes for {length}",
                        reply.data.len()
                    )));
                }
                let mut data = reply.data;
                data.truncate(length);
                Bytes::from(data)
            }
        };
        Ok(BitmapUpdate {
            x: rect.x,
            y: rect.y,
            width,
            height,
            format: self.format,
            data,
            stride: NonZeroUsize::new(stride).unwrap_or(NonZeroUsize::MIN),
        })
    }
}

impl SharedImage {
    fn attach(conn: &RustConnection, bytes: usize) -> Result<SharedImage, String> {
        if conn
            .extension_information(shm::X11_EXTENSION_NAME)
            .map_err(|e| e.to_string())?
            .is_none()
        {
            return Err("no MIT-SHM extension".into());
        }
        let version = conn
            .shm_query_version()
            .map_err(|e| e.to_string())?
            .reply()
            .map_err(|e| e.to_string())?;
        let bytes = bytes.max(4);
        let segment = conn.generate_id().map_err(|e| e.to_string())?;
        if (version.major_version, version.minor_version) >= (1, 2) {
            let (memory, fd) = system::SharedMemory::memfd(bytes).map_err(|e| e.to_string())?;
            conn.shm_attach_fd(segment, fd, false)
                .map_err(|e| e.to_string())?
                .check()
                .map_err(|e| format!("ShmAttachFd: {e}"))?;
            return Ok(SharedImage { segment, memory });
        }
        let (memory, id) = system::SharedMemory::sysv(bytes).map_err(|e| e.to_string())?;
        let attached = conn
            .shm_attach(segment, id, false)
            .map_err(|e| e.to_string())?
            .check();
        // Once both sides are attached the id is not needed; removed now, the segment
        // disappears with the last detach even if this process is killed.
        system::SharedMemory::remove_sysv_id(id);
        attached.map_err(|e| format!("ShmAttach: {e}"))?;
        Ok(SharedImage { segment, memory })
    }
}

/// A rectangle of the screen, in pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rect {
    x: u16,
    y: u16,
    width: u16,
    height: u16,
}

impl Rect {
    fn area(self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    fn right(self) -> u32 {
        u32::from(self.x) + u32::from(self.width)
    }

    fn bottom(self) -> u32 {
        u32::from(self.y) + u32::from(self.height)
    }

    fn union(self, other: Rect) -> Rect {
        let x = self.x.min(other.x);
        let y = self.y.min(other.y);
        Rect {
            x,
            y,
            width: (self.right().max(other.right()) - u32::from(x)) as u16,
            height: (self.bottom().max(other.bottom()) - u32::from(y)) as u16,
        }
    }

    /// The part of an X rectangle (signed origin) inside a screen of `size`.
    fn clipped(rect: &xproto::Rectangle, (width, height): (u16, u16)) -> Option<Rect> {
        let left = i32::from(rect.x).max(0);
        let top = i32::from(rect.y).max(0);
        let right = (i32::from(rect.x) + i32::from(rect.width)).min(i32::from(width));
        let bottom = (i32::from(rect.y) + i32::from(rect.height)).min(i32::from(height));
        (right > left && bottom > top).then(|| Rect {
            x: left as u16,
            y: top as u16,
            width: (right - left) as u16,
            height: (bottom - top) as u16,
        })
    }
}

/// The rectangles to read for a damaged region: at most `max`, merging the pair that adds
/// the least area each time, and a single bounding box when the region is so fragmented
/// that reading it piece by piece costs more round trips than pixels saved.
fn plan_rectangles(mut rects: Vec<Rect>, max: usize) -> Vec<Rect> {
    const FRAGMENTED: usize = 64;
    if rects.len() > FRAGMENTED {
        let bounds = rects.iter().copied().reduce(Rect::union);
        return bounds.into_iter().collect();
    }
    while rects.len() > max.max(1) {
        let mut best = (0, 1, u64::MAX);
        for i in 0..rects.len() {
            for j in i + 1..rects.len() {
                let added = rects[i]
                    .union(rects[j])
                    .area()
                    .saturating_sub(rects[i].area() + rects[j].area());
                if added < best.2 {
                    best = (i, j, added);
                }
            }
        }
        let (i, j, _) = best;
        let merged = rects[i].union(rects[j]);
        rects.swap_remove(j);
        rects[i] = merged;
    }
    rects
}

/// An X cursor image (premultiplied ARGB, one u32 a pixel, rows top-down) as RDP's 32-bit
/// pointer: BGRA bytes, straight alpha, rows bottom-up, cropped to what clients accept.
fn pointer_update(cursor: &xfixes::GetCursorImageReply) -> DisplayUpdate {
    let source_width = usize::from(cursor.width);
    let width = cursor.width.min(MAX_POINTER_SIDE);
    let height = cursor.height.min(MAX_POINTER_SIDE);
    if width == 0
        || height == 0
        || cursor.cursor_image.len() < source_width * usize::from(cursor.height)
        || cursor.cursor_image.iter().all(|pixel| pixel >> 24 == 0)
    {
        return DisplayUpdate::HidePointer;
    }
    let mut data = Vec::with_capacity(usize::from(width) * usize::from(height) * 4);
    for row in (0..usize::from(height)).rev() {
        let start = row * source_width;
        for &pixel in &cursor.cursor_image[start..start + usize::from(width)] {
            let alpha = pixel >> 24;
            let straight = |shift: u32| -> u8 {
                let channel = (pixel >> shift) & 0xff;
                if alpha == 0 {
                    0
                } else {
                    ((channel * 255 + alpha / 2) / alpha).min(255) as u8
                }
            };
            data.extend_from_slice(&[straight(0), straight(8), straight(16), alpha as u8]);
        }
    }
    DisplayUpdate::RGBAPointer(RGBAPointer {
        cache_index: 0,
        width,
        height,
        hot_x: cursor.xhot.min(width - 1),
        hot_y: cursor.yhot.min(height - 1),
        data,
    })
}

/// The capture thread's connection and what it has yet to send.
struct Capture {
    conn: RustConnection,
    grabber: Grabber,
    damage: damage::Damage,
    region: xfixes::Region,
    size: (u16, u16),
    whole_screen_due: bool,
    damage_due: bool,
    cursor_due: bool,
    resize_due: bool,
}

impl Capture {
    fn start(display: &XDisplay, format: PixelFormat) -> Result<Capture, ScreenError> {
        let conn = connect(display)?;
        require_extension(&conn, damage::X11_EXTENSION_NAME)?;
        require_extension(&conn, xfixes::X11_EXTENSION_NAME)?;
        // Both extensions refuse requests from a client that has not announced its version.
        conn.damage_query_version(1, 1)?.reply()?;
        conn.xfixes_query_version(5, 0)?.reply()?;
        let root = conn.setup().roots[0].root;
        // Root ConfigureNotify tells of a screen size change.
        conn.change_window_attributes(
            root,
            &xproto::ChangeWindowAttributesAux::new()
                .event_mask(xproto::EventMask::STRUCTURE_NOTIFY),
        )?
        .check()?;
        conn.xfixes_select_cursor_input(root, xfixes::CursorNotifyMask::DISPLAY_CURSOR)?
            .check()?;
        let region = conn.generate_id()?;
        conn.xfixes_create_region(region, &[])?.check()?;
        // NON_EMPTY: one event when the damage becomes non-empty; what changes afterwards
        // accumulates in the server until the next DamageSubtract, whatever the rate.
        let damage = conn.generate_id()?;
        conn.damage_create(damage, root, damage::ReportLevel::NON_EMPTY)?
            .check()?;
        let size = root_size(&conn, root)?;
        let grabber = Grabber::new(&conn, format, size);
        Ok(Capture {
            conn,
            grabber,
            damage,
            region,
            size,
            whole_screen_due: true,
            damage_due: false,
            cursor_due: true,
            resize_due: false,
        })
    }

    fn run(mut self, sender: mpsc::Sender<DisplayUpdate>, interval: Duration) {
        log::debug!(
            "capturing {}x{} every {interval:?} ({})",
            self.size.0,
            self.size.1,
            if self.grabber.uses_shared_memory() {
                "MIT-SHM"
            } else {
                "GetImage"
            }
        );
        match self.run_until_closed(&sender, interval) {
            Ok(()) => log::debug!("capture stopped: the receiver is gone"),
            Err(error) => log::info!("capture stopped: the X connection is lost ({error})"),
        }
        // Dropping the sender closes the channel: the consumer sees the end.
    }

    fn run_until_closed(
        &mut self,
        sender: &mpsc::Sender<DisplayUpdate>,
        interval: Duration,
    ) -> Result<(), ConnectionError> {
        let mut next_batch = Instant::now();
        loop {
            if sender.is_closed() {
                return Ok(());
            }
            while let Some(event) = self.conn.poll_for_event()? {
                self.note(event);
            }
            if self.cursor_due && sender.capacity() > 0 {
                self.send_cursor(sender)?;
            }
            let now = Instant::now();
            let frame_due = self.whole_screen_due || self.damage_due;
            let room = sender.capacity() > MAX_RECTANGLES_PER_BATCH;
            if frame_due && room && now >= next_batch {
                self.send_batch(sender)?;
                next_batch = now + interval;
            }
            self.conn.flush()?;
            let still_due = self.whole_screen_due || self.damage_due || self.cursor_due;
            let timeout = if !still_due {
                IDLE_WAKEUP
            } else if now < next_batch {
                next_batch - now
            } else {
                // Waiting for the consumer to make room: look again soon.
                interval.min(Duration::from_millis(10))
            };
            system::wait_readable(self.conn.stream().as_fd(), timeout)
                .map_err(|e| ConnectionError::IoError(e))?;
        }
    }

    fn note(&mut self, event: Event) {
        match event {
            Event::DamageNotify(_) => self.damage_due = true,
            Event::XfixesCursorNotify(_) => self.cursor_due = true,
            Event::ConfigureNotify(configure) if configure.window == self.grabber.root => {
                let size = (configure.width, configure.height);
                if size != self.size {
                    self.size = size;
                    self.resize_due = true;
                    self.whole_screen_due = true;
                    self.grabber.prepare_shared(&self.conn, size);
                }
            }
            Event::Error(error) => log::debug!("X error on the capture connection: {error:?}"),
            _ => {}
        }
    }

    fn send_cursor(&mut self, sender: &mpsc::Sender<DisplayUpdate>) -> Result<(), ConnectionError> {
        self.cursor_due = false;
        match self.conn.xfixes_get_cursor_image()?.reply() {
            Ok(cursor) => {
                let _ = sender.try_send(pointer_update(&cursor));
                Ok(())
            }
            Err(ReplyError::ConnectionError(lost)) => Err(lost),
            Err(ReplyError::X11Error(error)) => {
                log::debug!("no cursor image: {error:?}");
                Ok(())
            }
        }
    }

    /// Reads what changed since the last batch and sends it. The damage is taken from the
    /// server before the pixels are read, so a change made while reading is damage for the
    /// next batch, never lost.
    fn send_batch(&mut self, sender: &mpsc::Sender<DisplayUpdate>) -> Result<(), ConnectionError> {
        self.conn
            .damage_subtract(self.damage, x11rb::NONE, self.region)?;
        let whole = Rect {
            x: 0,
            y: 0,
            width: self.size.0,
            height: self.size.1,
        };
        let rects = if self.whole_screen_due {
            vec![whole]
        } else {
            match self.conn.xfixes_fetch_region(self.region)?.reply() {
                Ok(region) => region
                    .rectangles
                    .iter()
                    .filter_map(|rect| Rect::clipped(rect, self.size))
                    .collect(),
                Err(ReplyError::ConnectionError(lost)) => return Err(lost),
                Err(ReplyError::X11Error(error)) => {
                    log::debug!("cannot fetch the damaged region ({error:?}); sending it all");
                    vec![whole]
                }
            }
        };
        self.damage_due = false;
        self.whole_screen_due = false;
        if self.resize_due {
            self.resize_due = false;
            let _ = sender.try_send(DisplayUpdate::Resize(DesktopSize {
                width: self.size.0,
                height: self.size.1,
            }));
        }
        for rect in plan_rectangles(rects, MAX_RECTANGLES_PER_BATCH) {
            match self.grabber.read(&self.conn, rect) {
                Ok(bitmap) => {
                    // Room was checked before the batch and this thread is the only sender.
                    if sender.try_send(DisplayUpdate::Bitmap(bitmap)).is_err() {
                        self.whole_screen_due = !sender.is_closed();
                        return Ok(());
                    }
                }
                Err(ReadError::Lost(lost)) => return Err(lost),
                Err(ReadError::Refused(reason)) => {
                    // The screen changed under the rectangle (a resize): its event is on its
                    // way and brings a whole frame.
                    log::debug!("cannot read {rect:?}: {reason}");
                }
            }
        }
        Ok(())
    }
}

/// XTEST event types.
const KEY_PRESS: u8 = xproto::KEY_PRESS_EVENT;
const KEY_RELEASE: u8 = xproto::KEY_RELEASE_EVENT;
const BUTTON_PRESS: u8 = xproto::BUTTON_PRESS_EVENT;
const BUTTON_RELEASE: u8 = xproto::BUTTON_RELEASE_EVENT;
const MOTION: u8 = xproto::MOTION_NOTIFY_EVENT;

/// One wheel notch in RDP's units.
const WHEEL_DELTA: i32 = 120;
/// A client cannot make the session scroll more than this many notches in one event.
const MAX_WHEEL_CLICKS: i32 = 20;
/// How many keycodes with no keysyms are borrowed for characters the keymap lacks.
const MAX_SPARE_KEYCODES: usize = 8;

/// The X server's keyboard mapping, read from the server (GetKeyboardMapping): which
/// keycode carries a keysym, and which keycodes carry nothing and can be borrowed.
struct KeyboardMap {
    /// keysym → (keycode, column): the lowest column wins, then the lowest keycode.
    keycodes: HashMap<u32, (u8, u8)>,
    /// Keycodes without any keysym, highest first.
    unused: Vec<u8>,
}

impl KeyboardMap {
    fn load(conn: &RustConnection) -> Result<KeyboardMap, ScreenError> {
        let setup = conn.setup();
        let (first, last) = (setup.min_keycode, setup.max_keycode);
        let count = last.saturating_sub(first).saturating_add(1);
        let reply = conn.get_keyboard_mapping(first, count)?.reply()?;
        let per_keycode = usize::from(reply.keysyms_per_keycode);
        let mut keycodes = HashMap::new();
        let mut unused = Vec::new();
        if per_keycode == 0 {
            return Ok(KeyboardMap { keycodes, unused });
        }
        let rows: Vec<(u8, &[u32])> = reply
            .keysyms
            .chunks(per_keycode)
            .enumerate()
            .filter_map(|(index, syms)| Some((first.checked_add(u8::try_from(index).ok()?)?, syms)))
            .collect();
        for column in 0..per_keycode {
            for &(keycode, syms) in &rows {
                let sym = syms.get(column).copied().unwrap_or(keysym::NO_SYMBOL);
                if sym != keysym::NO_SYMBOL {
                    keycodes.entry(sym).or_insert((keycode, column as u8));
                }
            }
        }
        for &(keycode, syms) in rows.iter().rev() {
            if syms.iter().all(|&sym| sym == keysym::NO_SYMBOL) {
                unused.push(keycode);
            }
        }
        Ok(KeyboardMap { keycodes, unused })
    }
}

/// Plays the client's keyboard and mouse into the display through XTEST.
///
/// Keys are the client's scancodes read as a US PC keyboard (what RDP clients send
/// whatever their layout; the session's own layout then decides the character), looked
/// up in the X server's keymap. Unicode input types the character itself: through the
/// key that has it unshifted, else through a keycode without keysyms borrowed for it
/// (bound with ChangeKeyboardMapping, given back when this Input is dropped or the
/// keycode is needed for another character). What is held down when the Input is
/// dropped (a client that vanished mid-keypress) is released.
pub struct Input {
    conn: RustConnection,
    root: xproto::Window,
    keyboard: KeyboardMap,
    /// Borrowed keycodes in the order they were last used, oldest first, with their keysym.
    borrowed: Vec<(u8, u32)>,
    keys_down: HashSet<u8>,
    buttons_down: HashSet<u8>,
    /// The keycode each Unicode unit's press went to, for its release.
    unicode_down: HashMap<u16, u8>,
    utf16: Utf16Joiner,
    vertical_wheel: i32,
    horizontal_wheel: i32,
    lost: bool,
}

impl Input {
    fn connect(display: &XDisplay) -> Result<Input, ScreenError> {
        let conn = connect(display)?;
        require_extension(&conn, x11rb::protocol::xtest::X11_EXTENSION_NAME)?;
        conn.xtest_get_version(2, 2)?.reply()?;
        let keyboard = KeyboardMap::load(&conn)?;
        let root = conn.setup().roots[0].root;
        Ok(Input {
            conn,
            root,
            keyboard,
            borrowed: Vec::new(),
            keys_down: HashSet::new(),
            buttons_down: HashSet::new(),
            unicode_down: HashMap::new(),
            utf16: Utf16Joiner::default(),
            vertical_wheel: 0,
            horizontal_wheel: 0,
            lost: false,
        })
    }

    pub fn keyboard(&mut self, event: &KeyboardEvent) {
        let result = self.refresh_keymap().and_then(|()| match *event {
            KeyboardEvent::Pressed { code, extended } => self.scancode(code, extended, true),
            KeyboardEvent::Released { code, extended } => self.scancode(code, extended, false),
            KeyboardEvent::UnicodePressed(unit) => self.unicode_pressed(unit),
            KeyboardEvent::UnicodeReleased(unit) => self.unicode_released(unit),
            KeyboardEvent::Synchronize(flags) => self.synchronize(flags.bits()),
        });
        self.finish(result);
    }

    pub fn mouse(&mut self, event: &MouseEvent) {
        let result = match *event {
            MouseEvent::Move { x, y } => self.fake(
                MOTION,
                0,
                i16::try_from(x).unwrap_or(i16::MAX),
                i16::try_from(y).unwrap_or(i16::MAX),
            ),
            MouseEvent::LeftPressed => self.button(1, true),
            MouseEvent::LeftReleased => self.button(1, false),
            MouseEvent::MiddlePressed => self.button(2, true),
            MouseEvent::MiddleReleased => self.button(2, false),
            MouseEvent::RightPressed => self.button(3, true),
            MouseEvent::RightReleased => self.button(3, false),
            // IronRDP's Button4/Button5 are RDP's extended buttons (XBUTTON1/2, back and
            // forward), which X numbers 8 and 9; X's 4 and 5 are the wheel.
            MouseEvent::Button4Pressed => self.button(8, true),
            MouseEvent::Button4Released => self.button(8, false),
            MouseEvent::Button5Pressed => self.button(9, true),
            MouseEvent::Button5Released => self.button(9, false),
            MouseEvent::VerticalScroll { value } => self.vertical_scroll(i32::from(value)),
            MouseEvent::Scroll { x, y } => self
                .vertical_scroll(y)
                .and_then(|()| self.horizontal_scroll(x)),
            MouseEvent::RelMove { x, y } => self.fake(
                MOTION,
                1,
                x.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16,
                y.clamp(i32::from(i16::MIN), i32::from(i16::MAX)) as i16,
            ),
        };
        self.finish(result);
    }

    fn finish(&mut self, result: Result<(), ConnectionError>) {
        let result = result.and_then(|()| self.conn.flush());
        if let Err(error) = result {
            if !self.lost {
                log::warn!("input to the X display failed: {error}");
            }
            self.lost = true;
        }
    }

    /// Somebody in the session changed the keymap (setxkbmap, xmodmap): read it again.
    fn refresh_keymap(&mut self) -> Result<(), ConnectionError> {
        let mut changed = false;
        while let Some(event) = self.conn.poll_for_event()? {
            if let Event::MappingNotify(notify) = event {
                changed |= notify.request == xproto::Mapping::KEYBOARD;
            }
        }
        if changed {
            match KeyboardMap::load(&self.conn) {
                Ok(mut keyboard) => {
                    // Keycodes this Input borrowed stay borrowable.
                    for &(keycode, _) in &self.borrowed {
                        if !keyboard.unused.contains(&keycode) {
                            keyboard.unused.push(keycode);
                        }
                    }
                    self.keyboard = keyboard;
                }
                Err(error) => log::warn!("cannot read the changed keymap: {error}"),
            }
        }
        Ok(())
    }

    fn fake(&self, kind: u8, detail: u8, x: i16, y: i16) -> Result<(), ConnectionError> {
        self.conn
            .xtest_fake_input(kind, detail, x11rb::CURRENT_TIME, self.root, x, y, 0)?;
        Ok(())
    }

    fn key(&mut self, keycode: u8, down: bool) -> Result<(), ConnectionError> {
        if down {
            self.keys_down.insert(keycode);
        } else if !self.keys_down.remove(&keycode) {
            // A release for a key this Input never pressed (the press went to another
            // connection, or was refused): harmless to pass on, X ignores it.
        }
        self.fake(if down { KEY_PRESS } else { KEY_RELEASE }, keycode, 0, 0)
    }

    fn scancode(&mut self, code: u8, extended: bool, down: bool) -> Result<(), ConnectionError> {
        let keycode = scancode_keysyms(code, extended)
            .iter()
            .find_map(|sym| self.keyboard.keycodes.get(sym))
            .map(|&(keycode, _column)| keycode);
        match keycode {
            Some(keycode) => self.key(keycode, down),
            None => {
                log::debug!("no key for scancode {code:#04x} (extended: {extended})");
                Ok(())
            }
        }
    }

    fn unicode_pressed(&mut self, unit: u16) -> Result<(), ConnectionError> {
        let Some(character) = self.utf16.push(unit) else {
            return Ok(());
        };
        let sym = char_keysym(character);
        let keycode = match self.keyboard.keycodes.get(&sym) {
            // On a key unshifted: the key itself. A shifted one would need Shift, whose
            // state the client's own events may contradict; a borrowed key needs nothing.
            Some(&(keycode, 0)) => keycode,
            _ => match self.borrow_keycode(sym)? {
                Some(keycode) => keycode,
                None => {
                    log::debug!("no keycode free to type {character:?}");
                    return Ok(());
                }
            },
        };
        self.unicode_down.insert(unit, keycode);
        self.key(keycode, true)
    }

    fn unicode_released(&mut self, unit: u16) -> Result<(), ConnectionError> {
        match self.unicode_down.remove(&unit) {
            Some(keycode) => self.key(keycode, false),
            None => Ok(()),
        }
    }

    /// A keycode that types `sym`: one already borrowed for it, else the least recently
    /// used borrowed one (not held down), else a fresh unused keycode.
    fn borrow_keycode(&mut self, sym: u32) -> Result<Option<u8>, ConnectionError> {
        if let Some(position) = self.borrowed.iter().position(|&(_, bound)| bound == sym) {
            let entry = self.borrowed.remove(position);
            self.borrowed.push(entry);
            return Ok(Some(entry.0));
        }
        let fresh = self.keyboard.unused.iter().copied().find(|keycode| {
            !self
                .borrowed
                .iter()
                .any(|&(borrowed, _)| borrowed == *keycode)
        });
        let keycode = match fresh {
            Some(keycode) if self.borrowed.len() < MAX_SPARE_KEYCODES => keycode,
            _ => {
                let Some(position) = self
                    .borrowed
                    .iter()
                    .position(|(keycode, _)| !self.keys_down.contains(keycode))
                else {
                    return Ok(None);
                };
                let (keycode, old) = self.borrowed.remove(position);
                self.keyboard.keycodes.remove(&old);
                keycode
            }
        };
        // Both levels carry the character, so a Shift the client holds does not change it.
        self.conn
            .change_keyboard_mapping(1, keycode, 2, &[sym, sym])?;
        self.borrowed.push((keycode, sym));
        self.keyboard.keycodes.insert(sym, (keycode, 0));
        Ok(Some(keycode))
    }

    /// Makes Caps Lock and Num Lock what the client says they are (RDP sends this when
    /// the client's window gets the focus). Scroll Lock and Kana have no X modifier.
    fn synchronize(&mut self, flags: u8) -> Result<(), ConnectionError> {
        const NUM_LOCK: u8 = 0x02;
        const CAPS_LOCK: u8 = 0x04;
        let state = match self.conn.query_pointer(self.root)?.reply() {
            Ok(pointer) => u16::from(pointer.mask),
            Err(ReplyError::ConnectionError(lost)) => return Err(lost),
            Err(ReplyError::X11Error(_)) => return Ok(()),
        };
        let caps_on = state & u16::from(xproto::KeyButMask::LOCK) != 0;
        if caps_on != (flags & CAPS_LOCK != 0) {
            self.tap(keysym::CAPS_LOCK)?;
        }
        if let Some(num_lock_mask) = self.num_lock_mask()? {
            let num_on = state & num_lock_mask != 0;
            if num_on != (flags & NUM_LOCK != 0) {
                self.tap(keysym::NUM_LOCK)?;
            }
        }
        Ok(())
    }

    /// The modifier bit Num_Lock's keycode sets, if any.
    fn num_lock_mask(&self) -> Result<Option<u16>, ConnectionError> {
        let Some(&(num_lock, _)) = self.keyboard.keycodes.get(&keysym::NUM_LOCK) else {
            return Ok(None);
        };
        let map = match self.conn.get_modifier_mapping()?.reply() {
            Ok(map) => map,
            Err(ReplyError::ConnectionError(lost)) => return Err(lost),
            Err(ReplyError::X11Error(_)) => return Ok(None),
        };
        let per_modifier = usize::from(map.keycodes_per_modifier());
        if per_modifier == 0 {
            return Ok(None);
        }
        Ok(map
            .keycodes
            .chunks(per_modifier)
            .position(|keycodes| keycodes.contains(&num_lock))
            .map(|modifier| 1u16 << modifier))
    }

    fn tap(&mut self, sym: u32) -> Result<(), ConnectionError> {
        if let Some(&(keycode, _)) = self.keyboard.keycodes.get(&sym) {
            self.key(keycode, true)?;
            self.key(keycode, false)?;
        }
        Ok(())
    }

    fn button(&mut self, button: u8, down: bool) -> Result<(), ConnectionError> {
        if down {
            self.buttons_down.insert(button);
        } else {
            self.buttons_down.remove(&button);
        }
        self.fake(
            if down { BUTTON_PRESS } else { BUTTON_RELEASE },
            button,
            0,
            0,
        )
    }

    fn click(&mut self, button: u8, times: i32) -> Result<(), ConnectionError> {
        for _ in 0..times {
            self.button(button, true)?;
            self.button(button, false)?;
        }
        Ok(())
    }

    /// RDP counts the wheel in 120ths of a notch, positive away from the user; X has a
    /// button press per notch: 4 up, 5 down. Fine-grained wheels add up to notches.
    fn vertical_scroll(&mut self, value: i32) -> Result<(), ConnectionError> {
        let clicks = accumulate_wheel(&mut self.vertical_wheel, value);
        match clicks.signum() {
            1 => self.click(4, clicks),
            -1 => self.click(5, -clicks),
            _ => Ok(()),
        }
    }

    /// Positive to the right: X buttons 6 (left) and 7 (right).
    fn horizontal_scroll(&mut self, value: i32) -> Result<(), ConnectionError> {
        let clicks = accumulate_wheel(&mut self.horizontal_wheel, value);
        match clicks.signum() {
            1 => self.click(7, clicks),
            -1 => self.click(6, -clicks),
            _ => Ok(()),
        }
    }
}

/// Whole notches in `pending + value`, keeping the remainder; a change of direction drops
/// what was pending the other way.
fn accumulate_wheel(pending: &mut i32, value: i32) -> i32 {
    if value == 0 {
        return 0;
    }
    if pending.signum() == -value.signum() {
        *pending = 0;
    }
    *pending = pending.saturating_add(value);
    let clicks = (*pending / WHEEL_DELTA).clamp(-MAX_WHEEL_CLICKS, MAX_WHEEL_CLICKS);
    *pending -= clicks * WHEEL_DELTA;
    if pending.abs() >= WHEEL_DELTA {
        *pending = 0;
    }
    clicks
}

impl Drop for Input {
    fn drop(&mut self) {
        if self.lost {
            return;
        }
        for keycode in std::mem::take(&mut self.keys_down) {
            let _ = self.fake(KEY_RELEASE, keycode, 0, 0);
        }
        for button in std::mem::take(&mut self.buttons_down) {
            let _ = self.fake(BUTTON_RELEASE, button, 0, 0);
        }
        for (keycode, _) in std::mem::take(&mut self.borrowed) {
            let _ = self.conn.change_keyboard_mapping(
                1,
                keycode,
                2,
                &[keysym::NO_SYMBOL, keysym::NO_SYMBOL],
            );
        }
        // Wait for the server to have done it all before the connection closes.
        let _ = self.conn.get_input_focus().map(|cookie| cookie.reply());
    }
}

/// The few calls to the OS this module needs, behind safe functions.
mod system {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
    use std::time::Duration;

    /// Waits until `fd` is readable or `timeout` passes.
    pub fn wait_readable(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<()> {
        let mut poll_fd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let millis = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: one valid pollfd, its count is 1.
        let result = unsafe { libc::poll(&mut poll_fd, 1, millis) };
        if result < 0 {
            let error = io::Error::last_os_error();
            if error.kind() != io::ErrorKind::Interrupted {
                return Err(error);
            }
        }
        Ok(())
    }

    enum Backing {
        Mapped,
        SysV,
    }

    /// Memory shared with the X server, mapped read-only here (only the server writes).
    pub struct SharedMemory {
        address: *mut u8,
        length: usize,
        backing: Backing,
    }

    // SAFETY: the mapping is plain memory owned by this value; nothing else in this
    // process aliases it.
    unsafe impl Send for SharedMemory {}

    impl SharedMemory {
        /// An anonymous memory file of `length` bytes and a descriptor to hand to the X
        /// server.
        pub fn memfd(length: usize) -> io::Result<(SharedMemory, OwnedFd)> {
            // SAFETY: a NUL-terminated name and valid flags.
            let raw =
                unsafe { libc::memfd_create(c"usher-rdp-screen".as_ptr(), libc::MFD_CLOEXEC) };
            if raw < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: memfd_create returned a new descriptor that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(raw) };
            let size = libc::off_t::try_from(length)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "segment too large"))?;
            // SAFETY: a valid descriptor.
            if unsafe { libc::ftruncate(fd.as_raw_fd(), size) } != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: a fresh shared read-only mapping of the whole file.
            let address = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    length,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    fd.as_raw_fd(),
                    0,
                )
            };
            if address == libc::MAP_FAILED {
                return Err(io::Error::last_os_error());
            }
            let memory = SharedMemory {
                address: address.cast(),
                length,
                backing: Backing::Mapped,
            };
            Ok((memory, fd))
        }

        /// A SysV segment only this user can attach (mode 0600), and its id.
        pub fn sysv(length: usize) -> io::Result<(SharedMemory, u32)> {
            // SAFETY: plain syscall with valid arguments.
            let id = unsafe { libc::shmget(libc::IPC_PRIVATE, length, libc::IPC_CREAT | 0o600) };
            if id < 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: attaching a segment just created, read-only.
            let address = unsafe { libc::shmat(id, std::ptr::null(), libc::SHM_RDONLY) };
            if address as isize == -1 {
                let error = io::Error::last_os_error();
                Self::remove_sysv_id(id as u32);
                return Err(error);
            }
            let memory = SharedMemory {
                address: address.cast(),
                length,
                backing: Backing::SysV,
            };
            Ok((memory, id as u32))
        }

        pub fn remove_sysv_id(id: u32) {
            // SAFETY: IPC_RMID takes no buffer.
            unsafe { libc::shmctl(id as i32, libc::IPC_RMID, std::ptr::null_mut()) };
        }

        pub fn len(&self) -> usize {
            self.length
        }

        /// The segment's bytes. Read only between the X server's reply to ShmGetImage and
        /// the next request: the server writes only while it handles one.
        pub fn bytes(&self) -> &[u8] {
            // SAFETY: `address` maps `length` readable bytes for the life of self.
            unsafe { std::slice::from_raw_parts(self.address, self.length) }
        }
    }

    impl Drop for SharedMemory {
        fn drop(&mut self) {
            // SAFETY: unmapping what `memfd` or `sysv` mapped, once.
            unsafe {
                match self.backing {
                    Backing::Mapped => {
                        libc::munmap(self.address.cast(), self.length);
                    }
                    Backing::SysV => {
                        libc::shmdt(self.address.cast());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rect(x: u16, y: u16, width: u16, height: u16) -> Rect {
        Rect {
            x,
            y,
            width,
            height,
        }
    }

    #[test]
    fn display_numbers() {
        assert_eq!(display_number(":0"), Some(0));
        assert_eq!(display_number(":12.0"), Some(12));
        assert_eq!(display_number("host:1"), None);
        assert_eq!(display_number(":"), None);
        assert_eq!(display_number(":1/../x"), None);
    }

    #[test]
    fn fragmented_damage_is_merged() {
        let near = vec![
            rect(0, 0, 10, 10),
            rect(10, 0, 10, 10),
            rect(500, 500, 5, 5),
        ];
        let planned = plan_rectangles(near, 2);
        assert_eq!(planned.len(), 2);
        assert!(planned.contains(&rect(0, 0, 20, 10)));
        assert!(planned.contains(&rect(500, 500, 5, 5)));
        let many: Vec<Rect> = (0..100).map(|i| rect(i * 3, i, 1, 1)).collect();
        assert_eq!(plan_rectangles(many, 8), vec![rect(0, 0, 298, 100)]);
    }

    #[test]
    fn damage_outside_the_screen_is_clipped() {
        let x_rect = |x, y, width, height| xproto::Rectangle {
            x,
            y,
            width,
            height,
        };
        assert_eq!(
            Rect::clipped(&x_rect(-5, 790, 20, 20), (1280, 800)),
            Some(rect(0, 790, 15, 10))
        );
        assert_eq!(Rect::clipped(&x_rect(1300, 0, 20, 20), (1280, 800)), None);
    }

    #[test]
    fn wheel_notches() {
        let mut pending = 0;
        assert_eq!(accumulate_wheel(&mut pending, 120), 1);
        assert_eq!(accumulate_wheel(&mut pending, -240), -2);
        assert_eq!(accumulate_wheel(&mut pending, 60), 0);
        assert_eq!(accumulate_wheel(&mut pending, 60), 1);
        assert_eq!(accumulate_wheel(&mut pending, i32::MAX), MAX_WHEEL_CLICKS);
        assert_eq!(pending, 0);
    }

    #[test]
    fn cursor_is_unpremultiplied_bgra_bottom_up() {
        // 1x2: top pixel opaque red, bottom pixel half-transparent white (premultiplied).
        let cursor = xfixes::GetCursorImageReply {
            sequence: 0,
            length: 0,
            x: 0,
            y: 0,
            width: 1,
            height: 2,
            xhot: 0,
            yhot: 5,
            cursor_serial: 1,
            cursor_image: vec![0xffff_0000, 0x8080_8080],
        };
        let DisplayUpdate::RGBAPointer(pointer) = pointer_update(&cursor) else {
            panic!("expected a colour pointer");
        };
        assert_eq!(pointer.hot_y, 1, "the hot spot stays inside the pointer");
        assert_eq!(pointer.data, vec![255, 255, 255, 0x80, 0, 0, 255, 255]);
        let invisible = xfixes::GetCursorImageReply {
            cursor_image: vec![0, 0],
            ..cursor
        };
        assert!(matches!(
            pointer_update(&invisible),
            DisplayUpdate::HidePointer
        ));
    }
}
