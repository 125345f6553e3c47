use super::*;
use crate::lkjwt;

fn creds() -> Credentials {
    Credentials {
        key: "devkey".into(),
        secret: "secret-secret-secret".into(),
    }
}

fn post(path: &str, body: &str) -> Request {
    Request {
        method: "POST".into(),
        path: path.into(),
        headers: vec![("Content-Type".into(), "application/json".into())],
        body: body.as_bytes().to_vec(),
    }
}

fn list(room: &str, token: Option<&str>) -> Request {
    let mut req = post(LIST_PARTICIPANTS, &json!({ "room": room }).to_string());
    if let Some(token) = token {
        req.headers
            .push(("authorization".into(), format!("Bearer {token}")));
    }
    req
}

fn body(reply: &Reply) -> serde_json::Value {
    serde_json::from_slice(&reply.body).unwrap()
}

#[test]
fn list_participants_requires_admin_grant_for_the_room() {
    let lk = LiveKit::new(&creds());
    let admin = admin_token(&creds(), "roomA").unwrap();

    let reply = lk.handle(&list("roomA", Some(&admin)));
    assert_eq!(reply.status, 200);
    assert_eq!(body(&reply), json!({ "participants": [] }));
    assert_eq!(reply.header("Content-Type"), Some("application/json"));

    let reply = lk.handle(&list("roomB", Some(&admin)));
    assert_eq!(reply.status, 401);
    assert_eq!(
        body(&reply),
        json!({ "code": "unauthenticated", "msg": "permissions denied" })
    );

    assert_eq!(lk.handle(&list("roomA", None)).status, 401);
    let reply = lk.handle(&list("roomA", Some("not-a-jwt")));
    assert_eq!(
        (reply.status, body(&reply)["code"].as_str()),
        (401, Some("unauthenticated"))
    );

    let other = admin_token(
        &Credentials {
            key: "devkey".into(),
            secret: "other-secret-other".into(),
        },
        "roomA",
    )
    .unwrap();
    assert_eq!(lk.handle(&list("roomA", Some(&other))).status, 401);

    let join = lkjwt::join_token(&creds(), "roomA", "@a:s:D").unwrap();
    assert_eq!(lk.handle(&list("roomA", Some(&join))).status, 401);

    let stats = Request {
        method: "GET".into(),
        ..post("/_standin/stats", "")
    };
    assert_eq!(
        body(&lk.handle(&stats))["list_participants_calls"],
        6,
        "rejected calls count too"
    );
}

#[test]
fn twirp_routing_errors() {
    let lk = LiveKit::new(&creds());
    let admin = admin_token(&creds(), "r").unwrap();
    let mut req = list("r", Some(&admin));
    req.path = "/twirp/livekit.RoomService/CreateRoom".into();
    let reply = lk.handle(&req);
    assert_eq!(
        (reply.status, body(&reply)["code"].as_str()),
        (404, Some("bad_route"))
    );

    let mut req = list("r", Some(&admin));
    req.method = "GET".into();
    assert_eq!(lk.handle(&req).status, 404);

    let mut req = list("r", Some(&admin));
    req.headers[0].1 = "application/protobuf".into();
    assert_eq!(lk.handle(&req).status, 404);

    let mut req = list("r", Some(&admin));
    req.headers[0].1 = "application/json; charset=utf-8".into();
    assert_eq!(lk.handle(&req).status, 200);

    for bad in ["", "{", "[]", r#"{"room":5}"#] {
        let mut req = list("r", Some(&admin));
        req.body = bad.as_bytes().to_vec();
        let reply = lk.handle(&req);
        assert_eq!(
            (reply.status, body(&reply)["code"].as_str()),
            (400, Some("malformed")),
            "{bad}"
        );
    }
    let mut req = list("r", Some(&admin));
    req.body = br#"{"room":"r","unknown_field":1}"#.to_vec();
    assert_eq!(lk.handle(&req).status, 200);
}

