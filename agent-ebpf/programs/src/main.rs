//! Usher's eBPF programs. Every exec in a session's cgroup is reported (who, what, with
//! which arguments) and checked against the session's policy, matched on the identity of
//! the file actually executed (device + inode), never on the name passed to exec.
//!
//! Two ways to stop a forbidden exec, chosen by the agent at start-up:
//! - `bprm_check` (BPF-LSM, `bprm_check_security`): the exec fails with EPERM;
//! - `sched_process_exec` (tracepoint): the new image gets SIGKILL before its first
//!   instruction. With the LSM attached this program only reports.
//!
//! Where BPF-LSM exists, `mmap_file` and `file_mprotect` apply the same file-identity check
//! to executable mappings, so `LD_PRELOAD`, `dlopen` and `enable -f` of a file the profile
//! does not cover fail too (elsewhere the agent's noexec mounts stand in for them).
#![no_std]
#![no_main]

use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
use aya_ebpf::helpers::generated::{
    bpf_get_current_cgroup_id, bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_send_signal,
};
use aya_ebpf::helpers::{
    bpf_get_current_pid_tgid, bpf_get_current_uid_gid, bpf_probe_read_kernel,
    bpf_probe_read_kernel_str_bytes, bpf_probe_read_user_buf,
};
use aya_ebpf::macros::{lsm, map, tracepoint};
use aya_ebpf::maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf};
use aya_ebpf::programs::{LsmContext, TracePointContext};
use aya_ebpf::EbpfContext;
use aya_log_ebpf::info;
use usher_ebpf_common::*;

#[map]
static SESSIONS: HashMap<u64, SessionPolicy> = HashMap::with_max_entries(4096, 0);

/// Files and directories named by the sessions' rules; the value is the rule's index.
#[map]
static RULES: HashMap<RuleKey, u32> = HashMap::with_max_entries(262_144, 0);

/// Files and directories whose execs wait for a person's approval, per session (the
/// value is the rule's index in the session's approval list).
#[map]
static APPROVE: HashMap<RuleKey, u32> = HashMap::with_max_entries(65_536, 0);

/// One-shot permits for approved execs, written by the agent just before it lets the
/// held exec go; the value is when the permit lapses (boot time, ns).
#[map]
static PERMITS: LruHashMap<PermitKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// The dynamic loader(s) of this host: running one directly names no program.
#[map]
static LOADERS: HashMap<FileKey, u32> = HashMap::with_max_entries(16, 0);

#[map]
static OFFSETS: Array<Offsets> = Array::with_max_entries(1, 0);

#[map]
static CONFIG: Array<u32> = Array::with_max_entries(4, 0);

/// Events the ring buffer had no room for, per CPU (no atomics needed).
#[map]
static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// What the programs learn about the file being executed.
struct Image {
    file: FileKey,
    parent: FileKey,
    nlink: u32,
}

/// # Safety
/// `T` must be valid for any bytes (integers, kernel pointers as `u64`): the probe read
/// copies whatever is at `base + offset`, and fails instead of faulting on a bad address.
#[inline(always)]
unsafe fn read<T>(base: u64, offset: u32) -> Option<T> {
    bpf_probe_read_kernel((base + offset as u64) as *const T).ok()
}

/// Device and inode of an inode pointer.
///
/// # Safety
/// Only probe reads (`read`) at the offsets the agent took from this kernel's BTF.
#[inline(always)]
unsafe fn file_key(o: &Offsets, inode: u64) -> Option<FileKey> {
    let ino: u64 = read(inode, o.inode_ino)?;
    let sb: u64 = read(inode, o.inode_sb)?;
    let dev: u32 = read(sb, o.sb_dev)?;
    Some(FileKey { dev, _pad: 0, ino })
}

/// The file behind a `struct file *`, and the directory it was opened through.
///
/// # Safety
/// Only probe reads (`read`) at the offsets the agent took from this kernel's BTF.
#[inline(always)]
unsafe fn image_of(o: &Offsets, file: u64) -> Option<Image> {
    let inode: u64 = read(file, o.file_inode)?;
    let key = file_key(o, inode)?;
    let nlink: u32 = read(inode, o.inode_nlink)?;
    let dentry: u64 = read(file, o.file_path_dentry)?;
    let parent_dentry: u64 = read(dentry, o.dentry_parent)?;
    let parent_inode: u64 = read(parent_dentry, o.dentry_inode)?;
    let parent = file_key(o, parent_inode).unwrap_or_default();
    Some(Image {
        file: key,
        parent,
        nlink,
    })
}

