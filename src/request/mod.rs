//! What clients send, read the way lk-jwt-service reads it: the token routes ([`route`]), the
//! legacy bodies as Go's `encoding/json` decodes them ([`token_request`] on [`gojson`]), the
//! MatrixRTC routes' requests ([`rtc_request`]), the LiveKit room and participant names
//! lk-jwt-service derives from them ([`livekit_names`]), and how untrusted text and secrets are
//! shown ([`text`], [`secret`]).
//!
//! May use: [`crate::state`] (memos of derived names).

pub mod gojson;
pub mod json;
pub(crate) mod key_path;
pub mod livekit_names;
pub mod route;
pub mod rtc_request;
pub mod secret;
pub mod text;
pub mod token_request;
