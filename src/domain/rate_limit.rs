//! Request rate limits: the quota (`600/60s`), and the sliding window that enforces it, as a
//! weighted two-window counter.
//!
//! Time is cut into fixed windows of the quota's length, aligned on the Unix epoch. A key keeps
//! two numbers: the requests admitted in the current window and in the one before. At a moment
//! `elapsed` into the current window the requests in the sliding window ending now are estimated
//! as `previous * (window - elapsed) / window + current`: the previous window's count, weighted
//! by how much of it the sliding window still covers. A request is admitted when the estimate,
//! counting it, stays within the limit; refused requests are not counted, so a client that keeps
//! knocking is not locked out for longer than its own admitted traffic warrants.
//!
//! All arithmetic is on integer milliseconds, so the in-memory adapter and the SQL of the
//! Postgres adapter decide identically.

use std::fmt;
use std::time::Duration;

use super::validation::Rule;

/// The largest accepted limit.
pub const MAX_LIMIT: u64 = 1_000_000_000;
/// The longest accepted window, in seconds (one day).
pub const MAX_WINDOW_SECS: u64 = 86_400;

/// At most `limit` requests in any sliding window of `window`: written `600/60s` (units `s`,
/// `m`, `h`; 1 to 1,000,000,000 requests, 1 s to 24 h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RateLimit {
    limit: u64,
    window_ms: u64,
}

impl RateLimit {
    pub fn parse(raw: &str) -> Result<Self, Rule> {
        let shape = || Rule::new(format!("`{raw}` is not a rate limit like 600/60s"));
        let (count, window) = raw.trim().split_once('/').ok_or_else(shape)?;
        let limit: u64 = count.trim().parse().map_err(|_| shape())?;
        let window = window.trim();
        let unit_at = window
            .find(|c: char| !c.is_ascii_digit())
            .ok_or_else(shape)?;
        let (amount, unit) = window.split_at(unit_at);
        let amount: u64 = if amount.is_empty() {
            1
        } else {
            amount.parse().map_err(|_| shape())?
        };
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            _ => return Err(shape()),
        };
        let window_secs = amount.checked_mul(unit_secs).ok_or_else(shape)?;
        Self::new(limit, Duration::from_secs(window_secs))
    }

    pub fn new(limit: u64, window: Duration) -> Result<Self, Rule> {
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(Rule::new(format!(
                "the limit must be 1 to {MAX_LIMIT} requests"
            )));
        }
        let secs = window.as_secs();
        if window.subsec_nanos() != 0 || !(1..=MAX_WINDOW_SECS).contains(&secs) {
            return Err(Rule::new("the window must be whole seconds, 1 s to 24 h"));
        }
        Ok(Self {
            limit,
            window_ms: secs * 1000,
        })
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    pub fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms)
    }

    pub fn window_ms(&self) -> u64 {
        self.window_ms
    }

    /// The start (ms since the epoch) of the fixed window holding `now_ms`.
    pub fn window_start(&self, now_ms: i64) -> i64 {
        now_ms - now_ms.rem_euclid(self.window_ms as i64)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}s", self.limit, self.window_ms / 1000)
    }
}

impl std::str::FromStr for RateLimit {
    type Err = Rule;
    fn from_str(raw: &str) -> Result<Self, Rule> {
        Self::parse(raw)
    }
}

/// The stored state of one key's counter: requests admitted in the fixed window starting at
/// `window_start` (ms since the epoch) and in the window before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WindowCounts {
    pub window_start: i64,
    pub current: u64,
    pub previous: u64,
}

impl WindowCounts {
    /// The same counts seen from the window holding `now_ms`: a newer window starts empty, and
    /// the one before it becomes `previous` (or nothing, when it is further back).
    pub fn rolled(self, rate: RateLimit, now_ms: i64) -> Self {
        let start = rate.window_start(now_ms);
        let window = rate.window_ms as i64;
        if self.window_start >= start {
            self
        } else if self.window_start == start - window {
            Self {
                window_start: start,
                current: 0,
                previous: self.current,
            }
        } else {
            Self {
                window_start: start,
                current: 0,
                previous: 0,
            }
        }
    }

    /// Decides one request at `now_ms`: the counts afterwards (the request counted only when
    /// admitted) and what to tell the client.
    pub fn hit(self, rate: RateLimit, now_ms: i64) -> (Self, RateDecision) {
        let mut counts = self.rolled(rate, now_ms);
        let admitted = counts.admits_one(rate, now_ms);
        if admitted {
            counts.current += 1;
        }
        (counts, counts.decision(rate, now_ms, admitted))
    }

