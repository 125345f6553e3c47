//! Who is in a LiveKit room, through the RoomService `ListParticipants` Twirp call.

use crate::gojson::{self, Value};

pub const LIST_PARTICIPANTS_PATH: &str = "/twirp/livekit.RoomService/ListParticipants";

/// The JSON body of a `ListParticipants` call for `room`.
pub fn list_participants_body(room: &str) -> Vec<u8> {
    let mut body = String::from("{\"room\":");
    gojson::write_string(&mut body, room);
    body.push('}');
    body.into_bytes()
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

/// `DISCONNECTED` is `3` in LiveKit's `ParticipantInfo.State`; protojson writes the name,
/// a client writing enums as numbers the number.
fn is_disconnected(participant: &Value) -> bool {
    match participant.get("state") {
        Some(state) => state.as_str() == Some("DISCONNECTED") || state.as_u64() == Some(3),
        None => false,
    }
}

/// The identities of the participants that still hold a place in the room.
pub fn parse_list_response(status: Option<u32>, body: &[u8]) -> Result<Vec<String>, ListError> {
    match status {
        None => return Err(ListError::NoResponse),
        Some(200) => {}
        Some(other) => return Err(ListError::Status(other)),
    }
    let document = gojson::parse_document(body).map_err(|_| ListError::BadBody)?;
    if !matches!(document, Value::Object(_)) {
        return Err(ListError::BadBody);
    }
    // protojson omits an empty repeated field unless defaults are emitted.
    let participants = match document.get("participants") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(list) => list.as_array().ok_or(ListError::BadBody)?,
    };
    participants
        .iter()
        .filter(|p| !is_disconnected(p))
        .map(|p| match p.get("identity") {
            Some(Value::String(identity)) => Ok(identity.clone()),
            None => Ok(String::new()),
            Some(_) => Err(ListError::BadBody),
        })
        .collect()
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
