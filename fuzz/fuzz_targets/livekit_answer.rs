//! LiveKit's answers to `RoomService/ListParticipants`.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::upstream::livekit::parse_list_response;
use voice_limit_guard::upstream::call::{CallError, Service};

fuzz_target!(|data: &[u8]| {
    match parse_list_response(Some(200), data) {
        Ok(list) => {
            // Every identity listed comes from the answer's own bytes, each with its session.
            assert!(
                list.identities.iter().map(String::len).sum::<usize>() <= data.len(),
                "more identity bytes than the answer holds"
            );
            assert_eq!(list.identities.len(), list.sessions.len());
        }
        Err(error) => assert_eq!(error, CallError::BadBody(Service::LiveKit)),
    }
    assert_eq!(
        parse_list_response(Some(503), data),
        Err(CallError::Status(Service::LiveKit, 503))
    );
    assert_eq!(
        parse_list_response(None, data),
        Err(CallError::NoResponse(Service::LiveKit))
    );
});
