//! The admission of one token request, top to bottom, as a sans-IO state machine.
//!
//! The host adapter feeds it what happens on the stream and on the calls it made, and carries
//! out the [`Effect`]s it returns. Nothing here touches the host, so the whole flow is tested
//! natively. Where the decision is taken depends on the route ([`Route`]):
//!
//! **Decided on the request**: the MatrixRTC routes (Synapse forwarding
//! `.../rtc/livekit/get_token`), and the legacy routes with `decision_phase: request` (the
//! default). Nothing reaches lk-jwt-service's handler but the headers before the decision.
//! 1. Request headers ([`Admission::on_request_headers`], MatrixRTC): with the application
//!    service's `hs_token` configured, a request without it is answered 401 at once.
//! 2. Request body complete ([`Admission::on_request_body`]): who asks, the LiveKit room and
//!    the participant identity lk-jwt-service will give (`flow_requester.rs`: the trusted
//!    headers of a MatrixRTC request, `/get_token`'s claimed user, or for `/sfu/get` Synapse's
//!    word on its OpenID token, asked only once the room turns out to have a limit); the limit
//!    from the shared cache or Synapse, the participants from LiveKit; then the request goes on
//!    with a place reserved, or is answered 403 `M_FORBIDDEN` (step 4).
//! 3. Response: a refusal by lk-jwt-service (anything but a 200) gives the place back; the
//!    token of a 200 is read as it passes ([`crate::admission::watch`]) and checked against what was
//!    counted. A body the guard could not read goes on undecided, and a 200 for it (or any
//!    200 before the decision) is answered 503.
//!
//! **Decided on the response** (legacy routes, `decision_phase: response`): who asks is
//! learnt from the token.
//! 1. Request body complete: read the room the way lk-jwt-service does; find its limit in the
//!    shared cache, or ask Synapse. The request goes on to lk-jwt-service at once: the lookups
//!    run while it works. With a known limit, LiveKit is asked who is in the room under the
//!    alias lk-jwt-service 0.4.3+ will choose, so that answer is usually ready when the token
//!    arrives.
//! 2. Response headers ([`Admission::on_response_headers`]): anything but a 200 passes
//!    unchanged; a 200 for a room without a limit passes at once; otherwise it is held.
//! 3. Response body ([`Admission::on_response_body`]): the token's `video.room` and `sub`
//!    say which LiveKit room and who. If the early LiveKit answer was for another room
//!    (an older lk-jwt-service), LiveKit is asked again.
//!
//! 4. Decision (`Admission::advance`), the same for both: with the limit and the participants
//!    known, the request or the held response goes on, or is answered 403 `M_FORBIDDEN`. Any
//!    failure of Synapse or LiveKit on the way lets it through (`failure_mode: open`) or
//!    answers 503 (`closed`), but a limit seen before is enforced through a Synapse outage,
//!    and a token for a request body the guard could not read is always answered 503.

use self::decide::levels_known;
use self::effects::call;
pub use self::effects::{CallKind, Effect, HttpCall};
pub use self::env::Env;
use self::limit_cache::Cached;
use self::lookup::Settled;
use self::watch::{issued_token, Watch};
use crate::config::{DecisionPhase, FailureMode};
pub use crate::counter::Counter;
use crate::occupancy::presence;
use crate::occupancy::view;
use crate::occupancy::{self, Outcome};
use crate::request::livekit_names::{requester_of_identity, room_alias};
use crate::request::route::Route;
use crate::request::rtc_request::{self, RtcHeaders};
use crate::request::text::clip;
use crate::request::token_request::{self, Shape, TokenRequest};
use crate::state::budget;
use crate::upstream::jwt::{self, JoinClaims};
use crate::upstream::livekit;
use crate::upstream::openid::Userinfo;
use crate::upstream::synapse::{self, Limit, PowerLevels};

