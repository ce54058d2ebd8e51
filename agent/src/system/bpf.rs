//! What the eBPF programs write, read back as the shared `#[repr(C)]` types.

use usher_ebpf_common::ExecEvent;

/// The exec event in one ring buffer record, if the record is long enough to hold one.
pub fn exec_event(record: &[u8]) -> Option<ExecEvent> {
    if record.len() < std::mem::size_of::<ExecEvent>() {
        return None;
    }
    // SAFETY: the record holds at least size_of::<ExecEvent>() bytes (checked above), and
    // ExecEvent is `repr(C)` of integers and byte arrays without implicit padding, so any
    // bytes are a valid value. Ring records are not promised to be aligned: read unaligned.
    Some(unsafe { std::ptr::read_unaligned(record.as_ptr().cast::<ExecEvent>()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_record_holds_no_event() {
        let size = std::mem::size_of::<ExecEvent>();
        assert!(exec_event(&vec![0u8; size - 1]).is_none());
        let mut record = vec![0u8; size + 1];
        record[1..9].copy_from_slice(&42u64.to_ne_bytes());
        let event = exec_event(&record[1..]).unwrap();
        assert_eq!(event.boot_ns, 42);
    }
}
