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
    sharing: Sharing,
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

    /// (Re)creates the shared segment for a screen of `size`: a memory file, else a SysV
    /// segment, else none (GetImage).
    fn prepare_shared(&mut self, conn: &RustConnection, size: (u16, u16)) {
        self.prepare_shared_with(conn, size, &[Sharing::MemoryFile, Sharing::SysV]);
    }

    fn prepare_shared_with(
        &mut self,
        conn: &RustConnection,
        (width, height): (u16, u16),
        ways: &[Sharing],
    ) {
        if let Some(old) = self.shared.take() {
            let _ = conn.shm_detach(old.segment);
        }
        let bytes = usize::from(width) * usize::from(height) * 4;
        for &sharing in ways {
            match SharedImage::attach(conn, bytes, sharing)
                .and_then(|shared| self.probe(conn, shared))
            {
                Ok(shared) => {
                    self.shared = Some(shared);
                    return;
                }
                Err(reason) => log::debug!("MIT-SHM through {sharing:?} unusable: {reason}"),
            }
        }
        log::info!("MIT-SHM unusable; capturing with GetImage");
    }

    /// The server may accept a segment and still fail to use it: one pixel is read before
    /// relying on it.
    fn probe(&self, conn: &RustConnection, shared: SharedImage) -> Result<SharedImage, String> {
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
            Ok(_) => Ok(shared),
            Err(error) => {
                let _ = conn.shm_detach(shared.segment);
                Err(format!("ShmGetImage: {error}"))
            }
        }
    }

    fn sharing(&self) -> Option<Sharing> {
        self.shared.as_ref().map(|shared| shared.sharing)
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

/// How the X server gets at a segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sharing {
    /// A memfd passed over the socket (MIT-SHM 1.2): no uid check, invisible to others.
    MemoryFile,
    /// A SysV segment of mode 0600: works only when the X server runs as this user (or
    /// root).
    SysV,
}

