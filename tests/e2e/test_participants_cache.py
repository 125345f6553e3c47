"""The participant-list cache (`participants_cache_ms`), as envoy/envoy.yaml ships it.

With the cache, admissions into a room whose list is cached ask LiveKit nothing until the list
is older than the period; a refusal is always decided on a fresh list. The limit must still hold
(users admitted meanwhile are reserved), every ordering of the Synapse, lk-jwt-service and
LiveKit answers must end in a decision, and a user who left frees the place at the next check.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time


from conftest import requires_standins, requires_wasm
from guard import ask, assert_channel_full, counting, identity, poll, unverified_when_synapse_fails
from stack import livekit_alias, stats_delta

pytestmark = [requires_wasm, requires_standins]

CACHE_MS = 1000
LIMITED = {"state": [{"type": "io.lotus.voice_limit", "state_key": "", "content": {"max_users": 3}}]}


def test_a_late_limit_answer_still_ends_in_a_decision(start_envoy, fault_server, plugin_config, livekit):
    """Synapse answering after lk-jwt-service: the held token must still be decided, not hang."""
    slow_synapse = fault_server("slow", body=LIMITED, delay=0.3)
    envoy = start_envoy(plugin_config(participants_cache_ms=CACHE_MS), synapse=slow_synapse)
    with counting(envoy) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "alice", "A1", "!late:test.local", timeout=10)
    assert resp.status_code == 200, resp.text
    # Decided on the late limit and a list asked for then, not let through for a failure.
    # (The slow fault server stands for Synapse: it cannot vouch for the OpenID token.)
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "allowed": 1, **unverified_when_synapse_fails(issued=True)}


def test_a_cached_list_serves_a_burst_and_the_limit_holds(start_envoy, plugin_config, new_room, livekit):
    """Once a room's list is cached, the admissions of a burst ask LiveKit nothing (only the
    refusals, each decided on a fresh list), and the places are still counted exactly: the
    first user plus 19 at once into a room limited to 3."""
    envoy = start_envoy(plugin_config(participants_cache_ms=10_000))
    room = new_room(limit=3)
    first = ask(envoy, "/sfu/get", "legacy", "first", "F1", room)
    assert first.status_code == 200, first.text
    before, lk_before = envoy.stats(), livekit.livekit_stats()["list_participants_calls"]
    barrier = threading.Barrier(19)

    def join(n: int) -> int:
        barrier.wait()
        return ask(envoy, "/sfu/get", "legacy", f"user{n}", "D1", room, timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(19) as pool:
        statuses = list(pool.map(join, range(19)))
    assert sorted(statuses) == [200] * 2 + [403] * 17
    delta = stats_delta(before, envoy.stats())
    assert delta["allowed"] == 2 and delta["blocked"] == 17
    assert delta["livekit_cache_hits"] == 2
    assert livekit.livekit_stats()["list_participants_calls"] == lk_before + 17


def test_a_leave_is_seen_once_the_cached_list_is_stale(start_envoy, plugin_config, new_room, livekit):
    """alice connects and bob is refused (on fresh lists, which see her); once she has left, the
    next check frees her place, cache or not."""
    envoy = start_envoy(plugin_config(participants_cache_ms=CACHE_MS, reservation_seconds=60))
    room = new_room(limit=1)
    alias = livekit_alias(room)
    resp = ask(envoy, "/sfu/get", "legacy", "alice", "A1", room)
    assert resp.status_code == 200, resp.text
    admitted_at = time.monotonic()
    livekit.connect(resp)
    # Once the list cached at alice's admission is stale, a check sees her in LiveKit, which
    # ends her reservation; until then, and at that check, bob is refused.
    while time.monotonic() - admitted_at < CACHE_MS / 1000 + 0.2:
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "bob", "B1", room))
        time.sleep(0.1)
    livekit.leave(alias, identity("legacy", "alice", "A1"))
    resp = poll(lambda: (r := ask(envoy, "/sfu/get", "legacy", "bob", "B1", room)).status_code == 200 and r,
                "bob admitted after alice left", timeout=CACHE_MS / 1000 + 3)
    assert resp.status_code == 200