/// The verdict for `image` under `policy`, and the rule that decided it.
///
/// # Safety
/// Map values are copied as soon as they are looked up: the agent may change the maps at
/// any time, which only gives this exec the verdict of the policy before or after.
#[inline(always)]
unsafe fn decide(cgroup_id: u64, policy: &SessionPolicy, image: &Image) -> (bool, u32) {
    // A program held for approval runs only on the agent's permit, whatever the mode:
    // when the agent is gone, the exec fanotify would have held goes through and ends here.
    let mut approved = false;
    if policy.flags & FLAG_APPROVAL != 0 {
        let held = APPROVE
            .get(&RuleKey {
                cgroup_id,
                file: image.file,
            })
            .is_some()
            || APPROVE
                .get(&RuleKey {
                    cgroup_id,
                    file: image.parent,
                })
                .is_some();
        if held {
            if !take_permit(image.file) {
                return (false, RULE_APPROVAL);
            }
            approved = true;
        }
    }
    if policy.mode == MODE_AUDIT {
        return (true, RULE_NONE);
    }
    if policy.flags & FLAG_DENY_UNLINKED != 0 && image.nlink == 0 {
        return (false, RULE_UNLINKED);
    }
    if policy.flags & FLAG_DENY_LOADER != 0 && LOADERS.get(&image.file).is_some() {
        return (false, RULE_LOADER);
    }
    let by_file = RULES
        .get(&RuleKey {
            cgroup_id,
            file: image.file,
        })
        .copied();
    let by_dir = RULES
        .get(&RuleKey {
            cgroup_id,
            file: image.parent,
        })
        .copied();
    let hit = by_file.or(by_dir);
    if policy.mode == MODE_ALLOW {
        match hit {
            Some(_) => (true, RULE_NONE),
            // An approved program is allowed by its approval.
            None if approved => (true, RULE_NONE),
            None => (false, RULE_NOT_ALLOWED),
        }
    } else {
        match hit {
            Some(rule) => (false, rule),
            None => (true, RULE_NONE),
        }
    }
}

/// Consumes this process's permit for `file`, if it has one that has not lapsed.
///
/// # Safety
/// The permit's value is copied at once; the removal is the consumption (a permit is used
/// once even if two threads raced for it: only one removal succeeds).
#[inline(always)]
unsafe fn take_permit(file: FileKey) -> bool {
    let key = PermitKey {
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        _pad: 0,
        file,
    };
    let Some(until) = PERMITS.get(&key).copied() else {
        return false;
    };
    PERMITS.remove(&key).is_ok() && bpf_ktime_get_boot_ns() <= until
}

/// Writes one `ExecEvent` into the ring buffer (or counts it lost).
///
/// # Safety
/// `filename`, if given, points at the tracepoint record's NUL-terminated name (read with a
/// bounded probe read). Writes go only to the entry reserved here (sized for an ExecEvent,
/// ours until submitted) and to this CPU's `LOST` slot (per CPU: nothing else writes it
/// while this program runs).
#[inline(always)]
unsafe fn report(
    o: &Offsets,
    cgroup_id: u64,
    image: &Image,
    verdict: u32,
    rule: u32,
    filename: Option<(*const u8, usize)>,
) {
    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        if let Some(lost) = LOST.get_ptr_mut(0) {
            *lost += 1;
        }
        return;
    };
    let ev = entry.as_mut_ptr();
    let task = bpf_get_current_task();
    (*ev).boot_ns = bpf_ktime_get_boot_ns();
    (*ev).cgroup_id = cgroup_id;
    (*ev).ino = image.file.ino;
    (*ev).dev = image.file.dev;
    (*ev).nlink = image.nlink;
    (*ev).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
    (*ev).uid = bpf_get_current_uid_gid() as u32;
    (*ev).verdict = verdict;
    (*ev).rule = rule;
    (*ev).ppid = match read::<u64>(task, o.task_real_parent) {
        Some(parent) => read::<u32>(parent, o.task_tgid).unwrap_or(0),
        None => 0,
    };
    (*ev).filename[0] = 0;
    if let Some((ptr, _)) = filename {
        let _ = bpf_probe_read_kernel_str_bytes(ptr, &mut (*ev).filename);
    }
    (*ev).argv_len = 0;
    (*ev).argv[0] = 0;
    if let Some(mm) = read::<u64>(task, o.task_mm) {
        let start: u64 = read(mm, o.mm_arg_start).unwrap_or(0);
        let end: u64 = read(mm, o.mm_arg_end).unwrap_or(0);
        if end > start {
            let len = end - start;
            (*ev).argv_len = len as u32;
            if len >= ARGV_MAX as u64 {
                let _ = bpf_probe_read_user_buf(start as *const u8, &mut (*ev).argv);
            } else {
                let n = (len as usize) & (ARGV_MAX - 1);
                let _ = bpf_probe_read_user_buf(start as *const u8, &mut (&mut (*ev).argv)[..n]);
            }
        }
    }
    // Waking the agent for every exec of an exec storm costs more than the exec: wake it
    // at once for a block, otherwise only when a good amount has piled up (the agent also
    // drains the ring on a short timer).
    let wake =
        if verdict != VERDICT_ALLOWED || EVENTS.query(BPF_RB_AVAIL_DATA as u64) > WAKE_AT_BYTES {
            BPF_RB_FORCE_WAKEUP
        } else {
            BPF_RB_NO_WAKEUP
        };
    entry.submit(wake as u64);
}

