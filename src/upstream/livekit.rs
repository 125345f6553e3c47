//! Who is in a LiveKit room, through the RoomService `ListParticipants` Twirp call.

use serde::Deserialize;

use crate::occupancy::session::Session;
use crate::request::json::{self, Scalar};
use crate::upstream::call::{CallError, Request, Service};
use crate::upstream::jwt;

pub const LIST_PARTICIPANTS_PATH: &str = "/twirp/livekit.RoomService/ListParticipants";

/// The `ListParticipants` call for `room`, with an admin token for exactly that room minted
/// from the API key and secret (`now_s`: seconds since the epoch).
pub fn list_request(room: &str, api_key: &str, api_secret: &str, now_s: u64) -> Request {
    let token = jwt::admin_token(api_key, api_secret, room, now_s);
    Request {
        method: "POST",
        path: LIST_PARTICIPANTS_PATH.to_owned(),
        headers: vec![
            ("authorization".into(), format!("Bearer {token}")),
            ("content-type".into(), "application/json".into()),
        ],
        body: list_participants_body(room),
    }
}

/// The JSON body of a `ListParticipants` call for `room`.
pub fn list_participants_body(room: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Body<'a> {
        room: &'a str,
    }
    serde_json::to_vec(&Body { room }).unwrap_or_default()
}

/// The part of a `ListParticipants` answer the guard reads. Every other field (metadata,
/// attributes, tracks, set by participants themselves and as large as they like) is skipped
/// by the parser without being copied, so memory stays bounded by the answer's own buffer.
#[derive(Deserialize)]
struct ListAnswer {
    /// Required: LiveKit's Twirp JSON emits defaults, so even a room that does not exist
    /// answers `{"participants":[]}` (seen with livekit-server 1.13). An answer without the
    /// list is not a participant list, and must not pass for an empty room.
    participants: Vec<Participant>,
}

#[derive(Deserialize)]
struct Participant {
    #[serde(default)]
    identity: Option<String>,
    /// `ParticipantInfo.State`: protojson writes the name, a client writing enums as numbers
    /// the number (`DISCONNECTED` is 3).
    #[serde(default)]
    state: Scalar,
    /// When the participant's session began (ms): protojson writes int64 as a string.
    #[serde(default, alias = "joinedAtMs")]
    joined_at_ms: Scalar,
    /// The same in seconds, all that LiveKit versions without `joined_at_ms` give.
    #[serde(default, alias = "joinedAt")]
    joined_at: Scalar,
    /// The session's id: each connection gets a new one.
    #[serde(default)]
    sid: Scalar,
}

/// The participants of a room that hold a place: their identities, and each one's session,
/// in the same order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ParticipantList {
    pub identities: Vec<String>,
    pub sessions: Vec<Session>,
}

impl Participant {
    fn holds_a_place(&self) -> bool {
        self.state.as_str() != Some("DISCONNECTED") && self.state.as_whole_number() != Some(3)
    }
}

/// The participants that still hold a place in the room.
pub fn parse_list_response(status: Option<u32>, body: &[u8]) -> Result<ParticipantList, CallError> {
    match status {
        None => return Err(CallError::NoResponse(Service::LiveKit)),
        Some(200) => {}
        Some(other) => return Err(CallError::Status(Service::LiveKit, other)),
    }
    let answer: ListAnswer = json::object(body).ok_or(CallError::BadBody(Service::LiveKit))?;
    let mut list = ParticipantList::default();
    for p in answer
        .participants
        .into_iter()
        .filter(Participant::holds_a_place)
    {
        let ms = whole_number(&p.joined_at_ms);
        let s = whole_number(&p.joined_at);
        list.sessions
            .push(Session::of(ms, s, p.sid.as_str().unwrap_or_default()));
        list.identities.push(p.identity.unwrap_or_default());
    }
    Ok(list)
}

