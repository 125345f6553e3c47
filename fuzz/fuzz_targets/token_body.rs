//! Token request bodies, as clients send them to lk-jwt-service through the filter.
//!
//! The filter decides on what the lenient reader (`parse`) reads, lk-jwt-service issues a
//! token on what the strict one (`parse_at`, the test-side model in `tests/strict_token`)
//! accepts. Whenever the service would accept a body, the filter must have read the same
//! request from it: the same room, shape, slot, device and claimed user. Otherwise it would
//! check another room (or LiveKit alias) than the one the token is issued for.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::request::token_request::{parse, BodyError};

#[path = "../../tests/strict_token/mod.rs"]
mod strict_token;
use strict_token::{parse_at, Endpoint, StrictError};

fuzz_target!(|data: &[u8]| {
    let lenient = parse(data);
    if let Ok(request) = &lenient {
        assert!(!request.room.is_empty(), "parse accepted an empty room");
    }
    for endpoint in [Endpoint::SfuGet, Endpoint::GetToken] {
        match parse_at(endpoint, data) {
            Ok(strict) => {
                assert!(!strict.room.is_empty(), "parse_at accepted an empty room");
                assert!(!strict.slot().is_empty(), "parse_at accepted an empty slot");
                match &lenient {
                    Ok(lenient) => assert_eq!(
                        lenient,
                        &strict.as_read_by_filter(),
                        "parse and parse_at({endpoint:?}) read different requests"
                    ),
                    Err(error) => panic!("parse_at({endpoint:?}) accepts, parse refuses: {error}"),
                }
            }
            // A body that is not JSON is not JSON to both readers.
            Err(StrictError::Body(BodyError::NotJson(_))) => {
                assert!(
                    matches!(lenient, Err(BodyError::NotJson(_))),
                    "parse_at({endpoint:?}) finds no JSON where parse does"
                );
            }
            Err(_) => {}
        }
    }
});
