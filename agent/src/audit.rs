//! The agent's log: the journal (with structured fields) under journald, stderr otherwise.
//!
//! Every audit event carries `USHER_EVENT` (grant_accepted, grant_refused, account_created,
//! account_removed, session_started, session_ended, …) so that
//! `journalctl USHER_EVENT=session_started` finds them.

use log::kv::{Key, Value, VisitSource};
use std::io::Write;

/// Logs an audit event: `audit!("grant_refused", jti = x, reason = r; "text {}", y)`.
#[macro_export]
macro_rules! audit {
    ($event:literal $(, $key:ident = $value:expr)* ; $($msg:tt)+) => {
        log::info!(target: "usher::audit", usher_event = $event $(, $key = $value)* ; $($msg)+)
    };
}

pub fn init(verbose: bool) {
    let level = if verbose {
        log::LevelFilter::Debug
    } else {
        log::LevelFilter::Info
    };
    if systemd_journal_logger::connected_to_journal() {
        if let Ok(logger) = systemd_journal_logger::JournalLog::new() {
            let logger = logger.with_syslog_identifier("usherd".to_string());
            if logger.install().is_ok() {
                log::set_max_level(level);
                return;
            }
        }
    }
    if log::set_boxed_logger(Box::new(StderrLog)).is_ok() {
        log::set_max_level(level);
    }
}

struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        // Dependencies' debug chatter (russh's packet traces) is not the agent's story.
        metadata.target().starts_with("usher") || metadata.level() <= log::Level::Warn
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let mut line = format!("{:<5} {}", record.level(), record.args());
        let mut fields = Fields(String::new());
        let _ = record.key_values().visit(&mut fields);
        line.push_str(&fields.0);
        line.push('\n');
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    fn flush(&self) {}
}

struct Fields(String);

impl<'kvs> VisitSource<'kvs> for Fields {
    fn visit_pair(&mut self, key: Key<'kvs>, value: Value<'kvs>) -> Result<(), log::kv::Error> {
        let v = value.to_string();
        if v.contains(' ') || v.is_empty() {
            self.0
                .push_str(&format!(" {}={:?}", key.as_str().to_uppercase(), v));
        } else {
            self.0
                .push_str(&format!(" {}={}", key.as_str().to_uppercase(), v));
        }
        Ok(())
    }
}
