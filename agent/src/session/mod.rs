//! Stage 3: sessions, the core every front end (SSH, console, next RDP) hands its client
//! to. Each session gets its own cgroup, a process running as the grant's ephemeral
//! account, and a recording; `core` is the interface the front ends use, `run` a session's
//! way from request to end, one file per concern along that way.

pub mod budget;
pub(crate) mod cgroup;
mod core;
mod exec_notes;
mod launch;
mod masking;
mod recorder;
mod relay;
mod request;
mod run;
pub mod spawn;
mod table;

pub use self::core::{ConsoleRefused, Core, Opened, RdpRefused, RecordingContext, Refused};
pub use cgroup::{v2_mount, AppliedLimits, Cgroup, JoinFiles, Layout};
pub use exec_notes::append_exec_events;
pub use recorder::mark_interrupted;
pub use request::{
    ClientIo, ClientSink, Control, DesktopSpec, ExitOutcome, PtySpec, SessionCommand,
    SessionRequest, CONTROL_QUEUE,
};
pub use run::run;
pub use table::{SessionRecord, SessionTable};

pub use usher_wire::control::SessionKind;

/// A session id that sorts by start time and names its files and cgroup.
pub fn new_session_id() -> String {
    let now = time::OffsetDateTime::now_utc();
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z-{:08x}",
        now.year(),
        now.month() as u8,
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        rand::random::<u32>()
    )
}
