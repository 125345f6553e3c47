//! What the admission needs from its surroundings at each step: the configuration, the shared
//! store, and a clock read at most once per step.

use crate::config::Config;
use crate::state::store::SharedStore;

/// What the admission needs from its surroundings at each step.
pub struct Env<'a> {
    pub config: &'a Config,
    pub store: &'a dyn SharedStore,
    /// Milliseconds since the Unix epoch, read at most once per step and only when needed
    /// (reading the host's clock is a host call).
    clock: &'a dyn Fn() -> u64,
    now: std::cell::Cell<Option<u64>>,
}

impl<'a> Env<'a> {
    pub fn new(config: &'a Config, store: &'a dyn SharedStore, clock: &'a dyn Fn() -> u64) -> Self {
        Env {
            config,
            store,
            clock,
            now: std::cell::Cell::new(None),
        }
    }

    /// An environment whose clock stands still at `now_ms`.
    pub fn at(config: &'a Config, store: &'a dyn SharedStore, now_ms: u64) -> Self {
        fn stopped() -> u64 {
            0
        }
        Env {
            config,
            store,
            clock: &stopped,
            now: std::cell::Cell::new(Some(now_ms)),
        }
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms(&self) -> u64 {
        match self.now.get() {
            Some(now) => now,
            None => {
                let now = (self.clock)();
                self.now.set(Some(now));
                now
            }
        }
    }
}
