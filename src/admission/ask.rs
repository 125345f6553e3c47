//! Asking Synapse and LiveKit: the limit (cache, budget, lookup), and who is in the LiveKit
//! room (the view or cached list first, LiveKit otherwise).

use super::*;

impl Admission {
    /// The room's limit: none for an id no Matrix room can have, else from the shared cache
    /// or Synapse (and, once known, LiveKit is asked early).
    pub(super) fn find_limit(&mut self, env: &Env, effects: &mut Vec<Effect>) {
        let room = self.room().to_owned();
        if !is_possible_room_id(&room) {
            // No Matrix room has such an id, so none has a limit: no lookup for it.
            log::debug!(
                "room {}: not a Matrix room id; no limit applies",
                clip(&room)
            );
            self.limit = Lookup::Known(Limit::None);
            return;
        }
        let cfg = env.config;
        let cached = if cfg.limit_cache_ttl.is_zero() {
            Ok(Cached::Claimed)
        } else {
            let pending_ms = cfg.synapse.upstream.timeout.as_millis() as u64;
            limit_cache::LIMITS.read_or_claim(env.store, &room, env.now_ms(), pending_ms)
        };
        match cached {
            Ok(Cached::Known(limit)) => {
                effects.push(Effect::Count(Counter::LimitCacheHits));
                self.limit = Lookup::Known(limit);
                self.ask_livekit_early(env, effects);
            }
            Ok(Cached::Pending) => self.limit = Lookup::AskedByOther,
            Ok(Cached::Claimed) | Err(_) => self.ask_synapse(env, effects),
        }
    }

    pub(super) fn on_limit_answer(
        &mut self,
        status: Option<u32>,
        body: &[u8],
        env: &Env,
        effects: &mut Vec<Effect>,
    ) {
        let room = self.room().to_owned();
        let limit = match lookup::limit(&room, status, body, env) {
            Ok(limit) => limit,
            Err(Settled::Stale(limit, reason)) => {
                log::warn!(
                    "room {}: limit lookup failed: {reason}; enforcing the last limit seen",
                    clip(&room)
                );
                effects.push(Effect::Count(Counter::StaleLimits));
                limit
            }
            Err(Settled::Failed(reason)) => {
                self.limit = Lookup::Failed(reason);
                return;
            }
        };
        self.limit = Lookup::Known(limit);
        if matches!(self.stage, Stage::Waiting | Stage::Deciding(_)) {
            self.ask_livekit_early(env, effects);
        }
    }

    pub(super) fn ask_synapse(&mut self, env: &Env, effects: &mut Vec<Effect>) {
        let cfg = env.config;
        let room = self.room().to_owned();
        if !budget::take(env.store, cfg.synapse.max_lookups_per_second, env.now_ms()) {
            self.over_budget(&room, env, effects);
            return;
        }
        let request = synapse::state_request(
            &room,
            &cfg.limit_state_type,
            cfg.synapse.admin_token.expose(),
        );
        effects.push(Effect::Count(Counter::SynapseLookups));
        effects.push(Effect::Dispatch(call(
            CallKind::LimitLookup(room),
            &cfg.synapse.upstream,
            request,
        )));
        self.limit = Lookup::Asking;
    }

    /// The process's lookup budget is spent: the claim on the room's lookup is given back (the
    /// next request may ask). A limit, or "no limit", seen within `stale_limit_seconds`
    /// decides, as it would through a Synapse outage: a flood of new room ids never locks out
    /// a room the guard knows. A room not seen (or seen longer ago) is refused for now, 429:
    /// neither let through (a flood of room ids would then lift every uncached limit) nor
    /// counted as a full room.
    pub(super) fn over_budget(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
        let per_second = env.config.synapse.max_lookups_per_second;
        if let Some(limit) = lookup::limit_over_budget(room, env) {
            log::debug!(
                "room {}: {per_second} limit lookups a second already spent; deciding on the \
                 limit seen last",
                clip(room)
            );
            effects.push(Effect::Count(Counter::StaleOverBudget));
            self.limit = Lookup::Known(limit);
            if matches!(self.stage, Stage::Waiting | Stage::Deciding(_)) {
                self.ask_livekit_early(env, effects);
            }
            return;
        }
        self.stage = Stage::Done;
        log::info!(
            "room {}: {per_second} limit lookups a second already spent; token refused for now \
             (429)",
            clip(room)
        );
        effects.extend([
            Effect::Count(Counter::LookupsOverBudget),
            Effect::Reply(reply::lookups_exhausted()),
        ]);
    }

    /// Asks LiveKit under the alias lk-jwt-service 0.4.3+ derives, before the token exists.
    pub(super) fn ask_livekit_early(&mut self, env: &Env, effects: &mut Vec<Effect>) {
        let (Some(Ok(request)), Lookup::Known(Limit::MaxUsers(..)), None) =
            (&self.request, &self.limit, &self.participants)
        else {
            return;
        };
        let alias = room_alias(&request.room, request.slot());
        self.ask_livekit(&alias, env, effects);
    }

    /// Finds who is in `room`. With `participants_cache_ms` or webhooks, the room's view or
    /// cached list is tried first, when deciding (one read of the room's record serves both);
    /// LiveKit is asked only if neither serves.
    pub(super) fn ask_livekit(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
        if env.config.participants_cache.is_zero() && env.config.webhooks.is_none() {
            self.ask_livekit_now(room, env, effects);
        } else {
            self.participants = Some((room.to_owned(), ParticipantState::Cached));
        }
    }

    pub(super) fn ask_livekit_now(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
        if env.config.webhooks.is_some() {
            // Events arriving while the list is on its way are kept for it.
            if let Err(e) = presence::open(env.store, room, env.now_ms()) {
                log::debug!("room view not opened for LiveKit room {}: {e}", clip(room));
            }
        }
        let cfg = &env.config.livekit;
        let request = livekit::list_request(
            room,
            cfg.api_key.expose(),
            cfg.api_secret.expose(),
            env.now_ms() / 1000,
        );
        effects.push(Effect::Count(Counter::LivekitLookups));
        effects.push(Effect::Dispatch(call(
            CallKind::ListParticipants(room.to_owned()),
            &cfg.upstream,
            request,
        )));
        self.participants = Some((room.to_owned(), ParticipantState::Asking(env.now_ms())));
    }
}
