"""A hostile client with a valid Matrix account, against the built module in real Envoy.

Each test is one way of getting past the guard or of turning it against other users: request
bodies that end in trailers or in many frames, device and member ids chosen to count as many
users, participant lists made huge by users' own metadata, floods of room ids, a Synapse
outage after a limit was seen, and a client that resets while the limit lookup is pending.
Each asserts the exact counters, so a check that silently fails open cannot pass.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import h2c
from conftest import requires_standins, requires_wasm
from guard import (
    CHANNEL_FULL,
    LK_JWT_HEADERS,
    SHAPES,
    ask,
    assert_channel_full,
    assert_check_failed,
    assert_token_issued,
    counting,
    fill_room,
    identity,
    module_envoy,
    still_serving,
    token_body,
    user,
)
from stack import DECISION_PHASE, LIVEKIT_KEY, LIVEKIT_SECRET, LIMIT_STATE_TYPE, livekit_alias, wait_until

pytestmark = [requires_wasm, requires_standins]

envoy, _log_on_failure = module_envoy("attacks")

TOO_MANY_DEVICES = b'{"errcode":"M_FORBIDDEN","error":"Too many devices are connected to this voice channel."}'


def limit_state(max_users: int) -> dict:
    return {"state": [{"type": LIMIT_STATE_TYPE, "state_key": "", "content": {"max_users": max_users}}]}


# --------------------------------------------------------------------------- every body is read


H2_ENDINGS = {
    "trailers": {"trailers": [("x-checksum", "abc")]},
    "many_frames_then_trailers": {"frames": 7, "trailers": [("x-checksum", "abc")]},
    "many_frames_then_empty_frame": {"frames": 9, "empty_last_frame": True},
    "one_frame": {},
}


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("ending", list(H2_ENDINGS))
def test_http2_body_is_read_however_it_ends(envoy, full_room, path, shape, ending):
    """An HTTP/2 request whose body ends in trailers (or in an empty DATA frame) is read like
    any other: carol gets no token for the full room."""
    body = json.dumps(token_body(shape, "carol", "C1", full_room)).encode()
    with counting(envoy) as counts:
        resp = h2c.request(envoy.address, "POST", path, body,
                           headers=[("content-type", "application/json"),
                                    ("content-length", str(len(body)))],
                           **H2_ENDINGS[ending])
    assert resp.status == 403, resp.body
    assert resp.body == CHANNEL_FULL
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "blocked": 1} or counts.guard == {
        "token_requests": 1, "limit_cache_hits": 1, "livekit_lookups": 1, "blocked": 1}


def test_http2_request_below_the_limit_still_gets_its_token(envoy, new_room, standins):
    """The same request shape in a room with space passes, byte for byte a token."""
    room = new_room(limit=2)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    body = json.dumps(token_body("legacy", "carol", "C1", room)).encode()
    with counting(envoy) as counts:
        resp = h2c.request(envoy.address, "POST", "/sfu/get", body, frames=5,
                           trailers=[("x-checksum", "abc")],
                           headers=[("content-type", "application/json")])
    assert resp.status == 200, resp.body
    assert set(json.loads(resp.body)) == {"url", "jwt"}
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "allowed": 1}


@pytest.mark.parametrize("path, shape", SHAPES)
def test_a_body_over_64_kib_gets_an_answer_a_browser_can_read(envoy, standins, full_room, path,
                                                              shape):
    """A token body past 64 KiB (lk-jwt-service's are under 4 KiB) and short of Envoy's buffer
    limit (1 MiB) is answered 413 M_TOO_LARGE with lk-jwt-service's CORS headers as soon as it
    grows past 64 KiB; lk-jwt-service never sees it. (A body that crosses Envoy's limit within
    one read can still meet Envoy's own plain-text 413 first: seen here with 2 MiB.)"""
    body = token_body(shape, "carol", "C1", full_room)
    body["padding_" + "x" * 8] = "p" * (512 * 1024)
    before = standins.jwt.stats()
    with counting(envoy) as counts:
        resp = envoy.post(path, body)
    assert resp.status_code == 413, resp.text[:200]
    assert resp.json()["errcode"] == "M_TOO_LARGE"
    for name, value in LK_JWT_HEADERS.items():
        assert resp.headers.get(name) == value, name
    assert counts.guard == {"token_requests": 1, "oversized_requests": 1}
    assert standins.jwt.stats()["issued"] == before["issued"]


def test_http1_chunked_body_with_trailers_is_read(envoy, full_room):
    """HTTP/1.1 chunked encoding, with a trailer section, in several chunks."""
    body = json.dumps(token_body("legacy", "carol", "C1", full_room)).encode()
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(part), part)
                      for part in (body[:10], body[10:40], body[40:]))
    request = (b"POST /sfu/get HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
               + chunks + b"0\r\nX-Checksum: abc\r\n\r\n")
    with counting(envoy) as counts:
        with socket.create_connection(envoy.address, timeout=10) as sock:
            sock.sendall(request)
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    assert answer.startswith(b"HTTP/1.1 403"), answer[:200]
    assert answer.endswith(CHANNEL_FULL)
    assert counts.guard.get("blocked") == 1 and "fail_open" not in counts.guard


