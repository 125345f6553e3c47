//! Step 4, the decision: the room's occupancy decides, a full room's moderators may come in
//! (power levels and creators, looked up only then), and a refusal becomes its answer.

use super::*;

impl Admission {
    pub(super) fn decide(
        &mut self,
        matrix_room: &str,
        subject: &Subject,
        max_users: u32,
        participants: occupancy::Participants,
        env: &Env,
    ) -> Vec<Effect> {
        let requester = subject.requester.as_str();
        let verify_ms = env
            .config
            .webhooks
            .as_ref()
            .map_or(0, |w| w.verify.as_millis() as u64);
        let mut question = occupancy::Request {
            room: &subject.room,
            max_users,
            participants,
            requester,
            identity: &subject.identity,
            reservation_ms: env.config.reservation.as_millis() as u64,
            list_cache_ms: env.config.participants_cache.as_millis() as u64,
            verify_ms,
            doubt_ms: if verify_ms > 0 {
                view::untrusted_before(env.store, env.now_ms())
            } else {
                0
            },
            now_ms: env.now_ms(),
            releasable: self.on_request,
            exempt: false,
            unverified: subject.unverified,
        };
        let mut verdict = match self.admit(&question, env) {
            Ok(verdict) => verdict,
            Err(effects) => return effects,
        };
        let mut effects = Vec::with_capacity(4);
        let full = matches!(
            verdict.refusal,
            Some(occupancy::Refusal::Full | occupancy::Refusal::Cooling)
        );
        if full && !subject.unverified {
            // The room is full: its moderators may still come in.
            match self.exemption(requester, env) {
                Exemption::Exempt => {
                    question.exempt = true;
                    verdict = match self.admit(&question, env) {
                        Ok(verdict) => verdict,
                        Err(effects) => return effects,
                    };
                    if verdict.admitted {
                        log::info!(
                            "room {}: {} let into the full room for their power level",
                            clip(matrix_room),
                            clip(requester)
                        );
                        effects.push(Effect::Count(Counter::ExemptAdmissions));
                    }
                }
                Exemption::NotExempt => {}
                Exemption::Wait(effects) => return effects,
            }
        }
        self.stage = Stage::Done;
        if verdict.on_view {
            effects.push(Effect::Count(Counter::LivekitLookupsAvoided));
        } else if matches!(participants, occupancy::Participants::Cached) {
            effects.push(Effect::Count(Counter::LivekitCacheHits));
        }
        if verdict.admitted {
            if self.on_request {
                let watch = Watch::new(subject.room.clone(), subject.identity.clone());
                let hold = verdict.holds.then(|| Hold {
                    requester: subject.requester.clone(),
                    unverified: subject.unverified,
                });
                self.stage = Stage::Watching(watch, hold);
            }
            effects.extend([Effect::Count(Counter::Allowed), self.pass()]);
            return effects;
        }
        effects.extend(refusal(matrix_room, requester, max_users, &verdict));
        effects
    }

    /// The room's occupancy decides `question`; a list too old (or no cached one) is asked
    /// for again, and the decision waits for it.
    pub(super) fn admit(
        &mut self,
        question: &occupancy::Request,
        env: &Env,
    ) -> Result<occupancy::Verdict, Vec<Effect>> {
        match occupancy::admit(env.store, question) {
            Ok(Outcome::Decided(verdict)) => Ok(verdict),
            Ok(Outcome::NeedList) => {
                let mut effects = Vec::new();
                self.ask_livekit_now(question.room, env, &mut effects);
                Err(effects)
            }
            Err(e) => Err(self.fail(format!("room occupancy not updated: {e}"), env)),
        }
    }

    /// Whether `requester` may come into the full room for their power level (or as one of
    /// its creators); asks Synapse (or waits for the request of this process that asks) for
    /// what is not cached. Both lookups are made at once.
    pub(super) fn exemption(&mut self, requester: &str, env: &Env) -> Exemption {
        let room = self.room().to_owned();
        let mut effects = Vec::new();
        let power = look_up(
            &mut self.power,
            &room,
            CallKind::PowerLookup(room.clone()),
            env,
            &mut effects,
        );
        let creators = look_up(
            &mut self.creators,
            &lookup::creators_key(&room),
            CallKind::CreatorsLookup(room.clone()),
            env,
            &mut effects,
        );
        if !(power && creators) {
            effects.dedup();
            return Exemption::Wait(effects);
        }
        // The limit event's own level, else the configured one, else the room's level to send
        // the limit event.
        let threshold = match self.limit {
            Lookup::Known(Limit::MaxUsers(_, Some(level))) => Some(level),
            _ => env.config.exempt_power_level,
        };
        let mut exempt = false;
        for (what, lookup) in [("power level", &self.power), ("creators", &self.creators)] {
            match lookup {
                Lookup::Known(levels) => exempt |= levels.exempts(requester, threshold),
                // A failure never lifts a limit: without levels seen before, nobody is exempt.
                Lookup::Failed(reason) => log::warn!(
                    "room {}: {what} lookup failed: {}; not counted for {}",
                    clip(&room),
                    clip(reason),
                    clip(requester)
                ),
                _ => {}
            }
        }
        if exempt {
            Exemption::Exempt
        } else {
            Exemption::NotExempt
        }
    }
}

