//! The file beside a recording: its format is the collector's too, so it lives in the
//! wire crate.

pub use usher_wire::meta::{GrantInfo, SessionMeta};

pub fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}
