//! Approval of risky commands (see ../README.md): the requests of the host, the kernel's
//! hold on an exec (fanotify + the BPF permit), and the central service's decisions.

pub mod central;
