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
//!    token of a 200 is read as it passes ([`crate::watch`]) and checked against what was
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

use std::time::Duration;

use crate::budget;
use crate::config::{Config, DecisionPhase, FailureMode, Upstream};
use crate::jwt::{self, JoinClaims};
use crate::limit_cache::{self, Cached};
use crate::livekit;
use crate::livekit_names::{requester_of_identity, room_alias};
use crate::lookup::{self, Settled};
use crate::occupancy::{self, Outcome};
use crate::openid::Userinfo;
use crate::presence;
use crate::reply::{self, LocalReply};
use crate::room_view;
use crate::route::Route;
use crate::rtc_request::{self, RtcHeaders};
use crate::store::SharedStore;
use crate::synapse::{self, Limit, PowerLevels};
use crate::token_request::{self, Shape, TokenRequest};
use crate::upstream::Request;
use crate::watch::{issued_token, Watch};

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

/// The guard's counters (the host exports them as `voice_limit_guard.<name>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Counter {
    TokenRequests,
    Allowed,
    Blocked,
    FailOpen,
    FailClosed,
    SynapseLookups,
    LimitCacheHits,
    LivekitLookups,
    LivekitCacheHits,
    /// lk-jwt-service issued a token for a request body the guard could not read.
    Unreadable,
    /// A refresh failed and the last limit seen was enforced.
    StaleLimits,
    /// A MatrixRTC request without the application service's `hs_token`, answered 401.
    Untrusted,
    /// A client-server MatrixRTC request for another homeserver's SFU, let through.
    Relayed,
    /// A place reserved before lk-jwt-service answered, given back when it refused the token.
    Released,
    /// A token issued after a request-phase admission for another room or participant than
    /// the one counted.
    TokenMismatches,
    /// Power-level lookups sent to Synapse (made only for rooms that are full).
    PowerLevelLookups,
    /// Users let into a full room for their power level.
    ExemptAdmissions,
    /// OpenID userinfo lookups sent to Synapse, to learn who asks on `/sfu/get` (made only
    /// for rooms with a limit, on the request phase).
    OpenidLookups,
    /// `/sfu/get` requests decided without knowing who asks (another homeserver's OpenID
    /// token, or Synapse's userinfo failed), and `/get_token` requests claiming a user of
    /// another server than their OpenID token's: they may only take a free place.
    UnverifiedRequesters,
    /// Token request bodies over [`MAX_REQUEST_BODY`], answered 413.
    OversizedRequests,
    /// `/sfu/get` requesters known from an earlier userinfo answer for the same OpenID token.
    OpenidCacheHits,
    /// Tokens refused because the room's shared record could not hold the admission (503).
    CapacityRefusals,
    /// Tokens refused the room's last place because the requester's reservations lapsed
    /// without their connecting (403, like a full room).
    CoolingRefusals,
    /// Synapse lookups not made because the process's budget was spent
    /// (`synapse.max_lookups_per_second`): limit lookups of rooms not seen within
    /// `stale_limit_seconds` (the token answered 429) and OpenID checks (the requester
    /// decided on as unverified).
    LookupsOverBudget,
    /// Limit lookups not made because the process's budget was spent, decided instead on the
    /// limit (or "no limit") seen last, within `stale_limit_seconds`.
    StaleOverBudget,
    /// Requests on the webhook path (`webhooks.path`).
    WebhooksReceived,
    /// Webhooks LiveKit signed, read.
    WebhooksAccepted,
    /// Webhooks without LiveKit's valid signature on their body: ignored.
    WebhooksRefused,
    /// Webhooks LiveKit signed that the guard could not read: every room's view in doubt.
    WebhooksUnreadable,
    /// Decisions taken on a room's view kept by webhooks, where LiveKit would have been asked.
    LivekitLookupsAvoided,
    /// Places reserved on a request and given back as its stream ended (reset, timed out,
    /// client gone) before lk-jwt-service's token passed whole.
    Abandoned,
    /// Places of requesters nobody verified moved to the user the token issued names.
    Rekeyed,
}

impl Counter {
    pub const ALL: [Counter; 32] = [
        Counter::TokenRequests,
        Counter::Allowed,
        Counter::Blocked,
        Counter::FailOpen,
        Counter::FailClosed,
        Counter::SynapseLookups,
        Counter::LimitCacheHits,
        Counter::LivekitLookups,
        Counter::LivekitCacheHits,
        Counter::Unreadable,
        Counter::StaleLimits,
        Counter::Untrusted,
        Counter::Relayed,
        Counter::Released,
        Counter::TokenMismatches,
        Counter::PowerLevelLookups,
        Counter::ExemptAdmissions,
        Counter::OpenidLookups,
        Counter::UnverifiedRequesters,
        Counter::OversizedRequests,
        Counter::OpenidCacheHits,
        Counter::CapacityRefusals,
        Counter::CoolingRefusals,
        Counter::LookupsOverBudget,
        Counter::StaleOverBudget,
        Counter::WebhooksReceived,
        Counter::WebhooksAccepted,
        Counter::WebhooksRefused,
        Counter::WebhooksUnreadable,
        Counter::LivekitLookupsAvoided,
        Counter::Abandoned,
        Counter::Rekeyed,
    ];
}

/// Which question an outgoing call asks; the host hands it back with the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallKind {
    /// Synapse's state of this Matrix room. Its answer is kept in the shared cache even when
    /// the request that asked has ended (see [`lookup::settle_orphaned`]).
    LimitLookup(String),
    /// `ListParticipants` for this LiveKit room.
    ListParticipants(String),
    /// Synapse's power levels of this Matrix room (full, so someone may be exempt). Kept in
    /// the shared cache like a limit lookup's answer.
    PowerLookup(String),
    /// The create event of this Matrix room: its creators, exempt in room version 12.
    CreatorsLookup(String),
    /// Synapse's userinfo for the OpenID token of this request (`/sfu/get`).
    Userinfo,
}

