//! When a process runs out of fds: one estimator for `explain`'s forecast, the daemon's
//! `*_before_emfile` escalations and its forecast gauge. The estimate is the net growth of
//! the process's open fds over a window, carried forward to its soft RLIMIT_NOFILE.

use std::collections::VecDeque;
use std::time::Duration;

use cwreap_linux::kernel::Boottime;

/// Open fds of one process in the first and last samples that saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdTrend {
    pub first: usize,
    pub last: usize,
    /// Time between those two samples.
    pub span: Duration,
}

impl FdTrend {
    /// Net growth in fds per second; None without growth or without a span.
    pub fn per_s(&self) -> Option<f64> {
        let secs = self.span.as_secs_f64();
        (self.last > self.first && secs > 0.0).then(|| (self.last - self.first) as f64 / secs)
    }
}

/// Seconds until the open fds reach the soft limit at the net growth measured; unknown
/// without growth, without a limit, or from a single sample. 0 when already there.
pub fn emfile_in_s(fds: &FdTrend, limit: Option<u64>) -> Option<f64> {
    let limit = limit?;
    let per_s = fds.per_s()?;
    let left = limit.saturating_sub(fds.last as u64);
    Some(left as f64 / per_s)
}

/// The daemon's samples of one process's open fds, one per cycle, over the last
/// [`FdHistory::WINDOW`]: the window `explain` samples for by default.
#[derive(Debug, Clone, Default)]
pub struct FdHistory {
    samples: VecDeque<(Boottime, usize)>,
}

impl FdHistory {
    /// How far back the growth is measured.
    pub const WINDOW: Duration = Duration::from_secs(60);

    /// Add this cycle's count; samples older than the window (from `at`) are dropped, but
    /// the newest of those stays as the window's start.
    pub fn push(&mut self, at: Boottime, open: usize) {
        self.samples.push_back((at, open));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|(t, _)| at.saturating_since(*t) >= Self::WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The trend over the samples kept; None with fewer than two.
    pub fn trend(&self) -> Option<FdTrend> {
        let (&(t0, first), &(t1, last)) = (self.samples.front()?, self.samples.back()?);
        (self.samples.len() >= 2).then(|| FdTrend {
            first,
            last,
            span: t1.saturating_since(t0),
        })
    }

    /// Seconds until EMFILE at the measured growth (see [`emfile_in_s`]).
    pub fn emfile_in_s(&self, limit: Option<u64>) -> Option<f64> {
        emfile_in_s(&self.trend()?, limit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grow(first: usize, last: usize, secs: u64) -> FdTrend {
        FdTrend {
            first,
            last,
            span: Duration::from_secs(secs),
        }
    }

    #[test]
    fn the_history_keeps_a_minute_and_measures_over_it() {
        let mut h = FdHistory::default();
        let at = |s: u64| Boottime::from_nanos(s * 1_000_000_000);
        h.push(at(0), 100);
        assert_eq!(h.trend(), None, "one sample");
        assert_eq!(h.emfile_in_s(Some(256)), None);
        // 5 fds/s for 30 s, sampled every 5 s.
        for i in 1..=6 {
            h.push(at(i * 5), 100 + 25 * i as usize);
        }
        assert_eq!(h.trend(), Some(grow(100, 250, 30)));
        assert_eq!(h.emfile_in_s(Some(256)), Some(6.0 / 5.0));
        // Two minutes on: only the last minute (and the sample that starts it) counts.
        for i in 7..=30 {
            h.push(at(i * 5), 250);
        }
        let t = h.trend().expect("trend");
        assert_eq!((t.first, t.last), (250, 250));
        assert!(t.span >= FdHistory::WINDOW, "{t:?}");
        assert!(t.span < FdHistory::WINDOW + Duration::from_secs(5), "{t:?}");
        assert_eq!(h.emfile_in_s(Some(256)), None, "flat now");
    }
}
