"""The fault matrix: every way Synapse or LiveKit can fail, under both failure modes.

For each fault the guard must give the documented answer (the upstream 200 under
``failure_mode: open``, a 503 ``M_UNKNOWN`` with lk-jwt's CORS headers under ``closed``),
count it, give up on a slow upstream before it answers, and leave Envoy serving.

A :class:`stack.FaultServer` stands where one upstream should be; the other upstream is the
real one, so the check always gets as far as the faulty call: for LiveKit faults the room is a
real Synapse room with a limit. On the LiveKit side the fault server is an injector in front of
the real LiveKit server: when it behaves, the real server answers.
"""

from __future__ import annotations

import time
import uuid

import pytest

from conftest import requires_standins, requires_wasm
from guard import (
    ask,
    assert_channel_full,
    assert_check_failed,
    assert_token_issued,
    counting,
    poll,
    shared_envoy,
    still_serving,
    unverified_when_synapse_fails,
    user,
)
from stack import LIMIT_STATE_TYPE, FaultServer, livekit_alias, livekit_identity

pytestmark = [requires_wasm, requires_standins]

TIMEOUT_MS = 500
SLOW_DELAY = 3.0
PATH, SHAPE = "/sfu/get", "legacy"

# Each fault as FaultServer settings, per upstream. Status faults carry the body that upstream
# would really send with that status.
FAULTS = {
    "refused": {"mode": "refused"},
    "reset": {"mode": "reset"},
    "slow": {"mode": "slow", "delay": SLOW_DELAY},
    "4xx": {"mode": "status"},
    "5xx": {"mode": "status"},
    "garbage": {"mode": "garbage"},
    "truncated": {"mode": "truncated"},
}

# Not a fault: answers this large are read whole (participants set their own metadata, and a
# large room's state is long), and decided on.
HUGE = {"mode": "huge", "huge_size": 8 * 1024 * 1024}

STATUS = {
    ("synapse", "4xx"): (403, {"errcode": "M_FORBIDDEN", "error": "You are not a server admin"}),
    ("synapse", "5xx"): (502, {"errcode": "M_UNKNOWN", "error": "Bad gateway"}),
    ("livekit", "4xx"): (401, {"code": "unauthenticated", "msg": "permissions denied"}),
    ("livekit", "5xx"): (503, {"code": "unavailable", "msg": "service unavailable"}),
}


def limit_state(max_users: int) -> dict:
    """Synapse's admin state answer for a room limited to ``max_users``."""
    return {"state": [{"type": LIMIT_STATE_TYPE, "state_key": "", "content": {"max_users": max_users}}]}


def healthy_answer(upstream: str) -> dict:
    """What the fault server says when it behaves: a limit of 5 (on the LiveKit side the real
    server answers, and this body is only the start of a truncated or reset answer)."""
    return limit_state(5) if upstream == "synapse" else {"participants": []}


def answer_during_fault(upstream: str) -> dict:
    """The body a truncating or resetting server starts to send: a real-looking answer."""
    if upstream == "synapse":
        return limit_state(1)
    return {"participants": [{"identity": f"@u{i}:test.local:D", "state": "ACTIVE"} for i in range(20)]}


class FaultRig:
    """One Envoy whose Synapse or LiveKit cluster is a fault server, for one failure mode."""

    def __init__(self, upstream: str, failure_mode: str, synapse, standins):
        self.upstream = upstream
        self.failure_mode = failure_mode
        self.standins = standins
        # LiveKit's healthy answers come from the real server behind the injector.
        real = standins.livekit.address if upstream == "livekit" else None
        self.server = FaultServer("ok", body=healthy_answer(upstream),
                                  name=f"fault-{upstream}-{failure_mode}", upstream=real,
                                  openid_upstream=synapse.address)
        config = {upstream: {"timeout_ms": TIMEOUT_MS}, "failure_mode": failure_mode}
        self.envoy = shared_envoy(
            f"faults-{upstream}-{failure_mode}", synapse, standins, config,
            synapse_at=self.server if upstream == "synapse" else None,
            livekit_at=self.server if upstream == "livekit" else None)
        self.synapse = synapse

    def room(self) -> str:
        """A room the check reaches the faulty upstream for, and that no earlier test cached."""
        if self.upstream == "synapse":
            return f"!fault-{uuid.uuid4().hex}:test.local"
        room = self.synapse.create_room()
        self.synapse.set_limit(room, 2)
        return room

    def inject(self, fault: str) -> None:
        settings = dict(HUGE if fault == "huge" else FAULTS[fault])
        self.server.status, body = STATUS.get((self.upstream, fault), (500, None))
        self.server.body = body if body is not None else answer_during_fault(self.upstream)
        self.server.delay = settings.get("delay", self.server.delay)
        self.server.huge_size = settings.get("huge_size", self.server.huge_size)
        self.server.mode = settings["mode"]

    def heal(self) -> None:
        self.server.body = healthy_answer(self.upstream)
        self.server.mode = "ok"

    def stop(self) -> None:
        self.envoy.stop()
        self.server.stop()


@pytest.fixture(scope="module")
def rigs(synapse, standins):
    """Rigs made on first use and kept for the module: one Envoy per (upstream, failure mode)."""
    made: dict[tuple[str, str], FaultRig] = {}

    def get(upstream: str, failure_mode: str) -> FaultRig:
        key = (upstream, failure_mode)
        if key not in made:
            made[key] = FaultRig(upstream, failure_mode, synapse, standins)
        return made[key]

    yield get
    for rig in made.values():
        rig.stop()


