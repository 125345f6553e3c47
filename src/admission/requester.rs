//! Who asks for which call: the [`Subject`] of a request decided before lk-jwt-service sees
//! it, read from each route's request (and, for `/sfu/get`, from Synapse's word on its OpenID
//! token). Part of [`Admission`]'s walk; see [`crate::admission`].

use super::limit_cache::{Cached, Lifetimes, VerifiedUser, OPENID_USERS};
use super::{call, Admission, CallKind, Effect, Env, Lookup, Stage, Subject};
use crate::counter::Counter;
use crate::request::livekit_names::{hash_of_strings, room_alias};
use crate::request::route::Route;
use crate::request::rtc_request::{self, Asked};
use crate::request::text::clip;
use crate::request::token_request::{self, Shape, TokenRequest};
use crate::state::budget;
use crate::upstream::openid::{self, Userinfo};

impl Admission {
    /// Who asks for which call on a MatrixRTC route, as the request to decide on; `None` when
    /// it goes on undecided (unreadable, or for another homeserver's SFU).
    pub(super) fn read_rtc_request(
        &mut self,
        body: &[u8],
        effects: &mut Vec<Effect>,
    ) -> Option<TokenRequest> {
        match rtc_request::parse(self.route, &self.rtc_headers, body) {
            Ok(Asked::Local(asked)) => {
                self.stage = Stage::Deciding(Subject {
                    room: asked.alias,
                    identity: asked.identity,
                    requester: asked.user.clone(),
                    unverified: false,
                });
                Some(TokenRequest {
                    room: asked.room,
                    shape: Shape::New,
                    slot_id: asked.slot_id,
                    claimed_user_id: asked.user,
                    ..TokenRequest::default()
                })
            }
            Ok(Asked::Remote { server_name }) => {
                log::debug!(
                    "a token request for {}'s SFU: not ours, let through",
                    clip(&server_name)
                );
                self.stage = Stage::Done;
                effects.extend([Effect::Count(Counter::Relayed), Effect::PassRequest]);
                None
            }
            Err(e) => {
                effects.push(self.go_on_unchecked(e.to_string()));
                None
            }
        }
    }

    /// A request the guard cannot read goes on undecided: lk-jwt-service refuses it, and a 200
    /// for it is answered 503 (see [`Stage::Unchecked`]).
    fn go_on_unchecked(&mut self, reason: String) -> Effect {
        self.stage = Stage::Unchecked(reason);
        Effect::PassRequest
    }

    /// Who asks for which call on a legacy route, decided on the request. `/get_token`
    /// names its user in `member.claimed_user_id`, which lk-jwt-service 0.4.0+ issues a
    /// token for only when the OpenID check proves it (a claim of another server than the
    /// OpenID token's is not trusted: see [`claim_provable`]). A `/sfu/get` body names none:
    /// its OpenID token is shown to Synapse once the room turns out to have a limit
    /// ([`Admission::requester`]). `None` when the request goes on undecided.
    pub(super) fn read_legacy_request(
        &mut self,
        body: &[u8],
        effects: &mut Vec<Effect>,
    ) -> Option<TokenRequest> {
        let request = match token_request::parse(body) {
            Ok(request) if request.shape == Shape::New && request.claimed_user_id.is_empty() => {
                Err("the body claims no user (member.claimed_user_id)".to_owned())
            }
            read => read.map_err(|e| e.to_string()),
        };
        let request = match request {
            Ok(request) => request,
            Err(reason) => {
                effects.push(self.go_on_unchecked(reason));
                return None;
            }
        };
        let (requester, identity) = match request.shape {
            Shape::New => (
                request.claimed_user_id.clone(),
                hash_of_strings(&[
                    &request.claimed_user_id,
                    &request.claimed_device_id,
                    &request.member_id,
                ]),
            ),
            Shape::Legacy => (String::new(), String::new()), // from the OpenID token
        };
        self.stage = Stage::Deciding(Subject {
            room: room_alias(&request.room, request.slot()),
            identity,
            requester,
            unverified: false,
        });
        Some(request)
    }

