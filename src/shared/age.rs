//! One age for every CLOSE_WAIT socket, for the command line, the daemon and `check`'s
//! scan line alike: the best lower bound cwreap knows, the upper bound the kernel gives,
//! and where the lower bound came from.
//!
//! The kernel keeps no timestamp of the peer's FIN, so unless an event source saw the state
//! change (`event`: exact), the age is a range:
//! - lower bounds: the time since the daemon first saw the socket in CLOSE_WAIT
//!   (`first_seen`), and tcp_info `last_ack_recv` (`last_ack`), which keepalive probes
//!   and heartbeats answered by the peer keep resetting;
//! - upper bound: tcp_info `last_data_recv`: neither probes nor the FIN reset it, and no
//!   data arrives after a FIN.
//!
//! Decisions (`--older-than`, `older_than`) are taken on the lower bound only: never reap
//! on an upper bound.

use std::time::Duration;

use serde::Serialize;

use cwreap_linux::kernel::Boottime;
use cwreap_linux::netlink::DiagSocket;

/// Where a socket's age (its lower bound) came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgeSource {
    /// Exact: the kernel's state change, seen by an event source.
    Event,
    /// At least the time since the daemon first saw the socket in CLOSE_WAIT.
    FirstSeen,
    /// At least the time since the peer's last ACK; keepalive probes and heartbeats reset it.
    LastAck,
}

impl AgeSource {
    pub fn as_str(self) -> &'static str {
        match self {
            AgeSource::Event => "event",
            AgeSource::FirstSeen => "first_seen",
            AgeSource::LastAck => "last_ack",
        }
    }
}

/// What is known about when one socket entered CLOSE_WAIT.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Clues {
    /// When an event source saw it enter CLOSE_WAIT.
    pub entered_at: Option<Boottime>,
    /// When the daemon first saw it in CLOSE_WAIT.
    pub first_seen: Option<Boottime>,
    pub last_ack_recv_ms: Option<u32>,
    pub last_data_recv_ms: Option<u32>,
    /// A keepalive timer is armed: probes reset `last_ack_recv`.
    pub keepalive: bool,
}

impl Clues {
    /// What sock_diag tells of a socket, with what the daemon or an event source knows.
    pub fn of(
        diag: &DiagSocket,
        entered_at: Option<Boottime>,
        first_seen: Option<Boottime>,
    ) -> Clues {
        Clues {
            entered_at,
            first_seen,
            last_ack_recv_ms: diag.last_ack_recv_ms,
            last_data_recv_ms: diag.last_data_recv_ms,
            keepalive: diag.keepalive,
        }
    }
}

/// A socket's time in CLOSE_WAIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Age {
    /// The best lower bound (exact for `event`).
    #[serde(rename = "age_ms")]
    pub min_ms: u64,
    /// The upper bound, when the kernel gives one.
    #[serde(rename = "age_max_ms")]
    pub max_ms: Option<u64>,
    #[serde(rename = "age_source")]
    pub source: AgeSource,
    /// Keepalive is armed: the lower bound may be reset by probes.
    #[serde(skip)]
    pub keepalive: bool,
}

/// `1h02m`, `3m05s`, `42s`, `850ms`.
pub fn human_age(ms: u64) -> String {
    let s = ms / 1000;
    if s == 0 {
        return format!("{ms}ms");
    }
    let (d, h, m, sec) = (s / 86_400, (s / 3600) % 24, (s / 60) % 60, s % 60);
    if d > 0 {
        format!("{d}d{h:02}h")
    } else if h > 0 {
        format!("{h}h{m:02}m")
    } else if m > 0 {
        format!("{m}m{sec:02}s")
    } else {
        format!("{sec}s")
    }
}

/// How far tcp_info's upper bound (jiffies) may fall below a lower bound read on
/// CLOCK_BOOTTIME and still be taken for the same instant: rounding and a stale jiffies
/// count under load, far from a wrap of the u32 milliseconds (~49.7 days).
const CLOCKS_APART_MS: u64 = 1_000;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The age of a socket with `clues`, at `now`.
pub fn age(c: &Clues, now: Boottime) -> Age {
    let upper = c.last_data_recv_ms.map(u64::from);
    if let Some(t) = c.entered_at {
        let exact = ms(now.saturating_since(t));
        return Age {
            min_ms: exact,
            max_ms: Some(exact),
            source: AgeSource::Event,
            keepalive: c.keepalive,
        };
    }
    let seen = c.first_seen.map(|t| ms(now.saturating_since(t)));
    let ack = c.last_ack_recv_ms.map(u64::from);
    let (min_ms, source) = match (seen, ack) {
        (Some(s), Some(a)) if a > s => (a, AgeSource::LastAck),
        (Some(s), _) => (s, AgeSource::FirstSeen),
        (None, a) => (a.unwrap_or(0), AgeSource::LastAck),
    };
    // tcp_info times are u32 ms and wrap after ~49.7 days: an upper bound far below the
    // lower one is no bound at all. One a little below it is still one: the daemon's first
    // sight is read on CLOCK_BOOTTIME and tcp_info counts jiffies, each rounded on its own
    // side, so a socket first seen within a few ms of its FIN can show last_data_recv a
    // little under its age; it is then as old as the lower bound says.
    let max_ms = upper.and_then(|u| match min_ms.checked_sub(u) {
        None | Some(0) => Some(u),
        Some(apart) if apart <= CLOCKS_APART_MS => Some(min_ms),
        Some(_) => None,
    });
    Age {
        min_ms,
        max_ms,
        source,
        keepalive: c.keepalive,
    }
}

impl Age {
    pub fn exact(&self) -> bool {
        self.source == AgeSource::Event
    }

