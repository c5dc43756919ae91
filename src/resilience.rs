//! A circuit breaker: after `failure_threshold` consecutive failures of a backend, calls fail
//! fast for `open_for`; then one probe call is let through, and its result closes the breaker
//! or opens it again. It keeps a struggling backend (the Kubernetes API) from being hammered
//! and callers from waiting on timeouts they could have been spared. Beside it, [`retry`]:
//! the one loop that repeats a call worth repeating, under a [`RetryPolicy`] (how long to wait
//! between tries, [`Backoff`], and when to give up), and [`finish_within`], the one wait for a
//! set of tasks at shutdown.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::ports::{CircuitMetrics, CircuitState};

#[derive(Debug, Clone, Copy)]
pub struct BreakerSettings {
    pub failure_threshold: u32,
    pub open_for: Duration,
}

/// Exponential waits between tries: `first`, then doubling, never more than `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The wait after the `failures`-th failed try (1 for the first).
    pub fn delay(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.first.saturating_mul(1 << doublings).min(self.max)
    }
}

/// How a failing call is repeated: the waits between tries, and when to stop trying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    pub backoff: Backoff,
    /// At most this many tries in all.
    pub tries: Option<u32>,
    /// No new try once this long has passed since the first.
    pub for_at_most: Option<Duration>,
}

impl RetryPolicy {
    /// Whether another try may follow `failures` failed ones, `elapsed` after the first began.
    pub fn tries_again(&self, failures: u32, elapsed: Duration) -> bool {
        self.tries.is_none_or(|tries| failures < tries)
            && self.for_at_most.is_none_or(|limit| elapsed < limit)
    }
}

/// Calls `op` until it succeeds, `policy` gives up, or `worth_retrying` (told each error and
/// how many tries failed so far; it is where a caller logs) says not to; returns the last
/// result.
pub async fn retry<T, E, Op, Fut>(
    policy: RetryPolicy,
    mut op: Op,
    mut worth_retrying: impl FnMut(&E, u32) -> bool,
) -> Result<T, E>
where
    Op: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let started = tokio::time::Instant::now();
    let mut failures = 0;
    loop {
        let error = match op().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        failures += 1;
        if !policy.tries_again(failures, started.elapsed()) || !worth_retrying(&error, failures) {
            return Err(error);
        }
        tokio::time::sleep(policy.backoff.delay(failures)).await;
    }
}

/// Waits up to `within` for every task in `tasks` to end; says whether they all did. What
/// becomes of the rest (stopped, or aborted) is the caller's to decide.
pub async fn finish_within(tasks: &mut tokio::task::JoinSet<()>, within: Duration) -> bool {
    tokio::time::timeout(within, async { while tasks.join_next().await.is_some() {} })
        .await
        .is_ok()
}

/// A call refused because the breaker is open.
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "the {target} circuit breaker is open after repeated failures; calls fail fast for another {retry_in_secs} s"
)]
pub struct CircuitOpen {
    pub target: &'static str,
    pub retry_in_secs: u64,
}

/// The result of a guarded call: refused by the breaker, or the call's own error.
#[derive(Debug, thiserror::Error)]
pub enum Guarded<E> {
    #[error(transparent)]
    Open(CircuitOpen),
    #[error(transparent)]
    Failed(E),
}

#[derive(Debug)]
struct State {
    consecutive_failures: u32,
    /// Set while open: when the next probe may go.
    open_until: Option<Instant>,
    /// A probe is in flight since then; others still fail fast.
    probe_since: Option<Instant>,
}

pub struct CircuitBreaker {
    target: &'static str,
    settings: BreakerSettings,
    state: Mutex<State>,
    metrics: Arc<dyn CircuitMetrics>,
}

