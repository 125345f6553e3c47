//! Synapse's answers to the guard's lookups (a room's limit, and its power levels and creators
//! when it is full), put where every request of the process finds them: the answer in the shared cache,
//! or, after a failure, the claim released and the stale answer, if any, returned.

use super::effects::CallKind;
use super::env::Env;
use super::limit_cache::{Answer, Cache, Lifetimes, Unasked, LIMITS, POWER_LEVELS};
use crate::request::text::clip;
use crate::upstream::call::CallError;
use crate::upstream::synapse::{self, Limit, PowerLevels};

/// Why a Synapse answer gave nothing fresh.
pub enum Settled<V> {
    /// The lookup failed, but the last answer seen is still within `stale_limit_seconds`.
    Stale(V, String),
    Failed(String),
}

/// A limit lookup's answer, settled.
pub fn limit(
    room: &str,
    status: Option<u32>,
    body: &[u8],
    env: &Env,
) -> Result<Limit, Settled<Limit>> {
    let parsed = synapse::parse_state_response(status, body, &env.config.limit_state_type);
    settle(&LIMITS, room, parsed, env)
}

/// A power-level lookup's answer, settled.
pub fn power_levels(
    room: &str,
    status: Option<u32>,
    body: &[u8],
    env: &Env,
) -> Result<PowerLevels, Settled<PowerLevels>> {
    let parsed = synapse::parse_power_levels(status, body, &env.config.limit_state_type);
    settle(&POWER_LEVELS, room, parsed, env)
}

/// A creators lookup's answer, settled (kept with the power levels, under [`creators_key`]).
pub fn creators(
    room: &str,
    status: Option<u32>,
    body: &[u8],
    env: &Env,
) -> Result<PowerLevels, Settled<PowerLevels>> {
    let parsed = synapse::parse_creators(status, body);
    settle(&POWER_LEVELS, &creators_key(room), parsed, env)
}

/// Where a room's creators are cached, next to its power levels.
pub fn creators_key(room: &str) -> String {
    format!("{room}\u{0}creators")
}

fn settle<V: Answer + Clone>(
    cache: &Cache<V>,
    room: &str,
    parsed: Result<V, CallError>,
    env: &Env,
) -> Result<V, Settled<V>> {
    let life = lifetimes(env);
    match parsed {
        Ok(answer) => {
            if let Err(e) = cache.store_answer(env.store, room, answer.clone(), env.now_ms(), life)
            {
                log::warn!("room {}: Synapse's answer not cached: {e}", clip(room));
            }
            Ok(answer)
        }
        Err(e) => match cache.release_claim(env.store, room, env.now_ms(), life, Unasked::Failed) {
            Ok(Some(stale)) => Err(Settled::Stale(stale, e.to_string())),
            Ok(None) => Err(Settled::Failed(e.to_string())),
            Err(store) => Err(Settled::Failed(format!("{e}; {store}"))),
        },
    }
}

fn lifetimes(env: &Env) -> Lifetimes {
    Lifetimes {
        ttl_ms: env.config.limit_cache_ttl.as_millis() as u64,
        stale_ms: env.config.stale_limit.as_millis() as u64,
    }
}

/// A room's limit lookup that will not be made, the process's budget being spent: gives back
/// its claim, so that the next request asks Synapse instead of waiting for an answer that
/// never comes, and returns the limit (or "no limit") seen within its stale window, if any,
/// to decide on instead.
pub fn limit_over_budget(room: &str, env: &Env) -> Option<Limit> {
    let life = lifetimes(env);
    match LIMITS.release_claim(env.store, room, env.now_ms(), life, Unasked::OverBudget) {
        Ok(stale) => stale,
        Err(e) => {
            log::warn!("room {}: lookup claim not released: {e}", clip(room));
            None
        }
    }
}

/// The answer to a lookup whose request has ended: it is cached all the same (or the claim
/// released), so that requests waiting for it, and later ones, need not ask again.
pub fn settle_orphaned(kind: &CallKind, status: Option<u32>, body: &[u8], env: &Env) {
    let (room, failure) = match kind {
        CallKind::LimitLookup(room) => (room, limit(room, status, body, env).err().map(reason)),
        CallKind::PowerLookup(room) => (
            room,
            power_levels(room, status, body, env).err().map(reason),
        ),
        CallKind::CreatorsLookup(room) => {
            (room, creators(room, status, body, env).err().map(reason))
        }
        CallKind::ListParticipants(_) | CallKind::Userinfo => return,
    };
    if let Some(failure) = failure {
        log::warn!(
            "room {}: Synapse lookup failed: {failure} (its request had ended)",
            clip(room)
        );
    }
}

fn reason<V>(settled: Settled<V>) -> String {
    match settled {
        Settled::Stale(_, reason) | Settled::Failed(reason) => reason,
    }
}
