//! The session's X display as the worker sees it: what changed on the screen (XDamage,
//! read through MIT-SHM), the cursor's shape (XFixes), and the client's keyboard and
//! mouse played into it (XTEST).

use ironrdp_server::{DisplayUpdate, KeyboardEvent, MouseEvent};

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
}

/// Captures the screen. TODO(rdp-screen): damage + shm capture.
pub struct Screen {}

impl Screen {
    pub fn connect(_x: &XDisplay) -> Result<Screen, ScreenError> {
        todo!("rdp-screen")
    }

    /// Width and height of the screen now.
    pub fn size(&self) -> (u16, u16) {
        todo!("rdp-screen")
    }

    /// Starts capturing on a thread of its own: the whole screen first (a client that
    /// (re)connects needs it), then the rectangles that changed, at most `max_fps` batches
    /// a second, the cursor's shape when it changes. Capturing stops when the receiver is
    /// dropped.
    pub fn capture(
        &self,
        _max_fps: u32,
    ) -> Result<tokio::sync::mpsc::Receiver<DisplayUpdate>, ScreenError> {
        todo!("rdp-screen")
    }

    /// A connection of its own for input.
    pub fn input(&self) -> Result<Input, ScreenError> {
        todo!("rdp-screen")
    }
}

/// Plays the client's keyboard and mouse into the display. TODO(rdp-screen).
pub struct Input {}

impl Input {
    pub fn keyboard(&mut self, _event: &KeyboardEvent) {}
    pub fn mouse(&mut self, _event: &MouseEvent) {}
}
