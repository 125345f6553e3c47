//! lk-jwt-service's reading of token request bodies against the filter's, body by body.
//!
//! The Go program in `tests/oracle` decodes every body of a corpus with Go's own
//! `encoding/json`, the way lk-jwt-service 0.5.0 does, and tells whether the service would
//! accept it and what it would read. This test runs it and requires the strict reader
//! ([`strict_token::parse_at`]) to reach the same outcome on every body: the same refusal, or
//! the same shape, room, slot, device, member id, claimed user, OpenID access token and server
//! name, LiveKit room alias and (new shape) identity hash. On every body the service accepts,
//! the filter's own lenient reader ([`token_request::parse`]) must read all of them too: the
//! guard decides on them before lk-jwt-service sees the body.
//!
//! `make test-oracle` builds the oracle, writes the corpus (`tests/oracle/gen_corpus.py`) and
//! runs this test with `VLG_ORACLE_REQUIRED=1`. Without an oracle and a corpus (a plain
//! `cargo test`), the test says so and passes.
//!
//! Environment: `VLG_ORACLE` (the oracle binary, default `target/oracle/vlg-oracle`),
//! `VLG_ORACLE_CORPUS` (default `target/oracle/corpus.jsonl`), `VLG_ORACLE_REQUIRED`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde_json::Value;
use voice_limit_guard::request::livekit_names::{hash_of_strings, room_alias};
use voice_limit_guard::request::token_request::{self, Shape, TokenRequest};

mod strict_token;
use strict_token::Endpoint;

/// Mismatches listed in full when the test fails.
const SHOWN: usize = 12;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Outcome {
    accepted: bool,
    shape: String,
    room: String,
    slot: String,
    device: String,
    member_id: String,
    claimed_user: String,
    alias: String,
    identity: String,
    access_token: String,
    server_name: String,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.accepted {
            return f.write_str("refused");
        }
        write!(
            f,
            "{} room={:?} slot={:?} device={:?} member_id={:?} claimed_user={:?} alias={} identity={} \
             access_token={:?} server_name={:?}",
            self.shape,
            self.room,
            self.slot,
            self.device,
            self.member_id,
            self.claimed_user,
            self.alias,
            self.identity,
            self.access_token,
            self.server_name
        )
    }
}

struct Case {
    name: String,
    endpoint: Endpoint,
    body: Vec<u8>,
}

fn string_member(value: &Value, key: &str) -> String {
    value
        .get(key)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned()
}

fn read_corpus(path: &Path) -> Vec<Case> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("cannot read the corpus {}: {e}", path.display()));
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("corpus line {}: {e}", i + 1));
            let endpoint = match string_member(&value, "endpoint").as_str() {
                "/sfu/get" => Endpoint::SfuGet,
                "/get_token" => Endpoint::GetToken,
                other => panic!("corpus line {}: unknown endpoint {other:?}", i + 1),
            };
            let body = STANDARD
                .decode(string_member(&value, "body_b64"))
                .unwrap_or_else(|e| panic!("corpus line {}: {e}", i + 1));
            Case {
                name: string_member(&value, "name"),
                endpoint,
                body,
            }
        })
        .collect()
}

/// The oracle's answers, one per corpus line: the outcome and, if refused, its reason.
fn run_oracle(oracle: &Path, corpus: &Path) -> Vec<(Outcome, String)> {
    let output = Command::new(oracle)
        .arg(corpus)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the oracle {}: {e}", oracle.display()));
    eprint!("{}", String::from_utf8_lossy(&output.stderr));
    assert!(
        output.status.success(),
        "the oracle failed: {}",
        output.status
    );
    let stdout = String::from_utf8(output.stdout).expect("the oracle writes UTF-8");
    stdout
        .lines()
        .map(|line| {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("oracle line {line:?}: {e}"));
            let outcome = Outcome {
                accepted: value.get("ok") == Some(&Value::Bool(true)),
                shape: string_member(&value, "shape"),
                room: string_member(&value, "room"),
                slot: string_member(&value, "slot"),
                device: string_member(&value, "device"),
                member_id: string_member(&value, "member_id"),
                claimed_user: string_member(&value, "claimed_user"),
                alias: string_member(&value, "alias"),
                identity: string_member(&value, "identity"),
                access_token: string_member(&value, "access_token"),
                server_name: string_member(&value, "server_name"),
            };
            (outcome, string_member(&value, "error"))
        })
        .collect()
}

/// The strict reader's reading of one body, in the oracle's terms.
fn strict_outcome(case: &Case) -> (Outcome, String) {
    match strict_token::parse_at(case.endpoint, &case.body) {
        Err(e) => (Outcome::default(), e.to_string()),
        Ok(request) => (read_by_filter(&request.as_read_by_filter()), String::new()),
    }
}

/// The lenient reader's reading of one body, in the oracle's terms: what the filter reads.
fn lenient_outcome(case: &Case) -> (Outcome, String) {
    match token_request::parse(&case.body) {
        Err(e) => (Outcome::default(), e.to_string()),
        Ok(request) => (read_by_filter(&request), String::new()),
    }
}

