//! What the services around the guard say: the requests it makes and the ways an answer can be
//! unusable ([`call`]), Synapse's admin API ([`synapse`]) and OpenID userinfo ([`openid`]),
//! LiveKit's participant API ([`livekit`]), the tokens lk-jwt-service issues ([`jwt`]), and
//! LiveKit's signed webhooks ([`webhook`]), which it applies to the rooms' views.
//!
//! May use: [`crate::occupancy`] (a webhook's event updates a room's view), [`crate::request`],
//! [`crate::state`], [`crate::counter`].

pub mod call;
pub mod jwt;
pub mod livekit;
pub mod openid;
pub mod synapse;
pub mod webhook;
