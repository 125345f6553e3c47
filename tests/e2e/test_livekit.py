"""Who is in the call, as the real LiveKit server says: real clients, real tokens.

The stack is the production one but for lk-jwt-service, which is the Go stand-in
(``tests/lkstack``): it reads requests with Go's ``encoding/json``, checks each OpenID token
against Synapse's federation userinfo endpoint and mints tokens with ``livekit/protocol``.
Users get real OpenID tokens from Synapse. Every token the guard lets through is used by a
real LiveKit client (the Go SDK) that connects and stays until the test makes it leave; the
guard sees them through the real ``ListParticipants``. Every test asserts the exact counters,
``fail_open`` included, so a rejected admin token or an unreadable answer cannot pass as an
empty room.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from conftest import requires_wasm
from guard import (
    CHANNEL_FULL,
    SHAPES,
    assert_channel_full,
    counting,
    printing_log_on_failure,
    user,
)
from stack import LIVEKIT_SECRET, Envoy, default_plugin_config, jwt_claims, livekit_alias, wait_until

pytestmark = [requires_wasm]


def start_guard(name: str, synapse, lk_jwt, livekit_server, **config: Any) -> Envoy:
    plugin_config = default_plugin_config(synapse.admin_token, LIVEKIT_SECRET, **config)
    return Envoy(lk_jwt=lk_jwt.address, synapse=synapse, livekit=livekit_server.address,
                 plugin_config=plugin_config, name=name).start()


@pytest.fixture(scope="module")
def envoy(synapse, real_lk_jwt, real_livekit) -> Iterator[Envoy]:
    proxy = start_guard("envoy-livekit", synapse, real_lk_jwt, real_livekit)
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def _log_on_failure(envoy: Envoy) -> Iterator[None]:
    with printing_log_on_failure(envoy):
        yield


class Call:
    """One Matrix room's call: token requests through the guard, clients that join LiveKit."""

    def __init__(self, envoy: Envoy, synapse, livekit, clients, room: str, shape: str):
        self.envoy, self.synapse, self.livekit, self.clients = envoy, synapse, livekit, clients
        self.room, self.shape = room, shape
        self.alias = livekit_alias(room)
        self.connected: dict[tuple[str, str], str] = {}

    def body(self, who: str, device: str) -> dict:
        user_id = user(who)
        token = self.synapse.openid_token(user_id)
        if self.shape == "legacy":
            return {"room": self.room, "openid_token": token, "device_id": device}
        return {"room_id": self.room, "slot_id": "m.call#ROOM", "openid_token": token,
                "member": {"id": f"m-{who}-{device}", "claimed_user_id": user_id,
                           "claimed_device_id": device}}

    def ask(self, who: str, device: str, path: str | None = None):
        path = path or ("/sfu/get" if self.shape == "legacy" else "/get_token")
        return self.envoy.post(path, self.body(who, device), timeout=30)

    def join(self, who: str, device: str, signal_only: bool = False) -> dict:
        """Ask for a token and connect with it; the token must be issued."""
        resp = self.ask(who, device)
        assert resp.status_code == 200, f"{who}/{device}: {resp.status_code} {resp.text}"
        self.connected[(who, device)] = self.clients.join(resp, signal_only=signal_only)
        return jwt_claims(resp.json()["jwt"])

    def leave(self, who: str, device: str) -> None:
        self.clients.leave(self.connected.pop((who, device)))

    def identities(self) -> dict[str, str]:
        return self.livekit.states(self.alias)

    def leave_all(self) -> None:
        for key in list(self.connected):
            self.leave(*key)


@pytest.fixture
def call(envoy, synapse, real_livekit, clients, new_room):
    """``call(limit, shape)``: a fresh limited room; its clients leave when the test ends."""
    made: list[Call] = []

    def make(limit: int, shape: str = "legacy") -> Call:
        made.append(Call(envoy, synapse, real_livekit, clients, new_room(limit=limit), shape))
        return made[-1]

    yield make
    for c in made:
        c.leave_all()


