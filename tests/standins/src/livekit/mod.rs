//! Stand-in for the LiveKit server's RoomService Twirp API (JSON only, just
//! `ListParticipants`) plus a test control API under `/_standin/` to seed
//! rooms, simulate clients joining with their join tokens, and slow the
//! server down.

pub mod protojson;

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use livekit_api::access_token::{
    AccessToken, AccessTokenError, Claims, TokenVerifier, VideoGrants,
};
use serde::Deserialize;
use serde_json::json;

use crate::cli::Credentials;
use crate::http::{Reply, Request};
use protojson::{
    kind_from_claim, parse_state, ListParticipantsResponse, ParticipantInfo, ParticipantPermission,
    TwirpError,
};

/// Path of the only Twirp method served.
pub const LIST_PARTICIPANTS: &str = "/twirp/livekit.RoomService/ListParticipants";

/// Lifetime of tokens printed by `--mint-admin-token`.
pub const ADMIN_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// An admin token for one room, as a server SDK mints for `ListParticipants`.
pub fn admin_token(credentials: &Credentials, room: &str) -> Result<String, String> {
    AccessToken::with_api_key(&credentials.key, &credentials.secret)
        .with_grants(VideoGrants {
            room_admin: true,
            room: room.to_owned(),
            ..Default::default()
        })
        .with_ttl(ADMIN_TOKEN_TTL)
        .to_jwt()
        .map_err(|e| e.to_string())
}

#[derive(Debug, Clone)]
struct Participant {
    sid: String,
    identity: String,
    state: &'static str,
    name: String,
    metadata: String,
    joined_at_ms: u64,
    version: u32,
    permission: ParticipantPermission,
    kind: &'static str,
    attributes: BTreeMap<String, String>,
}

impl Participant {
    fn info(&self) -> ParticipantInfo {
        ParticipantInfo {
            sid: self.sid.clone(),
            identity: self.identity.clone(),
            state: self.state,
            tracks: [],
            metadata: self.metadata.clone(),
            joined_at: (self.joined_at_ms / 1000).to_string(),
            joined_at_ms: self.joined_at_ms.to_string(),
            name: self.name.clone(),
            version: self.version,
            permission: self.permission.clone(),
            region: String::new(),
            is_publisher: false,
            kind: self.kind,
            attributes: self.attributes.clone(),
            disconnect_reason: "UNKNOWN_REASON",
            kind_details: [],
            data_tracks: [],
            client_protocol: 0,
            capabilities: [],
        }
    }
}

#[derive(Debug, Default)]
struct State {
    /// Room name to participants in join order.
    rooms: BTreeMap<String, Vec<Participant>>,
    delay_ms: u64,
    list_participants_calls: u64,
    next_sid: u64,
}

