//! The desktop recording: the format is in README.md ("Recording"). Frames arrive at the
//! client's rate; the recording keeps a copy of the screen and writes what changed at
//! most `max_fps` times a second, as compressed images, with a keyframe (the whole
//! screen) every `keyframe_secs`.

use ironrdp_server::{DisplayUpdate, KeyboardEvent, MouseEvent};
use usher_wire::rdp::RecordingSettings;

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("an image could not be encoded: {0}")]
    Encode(String),
    #[error("the recording's output is closed")]
    Closed,
}

/// TODO(rdp-record)
pub struct DesktopRecorder {}

impl DesktopRecorder {
    /// `out` receives each line of the recording (without its newline), the header first;
    /// an error from it stops the recording.
    pub fn start(
        _width: u16,
        _height: u16,
        _settings: RecordingSettings,
        _out: Box<dyn FnMut(String) -> Result<(), RecordError> + Send>,
    ) -> DesktopRecorder {
        todo!("rdp-record")
    }

    /// What the client is sent, the recording sees too. Cheap: copies into the shadow
    /// screen; the encoding happens on the recorder's own thread.
    pub fn display(&self, _update: &DisplayUpdate) {}
    pub fn keyboard(&self, _event: &KeyboardEvent) {}
    pub fn mouse(&self, _event: &MouseEvent) {}

    /// Writes what is pending and the end; the first error the recording met, if any.
    pub fn finish(self) -> Result<(), RecordError> {
        todo!("rdp-record")
    }
}
