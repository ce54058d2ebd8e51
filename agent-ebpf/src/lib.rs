//! The types the eBPF programs (`programs/`) and the agent share, laid out as C does, in
//! one place. Everything here is plain data: no pointers, no padding left implicit.
#![no_std]

/// Longest exec'd name (the `filename` of the tracepoint) kept in an event.
pub const FILENAME_MAX: usize = 256;
/// Bytes of the argument area (NUL-separated argv) kept in an event.
pub const ARGV_MAX: usize = 512;

/// `SessionPolicy::mode`.
pub const MODE_AUDIT: u32 = 0;
pub const MODE_ALLOW: u32 = 1;
pub const MODE_DENY: u32 = 2;

/// `SessionPolicy::flags`.
pub const FLAG_DENY_UNLINKED: u32 = 1;
pub const FLAG_DENY_LOADER: u32 = 2;
/// The session's profile holds some programs for approval (`APPROVE`, `PERMITS`).
pub const FLAG_APPROVAL: u32 = 4;

/// `ExecEvent::verdict`.
pub const VERDICT_ALLOWED: u32 = 0;
/// Killed by SIGKILL before its first instruction (tracepoint path).
pub const VERDICT_KILLED: u32 = 1;
/// Refused with EPERM (BPF-LSM path).
pub const VERDICT_DENIED: u32 = 2;

/// `ExecEvent::rule` values that are not an index into the session's rules.
pub const RULE_NONE: u32 = u32::MAX;
pub const RULE_NOT_ALLOWED: u32 = u32::MAX - 1;
pub const RULE_UNLINKED: u32 = u32::MAX - 2;
pub const RULE_LOADER: u32 = u32::MAX - 3;
/// An executable mapping (`mmap`/`mprotect` with PROT_EXEC, BPF-LSM only) of a file the
/// profile does not cover.
pub const RULE_MAP_EXEC: u32 = u32::MAX - 4;
/// A program held for approval ran without the agent's permit (the agent was down, or the
/// request was never approved).
pub const RULE_APPROVAL: u32 = u32::MAX - 5;

/// `PROT_EXEC` of mmap(2)/mprotect(2).
pub const PROT_EXEC: u64 = 4;

/// `CONFIG` map index 0: whether the LSM program is attached (then the tracepoint only
/// reports; the LSM hook refuses).
pub const CONFIG_LSM_ACTIVE: u32 = 0;

/// The policy of one session, keyed by its cgroup id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionPolicy {
    pub mode: u32,
    pub flags: u32,
}

/// A file, as the kernel names it: its super block's device (kernel encoding,
/// major << 20 | minor) and inode number.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FileKey {
    pub dev: u32,
    pub _pad: u32,
    pub ino: u64,
}

/// A rule of one session: the file (or directory) it names.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleKey {
    pub cgroup_id: u64,
    pub file: FileKey,
}

/// A one-shot permit the agent writes when a held exec is approved: this process may
/// become this file once. The value is the permit's end (`bpf_ktime_get_boot_ns`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PermitKey {
    pub tgid: u32,
    pub _pad: u32,
    pub file: FileKey,
}

/// Byte offsets of the kernel structure fields the programs read, taken from the running
/// kernel's BTF by the agent at load time (Rust eBPF has no CO-RE relocations of its own).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offsets {
    pub task_mm: u32,
    pub task_real_parent: u32,
    pub task_tgid: u32,
    pub mm_exe_file: u32,
    pub mm_arg_start: u32,
    pub mm_arg_end: u32,
    pub file_inode: u32,
    pub file_path_dentry: u32,
    pub dentry_parent: u32,
    pub dentry_inode: u32,
    pub inode_ino: u32,
    pub inode_sb: u32,
    pub inode_nlink: u32,
    pub sb_dev: u32,
    pub binprm_file: u32,
    pub vma_file: u32,
    pub inode_mode: u32,
    pub inode_uid: u32,
    pub _pad: u32,
}

/// One exec in a session, as the programs report it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct ExecEvent {
    pub boot_ns: u64,
    pub cgroup_id: u64,
    pub ino: u64,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub dev: u32,
    pub nlink: u32,
    pub verdict: u32,
    pub rule: u32,
    /// Length of the argument area (may exceed `ARGV_MAX`: then truncated).
    pub argv_len: u32,
    pub filename: [u8; FILENAME_MAX],
    pub argv: [u8; ARGV_MAX],
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: `repr(C)`, two u32: no padding, and any bytes are a valid value.
    unsafe impl aya::Pod for super::SessionPolicy {}
    // SAFETY: `repr(C)`, u32 + explicit u32 padding field + u64: every byte is a field, and
    // any bytes are a valid value.
    unsafe impl aya::Pod for super::FileKey {}
    // SAFETY: `repr(C)`, u64 + FileKey (16 bytes, 8-aligned): no padding, and any bytes are
    // a valid value.
    unsafe impl aya::Pod for super::RuleKey {}
    // SAFETY: `repr(C)`, u32 + explicit u32 padding + FileKey (16 bytes, 8-aligned): no
    // padding, and any bytes are a valid value.
    unsafe impl aya::Pod for super::PermitKey {}
    // SAFETY: `repr(C)`, nineteen u32 (the last an explicit padding field): no padding, and
    // any bytes are a valid value.
    unsafe impl aya::Pod for super::Offsets {}
}
