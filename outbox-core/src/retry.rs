//! Exponential backoff with a cap and jitter.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// How long to wait before attempt `n + 1` after `n` failed attempts:
/// `min(cap, initial * multiplier^(n-1))`, then reduced by a random share of
/// up to `jitter` (0.0 = none, 1.0 = anywhere between zero and the full
/// delay) so that many failed messages do not retry in lockstep.
///
/// The relay stores the resulting time in the message's row, so the schedule
/// survives a restart.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth per further failure (at least 1.0).
    pub multiplier: f64,
    /// Longest delay.
    pub cap: Duration,
    /// Share of the delay taken off at random, 0.0 to 1.0.
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(500),
            multiplier: 2.0,
            cap: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl RetryPolicy {
    /// A policy with the given first delay, multiplier and cap, and the
    /// default jitter.
    pub fn exponential(initial: Duration, multiplier: f64, cap: Duration) -> Self {
        RetryPolicy {
            initial,
            multiplier,
            cap,
            ..Default::default()
        }
    }

    /// Sets the jitter share (clamped to 0.0..=1.0).
    pub fn with_jitter(mut self, jitter: f64) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay before the next attempt after `failed` failed attempts
    /// (`failed` >= 1), with jitter drawn from the thread's random source.
    pub fn delay(&self, failed: u32) -> Duration {
        self.delay_with(failed, fastrand::f64())
    }

    /// The same with the random share given (0.0..1.0), for reproducible use.
    pub fn delay_with(&self, failed: u32, random: f64) -> Duration {
        let base = self.ceiling(failed);
        let jitter = if self.jitter.is_finite() {
            self.jitter.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cut = base.as_secs_f64() * jitter * random.clamp(0.0, 1.0);
        base.saturating_sub(Duration::from_secs_f64(cut.max(0.0)))
    }

    /// The delay without jitter.
    pub fn ceiling(&self, failed: u32) -> Duration {
        let mult = if self.multiplier.is_finite() {
            self.multiplier.max(1.0)
        } else {
            1.0
        };
        let exp = failed.saturating_sub(1).min(1024) as i32;
        let secs = self.initial.as_secs_f64() * mult.powi(exp);
        if !secs.is_finite() || secs >= self.cap.as_secs_f64() {
            self.cap
        } else {
            Duration::from_secs_f64(secs.max(0.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_is_capped() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), 2.0, Duration::from_secs(1))
            .with_jitter(0.0);
        let d: Vec<_> = (1..=6).map(|n| p.delay(n).as_millis()).collect();
        assert_eq!(d, vec![100, 200, 400, 800, 1000, 1000]);
        assert_eq!(p.delay(u32::MAX), Duration::from_secs(1));
    }

    #[test]
    fn jitter_only_shortens_within_its_share() {
        let p = RetryPolicy::exponential(Duration::from_secs(1), 2.0, Duration::from_secs(60))
            .with_jitter(0.5);
        assert_eq!(p.delay_with(1, 0.0), Duration::from_secs(1));
        assert_eq!(p.delay_with(1, 1.0), Duration::from_millis(500));
        for _ in 0..100 {
            let d = p.delay(3);
            assert!(
                d >= Duration::from_secs(2) && d <= Duration::from_secs(4),
                "{d:?}"
            );
        }
    }
}
