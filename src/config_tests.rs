use super::*;
#[cfg(target_arch = "wasm32")]
use wasm_bindgen_test::wasm_bindgen_test as test;

const MINIMAL: &str = r#"{
    "synapse": {"cluster": "synapse", "admin_token": "syt_secret"},
    "livekit": {"cluster": "livekit", "api_key": "devkey", "api_secret": "lk_secret"}
}"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn parse(json: &str) -> Result<Config, ConfigError> {
    Config::parse(json.as_bytes(), &no_env)
}

fn error_of(json: &str) -> String {
    parse(json).unwrap_err().0
}

#[test]
fn minimal_configuration_gets_the_documented_defaults() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.synapse.upstream.cluster, "synapse");
    assert_eq!(c.synapse.upstream.authority, "synapse");
    assert_eq!(c.synapse.upstream.timeout, Duration::from_millis(5000));
    assert_eq!(c.synapse.max_lookups_per_second, 100);
    assert_eq!(c.synapse.admin_token.expose(), "syt_secret");
    assert_eq!(c.livekit.upstream.authority, "livekit");
    assert_eq!(c.livekit.api_key.expose(), "devkey");
    assert_eq!(c.livekit.api_secret.expose(), "lk_secret");
    assert_eq!(c.token_paths, ["/sfu/get", "/get_token"]);
    assert_eq!(c.limit_state_type, "io.lotus.voice_limit");
    assert_eq!(c.limit_cache_ttl, Duration::from_secs(10));
    assert_eq!(c.failure_mode, FailureMode::Open);
    assert_eq!(c.reservation, Duration::from_secs(30));
    assert_eq!(c.participants_cache, Duration::from_millis(1000));
}

#[test]
fn full_configuration() {
    let c = parse(
        r#"{
        "synapse": {"cluster": "hs", "authority": "matrix.example", "admin_token": "t", "timeout_ms": 250, "max_lookups_per_second": 7},
        "livekit": {"cluster": "lk", "authority": "sfu", "api_key": "k", "api_secret": "s", "timeout_ms": 300},
        "token_paths": ["/get_token"],
        "limit_state_type": "org.example.limit",
        "limit_cache_ttl_seconds": 0,
        "failure_mode": "closed",
        "reservation_seconds": 5,
        "participants_cache_ms": 750
    }"#,
    )
    .unwrap();
    assert_eq!(c.synapse.upstream.authority, "matrix.example");
    assert_eq!(c.synapse.upstream.timeout, Duration::from_millis(250));
    assert_eq!(c.synapse.max_lookups_per_second, 7);
    assert_eq!(c.livekit.upstream.timeout, Duration::from_millis(300));
    assert_eq!(c.token_paths, ["/get_token"]);
    assert_eq!(c.limit_state_type, "org.example.limit");
    assert_eq!(c.limit_cache_ttl, Duration::ZERO);
    assert_eq!(c.failure_mode, FailureMode::Closed);
    assert_eq!(c.reservation, Duration::from_secs(5));
    assert_eq!(c.participants_cache, Duration::from_millis(750));
}

#[test]
fn secrets_can_come_from_the_environment() {
    let env = |name: &str| match name {
        "SYNAPSE_TOKEN" => Some("from-env".to_owned()),
        "LK_SECRET" => Some("lk-from-env".to_owned()),
        _ => None,
    };
    let c = Config::parse(
        br#"{"synapse": {"cluster": "s", "admin_token_env": "SYNAPSE_TOKEN"},
             "livekit": {"cluster": "l", "api_key": "k", "api_secret_env": "LK_SECRET"}}"#,
        &env,
    )
    .unwrap();
    assert_eq!(c.synapse.admin_token.expose(), "from-env");
    assert_eq!(c.livekit.api_secret.expose(), "lk-from-env");
    let e = Config::parse(
        br#"{"synapse": {"cluster": "s", "admin_token_env": "MISSING"},
             "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
        &env,
    )
    .unwrap_err();
    assert!(e.0.contains("synapse.admin_token_env") && e.0.contains("MISSING"));
}