/// Where a Synapse lookup (the limit, the power levels) stands for this request.
#[derive(Debug)]
enum Lookup<V> {
    /// Not looked for yet.
    Unknown,
    /// This request asked Synapse.
    Asking,
    /// Another request is asking Synapse for the same room.
    AskedByOther,
    Known(V),
    Failed(String),
}

#[derive(Debug)]
enum ParticipantState {
    /// Asked LiveKit at this time (ms since the epoch).
    Asking(u64),
    /// LiveKit's answer, and when it was asked for.
    Known(livekit::ParticipantList, u64),
    /// The room's shared record held a fresh list when last looked at.
    Cached,
    Failed(String),
}

/// Who asks for which LiveKit room: what a decision is about.
#[derive(Debug, Clone)]
struct Subject {
    /// The LiveKit room (alias).
    room: String,
    /// The participant identity of the token.
    identity: String,
    /// The Matrix user asking, as lk-jwt-service verified it or Synapse vouched for it.
    requester: String,
    /// Nobody could verify who asks (a `/sfu/get` OpenID token of another homeserver, a
    /// `/get_token` claim of another server than its OpenID token's): `requester` stands in
    /// for them, and they only ever take a free place.
    unverified: bool,
}

/// The largest token request body read: lk-jwt-service's bodies are well under 4 KiB. A
/// larger one is answered 413 with lk-jwt-service's CORS headers as soon as it grows past
/// this, before the proxy's own buffer limit (1 MiB by default) would answer it in plain text
/// (unless a single read takes the body past that limit: the proxy then answers first).
pub const MAX_REQUEST_BODY: usize = 64 * 1024;

/// lk-jwt-service's tokens live an hour.

#[derive(Debug)]
enum Stage {
    /// Legacy: the token is awaited. MatrixRTC: the request body is awaited.
    Waiting,
    /// Who asks and where are known; the decision waits for the limit and the participants.
    Deciding(Subject),
    /// Request phase: the request went on undecided (the reason): lk-jwt-service refuses
    /// such a request, and a 200 for it is answered 503.
    Unchecked(String),
    /// Request phase: the request went on with a place; its answer is watched. The hold the
    /// admission took on a reservation is given back if lk-jwt-service refuses the token or
    /// the stream ends before the token passed whole, and pinned once it did.
    Watching(Watch, Option<Hold>),
    /// Passed or replaced; nothing more to do.
    Done,
}

/// The hold a request-phase admission took on a reservation, until its token has passed.
#[derive(Debug)]
struct Hold {
    /// The requester the place was reserved for (a stand-in, when `unverified`).
    requester: String,
    /// Nobody verified who asked: the token issued names whose place it is.
    unverified: bool,
}

/// One token request on its way through the guard.
#[derive(Debug)]
pub struct Admission {
    route: Route,
    /// Decided once the request body is read (else on lk-jwt-service's 200).
    on_request: bool,
    /// Who a `/sfu/get` request's OpenID token belongs to, asked of Synapse when needed.
    userinfo: Lookup<Userinfo>,
    rtc_headers: RtcHeaders,
    /// `None` until the whole request body has been read.
    request: Option<Result<TokenRequest, String>>,
    limit: Lookup<Limit>,
    /// The room's power levels, looked for only when the room is full.
    power: Lookup<PowerLevels>,
    /// The room's creators (room version 12), as power levels; looked for with `power`.
    creators: Lookup<PowerLevels>,
    /// The LiveKit room asked about, and what is known of its participants.
    participants: Option<(String, ParticipantState)>,
    stage: Stage,
}

impl Default for Admission {
    fn default() -> Self {
        Self::new()
    }
}

impl Admission {
    /// A request on a legacy route, decided on lk-jwt-service's answer.
    pub fn new() -> Admission {
        Admission::for_route(Route::Legacy)
    }

    /// A request on `route`; legacy routes decided on lk-jwt-service's answer.
    pub fn for_route(route: Route) -> Admission {
        Admission::deciding(route, DecisionPhase::Response)
    }