impl CallKind {
    /// Whether the call asks Synapse for a room rule: made by the root context, and its answer
    /// cached even when the request that asked has ended.
    pub fn is_synapse_lookup(&self) -> bool {
        matches!(
            self,
            CallKind::LimitLookup(_) | CallKind::PowerLookup(_) | CallKind::CreatorsLookup(_)
        )
    }
}

/// An HTTP call to make with `dispatch_http_call`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCall {
    pub kind: CallKind,
    pub cluster: String,
    /// Pseudo-headers included.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub timeout: Duration,
}

/// What the host must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    Dispatch(HttpCall),
    Count(Counter),
    /// Let the held request go on to lk-jwt-service.
    PassRequest,
    /// Let the upstream response go on unchanged.
    PassResponse,
    /// Answer the stream with this reply (in place of the upstream response).
    Reply(LocalReply),
    /// Another request of this process is asking Synapse for the same room: call
    /// [`Admission::retry`] again shortly, until that answer is in the shared cache.
    AwaitSharedLimit,
    /// The `info` line of a refusal (room, user, counts). The host rate-limits these: a client
    /// retrying against a full room must not flood the proxy's log.
    LogRefusal(String),
}

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

/// Finds a room rule a refusal needs (power levels, creators) under `key` of the power-level
/// cache: from the cache, by waiting for the request of this process that asks, or by asking
/// Synapse (`kind`). Whether the rule is settled (known or failed); otherwise `effects` say
/// what to do meanwhile.
fn look_up(
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
fn levels_known(
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
enum Exemption {
    Exempt,
    NotExempt,
    /// The power levels are being looked up: these effects, then wait for the answer.
    Wait(Vec<Effect>),
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

    /// The room's limit: none for an id no Matrix room can have, else from the shared cache
    /// or Synapse (and, once known, LiveKit is asked early).
    fn find_limit(&mut self, env: &Env, effects: &mut Vec<Effect>) {
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

    /// The upstream response headers. `status` is `None` when unreadable.
    pub fn on_response_headers(
        &mut self,
        status: Option<u32>,
        end_of_stream: bool,
        env: &Env,
    ) -> Vec<Effect> {
        if self.on_request {
            return self.on_watched_response_headers(status, end_of_stream, env);
        }
        if !matches!(self.stage, Stage::Waiting) {
            return Vec::new();
        }
        if status != Some(200) {
            self.stage = Stage::Done;
            return vec![Effect::PassResponse];
        }
        if let Lookup::Known(Limit::None) = self.limit {
            self.stage = Stage::Done;
            return vec![Effect::Count(Counter::Allowed), Effect::PassResponse];
        }
        if end_of_stream {
            // Holding a response without a body would never end.
            return self.fail("lk-jwt-service answered 200 without a body".into(), env);
        }
        Vec::new()
    }

    /// Step 3 of a request decided on the request: lk-jwt-service's answer to a request the
    /// guard let go on.
    fn on_watched_response_headers(
        &mut self,
        status: Option<u32>,
        end_of_stream: bool,
        env: &Env,
    ) -> Vec<Effect> {
        match std::mem::replace(&mut self.stage, Stage::Done) {
            Stage::Watching(watch, hold) if status == Some(200) => {
                if end_of_stream {
                    // No token can have passed: the place is given back.
                    let mut effects = self.mismatch(&watch, "the 200 has no body".to_owned());
                    effects.extend(self.release(&watch, hold.as_ref(), Counter::Released, env));
                    effects.push(Effect::PassResponse);
                    return effects;
                }
                self.stage = Stage::Watching(watch, hold);
                vec![Effect::PassResponse]
            }
            Stage::Watching(watch, hold) => {
                let mut effects = self.release(&watch, hold.as_ref(), Counter::Released, env);
                effects.push(Effect::PassResponse);
                effects
            }
            Stage::Unchecked(reason) if status == Some(200) => self.unreadable(&reason),
            Stage::Waiting | Stage::Deciding(_) if status == Some(200) => {
                self.unreadable("lk-jwt-service answered before the guard decided")
            }
            Stage::Done => Vec::new(),
            _ => vec![Effect::PassResponse],
        }
    }

    /// Gives back the hold a request-phase admission took on its requester's reservation, as
    /// no token reached the client (lk-jwt-service refused it, or the stream ended first);
    /// the place is free once no admission holds it, counted as `counter`.
    fn release(
        &self,
        watch: &Watch,
        hold: Option<&Hold>,
        counter: Counter,
        env: &Env,
    ) -> Vec<Effect> {
        let Some(Hold { requester, .. }) = hold else {
            return Vec::new();
        };
        match occupancy::release(env.store, &watch.room, requester, env.now_ms()) {
            Ok(true) => vec![Effect::Count(counter)],
            Ok(false) => Vec::new(),
            Err(e) => {
                log::warn!(
                    "room {}: the place of {} was not given back: {e}",
                    clip(self.room()),
                    clip(requester)
                );
                Vec::new()
            }
        }
    }

    /// Step 3 (legacy): the whole body of a held 200.
    pub fn on_response_body(&mut self, body: &[u8], env: &Env) -> Vec<Effect> {
        if !self.awaits_response_body() {
            return Vec::new();
        }
        let claims = match issued_token(body)
            .and_then(|t| jwt::join_claims(&t).map_err(|e| e.to_string()))
        {
            Ok(claims) => claims,
            Err(reason) => return self.fail(reason, env),
        };
        let mut effects = Vec::new();
        let (requester, unverified) = match &self.request {
            // A `/get_token` claim of another server than the OpenID token's proves nothing.
            Some(Ok(request))
                if request.shape == Shape::New && !requester::claim_provable(request) =>
            {
                effects.push(Effect::Count(Counter::UnverifiedRequesters));
                (
                    requester::unverified_stand_in(&request.openid.matrix_server_name),
                    true,
                )
            }
            Some(Ok(request)) => (requester_of(request, &claims).to_owned(), false),
            _ => (String::new(), false),
        };
        self.stage = Stage::Deciding(Subject {
            room: claims.room,
            identity: claims.identity,
            requester,
            unverified,
        });
        effects.extend(self.advance(env));
        effects
    }

    /// A part of a watched 200's body (step 3, request phase); at its end, the token is
    /// checked against what was counted, and the place it was reserved is its user's
    /// ([`Admission::issued`]).
    pub fn on_response_chunk(
        &mut self,
        chunk: &[u8],
        end_of_stream: bool,
        env: &Env,
    ) -> Vec<Effect> {
        let Stage::Watching(watch, _) = &mut self.stage else {
            return Vec::new();
        };
        watch.read(chunk);
        if !end_of_stream {
            return Vec::new();
        }
        let Stage::Watching(watch, hold) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Vec::new();
        };
        match watch.claims() {
            Err(reason) => self.mismatch(&watch, reason),
            Ok(claims) => self.issued(&watch, hold, &claims.identity, env),
        }
    }

    /// The token of a request-phase admission passed whole to its client: its place now
    /// stands for a token in the user's hands (it may lapse, and its user cool). A stand-in's
    /// place becomes the place of the user the token names, when that user is of the server
    /// whose OpenID token lk-jwt-service checked.
    fn issued(&self, watch: &Watch, hold: Option<Hold>, identity: &str, env: &Env) -> Vec<Effect> {
        let Some(hold) = hold else {
            return Vec::new();
        };
        let owner = match &self.request {
            Some(Ok(request)) if hold.unverified => {
                let user = requester_of_identity(identity, &request.device_id);
                let server = &request.openid.matrix_server_name;
                rtc_request::server_of(user)
                    .is_some_and(|of| rtc_request::same_server(of, server))
                    .then_some(user)
            }
            _ => None,
        };
        let reservation_ms = env.config.reservation.as_millis() as u64;
        let now = env.now_ms();
        match occupancy::issued(
            env.store,
            &watch.room,
            &hold.requester,
            owner,
            now,
            reservation_ms,
        ) {
            Ok(occupancy::Issued::Rekeyed) => vec![Effect::Count(Counter::Rekeyed)],
            Ok(_) => Vec::new(),
            Err(e) => {
                log::warn!(
                    "room {}: the place of {} was not marked as issued: {e}",
                    clip(self.room()),
                    clip(&hold.requester)
                );
                Vec::new()
            }
        }
    }

    /// The stream ended (reset, timed out, its client gone, or simply done). A place held for
    /// a token that never passed whole is given back at once: only a request that can still
    /// bring a token holds one.
    pub fn on_stream_end(&mut self, env: &Env) -> Vec<Effect> {
        let Stage::Watching(watch, hold) = std::mem::replace(&mut self.stage, Stage::Done) else {
            return Vec::new();
        };
        if let Some(Hold { requester, .. }) = &hold {
            log::debug!(
                "room {}: the request of {} ended before its token passed; its place is given back",
                clip(self.room()),
                clip(requester)
            );
        }
        self.release(&watch, hold.as_ref(), Counter::Abandoned, env)
    }

    fn mismatch(&mut self, watch: &Watch, reason: String) -> Vec<Effect> {
        self.stage = Stage::Done;
        log::warn!(
            "room {}: the token issued is not the one counted ({} in LiveKit room {}): {}",
            clip(self.room()),
            watch.identity,
            watch.room,
            clip(&reason)
        );
        vec![Effect::Count(Counter::TokenMismatches)]
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

    fn on_limit_answer(
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

    fn decide(
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
                room_view::untrusted_before(env.store, env.now_ms())
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
    fn admit(
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
    fn exemption(&mut self, requester: &str, env: &Env) -> Exemption {
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

    fn ask_synapse(&mut self, env: &Env, effects: &mut Vec<Effect>) {
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
    fn over_budget(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
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
    fn ask_livekit_early(&mut self, env: &Env, effects: &mut Vec<Effect>) {
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
    fn ask_livekit(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
        if env.config.participants_cache.is_zero() && env.config.webhooks.is_none() {
            self.ask_livekit_now(room, env, effects);
        } else {
            self.participants = Some((room.to_owned(), ParticipantState::Cached));
        }
    }

    fn ask_livekit_now(&mut self, room: &str, env: &Env, effects: &mut Vec<Effect>) {
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

/// The answer to a refused token, its log line and counters.
fn refusal(
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

/// The Matrix user asking, as lk-jwt-service verified it: the OpenID-verified claim of a
/// new-shape request (lk-jwt-service issues a token only when it holds), else the
/// `<user>:<device_id>` identity minus the device id the request named. Device ids, member ids
/// and slots are the client's choice; none of them makes one user count as several.
fn requester_of<'a>(request: &'a TokenRequest, claims: &'a JoinClaims) -> &'a str {
    if request.shape == Shape::New && !request.claimed_user_id.is_empty() {
        &request.claimed_user_id
    } else {
        requester_of_identity(&claims.identity, &request.device_id)
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

/// Untrusted text (room ids, user ids, reasons quoting them) as it may appear in a log line:
/// cut to a fixed length, so a client cannot write megabytes into the proxy's log.
pub fn clip(text: &str) -> std::borrow::Cow<'_, str> {
    const MAX_CHARS: usize = 128;
    match text.char_indices().nth(MAX_CHARS) {
        None => std::borrow::Cow::Borrowed(text),
        Some((end, _)) => {
            std::borrow::Cow::Owned(format!("{}... ({} bytes)", &text[..end], text.len()))
        }
    }
}

/// A service's request as the host makes it: to the upstream's cluster, with its authority
/// and timeout.
fn call(kind: CallKind, upstream: &Upstream, request: Request) -> HttpCall {
    let mut headers = vec![
        (":method".to_owned(), request.method.to_owned()),
        (":path".to_owned(), request.path),
        (":authority".to_owned(), upstream.authority.clone()),
    ];
    headers.extend(request.headers);
    HttpCall {
        kind,
        cluster: upstream.cluster.clone(),
        headers,
        body: request.body,
        timeout: upstream.timeout,
    }
}

#[path = "flow_requester.rs"]
mod requester;

#[cfg(test)]
#[path = "flow_rtc_tests.rs"]
mod rtc_tests;

#[cfg(test)]
#[path = "flow_power_tests.rs"]
mod power_tests;

#[cfg(test)]
#[path = "flow_legacy_request_tests.rs"]
mod legacy_request_tests;

#[cfg(test)]
#[path = "flow_budget_tests.rs"]
mod budget_tests;

#[cfg(test)]
#[path = "flow_claim_tests.rs"]
mod claim_tests;

#[cfg(test)]
#[path = "flow_port_tests.rs"]
mod port_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use crate::test_support::{
        config, issued, legacy_alias, legacy_body, limit_answer, lookup, ROOM,
    };
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    fn legacy_token(user: &str, device: &str) -> Vec<u8> {
        issued(&legacy_alias(), &format!("{user}:{device}"))
    }

    pub(super) fn participants(identities: &[&str]) -> Vec<u8> {
        let list: Vec<String> = identities
            .iter()
            .map(|i| format!(r#"{{"identity":"{i}","state":"ACTIVE"}}"#))
            .collect();
        format!(r#"{{"participants":[{}]}}"#, list.join(",")).into_bytes()
    }

    pub(super) fn dispatched(effects: &[Effect]) -> Vec<&HttpCall> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Dispatch(call) => Some(call),
                _ => None,
            })
            .collect()
    }

    pub(super) fn counters(effects: &[Effect]) -> Vec<Counter> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Count(c) => Some(*c),
                _ => None,
            })
            .collect()
    }

    pub(super) fn outcome(effects: &[Effect]) -> Option<u32> {
        effects.iter().find_map(|e| match e {
            Effect::PassResponse | Effect::PassRequest => Some(200),
            Effect::Reply(r) => Some(r.status),
            _ => None,
        })
    }

    /// One admission driven event by event as the host drives it. Each step returns the
    /// effects it caused; `all` keeps every effect in order.
    pub(super) struct Drive<'a> {
        pub(super) env: Env<'a>,
        pub(super) admission: Admission,
        pub(super) all: Vec<Effect>,
    }

    impl<'a> Drive<'a> {
        pub(super) fn new(config: &'a Config, store: &'a MemoryStore, now_ms: u64) -> Drive<'a> {
            Drive::on(Route::Legacy, config, store, now_ms)
        }

        pub(super) fn on(
            route: Route,
            config: &'a Config,
            store: &'a MemoryStore,
            now_ms: u64,
        ) -> Drive<'a> {
            Drive {
                env: Env::at(config, store, now_ms),
                admission: Admission::for_route(route),
                all: Vec::new(),
            }
        }

        pub(super) fn keep(&mut self, effects: Vec<Effect>) -> Vec<Effect> {
            self.all.extend(effects.iter().cloned());
            effects
        }

        /// The request body, read whole.
        pub(super) fn request(&mut self, body: &[u8]) -> Vec<Effect> {
            let effects = self.admission.on_request_body(body, &self.env);
            self.keep(effects)
        }

        /// Synapse's answer to the limit lookup.
        pub(super) fn synapse(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
            let effects = self
                .admission
                .on_call_response(lookup(), status, body, &self.env);
            self.keep(effects)
        }

        pub(super) fn response_headers(
            &mut self,
            status: Option<u32>,
            end_of_stream: bool,
        ) -> Vec<Effect> {
            let effects = self
                .admission
                .on_response_headers(status, end_of_stream, &self.env);
            self.keep(effects)
        }

        pub(super) fn response_body(&mut self, body: &[u8]) -> Vec<Effect> {
            let effects = self.admission.on_response_body(body, &self.env);
            self.keep(effects)
        }

        /// lk-jwt-service's 200 with this body: its headers, then its body.
        pub(super) fn token(&mut self, body: &[u8]) -> Vec<Effect> {
            let mut effects = self.response_headers(Some(200), false);
            effects.extend(self.response_body(body));
            effects
        }

        /// The last `ListParticipants` call made, if any.
        pub(super) fn livekit_call(&self) -> Option<CallKind> {
            dispatched(&self.all)
                .into_iter()
                .rev()
                .find(|c| matches!(c.kind, CallKind::ListParticipants(_)))
                .map(|c| c.kind.clone())
        }

        /// LiveKit's answer to the last `ListParticipants` call. A refusal it leads to asks
        /// for the room's power levels: they are answered too, with nobody privileged.
        pub(super) fn livekit(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
            let Some(kind) = self.livekit_call() else {
                panic!("LiveKit was not asked: {:?}", self.all)
            };
            let effects = self
                .admission
                .on_call_response(kind, status, body, &self.env);
            let mut effects = self.keep(effects);
            if dispatched(&effects)
                .iter()
                .any(|c| matches!(c.kind, CallKind::PowerLookup(_)))
            {
                effects.extend(self.power(Some(200), br#"{"state":[]}"#));
                effects.extend(self.creators(Some(200), br#"{"state":[]}"#));
            }
            effects
        }

        /// Synapse's answer to the power-level lookup.
        pub(super) fn power(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
            let kind = CallKind::PowerLookup(ROOM.to_owned());
            let effects = self
                .admission
                .on_call_response(kind, status, body, &self.env);
            self.keep(effects)
        }

        /// Synapse's answer to the creators lookup.
        pub(super) fn creators(&mut self, status: Option<u32>, body: &[u8]) -> Vec<Effect> {
            let kind = CallKind::CreatorsLookup(ROOM.to_owned());
            let effects = self
                .admission
                .on_call_response(kind, status, body, &self.env);
            self.keep(effects)
        }

        pub(super) fn retry(&mut self) -> Vec<Effect> {
            let effects = self.admission.retry(&self.env);
            self.keep(effects)
        }
    }

    /// A whole legacy admission of `user` (device `DEV`) into a room limited to `limit` whose
    /// LiveKit room holds `present`, each service asked only if the guard asks; every effect.
    fn admit(
        cfg: &Config,
        store: &MemoryStore,
        limit: u32,
        present: &[&str],
        user: &str,
    ) -> Vec<Effect> {
        let mut d = Drive::new(cfg, store, 1_000);
        let effects = d.request(&legacy_body(user, "DEV"));
        if dispatched(&effects).iter().any(|c| c.kind == lookup()) {
            d.synapse(Some(200), &limit_answer(limit));
        }
        d.token(&legacy_token(user, "DEV"));
        if d.livekit_call().is_some() && outcome(&d.all).is_none() {
            d.livekit(Some(200), &participants(present));
        }
        d.all
    }

    #[test]
    fn limit_lookup_is_a_bearer_get_on_the_admin_state_api() {
        let cfg = config("");
        let store = MemoryStore::default();
        let effects = Drive::new(&cfg, &store, 0).request(&legacy_body("@a:example.com", "D"));
        let calls = dispatched(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].cluster, "synapse");
        assert_eq!(calls[0].timeout, Duration::from_millis(1000));
        assert_eq!(
            calls[0].headers,
            [
                (":method".into(), "GET".into()),
                (":path".into(), "/_synapse/admin/v1/rooms/%21room%3Aexample.com/state?type=io.lotus.voice_limit".into()),
                (":authority".into(), "synapse".into()),
                ("authorization".into(), "Bearer syt_admin".into()),
            ]
        );
        assert_eq!(
            counters(&effects),
            [Counter::TokenRequests, Counter::SynapseLookups]
        );
    }

    #[test]
    fn below_the_limit_the_token_passes() {
        let cfg = config("");
        let effects = admit(
            &cfg,
            &MemoryStore::default(),
            2,
            &["@a:example.com:D1"],
            "@b:example.com",
        );
        assert_eq!(outcome(&effects), Some(200));
        assert!(counters(&effects).contains(&Counter::Allowed));
    }

    #[test]
    fn a_full_room_refuses_a_new_user_with_403() {
        let cfg = config("");
        let effects = admit(
            &cfg,
            &MemoryStore::default(),
            2,
            &[
                "@a:example.com:D1",
                "@a:example.com:D2",
                "@b:example.com:D1",
            ],
            "@c:example.com",
        );
        assert_eq!(outcome(&effects), Some(403));
        assert!(counters(&effects).contains(&Counter::Blocked));
        let Some(Effect::Reply(reply)) = effects.iter().find(|e| matches!(e, Effect::Reply(_)))
        else {
            panic!("no reply")
        };
        assert_eq!(
            reply.body,
            r#"{"errcode":"M_FORBIDDEN","error":"This voice channel is full."}"#
        );
        assert!(reply
            .headers
            .contains(&("access-control-allow-origin", "*")));
        assert!(effects.iter().any(|e| matches!(e, Effect::LogRefusal(line)
            if line.starts_with("room !room:example.com: refused @c:example.com: 2 users present"))));
    }

    #[test]
    fn a_present_user_gets_in_with_another_device() {
        let cfg = config("");
        let effects = admit(
            &cfg,
            &MemoryStore::default(),
            1,
            &["@a:example.com:D1"],
            "@a:example.com",
        );
        assert_eq!(outcome(&effects), Some(200));
    }

    #[test]
    fn the_livekit_query_runs_early_under_the_predicted_alias() {
        // Without the list cache; with it, the cached list is read when deciding instead.
        let cfg = config(r#", "participants_cache_ms": 0"#);
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(&legacy_body("@a:example.com", "D"));
        // The Synapse answer arrives while lk-jwt-service still works: LiveKit is asked now.
        let effects = d.synapse(Some(200), &limit_answer(2));
        let calls = dispatched(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].kind, CallKind::ListParticipants(legacy_alias()));
        assert_eq!(
            calls[0].body,
            livekit::list_participants_body(&legacy_alias())
        );
        let auth = &calls[0]
            .headers
            .iter()
            .find(|(k, _)| k == "authorization")
            .unwrap()
            .1;
        assert!(auth.starts_with("Bearer ey"));
        // Its answer is ready before the token: the decision needs no further call.
        assert!(d.livekit(Some(200), &participants(&[])).is_empty());
        assert!(d.response_headers(Some(200), false).is_empty());
        let effects = d.response_body(&legacy_token("@a:example.com", "D"));
        assert_eq!(dispatched(&effects).len(), 0);
        assert_eq!(outcome(&effects), Some(200));
    }

    #[test]
    fn a_token_for_another_alias_is_checked_again() {
        let cfg = config(r#", "participants_cache_ms": 0"#);
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(&legacy_body("@c:example.com", "D"));
        d.synapse(Some(200), &limit_answer(1));
        d.livekit(Some(200), &participants(&[]));
        // An lk-jwt-service older than 0.4.3 names the LiveKit room differently.
        let effects = d.token(&issued(ROOM, "@c:example.com:D"));
        let calls = dispatched(&effects);
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].kind, CallKind::ListParticipants(ROOM.into()));
        assert_eq!(outcome(&effects), None);
        let effects = d.livekit(Some(200), &participants(&["@a:example.com:X"]));
        assert_eq!(outcome(&effects), Some(403));
    }

    #[test]
    fn a_fresh_participant_list_is_reused_when_configured() {
        let cfg = config(r#", "participants_cache_ms": 1000"#);
        let store = MemoryStore::default();
        let first = admit(&cfg, &store, 3, &["@a:example.com:D1"], "@b:example.com");
        assert_eq!(outcome(&first), Some(200));
        // The next admission into the same room within a second asks LiveKit nothing;
        // bob's reservation and alice's cached presence fill two of three places.
        let mut c = Drive::new(&cfg, &store, 1_500);
        c.request(&legacy_body("@c:example.com", "DEV"));
        c.token(&legacy_token("@c:example.com", "DEV"));
        assert!(dispatched(&c.all).is_empty(), "{:?}", c.all);
        assert!(counters(&c.all).contains(&Counter::LivekitCacheHits));
        assert_eq!(outcome(&c.all), Some(200));
        // A third new user finds the room full on the cache, but a refusal is decided on a
        // fresh list: LiveKit is asked, and still lists alice.
        let mut d = Drive::new(&cfg, &store, 1_500);
        d.request(&legacy_body("@d:example.com", "DEV"));
        d.token(&legacy_token("@d:example.com", "DEV"));
        assert_eq!(outcome(&d.all), None);
        assert_eq!(dispatched(&d.all).len(), 1);
        let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
        assert_eq!(outcome(&effects), Some(403));
    }

    #[test]
    fn with_the_list_cache_a_late_limit_answer_still_decides() {
        let cfg = config(r#", "participants_cache_ms": 1000"#);
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(&legacy_body("@a:example.com", "D"));
        // The token is held before Synapse answers.
        assert!(d.response_headers(Some(200), false).is_empty());
        assert!(d
            .response_body(&legacy_token("@a:example.com", "D"))
            .is_empty());
        // No list is cached yet, so the limit answer leads to a LiveKit call...
        let effects = d.synapse(Some(200), &limit_answer(2));
        assert_eq!(dispatched(&effects).len(), 1, "{effects:?}");
        // ...and its answer to the decision.
        let effects = d.livekit(Some(200), &participants(&[]));
        assert_eq!(outcome(&effects), Some(200));
    }

    #[test]
    fn a_token_for_a_request_never_read_is_refused_in_both_modes() {
        for mode in [
            "",
            r#", "failure_mode": "open""#,
            r#", "failure_mode": "closed""#,
        ] {
            let cfg = config(mode);
            let store = MemoryStore::default();
            let mut d = Drive::new(&cfg, &store, 0);
            assert!(d.response_headers(Some(200), false).is_empty());
            let effects = d.response_body(&issued("x", "y"));
            assert_eq!(outcome(&effects), Some(503), "{mode}");
            assert_eq!(counters(&effects), [Counter::Unreadable]);
        }
    }

    #[test]
    fn no_limit_passes_at_the_headers_and_is_cached() {
        let cfg = config("");
        let store = MemoryStore::default();
        let mut a = Drive::new(&cfg, &store, 0);
        a.request(&legacy_body("@a:example.com", "D"));
        assert!(dispatched(&a.synapse(Some(200), br#"{"state":[]}"#)).is_empty());
        assert_eq!(
            a.response_headers(Some(200), false),
            [Effect::Count(Counter::Allowed), Effect::PassResponse]
        );
        // The next request within the TTL uses the cache.
        let effects = Drive::new(&cfg, &store, 0).request(&legacy_body("@b:example.com", "D"));
        assert_eq!(
            counters(&effects),
            [Counter::TokenRequests, Counter::LimitCacheHits]
        );
        assert!(dispatched(&effects).is_empty());
    }

    #[test]
    fn concurrent_cold_requests_share_one_lookup() {
        let cfg = config("");
        let store = MemoryStore::default();
        let mut first = Drive::new(&cfg, &store, 0);
        let mut second = Drive::new(&cfg, &store, 0);
        let body = legacy_body("@a:example.com", "D");
        assert_eq!(dispatched(&first.request(&body)).len(), 1);
        assert!(dispatched(&second.request(&body)).is_empty());
        // The second token arrives before the first lookup's answer: it waits for it.
        assert_eq!(
            second.token(&legacy_token("@b:example.com", "D")),
            [Effect::AwaitSharedLimit]
        );
        assert_eq!(second.retry(), [Effect::AwaitSharedLimit]);
        first.synapse(Some(200), &limit_answer(5));
        // The answer is shared: the second request goes straight to LiveKit (or its list).
        let effects = second.retry();
        assert!(!counters(&effects).contains(&Counter::SynapseLookups));
        assert!(!counters(&effects).contains(&Counter::LimitCacheHits));
        let calls = dispatched(&effects);
        assert_eq!(calls.len(), 1);
        assert!(matches!(calls[0].kind, CallKind::ListParticipants(_)));
    }

    #[test]
    fn a_flood_of_new_rooms_spends_the_lookup_budget_and_is_answered_429() {
        let json = br#"{"synapse": {"cluster": "synapse", "admin_token": "t", "max_lookups_per_second": 2},
            "livekit": {"cluster": "livekit", "api_key": "k", "api_secret": "s"}}"#;
        let cfg = Config::parse(json, &|_| None).unwrap();
        let store = MemoryStore::default();
        // Room 0 is ROOM, the others new ids.
        let body = |n: usize| {
            let room = if n == 0 {
                ROOM.to_owned()
            } else {
                format!("!flood{n}:example.com")
            };
            String::from_utf8_lossy(&legacy_body("@a:example.com", "D")).replace(ROOM, &room)
        };
        let mut first = Drive::new(&cfg, &store, 0);
        assert_eq!(dispatched(&first.request(body(0).as_bytes())).len(), 1);
        assert_eq!(
            dispatched(&Drive::new(&cfg, &store, 0).request(body(1).as_bytes())).len(),
            1
        );
        let shed = Drive::new(&cfg, &store, 0).request(body(2).as_bytes());
        assert!(dispatched(&shed).is_empty());
        assert_eq!(outcome(&shed), Some(429));
        assert!(counters(&shed).contains(&Counter::LookupsOverBudget));
        // Its claim was given back: once the budget refills, the room is looked up.
        let later = Drive::new(&cfg, &store, 500).request(body(2).as_bytes());
        assert_eq!(dispatched(&later).len(), 1);
        // A room whose limit is known takes nothing from the spent budget.
        first.synapse(Some(200), &limit_answer(5));
        let known = Drive::new(&cfg, &store, 500).request(body(0).as_bytes());
        assert!(counters(&known).contains(&Counter::LimitCacheHits));
        assert_ne!(outcome(&known), Some(429));
    }

    #[test]
    fn a_lapsed_or_failed_shared_lookup_is_redone() {
        let cfg = config("");
        let store = MemoryStore::default();
        let mut first = Drive::new(&cfg, &store, 0);
        let mut second = Drive::new(&cfg, &store, 0);
        let body = legacy_body("@a:example.com", "D");
        first.request(&body);
        second.request(&body);
        first.synapse(Some(502), b"");
        let effects = second.token(&legacy_token("@b:example.com", "D"));
        assert_eq!(dispatched(&effects)[0].kind, lookup());
    }

    #[test]
    fn other_upstream_answers_pass_untouched() {
        let cfg = config("");
        let store = MemoryStore::default();
        for status in [Some(400), Some(401), Some(500), None] {
            let mut d = Drive::new(&cfg, &store, 0);
            d.request(&legacy_body("@a:example.com", "D"));
            assert_eq!(d.response_headers(status, false), [Effect::PassResponse]);
            assert!(d.synapse(Some(200), &limit_answer(1)).is_empty());
        }
    }

    type Answer<'a> = (Option<u32>, &'a [u8]);

    /// What LiveKit answers for a room nobody is in (even one it never created).
    const EMPTY_ROOM: &[u8] = br#"{"participants":[]}"#;

    fn failing(cfg: &Config, synapse: Answer, livekit: Answer, token: Vec<u8>) -> Vec<Effect> {
        let store = MemoryStore::default();
        let mut d = Drive::new(cfg, &store, 0);
        d.request(&legacy_body("@a:example.com", "D"));
        d.synapse(synapse.0, synapse.1);
        d.token(&token);
        if d.livekit_call().is_some() && outcome(&d.all).is_none() {
            d.livekit(livekit.0, livekit.1);
        }
        d.all
    }

    #[test]
    fn every_failure_fails_open_by_default_and_closed_on_request() {
        let ok_limit = limit_answer(1);
        let token = legacy_token("@a:example.com", "D");
        let cases: Vec<(Answer, Answer, Vec<u8>)> = vec![
            ((None, b""), (Some(200), EMPTY_ROOM), token.clone()),
            ((Some(500), b"{}"), (Some(200), EMPTY_ROOM), token.clone()),
            (
                (Some(200), b"garbage"),
                (Some(200), EMPTY_ROOM),
                token.clone(),
            ),
            ((Some(200), &ok_limit), (None, b""), token.clone()),
            ((Some(200), &ok_limit), (Some(401), b"{}"), token.clone()),
            // A 200 that is not a participant list is no empty room.
            ((Some(200), &ok_limit), (Some(200), b"{}"), token.clone()),
            (
                (Some(200), &ok_limit),
                (Some(200), b"{\"participants\":[{"),
                token.clone(),
            ),
            (
                (Some(200), &ok_limit),
                (Some(200), EMPTY_ROOM),
                b"{\"url\":\"x\"}".to_vec(),
            ),
            (
                (Some(200), &ok_limit),
                (Some(200), EMPTY_ROOM),
                b"{\"jwt\":\"not-a-jwt\"}".to_vec(),
            ),
        ];
        let open = config("");
        let closed = config(r#", "failure_mode": "closed""#);
        for (synapse, livekit, token) in cases {
            let effects = failing(&open, synapse, livekit, token.clone());
            assert_eq!(outcome(&effects), Some(200), "{synapse:?} {livekit:?}");
            assert!(counters(&effects).contains(&Counter::FailOpen));
            let effects = failing(&closed, synapse, livekit, token);
            assert_eq!(outcome(&effects), Some(503), "{synapse:?} {livekit:?}");
            assert!(counters(&effects).contains(&Counter::FailClosed));
        }
    }

    #[test]
    fn an_unreadable_body_that_still_gets_a_token_is_refused_in_both_modes() {
        for mode in [
            r#", "failure_mode": "open""#,
            r#", "failure_mode": "closed""#,
        ] {
            let cfg = config(mode);
            let store = MemoryStore::default();
            let mut d = Drive::new(&cfg, &store, 0);
            assert!(dispatched(&d.request(b"{\"room\":5}")).is_empty());
            assert!(d.response_headers(Some(200), false).is_empty());
            let effects = d.response_body(&issued("x", "y"));
            let Some(Effect::Reply(reply)) = effects.iter().find(|e| matches!(e, Effect::Reply(_)))
            else {
                panic!("no reply: {effects:?}")
            };
            assert_eq!(reply, &reply::unreadable_request());
            assert_eq!(counters(&effects), [Counter::Unreadable]);
        }
    }

    #[test]
    fn a_200_without_body_cannot_be_held() {
        let cfg = config("");
        let store = MemoryStore::default();
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(&legacy_body("@a:example.com", "D"));
        let effects = d.response_headers(Some(200), true);
        assert_eq!(outcome(&effects), Some(200));
        assert!(counters(&effects).contains(&Counter::FailOpen));
    }

    #[test]
    fn new_shape_requester_is_the_verified_claimed_user() {
        let cfg = config(r#", "participants_cache_ms": 0"#);
        let store = MemoryStore::default();
        let body = br#"{"room_id":"!room:example.com","slot_id":"m.call#ROOM","openid_token":{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600},"member":{"id":"m1","claimed_user_id":"@a:example.com","claimed_device_id":"D2"}}"#;
        let alias = room_alias(ROOM, "m.call#ROOM");
        let mut d = Drive::new(&cfg, &store, 0);
        d.request(body);
        d.synapse(Some(200), &limit_answer(1));
        d.token(&issued(&alias, "hashedIdentityOfD2"));
        // alice is present under her /sfu/get identity: her second device is let in.
        assert_eq!(d.livekit_call(), Some(CallKind::ListParticipants(alias)));
        let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
        assert_eq!(outcome(&effects), Some(200));
    }

    #[test]
    fn a_limit_seen_before_is_enforced_while_synapse_fails() {
        for mode in ["", r#", "failure_mode": "closed""#] {
            let cfg = config(mode);
            let store = MemoryStore::default();
            let first = admit(&cfg, &store, 1, &["@a:example.com:D1"], "@b:example.com");
            assert_eq!(outcome(&first), Some(403));
            // An hour later the cached limit has long expired and Synapse is down.
            let mut d = Drive::new(&cfg, &store, 3_000_000);
            d.request(&legacy_body("@c:example.com", "D"));
            d.synapse(Some(502), b"");
            d.token(&legacy_token("@c:example.com", "D"));
            let effects = d.livekit(Some(200), &participants(&["@a:example.com:D1"]));
            assert_eq!(outcome(&effects), Some(403), "{mode}");
            let mut all = counters(&effects);
            all.extend(counters(&d.synapse(None, b"")));
            assert!(!all.contains(&Counter::FailOpen));
        }
    }

    #[test]
    fn a_stale_limit_is_counted() {
        let cfg = config("");
        let store = MemoryStore::default();
        admit(&cfg, &store, 2, &[], "@a:example.com");
        let mut d = Drive::new(&cfg, &store, 3_000_000);
        d.request(&legacy_body("@c:example.com", "D"));
        let effects = d.synapse(None, b"");
        assert!(counters(&effects).contains(&Counter::StaleLimits));
        // A room first seen while Synapse is down still fails per failure_mode.
        let effects = failing(
            &cfg,
            (Some(502), b""),
            (Some(200), EMPTY_ROOM),
            legacy_token("@a:example.com", "D"),
        );
        assert!(counters(&effects).contains(&Counter::FailOpen));
    }

    #[test]
    fn impossible_room_ids_cost_no_lookup() {
        let cfg = config("");
        let store = MemoryStore::default();
        let long = format!("!{}", "a".repeat(255));
        for room in ["no-sigil", "!", "!a\\u0000b", long.as_str()] {
            let body = format!(
                r#"{{"room":"{room}","openid_token":{{"access_token":"t","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600}},"device_id":"D"}}"#
            );
            let mut d = Drive::new(&cfg, &store, 0);
            assert!(dispatched(&d.request(body.as_bytes())).is_empty(), "{room}");
            assert_eq!(
                d.response_headers(Some(200), false),
                [Effect::Count(Counter::Allowed), Effect::PassResponse]
            );
        }
        assert!(is_possible_room_id(
            "!CsjFU1jpgnkbcyiklV6jftoSxphXpFoiYYAjBb8VbZ8"
        ));
        assert!(is_possible_room_id(&long[..255]));
    }

    #[test]
    fn a_lookup_answer_is_kept_when_its_request_has_gone() {
        let cfg = config(r#", "participants_cache_ms": 0"#);
        let store = MemoryStore::default();
        let mut gone = Drive::new(&cfg, &store, 0);
        gone.request(&legacy_body("@a:example.com", "D"));
        drop(gone);
        // Another request for the room waits for that lookup...
        let mut waiting = Drive::new(&cfg, &store, 0);
        assert!(dispatched(&waiting.request(&legacy_body("@b:example.com", "D"))).is_empty());
        // ...whose answer the host settles without the request that asked.
        let env = Env::at(&cfg, &store, 0);
        lookup::settle_orphaned(&lookup(), Some(200), &limit_answer(4), &env);
        let effects = waiting.token(&legacy_token("@b:example.com", "D"));
        let calls = dispatched(&effects);
        assert_eq!(calls.len(), 1);
        assert!(matches!(calls[0].kind, CallKind::ListParticipants(_)));
    }

    #[test]
    fn log_lines_clip_untrusted_text() {
        assert_eq!(clip("!short"), "!short");
        let text = "é".repeat(10_000);
        let clipped = clip(&text);
        assert!(clipped.len() < 300);
        assert!(clipped.ends_with("(20000 bytes)"));
    }
}
