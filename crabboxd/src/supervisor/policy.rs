//! Restart policy as data: when a task ends, restart it or not, and after how
//! long. The backoff math is a pure function so it can be property-tested.

use std::time::Duration;

/// What the supervisor does when a task's attempt ends.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RestartPolicy {
    /// Never restart: the first end, good or bad, is final.
    Never,
    /// Restart after a retryable error, with backoff; a clean return or a
    /// fatal error is final.
    OnFailure(Backoff),
    /// Restart after a retryable error or a clean return, with backoff; only
    /// a fatal error or cancellation is final.
    Always(Backoff),
}

impl RestartPolicy {
    /// The backoff to apply, if the policy restarts at all.
    pub fn backoff(&self) -> Option<&Backoff> {
        match self {
            RestartPolicy::Never => None,
            RestartPolicy::OnFailure(b) | RestartPolicy::Always(b) => Some(b),
        }
    }
}

/// Exponential backoff with jitter and a cap, reset after a healthy period.
///
/// The delay before restart number `n` (counting from 0 since the last
/// reset) is `min(max, initial * 2^n)`, then scaled by a random factor in
/// `[1 - jitter, 1]` so that many tasks failing together (a coordinator
/// restart) do not reconnect in lockstep. Jitter only ever shortens the delay,
/// so `max` is a true upper bound.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The first delay.
    pub initial: Duration,
    /// The largest delay.
    pub max: Duration,
    /// The fraction of the delay that is randomised, in `[0, 1]`.
    pub jitter: f64,
    /// A task that stays healthy this long has its attempt count reset, so a
    /// blip after an hour of service restarts quickly again.
    pub reset_after: Duration,
}

impl Backoff {
    /// The default for tasks that talk to the network: 250 ms doubling to
    /// 30 s, half of it jittered, reset after 30 s healthy. 30 s keeps a lease
    /// heartbeat (idle ≥ 15 s → interval ≥ 5 s) from missing more than a few
    /// beats while the coordinator restarts; rathole resets after 3 s, but our
    /// tasks do more work per connect (tickets, sessions) so we wait longer.
    pub const NETWORK: Backoff = Backoff {
        initial: Duration::from_millis(250),
        max: Duration::from_secs(30),
        jitter: 0.5,
        reset_after: Duration::from_secs(30),
    };

    /// The delay before restart number `attempt` (0-based since the last
    /// reset), given a uniform random `unit` in `[0, 1)`.
    pub fn delay(&self, attempt: u32, unit: f64) -> Duration {
        // 2^attempt overflows quickly; beyond 2^32 every delay is capped anyway.
        let factor = 2f64.powi(attempt.min(32) as i32);
        let base = self.initial.as_secs_f64() * factor;
        let capped = base.min(self.max.as_secs_f64());
        let jitter = self.jitter.clamp(0.0, 1.0);
        let unit = unit.clamp(0.0, 1.0);
        Duration::from_secs_f64(capped * (1.0 - jitter * unit))
    }

    /// The delay before restart number `attempt`, with fresh randomness.
    pub fn delay_random(&self, attempt: u32) -> Duration {
        self.delay(attempt, rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn backoff() -> impl Strategy<Value = Backoff> {
        (1u64..5_000, 1u64..600_000, 0.0f64..=1.0).prop_map(|(init, max, jitter)| Backoff {
            initial: Duration::from_millis(init),
            max: Duration::from_millis(max.max(init)),
            jitter,
            reset_after: Duration::from_secs(30),
        })
    }

    proptest! {
        #[test]
        fn delay_never_exceeds_max(b in backoff(), attempt in 0u32..10_000, unit in 0.0f64..1.0) {
            prop_assert!(b.delay(attempt, unit) <= b.max);
        }

        #[test]
        fn delay_never_below_jitter_floor(b in backoff(), attempt in 0u32..64, unit in 0.0f64..1.0) {
            let unjittered = b.delay(attempt, 0.0);
            let floor = unjittered.as_secs_f64() * (1.0 - b.jitter);
            prop_assert!(b.delay(attempt, unit).as_secs_f64() >= floor - 1e-9);
        }

        #[test]
        fn unjittered_delay_is_monotonic(b in backoff(), attempt in 0u32..64) {
            prop_assert!(b.delay(attempt, 0.0) <= b.delay(attempt + 1, 0.0));
        }

        #[test]
        fn first_delay_is_initial(b in backoff()) {
            prop_assert_eq!(b.delay(0, 0.0), b.initial.min(b.max));
        }
    }

    #[test]
    fn reaches_the_cap() {
        let b = Backoff::NETWORK;
        assert_eq!(b.delay(100, 0.0), b.max);
        assert_eq!(b.delay(u32::MAX, 0.0), b.max);
    }
}
