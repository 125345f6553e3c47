use livekit_api::access_token::TokenVerifier;

use super::*;

fn config(shapes: SfuGetShapes) -> Config {
    Config {
        credentials: Credentials {
            key: "devkey".into(),
            secret: "secret-secret-secret".into(),
        },
        livekit_url: "ws://127.0.0.1:7880".into(),
        sfu_get_shapes: shapes,
    }
}

fn request(method: &str, path: &str, body: &str) -> Request {
    Request {
        method: method.into(),
        path: path.into(),
        headers: Vec::new(),
        body: body.as_bytes().to_vec(),
    }
}

fn body_json(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap()
}

const LEGACY: &str = r#"{"room":"!room:test.local","openid_token":{"access_token":"openid:@alice:test.local","token_type":"Bearer","matrix_server_name":"test.local","expires_in":3600},"device_id":"DEV1"}"#;
const NEW: &str = r#"{"room_id":"!room:test.local","slot_id":"m.call#ROOM","openid_token":{"access_token":"openid:@alice:test.local","token_type":"Bearer","matrix_server_name":"test.local","expires_in":3600},"member":{"id":"mem1","claimed_user_id":"@alice:test.local","claimed_device_id":"DEV1"}}"#;

#[test]
fn alias_and_identity_vectors() {
    assert_eq!(
        room_alias("!roomid:example.com", "slot1234"),
        "O8437W3+jmzMVjoIP3tNwbm+XxHQk2iKpOA7aqw3qSc"
    );
    assert_eq!(
        hashed_identity("@alice:example.com", "DEVICE123", "memberABC"),
        "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
    );
    assert_eq!(
        legacy_identity("@alice:example.com:8448", "DEV"),
        "@alice:example.com:8448:DEV"
    );
}

#[test]
fn simulated_openid() {
    let tok = |access: &str, server: &str| OpenIdToken {
        access_token: access.into(),
        matrix_server_name: server.into(),
        ..Default::default()
    };
    assert_eq!(
        verify_openid(&tok("openid:@alice:test.local", "test.local")).as_deref(),
        Some("@alice:test.local")
    );
    assert_eq!(
        verify_openid(&tok("openid:@a:hs:8448", "hs:8448")).as_deref(),
        Some("@a:hs:8448")
    );
    assert_eq!(
        verify_openid(&tok("openid:@alice:test.local", "other")),
        None
    );
    assert_eq!(verify_openid(&tok("@alice:test.local", "test.local")), None);
    assert_eq!(
        verify_openid(&tok("openid:alice:test.local", "test.local")),
        None
    );
    assert_eq!(
        verify_openid(&tok("openid:@:test.local", "test.local")),
        None
    );
}

#[test]
fn legacy_request_issues_unhashed_identity() {
    let cfg = config(SfuGetShapes::Both);
    let reply = cfg.handle(&request("POST", "/sfu/get", LEGACY));
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));
    assert_eq!(reply.header("Content-Type"), Some("application/json"));
    assert!(reply.body.ends_with(b"}\n"));
    let body = body_json(&reply);
    assert_eq!(body["url"], "ws://127.0.0.1:7880");
    let claims = TokenVerifier::with_api_key("devkey", "secret-secret-secret")
        .verify(body["jwt"].as_str().unwrap())
        .unwrap();
    assert_eq!(claims.sub, "@alice:test.local:DEV1");
    assert_eq!(
        claims.video.room,
        room_alias("!room:test.local", LEGACY_SLOT)
    );
    assert!(claims.video.room_join && claims.video.can_publish() && claims.video.can_subscribe());
    assert!(claims.video.can_update_own_metadata());
    assert!(!claims.video.room_admin);
    let ttl = claims.exp - claims.nbf;
    assert!((3590..=3610).contains(&ttl), "ttl {ttl}");
}

#[test]
fn new_shape_on_both_endpoints() {
    let cfg = config(SfuGetShapes::Both);
    let want_sub = hashed_identity("@alice:test.local", "DEV1", "mem1");
    for path in ["/get_token", "/sfu/get"] {
        let reply = cfg.handle(&request("POST", path, NEW));
        assert_eq!(reply.status, 200, "{path}");
        let claims = livekit_api::access_token::Claims::from_unverified(
            body_json(&reply)["jwt"].as_str().unwrap(),
        )
        .unwrap();
        assert_eq!(claims.sub, want_sub);
        assert_eq!(
            claims.video.room,
            room_alias("!room:test.local", "m.call#ROOM")
        );
    }
    let head = config(SfuGetShapes::Legacy);
    let reply = head.handle(&request("POST", "/sfu/get", NEW));
    assert_eq!(
        (reply.status, body_json(&reply)["errcode"].as_str()),
        (400, Some("M_NOT_JSON"))
    );
}

