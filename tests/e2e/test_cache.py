"""The limit cache: one Synapse lookup per room per TTL, shared by Envoy's worker threads,
and a limit changed through the client API taking effect once the TTL has run out.

The only waiting done here is waiting out the TTL itself; whatever follows is polled.
"""

from __future__ import annotations

import time

import pytest

from conftest import requires_standins, requires_wasm
from guard import (
    ask,
    assert_channel_full,
    counting,
    fill_room,
    poll,
    printing_log_on_failure,
    shared_envoy,
)

pytestmark = [requires_wasm, requires_standins]

TTL = 2.0


@pytest.fixture(scope="module")
def envoy(synapse, standins):
    proxy = shared_envoy("cache", synapse, standins, {"limit_cache_ttl_seconds": int(TTL)})
    yield proxy
    proxy.stop()


@pytest.fixture(autouse=True)
def _log_on_failure(envoy):
    with printing_log_on_failure(envoy):
        yield


def wait_out_ttl(cached_before: float) -> None:
    """Sleep until an entry written before ``cached_before`` (monotonic) has expired."""
    remaining = cached_before + TTL - time.monotonic()
    if remaining > 0:
        time.sleep(remaining)


def ask_until(envoy, who: str, room: str, want: int, timeout: float = 3.0):
    """Repeat ``who``'s request until the answer has status ``want``; return that answer."""
    def attempt():
        resp = ask(envoy, "/sfu/get", "legacy", who, "X", room)
        # A tuple, since a Response is falsy when its status is an error.
        return (resp,) if resp.status_code == want else None
    return poll(attempt, f"{who} to get {want} in {room}", timeout)[0]


def test_one_synapse_lookup_per_room_per_ttl(envoy, standins, new_room):
    room = new_room(limit=5)
    with counting(envoy) as first:
        assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    cached_by = time.monotonic()
    assert first.guard["synapse_lookups"] == 1

    # Each request on a new connection, so that both worker threads take some (Envoy's
    # per-worker listener stats show it): all are served from the one shared cache.
    workers_before = envoy.worker_connections()
    with counting(envoy) as within:
        for i in range(8):
            resp = ask(envoy, "/sfu/get", "legacy", "alice", f"A{i + 2}", room,
                       headers={"Connection": "close"})
            assert resp.status_code == 200
    assert within.guard == {"token_requests": 8, "limit_cache_hits": 8, "livekit_lookups": 8,
                            "allowed": 8}
    served = {w: n - workers_before.get(w, 0) for w, n in envoy.worker_connections().items()}
    assert len([w for w, n in served.items() if n > 0]) > 1, f"one worker served all: {served}"

    wait_out_ttl(cached_by)
    lookups = envoy.stats()["synapse_lookups"]

    def looked_up_again() -> bool:
        assert ask(envoy, "/sfu/get", "legacy", "alice", "A9", room).status_code == 200
        return envoy.stats()["synapse_lookups"] > lookups

    poll(looked_up_again, "a new Synapse lookup once the TTL has run out")
    assert envoy.stats()["synapse_lookups"] == lookups + 1


def test_rooms_are_cached_separately(envoy, new_room):
    one, two = new_room(limit=3), new_room(limit=3)
    with counting(envoy) as counts:
        for room in (one, two, one, two):
            assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    assert counts.guard["synapse_lookups"] == 2
    assert counts.guard["limit_cache_hits"] == 2


def test_no_limit_is_cached_too(envoy, new_room):
    """A room without a limit costs one lookup per TTL as well, not one per request."""
    room = new_room()
    with counting(envoy) as counts:
        for device in ("A1", "A2", "A3"):
            assert ask(envoy, "/sfu/get", "legacy", "alice", device, room).status_code == 200
    assert counts.guard == {"token_requests": 3, "synapse_lookups": 1, "limit_cache_hits": 2,
                            "allowed": 3}


def test_changed_limits_take_effect_after_the_ttl(envoy, standins, synapse, new_room):
    """A limit raised, lowered or removed through the client API: the old one holds until the
    cached entry expires, then the new one applies. The three rooms share one wait."""
    raised, lowered, removed = new_room(limit=1), new_room(limit=3), new_room(limit=1)
    for room in (raised, lowered, removed):
        fill_room(standins, room, "legacy", [("alice", "A1"), ("bob", "B1")][: 2 if room == lowered else 1])
        ask(envoy, "/sfu/get", "legacy", "alice", "A1", room)  # caches the limit
    cached_by = time.monotonic()

    synapse.set_limit(raised, 3)
    synapse.set_limit(lowered, 2)
    synapse.set_state(removed, "io.lotus.voice_limit", {})
    # Within the TTL the old limits still hold. (Under the old limit of 3, erin would get into
    # the lowered room: asking would take a place, so that room is only asked after the TTL.)
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", raised))
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", removed))

    wait_out_ttl(cached_by)
    with counting(envoy, standins) as counts:
        ask_until(envoy, "carol", raised, 200)
        ask_until(envoy, "carol", removed, 200)
    assert counts.guard["synapse_lookups"] == 2
    assert counts.list_participants == counts.guard["livekit_lookups"]
    with counting(envoy) as counts:
        assert_channel_full(ask_until(envoy, "erin", lowered, 403))
    assert counts.guard["synapse_lookups"] == 1