/// A request in the oracle's terms. The new shape's identity is the one lk-jwt-service
/// issues when the OpenID check proves the claimed user (the only case it issues one); the
/// legacy identity needs that check's answer and is left out, as the oracle leaves it.
fn read_by_filter(request: &TokenRequest) -> Outcome {
    let (shape, device, identity) = match request.shape {
        Shape::Legacy => ("legacy", &request.device_id, String::new()),
        Shape::New => (
            "new",
            &request.claimed_device_id,
            hash_of_strings(&[
                &request.claimed_user_id,
                &request.claimed_device_id,
                &request.member_id,
            ]),
        ),
    };
    Outcome {
        accepted: true,
        shape: shape.to_owned(),
        room: request.room.clone(),
        slot: request.slot().to_owned(),
        device: device.clone(),
        member_id: request.member_id.clone(),
        claimed_user: request.claimed_user_id.clone(),
        alias: room_alias(&request.room, request.slot()),
        identity,
        access_token: request.openid.access_token.expose().to_owned(),
        server_name: request.openid.matrix_server_name.clone(),
    }
}

fn preview(body: &[u8]) -> String {
    const MAX: usize = 240;
    let shown: String = body[..body.len().min(MAX)].escape_ascii().to_string();
    if body.len() > MAX {
        format!("{shown}... ({} bytes)", body.len())
    } else {
        shown
    }
}

fn setting(name: &str, default: &str) -> PathBuf {
    std::env::var_os(name).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join(default),
        PathBuf::from,
    )
}

#[test]
fn identity_hash_matches_lk_jwt_service_vector() {
    assert_eq!(
        hash_of_strings(&["@alice:example.com", "DEVICE123", "memberABC"]),
        "J+T45tGruxc+HrUOqJJlyQSV33m728Cme4+vt8/SWrU"
    );
}

#[test]
fn filter_reads_bodies_as_lk_jwt_service_does() {
    let oracle = setting("VLG_ORACLE", "target/oracle/vlg-oracle");
    let corpus = setting("VLG_ORACLE_CORPUS", "target/oracle/corpus.jsonl");
    if !oracle.exists() || !corpus.exists() {
        let missing = if oracle.exists() { &corpus } else { &oracle };
        assert!(
            std::env::var_os("VLG_ORACLE_REQUIRED").is_none(),
            "{} is missing",
            missing.display()
        );
        eprintln!(
            "differential test skipped: {} is missing (run `make test-oracle`)",
            missing.display()
        );
        return;
    }

    let started = Instant::now();
    let cases = read_corpus(&corpus);
    let expected = run_oracle(&oracle, &corpus);
    assert_eq!(
        expected.len(),
        cases.len(),
        "the oracle answered {} of {} bodies",
        expected.len(),
        cases.len()
    );

    let mut accepted = [0usize; 2];
    let mut by_kind = std::collections::BTreeMap::<String, usize>::new();
    let mut mismatches = Vec::new();
    for (case, (go, go_error)) in cases.iter().zip(&expected) {
        // The filter reads bodies leniently (a field a newer lk-jwt-service accepts must not
        // make every request unreadable), so on every body lk-jwt-service accepts the lenient
        // reader must read what Go reads, in every field the guard uses.
        if go.accepted {
            let (lenient, lenient_error) = lenient_outcome(case);
            if *go != lenient {
                mismatches.push((
                    case,
                    go.clone(),
                    go_error,
                    lenient,
                    format!("(lenient) {lenient_error}"),
                ));
            }
        }
        let (rust, rust_error) = strict_outcome(case);
        if go.accepted {
            accepted[0] += 1;
            *by_kind
                .entry(format!("{} {}", case.endpoint.path(), go.shape))
                .or_default() += 1;
        }
        if rust.accepted {
            accepted[1] += 1;
        }
        if *go != rust {
            mismatches.push((case, go.clone(), go_error, rust, rust_error.clone()));
        }
    }

    eprintln!(
        "differential: {} bodies, {} accepted by lk-jwt-service's decoding ({} by the filter), {} mismatches, {:.2?}",
        cases.len(),
        accepted[0],
        accepted[1],
        mismatches.len(),
        started.elapsed()
    );
    for (kind, count) in &by_kind {
        eprintln!("  accepted {kind}: {count}");
    }
    for (case, go, go_error, rust, rust_error) in mismatches.iter().take(SHOWN) {
        eprintln!(
            "MISMATCH {}\n  endpoint: {}\n  body:     {}\n  go:       {go} {go_error}\n  filter:   {rust} {rust_error}",
            case.name,
            case.endpoint.path(),
            preview(&case.body)
        );
    }
    assert!(
        mismatches.is_empty(),
        "{} of {} bodies are read differently by the filter and by Go (first ones above)",
        mismatches.len(),
        cases.len()
    );
    assert!(
        accepted[0] > 0 && accepted[0] < cases.len(),
        "the corpus should hold accepted and refused bodies"
    );
}
