//! What the core's unit tests share: a configuration and the bodies Synapse, lk-jwt-service
//! and clients send, for one room.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

use crate::admission::CallKind;
use crate::config::Config;
use crate::request::livekit_names::room_alias;

pub const ROOM: &str = "!room:example.com";

/// A guard configuration (Synapse timeout 1 s), with `extra` keys appended (`, "key": value`).
pub fn config(extra: &str) -> Config {
    let json = format!(
        r#"{{"synapse": {{"cluster": "synapse", "admin_token": "syt_admin", "timeout_ms": 1000}},
            "livekit": {{"cluster": "livekit", "api_key": "devkey", "api_secret": "lk_secret"}}{extra}}}"#
    );
    Config::parse(json.as_bytes(), &|_| None).unwrap()
}

/// The limit lookup of [`ROOM`].
pub fn lookup() -> CallKind {
    CallKind::LimitLookup(ROOM.to_owned())
}

/// A legacy (`/sfu/get`) request body of `user` on `device` for [`ROOM`].
pub fn legacy_body(user: &str, device: &str) -> Vec<u8> {
    format!(
        r#"{{"room":"{ROOM}","openid_token":{{"access_token":"openid:{user}","token_type":"Bearer","matrix_server_name":"example.com","expires_in":3600}},"device_id":"{device}"}}"#
    )
    .into_bytes()
}

/// The LiveKit room lk-jwt-service derives for [`ROOM`]'s legacy requests.
pub fn legacy_alias() -> String {
    room_alias(ROOM, "m.call#ROOM")
}

/// lk-jwt-service's 200 body, with a token for `identity` into LiveKit room `room`.
pub fn issued(room: &str, identity: &str) -> Vec<u8> {
    let payload = format!(
        r#"{{"sub":"{identity}","exp":4000000000,"video":{{"room":"{room}","roomJoin":true}}}}"#
    );
    let jwt = format!(
        "eyJhbGciOiJIUzI1NiJ9.{}.sig",
        URL_SAFE_NO_PAD.encode(payload)
    );
    format!("{{\"url\":\"ws://sfu\",\"jwt\":\"{jwt}\"}}\n").into_bytes()
}

/// Synapse's state answer with a limit of `n`.
pub fn limit_answer(n: u32) -> Vec<u8> {
    format!(r#"{{"state":[{{"type":"io.lotus.voice_limit","state_key":"","content":{{"max_users":{n}}}}}]}}"#)
        .into_bytes()
}