    /// A legacy request's requester, once the room has a limit. `/sfu/get`: its OpenID
    /// token's user as Synapse says (asked once). When Synapse does not vouch for the token
    /// (another homeserver's, one naming a server other than `synapse.server_name`, or none
    /// valid), or cannot be asked, the stand-in of the server the token names asks instead
    /// ([`unverified_stand_in`]), which only ever takes a free place: the limit holds either
    /// way. `/get_token`: the claimed user, unless the claim is of another server than the
    /// OpenID token's: then the same stand-in.
    /// `None`: wait (or the request ended), with `effects` to carry out.
    pub(super) fn requester(
        &mut self,
        request: &TokenRequest,
        env: &Env,
        effects: &mut Vec<Effect>,
    ) -> Option<Subject> {
        let Stage::Deciding(subject) = &self.stage else {
            return None;
        };
        let subject = subject.clone();
        // Only a legacy request decided on the request is still to be named: a token read on
        // the response names its own requester, even when that name is empty.
        if self.route != Route::Legacy || !self.on_request || subject.unverified {
            return Some(subject);
        }
        if request.shape == Shape::New {
            if claim_provable(request) {
                return Some(subject);
            }
            let reason = "the claimed user is of another server than the OpenID token's";
            return Some(self.unverified(subject, request, reason.to_owned(), effects));
        }
        if !subject.requester.is_empty() {
            return Some(subject);
        }
        let mut subject = subject;
        let openid = &request.openid;
        let cfg = env.config;
        let ours = cfg.synapse.server_name.as_deref().map_or(true, |ours| {
            rtc_request::same_server(&openid.matrix_server_name, ours)
        });
        if ours && matches!(self.userinfo, Lookup::Unknown) {
            // Asked before with the same token: its user never changes.
            let key = openid_key(request);
            if let Some(Cached::Known(VerifiedUser(user))) =
                OPENID_USERS.peek(env.store, &key, env.now_ms())
            {
                effects.push(Effect::Count(Counter::OpenidCacheHits));
                self.userinfo = Lookup::Known(Userinfo::User(user));
            }
        }
        let unverified = match &self.userinfo {
            _ if !ours => "the OpenID token names another homeserver".to_owned(),
            Lookup::Unknown
                if !budget::take(env.store, cfg.synapse.max_lookups_per_second, env.now_ms()) =>
            {
                effects.push(Effect::Count(Counter::LookupsOverBudget));
                "the process's budget of Synapse lookups is spent".to_owned()
            }
            Lookup::Unknown => {
                self.userinfo = Lookup::Asking;
                let request = openid::userinfo_request(openid.access_token.expose());
                let call = call(CallKind::Userinfo, &cfg.synapse.upstream, request);
                effects.extend([
                    Effect::Count(Counter::OpenidLookups),
                    Effect::Dispatch(call),
                ]);
                return None;
            }
            Lookup::Asking | Lookup::AskedByOther => return None,
            Lookup::Known(Userinfo::User(user)) => {
                subject.identity = format!("{user}:{}", request.device_id);
                subject.requester = user.clone();
                self.stage = Stage::Deciding(subject.clone());
                return Some(subject);
            }
            Lookup::Known(Userinfo::Unknown(reason)) => reason.clone(),
            Lookup::Failed(reason) => {
                // Whatever `failure_mode` says: deciding on a free place never lifts the limit.
                log::warn!(
                    "room {}: OpenID check failed: {reason}; deciding as for a requester \
                     nobody verified",
                    clip(&request.room)
                );
                format!("OpenID check failed: {reason}")
            }
        };
        Some(self.unverified(subject, request, unverified, effects))
    }

    /// Decides `subject` as a requester nobody verified (`why`): the stand-in of the server
    /// the request's OpenID token names asks, which only ever takes a free place, is never
    /// exempt and is never counted as a user it names.
    fn unverified(
        &mut self,
        mut subject: Subject,
        request: &TokenRequest,
        why: String,
        effects: &mut Vec<Effect>,
    ) -> Subject {
        effects.push(Effect::Count(Counter::UnverifiedRequesters));
        log::debug!(
            "room {}: who asks is not verified ({}): only a free place is taken",
            clip(&request.room),
            clip(&why)
        );
        subject.requester = unverified_stand_in(&request.openid.matrix_server_name);
        subject.unverified = true;
        self.stage = Stage::Deciding(subject.clone());
        subject
    }
}

/// Who stands in for the requesters of `server` nobody verified. One stand-in per server: an
/// account of that server mints fresh OpenID tokens at will, so a stand-in per token would let
/// it take every free place. The requesters of one server thus hold at most one place of a
/// room while their tokens are in flight (and none once the request ends without a token);
/// the token issued names its user, whose place it then is ([`crate::occupancy::issued`]).
pub(super) fn unverified_stand_in(server: &str) -> String {
    format!("unverified {}", hash_of_strings(&[server]))
}

/// Whether lk-jwt-service's OpenID check can prove a `/get_token` claim: the claimed user is
/// of the server the OpenID token names (compared as [`rtc_request::same_server`] compares
/// them, a port included). Not every lk-jwt-service build checks this itself, and a token
/// of one server proves nothing about another server's users.
pub(super) fn claim_provable(request: &TokenRequest) -> bool {
    of_token_server(&request.claimed_user_id, request)
}

/// Whether `user` is of the server the request's OpenID token names: the only users that
/// token's check can say anything of.
pub(super) fn of_token_server(user: &str, request: &TokenRequest) -> bool {
    rtc_request::server_of(user)
        .is_some_and(|server| rtc_request::same_server(server, &request.openid.matrix_server_name))
}

/// How long who an OpenID token belongs to is kept: Synapse's OpenID tokens live an hour, and
/// lk-jwt-service checks the token itself anyway (an expired one gets no token).
const OPENID_USER_TTL_MS: u64 = 3600 * 1000;

/// The cache key of a request's OpenID token: a hash of the server it names and the token, so
/// that the token is kept nowhere (neither in shared data nor in a VM's memo of names).
fn openid_key(request: &TokenRequest) -> String {
    let openid = &request.openid;
    hash_of_strings(&[&openid.matrix_server_name, openid.access_token.expose()])
}

impl Admission {
    /// Synapse's userinfo answer for this request's OpenID token: kept for later requests with
    /// the same token when it names a user.
    pub(super) fn on_userinfo(&mut self, status: Option<u32>, body: &[u8], env: &Env) {
        let Some(Ok(request)) = &self.request else {
            return;
        };
        let server = &request.openid.matrix_server_name;
        self.userinfo = match openid::parse_userinfo(status, body, server) {
            Ok(Userinfo::User(user)) => {
                let life = Lifetimes {
                    ttl_ms: OPENID_USER_TTL_MS,
                    stale_ms: 0,
                };
                let key = openid_key(request);
                let known = VerifiedUser(user.clone());
                if let Err(e) =
                    OPENID_USERS.store_answer(env.store, &key, known, env.now_ms(), life)
                {
                    log::debug!("who an OpenID token belongs to was not kept: {e}");
                }
                Lookup::Known(Userinfo::User(user))
            }
            Ok(unknown) => Lookup::Known(unknown),
            Err(reason) => Lookup::Failed(reason),
        };
    }
}
