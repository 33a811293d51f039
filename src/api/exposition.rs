//! The Prometheus exposition of `/api/v1/metrics`, rendered within a budget.
//!
//! The route answers without credentials and is exempt from the quotas by default, so a
//! scraper is never refused; but a rendering reads every series and makes a body of tens of
//! kilobytes, compressed afresh for every client that accepts gzip. Rendered on every ask,
//! one client asking back to back kept a core busy. So at most [`RENDERS_PER_SECOND`]
//! renderings are made a second, in bursts of up to [`RENDER_BURST`]; an ask beyond the
//! budget is answered with the latest rendering, at most about a sixteenth of a second old
//! while asks keep coming. Renderings are made one at a time, so the latest is always the
//! newest and counters never appear to go back; an ask arriving while another renders gets
//! the latest if it is that recent, else waits for the one being made. A scraper asking every
//! few seconds always gets a fresh one.
//!
//! The rendering is kept as a [`Representation`], so its compressed forms are made once each
//! and its strong ETag answers `If-None-Match`.

use std::num::NonZeroU32;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
use std::time::Duration;

use governor::clock::{Clock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use metrics_exporter_prometheus::PrometheusHandle;

use super::representation::representation;
use crate::middleware::compression::Representation;
use crate::middleware::rate_limit::TokioClock;

/// Renderings a second, sustained.
pub const RENDERS_PER_SECOND: NonZeroU32 = NonZeroU32::new(16).unwrap();

/// Renderings made back to back before the budget applies.
pub const RENDER_BURST: NonZeroU32 = NonZeroU32::new(32).unwrap();

/// How recent the latest rendering must be to answer an ask that arrives while another one is
/// being made: one rendering's share of a second of the budget.
const RECENT: Duration = Duration::from_nanos(1_000_000_000 / RENDERS_PER_SECOND.get() as u64);

/// The renderer of the exposition and the latest rendering.
pub struct Exposition<C: Clock = TokioClock> {
    handle: PrometheusHandle,
    clock: C,
    budget: RateLimiter<NotKeyed, InMemoryState, C, NoOpMiddleware<C::Instant>>,
    /// Held while rendering: one rendering at a time, each kept as the latest once made, so
    /// the latest is always the newest and counters never appear to go back.
    rendering: Mutex<()>,
    /// The latest rendering and when it was made.
    latest: Mutex<Option<(C::Instant, Arc<Representation>)>>,
}

impl Exposition {
    /// On tokio's clock, like the rate limiter, so tests with a paused clock count renderings.
    pub fn new(handle: PrometheusHandle) -> Self {
        Self::with_clock(handle, TokioClock)
    }
}

impl<C: Clock + Clone> Exposition<C> {
    pub fn with_clock(handle: PrometheusHandle, clock: C) -> Self {
        let quota = Quota::per_second(RENDERS_PER_SECOND).allow_burst(RENDER_BURST);
        Self {
            handle,
            budget: RateLimiter::direct_with_clock(quota, clock.clone()),
            clock,
            rendering: Mutex::new(()),
            latest: Mutex::new(None),
        }
    }

    /// A fresh rendering, after `settle` (which brings gauges up to date), while the budget
    /// allows; else the latest one. While another ask renders, the latest if it is recent,
    /// else the one being made.
    pub fn current(&self, settle: impl FnOnce()) -> Arc<Representation> {
        let _rendering = match self.rendering.try_lock() {
            Ok(guard) => guard,
            Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
            Err(TryLockError::WouldBlock) => {
                if let Some(recent) = self.recent() {
                    return recent;
                }
                let guard = lock(&self.rendering);
                // The rendering waited for is as recent as any this ask would make.
                if let Some(recent) = self.recent() {
                    return recent;
                }
                guard
            }
        };
        if self.budget.check().is_err() {
            if let Some((_, latest)) = lock(&self.latest).as_ref() {
                return latest.clone();
            }
        }
        settle();
        let rendering = Arc::new(representation(self.handle.render().into_bytes(), None));
        *lock(&self.latest) = Some((self.clock.now(), rendering.clone()));
        rendering
    }

    /// The latest rendering, if made within [`RECENT`].
    fn recent(&self) -> Option<Arc<Representation>> {
        let (made, latest) = lock(&self.latest).clone()?;
        (self.clock.now().duration_since(made) < RECENT.into()).then_some(latest)
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use governor::clock::FakeRelativeClock;
    use metrics_exporter_prometheus::PrometheusBuilder;

    use super::*;

    /// Asks `n` times; returns how many asks rendered afresh.
    fn ask(exposition: &Exposition<FakeRelativeClock>, n: u32) -> u32 {
        let mut rendered = 0;
        for _ in 0..n {
            exposition.current(|| rendered += 1);
        }
        rendered
    }

    #[test]
    fn renders_within_the_budget_and_serves_the_latest_beyond_it() {
        let clock = FakeRelativeClock::default();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let exposition = Exposition::with_clock(handle, clock.clone());

        let (burst, per_second) = (RENDER_BURST.get(), RENDERS_PER_SECOND.get());
        assert_eq!(ask(&exposition, burst + 10), burst);
        let latest = exposition.current(|| panic!("over budget, nothing is rendered"));
        assert!(Arc::ptr_eq(&latest, &exposition.current(|| {})));

        clock.advance(Duration::from_secs(1));
        assert_eq!(ask(&exposition, 100), per_second);
        clock.advance(Duration::from_secs(60));
        assert_eq!(ask(&exposition, 100), burst);
    }

    #[test]
    fn an_ask_while_another_renders_gets_the_latest_and_the_newer_one_is_kept() {
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let exposition = Exposition::with_clock(handle, FakeRelativeClock::default());
        let first = exposition.current(|| {});
        let mut during = None;
        let second = exposition.current(|| {
            during = Some(exposition.current(|| panic!("one rendering at a time")));
        });
        assert!(Arc::ptr_eq(&during.unwrap(), &first));
        assert!(Arc::ptr_eq(&exposition.recent().unwrap(), &second));
    }

    #[test]
    fn only_a_recent_rendering_stands_in_for_one_being_made() {
        let clock = FakeRelativeClock::default();
        let handle = PrometheusBuilder::new().build_recorder().handle();
        let exposition = Exposition::with_clock(handle, clock.clone());
        let made = exposition.current(|| {});
        clock.advance(RECENT / 2);
        assert!(Arc::ptr_eq(&exposition.recent().unwrap(), &made));
        clock.advance(RECENT);
        assert!(exposition.recent().is_none());
    }
}