/// Finds a room rule a refusal needs (power levels, creators) under `key` of the power-level
/// cache: from the cache, by waiting for the request of this process that asks, or by asking
/// Synapse (`kind`). Whether the rule is settled (known or failed); otherwise `effects` say
/// what to do meanwhile.
pub(super) fn look_up(
    state: &mut Lookup<PowerLevels>,
    key: &str,
    kind: CallKind,
    env: &Env,
    effects: &mut Vec<Effect>,
) -> bool {
    let cache = &limit_cache::POWER_LEVELS;
    if matches!(state, Lookup::AskedByOther) {
        match cache.peek(env.store, key, env.now_ms()) {
            Some(Cached::Known(levels)) => *state = Lookup::Known(levels),
            Some(Cached::Pending) => {
                effects.push(Effect::AwaitSharedLimit);
                return false;
            }
            None | Some(Cached::Claimed) => *state = Lookup::Unknown,
        }
    }
    if matches!(state, Lookup::Unknown) {
        let cfg = env.config;
        let cached = if cfg.limit_cache_ttl.is_zero() {
            Ok(Cached::Claimed)
        } else {
            let pending_ms = cfg.synapse.upstream.timeout.as_millis() as u64;
            cache.read_or_claim(env.store, key, env.now_ms(), pending_ms)
        };
        match cached {
            Ok(Cached::Known(levels)) => *state = Lookup::Known(levels),
            Ok(Cached::Pending) => {
                *state = Lookup::AskedByOther;
                effects.push(Effect::AwaitSharedLimit);
                return false;
            }
            Ok(Cached::Claimed) | Err(_) => {
                *state = Lookup::Asking;
                let token = cfg.synapse.admin_token.expose();
                let request = match &kind {
                    CallKind::CreatorsLookup(room) => synapse::create_request(room, token),
                    _ => synapse::power_levels_request(key, token),
                };
                effects.push(Effect::Count(Counter::PowerLevelLookups));
                effects.push(Effect::Dispatch(call(kind, &cfg.synapse.upstream, request)));
                return false;
            }
        }
    }
    matches!(state, Lookup::Known(_) | Lookup::Failed(_))
}

/// A power-level (or creators) lookup's answer as the admission keeps it: the levels, the
/// levels seen last when Synapse failed, or the failure.
pub(super) fn levels_known(
    room: &str,
    answer: Result<PowerLevels, Settled<PowerLevels>>,
) -> Lookup<PowerLevels> {
    match answer {
        Ok(levels) => Lookup::Known(levels),
        Err(Settled::Stale(levels, reason)) => {
            log::warn!(
                "room {}: power level lookup failed: {reason}; using the levels seen last",
                clip(room)
            );
            Lookup::Known(levels)
        }
        Err(Settled::Failed(reason)) => Lookup::Failed(reason),
    }
}

/// Whether a requester refused by the count may come in all the same.
pub(super) enum Exemption {
    Exempt,
    NotExempt,
    /// The power levels are being looked up: these effects, then wait for the answer.
    Wait(Vec<Effect>),
}

/// The answer to a refused token, its log line and counters.
pub(super) fn refusal(
    matrix_room: &str,
    requester: &str,
    max_users: u32,
    verdict: &occupancy::Verdict,
) -> [Effect; 3] {
    use occupancy::Refusal;
    let (answer, counter, why) = match verdict.refusal {
        Some(Refusal::TooManyDevices) => (
            reply::too_many_devices(),
            Counter::Blocked,
            "every device place of this user is taken by a connected device".to_owned(),
        ),
        Some(Refusal::AtCapacity) => (
            reply::at_capacity(),
            Counter::CapacityRefusals,
            "the room's shared record cannot hold one more admission".to_owned(),
        ),
        Some(Refusal::Cooling) => (
            reply::channel_full(),
            Counter::CoolingRefusals,
            format!(
                "one place left of {max_users}, and this user's reservations lapsed without \
                 their connecting"
            ),
        ),
        Some(Refusal::Full) | None => (
            reply::channel_full(),
            Counter::Blocked,
            format!(
                "{} users present and {} admitted but not seen connected, limit {max_users}",
                verdict.present, verdict.reserved
            ),
        ),
    };
    [
        Effect::LogRefusal(format!(
            "room {}: refused {}: {why}",
            clip(matrix_room),
            clip(requester)
        )),
        Effect::Count(counter),
        Effect::Reply(answer),
    ]
}
