//! Who is in a LiveKit room, through the RoomService `ListParticipants` Twirp call.

use serde::Deserialize;

pub const LIST_PARTICIPANTS_PATH: &str = "/twirp/livekit.RoomService/ListParticipants";

/// The JSON body of a `ListParticipants` call for `room`.
pub fn list_participants_body(room: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "room": room })).unwrap_or_default()
}

/// Why a participant list could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListError {
    NoResponse,
    Status(u32),
    BadBody,
}

impl std::fmt::Display for ListError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListError::NoResponse => f.write_str("LiveKit gave no response"),
            ListError::Status(s) => write!(f, "LiveKit answered HTTP {s}"),
            ListError::BadBody => f.write_str("LiveKit's answer is not a participant list"),
        }
    }
}

#[derive(Deserialize)]
struct ListResponse {
    // protojson omits an empty repeated field unless defaults are emitted.
    #[serde(default)]
    participants: Vec<Participant>,
}

#[derive(Deserialize)]
struct Participant {
    #[serde(default)]
    identity: String,
    /// An enum name (`"ACTIVE"`) or, from a client that writes enums as numbers, 0..=3.
    #[serde(default)]
    state: serde_json::Value,
}

/// `DISCONNECTED` is `3` in LiveKit's `ParticipantInfo.State`.
fn is_disconnected(state: &serde_json::Value) -> bool {
    state.as_str() == Some("DISCONNECTED") || state.as_u64() == Some(3)
}

/// The identities of the participants that still hold a place in the room.
pub fn parse_list_response(status: Option<u32>, body: &[u8]) -> Result<Vec<String>, ListError> {
    match status {
        None => return Err(ListError::NoResponse),
        Some(200) => {}
        Some(other) => return Err(ListError::Status(other)),
    }
    let response: ListResponse = serde_json::from_slice(body).map_err(|_| ListError::BadBody)?;
    Ok(response
        .participants
        .into_iter()
        .filter(|p| !is_disconnected(&p.state))
        .map(|p| p.identity)
        .collect())
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
            parse_list_response(Some(200), body).unwrap(),
            ["@a:x:D1", "@b:x:D1", "@e:x:D1"]
        );
    }

    #[test]
    fn empty_room_and_failures() {
        assert_eq!(parse_list_response(Some(200), b"{}"), Ok(vec![]));
        assert_eq!(
            parse_list_response(Some(200), br#"{"participants":[]}"#),
            Ok(vec![])
        );
        assert_eq!(
            parse_list_response(Some(401), br#"{"code":"unauthenticated"}"#),
            Err(ListError::Status(401))
        );
        assert_eq!(parse_list_response(None, b""), Err(ListError::NoResponse));
        assert_eq!(
            parse_list_response(Some(200), b"{\"participants\":[{"),
            Err(ListError::BadBody)
        );
        assert_eq!(
            parse_list_response(Some(200), b"<html>"),
            Err(ListError::BadBody)
        );
    }
}