    /// Whether one more request fits: `previous * (window - elapsed) <= (limit - current - 1) *
    /// window`, the estimate with the request counted, kept within the limit.
    fn admits_one(&self, rate: RateLimit, now_ms: i64) -> bool {
        let window = u128::from(rate.window_ms);
        let Some(room) = rate.limit.checked_sub(self.current + 1) else {
            return false;
        };
        let elapsed = (now_ms - self.window_start).clamp(0, rate.window_ms as i64) as u128;
        u128::from(self.previous) * (window - elapsed) <= u128::from(room) * window
    }

    /// What a client is told after a request decided at `now_ms` left these counts (already
    /// rolled to `now_ms`'s window).
    pub fn decision(&self, rate: RateLimit, now_ms: i64, admitted: bool) -> RateDecision {
        let window = u128::from(rate.window_ms);
        let elapsed = (now_ms - self.window_start).clamp(0, rate.window_ms as i64) as u128;
        let used =
            u128::from(self.previous) * (window - elapsed) + u128::from(self.current) * window;
        let capacity = u128::from(rate.limit) * window;
        let remaining = (capacity.saturating_sub(used) / window) as u64;
        // Every counted request has left the sliding window: the current window's once the next
        // one ends, the previous window's once this one ends.
        let reset_ms = if self.current > 0 {
            2 * window - elapsed
        } else if self.previous > 0 {
            window - elapsed
        } else {
            0
        };
        RateDecision {
            admitted,
            rate,
            remaining,
            reset: Duration::from_millis(reset_ms as u64),
            retry_after: if admitted {
                Duration::ZERO
            } else {
                self.wait_for_room(rate, elapsed as u64)
            },
        }
    }

    /// How long until one more request fits, `elapsed` ms into the current window.
    fn wait_for_room(&self, rate: RateLimit, elapsed: u64) -> Duration {
        let window = rate.window_ms;
        // Within this window: the previous window's weight fades until
        // `previous * (window - t) <= room * window`.
        if let Some(room) = rate.limit.checked_sub(self.current + 1) {
            let at = first_time_within(self.previous, room, window);
            if at < window {
                return Duration::from_millis(at.saturating_sub(elapsed));
            }
        }
        // In the next window this window's count is the one fading, and nothing is current yet.
        let at = first_time_within(self.current, rate.limit - 1, window);
        Duration::from_millis(window - elapsed + at)
    }
}

/// The first `t` in `0..=window` (ms) with `weight * (window - t) <= room * window`.
fn first_time_within(weight: u64, room: u64, window: u64) -> u64 {
    if weight == 0 {
        return 0;
    }
    let allowed = u128::from(room) * u128::from(window) / u128::from(weight);
    window.saturating_sub(allowed.min(u128::from(window)) as u64)
}

/// The outcome of one request against a key's rate limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateDecision {
    pub admitted: bool,
    pub rate: RateLimit,
    /// Requests that would still be admitted right now.
    pub remaining: u64,
    /// Until every request counted so far has left the sliding window (the whole quota is back).
    pub reset: Duration,
    /// Until the next request would be admitted; zero when this one was.
    pub retry_after: Duration,
}

/// Milliseconds since the Unix epoch: the time scale of [`WindowCounts`].
pub fn epoch_ms(at: time::OffsetDateTime) -> i64 {
    (at.unix_timestamp_nanos() / 1_000_000) as i64
}