    /// How far apart the bounds are (0 when exact or without an upper bound).
    pub fn spread_ms(&self) -> u64 {
        self.max_ms.map_or(0, |m| m.saturating_sub(self.min_ms))
    }

    /// Whether the socket may be `threshold` old without the lower bound showing it: the
    /// upper bound reaches it, the lower does not.
    pub fn might_reach(&self, threshold: Duration) -> bool {
        let t = ms(threshold);
        self.min_ms < t && self.max_ms.is_some_and(|m| m >= t)
    }

    /// For a table: the exact age, or the lower bound; a range `≥11s ≤26s` when the bounds
    /// are more than `resolution` apart. A `*` marks a lower bound keepalive may reset.
    pub fn display(&self, resolution: Duration) -> String {
        let star = if self.keepalive && !self.exact() {
            "*"
        } else {
            ""
        };
        if self.exact() {
            return human_age(self.min_ms);
        }
        match self.max_ms {
            Some(max) if max.saturating_sub(self.min_ms) > ms(resolution) => {
                format!("≥{} ≤{}{star}", human_age(self.min_ms), human_age(max))
            }
            _ => format!("{}{star}", human_age(self.min_ms)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Boottime {
        Boottime::from_duration(Duration::from_secs(s))
    }

    #[test]
    fn an_event_is_exact_whatever_tcp_info_says() {
        let c = Clues {
            entered_at: Some(at(100)),
            first_seen: Some(at(110)),
            last_ack_recv_ms: Some(2_000),
            last_data_recv_ms: Some(90_000),
            keepalive: true,
        };
        let a = age(&c, at(126));
        assert_eq!(
            (a.min_ms, a.max_ms, a.source),
            (26_000, Some(26_000), AgeSource::Event)
        );
        assert_eq!(
            a.display(Duration::from_secs(1)),
            "26s",
            "exact: no range, no star"
        );
    }

    #[test]
    fn the_larger_lower_bound_wins_and_names_its_source() {
        let seen_longer = Clues {
            first_seen: Some(at(100)),
            last_ack_recv_ms: Some(3_000),
            last_data_recv_ms: Some(40_000),
            ..Clues::default()
        };
        let a = age(&seen_longer, at(130));
        assert_eq!(
            (a.min_ms, a.max_ms, a.source),
            (30_000, Some(40_000), AgeSource::FirstSeen)
        );
        let ack_longer = Clues {
            first_seen: Some(at(125)),
            ..seen_longer
        };
        let a = age(&ack_longer, at(130));
        assert_eq!((a.min_ms, a.source), (5_000, AgeSource::FirstSeen));
        let ack_only = Clues {
            first_seen: None,
            last_ack_recv_ms: Some(11_000),
            last_data_recv_ms: Some(26_000),
            keepalive: true,
            ..Clues::default()
        };
        let a = age(&ack_only, at(130));
        assert_eq!(
            (a.min_ms, a.max_ms, a.source),
            (11_000, Some(26_000), AgeSource::LastAck)
        );
        assert_eq!(a.display(Duration::from_secs(1)), "≥11s ≤26s*");
        assert_eq!(
            a.display(Duration::from_secs(20)),
            "11s*",
            "bounds closer than asked"
        );
    }

    #[test]
    fn a_wrapped_upper_bound_is_dropped_and_nothing_known_is_zero() {
        let c = Clues {
            last_ack_recv_ms: Some(50_000),
            last_data_recv_ms: Some(10),
            ..Clues::default()
        };
        assert_eq!(age(&c, at(1)).max_ms, None);
        let none = age(&Clues::default(), at(1));
        assert_eq!(
            (none.min_ms, none.max_ms, none.source),
            (0, None, AgeSource::LastAck)
        );
    }

    #[test]
    fn an_upper_bound_a_little_under_first_sight_is_the_two_clocks_not_a_wrap() {
        // First seen 10.005 s ago on CLOCK_BOOTTIME; tcp_info (jiffies) says data last
        // came 10.000 s ago: the daemon saw the socket right after its FIN.
        let c = Clues {
            first_seen: Some(Boottime::from_duration(Duration::from_millis(100_000))),
            last_ack_recv_ms: Some(300),
            last_data_recv_ms: Some(10_000),
            ..Clues::default()
        };
        let now = Boottime::from_duration(Duration::from_millis(110_005));
        let a = age(&c, now);
        assert_eq!(
            (a.min_ms, a.max_ms, a.source),
            (10_005, Some(10_005), AgeSource::FirstSeen)
        );
        // Further apart than the clocks can be: a wrapped counter, no bound.
        let wrapped = Clues {
            last_data_recv_ms: Some(8_000),
            ..c
        };
        assert_eq!(age(&wrapped, now).max_ms, None);
    }

    #[test]
    fn might_reach_only_when_the_threshold_lies_between_the_bounds() {
        let a = Age {
            min_ms: 11_000,
            max_ms: Some(26_000),
            source: AgeSource::LastAck,
            keepalive: true,
        };
        assert!(a.might_reach(Duration::from_secs(20)));
        assert!(
            !a.might_reach(Duration::from_secs(10)),
            "already reached on the lower bound"
        );
        assert!(
            !a.might_reach(Duration::from_secs(30)),
            "beyond the upper bound"
        );
        assert_eq!(a.spread_ms(), 15_000);
    }

    #[test]
    fn json_fields_are_named_as_documented() {
        let a = Age {
            min_ms: 1,
            max_ms: None,
            source: AgeSource::FirstSeen,
            keepalive: false,
        };
        let v = serde_json::to_value(a).expect("json");
        assert_eq!(
            v,
            serde_json::json!({"age_ms": 1, "age_max_ms": null, "age_source": "first_seen"})
        );
    }
}