const WAKE_AT_BYTES: u64 = 128 * 1024;

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    // SAFETY: the kernel runs this program with the sched_process_exec record as context.
    unsafe { on_exec(&ctx) }
}

/// # Safety
/// `ctx` is a sched_process_exec record: `filename` is its `__data_loc` field at offset 8,
/// whose offset and length stay within the record.
unsafe fn on_exec(ctx: &TracePointContext) -> u32 {
    let cgroup_id = bpf_get_current_cgroup_id();
    // Programs outside every session are not looked at further.
    let Some(policy) = SESSIONS.get(&cgroup_id) else {
        return 0;
    };
    let Some(o) = OFFSETS.get(0) else { return 0 };
    let task = bpf_get_current_task();
    let Some(mm) = read::<u64>(task, o.task_mm) else {
        return 0;
    };
    let Some(exe) = read::<u64>(mm, o.mm_exe_file) else {
        return 0;
    };
    let Some(image) = image_of(o, exe) else {
        return 0;
    };
    let (allowed, rule) = decide(cgroup_id, policy, &image);
    let lsm_active = CONFIG.get(CONFIG_LSM_ACTIVE).copied().unwrap_or(0) != 0;
    let verdict = if allowed || lsm_active {
        VERDICT_ALLOWED
    } else {
        // The new image has not run a single instruction of its own yet.
        bpf_send_signal(9);
        info!(
            ctx,
            "usher: killed pid {} in cgroup {} (rule {})",
            (bpf_get_current_pid_tgid() >> 32) as u32,
            cgroup_id,
            rule
        );
        VERDICT_KILLED
    };
    // The tracepoint record's `filename` is a __data_loc field at offset 8.
    let loc: u32 = ctx.read_at(8).unwrap_or(0);
    let name = (ctx.as_ptr() as *const u8).add((loc & 0xffff) as usize);
    report(
        o,
        cgroup_id,
        &image,
        verdict,
        rule,
        Some((name, (loc >> 16) as usize)),
    );
    0
}

#[lsm(hook = "bprm_check_security")]
pub fn bprm_check(ctx: LsmContext) -> i32 {
    // SAFETY: the kernel runs this program at bprm_check_security, whose first argument
    // is the `struct linux_binprm *`.
    unsafe { on_bprm_check(&ctx) }
}

/// # Safety
/// `ctx` is bprm_check_security's: argument 0 is the `struct linux_binprm *` (read only
/// through probe reads).
unsafe fn on_bprm_check(ctx: &LsmContext) -> i32 {
    let cgroup_id = bpf_get_current_cgroup_id();
    let Some(policy) = SESSIONS.get(&cgroup_id) else {
        return 0;
    };
    let Some(o) = OFFSETS.get(0) else { return 0 };
    let bprm: u64 = ctx.arg(0);
    let Some(file) = read::<u64>(bprm, o.binprm_file) else {
        return 0;
    };
    let Some(image) = image_of(o, file) else {
        return 0;
    };
    let (allowed, rule) = decide(cgroup_id, policy, &image);
    if allowed {
        return 0;
    }
    info!(
        ctx,
        "usher: refused an exec in cgroup {} (rule {})", cgroup_id, rule
    );
    report(o, cgroup_id, &image, VERDICT_DENIED, rule, None);
    -1 // -EPERM
}

