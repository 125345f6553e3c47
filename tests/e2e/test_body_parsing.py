"""Bodies crafted to make the guard read another room than lk-jwt-service does.

lk-jwt-service decodes with Go's encoding/json: keys match case-insensitively, the last of
duplicate keys wins, escapes in keys are decoded, ``null`` leaves a field alone, and anything
after the first JSON value is never read. A body that gets a token for the full room must be
refused, however it is spelt. Every case first checks that the lk-jwt stand-in really issues
a token for the full room from that body: otherwise the case would prove nothing.
"""

from __future__ import annotations

import http.client
import json
from typing import Callable

import pytest

from conftest import requires_standins, requires_wasm
from guard import (
    CHANNEL_FULL,
    SHAPES,
    assert_channel_full,
    counting,
    direct,
    fill_room,
    module_envoy,
    token_body,
)
from stack import jwt_claims, livekit_alias

pytestmark = [requires_wasm, requires_standins]


envoy, _log_on_failure = module_envoy("body-parsing")


@pytest.fixture(scope="module")
def full_room(synapse, standins):
    """A room limited to 2 with two users in; refusals leave it as it is, so tests share it."""
    room = synapse.create_room()
    synapse.set_limit(room, 2)
    for shape in ("legacy", "new"):
        fill_room(standins, room, shape, [("alice", "A1"), ("bob", "B1")])
    return room


@pytest.fixture
def rooms(full_room, new_room, standins):
    """The full room and a fresh free one (limit 2, one user in): an admission takes its place."""
    free = new_room(limit=2)
    for shape in ("legacy", "new"):
        fill_room(standins, free, shape, [("alice", "A1")])
    return full_room, free


# --------------------------------------------------------------------------- raw JSON building


def j(value) -> str:
    return json.dumps(value)


def raw_object(pairs: list[tuple[str, str]]) -> bytes:
    """A JSON object from already-encoded ``(key, value)`` texts, duplicates and all."""
    return ("{" + ",".join(f"{key}:{value}" for key, value in pairs) + "}").encode()


def pairs_of(shape: str, room_pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """carol's body for ``shape``, with its room field replaced by ``room_pairs``."""
    body = token_body(shape, "carol", "C1", "!placeholder")
    room_key = room_key_of(shape)
    rest = [(j(k), j(v)) for k, v in body.items() if k != room_key]
    return room_pairs + rest


def room_key_of(shape: str) -> str:
    return "room" if shape == "legacy" else "room_id"


def escape_all(text: str) -> str:
    """A JSON string literal with every character written as a ``\\u`` escape."""
    return '"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"'


Body = Callable[[str, str, str], bytes]  # (shape, full room, other room) -> body

ATTACKS: dict[str, Body] = {
    "upper_case_key": lambda s, full, other: raw_object(pairs_of(s, [(j(room_key_of(s).upper()), j(full))])),
    "mixed_case_key": lambda s, full, other: raw_object(pairs_of(s, [(j(room_key_of(s).title()), j(full))])),
    "duplicate_key_last_wins": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(other)), (j(room_key_of(s)), j(full))])),
    "duplicate_in_other_case": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(other)), (j(room_key_of(s).upper()), j(full))])),
    "escaped_key": lambda s, full, other: raw_object(pairs_of(s, [(escape_all(room_key_of(s)), j(full))])),
    "partly_escaped_key": lambda s, full, other: raw_object(
        pairs_of(s, [('"\\u0052' + room_key_of(s)[1:] + '"', j(full))])),
    "escaped_value": lambda s, full, other: raw_object(pairs_of(s, [(j(room_key_of(s)), escape_all(full))])),
    "null_after_value": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(full)), (j(room_key_of(s)), "null")])),
    "trailing_garbage": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(full))])) + b" trailing garbage",
    "second_object": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(full))])) + raw_object([(j(room_key_of(s)), j(other))]),
    "whitespace_everywhere": lambda s, full, other: json.dumps(
        json.loads(raw_object(pairs_of(s, [(j(room_key_of(s)), j(full))]))),
        indent="\t", separators=(" ,\r\n", " \n:\t ")).encode(),
    "invalid_utf8_elsewhere": lambda s, full, other: raw_object(
        pairs_of(s, [(j(room_key_of(s)), j(full))])).replace(b'"C1"', b'"C\xff1"'),
}


def issued_alias(standins, path: str, body: bytes) -> str | None:
    """The LiveKit room lk-jwt-service issues a token for, or None if it refuses the body."""
    resp = direct(standins, "POST", path, body)
    return jwt_claims(resp.json()["jwt"])["video"]["room"] if resp.status_code == 200 else None


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("attack", list(ATTACKS))
def test_body_spelling_does_not_bypass_the_limit(envoy, standins, full_room, path, shape, attack):
    full, other = full_room, "!other:test.local"
    body = ATTACKS[attack](shape, full, other)
    assert issued_alias(standins, path, body) == livekit_alias(full), \
        "lk-jwt-service must issue a token for the full room from this body, or the case proves nothing"
    with counting(envoy, standins) as counts:
        resp = envoy.post(path, body, headers={"Content-Type": "application/json"})
    assert_channel_full(resp)
    assert counts.guard.get("blocked") == 1


def post_raw(address: tuple[str, int], path: str, body: bytes) -> tuple[int, bytes]:
    """POST with the path sent exactly as written (``requests`` would normalise ``%66`` away)."""
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("path, shape", [
    pytest.param("/s%66u/get", "legacy", id="sfu_get"),
    pytest.param("/get%5Ftoken", "new", id="get_token"),
])
def test_percent_encoded_token_path_does_not_bypass_the_limit(envoy, standins, full_room, path, shape):
    """Go's router decodes the path before matching: lk-jwt-service issues a token for
    ``/s%66u/get``, so the guard must check it as ``/sfu/get``."""
    full = full_room
    body = json.dumps(token_body(shape, "carol", "C1", full)).encode()
    status, answer = post_raw(standins.jwt_address, path, body)
    assert status == 200, answer
    assert jwt_claims(json.loads(answer)["jwt"])["video"]["room"] == livekit_alias(full)
    with counting(envoy, standins) as counts:
        status, answer = post_raw(envoy.address, path, body)
    assert (status, answer) == (403, CHANNEL_FULL)
    assert counts.guard.get("blocked") == 1 and "fail_open" not in counts.guard


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("spelling", ["same_case", "upper_then_lower"])
def test_last_duplicate_naming_a_free_room_is_allowed(envoy, standins, rooms, path, shape, spelling):
    """The converse: the room lk-jwt-service actually reads is the free one, so no refusal."""
    full, free = rooms
    key = room_key_of(shape)
    first = key if spelling == "same_case" else key.upper()
    body = raw_object(pairs_of(shape, [(j(first), j(full)), (j(key), j(free))]))
    assert issued_alias(standins, path, body) == livekit_alias(free)
    with counting(envoy, standins) as counts:
        resp = envoy.post(path, body)
    assert resp.status_code == 200, resp.text
    assert jwt_claims(resp.json()["jwt"])["video"]["room"] == livekit_alias(free)
    assert counts.guard.get("allowed") == 1


def test_new_shape_on_sfu_get_in_other_case_is_limited(envoy, standins, full_room):
    """lk-jwt-service 0.5.0 also takes the new shape on /sfu/get; its keys fold case there too."""
    body = raw_object(pairs_of("new", [(j("ROOM_ID"), j(full_room))]))
    assert issued_alias(standins, "/sfu/get", body) == livekit_alias(full_room)
    assert_channel_full(envoy.post("/sfu/get", body))
