//! LiveKit's webhooks, as they pass through Envoy: checked the way LiveKit's SDKs check them,
//! then read for what they say of a room ([`crate::occupancy::presence`]).
//!
//! LiveKit posts each event as protojson (`Content-Type: application/webhook+json`, camelCase
//! keys, int64 values as strings) with `Authorization: <JWT>` (no `Bearer`): HS256 signed with
//! the API secret, `iss` = the API key, valid five minutes, and a `sha256` claim holding the
//! standard base64 of the SHA-256 of the exact body bytes. The guard checks the signature and
//! times (with the SDKs' minute of leeway) as soon as the headers are here, hashes the body as
//! it streams past, and reads it only once the hash matches. Anything else is refused and
//! counted; it changes nothing.
//!
//! A body is kept for reading up to [`MAX_WEBHOOK_BODY`] bytes. A webhook LiveKit signed that
//! the guard cannot read (longer, or not the JSON expected) may have been about any room: it
//! puts every room's view in doubt ([`crate::occupancy::view::doubt`]), so decisions ask LiveKit
//! again.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::counter::Counter;
use crate::occupancy::presence::{self, RoomEvent};
use crate::occupancy::session::Session;
use crate::occupancy::view::{self, Presence};
use crate::request::json::{self, Scalar};
use crate::request::text::clip;
use crate::state::store::SharedStore;
use crate::upstream::livekit::whole_number;

/// The most of a webhook body kept for reading. LiveKit's events carry the room (with its
/// metadata) and the participant (with theirs, up to LiveKit's metadata limits).
pub const MAX_WEBHOOK_BODY: usize = 1 << 20;
/// How far the token's times may be off, as LiveKit's Go and Python SDKs allow.
const LEEWAY_SECONDS: u64 = 60;

/// Why a webhook is not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization` header.
    Unsigned,
    /// The header is not an HS256 JWT with the claims LiveKit sets.
    Malformed,
    /// Signed by another key (`iss`) than the guard's.
    OtherKey,
    /// The signature does not match the API secret.
    BadSignature,
    /// Expired, or not valid yet.
    OutOfTime,
    /// The body is not the one the token was signed for.
    BodyMismatch,
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Refusal::Unsigned => "no Authorization header",
            Refusal::Malformed => "Authorization is not a LiveKit webhook token",
            Refusal::OtherKey => "signed for another API key",
            Refusal::BadSignature => "signature does not match the API secret",
            Refusal::OutOfTime => "token expired or not yet valid",
            Refusal::BodyMismatch => "body does not match the token's sha256",
        })
    }
}

/// What became of a webhook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Received {
    Refused(Refusal),
    /// Signed by LiveKit, but not readable: every view is in doubt.
    Unreadable(&'static str),
    /// Signed and read: the LiveKit room, and what it says of it (`None`: an event the guard
    /// has no use for, such as `track_published` or `egress_ended`).
    Read(Option<(String, RoomEvent)>),
}

/// One webhook on its way: the body hashed and kept as it streams past.
pub struct Intake {
    /// The body hash the token vouches for, or why there is none.
    signed_for: Result<[u8; 32], Refusal>,
    hasher: Sha256,
    body: Vec<u8>,
    too_long: bool,
}

impl Intake {
    /// Starts on a webhook's `Authorization` header, checked against the API key and secret
    /// at `now_s` (seconds since the epoch).
    pub fn new(
        authorization: Option<&[u8]>,
        api_key: &str,
        api_secret: &str,
        now_s: u64,
    ) -> Intake {
        let signed_for = match authorization {
            None => Err(Refusal::Unsigned),
            Some(value) => std::str::from_utf8(value)
                .map_err(|_| Refusal::Malformed)
                .and_then(|token| verify(token, api_key, api_secret, now_s)),
        };
        Intake {
            signed_for,
            hasher: Sha256::new(),
            body: Vec::new(),
            too_long: false,
        }
    }

    /// Whether the token is refused already (the body need not be read).
    pub fn refused(&self) -> Option<Refusal> {
        self.signed_for.err()
    }

    /// Takes in the next part of the body.
    pub fn feed(&mut self, chunk: &[u8]) {
        if self.signed_for.is_err() {
            return;
        }
        self.hasher.update(chunk);
        if self.body.len() + chunk.len() <= MAX_WEBHOOK_BODY {
            self.body.extend_from_slice(chunk);
        } else {
            self.too_long = true;
            self.body = Vec::new();
        }
    }

    /// The body will not be read: an answer came before it was whole (an upstream that
    /// answered on the headers alone), and the host passes no more of it to the filter. A
    /// webhook LiveKit signed is then lost to the guard: unreadable.
    pub fn cut_short(self) -> Received {
        match self.signed_for {
            Ok(_) => Received::Unreadable("answered upstream before its body was read"),
            Err(refusal) => Received::Refused(refusal),
        }
    }

    /// The body is complete: checks it against the token and reads it.
    pub fn finish(self) -> Received {
        let expected = match self.signed_for {
            Ok(expected) => expected,
            Err(refusal) => return Received::Refused(refusal),
        };
        let actual: [u8; 32] = self.hasher.finalize().into();
        if !same(&actual, &expected) {
            return Received::Refused(Refusal::BodyMismatch);
        }
        if self.too_long {
            return Received::Unreadable("body longer than the guard reads");
        }
        match read_event(&self.body) {
            Some(event) => Received::Read(event),
            None => Received::Unreadable("body is not a LiveKit webhook event"),
        }
    }
}