/// An int64 as protojson writes it (a string), or as a number; 0 otherwise.
pub fn whole_number(value: &Scalar) -> u64 {
    match value.as_str() {
        Some(text) => text.parse().unwrap_or(0),
        None => value.as_whole_number().unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[cfg(target_arch = "wasm32")]
    use wasm_bindgen_test::wasm_bindgen_test as test;

    #[test]
    fn body_names_the_room() {
        assert_eq!(
            list_participants_body("a+b/\"c"),
            br#"{"room":"a+b/\"c"}"#.to_vec()
        );
    }

    #[test]
    fn reads_protojson_participants_and_skips_disconnected_ones() {
        let body = br#"{"participants":[
            {"sid":"PA_1","identity":"@a:x:D1","state":"ACTIVE","tracks":[],"joined_at":"1700000000","kind":"STANDARD"},
            {"sid":"PA_2","identity":"@b:x:D1","state":"JOINING"},
            {"sid":"PA_3","identity":"@c:x:D1","state":"DISCONNECTED"},
            {"sid":"PA_4","identity":"@d:x:D1","state":3},
            {"sid":"PA_5","identity":"@e:x:D1"}
        ]}"#;
        assert_eq!(
            parse_list_response(Some(200), body).unwrap().identities,
            ["@a:x:D1", "@b:x:D1", "@e:x:D1"]
        );
    }

    #[test]
    fn reads_each_sessions_start_as_protojson_or_a_client_writes_it() {
        let body = br#"{"participants":[
            {"identity":"a","joined_at_ms":"1700000000123"},
            {"identity":"b","joinedAtMs":1700000000456},
            {"identity":"c","joined_at_ms":"soon"},
            {"identity":"d"}
        ]}"#;
        let list = parse_list_response(Some(200), body).unwrap();
        assert_eq!(list.identities, ["a", "b", "c", "d"]);
        let starts: Vec<u64> = list.sessions.iter().map(|s| s.start).collect();
        assert_eq!(starts, [1_700_000_000_123, 1_700_000_000_456, 0, 0]);
        // A LiveKit without `joined_at_ms`: the seconds, and the sid that tells sessions of
        // one second apart.
        let body = br#"{"participants":[
            {"sid":"PA_1","identity":"a","joined_at":"1700000000","joined_at_ms":"0"},
            {"sid":"PA_2","identity":"b","joinedAt":1700000001,"joinedAtMs":1700000001234}
        ]}"#;
        let list = parse_list_response(Some(200), body).unwrap();
        assert_eq!(
            list.sessions,
            [
                Session::of(0, 1_700_000_000, "PA_1"),
                Session::at(1_700_000_001_234)
            ]
        );
        assert_eq!(list.sessions[0].sid, "PA_1");
    }

    #[test]
    fn a_state_of_another_type_holds_a_place() {
        // Counting such a participant can only make the limit stricter; the list stays readable.
        let body = br#"{"participants":[
            {"identity":"@a:x:D1","state":{"name":"DISCONNECTED"}},
            {"identity":"@b:x:D1","state":["DISCONNECTED"]},
            {"identity":"@c:x:D1","state":true},
            {"identity":"@d:x:D1","state":3.0},
            {"identity":"@e:x:D1","state":null}
        ]}"#;
        assert_eq!(
            parse_list_response(Some(200), body).unwrap().identities,
            ["@a:x:D1", "@b:x:D1", "@c:x:D1", "@e:x:D1"]
        );
    }

    #[test]
    fn empty_room_and_failures() {
        assert_eq!(
            parse_list_response(Some(200), b"{}"),
            Err(CallError::BadBody(Service::LiveKit))
        );
        assert_eq!(
            parse_list_response(Some(200), br#"{"participants":null}"#),
            Err(CallError::BadBody(Service::LiveKit))
        );
        assert_eq!(
            parse_list_response(Some(200), br#"{"participants":[]}"#),
            Ok(ParticipantList::default())
        );
        assert_eq!(
            parse_list_response(Some(401), br#"{"code":"unauthenticated"}"#),
            Err(CallError::Status(Service::LiveKit, 401))
        );
        assert_eq!(
            parse_list_response(None, b""),
            Err(CallError::NoResponse(Service::LiveKit))
        );
        assert_eq!(
            parse_list_response(Some(200), b"{\"participants\":[{"),
            Err(CallError::BadBody(Service::LiveKit))
        );
        assert_eq!(
            parse_list_response(Some(200), b"<html>"),
            Err(CallError::BadBody(Service::LiveKit))
        );
        for not_a_list in [
            &br#"{"participants":{}}"#[..],
            br#"{"participants":[{"identity":5}]}"#,
            br#"[]"#,
        ] {
            assert_eq!(
                parse_list_response(Some(200), not_a_list),
                Err(CallError::BadBody(Service::LiveKit))
            );
        }
    }

    #[test]
    fn reads_lists_of_any_size_keeping_only_identity_and_state() {
        // Participants set their own metadata; megabytes of it must not stop the check.
        let metadata = "m".repeat(1 << 20);
        let participants: Vec<String> = (0..6)
            .map(|n| {
                format!(
                    r#"{{"sid":"PA_{n}","identity":"@u{n}:x:D","state":"ACTIVE","metadata":"{metadata}","attributes":{{"k":"{metadata}"}},"tracks":[{{"sid":"TR","name":"{metadata}"}}]}}"#
                )
            })
            .collect();
        let body = format!(r#"{{"participants":[{}]}}"#, participants.join(","));
        assert!(body.len() > 12 << 20);
        let identities = parse_list_response(Some(200), body.as_bytes())
            .unwrap()
            .identities;
        assert_eq!(identities.len(), 6);
        assert_eq!(identities[5], "@u5:x:D");
    }
}
