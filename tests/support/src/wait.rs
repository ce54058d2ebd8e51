//! Waiting for something to happen: polled against a deadline, never a fixed sleep.

use std::path::Path;
use std::time::{Duration, Instant};

/// How often `wait_until` and the `wait_for_*` helpers look again.
const POLL: Duration = Duration::from_millis(50);

/// What did not happen in time.
#[derive(Debug, thiserror::Error)]
#[error("timed out after {after:?} waiting for {what}")]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

/// Calls `probe` every `every` until it yields a value, for at most `timeout`.
pub fn poll_until<T>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut probe: impl FnMut() -> Option<T>,
) -> Result<T, TimedOut> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe() {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_string(),
                after: timeout,
            });
        }
        std::thread::sleep(every);
    }
}

/// Waits until `ready` holds, for at most `timeout`.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut ready: impl FnMut() -> bool,
) -> Result<(), TimedOut> {
    poll_until(what, timeout, POLL, || ready().then_some(()))
}

/// Waits until something accepts connections on `port` of 127.0.0.1.
pub fn wait_for_port(port: u16, timeout: Duration) -> Result<(), TimedOut> {
    wait_until(&format!("a listener on port {port}"), timeout, || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
}

/// Waits until `path` holds at least one whole line (its writer may not be done before
/// that) and returns its text.
pub fn wait_for_file(path: &Path, timeout: Duration) -> Result<String, TimedOut> {
    poll_until(&format!("{}", path.display()), timeout, POLL, || {
        std::fs::read_to_string(path)
            .ok()
            .filter(|text| text.ends_with('\n'))
    })
}

/// Waits until a line of the log at `path` contains `needle`, and returns that line.
pub fn wait_for_log_line(path: &Path, needle: &str, timeout: Duration) -> Result<String, TimedOut> {
    poll_until(
        &format!("{needle:?} in {}", path.display()),
        timeout,
        POLL,
        || {
            std::fs::read_to_string(path)
                .ok()?
                .lines()
                .find(|line| line.contains(needle))
                .map(str::to_string)
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_never_holds_times_out_and_says_what_it_waited_for() {
        let err = wait_until("the impossible", Duration::from_millis(120), || false).unwrap_err();
        assert_eq!(err.what, "the impossible");
        assert!(err.to_string().contains("the impossible"));
    }

    #[test]
    fn a_value_is_returned_as_soon_as_the_probe_yields_it() {
        let mut calls = 0;
        let value = poll_until(
            "three calls",
            Duration::from_secs(5),
            Duration::from_millis(1),
            || {
                calls += 1;
                (calls == 3).then_some(calls)
            },
        )
        .unwrap();
        assert_eq!(value, 3);
    }

    #[test]
    fn a_file_is_read_once_it_holds_a_whole_line() {
        let path = std::env::temp_dir().join(format!("usher-wait-test-{}", std::process::id()));
        std::fs::write(&path, "partial").unwrap();
        assert!(wait_for_file(&path, Duration::from_millis(120)).is_err());
        std::fs::write(&path, "done\n").unwrap();
        assert_eq!(
            wait_for_file(&path, Duration::from_secs(1)).unwrap(),
            "done\n"
        );
        assert_eq!(
            wait_for_log_line(&path, "don", Duration::from_secs(1)).unwrap(),
            "done"
        );
        let _ = std::fs::remove_file(&path);
    }
}
