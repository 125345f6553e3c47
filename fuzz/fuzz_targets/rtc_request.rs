//! MatrixRTC token requests (Synapse forwarding `.../rtc/livekit/get_token`): the body a client
//! or a remote homeserver chose, read with the headers Synapse set.
//!
//! Whatever the body, the guard either names a request for our SFU (a non-empty room, slot and
//! member, the user of the header or of the asking server, and lk-jwt-service's names for
//! them), names another homeserver, or says why it cannot decide.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::request::livekit_names::room_alias;
use voice_limit_guard::request::route::Route;
use voice_limit_guard::request::rtc_request::{parse, Asked, RtcHeaders};

fuzz_target!(|data: &[u8]| {
    let client = RtcHeaders {
        authorization: None,
        user_identifier: Some("@alice:example.com".to_owned()),
        origin: None,
    };
    match parse(Route::Client, &client, data) {
        Ok(Asked::Local(request)) => {
            assert_eq!(request.user, "@alice:example.com");
            assert!(!request.room.is_empty() && !request.slot_id.is_empty());
            assert_eq!(request.alias, room_alias(&request.room, &request.slot_id));
            assert!(!request.identity.is_empty());
        }
        Ok(Asked::Remote { server_name }) => {
            assert!(!server_name.is_empty());
            assert!(!server_name.eq_ignore_ascii_case("example.com"));
        }
        Err(_) => {}
    }
    let federation = RtcHeaders {
        authorization: None,
        user_identifier: None,
        origin: Some("remote.example".to_owned()),
    };
    match parse(Route::Federation, &federation, data) {
        Ok(Asked::Local(request)) => {
            assert_eq!(
                request.user.split_once(':').map(|(_, s)| s),
                Some("remote.example")
            );
        }
        Ok(Asked::Remote { .. }) => panic!("a federation request named another server"),
        Err(_) => {}
    }
});
