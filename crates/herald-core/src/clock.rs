//! The wall clock the engine reads: publish times, `since=` and age cutoffs, token expiries, and
//! the first id of a fresh store. Ids never follow it backwards: every store counts on from the
//! last id it issued, and only a store with nothing issued yet starts from the clock. Debug builds
//! can shift it, for tests of a clock stepped backwards (`shift_for_tests`, which the `herald`
//! binary sets from `HERALD_TEST_CLOCK_OFFSET_MS` in debug builds only); release builds read the
//! system clock and nothing else.

use std::time::{SystemTime, UNIX_EPOCH};

#[cfg(debug_assertions)]
static SHIFT_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

#[cfg(test)]
thread_local! {
    /// A shift for the current thread only, so a unit test moves its own clock and no other's.
    static THREAD_SHIFT_MS: std::cell::Cell<i64> = const { std::cell::Cell::new(0) };
}

fn shift_ms() -> i64 {
    process_shift_ms().saturating_add(thread_shift_ms())
}

/// The shift set by [`shift_for_tests`]; always 0 in release builds.
fn process_shift_ms() -> i64 {
    #[cfg(debug_assertions)]
    return SHIFT_MS.load(std::sync::atomic::Ordering::Relaxed);
    #[cfg(not(debug_assertions))]
    0
}

/// The calling thread's own shift (unit tests only); 0 elsewhere.
fn thread_shift_ms() -> i64 {
    #[cfg(test)]
    return THREAD_SHIFT_MS.get();
    #[cfg(not(test))]
    0
}

/// Microseconds since the Unix epoch.
pub fn now_micros() -> u64 {
    let real = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros().min(u128::from(u64::MAX)) as u64)
        .unwrap_or(0);
    real.saturating_add_signed(shift_ms().saturating_mul(1000))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    now_micros() / 1000
}

/// Shifts this process's engine clock by `ms` (negative: backwards). Debug builds only: for tests
/// that step the wall clock without root.
#[cfg(debug_assertions)]
#[doc(hidden)]
pub fn shift_for_tests(ms: i64) {
    SHIFT_MS.store(ms, std::sync::atomic::Ordering::Relaxed);
}

/// Shifts the clock of the calling thread (a `#[tokio::test]` runs on one) by `ms` more, until the
/// returned guard is dropped.
#[cfg(test)]
pub(crate) fn step_this_thread(ms: i64) -> Stepped {
    THREAD_SHIFT_MS.set(THREAD_SHIFT_MS.get().saturating_add(ms));
    Stepped(ms)
}

/// Undoes a [`step_this_thread`] when dropped.
#[cfg(test)]
pub(crate) struct Stepped(i64);

#[cfg(test)]
impl Drop for Stepped {
    fn drop(&mut self) {
        THREAD_SHIFT_MS.set(THREAD_SHIFT_MS.get().saturating_sub(self.0));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_step_moves_this_threads_clock_only() {
        let before = now_ms();
        let step = step_this_thread(-3_600_000);
        let stepped = now_ms();
        let other = std::thread::spawn(now_ms).join().unwrap();
        drop(step);
        assert!(stepped + 3_500_000 < before, "{stepped} vs {before}");
        assert!(other >= before, "another thread keeps the real clock");
        assert!(now_ms() >= before, "the guard undoes the step");
    }
}
