//! The plugin configuration, as operators write it (Envoy's `configuration` JSON).
//!
//! Parsed twice: with no environment variable set, and with every variable set to a value
//! that must never show in the parsed configuration's `Debug` form or in an error message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use voice_limit_guard::config::{Config, EdgeConfig, Role};

const MARKER: &str = "ENV-SECRET-VALUE";

fn check(config: &Config) {
    assert!(!config.token_paths.is_empty(), "no token path");
    for path in &config.token_paths {
        assert!(path.starts_with('/'), "token path {path:?}");
        assert!(
            config.route_of(path).is_some(),
            "{path:?} is not a token path"
        );
    }
    assert!(!config.limit_state_type.is_empty());
    assert!(!config.synapse.upstream.cluster.is_empty());
    assert!(!config.livekit.upstream.cluster.is_empty());
    assert!(!config.synapse.admin_token.expose().is_empty());
    assert!(!config.livekit.api_key.expose().is_empty());
    assert!(!config.livekit.api_secret.expose().is_empty());
}

fn check_edge(edge: &EdgeConfig) {
    assert!(!edge.room_header.is_empty() && !edge.room_header.starts_with(':'));
    for path in &edge.token_paths {
        assert!(
            edge.route_of(path).is_some(),
            "{path:?} is not a token path"
        );
    }
}

fn check_role(role: &Role) {
    match role {
        Role::Guard(config) => check(config),
        Role::Edge(edge) => check_edge(edge),
    }
}

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = Config::parse(data, &|_| None) {
        check(&config);
    }
    if let Ok(role) = Role::parse(data, &|_| None) {
        check_role(&role);
    }
    let parsed = Role::parse(data, &|name| Some(format!("{MARKER}:{name}")));
    if let Ok(role) = &parsed {
        check_role(role);
    }
    // Unless the input itself spells the marker (directly or through escapes), no text
    // derived from the configuration may show a secret taken from the environment.
    let spells_marker =
        data.windows(MARKER.len()).any(|w| w == MARKER.as_bytes()) || data.contains(&b'\\');
    if !spells_marker {
        let shown = match &parsed {
            Ok(role) => format!("{role:?}"),
            Err(error) => format!("{error} {error:?}"),
        };
        assert!(!shown.contains(MARKER), "a secret shows: {shown}");
    }
});