#[test]
fn join_seed_leave_and_stats() {
    let lk = LiveKit::new(&creds());
    let alias = lkjwt::room_alias("!room:test.local", "m.call#ROOM");
    let admin = admin_token(&creds(), &alias).unwrap();

    let seed = json!({ "room": alias, "participants": [
        { "identity": "@bob:test.local:B" },
        { "identity": "@carol:test.local:C", "state": "JOINING" },
    ]});
    let reply = lk.handle(&post("/_standin/rooms", &seed.to_string()));
    assert_eq!(
        reply.status,
        200,
        "{:?}",
        String::from_utf8_lossy(&reply.body)
    );

    let jwt = lkjwt::join_token(&creds(), &alias, "@alice:test.local:A").unwrap();
    let reply = lk.handle(&post(
        "/_standin/join",
        &json!({ "token": jwt }).to_string(),
    ));
    assert_eq!(
        body(&reply),
        json!({ "room": alias, "identity": "@alice:test.local:A" })
    );
    let reply = lk.handle(&post(
        "/_standin/join",
        &json!({ "token": jwt, "state": "JOINED" }).to_string(),
    ));
    assert_eq!(reply.status, 200);

    let reply = lk.handle(&list(&alias, Some(&admin)));
    let participants = body(&reply)["participants"].as_array().unwrap().clone();
    let ids: Vec<_> = participants
        .iter()
        .map(|p| {
            (
                p["identity"].as_str().unwrap(),
                p["state"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        ids,
        [
            ("@bob:test.local:B", "ACTIVE"),
            ("@carol:test.local:C", "JOINING"),
            ("@alice:test.local:A", "JOINED")
        ]
    );
    let alice = &participants[2];
    assert_eq!(alice["version"], 1);
    assert_eq!(alice["kind"], "STANDARD");
    assert_eq!(alice["permission"]["can_update_metadata"], true);
    let joined_at: u64 = alice["joined_at"].as_str().unwrap().parse().unwrap();
    let joined_at_ms: u64 = alice["joined_at_ms"].as_str().unwrap().parse().unwrap();
    assert_eq!(joined_at, joined_at_ms / 1000);
    assert!(alice["sid"].as_str().unwrap().starts_with("PA_"));

    let reply = lk.handle(&post(
        "/_standin/leave",
        &json!({ "room": alias, "identity": "@bob:test.local:B" }).to_string(),
    ));
    assert_eq!(body(&reply)["removed"], true);
    let reply = lk.handle(&post(
        "/_standin/leave",
        &json!({ "room": alias, "identity": "@nobody" }).to_string(),
    ));
    assert_eq!(body(&reply)["removed"], false);

    let stats = Request {
        method: "GET".into(),
        ..post("/_standin/stats", "")
    };
    assert_eq!(
        body(&lk.handle(&stats)),
        json!({ "list_participants_calls": 1, "rooms": { alias.clone(): 2 } }),
        "one ListParticipants call so far"
    );

    assert_eq!(lk.handle(&post("/_standin/reset", "")).status, 200);
    assert_eq!(
        body(&lk.handle(&stats)),
        json!({ "list_participants_calls": 0, "rooms": {} })
    );
}

#[test]
fn control_api_rejects_bad_input() {
    let lk = LiveKit::new(&creds());
    let admin = admin_token(&creds(), "r").unwrap();
    let cases = [
        ("/_standin/join", json!({ "token": "garbage" }), 401),
        ("/_standin/join", json!({ "token": admin }), 401),
        (
            "/_standin/join",
            json!({ "token": admin, "state": "WEIRD" }),
            400,
        ),
        (
            "/_standin/rooms",
            json!({ "room": "r", "participants": [{ "identity": "a" }, { "identity": "a" }] }),
            400,
        ),
        (
            "/_standin/rooms",
            json!({ "room": "r", "participants": [{ "identity": "a", "state": "active" }] }),
            400,
        ),
        ("/_standin/rooms", json!({ "room": "r", "extra": 1 }), 400),
        ("/_standin/config", json!({ "delay_ms": -1 }), 400),
        ("/_standin/nope", json!({}), 404),
    ];
    for (path, body, status) in cases {
        assert_eq!(
            lk.handle(&post(path, &body.to_string())).status,
            status,
            "{path} {body}"
        );
    }
    assert_eq!(lk.handle(&post("/_standin/rooms", "not json")).status, 400);
    let get = Request {
        method: "GET".into(),
        ..post("/_standin/rooms", "")
    };
    assert_eq!(lk.handle(&get).status, 405);
    assert_eq!(lk.handle(&post("/elsewhere", "")).status, 404);
}

#[test]
fn delay_slows_list_participants() {
    let lk = LiveKit::new(&creds());
    let admin = admin_token(&creds(), "r").unwrap();
    assert_eq!(
        lk.handle(&post("/_standin/config", r#"{"delay_ms":150}"#))
            .status,
        200
    );
    let start = std::time::Instant::now();
    assert_eq!(lk.handle(&list("r", Some(&admin))).status, 200);
    assert!(start.elapsed() >= Duration::from_millis(150));
}