    /// A request on `route`, legacy routes decided in `phase` (MatrixRTC routes always on the
    /// request).
    pub fn deciding(route: Route, phase: DecisionPhase) -> Admission {
        Admission {
            route,
            on_request: route.decides_on_request() || phase == DecisionPhase::Request,
            userinfo: Lookup::Unknown,
            rtc_headers: RtcHeaders::default(),
            request: None,
            limit: Lookup::Unknown,
            power: Lookup::Unknown,
            creators: Lookup::Unknown,
            participants: None,
            stage: Stage::Waiting,
        }
    }

    /// Whether the request body has been read (step 1 happened).
    pub fn request_read(&self) -> bool {
        self.request.is_some()
    }

    /// Whether the decision is taken before lk-jwt-service sees the request body.
    pub fn decides_on_request(&self) -> bool {
        self.on_request
    }

    /// Whether the request is held until the decision.
    pub fn holds_request(&self) -> bool {
        self.on_request && matches!(self.stage, Stage::Waiting | Stage::Deciding(_))
    }

    /// Whether a held 200 still waits for its body (step 3 has not happened).
    pub fn awaits_response_body(&self) -> bool {
        !self.on_request && matches!(self.stage, Stage::Waiting)
    }

    /// Whether the answer is read as it passes rather than held.
    pub fn watches_response(&self) -> bool {
        matches!(self.stage, Stage::Watching(..))
    }

    /// Whether nothing more is to be done: what follows streams through untouched.
    pub fn finished(&self) -> bool {
        matches!(self.stage, Stage::Done)
    }

    fn room(&self) -> &str {
        match &self.request {
            Some(Ok(request)) => &request.room,
            _ => "?",
        }
    }

    /// Step 1 of a MatrixRTC request: its headers. Without the configured `hs_token` it is not
    /// from Synapse, and its requester is not to be trusted: answered as lk-jwt-service answers.
    pub fn on_request_headers(&mut self, headers: RtcHeaders, env: &Env) -> Vec<Effect> {
        let Some(hs_token) = &env.config.synapse.hs_token else {
            self.rtc_headers = headers;
            return Vec::new();
        };
        if rtc_request::bearer_matches(headers.authorization.as_deref(), hs_token.expose()) {
            self.rtc_headers = headers;
            return Vec::new();
        }
        self.stage = Stage::Done;
        log::info!("a MatrixRTC token request without the application service's token: 401");
        let reply = if headers.authorization.is_none() {
            reply::missing_token()
        } else {
            reply::unknown_token()
        };
        vec![
            Effect::Count(Counter::TokenRequests),
            Effect::Count(Counter::Untrusted),
            Effect::Reply(reply),
        ]
    }

    /// The request body grew past [`MAX_REQUEST_BODY`]: answered 413, never read.
    pub fn on_request_too_large(&mut self) -> Vec<Effect> {
        self.stage = Stage::Done;
        log::info!("a token request body over {MAX_REQUEST_BODY} bytes: 413");
        vec![
            Effect::Count(Counter::TokenRequests),
            Effect::Count(Counter::OversizedRequests),
            Effect::Reply(reply::body_too_large()),
        ]
    }

    /// Step 1 (legacy), step 2 (MatrixRTC): the whole request body is here.
    pub fn on_request_body(&mut self, body: &[u8], env: &Env) -> Vec<Effect> {
        let mut effects = vec![Effect::Count(Counter::TokenRequests)];
        if self.on_request {
            let read = match self.route {
                Route::Legacy => self.read_legacy_request(body, &mut effects),
                Route::Client | Route::Federation => self.read_rtc_request(body, &mut effects),
            };
            match read {
                Some(request) => self.request = Some(Ok(request)),
                None => return effects,
            }
        } else {
            // A body lk-jwt-service refuses; should it issue a token anyway, it is answered
            // 503 at step 4.
            let read = token_request::parse(body).map_err(|e| e.to_string());
            if self.request.insert(read).is_err() {
                return effects;
            }
        }
        self.find_limit(env, &mut effects);
        effects.extend(self.advance(env));
        effects
    }

