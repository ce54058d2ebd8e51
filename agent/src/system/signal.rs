//! Signals by number and by name: the one table of the names SSH gives signals, used for
//! the client's "signal" requests, the "exit-signal" sent back, and the exit signal a
//! recording keeps; and the console shell's window-change notice.

use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
use std::sync::atomic::{AtomicBool, Ordering};

/// The signals RFC 4254 (section 6.10) names, by the names SSH uses (no "SIG" prefix).
const SSH_NAMES: [(Signal, &str); 13] = [
    (Signal::SIGABRT, "ABRT"),
    (Signal::SIGALRM, "ALRM"),
    (Signal::SIGFPE, "FPE"),
    (Signal::SIGHUP, "HUP"),
    (Signal::SIGILL, "ILL"),
    (Signal::SIGINT, "INT"),
    (Signal::SIGKILL, "KILL"),
    (Signal::SIGPIPE, "PIPE"),
    (Signal::SIGQUIT, "QUIT"),
    (Signal::SIGSEGV, "SEGV"),
    (Signal::SIGTERM, "TERM"),
    (Signal::SIGUSR1, "USR1"),
    (Signal::SIGUSR2, "USR2"),
];

/// The SSH name of signal `number`, if SSH names it.
pub fn ssh_name(number: i32) -> Option<&'static str> {
    SSH_NAMES
        .iter()
        .find(|(signal, _)| *signal as i32 == number)
        .map(|(_, name)| *name)
}

/// The signal SSH calls `name`, if it is one of those SSH names.
pub fn from_ssh_name(name: &str) -> Option<Signal> {
    SSH_NAMES
        .iter()
        .find(|(_, known)| *known == name)
        .map(|(signal, _)| *signal)
}

/// What to call signal `number` on an SSH channel: its SSH name, or `SIG` and the number
/// for one SSH does not name (RFC 4254 leaves other names to the implementation).
pub fn ssh_name_or_number(number: i32) -> String {
    match ssh_name(number) {
        Some(name) => name.to_string(),
        None => format!("SIG{number}"),
    }
}

static WINDOW_CHANGED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_window_change(_: nix::libc::c_int) {
    WINDOW_CHANGED.store(true, Ordering::SeqCst);
}

/// Notices SIGWINCH (the terminal was resized) from now on; see [`window_changed`].
pub fn notice_window_changes() -> nix::Result<()> {
    // Restarted system calls, as signal(3) installs handlers: a resize interrupts nothing.
    let action = SigAction::new(
        SigHandler::Handler(on_window_change),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe, and it
    // replaces no handler anything else in the process relies on.
    unsafe { sigaction(Signal::SIGWINCH, &action) }.map(|_| ())
}

/// True once after each SIGWINCH since the last call (with [`notice_window_changes`]).
pub fn window_changed() -> bool {
    WINDOW_CHANGED.swap(false, Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_numbers_go_both_ways() {
        for (signal, name) in SSH_NAMES {
            assert_eq!(ssh_name(signal as i32), Some(name));
            assert_eq!(from_ssh_name(name), Some(signal));
        }
        assert_eq!(ssh_name(15), Some("TERM"));
        assert_eq!(ssh_name(12), Some("USR2"));
        assert_eq!(from_ssh_name("SIGTERM"), None);
    }

    #[test]
    fn a_signal_ssh_does_not_name_goes_by_its_number() {
        assert_eq!(ssh_name(Signal::SIGCHLD as i32), None);
        assert_eq!(ssh_name_or_number(17), "SIG17");
        assert_eq!(ssh_name_or_number(9), "KILL");
    }
}