impl State {
    fn new_participant(&mut self, identity: &str, state: &'static str) -> Participant {
        self.next_sid += 1;
        Participant {
            sid: format!("PA_{:012x}", self.next_sid),
            identity: identity.to_owned(),
            state,
            name: String::new(),
            metadata: String::new(),
            joined_at_ms: now_ms(),
            version: 0,
            permission: ParticipantPermission::default(),
            kind: "STANDARD",
            attributes: BTreeMap::new(),
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The LiveKit stand-in: credentials plus the in-memory room state.
pub struct LiveKit {
    verifier: TokenVerifier,
    state: Mutex<State>,
}

fn twirp_error(status: u16, code: &'static str, msg: impl Into<String>) -> Reply {
    Reply::json_value(
        status,
        &TwirpError {
            code,
            msg: msg.into(),
        },
    )
}

/// `AccessTokenError` reports every verification failure as "failed to
/// encode jwt"; the wrapped jsonwebtoken error says what actually failed.
fn token_error(err: &AccessTokenError) -> String {
    let cause = std::error::Error::source(err).map_or_else(|| err.to_string(), ToString::to_string);
    format!("invalid token: {cause}")
}

fn control_error(status: u16, msg: impl std::fmt::Display) -> Reply {
    Reply::json_value(status, &json!({ "error": msg.to_string() }))
}

/// Decodes a control API body strictly (unknown fields are mistakes in a test).
fn control_body<'a, T: Deserialize<'a>>(req: &'a Request) -> Result<T, Reply> {
    serde_json::from_slice(&req.body)
        .map_err(|e| control_error(400, format!("bad request body: {e}")))
}

fn state_or_active(state: Option<&str>) -> Result<&'static str, Reply> {
    match state {
        None => Ok("ACTIVE"),
        Some(s) => parse_state(s).ok_or_else(|| {
            control_error(
                400,
                format!("state must be one of {}", protojson::STATES.join(", ")),
            )
        }),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SeedParticipant {
    identity: String,
    #[serde(default)]
    state: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    metadata: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RoomsBody {
    room: String,
    #[serde(default)]
    participants: Vec<SeedParticipant>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JoinBody {
    token: String,
    #[serde(default)]
    state: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LeaveBody {
    room: String,
    identity: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigBody {
    delay_ms: u64,
}

impl LiveKit {
    pub fn new(credentials: &Credentials) -> Self {
        LiveKit {
            verifier: TokenVerifier::with_api_key(&credentials.key, &credentials.secret),
            state: Mutex::new(State::default()),
        }
    }

    /// The state stays usable even if a thread panicked while holding it.
    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Answers one request.
    pub fn handle(&self, req: &Request) -> Reply {
        if req.path.starts_with("/twirp/") {
            return self.twirp(req);
        }
        if let Some(endpoint) = req.path.strip_prefix("/_standin/") {
            return self.control(endpoint, req);
        }
        Reply::empty(404)
            .with_header("Content-Type", "text/plain; charset=utf-8")
            .with_body("404 page not found\n")
    }

    /// Twirp routing, in the order the real server applies its layers: the
    /// auth middleware rejects a bad token first, then Twirp checks route,
    /// method and content type, decodes the body, and the service checks
    /// the grants.
    fn twirp(&self, req: &Request) -> Reply {
        if req.path == LIST_PARTICIPANTS {
            // Every attempt counts, including rejected ones: tests use this
            // to see whether the filter consulted LiveKit at all.
            self.state().list_participants_calls += 1;
        }
        let claims = match req.header("Authorization") {
            None | Some("") => None,
            Some(value) => match value.strip_prefix("Bearer ") {
                None => {
                    return twirp_error(
                        401,
                        "unauthenticated",
                        "invalid authorization header. Must start with Bearer ",
                    )
                }
                Some(token) => match self.verifier.verify(token.trim()) {
                    Ok(claims) => Some(claims),
                    Err(e) => return twirp_error(401, "unauthenticated", token_error(&e)),
                },
            },
        };

        if req.path != LIST_PARTICIPANTS {
            return twirp_error(
                404,
                "bad_route",
                format!("no handler for path {:?}", req.path),
            );
        }
        if req.method != "POST" {
            return twirp_error(
                404,
                "bad_route",
                format!("unsupported method {:?} (only POST is allowed)", req.method),
            );
        }

        let content_type = req.header("Content-Type").unwrap_or_default();
        let media_type = content_type.split(';').next().unwrap_or_default().trim();
        if !media_type.eq_ignore_ascii_case("application/json") {
            // The real server also speaks application/protobuf; this one does not.
            return twirp_error(
                404,
                "bad_route",
                format!("unexpected Content-Type: {content_type:?}"),
            );
        }
        let Some(room) = list_participants_room(&req.body) else {
            return twirp_error(400, "malformed", "the json request could not be decoded");
        };
        if !claims.is_some_and(|c| c.video.room_admin && c.video.room == room) {
            return twirp_error(401, "unauthenticated", "permissions denied");
        }

        let delay = self.state().delay_ms;
        if delay > 0 {
            std::thread::sleep(Duration::from_millis(delay));
        }
        let participants = self
            .state()
            .rooms
            .get(&room)
            .map(|ps| ps.iter().map(Participant::info).collect())
            .unwrap_or_default();
        Reply::json_value(200, &ListParticipantsResponse { participants })
    }

    fn control(&self, endpoint: &str, req: &Request) -> Reply {
        let result = match (req.method.as_str(), endpoint) {
            ("POST", "rooms") => self.seed_room(req),
            ("POST", "join") => self.join(req),
            ("POST", "leave") => self.leave(req),
            ("POST", "config") => self.configure(req),
            ("POST", "reset") => {
                *self.state() = State::default();
                Ok(json!({}))
            }
            ("GET", "stats") => Ok(self.stats()),
            (_, "rooms" | "join" | "leave" | "config" | "reset" | "stats") => {
                Err(control_error(405, format!("{} not allowed", req.method)))
            }
            _ => Err(control_error(
                404,
                format!("no control endpoint {:?}", req.path),
            )),
        };
        match result {
            Ok(value) => Reply::json_value(200, &value),
            Err(reply) => reply,
        }
    }

    fn seed_room(&self, req: &Request) -> Result<serde_json::Value, Reply> {
        let body: RoomsBody = control_body(req)?;
        if body.room.is_empty() {
            return Err(control_error(400, "room must not be empty"));
        }
        let mut state = self.state();
        let mut participants: Vec<Participant> = Vec::new();
        for seed in &body.participants {
            if seed.identity.is_empty() {
                return Err(control_error(400, "identity must not be empty"));
            }
            if participants.iter().any(|p| p.identity == seed.identity) {
                return Err(control_error(
                    400,
                    format!("duplicate identity {:?}", seed.identity),
                ));
            }
            let mut p =
                state.new_participant(&seed.identity, state_or_active(seed.state.as_deref())?);
            p.name.clone_from(&seed.name);
            p.metadata.clone_from(&seed.metadata);
            participants.push(p);
        }
        let count = participants.len();
        if participants.is_empty() {
            state.rooms.remove(&body.room);
        } else {
            state.rooms.insert(body.room.clone(), participants);
        }
        Ok(json!({ "room": body.room, "participants": count }))
    }

    /// Like a client connecting with its join token: the identity and room
    /// come from the verified token, never from the request.
    fn join(&self, req: &Request) -> Result<serde_json::Value, Reply> {
        let body: JoinBody = control_body(req)?;
        let new_state = state_or_active(body.state.as_deref())?;
        let claims: Claims = self
            .verifier
            .verify(body.token.trim())
            .map_err(|e| control_error(401, token_error(&e)))?;
        let grants = &claims.video;
        if !grants.room_join || grants.room.is_empty() || claims.sub.is_empty() {
            return Err(control_error(
                401,
                "token does not grant roomJoin with a room and identity",
            ));
        }

        let mut state = self.state();
        let existing = state
            .rooms
            .get_mut(&grants.room)
            .and_then(|ps| ps.iter_mut().find(|p| p.identity == claims.sub));
        if let Some(p) = existing {
            p.state = new_state;
            p.version += 1;
        } else {
            let mut p = state.new_participant(&claims.sub, new_state);
            p.name.clone_from(&claims.name);
            p.metadata.clone_from(&claims.metadata);
            p.kind = kind_from_claim(&claims.kind);
            p.attributes = claims
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            p.permission = ParticipantPermission {
                can_subscribe: grants.can_subscribe(),
                can_publish: grants.can_publish(),
                can_publish_data: grants.can_publish_data(),
                can_publish_sources: grants.can_publish_sources.clone(),
                hidden: grants.hidden,
                recorder: grants.recorder,
                can_update_metadata: grants.can_update_own_metadata(),
                agent: grants.agent,
                ..ParticipantPermission::default()
            };
            state.rooms.entry(grants.room.clone()).or_default().push(p);
        }
        Ok(json!({ "room": grants.room, "identity": claims.sub }))
    }

    fn leave(&self, req: &Request) -> Result<serde_json::Value, Reply> {
        let body: LeaveBody = control_body(req)?;
        let mut state = self.state();
        let mut removed = false;
        if let Some(ps) = state.rooms.get_mut(&body.room) {
            let before = ps.len();
            ps.retain(|p| p.identity != body.identity);
            removed = ps.len() != before;
            if ps.is_empty() {
                state.rooms.remove(&body.room);
            }
        }
        Ok(json!({ "room": body.room, "identity": body.identity, "removed": removed }))
    }

    fn configure(&self, req: &Request) -> Result<serde_json::Value, Reply> {
        let body: ConfigBody = control_body(req)?;
        self.state().delay_ms = body.delay_ms;
        Ok(json!({ "delay_ms": body.delay_ms }))
    }

    fn stats(&self) -> serde_json::Value {
        let state = self.state();
        let rooms: BTreeMap<&str, usize> = state
            .rooms
            .iter()
            .map(|(k, v)| (k.as_str(), v.len()))
            .collect();
        json!({ "list_participants_calls": state.list_participants_calls, "rooms": rooms })
    }
}

/// The `room` of a `ListParticipantsRequest` in protojson, or `None` if the
/// body is not a JSON object or `room` is not a string. Unknown fields are
/// ignored, as Twirp's JSON decoder discards them.
fn list_participants_room(body: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(body).ok()?;
    match value.as_object()?.get("room") {
        None | Some(serde_json::Value::Null) => Some(String::new()),
        Some(serde_json::Value::String(room)) => Some(room.clone()),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests;