def test_an_upstream_answering_on_the_headers_alone_gets_no_token_past_the_check(
        start_envoy, plugin_config, fault_server, full_room):
    """lk-jwt-service answers once it has read the body, but an upstream that answers on the
    headers alone (here a fault server issuing mallory a token for the full room) must not
    get its 200 past the check. Decided on the response, the request goes upstream only with
    its whole body, so mallory gets the full room's 403. Decided on the request (headers go
    on, the body is held: what every host honours), a 200 that comes before the decision is
    never passed: mallory gets a 503, not a token."""
    token = {"url": "ws://livekit", "jwt": mint_token(livekit_alias(full_room), "@mallory:test.local:M")}
    upstream = fault_server("early", body=token)
    proxy = start_envoy(plugin_config(), lk_jwt=upstream)
    body = json.dumps(token_body("legacy", "mallory", "M", full_room)).encode()
    head = (b"POST /sfu/get HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(body))
    with counting(proxy) as counts:
        with socket.create_connection(proxy.address, timeout=10) as sock:
            sock.sendall(head)
            # Were the headers passed on, the upstream would have them (and answer) at once.
            deadline = time.monotonic() + 2
            while upstream.hits == 0 and time.monotonic() < deadline:
                time.sleep(0.02)
            reached_before_body = upstream.hits
            sock.sendall(body)
            answer = http.client.HTTPResponse(sock)
            answer.begin()
            content = answer.read()
    assert upstream.hits == 1
    if DECISION_PHASE == "response":
        assert reached_before_body == 0
        assert answer.status == 403, content
        assert content == CHANNEL_FULL
        assert counts.guard.get("blocked") == 1 and "unreadable_requests" not in counts.guard
    else:
        assert reached_before_body == 1
        assert answer.status == 503, content
        assert b"jwt" not in content
        assert counts.guard.get("unreadable_requests") == 1 and "allowed" not in counts.guard


def mint_token(room: str, identity_: str) -> str:
    """A join JWT like lk-jwt-service's, signed with the test LiveKit secret."""
    def b64(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    now = int(time.time())
    head = b64({"alg": "HS256", "typ": "JWT"})
    payload = b64({"iss": LIVEKIT_KEY, "sub": identity_, "nbf": now, "exp": now + 3600,
                   "video": {"roomJoin": True, "room": room}})
    signature = hmac.new(LIVEKIT_SECRET.encode(), f"{head}.{payload}".encode(), hashlib.sha256).digest()
    return f"{head}.{payload}.{base64.urlsafe_b64encode(signature).rstrip(b'=').decode()}"


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
@pytest.mark.parametrize("body", [b'{"room": 5}', b"not json", b'{"device_id":"D"}'],
                         ids=["wrong_type", "not_json", "no_room"])
def test_token_for_a_body_the_guard_cannot_read_is_never_passed(start_envoy, plugin_config,
                                                                fault_server, failure_mode, body):
    """An lk-jwt-service that issues a token for a body the guard cannot read (here a fault
    server answering every request with a valid token) gets a 503, whatever failure_mode says."""
    token = {"url": "ws://livekit", "jwt": mint_token("some-alias", "@mallory:test.local:M")}
    proxy = start_envoy(plugin_config(failure_mode=failure_mode),
                        lk_jwt=fault_server("ok", body=token))
    with counting(proxy) as counts:
        resp = proxy.post("/sfu/get", body)
    assert_check_failed(resp)
    assert b"could not be checked against the participant limit" in resp.content
    assert counts.guard == {"token_requests": 1, "unreadable_requests": 1}


# --------------------------------------------------------------------------- one user counts once


def test_member_id_flood_cannot_fill_the_room(envoy, new_room, standins):
    """/get_token identities are hashes of (user, device, member id), all chosen by the client.
    mallory's connected devices are capped at 16, further ones are refused, and the room
    keeps its place for bob; carol then finds it full."""
    room = new_room(limit=2)
    alias = livekit_alias(room)
    connected = []
    refused = 0
    with counting(envoy, standins) as counts:
        for n in range(20):
            resp = ask(envoy, "/get_token", "new", "mallory", f"M{n}", room)
            if resp.status_code == 200:
                connected.append((identity("new", "mallory", f"M{n}"), "ACTIVE"))
                standins.set_room(alias, connected)
            else:
                assert resp.status_code == 403 and resp.content == TOO_MANY_DEVICES, resp.text
                refused += 1
        assert (len(connected), refused) == (16, 4)
        assert_token_issued(ask(envoy, "/get_token", "new", "bob", "B1", room), room, "new",
                            "bob", "B1", standins)
        connected.append((identity("new", "bob", "B1"), "ACTIVE"))
        standins.set_room(alias, connected)
        assert_channel_full(ask(envoy, "/get_token", "new", "carol", "C1", room))
    assert counts.guard == {"token_requests": 22, "synapse_lookups": 1, "limit_cache_hits": 21,
                            "livekit_lookups": 22, "allowed": 17, "blocked": 5}


# --------------------------------------------------------------------------- huge participant lists


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
def test_participants_metadata_of_megabytes_does_not_turn_the_check_off(
        start_envoy, plugin_config, fault_server, new_room, failure_mode):
    """Five participants with 1 MB of their own metadata and attributes each: still five users."""
    room = new_room(limit=5)
    fat = "m" * 1_000_000
    listing = {"participants": [
        {"sid": f"PA_{n}", "identity": f"@u{n}:test.local:D", "state": "ACTIVE", "metadata": fat,
         "attributes": {"status": fat[:100_000]}, "tracks": [{"sid": "TR", "name": "mic"}]}
        for n in range(5)]}
    proxy = start_envoy(plugin_config(failure_mode=failure_mode),
                        livekit=fault_server("ok", body=listing))
    with counting(proxy) as counts:
        resp = ask(proxy, "/sfu/get", "legacy", "carol", "C1", room, timeout=30)
    assert_channel_full(resp)
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "blocked": 1}
    still_serving(proxy)


# --------------------------------------------------------------------------- state that holds


def test_a_flood_of_room_ids_does_not_push_out_a_limit(start_envoy, plugin_config, full_room):
    """1,000 distinct room ids (each a lookup, each cached as unlimited) leave the full
    room's cached limit in place: no new lookup, still full. (The cache lifetime is an hour, so
    that however slowly the flood runs, only eviction could make the limit go.)"""
    # No lookup budget: every one of the 1,000 ids is looked up, however fast the flood runs.
    envoy = start_envoy(plugin_config(limit_cache_ttl_seconds=3600,
                                      synapse={"max_lookups_per_second": 0}))
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", full_room))
    with counting(envoy) as counts:
        for n in range(1000):
            body = token_body("legacy", "mallory", "M", f"!flood{n}-{time.monotonic_ns()}:test.local")
            assert envoy.post("/sfu/get", body).status_code == 200
    assert counts.guard.get("synapse_lookups") == 1000
    with counting(envoy) as counts:
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", full_room))
    assert counts.guard == {"token_requests": 1, "limit_cache_hits": 1, "livekit_lookups": 1,
                            "blocked": 1}


LOOKUP_BUDGET = 20


def flood_new_rooms(envoy, tag: str, until: float, statuses: list[int],
                    shed: list[tuple[str, dict, bytes]] | None = None) -> None:
    """One flooding client: mallory's `/sfu/get` for a room id nobody has seen, again and
    again until ``until``; each answer's status is kept, and a 429's room, headers and body in
    ``shed``."""
    n = 0
    while time.monotonic() < until:
        room = f"!{tag}-{n}-{time.monotonic_ns()}:test.local"
        resp = envoy.post("/sfu/get", token_body("legacy", "mallory", "M", room))
        statuses.append(resp.status_code)
        if shed is not None and resp.status_code == 429:
            shed.append((room, dict(resp.headers), resp.content))
        n += 1


def test_a_flood_of_new_room_ids_costs_synapse_at_most_the_lookup_budget(
        start_envoy, plugin_config, full_room):
    """I4: what a client that proves nothing makes Synapse do is bounded per process.

    16 clients send requests for room ids nobody has seen, as fast as Envoy answers, for three
    seconds. Synapse is asked at most `max_lookups_per_second` times a second (plus the one
    second's worth the budget starts with); the other requests are answered 429
    M_LIMIT_EXCEEDED with a Retry-After, never let through unchecked. A room whose limit is
    known is still refused when full, during the flood, and a room refused for the budget is
    looked up once the budget refills."""
    envoy = start_envoy(plugin_config(synapse={"max_lookups_per_second": LOOKUP_BUDGET}))
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", full_room))
    token_body("legacy", "mallory", "M", full_room)  # mallory's OpenID token, made once
    statuses: list[int] = []
    shed: list[tuple[str, dict, bytes]] = []
    deadline = time.monotonic() + 3.0

    def flood(worker: int) -> None:
        flood_new_rooms(envoy, f"i4-{worker}", deadline, statuses, shed)

    with counting(envoy) as counts:
        t0 = time.monotonic()
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(flood, range(16)))
        elapsed = time.monotonic() - t0
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", full_room))
    lookups = counts.guard.get("synapse_lookups", 0)
    print(f"\n{len(statuses)} requests in {elapsed:.1f}s ({len(statuses) / elapsed:.0f}/s): "
          f"{lookups} Synapse lookups ({lookups / elapsed:.1f}/s), {len(shed)} answered 429")
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    assert shed, "the flood never spent the budget"
    assert lookups <= LOOKUP_BUDGET * (elapsed + 1) + 1, lookups
    assert statuses.count(200) == lookups, (statuses.count(200), lookups)
    assert counts.guard.get("lookups_over_budget") == len(shed)
    assert "fail_open" not in counts.guard, counts.guard
    room, headers, body = shed[0]
    assert json.loads(body)["errcode"] == "M_LIMIT_EXCEEDED"
    assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"
    time.sleep(1.1)  # the budget's own refill time, not a wait for something to happen
    assert envoy.post("/sfu/get", token_body("legacy", "mallory", "M", room)).status_code == 200


