//! The clock the BPF programs stamp events with.

/// CLOCK_BOOTTIME now, in nanoseconds: the clock of `bpf_ktime_get_boot_ns`, so ages
/// computed against event timestamps and heartbeats count time spent suspended too, and
/// mean the same in every process of the machine (time namespaces aside).
pub fn boottime_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
    // Both fields are non-negative for CLOCK_BOOTTIME.
    u64::try_from(t.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    #[test]
    fn moves_forward() {
        let a = super::boottime_ns();
        let b = super::boottime_ns();
        assert!(a > 0 && b >= a);
    }
}