    /// The answer to a call this admission asked for (`status` is `None` when the call
    /// failed or was reset).
    pub fn on_call_response(
        &mut self,
        kind: CallKind,
        status: Option<u32>,
        body: &[u8],
        env: &Env,
    ) -> Vec<Effect> {
        let mut effects = Vec::new();
        match kind {
            CallKind::LimitLookup(room) => {
                if matches!(&self.request, Some(Ok(r)) if r.room == room) {
                    self.on_limit_answer(status, body, env, &mut effects);
                } else {
                    lookup::settle_orphaned(&CallKind::LimitLookup(room), status, body, env);
                }
            }
            CallKind::PowerLookup(ref room) | CallKind::CreatorsLookup(ref room) if !matches!(&self.request, Some(Ok(r)) if r.room == *room) =>
            {
                lookup::settle_orphaned(&kind, status, body, env);
            }
            CallKind::PowerLookup(room) => {
                self.power = levels_known(&room, lookup::power_levels(&room, status, body, env));
            }
            CallKind::CreatorsLookup(room) => {
                self.creators = levels_known(&room, lookup::creators(&room, status, body, env));
            }
            CallKind::Userinfo => self.on_userinfo(status, body, env),
            CallKind::ListParticipants(room) => {
                let Some((asked, state)) = &mut self.participants else {
                    return effects;
                };
                if *asked != room {
                    return effects; // an answer about a room no longer in question
                }
                let ParticipantState::Asking(taken_ms) = *state else {
                    return effects; // not waiting for a list
                };
                *state = match livekit::parse_list_response(status, body) {
                    Ok(list) => ParticipantState::Known(list, taken_ms),
                    Err(e) => ParticipantState::Failed(e.to_string()),
                };
            }
        }
        effects.extend(self.advance(env));
        effects
    }

    /// Looks again for what [`Effect::AwaitSharedLimit`] waits for.
    pub fn retry(&mut self, env: &Env) -> Vec<Effect> {
        self.advance(env)
    }

    /// Step 4: decides once everything needed is known; until then keeps holding.
    fn advance(&mut self, env: &Env) -> Vec<Effect> {
        if !matches!(self.stage, Stage::Deciding(_)) {
            return Vec::new();
        }
        let request = match &self.request {
            Some(Ok(request)) => request.clone(),
            Some(Err(e)) => return self.unreadable(&e.to_string()),
            None => return self.unreadable("the request body never arrived complete"),
        };
        let mut effects = Vec::new();
        let Some(max_users) = self.limit_to_enforce(&request.room, env, &mut effects) else {
            return effects;
        };
        // (LiveKit is asked meanwhile: the alias is known; see `ask_livekit_early`.)
        let Some(subject) = self.requester(&request, env, &mut effects) else {
            return effects;
        };
        if !matches!(&self.participants, Some((room, _)) if *room == subject.room) {
            // None yet, or asked under another alias: ask (or take the cached list) for the
            // room the token admits to.
            self.ask_livekit(&subject.room, env, &mut effects);
        }
        let list = match &self.participants {
            Some((_, ParticipantState::Known(list, taken_ms))) => Some((list.clone(), *taken_ms)),
            Some((_, ParticipantState::Cached)) => None,
            Some((_, ParticipantState::Failed(reason))) => {
                let reason = format!("participant lookup failed: {reason}");
                return self.fail(reason, env);
            }
            Some((_, ParticipantState::Asking(_))) | None => return effects,
        };
        let participants = match &list {
            Some((list, taken_ms)) => occupancy::Participants::Fresh {
                identities: &list.identities,
                sessions: &list.sessions,
                taken_ms: *taken_ms,
            },
            None => occupancy::Participants::Cached,
        };
        effects.extend(self.decide(&request.room, &subject, max_users, participants, env));
        effects
    }