def test_a_flood_of_new_room_ids_leaves_rooms_seen_before_their_answer(
        start_envoy, plugin_config, full_room, new_room, standins):
    """I4, the other side: the lookup budget never refuses a room the guard knows.

    A full room and a room without a limit are looked up, and their cache entries left to pass
    their TTL (1 s). Then 16 clients flood the guard with room ids nobody has seen, spending the
    budget. Throughout the flood, the full room is still refused (403, never 429) and the room
    without a limit still passes: each is decided on the answer seen last, within
    `stale_limit_seconds`, counted in `stale_limits_over_budget`."""
    envoy = start_envoy(plugin_config(limit_cache_ttl_seconds=1,
                                      synapse={"max_lookups_per_second": LOOKUP_BUDGET}))
    open_room = new_room()
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", full_room))
    assert_token_issued(ask(envoy, "/sfu/get", "legacy", "dave", "D1", open_room),
                        open_room, "legacy", "dave", "D1", standins)
    token_body("legacy", "mallory", "M", open_room)  # mallory's OpenID token, made once
    time.sleep(1.2)  # both entries past the 1 s TTL, so each would cost a lookup
    stop = time.monotonic() + 30.0
    flood_statuses: list[int] = []

    def flood(worker: int) -> None:
        flood_new_rooms(envoy, f"i4-known-{worker}", stop, flood_statuses)

    answers: list[tuple[str, int]] = []
    with counting(envoy) as counts:
        with ThreadPoolExecutor(max_workers=16) as pool:
            futures = [pool.submit(flood, worker) for worker in range(16)]
            try:
                wait_until(lambda: 429 in flood_statuses, "the flood to spend the budget", 10)
                # Three rounds, each past the TTL of what the round before served.
                for _ in range(3):
                    for name, room in (("full", full_room), ("open", open_room)):
                        resp = ask(envoy, "/sfu/get", "legacy", "carol", "C1", room)
                        answers.append((name, resp.status_code))
                        if name == "full":
                            assert_channel_full(resp)
                        else:
                            assert_token_issued(resp, room, "legacy", "carol", "C1", standins)
                    time.sleep(1.1)
            finally:
                stop = 0.0
                for future in futures:
                    future.result()
    print(f"\n{len(flood_statuses)} flood requests, {flood_statuses.count(429)} answered 429; "
          f"known rooms: {answers}")
    assert answers == [("full", 403), ("open", 200)] * 3, answers
    assert counts.guard.get("stale_limits_over_budget", 0) >= 1, counts.guard
    assert counts.guard.get("lookups_over_budget") == flood_statuses.count(429), counts.guard
    assert "fail_open" not in counts.guard, counts.guard