@pytest.mark.parametrize("path, shape", SHAPES)
def test_connected_users_fill_the_room_and_leaving_frees_a_place(call, path, shape):
    """Clients connect, stay, leave and reconnect; the guard follows LiveKit's own list."""
    room = call(2, shape)
    with counting(room.envoy) as counts:
        room.join("alice", "A1")
        room.join("bob", "B1")
        assert set(room.identities().values()) <= {"JOINING", "JOINED", "ACTIVE"}
        assert len(room.identities()) == 2
        assert_channel_full(room.ask("carol", "C1"))
        # alice's second device is let in: she is in the call.
        room.join("alice", "A2")
    assert counts.guard == {"token_requests": 4, "synapse_lookups": 1, "limit_cache_hits": 3,
                            "livekit_lookups": 4, "allowed": 3, "blocked": 1}
    room.leave("bob", "B1")
    wait_until(lambda: len(room.identities()) == 2, "LiveKit to drop bob", 10)
    with counting(room.envoy) as counts:
        room.join("carol", "C1")
        # bob wants back in: he is a new user again, and the room is full.
        assert_channel_full(room.ask("bob", "B1"))
        # alice hangs up and reconnects with a new token: still her place.
        room.leave("alice", "A1")
        room.join("alice", "A1")
    assert counts.guard == {"token_requests": 3, "limit_cache_hits": 3, "livekit_lookups": 3,
                            "allowed": 2, "blocked": 1}


def test_a_participant_still_connecting_holds_a_place(call, envoy):
    """Only the signalling connection is up (no WebRTC): LiveKit lists alice, not ACTIVE yet,
    and she counts."""
    room = call(1)
    room.join("alice", "A1", signal_only=True)
    states = room.identities()
    assert list(states) == [f"{user('alice')}:A1"] and states[f"{user('alice')}:A1"] != "ACTIVE"
    with counting(envoy) as counts:
        assert_channel_full(room.ask("bob", "B1"))
        assert_channel_full(room.ask("bob", "B1"))
    assert counts.guard == {"token_requests": 2, "limit_cache_hits": 2, "livekit_lookups": 2,
                            "blocked": 2}


def test_get_token_identities_are_recognised_once_connected(call):
    """lk-jwt-service hashes ``/get_token`` identities; the guard learnt alice's when it let her
    token through, so LiveKit's list maps back to her: her second device gets in, bob does not."""
    room = call(1, "new")
    claims = room.join("alice", "A1")
    assert not claims["sub"].startswith("@")
    assert list(room.identities()) == [claims["sub"]]
    with counting(room.envoy) as counts:
        room.join("alice", "A2")
        assert_channel_full(room.ask("bob", "B1"))
    assert counts.guard == {"token_requests": 2, "limit_cache_hits": 2, "livekit_lookups": 2,
                            "allowed": 1, "blocked": 1}


def test_device_ids_with_colons_count_as_one_user(call):
    room = call(3)
    room.join("bob", "B1")
    for device in ("a:1", "b:1", "1:z"):
        room.join("mallory", device)
    assert len(room.identities()) == 4
    with counting(room.envoy) as counts:
        room.join("carol", "C1")
        assert_channel_full(room.ask("dave", "D1"))
    assert counts.guard == {"token_requests": 2, "limit_cache_hits": 2, "livekit_lookups": 2,
                            "allowed": 1, "blocked": 1}


def test_a_burst_of_twenty_admits_exactly_the_limit_and_they_all_connect(call):
    room = call(3)
    with counting(room.envoy) as counts:
        with ThreadPoolExecutor(max_workers=20) as pool:
            answers = list(pool.map(lambda n: room.ask(f"burst{n:02d}", "D"), range(20)))
    admitted = [n for n, resp in enumerate(answers) if resp.status_code == 200]
    assert len(admitted) == 3, [r.status_code for r in answers]
    assert all(r.content == CHANNEL_FULL for r in answers if r.status_code != 200)
    assert counts.guard.get("allowed") == 3 and counts.guard.get("blocked") == 17
    assert "fail_open" not in counts.guard
    for n in admitted:
        room.connected[(f"burst{n:02d}", "D")] = room.clients.join(answers[n])
    assert len(room.identities()) == 3
    assert_channel_full(room.ask("late", "D"))


@pytest.mark.check_fails
def test_a_rejected_admin_token_is_a_counted_failure(synapse, real_lk_jwt, real_livekit, new_room):
    """With a LiveKit secret that the server rejects, every check fails and says so
    (fail_open), instead of looking like an empty room."""
    proxy = start_guard("envoy-livekit-wrong-secret", synapse, real_lk_jwt, real_livekit,
                        livekit={"api_secret": "not-the-secret-of-this-livekit-0123456789"})
    try:
        room = new_room(limit=1)
        body = {"room": room, "openid_token": synapse.openid_token(user("carol")), "device_id": "C1"}
        with counting(proxy) as counts:
            resp = proxy.post("/sfu/get", body, timeout=30)
        assert resp.status_code == 200
        assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                                "fail_open": 1}
        wait_until(lambda: "participant lookup failed: LiveKit answered HTTP 401" in proxy.log_text(),
                   "the failure's log line", 15)
    finally:
        proxy.stop()