def expected_counts(upstream: str, failure_mode: str) -> dict[str, int]:
    """One fresh room: one Synapse lookup, one LiveKit lookup if the limit was known, one failure."""
    counts = {"token_requests": 1, "synapse_lookups": 1, f"fail_{failure_mode}": 1}
    if upstream == "livekit":
        counts["livekit_lookups"] = 1
    return counts


@pytest.mark.check_fails
@pytest.mark.parametrize("failure_mode", ["open", "closed"])
@pytest.mark.parametrize("upstream", ["synapse", "livekit"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(rigs, standins, upstream, failure_mode, fault):
    rig = rigs(upstream, failure_mode)
    envoy = rig.envoy
    room = rig.room()
    rig.inject(fault)
    try:
        with counting(envoy) as counts:
            resp = ask(envoy, PATH, SHAPE, "carol", "C1", room, timeout=30)
            answered_at = time.time()
    finally:
        rig.heal()
    try:
        if failure_mode == "open":
            assert_token_issued(resp, room, SHAPE, "carol", "C1", standins)
        else:
            assert_check_failed(resp)
        assert counts.guard == expected_counts(upstream, failure_mode)
        # One warn line names the room and what the guard did.
        did = "letting the token through" if failure_mode == "open" else "refusing the token"
        poll(lambda: any(f"room {room}: " in line and did in line
                         for line in envoy.log_text().splitlines()), "the failure's log line", 5)
        if fault == "slow":
            # The guard gave up on the slow upstream (its timeout), not the other way round:
            # the answer came before the upstream's own.
            asked = rig.server.requests[-1]["time"]
            assert answered_at < asked + SLOW_DELAY, "the guard waited for the slow upstream"
        assert_recovers(rig, room)
    except BaseException:
        print(f"\n--- {envoy.name}: {envoy.log_path} (excerpt) ---\n{envoy.log_excerpt()}")
        raise


@pytest.mark.parametrize("failure_mode", ["open", "closed"])
@pytest.mark.parametrize("upstream", ["synapse", "livekit"])
def test_multi_megabyte_answers_are_read_whole(rigs, standins, upstream, failure_mode):
    """8 MB answers decide like small ones: Synapse's long state list ends with a limit of 1
    (and alice is in the call); LiveKit's long list holds many distinct users (limit 2)."""
    rig = rigs(upstream, failure_mode)
    envoy = rig.envoy
    room = rig.room()
    if upstream == "synapse":
        standins.set_room(livekit_alias(room), [(livekit_identity(user("alice"), "A1"), "ACTIVE")])
    rig.inject("huge")
    try:
        with counting(envoy) as counts:
            resp = ask(envoy, PATH, SHAPE, "carol", "C1", room, timeout=30)
    finally:
        rig.heal()
    assert_channel_full(resp)
    unverified = unverified_when_synapse_fails() if upstream == "synapse" else {}
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "blocked": 1, **unverified}
    still_serving(envoy)


def assert_recovers(rig: FaultRig, room: str) -> None:
    """After the fault Envoy serves, and the same room is checked normally.

    A failed Synapse lookup is not cached, so the room is looked up again; after a LiveKit
    fault the limit came from Synapse and is cached.
    """
    still_serving(rig.envoy)
    with counting(rig.envoy) as counts:
        resp = ask(rig.envoy, PATH, SHAPE, "dave", "D1", room)
    assert resp.status_code == 200, resp.text
    lookup = {"synapse_lookups": 1} if rig.upstream == "synapse" else {"limit_cache_hits": 1}
    assert counts.guard == {"token_requests": 1, "livekit_lookups": 1, "allowed": 1, **lookup}


@pytest.mark.check_fails
def test_failed_lookup_is_retried_by_the_next_request(rigs):
    """Two failures in a row for the same room are two Synapse lookups, not one cached failure."""
    rig = rigs("synapse", "open")
    room = rig.room()
    rig.inject("garbage")
    try:
        with counting(rig.envoy) as counts:
            for who in ("carol", "dave"):
                assert ask(rig.envoy, PATH, SHAPE, who, "X", room).status_code == 200
        assert counts.guard == {"token_requests": 2, "synapse_lookups": 2, "fail_open": 2}
        assert sum(1 for r in rig.server.requests if "/state" in r["path"]) >= 2
    finally:
        rig.heal()


def test_synapse_lookup_request_shape(rigs):
    """What the filter sends Synapse: the admin state API, the room as one encoded segment,
    the type filter and the admin token."""
    rig = rigs("synapse", "open")
    room = "!a/../b?c#d:test.local"
    before = rig.server.hits
    assert ask(rig.envoy, PATH, SHAPE, "carol", "C1", room).status_code == 200
    request = rig.server.requests[before]
    assert request["method"] == "GET"
    assert request["path"] == ("/_synapse/admin/v1/rooms/%21a%2F..%2Fb%3Fc%23d%3Atest.local/state"
                               "?type=io.lotus.voice_limit")
    assert request["headers"]["authorization"] == f"Bearer {rig.synapse.admin_token}"
    assert request["headers"]["host"] == "synapse"