@pytest.mark.check_fails
@pytest.mark.parametrize("failure_mode", ["open", "closed"])
def test_a_synapse_outage_keeps_the_last_limit_seen(start_envoy, plugin_config, fault_server,
                                                    standins, failure_mode):
    """With no fresh cache (TTL 0) every request asks Synapse. Once Synapse fails, the limit it
    gave before is still enforced (counted as stale), not lifted; a room never seen fails per
    failure_mode."""
    synapse = fault_server("ok", body=limit_state(1))
    proxy = start_envoy(plugin_config(failure_mode=failure_mode, limit_cache_ttl_seconds=0),
                        synapse=synapse)
    room = "!outage-room:test.local"
    fill_room(standins, room, "legacy", [("alice", "A1")])
    assert_channel_full(ask(proxy, "/sfu/get", "legacy", "carol", "C1", room))
    synapse.status = 502
    synapse.body = {"errcode": "M_UNKNOWN", "error": "Bad gateway"}
    synapse.mode = "status"
    with counting(proxy) as counts:
        assert_channel_full(ask(proxy, "/sfu/get", "legacy", "carol", "C1", room))
    # Carol's OpenID token was vouched for before the outage: who she is stays known.
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "stale_limits": 1,
                            "livekit_lookups": 1, "blocked": 1}
    with counting(proxy) as counts:
        resp = ask(proxy, "/sfu/get", "legacy", "carol", "C1", "!never-seen:test.local")
    if failure_mode == "open":
        assert resp.status_code == 200
    else:
        assert_check_failed(resp)
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, f"fail_{failure_mode}": 1}


def test_a_client_reset_does_not_lose_the_limit_lookup(start_envoy, plugin_config, fault_server,
                                                       standins):
    """mallory starts a token request for a cold room and resets it at once. The Synapse lookup
    it caused still lands in the cache: carol, asking while it is pending, waits for that answer
    and no second lookup is made."""
    synapse = fault_server("slow", delay=1.5, body=limit_state(2))
    proxy = start_envoy(plugin_config(synapse={"timeout_ms": 8000}), synapse=synapse)
    room = "!reset-room:test.local"
    body = json.dumps(token_body("legacy", "mallory", "M1", room)).encode()
    with counting(proxy) as counts:
        assert h2c.request(proxy.address, "POST", "/sfu/get", body, reset=True) is None
        wait_until(lambda: synapse.hits >= 1, "the lookup reached Synapse", 5)
        resp = ask(proxy, "/sfu/get", "legacy", "carol", "C1", room, timeout=30)
        assert_token_issued(resp, room, "legacy", "carol", "C1", standins)
    assert sum("/state" in r["path"] for r in synapse.requests) == 1
    assert counts.guard["synapse_lookups"] == 1 and counts.guard["allowed"] == 1
    assert "fail_open" not in counts.guard
    still_serving(proxy)
