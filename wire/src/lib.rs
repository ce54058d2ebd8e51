//! The formats Usher's programs exchange, written once and used by every side: the agent,
//! the collector, the tests and the benchmarks.
//!
//! Shipping a session to the collector: its streams are hash-chained ([`chain`]), its
//! metadata sent beside them ([`meta`]), the collector answers as [`collector`] says, and a
//! signed [`seal`] ends it. On the host: the control socket ([`control`]) and the console
//! socket ([`console`]). The claims of a grant: [`grant`]. The just-in-time workflow's API:
//! [`jit`].

#![deny(unsafe_code)]

pub mod approval;
pub mod chain;
pub mod collector;
pub mod console;
pub mod control;
pub mod grant;
pub mod jit;
pub mod line;
pub mod meta;
pub mod rdp;
pub mod seal;

/// `*` matches any run of characters, `?` one; everything else itself. The one glob of the
/// service's request policies and the agent's `approve_commands`.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let t: Vec<char> = text.chars().collect();
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == t[ti]) {
            pi += 1;
            ti += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ti));
            pi += 1;
        } else if let Some((sp, st)) = star {
            pi = sp + 1;
            ti = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}
