//! Runs the real binaries: the port announcement, per-request threads and
//! the token round trip between the two stand-ins.

// Test helpers outside `#[test]` functions may fail loudly too.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Running {
    child: Child,
    addr: String,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(bin: &str, extra: &[&str]) -> Running {
    let mut child = Command::new(bin)
        .args(["--key", "devkey", "--secret", "secret-secret-secret"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap()
        .to_owned();
    Running { child, addr }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
fn call(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    stream.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    stream.read_to_string(&mut resp).unwrap();
    let status = resp[9..12].parse().unwrap();
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn token_round_trip_and_slow_livekit() {
    let jwt = start(
        env!("CARGO_BIN_EXE_lk-jwt-standin"),
        &["--livekit-url", "ws://lk.test"],
    );
    let lk = start(env!("CARGO_BIN_EXE_livekit-standin"), &[]);

    assert_eq!(call(&jwt.addr, "GET", "/healthz", &[], "").0, 200);
    let body = r#"{"room":"!r:test.local","openid_token":{"access_token":"openid:@alice:test.local","matrix_server_name":"test.local"},"device_id":"D1"}"#;
    let (status, answer) = call(
        &jwt.addr,
        "POST",
        "/sfu/get",
        &[("Content-Type", "application/json")],
        body,
    );
    assert_eq!(status, 200, "{answer}");
    let answer = json(&answer);
    assert_eq!(answer["url"], "ws://lk.test");
    let token = answer["jwt"].as_str().unwrap();

    let (status, joined) = call(
        &lk.addr,
        "POST",
        "/_standin/join",
        &[],
        &format!(r#"{{"token":"{token}"}}"#),
    );
    assert_eq!(status, 200, "{joined}");
    let room = json(&joined)["room"].as_str().unwrap().to_owned();

    let admin = Command::new(env!("CARGO_BIN_EXE_livekit-standin"))
        .args([
            "--key",
            "devkey",
            "--secret",
            "secret-secret-secret",
            "--mint-admin-token",
            &room,
        ])
        .output()
        .unwrap();
    let admin = String::from_utf8(admin.stdout).unwrap().trim().to_owned();
    let auth = format!("Bearer {admin}");
    let list_headers = [
        ("Content-Type", "application/json"),
        ("Authorization", auth.as_str()),
    ];
    let list_body = format!(r#"{{"room":"{room}"}}"#);
    let (status, listed) = call(
        &lk.addr,
        "POST",
        "/twirp/livekit.RoomService/ListParticipants",
        &list_headers,
        &list_body,
    );
    assert_eq!(status, 200, "{listed}");
    let listed = json(&listed);
    assert_eq!(
        listed["participants"][0]["identity"],
        "@alice:test.local:D1"
    );
    assert_eq!(listed["participants"][0]["state"], "ACTIVE");

    // A slow ListParticipants must not hold up anything else.
    assert_eq!(
        call(
            &lk.addr,
            "POST",
            "/_standin/config",
            &[],
            r#"{"delay_ms":800}"#
        )
        .0,
        200
    );
    let start = Instant::now();
    let slow: Vec<_> = (0..3)
        .map(|_| {
            let (addr, body, auth) = (lk.addr.clone(), list_body.clone(), auth.clone());
            std::thread::spawn(move || {
                let headers = [
                    ("Content-Type", "application/json"),
                    ("Authorization", auth.as_str()),
                ];
                call(
                    &addr,
                    "POST",
                    "/twirp/livekit.RoomService/ListParticipants",
                    &headers,
                    &body,
                )
                .0
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(100));
    let (status, stats) = call(&lk.addr, "GET", "/_standin/stats", &[], "");
    assert_eq!(status, 200);
    assert!(
        start.elapsed() < Duration::from_millis(600),
        "stats waited for the slow calls"
    );
    assert_eq!(json(&stats)["list_participants_calls"], 4);
    for handle in slow {
        assert_eq!(handle.join().unwrap(), 200);
    }
    let elapsed = start.elapsed();
    assert!(
        elapsed >= Duration::from_millis(800) && elapsed < Duration::from_millis(2000),
        "{elapsed:?}"
    );
}

#[test]
fn refuses_to_start_without_credentials() {
    let out = Command::new(env!("CARGO_BIN_EXE_lk-jwt-standin"))
        .env_remove("LIVEKIT_KEY")
        .env_remove("LIVEKIT_SECRET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("LIVEKIT_KEY"));
}
