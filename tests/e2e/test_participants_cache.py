"""The participant-list cache (`participants_cache_ms`), as envoy/envoy.yaml ships it.

With the cache, a burst of joins into one room asks LiveKit once per cache period instead of once
per token. The limit must still hold (users admitted meanwhile are reserved), every ordering of
the Synapse, lk-jwt-service and LiveKit answers must end in a decision, and a change in LiveKit
must be seen once the cached list is older than the period.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import pytest

from conftest import requires_standins, requires_wasm
from guard import ask, assert_channel_full, identity, poll, user
from stack import livekit_alias, stats_delta

pytestmark = [requires_wasm, requires_standins]

CACHE_MS = 1000
LIMITED = {"state": [{"type": "io.lotus.voice_limit", "state_key": "", "content": {"max_users": 3}}]}


def test_a_late_limit_answer_still_ends_in_a_decision(start_envoy, fault_server, plugin_config, livekit):
    """Synapse answering after lk-jwt-service: the held token must still be decided, not hang."""
    slow_synapse = fault_server("slow", body=LIMITED, delay=0.3)
    envoy = start_envoy(plugin_config(participants_cache_ms=CACHE_MS), synapse=slow_synapse)
    started = time.monotonic()
    resp = ask(envoy, "/sfu/get", "legacy", "alice", "A1", "!late:test.local", timeout=5)
    assert resp.status_code == 200, resp.text
    assert time.monotonic() - started < 2.0


def test_one_livekit_call_serves_a_burst_and_the_limit_holds(start_envoy, plugin_config, new_room, livekit):
    """20 users at once into a room limited to 3: exactly 3 tokens, and LiveKit is asked far
    fewer than 20 times (once, unless the burst straddles a cache period)."""
    envoy = start_envoy(plugin_config(participants_cache_ms=10_000))
    room = new_room(limit=3)
    ask(envoy, "/sfu/get", "legacy", "warmup", "W1", "!other:test.local")  # the VM is warm
    before, lk_before = envoy.stats(), livekit.livekit_stats()["list_participants_calls"]
    barrier = threading.Barrier(20)

    def join(n: int) -> int:
        barrier.wait()
        return ask(envoy, "/sfu/get", "legacy", f"user{n}", "D1", room, timeout=10).status_code

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(join, range(20)))
    assert sorted(statuses) == [200] * 3 + [403] * 17
    delta = stats_delta(before, envoy.stats())
    assert delta["allowed"] == 3 and delta["blocked"] == 17
    calls = livekit.livekit_stats()["list_participants_calls"] - lk_before
    assert 1 <= calls <= 4, calls
    assert delta.get("livekit_cache_hits", 0) >= 20 - calls


def test_a_leave_is_seen_once_the_cached_list_is_stale(start_envoy, plugin_config, new_room, livekit):
    """Within the period a user who left still counts (the safe side); after it, the place is free."""
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
    left_at = time.monotonic()
    resp = poll(lambda: (r := ask(envoy, "/sfu/get", "legacy", "bob", "B1", room)).status_code == 200 and r,
                "bob admitted after alice left", timeout=CACHE_MS / 1000 + 3)
    assert resp.status_code == 200
    assert time.monotonic() - left_at < CACHE_MS / 1000 + 1.5