impl CircuitBreaker {
    /// `target` names the backend in messages and in the metric label (a small fixed set).
    pub fn new(
        target: &'static str,
        settings: BreakerSettings,
        metrics: Arc<dyn CircuitMetrics>,
    ) -> Self {
        metrics.circuit_state(target, CircuitState::Closed);
        Self {
            target,
            settings,
            state: Mutex::new(State {
                consecutive_failures: 0,
                open_until: None,
                probe_since: None,
            }),
            metrics,
        }
    }

    pub fn state(&self) -> CircuitState {
        let state = self.state.lock().expect("breaker lock");
        match state.open_until {
            None => CircuitState::Closed,
            Some(until) if Instant::now() < until => CircuitState::Open,
            Some(_) => CircuitState::HalfOpen,
        }
    }

    /// Runs `call` unless the breaker is open; `is_failure` says which errors count against
    /// the backend (a 404 is an answer, a 503 or a refused connection is not).
    pub async fn call<T, E>(
        &self,
        is_failure: impl FnOnce(&E) -> bool,
        call: impl Future<Output = Result<T, E>>,
    ) -> Result<T, Guarded<E>> {
        self.admit().map_err(Guarded::Open)?;
        match call.await {
            Ok(value) => {
                self.record(true);
                Ok(value)
            }
            Err(error) => {
                self.record(!is_failure(&error));
                Err(Guarded::Failed(error))
            }
        }
    }

    fn admit(&self) -> Result<(), CircuitOpen> {
        let mut state = self.state.lock().expect("breaker lock");
        let Some(until) = state.open_until else {
            return Ok(());
        };
        let now = Instant::now();
        // A probe whose caller went away never reports; after another open period, the next
        // caller probes instead.
        let probe_stale = state
            .probe_since
            .is_some_and(|since| now.duration_since(since) >= self.settings.open_for);
        if now >= until && (state.probe_since.is_none() || probe_stale) {
            state.probe_since = Some(now);
            self.metrics
                .circuit_state(self.target, CircuitState::HalfOpen);
            return Ok(());
        }
        Err(CircuitOpen {
            target: self.target,
            retry_in_secs: until.saturating_duration_since(now).as_secs().max(1),
        })
    }

    fn record(&self, success: bool) {
        let mut state = self.state.lock().expect("breaker lock");
        if success {
            let was_open = state.open_until.is_some();
            *state = State {
                consecutive_failures: 0,
                open_until: None,
                probe_since: None,
            };
            if was_open {
                tracing::info!(breaker = self.target, "circuit breaker closed");
                self.metrics
                    .circuit_state(self.target, CircuitState::Closed);
            }
            return;
        }
        state.consecutive_failures = state.consecutive_failures.saturating_add(1);
        let probe_failed = state.probe_since.is_some();
        if probe_failed || state.consecutive_failures >= self.settings.failure_threshold {
            state.open_until = Some(Instant::now() + self.settings.open_for);
            state.probe_since = None;
            tracing::warn!(
                breaker = self.target,
                failures = state.consecutive_failures,
                "circuit breaker open"
            );
            self.metrics.circuit_state(self.target, CircuitState::Open);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<CircuitState>>);

    impl CircuitMetrics for Recorded {
        fn circuit_state(&self, _target: &'static str, state: CircuitState) {
            self.0.lock().unwrap().push(state);
        }
    }

    fn breaker(open_for: Duration) -> (CircuitBreaker, Arc<Recorded>) {
        let metrics = Arc::new(Recorded::default());
        let breaker = CircuitBreaker::new(
            "test backend",
            BreakerSettings {
                failure_threshold: 3,
                open_for,
            },
            metrics.clone(),
        );
        (breaker, metrics)
    }

    async fn fail(breaker: &CircuitBreaker) -> Result<(), Guarded<&'static str>> {
        breaker.call(|_| true, async { Err("down") }).await
    }

