"""What the guard must leave alone: requests that are not token requests, and lk-jwt-service
answers other than 200. Each is compared with the same request sent straight to the lk-jwt
stand-in, so "untouched" means byte-identical, not merely "the same status".
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from conftest import requires_standins, requires_wasm
from guard import (
    SHAPES,
    as_bytes,
    comparable_headers,
    counting,
    direct,
    identity,
    module_envoy,
    token_body,
)
from realstack import join_token
from stack import DECISION_PHASE, LIVEKIT_KEY, LIVEKIT_SECRET, livekit_alias

pytestmark = [requires_wasm, requires_standins]


envoy, _log_on_failure = module_envoy("passthrough")


def assert_same_answer(through_envoy, straight) -> None:
    assert through_envoy.status_code == straight.status_code
    assert through_envoy.content == straight.content
    assert comparable_headers(through_envoy) == comparable_headers(straight)


# --------------------------------------------------------------------------- not token requests


NOT_TOKEN_REQUESTS = [
    ("OPTIONS", "/sfu/get", None),
    ("OPTIONS", "/get_token", None),
    ("GET", "/healthz", None),
    ("HEAD", "/healthz", None),
    ("GET", "/sfu/get", None),
    ("HEAD", "/sfu/get", None),
    ("GET", "/get_token", None),
    ("HEAD", "/get_token", None),
    ("PUT", "/sfu/get", "body"),
    ("DELETE", "/get_token", None),
    ("POST", "/delegate_delayed_leave", "body"),
    ("POST", "/sfu_webhook", "body"),
    ("POST", "/sfu/get/extra", "body"),
    ("POST", "/sfu", "body"),
    ("POST", "/get_tokens", "body"),
    ("POST", "/", "body"),
]


@pytest.mark.parametrize("method, path, body", NOT_TOKEN_REQUESTS,
                         ids=[f"{m}-{p}" for m, p, _ in NOT_TOKEN_REQUESTS])
def test_not_a_token_request_passes_untouched_and_uncounted(envoy, standins, full_room,
                                                           method, path, body):
    """Preflights, health checks, other methods and other paths never reach the guard's logic,
    even with a body that names a full room."""
    data = as_bytes(token_body("legacy", "carol", "C1", full_room)) if body else None
    straight = direct(standins, method, path, data)
    with counting(envoy, standins) as counts:
        resp = envoy.request(method, path, data=data)
    assert_same_answer(resp, straight)
    assert counts.guard == {}
    assert counts.list_participants == 0


def test_preflight_carries_lk_jwt_cors(envoy):
    resp = envoy.request("OPTIONS", "/sfu/get", headers={
        "Origin": "https://call.example", "Access-Control-Request-Method": "POST"})
    assert resp.status_code == 200
    assert resp.content == b""
    assert resp.headers["access-control-allow-origin"] == "*"
    assert resp.headers["access-control-allow-methods"] == "POST"


# --------------------------------------------------------------------------- lk-jwt-service's errors


def _legacy_or_new(shape, legacy, new):
    return legacy if shape == "legacy" else new


def error_bodies(shape: str, room: str) -> dict[str, tuple[bytes, int, str]]:
    """Bodies lk-jwt-service refuses, with the status and errcode it answers."""
    good = token_body(shape, "carol", "C1", room)
    key = _legacy_or_new(shape, "room", "room_id")
    bad_openid = json.loads(json.dumps(good))
    bad_openid["openid_token"]["access_token"] = "not-a-valid-openid-token"
    # lk-jwt-service 0.5.0's /sfu/get tries both shapes and calls any undecodable body M_BAD_JSON.
    not_json = _legacy_or_new(shape, "M_BAD_JSON", "M_NOT_JSON")
    return {
        "bad_json": (b'{"' + key.encode() + b'": ', 400, not_json),
        "empty": (b"", 400, not_json),
        "not_an_object": (b"[1, 2]", 400, not_json),
        "unknown_field": (as_bytes({**good, "surprise": True}), 400, not_json),
        "missing_fields": (as_bytes({key: room}), 400, "M_BAD_JSON"),
        "empty_room": (as_bytes({**good, key: ""}), 400, "M_BAD_JSON"),
        "bad_openid": (as_bytes(bad_openid), *_legacy_or_new(
            shape, (500, "M_LOOKUP_FAILED"), (401, "M_UNAUTHORIZED"))),
    }


ERROR_CASES = ["bad_json", "empty", "not_an_object", "unknown_field", "missing_fields",
               "empty_room", "bad_openid"]


def room_lk_jwt_answers(full_room: str, new_room) -> str:
    """Where lk-jwt-service's own answer is what the client gets. Decided on the response, a
    full room: lk-jwt-service answers first. Decided on the request, the guard refuses a new
    user of a full room before lk-jwt-service sees the body, so a room with space."""
    return full_room if DECISION_PHASE == "response" else new_room(limit=5)


def assert_nothing_kept(counts) -> None:
    """A refused request is counted, but neither admitted nor refused by the guard in the end:
    decided on the request, the place it was given is given back."""
    assert not {"blocked", "fail_open", "fail_closed"} & set(counts.guard)
    if DECISION_PHASE == "response":
        assert "allowed" not in counts.guard
    else:
        assert counts.guard.get("allowed", 0) == counts.guard.get("released_reservations", 0)


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("case", ERROR_CASES)
def test_lk_jwt_error_passes_byte_identical(envoy, standins, full_room, new_room, path, shape,
                                            case):
    room = room_lk_jwt_answers(full_room, new_room)
    body, status, errcode = error_bodies(shape, room)[case]
    straight = direct(standins, "POST", path, body)
    assert (straight.status_code, straight.json()["errcode"]) == (status, errcode), straight.text
    with counting(envoy, standins) as counts:
        resp = envoy.post(path, body)
    assert_same_answer(resp, straight)
    # A bodiless POST cannot get a token, so the filter does not even look at it.
    assert counts.guard.get("token_requests", 0) == (0 if case == "empty" else 1)
    assert_nothing_kept(counts)


def test_claimed_user_mismatch_401_passes_byte_identical(envoy, standins, full_room, new_room):
    """``/get_token`` refuses a member claiming another user than the OpenID token proves."""
    body = token_body("new", "carol", "C1", room_lk_jwt_answers(full_room, new_room))
    body["member"]["claimed_user_id"] = "@alice:test.local"
    straight = direct(standins, "POST", "/get_token", as_bytes(body))
    assert straight.status_code == 401
    resp = envoy.post("/get_token", body)
    assert_same_answer(resp, straight)


def test_an_allowed_token_passes_byte_identical(start_envoy, fault_server, new_room, standins):
    """The 200 the guard held and let go is lk-jwt-service's own, byte for byte: an
    lk-jwt-service with a fixed answer (a valid token for the room) shows it."""
    room = new_room(limit=3)
    token = join_token(LIVEKIT_KEY, LIVEKIT_SECRET, livekit_alias(room), identity("legacy", "carol", "C1"))
    answer = (json.dumps({"url": standins.livekit_ws_url, "jwt": token}, separators=(",", ":"))
              + "\n").encode()
    upstream = fault_server("ok", body=answer)
    envoy = start_envoy(lk_jwt=upstream)
    with counting(envoy, standins) as counts:
        resp = envoy.post("/sfu/get", token_body("legacy", "carol", "C1", room))
    assert resp.status_code == 200 and resp.content == answer
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "allowed": 1}


# --------------------------------------------------------------------------- streaming


class StreamingUpstream:
    """An upstream that answers one request in two chunks, the second only when told to, and
    records each request chunk as it arrives, so a test can see what Envoy forwards before a
    body or an answer is complete."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.received = bytearray()
        self.got_bytes = threading.Condition()
        self.finish_answer = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    @property
    def address(self) -> tuple[str, int]:
        return self.listener.getsockname()

    def wait_for(self, data: bytes, timeout: float = 10.0) -> bool:
        with self.got_bytes:
            return self.got_bytes.wait_for(lambda: data in self.received, timeout)

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        with conn:
            while b"LAST-CHUNK" not in self.received:
                data = conn.recv(65536)
                if not data:
                    return
                with self.got_bytes:
                    self.received += data
                    self.got_bytes.notify_all()
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n"
                         b"transfer-encoding: chunked\r\n\r\n"
                         b"c\r\nFIRST-ANSWER\r\n")
            self.finish_answer.wait(timeout=30)
            conn.sendall(b"b\r\nLAST-ANSWER\r\n0\r\n\r\n")

    def close(self) -> None:
        self.finish_answer.set()
        self.listener.close()


