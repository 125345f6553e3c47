//! Twirp JSON shapes of `livekit.ParticipantInfo`.
//!
//! Twirp answers JSON clients with protojson using the original proto field
//! names, unpopulated fields emitted, enums as their names and 64-bit
//! integers as strings. Fields are listed in `.proto` declaration order,
//! which is the order protojson writes them in.

use std::collections::BTreeMap;

use serde::Serialize;

/// An always-empty repeated field.
pub type Empty = [(); 0];

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ParticipantPermission {
    pub can_subscribe: bool,
    pub can_publish: bool,
    pub can_publish_data: bool,
    pub can_publish_sources: Vec<String>,
    pub hidden: bool,
    pub recorder: bool,
    pub can_update_metadata: bool,
    pub agent: bool,
    pub can_subscribe_metrics: bool,
    pub can_manage_agent_session: bool,
}

impl Default for ParticipantPermission {
    /// What a plain join token grants.
    fn default() -> Self {
        ParticipantPermission {
            can_subscribe: true,
            can_publish: true,
            can_publish_data: true,
            can_publish_sources: Vec::new(),
            hidden: false,
            recorder: false,
            can_update_metadata: false,
            agent: false,
            can_subscribe_metrics: false,
            can_manage_agent_session: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ParticipantInfo {
    pub sid: String,
    pub identity: String,
    /// `JOINING`, `JOINED`, `ACTIVE` or `DISCONNECTED`.
    pub state: &'static str,
    pub tracks: Empty,
    pub metadata: String,
    /// Seconds since the epoch (int64, so a string).
    pub joined_at: String,
    /// Milliseconds since the epoch (int64, so a string).
    pub joined_at_ms: String,
    pub name: String,
    pub version: u32,
    pub permission: ParticipantPermission,
    pub region: String,
    pub is_publisher: bool,
    /// `STANDARD`, `INGRESS`, `EGRESS`, `SIP` or `AGENT`.
    pub kind: &'static str,
    pub attributes: BTreeMap<String, String>,
    pub disconnect_reason: &'static str,
    pub kind_details: Empty,
    pub data_tracks: Empty,
    pub client_protocol: i32,
    pub capabilities: Empty,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ListParticipantsResponse {
    pub participants: Vec<ParticipantInfo>,
}

/// Participant states, by their proto enum names.
pub const STATES: [&str; 4] = ["JOINING", "JOINED", "ACTIVE", "DISCONNECTED"];

/// Canonical state name, if `s` is one.
pub fn parse_state(s: &str) -> Option<&'static str> {
    STATES.iter().copied().find(|state| *state == s)
}

/// Participant kind for a token's `kind` claim, as LiveKit maps it.
pub fn kind_from_claim(kind: &str) -> &'static str {
    match kind {
        "ingress" => "INGRESS",
        "egress" => "EGRESS",
        "sip" => "SIP",
        "agent" => "AGENT",
        _ => "STANDARD",
    }
}

/// A Twirp error body.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct TwirpError {
    pub code: &'static str,
    pub msg: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn participant_info_shape() {
        let info = ParticipantInfo {
            sid: "PA_1".into(),
            identity: "@a:s:D".into(),
            state: "ACTIVE",
            tracks: [],
            metadata: String::new(),
            joined_at: "1700000000".into(),
            joined_at_ms: "1700000000123".into(),
            name: String::new(),
            version: 0,
            permission: ParticipantPermission::default(),
            region: String::new(),
            is_publisher: false,
            kind: "STANDARD",
            attributes: BTreeMap::new(),
            disconnect_reason: "UNKNOWN_REASON",
            kind_details: [],
            data_tracks: [],
            client_protocol: 0,
            capabilities: [],
        };
        let json = serde_json::to_string(&ListParticipantsResponse {
            participants: vec![info],
        })
        .unwrap();
        assert_eq!(
            json,
            concat!(
                r#"{"participants":[{"sid":"PA_1","identity":"@a:s:D","state":"ACTIVE","tracks":[],"metadata":"","#,
                r#""joined_at":"1700000000","joined_at_ms":"1700000000123","name":"","version":0,"#,
                r#""permission":{"can_subscribe":true,"can_publish":true,"can_publish_data":true,"can_publish_sources":[],"#,
                r#""hidden":false,"recorder":false,"can_update_metadata":false,"agent":false,"can_subscribe_metrics":false,"#,
                r#""can_manage_agent_session":false},"region":"","is_publisher":false,"kind":"STANDARD","attributes":{},"#,
                r#""disconnect_reason":"UNKNOWN_REASON","kind_details":[],"data_tracks":[],"client_protocol":0,"capabilities":[]}]}"#
            )
        );
    }

    #[test]
    fn states_and_kinds() {
        assert_eq!(parse_state("JOINED"), Some("JOINED"));
        assert_eq!(parse_state("active"), None);
        assert_eq!(kind_from_claim("agent"), "AGENT");
        assert_eq!(kind_from_claim(""), "STANDARD");
    }
}