    async fn succeed(breaker: &CircuitBreaker) -> Result<(), Guarded<&'static str>> {
        breaker.call(|_| true, async { Ok(()) }).await
    }

    #[tokio::test]
    async fn consecutive_failures_open_it_and_calls_then_fail_fast() {
        let (breaker, _) = breaker(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(matches!(fail(&breaker).await, Err(Guarded::Failed("down"))));
        }
        assert_eq!(breaker.state(), CircuitState::Open);
        let mut ran = false;
        let refused = breaker
            .call(|_: &&str| true, async {
                ran = true;
                Ok(())
            })
            .await;
        assert!(matches!(refused, Err(Guarded::Open(_))));
        assert!(!ran, "an open breaker does not run the call");
    }

    #[tokio::test]
    async fn a_success_resets_the_count_and_answers_that_are_not_failures_do_not_count() {
        let (breaker, _) = breaker(Duration::from_secs(60));
        fail(&breaker).await.unwrap_err();
        fail(&breaker).await.unwrap_err();
        succeed(&breaker).await.unwrap();
        fail(&breaker).await.unwrap_err();
        for _ in 0..5 {
            let _ = breaker
                .call(|_: &&str| false, async { Err::<(), _>("not found") })
                .await;
        }
        assert_eq!(breaker.state(), CircuitState::Closed);
    }

    #[tokio::test]
    async fn a_half_open_probe_closes_it_or_opens_it_again() {
        let (breaker, metrics) = breaker(Duration::from_millis(50));
        for _ in 0..3 {
            fail(&breaker).await.unwrap_err();
        }
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(breaker.state(), CircuitState::HalfOpen);
        fail(&breaker).await.unwrap_err();
        assert_eq!(
            breaker.state(),
            CircuitState::Open,
            "a failed probe reopens at once"
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        succeed(&breaker).await.unwrap();
        assert_eq!(breaker.state(), CircuitState::Closed);
        use CircuitState::*;
        assert_eq!(
            *metrics.0.lock().unwrap(),
            [Closed, Open, HalfOpen, Open, HalfOpen, Closed]
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let backoff = Backoff {
            first: Duration::from_millis(500),
            max: Duration::from_secs(5),
        };
        let delays: Vec<u64> = (1..=6)
            .map(|n| backoff.delay(n).as_millis() as u64)
            .collect();
        assert_eq!(delays, [500, 1000, 2000, 4000, 5000, 5000]);
        assert_eq!(backoff.delay(u32::MAX), Duration::from_secs(5));
    }

    #[tokio::test]
    async fn retry_stops_at_success_at_its_limit_or_when_told() {
        let policy = RetryPolicy {
            backoff: Backoff {
                first: Duration::from_millis(10),
                max: Duration::from_millis(40),
            },
            tries: Some(5),
            for_at_most: None,
        };
        let calls = std::cell::Cell::new(0);
        let succeeds_third = retry(
            policy,
            || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move { if n < 3 { Err(n) } else { Ok(n) } }
            },
            |_, _| true,
        )
        .await;
        assert_eq!((succeeds_third, calls.get()), (Ok(3), 3));
        calls.set(0);
        let started = tokio::time::Instant::now();
        let never: Result<(), u32> = retry(
            policy,
            || {
                calls.set(calls.get() + 1);
                async { Err(0) }
            },
            |_, _| true,
        )
        .await;
        assert!(never.is_err());
        assert_eq!(calls.get(), 5, "five tries in all");
        assert!(
            started.elapsed() >= Duration::from_millis(10 + 20 + 40 + 40),
            "waits back off to their ceiling: {:?}",
            started.elapsed()
        );
        calls.set(0);
        let refused: Result<(), &str> = retry(
            policy,
            || {
                calls.set(calls.get() + 1);
                async { Err("fatal") }
            },
            |error, _| *error != "fatal",
        )
        .await;
        assert_eq!((refused, calls.get()), (Err("fatal"), 1));
        let timed = RetryPolicy {
            tries: None,
            for_at_most: Some(Duration::from_millis(250)),
            ..policy
        };
        assert!(timed.tries_again(3, Duration::from_millis(200)));
        assert!(!timed.tries_again(3, Duration::from_millis(250)));
    }
}