@pytest.mark.parametrize("path", ["/delegate_delayed_leave", "/sfu/get/extra"])
def test_other_requests_stream_both_ways(start_envoy, path):
    """A request that is not a token request is not buffered in either direction: the upstream
    gets the first part of its body before the client sends the rest, and the client gets the
    first part of the answer before the upstream sends the rest. Each step waits for the one
    before it, so a filter that buffered either body would stall the exchange."""
    upstream = StreamingUpstream()
    try:
        envoy = start_envoy(lk_jwt=upstream.address)
        with socket.create_connection(envoy.address, timeout=10) as client:
            client.sendall(f"POST {path} HTTP/1.1\r\nhost: lk-jwt\r\n"
                           "transfer-encoding: chunked\r\n\r\n"
                           "b\r\nFIRST-CHUNK\r\n".encode())
            assert upstream.wait_for(b"FIRST-CHUNK"), (
                f"the upstream did not get the first chunk before the body ended: {bytes(upstream.received)!r}")
            client.sendall(b"a\r\nLAST-CHUNK\r\n0\r\n\r\n")
            answer = bytearray()
            while b"FIRST-ANSWER" not in answer:
                data = client.recv(65536)
                assert data, f"connection closed before the first answer chunk: {bytes(answer)!r}"
                answer += data
            assert answer.startswith(b"HTTP/1.1 200"), bytes(answer)
            assert b"LAST-ANSWER" not in answer
            upstream.finish_answer.set()
            while not answer.endswith(b"0\r\n\r\n"):
                data = client.recv(65536)
                assert data, f"connection closed before the answer ended: {bytes(answer)!r}"
                answer += data
            assert b"LAST-ANSWER" in answer
        assert envoy.stats().get("token_requests", 0) == 0
    finally:
        upstream.close()