    /// The limit to enforce, once known. Otherwise `None`, with the effects that get it, or
    /// that end the request when there is nothing to enforce (no limit) or it cannot be known
    /// (a failure, a spent lookup budget).
    fn limit_to_enforce(
        &mut self,
        room: &str,
        env: &Env,
        effects: &mut Vec<Effect>,
    ) -> Option<u32> {
        if matches!(self.limit, Lookup::AskedByOther) {
            // The other request's answer may be cached by now; if not, ask ourselves.
            match limit_cache::LIMITS.peek(env.store, room, env.now_ms()) {
                Some(Cached::Known(limit)) => self.limit = Lookup::Known(limit),
                Some(Cached::Pending) => {
                    effects.push(Effect::AwaitSharedLimit);
                    return None;
                }
                None | Some(Cached::Claimed) => self.ask_synapse(env, effects),
            }
        }
        match &self.limit {
            Lookup::Unknown | Lookup::Asking | Lookup::AskedByOther => None,
            Lookup::Failed(reason) => {
                let reason = format!("limit lookup failed: {reason}");
                effects.extend(self.fail(reason, env));
                None
            }
            Lookup::Known(Limit::None) => {
                self.stage = Stage::Done;
                effects.extend([Effect::Count(Counter::Allowed), self.pass()]);
                None
            }
            Lookup::Known(Limit::MaxUsers(n, _)) => Some(*n),
        }
    }

    /// A token for a request the guard could not read is never passed, whatever
    /// `failure_mode` says: that mode is about Synapse and LiveKit failing, and a request the
    /// guard cannot see would otherwise be a way around every limit.
    fn unreadable(&mut self, reason: &str) -> Vec<Effect> {
        self.stage = Stage::Done;
        log::warn!(
            "lk-jwt-service issued a token for a request the guard could not read ({}); \
             answering 503",
            clip(reason)
        );
        vec![
            Effect::Count(Counter::Unreadable),
            Effect::Reply(reply::unreadable_request()),
        ]
    }

    /// Lets the request (MatrixRTC) or the held response (legacy) go on.
    fn pass(&self) -> Effect {
        if self.on_request {
            Effect::PassRequest
        } else {
            Effect::PassResponse
        }
    }

    fn fail(&mut self, reason: String, env: &Env) -> Vec<Effect> {
        self.stage = Stage::Done;
        let room = clip(self.room());
        match env.config.failure_mode {
            FailureMode::Open => {
                log::warn!("room {room}: {reason}; letting the token through (failure_mode open)");
                vec![Effect::Count(Counter::FailOpen), self.pass()]
            }
            FailureMode::Closed => {
                log::warn!("room {room}: {reason}; refusing the token (failure_mode closed)");
                vec![
                    Effect::Count(Counter::FailClosed),
                    Effect::Reply(reply::check_failed()),
                ]
            }
        }
    }
}

/// Whether a Matrix room could have this id: the `!` sigil, at most 255 bytes (the spec's
/// bound for every identifier), no control characters. Anything else costs no lookup.
pub fn is_possible_room_id(room: &str) -> bool {
    room.len() > 1
        && room.len() <= 255
        && room.starts_with('!')
        && !room.chars().any(char::is_control)
}

mod answer;
mod ask;
mod decide;
mod effects;
mod env;
pub mod limit_cache;
pub mod lookup;
pub mod reply;
mod requester;
pub mod watch;

#[cfg(test)]
mod rtc_tests;

#[cfg(test)]
mod power_tests;

#[cfg(test)]
mod legacy_request_tests;

#[cfg(test)]
mod budget_tests;

#[cfg(test)]
mod claim_tests;

#[cfg(test)]
mod port_tests;

#[cfg(test)]
mod tests;