/// Whether a file may be mapped executable in a session under `policy`: what the profile's
/// rules name decides as for an exec; in an allow list, shared libraries (files owned by
/// root that nobody else may write) are covered too, since every dynamic program maps them.
///
/// # Safety
/// As `decide`: map values are copied at once; `file` is read only through probe reads.
#[inline(always)]
unsafe fn decide_mapping(
    o: &Offsets,
    cgroup_id: u64,
    policy: &SessionPolicy,
    file: u64,
    image: &Image,
) -> (bool, u32) {
    if policy.flags & FLAG_DENY_UNLINKED != 0 && image.nlink == 0 {
        return (false, RULE_UNLINKED);
    }
    let by_file = RULES
        .get(&RuleKey {
            cgroup_id,
            file: image.file,
        })
        .copied();
    let by_dir = RULES
        .get(&RuleKey {
            cgroup_id,
            file: image.parent,
        })
        .copied();
    let hit = by_file.or(by_dir);
    if policy.mode == MODE_DENY {
        return match hit {
            Some(rule) => (false, rule),
            None => (true, RULE_NONE),
        };
    }
    if hit.is_some() {
        return (true, RULE_NONE);
    }
    let Some(inode) = read::<u64>(file, o.file_inode) else {
        return (false, RULE_MAP_EXEC);
    };
    let owner: u32 = read(inode, o.inode_uid).unwrap_or(u32::MAX);
    let mode: u16 = read(inode, o.inode_mode).unwrap_or(0o777);
    // Root's file, writable by root alone: a library the host installed.
    if owner == 0 && mode & 0o022 == 0 {
        (true, RULE_NONE)
    } else {
        (false, RULE_MAP_EXEC)
    }
}

/// The shared part of `mmap_file` and `file_mprotect`: 0 lets the mapping be, -EPERM refuses.
///
/// # Safety
/// `file` is a `struct file *` or 0, read only through probe reads.
#[inline(always)]
unsafe fn check_mapping(file: u64, prot: u64) -> i32 {
    // Anonymous memory and mappings that do not execute are not the policy's business.
    if file == 0 || prot & PROT_EXEC == 0 {
        return 0;
    }
    let cgroup_id = bpf_get_current_cgroup_id();
    let Some(policy) = SESSIONS.get(&cgroup_id) else {
        return 0;
    };
    if policy.mode == MODE_AUDIT {
        return 0;
    }
    let Some(o) = OFFSETS.get(0) else { return 0 };
    let Some(image) = image_of(o, file) else {
        return 0;
    };
    let (allowed, rule) = decide_mapping(o, cgroup_id, policy, file, &image);
    if allowed {
        return 0;
    }
    report(o, cgroup_id, &image, VERDICT_DENIED, rule, None);
    -1 // -EPERM
}

#[lsm(hook = "mmap_file")]
pub fn mmap_file(ctx: LsmContext) -> i32 {
    // mmap_file(struct file *file, unsigned long reqprot, unsigned long prot,
    //           unsigned long flags, int ret): an earlier refusal stands.
    let earlier: i32 = ctx.arg(4);
    if earlier != 0 {
        return earlier;
    }
    // SAFETY: arguments 0 (the file, or 0 for anonymous memory) and 2 (prot) as above.
    unsafe { check_mapping(ctx.arg(0), ctx.arg(2)) }
}

#[lsm(hook = "file_mprotect")]
pub fn file_mprotect(ctx: LsmContext) -> i32 {
    // file_mprotect(struct vm_area_struct *vma, unsigned long reqprot, unsigned long prot,
    //               int ret)
    let earlier: i32 = ctx.arg(3);
    if earlier != 0 {
        return earlier;
    }
    // SAFETY: argument 0 is the vma (read only through probe reads), argument 2 is prot;
    // the OFFSETS value is copied from the map at once.
    unsafe {
        let Some(o) = OFFSETS.get(0) else { return 0 };
        let vma: u64 = ctx.arg(0);
        let file: u64 = read(vma, o.vma_file).unwrap_or(0);
        check_mapping(file, ctx.arg(2))
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