/// Whole seconds, rounded up: a client told to wait `n` seconds must not come back too early.
pub fn ceil_secs(duration: Duration) -> u64 {
    duration.as_secs() + u64::from(duration.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(raw: &str) -> RateLimit {
        RateLimit::parse(raw).unwrap()
    }

    /// Hits `n` times at `at`, returning how many were admitted.
    fn burst(counts: &mut WindowCounts, rate: RateLimit, at: i64, n: u64) -> u64 {
        let mut admitted = 0;
        for _ in 0..n {
            let (next, decision) = counts.hit(rate, at);
            *counts = next;
            admitted += u64::from(decision.admitted);
        }
        admitted
    }

    #[test]
    fn quotas_parse_in_the_runbook_form_and_print_back() {
        assert_eq!(rate("600/60s").limit(), 600);
        assert_eq!(rate("600/60s").window(), Duration::from_secs(60));
        assert_eq!(rate("10/1m").window(), Duration::from_secs(60));
        assert_eq!(rate("5000/h").window(), Duration::from_secs(3600));
        assert_eq!(rate(" 7 / 2s ").to_string(), "7/2s");
        assert_eq!(rate("10/1m").to_string(), "10/60s");
        for bad in [
            "",
            "600",
            "600/",
            "/60s",
            "0/60s",
            "600/0s",
            "600/60",
            "600/60d",
            "-1/60s",
            "1.5/60s",
            "600/25h",
            "1000000001/1s",
            "600/60 s",
        ] {
            assert!(RateLimit::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn exactly_the_limit_passes_in_one_window() {
        let rate = rate("5/60s");
        let mut counts = WindowCounts::default();
        assert_eq!(burst(&mut counts, rate, 1_000, 12), 5);
    }

    #[test]
    fn a_burst_at_the_boundary_of_two_fixed_windows_is_refused() {
        let rate = rate("10/60s");
        let mut counts = WindowCounts::default();
        // Ten at the last millisecond of one fixed window...
        assert_eq!(burst(&mut counts, rate, 59_999, 10), 10);
        // ...and a fixed-window counter would take ten more a millisecond later. Not this one.
        assert_eq!(burst(&mut counts, rate, 60_001, 10), 0);
        // Half-way through the next window, half of the previous burst has slid out.
        assert_eq!(burst(&mut counts, rate, 90_000, 10), 5);
        // Two windows on, everything has.
        assert_eq!(burst(&mut counts, rate, 180_000, 20), 10);
    }

    #[test]
    fn refused_requests_are_not_counted() {
        let rate = rate("2/10s");
        let mut counts = WindowCounts::default();
        assert_eq!(burst(&mut counts, rate, 0, 1000), 2);
        assert_eq!(counts.current, 2);
    }

    #[test]
    fn remaining_and_reset_describe_the_quota() {
        let rate = rate("10/60s");
        let (counts, first) = WindowCounts::default().hit(rate, 6_000);
        assert!(first.admitted);
        assert_eq!(first.remaining, 9);
        // The one request counted leaves the sliding window when the next fixed one ends.
        assert_eq!(first.reset, Duration::from_millis(2 * 60_000 - 6_000));
        let (_, next_window) = counts.hit(rate, 60_000 + 30_000);
        assert_eq!(
            next_window.remaining, 8,
            "half of the old request still weighs"
        );
    }

    #[test]
    fn retry_after_is_exactly_when_the_next_request_fits() {
        let rate = rate("10/60s");
        for (burst_at, refused_at) in [(59_999, 60_001), (0, 1), (30_000, 45_000), (0, 59_999)] {
            let mut counts = WindowCounts::default();
            burst(&mut counts, rate, burst_at, 10);
            let (after, refused) = counts.hit(rate, refused_at);
            assert!(!refused.admitted);
            let wait = refused.retry_after.as_millis() as i64;
            assert!(wait > 0);
            assert!(
                !after.hit(rate, refused_at + wait - 1).1.admitted,
                "too early at {burst_at}/{refused_at}"
            );
            assert!(
                after.hit(rate, refused_at + wait).1.admitted,
                "still refused at {burst_at}/{refused_at}"
            );
        }
    }

    #[test]
    fn a_limit_of_one_waits_for_the_whole_window_to_slide() {
        let rate = rate("1/10s");
        let (counts, _) = WindowCounts::default().hit(rate, 5_000);
        let (counts, refused) = counts.hit(rate, 5_000);
        assert!(!refused.admitted);
        // In the next window the one request still weighs until that window ends.
        assert_eq!(refused.retry_after, Duration::from_millis(15_000));
        assert!(counts.hit(rate, 20_000).1.admitted);
    }

    #[test]
    fn an_idle_key_starts_fresh() {
        let rate = rate("3/1s");
        let mut counts = WindowCounts::default();
        assert_eq!(burst(&mut counts, rate, 500, 3), 3);
        let rolled = counts.rolled(rate, 10_000);
        assert_eq!((rolled.current, rolled.previous), (0, 0));
        assert_eq!(ceil_secs(Duration::from_millis(1)), 1);
        assert_eq!(ceil_secs(Duration::from_secs(2)), 2);
    }

    #[test]
    fn huge_limits_and_windows_do_not_overflow() {
        let rate = RateLimit::new(MAX_LIMIT, Duration::from_secs(MAX_WINDOW_SECS)).unwrap();
        let counts = WindowCounts {
            window_start: 0,
            current: MAX_LIMIT - 1,
            previous: MAX_LIMIT,
        };
        let (_, decision) = counts.hit(rate, 1);
        assert!(!decision.admitted);
        assert!(decision.retry_after > Duration::ZERO);
    }
}
