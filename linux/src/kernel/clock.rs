//! The one clock cwreap reads: CLOCK_BOOTTIME, the clock BPF programs stamp events with
//! (`bpf_ktime_get_boot_ns`), so an age computed in user space and a state change seen in
//! the kernel compare directly. It keeps counting through a suspend, as a socket's time in
//! CLOSE_WAIT does.

use std::time::Duration;

/// A point on CLOCK_BOOTTIME: the time since boot.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Boottime(Duration);

impl Boottime {
    pub const fn from_nanos(ns: u64) -> Self {
        Boottime(Duration::from_nanos(ns))
    }

    pub const fn from_duration(since_boot: Duration) -> Self {
        Boottime(since_boot)
    }

    /// Nanoseconds since boot (saturating at u64::MAX, some 584 years).
    pub fn as_nanos(self) -> u64 {
        u64::try_from(self.0.as_nanos()).unwrap_or(u64::MAX)
    }

    pub const fn since_boot(self) -> Duration {
        self.0
    }

    /// How long after `earlier` this is; zero when `earlier` is later.
    pub fn saturating_since(self, earlier: Boottime) -> Duration {
        self.0.saturating_sub(earlier.0)
    }

    /// This point plus `d`, or None past the end of the clock.
    pub fn checked_add(self, d: Duration) -> Option<Boottime> {
        self.0.checked_add(d).map(Boottime)
    }

    /// This point minus `d`, at the earliest boot itself.
    pub fn saturating_sub(self, d: Duration) -> Boottime {
        Boottime(self.0.saturating_sub(d))
    }
}

/// Where "now" comes from: the real clock, or a test's.
pub trait Clock {
    fn now(&self) -> Boottime;
}

/// CLOCK_BOOTTIME itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Boottime {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Boottime);
        let secs = u64::try_from(t.tv_sec).unwrap_or(0);
        let nanos = u32::try_from(t.tv_nsec).unwrap_or(0);
        Boottime(Duration::new(secs, nanos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_saturates_instead_of_panicking() {
        let t = Boottime::from_nanos(5_000_000_000);
        assert_eq!(
            t.saturating_since(Boottime::from_nanos(2_000_000_000)),
            Duration::from_secs(3)
        );
        assert_eq!(Boottime::default().saturating_since(t), Duration::ZERO);
        assert_eq!(
            t.saturating_sub(Duration::from_secs(9)),
            Boottime::default()
        );
        assert_eq!(
            Boottime::from_duration(Duration::MAX).checked_add(Duration::from_secs(1)),
            None
        );
        assert_eq!(t.as_nanos(), 5_000_000_000);
    }

    #[test]
    fn the_system_clock_moves_forward() {
        let a = SystemClock.now();
        let b = SystemClock.now();
        assert!(b >= a);
        assert!(
            a > Boottime::default(),
            "the machine has been up for some time"
        );
    }
}