#[test]
fn errors_name_the_key() {
    assert_eq!(error_of("{}"), "synapse is required");
    assert_eq!(error_of("[]"), "configuration: expected a JSON object");
    assert!(error_of("{").starts_with("configuration is not valid JSON"));
    assert_eq!(
        error_of(r#"{"synapse": {"admin_token": "t"}, "livekit": {}}"#),
        "synapse.cluster is required"
    );
    assert_eq!(
        error_of(r#"{"synapse": {"cluster": "s"}, "livekit": {}}"#),
        "synapse.admin_token (or synapse.admin_token_env) is required"
    );
    let with = |extra: &str| MINIMAL.replacen('{', &format!("{{{extra},"), 1);
    let starts = |json: &str, start: &str| {
        let error = error_of(json);
        assert!(
            error.starts_with(start),
            "{error:?} does not start with {start:?}"
        );
    };
    starts(
        &with(r#""limit_cache_ttl_seconds": "10""#),
        r#"limit_cache_ttl_seconds: invalid type: string "10", expected u64"#,
    );
    starts(&with(r#""bogus": 1"#), "bogus: unknown field `bogus`");
    starts(
        &with(r#""failure_mode": "open", "failure_mode": "closed""#),
        "configuration: duplicate field `failure_mode`",
    );
    starts(
        &with(r#""limit_cache_ttl_seconds": 1.5"#),
        "limit_cache_ttl_seconds: invalid type: floating point `1.5`, expected u64",
    );
    starts(
        &with(r#""failure_mode": "maybe""#),
        "failure_mode: unknown variant `maybe`, expected `open` or `closed`",
    );
    starts(
        &with(r#""token_paths": ["/a", 1]"#),
        "token_paths[1]: invalid type: integer `1`, expected a string",
    );
    assert_eq!(
        error_of(&with(r#""token_paths": []"#)),
        "token_paths: must list at least one path"
    );
    assert_eq!(
        error_of(&with(r#""reservation_seconds": 0"#)),
        "reservation_seconds: expected an integer >= 1, got 0"
    );
    starts(
        r#"{"synapse": {"cluster": "s", "admin_token": "t", "timeout": 5},
            "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
        "synapse.timeout: unknown field `timeout`",
    );
    starts(
        r#"{"synapse": {"cluster": "s", "admin_token": 5},
            "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
        "synapse.admin_token: invalid type: integer `5`, expected a string",
    );
}

#[test]
fn errors_name_the_key_on_any_line_without_the_position() {
    let json = "{\n  \"synapse\": {\"cluster\": \"s\", \"admin_token\": \"t\"},\n  \"livekit\": {\n    \"cluster\": \"l\",\n    \"timeout_ms\": -1}}";
    assert_eq!(
        error_of(json),
        "livekit.timeout_ms: invalid value: integer `-1`, expected u64"
    );
    let json = "{\"synapse\": {\"cluster\": \"s\",\n \"cluster\": \"t\"}}";
    assert_eq!(error_of(json), "synapse: duplicate field `cluster`");
}

#[test]
fn errors_never_contain_secrets() {
    let e = error_of(
        r#"{"synapse": {"cluster": "s", "admin_token": "syt_topsecret", "admin_token_env": "X"},
            "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#,
    );
    assert!(!e.contains("topsecret"), "{e}");
    let c = parse(MINIMAL).unwrap();
    let debug = format!("{c:?}");
    assert!(!debug.contains("syt_secret") && !debug.contains("lk_secret"));
}

#[test]
fn token_paths_ignore_the_query_string() {
    let c = parse(MINIMAL).unwrap();
    let legacy = |path| c.route_of(path) == Some(Route::Legacy);
    assert!(legacy("/sfu/get"));
    assert!(legacy("/get_token?x=1"));
    assert!(!legacy("/sfu/get/"));
    assert!(c.route_of("/healthz").is_none());
    assert!(legacy("/s%66u/get"));
    assert!(legacy("/get%5Ftoken"));
    assert!(c.route_of("/sfu%2").is_none());
    assert_eq!(
        c.route_of("/_matrix/client/v1/rtc/livekit/get_token"),
        Some(Route::Client)
    );
}

#[test]
fn stale_limit_seconds_defaults_to_an_hour_and_may_be_set() {
    let minimal = r#"{"synapse": {"cluster": "s", "admin_token": "t"},
                      "livekit": {"cluster": "l", "api_key": "k", "api_secret": "x"}}"#;
    let config = Config::parse(minimal.as_bytes(), &|_| None).unwrap();
    assert_eq!(config.stale_limit, Duration::from_secs(3600));
    let set = minimal.replacen('{', r#"{"stale_limit_seconds": 0, "#, 1);
    let config = Config::parse(set.as_bytes(), &|_| None).unwrap();
    assert_eq!(config.stale_limit, Duration::ZERO);
    let wrong = minimal.replacen('{', r#"{"stale_limit_seconds": "1", "#, 1);
    assert!(Config::parse(wrong.as_bytes(), &|_| None)
        .unwrap_err()
        .0
        .starts_with("stale_limit_seconds"));
}

fn role(json: &str) -> Result<Role, ConfigError> {
    Role::parse(json.as_bytes(), &no_env)
}

#[test]
fn the_shape_chooses_the_role() {
    assert_eq!(
        role(MINIMAL),
        Ok(Role::Guard(Box::new(parse(MINIMAL).unwrap())))
    );
    let Ok(Role::Edge(edge)) = role(r#"{"room_header": "x-matrix-room"}"#) else {
        panic!("not an edge configuration");
    };
    assert_eq!(edge.room_header, "x-matrix-room");
    assert!(edge.route_of("/sfu/get").is_some() && edge.route_of("/get%5Ftoken").is_some());
    assert!(edge
        .route_of("/_matrix/federation/v1/rtc/livekit/get_token")
        .is_some());
    let Ok(Role::Edge(edge)) = role(r#"{"room_header": "x-room", "token_paths": ["/only"]}"#)
    else {
        panic!("not an edge configuration");
    };
    assert!(edge.route_of("/only").is_some() && edge.route_of("/sfu/get").is_none());
}

#[test]
fn an_edge_configuration_is_checked_as_strictly() {
    let error = |json: &str| role(json).unwrap_err().0;
    assert!(
        error(r#"{"room_header": "x-room", "failure_mode": "open"}"#)
            .starts_with("failure_mode: unknown field `failure_mode`")
    );
    assert!(error(r#"{"room_header": 1}"#).starts_with("room_header: invalid type"));
    for bad in [
        "",
        "X-Room",
        "x room",
        ":authority",
        "host",
        "content-length",
        "x-rööm",
    ] {
        let json = format!(r#"{{"room_header": {bad:?}}}"#);
        assert!(error(&json).starts_with("room_header: expected a lowercase header name"));
    }
    let both = MINIMAL.replacen('{', r#"{"room_header": "x-room", "#, 1);
    assert!(error(&both).starts_with("room_header and synapse"));
    // Without room_header the guard's own rules apply.
    assert_eq!(error("{}"), "synapse is required");
}

#[test]
fn webhooks_are_off_unless_configured_and_take_documented_defaults() {
    assert_eq!(parse(MINIMAL).unwrap().webhooks, None);
    let with = |webhooks: &str| MINIMAL.replacen('{', &format!("{{\"webhooks\": {webhooks},"), 1);
    let c = parse(&with("{}")).unwrap();
    assert_eq!(
        c.webhooks,
        Some(WebhookConfig {
            path: "/sfu_webhook".to_owned(),
            answer: false,
            verify: Duration::from_secs(60),
        })
    );
    assert!(c.is_webhook_path("/sfu_webhook?x=1"));
    assert!(!c.is_webhook_path("/sfu_webhook/x"));
    assert!(!parse(MINIMAL).unwrap().is_webhook_path("/sfu_webhook"));
    let c = parse(&with(
        r#"{"path": "/livekit/events", "answer": true, "verify_seconds": 300}"#,
    ))
    .unwrap();
    let w = c.webhooks.unwrap();
    assert_eq!((w.path.as_str(), w.answer), ("/livekit/events", true));
    assert_eq!(w.verify, Duration::from_secs(300));
    for (webhooks, message) in [
        (
            r#"{"path": "sfu_webhook"}"#,
            "webhooks.path: expected a path",
        ),
        (r#"{"path": "/sfu/get"}"#, "is a token route"),
        (
            r#"{"verify_seconds": 0}"#,
            "webhooks.verify_seconds: expected",
        ),
        (r#"{"urls": []}"#, "webhooks.urls: unknown field `urls`"),
    ] {
        let error = error_of(&with(webhooks));
        assert!(error.contains(message), "{webhooks}: {error}");
    }
}
