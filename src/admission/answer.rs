//! Step 3, lk-jwt-service's answer: a refusal or a stream cut short gives the place back, the
//! token of a request-phase admission is checked as it passes and makes the place its user's,
//! and a held 200 (decision on the response) is read for who asks.

use super::*;

impl Admission {
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
    pub(super) fn on_watched_response_headers(
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
    pub(super) fn release(
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
    pub(super) fn issued(
        &self,
        watch: &Watch,
        hold: Option<Hold>,
        identity: &str,
        env: &Env,
    ) -> Vec<Effect> {
        let Some(hold) = hold else {
            return Vec::new();
        };
        let owner = match &self.request {
            Some(Ok(request)) if hold.unverified => {
                let user = requester_of_identity(identity, &request.device_id);
                requester::of_token_server(user, request).then_some(user)
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

    pub(super) fn mismatch(&mut self, watch: &Watch, reason: String) -> Vec<Effect> {
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
}

/// The Matrix user asking, as lk-jwt-service verified it: the OpenID-verified claim of a
/// new-shape request (lk-jwt-service issues a token only when it holds), else the
/// `<user>:<device_id>` identity minus the device id the request named. Device ids, member ids
/// and slots are the client's choice; none of them makes one user count as several.
pub(super) fn requester_of<'a>(request: &'a TokenRequest, claims: &'a JoinClaims) -> &'a str {
    if request.shape == Shape::New && !request.claimed_user_id.is_empty() {
        &request.claimed_user_id
    } else {
        requester_of_identity(&claims.identity, &request.device_id)
    }
}