/// Takes in a complete webhook at `now_ms`: the room's record learns what it says (or every
/// view is put in doubt, for a webhook LiveKit signed that is not read); its counters.
pub fn settle(received: &Received, store: &dyn SharedStore, now_ms: u64) -> Vec<Counter> {
    let mut counters = vec![Counter::WebhooksReceived];
    match received {
        Received::Refused(why) => {
            log::debug!("LiveKit webhook refused: {why}");
            counters.push(Counter::WebhooksRefused);
        }
        Received::Unreadable(why) => {
            log::warn!(
                "LiveKit webhook signed but not read ({why}): rooms are asked of LiveKit again"
            );
            view::doubt(store, now_ms);
            counters.push(Counter::WebhooksUnreadable);
        }
        Received::Read(event) => {
            counters.push(Counter::WebhooksAccepted);
            view::heard(store, now_ms);
            if let Some((room, event)) = event {
                if let Err(e) = presence::observe(store, room, event, now_ms) {
                    log::warn!(
                        "LiveKit webhook for room {} not recorded ({e}): rooms are asked of \
                         LiveKit again",
                        clip(room)
                    );
                    view::doubt(store, now_ms);
                }
            }
        }
    }
    counters
}

/// Constant-time comparison of two digests.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Deserialize)]
struct Header {
    #[serde(default)]
    alg: Scalar,
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    iss: Scalar,
    #[serde(default)]
    exp: Scalar,
    #[serde(default)]
    nbf: Scalar,
    #[serde(default)]
    sha256: Scalar,
}

/// Checks a webhook token; the body hash it vouches for.
fn verify(token: &str, api_key: &str, api_secret: &str, now_s: u64) -> Result<[u8; 32], Refusal> {
    // LiveKit sends the bare token; a `Bearer` scheme is read as well.
    let token = token.trim();
    let token = token.strip_prefix("Bearer ").unwrap_or(token).trim_start();
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Refusal::Malformed);
    };
    let decode = |part: &str| URL_SAFE_NO_PAD.decode(part).map_err(|_| Refusal::Malformed);
    let header: Header = json::object(&decode(header)?).ok_or(Refusal::Malformed)?;
    if header.alg.as_str() != Some("HS256") {
        return Err(Refusal::Malformed);
    }
    let claims: Claims = json::object(&decode(payload)?).ok_or(Refusal::Malformed)?;
    if claims.iss.as_str() != Some(api_key) {
        return Err(Refusal::OtherKey);
    }
    let signed = &token[..token.len() - signature.len() - 1];
    let mut mac =
        Hmac::<Sha256>::new_from_slice(api_secret.as_bytes()).map_err(|_| Refusal::Malformed)?;
    mac.update(signed.as_bytes());
    mac.verify_slice(&decode(signature)?)
        .map_err(|_| Refusal::BadSignature)?;
    let exp = claims.exp.as_whole_number().ok_or(Refusal::Malformed)?;
    let nbf = claims.nbf.as_whole_number().unwrap_or(0);
    if exp.saturating_add(LEEWAY_SECONDS) < now_s || nbf > now_s.saturating_add(LEEWAY_SECONDS) {
        return Err(Refusal::OutOfTime);
    }
    let sha256 = claims.sha256.as_str().ok_or(Refusal::Malformed)?;
    let sha256 = STANDARD
        .decode(sha256)
        .or_else(|_| STANDARD_NO_PAD.decode(sha256))
        .map_err(|_| Refusal::Malformed)?;
    sha256.try_into().map_err(|_| Refusal::Malformed)
}

/// The fields of a `WebhookEvent` the guard reads (protojson writes camelCase keys; a
/// protojson reader also takes the proto names).
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    event: Scalar,
    #[serde(default)]
    room: Option<Room>,
    #[serde(default)]
    participant: Option<Participant>,
}

#[derive(Deserialize)]
struct Room {
    #[serde(default)]
    name: Scalar,
}

#[derive(Deserialize)]
struct Participant {
    #[serde(default)]
    identity: Scalar,
    #[serde(default, rename = "joinedAtMs", alias = "joined_at_ms")]
    joined_at_ms: Scalar,
    #[serde(default, rename = "joinedAt", alias = "joined_at")]
    joined_at: Scalar,
    #[serde(default)]
    sid: Scalar,
}

/// Reads a webhook's body (only once its signature is checked, [`Intake`]): the room and what
/// the event says of it, if it is an event the guard uses; `None` when it is not an event as
/// LiveKit writes them (no event name; a room or participant event without
/// the room's name or the participant's identity).
#[allow(clippy::option_option)]
pub fn read_event(body: &[u8]) -> Option<Option<(String, RoomEvent)>> {
    let event: Event = json::object(body)?;
    let presence = match event.event.as_str()? {
        "participant_joined" => Some(Presence::Joined),
        "participant_left" | "participant_connection_aborted" => Some(Presence::Left),
        "room_finished" => None,
        _ => return Some(None),
    };
    let room = event.room.as_ref()?.name.as_str()?;
    if room.is_empty() {
        return None;
    }
    let Some(presence) = presence else {
        return Some(Some((room.to_owned(), RoomEvent::Finished)));
    };
    let participant = event.participant?;
    let identity = participant.identity.as_str()?;
    if identity.is_empty() {
        return None;
    }
    // The session began at `joinedAtMs`; LiveKit versions without it give `joinedAt` (s),
    // and then the sid tells sessions of one second apart.
    let session = Session::of(
        whole_number(&participant.joined_at_ms),
        whole_number(&participant.joined_at),
        participant.sid.as_str().unwrap_or_default(),
    );
    let event = RoomEvent::Participant {
        identity: identity.to_owned(),
        session,
        presence,
    };
    Some(Some((room.to_owned(), event)))
}

#[cfg(test)]
#[path = "webhook_tests.rs"]
mod tests;