impl SharedImage {
    fn attach(
        conn: &RustConnection,
        bytes: usize,
        sharing: Sharing,
    ) -> Result<SharedImage, String> {
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
        match sharing {
            Sharing::MemoryFile => {
                if (version.major_version, version.minor_version) < (1, 2) {
                    return Err(format!(
                        "MIT-SHM {}.{} cannot take a file descriptor",
                        version.major_version, version.minor_version
                    ));
                }
                let (memory, fd) = system::SharedMemory::memfd(bytes).map_err(|e| e.to_string())?;
                conn.shm_attach_fd(segment, fd, false)
                    .map_err(|e| e.to_string())?
                    .check()
                    .map_err(|e| format!("ShmAttachFd: {e}"))?;
                Ok(SharedImage {
                    segment,
                    memory,
                    sharing,
                })
            }
            Sharing::SysV => {
                let (memory, id) = system::SharedMemory::sysv(bytes).map_err(|e| e.to_string())?;
                let attached = conn
                    .shm_attach(segment, id, false)
                    .map_err(|e| e.to_string())?
                    .check();
                // Once both sides are attached the id is not needed; removed now, the
                // segment disappears with the last detach even if this process is killed.
                system::SharedMemory::remove_sysv_id(id);
                attached.map_err(|e| format!("ShmAttach: {e}"))?;
                Ok(SharedImage {
                    segment,
                    memory,
                    sharing,
                })
            }
        }
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
                (channel * 255 + alpha / 2)
                    .checked_div(alpha)
                    .map_or(0, |value| value.min(255) as u8)
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
    /// When the screen last changed. While it keeps changing, the damage is fetched every
    /// frame interval without waiting for DamageNotify: a busy X server holds events back
    /// in a client's output buffer until it has nothing else to do (measured: 180 ms
    /// behind a client that repaints the screen thousands of times a second), replies
    /// it sends at once.
    last_change: Option<Instant>,
    cursor_due: bool,
    resize_due: bool,
}

/// How long after the last change the capture keeps polling for damage.
const BUSY_SCREEN: Duration = Duration::from_secs(1);

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
            last_change: None,
            cursor_due: true,
            resize_due: false,
        })
    }

    fn run(mut self, sender: mpsc::Sender<DisplayUpdate>, interval: Duration) {
        log::debug!(
            "capturing {}x{} every {interval:?} ({})",
            self.size.0,
            self.size.1,
            if self.grabber.sharing().is_some() {
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
            let now = Instant::now();
            let busy = self
                .last_change
                .is_some_and(|changed| now.duration_since(changed) < BUSY_SCREEN);
            let frame_due = self.whole_screen_due || self.damage_due || busy;
            let room = sender.capacity() > MAX_RECTANGLES_PER_BATCH;
            if frame_due && room && now >= next_batch {
                self.send_batch(sender)?;
                next_batch = now + interval;
            }
            // After the first frame: a client's first update is the whole screen.
            if self.cursor_due && !self.whole_screen_due && sender.capacity() > 0 {
                self.send_cursor(sender)?;
            }
            self.conn.flush()?;
            let still_due = frame_due || self.cursor_due;
            let timeout = if !still_due {
                IDLE_WAKEUP
            } else if now < next_batch {
                next_batch - now
            } else {
                // Waiting for the consumer to make room: look again soon.
                interval.min(Duration::from_millis(10))
            };
            system::wait_readable(self.conn.stream().as_fd(), timeout)
                .map_err(ConnectionError::IoError)?;
        }
    }

    fn note(&mut self, event: Event) {
        match event {
            Event::DamageNotify(_) => {
                self.damage_due = true;
                self.last_change = Some(Instant::now());
            }
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
        if !rects.is_empty() {
            self.last_change = Some(Instant::now());
        }
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
        if let Err(error) = self.refresh_keymap() {
            self.finish(Err(error));
            return;
        }
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

    /// Reads the events the server sends every client (MappingNotify), so that they do not
    /// pile up in the connection; when somebody in the session changed the keymap
    /// (setxkbmap, xmodmap), reads it again.
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

    /// Tests against a real Xvfb (run as root or any user that may start one).
    mod xvfb {
        use super::super::*;
        use std::io::Read;
        use std::path::PathBuf;
        use std::process::{Child, Command, Stdio};
        use std::sync::atomic::{AtomicU32, Ordering};
        use x11rb::protocol::xproto::{CreateWindowAux, EventMask, WindowClass};

        static NEXT_DISPLAY: AtomicU32 = AtomicU32::new(0);

        /// An Xvfb of its own with a cookie the test wrote; killed when dropped.
        pub struct TestXvfb {
            child: Child,
            number: u32,
            auth_file: PathBuf,
            pub display: XDisplay,
        }

        fn random_cookie() -> Vec<u8> {
            let mut cookie = vec![0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut random| random.read_exact(&mut cookie))
                .expect("read /dev/urandom");
            cookie
        }

        /// An Xauthority entry: family, address, display number, name, data, each but the
        /// family a big-endian u16 length and its bytes.
        fn xauthority_entry(number: u32, cookie: &[u8]) -> Vec<u8> {
            let mut entry = Vec::new();
            entry.extend_from_slice(&0xffffu16.to_be_bytes()); // FamilyWild
            for field in [
                &b""[..],
                number.to_string().as_bytes(),
                b"MIT-MAGIC-COOKIE-1",
                cookie,
            ] {
                entry.extend_from_slice(&(field.len() as u16).to_be_bytes());
                entry.extend_from_slice(field);
            }
            entry
        }

        impl TestXvfb {
            pub fn start(width: u16, height: u16) -> TestXvfb {
                Self::start_as(None, width, height)
            }

            /// Xvfb running as another user (`nobody`), as the session's account runs it
            /// while the worker is a user of its own.
            pub fn start_as(user: Option<&str>, width: u16, height: u16) -> TestXvfb {
                let base = 300 + (std::process::id() % 200) * 8;
                for _attempt in 0..40 {
                    let number = base + NEXT_DISPLAY.fetch_add(1, Ordering::SeqCst) % 1600;
                    if std::path::Path::new(&format!("/tmp/.X{number}-lock")).exists() {
                        continue;
                    }
                    if let Some(xvfb) = Self::try_start(user, number, width, height) {
                        return xvfb;
                    }
                }
                panic!("no free X display number for Xvfb");
            }

            fn try_start(
                user: Option<&str>,
                number: u32,
                width: u16,
                height: u16,
            ) -> Option<TestXvfb> {
                let cookie = random_cookie();
                let auth_file = std::env::temp_dir().join(format!(
                    "usher-rdp-screen-test-{}-{number}.auth",
                    std::process::id()
                ));
                std::fs::write(&auth_file, xauthority_entry(number, &cookie))
                    .expect("write auth file");
                let mut command = match user {
                    Some(user) => {
                        // The other user must read the cookie; the file lives only as long
                        // as the test.
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(
                            &auth_file,
                            std::fs::Permissions::from_mode(0o644),
                        )
                        .expect("chmod auth file");
                        let mut command = Command::new("setpriv");
                        command.args([
                            &format!("--reuid={user}"),
                            "--regid=nogroup",
                            "--clear-groups",
                            "Xvfb",
                        ]);
                        command
                    }
                    None => Command::new("Xvfb"),
                };
                let child = command
                    .arg(format!(":{number}"))
                    .args(["-nolisten", "tcp", "-noreset", "-auth"])
                    .arg(&auth_file)
                    .args(["-screen", "0", &format!("{width}x{height}x24")])
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start Xvfb (package xvfb)");
                let mut xvfb = TestXvfb {
                    child,
                    number,
                    auth_file,
                    display: XDisplay {
                        display: format!(":{number}"),
                        cookie,
                    },
                };
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline {
                    if let Ok(Some(_status)) = xvfb.child.try_wait() {
                        // Another server holds the number (or it failed): the caller tries
                        // the next one; Drop cleans up.
                        return None;
                    }
                    if connect(&xvfb.display).is_ok() {
                        return Some(xvfb);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                None
            }

            /// A plain X client of the test's own.
            pub fn client(&self) -> RustConnection {
                connect(&self.display).expect("test client connects")
            }

            pub fn kill(&mut self) {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }

        impl Drop for TestXvfb {
            fn drop(&mut self) {
                // SIGTERM lets Xvfb remove its lock file and socket.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
                let deadline = Instant::now() + Duration::from_secs(3);
                while Instant::now() < deadline {
                    if let Ok(Some(_)) = self.child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                self.kill();
                let _ = std::fs::remove_file(&self.auth_file);
                let _ = std::fs::remove_file(format!("/tmp/.X{}-lock", self.number));
                let _ = std::fs::remove_file(format!("/tmp/.X11-unix/X{}", self.number));
            }
        }

        /// Maps a window of one colour (0xRRGGBB) that selects key and button events.
        fn colour_window(
            conn: &RustConnection,
            (x, y, width, height): (i16, i16, u16, u16),
            colour: u32,
        ) -> xproto::Window {
            let root = conn.setup().roots[0].root;
            let window = conn.generate_id().expect("id");
            conn.create_window(
                x11rb::COPY_DEPTH_FROM_PARENT,
                window,
                root,
                x,
                y,
                width,
                height,
                0,
                WindowClass::INPUT_OUTPUT,
                x11rb::COPY_FROM_PARENT,
                &CreateWindowAux::new()
                    .background_pixel(colour)
                    .override_redirect(1)
                    .event_mask(
                        EventMask::KEY_PRESS
                            | EventMask::KEY_RELEASE
                            | EventMask::BUTTON_PRESS
                            | EventMask::EXPOSURE,
                    ),
            )
            .expect("create window");
            conn.map_window(window).expect("map");
            conn.get_input_focus()
                .expect("sync")
                .reply()
                .expect("sync reply");
            window
        }

        fn runtime() -> tokio::runtime::Runtime {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("runtime")
        }

        fn next_update(
            runtime: &tokio::runtime::Runtime,
            updates: &mut mpsc::Receiver<DisplayUpdate>,
            within: Duration,
        ) -> Option<DisplayUpdate> {
            runtime
                .block_on(async { tokio::time::timeout(within, updates.recv()).await })
                .ok()
                .flatten()
        }

        fn next_bitmap(
            runtime: &tokio::runtime::Runtime,
            updates: &mut mpsc::Receiver<DisplayUpdate>,
        ) -> BitmapUpdate {
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Some(DisplayUpdate::Bitmap(bitmap)) =
                    next_update(runtime, updates, Duration::from_secs(10))
                {
                    return bitmap;
                }
            }
            panic!("no bitmap within 10 s");
        }

        /// The colour (0xRRGGBB) of a screen pixel in a bitmap, read as IronRDP reads the
        /// format.
        fn pixel(bitmap: &BitmapUpdate, x: u16, y: u16) -> u32 {
            assert!(
                x >= bitmap.x && x < bitmap.x + bitmap.width.get(),
                "x outside the bitmap"
            );
            assert!(
                y >= bitmap.y && y < bitmap.y + bitmap.height.get(),
                "y outside the bitmap"
            );
            let offset =
                usize::from(y - bitmap.y) * bitmap.stride.get() + usize::from(x - bitmap.x) * 4;
            let [r, g, b, _] = bitmap.format.channel_offsets();
            let bytes = &bitmap.data[offset..offset + 4];
            u32::from(bytes[r]) << 16 | u32::from(bytes[g]) << 8 | u32::from(bytes[b])
        }

        fn covers(bitmap: &BitmapUpdate, (x, y, width, height): (u16, u16, u16, u16)) -> bool {
            bitmap.x <= x
                && bitmap.y <= y
                && bitmap.x + bitmap.width.get() >= x + width
                && bitmap.y + bitmap.height.get() >= y + height
        }

        #[test]
        fn capture_sends_the_whole_screen_then_what_changed() {
            let xvfb = TestXvfb::start(640, 480);
            let painter = xvfb.client();
            colour_window(&painter, (100, 50, 40, 30), 0x12_34_56);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            assert_eq!(screen.size(), (640, 480));
            assert_eq!(screen.pixel_format(), PixelFormat::BgrX32);
            let runtime = runtime();

            for connection in 0..2 {
                // A client that reconnects gets a capture of its own, whole screen first.
                let mut updates = screen.capture(30).expect("capture");
                let Some(DisplayUpdate::Bitmap(first)) =
                    next_update(&runtime, &mut updates, Duration::from_secs(10))
                else {
                    panic!("the first update is not a bitmap");
                };
                assert_eq!(
                    (first.x, first.y, first.width.get(), first.height.get()),
                    (0, 0, 640, 480),
                    "capture {connection} starts with the whole screen"
                );
                assert_eq!(first.data.len(), 640 * 480 * 4);
                assert_eq!(
                    pixel(&first, 110, 60),
                    0x12_34_56,
                    "the painted window's colour"
                );
                assert_eq!(pixel(&first, 5, 5), 0, "Xvfb's black root");

                let changed = (300 + connection * 100, 200, 20, 10);
                colour_window(
                    &painter,
                    (changed.0 as i16, changed.1 as i16, changed.2, changed.3),
                    0xff_80_00,
                );
                let deadline = Instant::now() + Duration::from_secs(10);
                let update = loop {
                    assert!(Instant::now() < deadline, "the change never arrived");
                    let bitmap = next_bitmap(&runtime, &mut updates);
                    if covers(&bitmap, changed) {
                        break bitmap;
                    }
                };
                assert!(
                    update.width.get() < 640 || update.height.get() < 480,
                    "a change is sent as a rectangle, not the whole screen: {update:?}"
                );
                assert_eq!(pixel(&update, changed.0 + 5, changed.1 + 5), 0xff_80_00);
            }
        }

        #[test]
        fn cursor_shape_is_sent() {
            let xvfb = TestXvfb::start(320, 240);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let runtime = runtime();
            let mut updates = screen.capture(30).expect("capture");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "no pointer update");
                match next_update(&runtime, &mut updates, Duration::from_secs(10)) {
                    Some(DisplayUpdate::RGBAPointer(pointer)) => {
                        assert!(pointer.width > 0 && pointer.width <= MAX_POINTER_SIDE);
                        assert_eq!(
                            pointer.data.len(),
                            usize::from(pointer.width) * usize::from(pointer.height) * 4
                        );
                        break;
                    }
                    Some(DisplayUpdate::HidePointer) => break,
                    Some(_) => continue,
                    None => panic!("capture ended"),
                }
            }
        }

        #[test]
        fn connects_through_the_abstract_socket() {
            // Another mount namespace does not see the session's /tmp/.X11-unix; the
            // abstract socket is the same in every mount namespace.
            let xvfb = TestXvfb::start(320, 240);
            std::fs::remove_file(format!("/tmp/.X11-unix/X{}", xvfb.number))
                .expect("remove the socket file");
            let screen = Screen::connect(&xvfb.display).expect("connect without the socket file");
            assert_eq!(screen.size(), (320, 240));
        }

        #[test]
        fn a_wrong_cookie_or_a_missing_display_is_refused() {
            let xvfb = TestXvfb::start(320, 240);
            let mut wrong = xvfb.display.clone();
            wrong.cookie[0] ^= 0xff;
            assert!(matches!(
                Screen::connect(&wrong),
                Err(ScreenError::Connect { .. })
            ));
            let no_cookie = XDisplay {
                cookie: Vec::new(),
                ..xvfb.display.clone()
            };
            assert!(matches!(
                Screen::connect(&no_cookie),
                Err(ScreenError::Connect { .. })
            ));
            let nowhere = XDisplay {
                display: ":65000".into(),
                ..xvfb.display.clone()
            };
            assert!(matches!(
                Screen::connect(&nowhere),
                Err(ScreenError::Connect { .. })
            ));
            let remote = XDisplay {
                display: "127.0.0.1:0".into(),
                ..xvfb.display.clone()
            };
            assert!(matches!(
                Screen::connect(&remote),
                Err(ScreenError::Connect { .. })
            ));
        }

        #[test]
        fn shared_memory_and_get_image_read_the_same_pixels() {
            // The X server runs as another user than this process: a SysV segment of this
            // user's (mode 0600) would be refused, a memfd is not.
            let xvfb = TestXvfb::start_as(Some("nobody"), 320, 240);
            let status = std::fs::read_to_string(format!("/proc/{}/status", xvfb.child.id()))
                .expect("Xvfb's status");
            assert!(
                status.lines().any(|line| line.starts_with("Uid:\t65534\t")),
                "Xvfb runs as nobody"
            );
            let painter = xvfb.client();
            colour_window(&painter, (10, 20, 30, 40), 0xab_cd_ef);
            let conn = xvfb.client();
            let format = pixel_format(&conn).expect("format");
            let shared = Grabber::new(&conn, format, (320, 240));
            assert_eq!(
                shared.sharing(),
                Some(Sharing::MemoryFile),
                "Xvfb offers MIT-SHM 1.2"
            );
            let mut sysv_only = Grabber::new(&conn, format, (1, 1));
            sysv_only.prepare_shared_with(&conn, (320, 240), &[Sharing::SysV]);
            assert_eq!(
                sysv_only.sharing(),
                None,
                "a SysV segment of another user is refused"
            );
            let corner = Rect {
                x: 0,
                y: 0,
                width: 8,
                height: 8,
            };
            assert!(sysv_only.read(&conn, corner).is_ok(), "GetImage instead");
            let plain = Grabber {
                shared: None,
                ..Grabber::new(&conn, format, (1, 1))
            };
            let area = Rect {
                x: 5,
                y: 15,
                width: 50,
                height: 50,
            };
            let (Ok(through_shm), Ok(through_socket)) =
                (shared.read(&conn, area), plain.read(&conn, area))
            else {
                panic!("reading the rectangle failed");
            };
            assert_eq!(through_shm.data, through_socket.data);
            assert_eq!(pixel(&through_shm, 20, 30), 0xab_cd_ef);
            assert_eq!(pixel(&through_shm, 6, 16), 0);
            // A rectangle outside the screen is refused, not fatal.
            let outside = Rect {
                x: 300,
                y: 200,
                width: 50,
                height: 50,
            };
            assert!(matches!(
                shared.read(&conn, outside),
                Err(ReadError::Refused(_))
            ));
            assert!(matches!(
                plain.read(&conn, outside),
                Err(ReadError::Refused(_))
            ));
        }

        #[test]
        fn sysv_shared_memory_works_when_the_server_runs_as_this_user() {
            let xvfb = TestXvfb::start(320, 240);
            let painter = xvfb.client();
            colour_window(&painter, (10, 20, 30, 40), 0x65_43_21);
            let conn = xvfb.client();
            let format = pixel_format(&conn).expect("format");
            let mut grabber = Grabber::new(&conn, format, (1, 1));
            grabber.prepare_shared_with(&conn, (320, 240), &[Sharing::SysV]);
            assert_eq!(grabber.sharing(), Some(Sharing::SysV));
            let whole = Rect {
                x: 0,
                y: 0,
                width: 320,
                height: 240,
            };
            let Ok(bitmap) = grabber.read(&conn, whole) else {
                panic!("reading through SysV shared memory failed");
            };
            assert_eq!(pixel(&bitmap, 20, 30), 0x65_43_21);
        }

        #[test]
        fn a_slow_consumer_gets_the_latest_screen_not_a_backlog() {
            let xvfb = TestXvfb::start(320, 240);
            let painter = xvfb.client();
            let window = colour_window(&painter, (0, 0, 100, 100), 0);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let runtime = runtime();
            let mut updates = screen.capture(100).expect("capture");
            next_bitmap(&runtime, &mut updates);
            // 200 changes while nobody reads.
            let mut colour = 0;
            for step in 1..=200u32 {
                colour = (step * 0x010101) & 0xffffff;
                painter
                    .change_window_attributes(
                        window,
                        &xproto::ChangeWindowAttributesAux::new().background_pixel(colour),
                    )
                    .expect("paint");
                painter
                    .clear_area(false, window, 0, 0, 0, 0)
                    .expect("clear");
                painter
                    .get_input_focus()
                    .expect("sync")
                    .reply()
                    .expect("sync");
                std::thread::sleep(Duration::from_millis(5));
            }
            std::thread::sleep(Duration::from_millis(300));
            let mut queued = 0;
            let mut last = None;
            while let Some(update) = next_update(&runtime, &mut updates, Duration::from_millis(500))
            {
                queued += 1;
                if let DisplayUpdate::Bitmap(bitmap) = update {
                    if covers(&bitmap, (50, 50, 1, 1)) {
                        last = Some(pixel(&bitmap, 50, 50));
                    }
                }
                if last == Some(colour) {
                    break;
                }
            }
            assert_eq!(last, Some(colour), "the last colour arrives");
            assert!(
                queued <= CHANNEL_CAPACITY + 2 * MAX_RECTANGLES_PER_BATCH,
                "{queued} updates"
            );
        }

        #[test]
        fn capture_ends_when_the_x_server_dies() {
            let mut xvfb = TestXvfb::start(320, 240);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let runtime = runtime();
            let mut updates = screen.capture(30).expect("capture");
            next_bitmap(&runtime, &mut updates);
            xvfb.kill();
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "the channel stayed open");
                if next_update(&runtime, &mut updates, Duration::from_secs(10)).is_none() {
                    break;
                }
            }
            // Input to a dead server fails quietly.
            assert!(screen.input().is_err());
        }

        /// Waits for the next event of a kind on the test client's connection.
        fn next_event<T>(conn: &RustConnection, mut wanted: impl FnMut(Event) -> Option<T>) -> T {
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                match conn.poll_for_event().expect("test connection") {
                    Some(event) => {
                        if let Some(found) = wanted(event) {
                            return found;
                        }
                    }
                    None => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            panic!("the event did not arrive within 5 s");
        }

        /// The keysym a key press means to a client: column 1 with Shift, else 0.
        fn keysym_of(conn: &RustConnection, press: &xproto::KeyPressEvent) -> u32 {
            let mapping = conn
                .get_keyboard_mapping(press.detail, 1)
                .expect("mapping")
                .reply()
                .expect("mapping reply");
            let shifted = u16::from(press.state) & u16::from(xproto::KeyButMask::SHIFT) != 0;
            let column = usize::from(shifted);
            match mapping.keysyms.get(column).copied() {
                Some(0) | None => mapping.keysyms.first().copied().unwrap_or(0),
                Some(sym) => sym,
            }
        }

        fn press_keysym(conn: &RustConnection) -> u32 {
            next_event(conn, |event| match event {
                Event::KeyPress(press) => Some(keysym_of(conn, &press)),
                _ => None,
            })
        }

        fn type_scancode(input: &mut Input, code: u8, extended: bool) {
            input.keyboard(&KeyboardEvent::Pressed { code, extended });
            input.keyboard(&KeyboardEvent::Released { code, extended });
        }

        #[test]
        fn keys_arrive_as_the_keysyms_they_mean() {
            let xvfb = TestXvfb::start(320, 240);
            let client = xvfb.client();
            let window = colour_window(&client, (0, 0, 320, 240), 0xffffff);
            client
                .set_input_focus(xproto::InputFocus::PARENT, window, x11rb::CURRENT_TIME)
                .expect("focus");
            client
                .get_input_focus()
                .expect("sync")
                .reply()
                .expect("sync");
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let mut input = screen.input().expect("input");

            type_scancode(&mut input, 0x1e, false);
            assert_eq!(press_keysym(&client), u32::from(b'a'));

            input.keyboard(&KeyboardEvent::Pressed {
                code: 0x2a,
                extended: false,
            });
            assert_eq!(press_keysym(&client), keysym::SHIFT_L);
            type_scancode(&mut input, 0x1e, false);
            assert_eq!(press_keysym(&client), u32::from(b'A'), "shifted a");
            type_scancode(&mut input, 0x02, false);
            assert_eq!(press_keysym(&client), u32::from(b'!'), "shifted 1");
            input.keyboard(&KeyboardEvent::Released {
                code: 0x2a,
                extended: false,
            });

            type_scancode(&mut input, 0x48, true);
            assert_eq!(press_keysym(&client), keysym::UP, "E0 48");
            type_scancode(&mut input, 0x48, false);
            assert_eq!(
                press_keysym(&client),
                keysym::KP_UP,
                "48 without E0 is the keypad's 8"
            );
            type_scancode(&mut input, 0x53, true);
            assert_eq!(press_keysym(&client), keysym::DELETE, "E0 53");
            type_scancode(&mut input, 0x1d, true);
            assert_eq!(press_keysym(&client), keysym::CONTROL_R, "E0 1D");
            type_scancode(&mut input, 0x1c, true);
            assert_eq!(press_keysym(&client), keysym::KP_ENTER, "E0 1C");
            type_scancode(&mut input, 0x5b, true);
            assert_eq!(press_keysym(&client), keysym::SUPER_L, "E0 5B");
            type_scancode(&mut input, 0x1c, false);
            assert_eq!(press_keysym(&client), keysym::RETURN);

            // Characters no key has: a borrowed keycode types them.
            let mut borrowed = Vec::new();
            for (units, expected) in [
                (vec![0x00e9u16], 0xe9u32),
                (vec![0x20ac], 0x0100_20ac),
                (vec![0xd83d, 0xde00], 0x0101_f600),
                (vec![0x00e9], 0xe9),
                (vec![u16::from(b'z')], u32::from(b'z')),
                (vec![u16::from(b'Z')], u32::from(b'Z')),
            ] {
                for &unit in &units {
                    input.keyboard(&KeyboardEvent::UnicodePressed(unit));
                }
                for &unit in &units {
                    input.keyboard(&KeyboardEvent::UnicodeReleased(unit));
                }
                let (keycode, sym) = next_event(&client, |event| match event {
                    Event::KeyPress(press) => Some((press.detail, keysym_of(&client, &press))),
                    _ => None,
                });
                assert_eq!(sym, expected, "unicode {units:x?}");
                borrowed.push(keycode);
            }
            assert_eq!(
                borrowed[0], borrowed[3],
                "a character keeps its borrowed keycode"
            );

            // The keymap is given back when the input goes.
            drop(input);
            let mapping = client
                .get_keyboard_mapping(borrowed[0], 1)
                .expect("mapping")
                .reply()
                .expect("mapping reply");
            assert!(
                mapping.keysyms.iter().all(|&sym| sym == 0),
                "{:x?}",
                mapping.keysyms
            );
        }

        #[test]
        fn synchronize_sets_caps_lock_and_num_lock() {
            let xvfb = TestXvfb::start(320, 240);
            let client = xvfb.client();
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let mut input = screen.input().expect("input");
            let num_lock = input
                .num_lock_mask()
                .expect("modifiers")
                .expect("a Num_Lock modifier");
            let state = || {
                let pointer = client
                    .query_pointer(client.setup().roots[0].root)
                    .expect("query")
                    .reply()
                    .expect("reply");
                let mask = u16::from(pointer.mask);
                (
                    mask & u16::from(xproto::KeyButMask::LOCK) != 0,
                    mask & num_lock != 0,
                )
            };
            assert_eq!(state(), (false, false));
            for (flags, expected) in [
                (0x04, (true, false)),
                (0x04, (true, false)),
                (0x06, (true, true)),
                (0x01, (false, false)),
            ] {
                input.synchronize(flags).expect("synchronize");
                // A round trip: the fake key presses are done before the state is read.
                input
                    .conn
                    .get_input_focus()
                    .expect("sync")
                    .reply()
                    .expect("sync");
                assert_eq!(state(), expected, "after flags {flags:#x}");
            }
        }

        #[test]
        fn mouse_buttons_arrive_where_the_pointer_is() {
            let xvfb = TestXvfb::start(320, 240);
            let client = xvfb.client();
            colour_window(&client, (0, 0, 320, 240), 0xffffff);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let mut input = screen.input().expect("input");
            let press = |client: &RustConnection| {
                next_event(client, |event| match event {
                    Event::ButtonPress(press) => Some((press.detail, press.root_x, press.root_y)),
                    _ => None,
                })
            };

            input.mouse(&MouseEvent::Move { x: 37, y: 42 });
            input.mouse(&MouseEvent::LeftPressed);
            input.mouse(&MouseEvent::LeftReleased);
            assert_eq!(press(&client), (1, 37, 42));
            input.mouse(&MouseEvent::Move { x: 200, y: 100 });
            input.mouse(&MouseEvent::RightPressed);
            input.mouse(&MouseEvent::RightReleased);
            assert_eq!(press(&client), (3, 200, 100));
            input.mouse(&MouseEvent::MiddlePressed);
            input.mouse(&MouseEvent::MiddleReleased);
            assert_eq!(press(&client), (2, 200, 100));
            input.mouse(&MouseEvent::RelMove { x: -10, y: 5 });
            input.mouse(&MouseEvent::LeftPressed);
            input.mouse(&MouseEvent::LeftReleased);
            assert_eq!(press(&client), (1, 190, 105));
            input.mouse(&MouseEvent::VerticalScroll { value: 240 });
            assert_eq!(press(&client).0, 4);
            assert_eq!(press(&client).0, 4, "two notches, two clicks");
            input.mouse(&MouseEvent::VerticalScroll { value: -120 });
            assert_eq!(press(&client).0, 5);
            input.mouse(&MouseEvent::Scroll { x: 120, y: 0 });
            assert_eq!(press(&client).0, 7);
            input.mouse(&MouseEvent::Button4Pressed);
            input.mouse(&MouseEvent::Button4Released);
            assert_eq!(press(&client).0, 8, "XBUTTON1 is X's back button");
            // A button held when the input goes is released.
            input.mouse(&MouseEvent::LeftPressed);
            assert_eq!(press(&client).0, 1);
            drop(input);
            let pointer = client
                .query_pointer(client.setup().roots[0].root)
                .expect("query")
                .reply()
                .expect("reply");
            assert_eq!(
                u16::from(pointer.mask) & u16::from(xproto::KeyButMask::BUTTON1),
                0
            );
        }

        #[test]
        fn resize_shrinks_and_grows_back_within_the_start_size() {
            let xvfb = TestXvfb::start(1024, 768);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let runtime = runtime();
            let mut updates = screen.capture(30).expect("capture");
            next_bitmap(&runtime, &mut updates);

            assert_eq!(screen.resize(800, 600).expect("shrink"), (800, 600));
            assert_eq!(screen.size(), (800, 600));
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                assert!(Instant::now() < deadline, "no Resize update");
                match next_update(&runtime, &mut updates, Duration::from_secs(10)) {
                    Some(DisplayUpdate::Resize(size)) => {
                        assert_eq!((size.width, size.height), (800, 600));
                        break;
                    }
                    Some(_) => continue,
                    None => panic!("capture ended"),
                }
            }
            let whole = next_bitmap(&runtime, &mut updates);
            assert_eq!(
                (whole.x, whole.y, whole.width.get(), whole.height.get()),
                (0, 0, 800, 600)
            );

            assert_eq!(screen.resize(2000, 2000).expect("clamped"), (1024, 768));
            assert_eq!(screen.resize(1024, 700).expect("other shape"), (1024, 700));
            assert_eq!(screen.resize(1024, 700).expect("same size"), (1024, 700));
        }

        /// CPU time (user + system) of a thread or process, from /proc.
        fn cpu_time(stat_path: &str) -> Duration {
            let stat = std::fs::read_to_string(stat_path).unwrap_or_default();
            let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
            let fields: Vec<&str> = after_name.split_whitespace().collect();
            // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
            let ticks: u64 = [11, 12]
                .iter()
                .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
                .sum();
            let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            Duration::from_millis(ticks * 1000 / per_second)
        }

        /// The stat files of this process's capture threads.
        fn capture_threads() -> HashSet<String> {
            let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
                return HashSet::new();
            };
            tasks
                .flatten()
                .filter_map(|task| {
                    let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
                    (comm.trim() == "screen-capture")
                        .then(|| task.path().join("stat").to_string_lossy().into_owned())
                })
                .collect()
        }

        /// Not an assertion: how many whole-screen frames a second the capture delivers at
        /// 1280x800 while the screen changes all the time, and what it costs. Run alone
        /// (`cargo test measure -- --nocapture`): the CPU figure is that of the thread named
        /// screen-capture, and other tests' captures would share the name.
        #[test]
        fn measure_full_screen_capture_rate() {
            // A painter changing the whole screen 100 times a second (an animation), then one
            // repainting as fast as the X server lets it (which competes with the capture for
            // the server).
            for repaints_per_second in [Some(100u32), None] {
                measure_capture(repaints_per_second);
            }
        }

        fn measure_capture(repaints_per_second: Option<u32>) {
            let xvfb = TestXvfb::start(1280, 800);
            let painter = xvfb.client();
            let window = colour_window(&painter, (0, 0, 1280, 800), 0);
            let screen = Screen::connect(&xvfb.display).expect("connect");
            let runtime = runtime();
            let threads_before = capture_threads();
            let mut updates = screen.capture(60).expect("capture");
            next_bitmap(&runtime, &mut updates);
            // This capture's thread, unless another test started one meanwhile.
            let new_threads: Vec<String> = capture_threads()
                .difference(&threads_before)
                .cloned()
                .collect();
            let stat = match new_threads.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            };
            let xvfb_stat = format!("/proc/{}/stat", xvfb.child.id());

            let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let painting = {
                let stop = stop.clone();
                let display = xvfb.display.clone();
                std::thread::spawn(move || {
                    let conn = connect(&display).expect("painter");
                    let pause = repaints_per_second.map(|rate| Duration::from_secs(1) / rate);
                    let mut colour = 0u32;
                    let mut frames = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        colour = colour.wrapping_add(0x010203) & 0xffffff;
                        let _ = conn.change_window_attributes(
                            window,
                            &xproto::ChangeWindowAttributesAux::new().background_pixel(colour),
                        );
                        let _ = conn.clear_area(false, window, 0, 0, 0, 0);
                        // One repaint at a time, as an application would.
                        let _ = conn.get_input_focus().map(|cookie| cookie.reply());
                        frames += 1;
                        if let Some(pause) = pause {
                            std::thread::sleep(pause);
                        }
                    }
                    frames
                })
            };

            let seconds = 5;
            let thread_cpu_before = stat.as_deref().map(cpu_time);
            let xvfb_cpu_before = cpu_time(&xvfb_stat);
            let started = Instant::now();
            let mut pixels = 0u64;
            let mut updates_received = 0u64;
            while started.elapsed() < Duration::from_secs(seconds) {
                if let Some(DisplayUpdate::Bitmap(bitmap)) =
                    next_update(&runtime, &mut updates, Duration::from_secs(1))
                {
                    pixels += u64::from(bitmap.width.get()) * u64::from(bitmap.height.get());
                    updates_received += 1;
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            let thread_cpu =
                stat.as_deref()
                    .map(cpu_time)
                    .zip(thread_cpu_before)
                    .map(|(after, before)| {
                        format!(
                            "{:.1}%",
                            after.saturating_sub(before).as_secs_f64() * 100.0 / elapsed
                        )
                    });
            let xvfb_cpu = cpu_time(&xvfb_stat).saturating_sub(xvfb_cpu_before);
            stop.store(true, Ordering::Relaxed);
            let repaints = painting.join().unwrap_or(0);
            let frames = pixels as f64 / (1280.0 * 800.0);
            println!(
                "capture 1280x800, max_fps 60, painter {:.0} repaints/s: {:.1} full frames/s \
                 ({updates_received} updates in {elapsed:.1} s); capture thread CPU {} of a \
                 core; Xvfb CPU {:.0}% (painting included)",
                repaints as f64 / elapsed,
                frames / elapsed,
                thread_cpu.unwrap_or_else(|| "unknown (run this test alone)".into()),
                xvfb_cpu.as_secs_f64() * 100.0 / elapsed,
            );
            assert!(frames > 0.0, "no frame at all");
        }
    }
}