#[test]
fn openid_failures_depend_on_endpoint_and_version() {
    let bad_legacy = LEGACY.replace("openid:@alice:test.local", "openid:@alice:evil.example");
    let reply = config(SfuGetShapes::Both).handle(&request("POST", "/sfu/get", &bad_legacy));
    assert_eq!(reply.status, 500);
    assert_eq!(
        String::from_utf8(reply.body).unwrap(),
        "{\"errcode\":\"M_LOOKUP_FAILED\",\"error\":\"Failed to look up user info from homeserver\"}\n"
    );
    let reply = config(SfuGetShapes::Legacy).handle(&request("POST", "/sfu/get", &bad_legacy));
    assert_eq!(
        (reply.status, body_json(&reply)["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );

    let bad_new = NEW.replace("\"openid:@alice", "\"openid:@bob");
    let reply = config(SfuGetShapes::Both).handle(&request("POST", "/get_token", &bad_new));
    assert_eq!(
        (reply.status, body_json(&reply)["errcode"].as_str()),
        (401, Some("M_UNAUTHORIZED"))
    );
    let wrong_claim = NEW.replace("\"claimed_user_id\":\"@alice", "\"claimed_user_id\":\"@bob");
    let reply = config(SfuGetShapes::Both).handle(&request("POST", "/get_token", &wrong_claim));
    assert_eq!(reply.status, 401);
}

#[test]
fn decoding_errors() {
    let cfg = config(SfuGetShapes::Both);
    let cases = [
        ("/get_token", "", 400, "M_NOT_JSON"),
        ("/get_token", "{", 400, "M_NOT_JSON"),
        (
            "/get_token",
            r#"{"room_id":"r","bogus":1}"#,
            400,
            "M_NOT_JSON",
        ),
        ("/get_token", r#"{"room_id":5}"#, 400, "M_NOT_JSON"),
        ("/get_token", r#"{"room_id":"r"}"#, 400, "M_BAD_JSON"),
        ("/get_token", "null", 400, "M_BAD_JSON"),
        ("/sfu/get", "", 400, "M_BAD_JSON"),
        ("/sfu/get", r#"{"room":"r","bogus":1}"#, 400, "M_BAD_JSON"),
        ("/sfu/get", r#"{"openid_token":{}}"#, 400, "M_BAD_JSON"),
    ];
    for (path, body, status, errcode) in cases {
        let reply = cfg.handle(&request("POST", path, body));
        assert_eq!(reply.status, status, "{path} {body}");
        assert_eq!(body_json(&reply)["errcode"], errcode, "{path} {body}");
        assert_eq!(reply.header("Access-Control-Allow-Origin"), Some("*"));
    }
    let head = config(SfuGetShapes::Legacy);
    let reply = head.handle(&request("POST", "/sfu/get", ""));
    assert_eq!(body_json(&reply)["errcode"], "M_NOT_JSON");
    let reply = head.handle(&request("POST", "/sfu/get", r#"{"room":"r"}"#));
    assert_eq!(
        body_json(&reply)["error"],
        "Missing OpenID token parameters"
    );
}

#[test]
fn mixed_case_keys_reach_the_same_room() {
    let cfg = config(SfuGetShapes::Both);
    let shouty = LEGACY
        .replace("\"room\"", "\"ROOM\"")
        .replace("\"device_id\"", "\"Device_ID\"");
    let reply = cfg.handle(&request("POST", "/sfu/get", &shouty));
    assert_eq!(reply.status, 200);
    let claims = livekit_api::access_token::Claims::from_unverified(
        body_json(&reply)["jwt"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims.video.room,
        room_alias("!room:test.local", LEGACY_SLOT)
    );
    assert_eq!(claims.sub, "@alice:test.local:DEV1");
    // A later duplicate key overrides the room the proxy may have read first.
    let dup = LEGACY.replace(
        "{\"room\":\"!room:test.local\"",
        "{\"room\":\"!room:test.local\",\"Room\":\"!other:test.local\"",
    );
    let reply = cfg.handle(&request("POST", "/sfu/get", &dup));
    let claims = livekit_api::access_token::Claims::from_unverified(
        body_json(&reply)["jwt"].as_str().unwrap(),
    )
    .unwrap();
    assert_eq!(
        claims.video.room,
        room_alias("!other:test.local", LEGACY_SLOT)
    );
}

#[test]
fn methods_and_routes() {
    let cfg = config(SfuGetShapes::Both);
    for path in ["/sfu/get", "/get_token"] {
        let reply = cfg.handle(&request("OPTIONS", path, ""));
        assert_eq!((reply.status, reply.body.len()), (200, 0));
        assert_eq!(reply.headers.len(), 4);
        for method in ["GET", "HEAD", "PUT", "DELETE"] {
            let reply = cfg.handle(&request(method, path, ""));
            assert_eq!((reply.status, reply.body.len()), (405, 0));
            assert_eq!(reply.header("Access-Control-Allow-Methods"), Some("POST"));
        }
    }
    for method in ["GET", "HEAD"] {
        let reply = cfg.handle(&request(method, "/healthz", ""));
        assert_eq!(reply, Reply::empty(200));
    }
    assert_eq!(
        cfg.handle(&request("POST", "/healthz", "")),
        Reply::empty(405)
    );
    let reply = cfg.handle(&request("GET", "/nope", ""));
    assert_eq!(reply.status, 404);
    assert_eq!(reply.body, b"404 page not found\n");
    assert_eq!(
        reply.header("Content-Type"),
        Some("text/plain; charset=utf-8")
    );
    assert_eq!(
        cfg.handle(&request("POST", "/sfu/get/", LEGACY)).status,
        404
    );
}
