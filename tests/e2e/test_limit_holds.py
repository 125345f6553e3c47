"""The limit holds end to end: simultaneous joins, reservations, hashed identities, bounded state.

A client gets its LiveKit token before it connects, so LiveKit's participant list lags behind
the tokens already issued. These tests run the built filter in a real Envoy with two worker
threads (both share the filter's state), a real Synapse holding the limits, the real LiveKit
server and the lk-jwt-service stand-in, and check what users and operators rely on:

- a burst of simultaneous joins never gets more tokens than the limit;
- a place taken by a token whose user never connects comes back after ``reservation_seconds``,
  and a user who connected and left frees their place at once;
- refusals and fail-opens hold no place;
- a user whose participants carry hashed identities (``/get_token``) is one user, however many
  devices they join with;
- the state the filter keeps stays bounded, whatever the number of rooms it has seen.
"""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from conftest import requires_standins, requires_wasm
from stack import http, join_body, jwt_claims, livekit_alias, livekit_identity, stats_delta

pytestmark = [requires_wasm, requires_standins]

SERVER = "test.local"
FULL = {"errcode": "M_FORBIDDEN", "error": "This voice channel is full."}
PATH_OF_SHAPE = {"legacy": "/sfu/get", "new": "/get_token"}

REPO = Path(__file__).resolve().parents[2]


# The capacity of one Envoy process the README states: the limit cache's 512 buckets of 4 KiB
# and the room records' 1024 buckets of 32 KiB, one shared-data key each.
STATE_KEYS = 512 + 256 + 256 + 1024  # limits, power levels, OpenID users, rooms
STATE_BYTES_CAP = 512 * 4 * 1024 + 1024 * 32 * 1024


# --------------------------------------------------------------------------- helpers


def user(name: str) -> str:
    return f"@{name}:{SERVER}"


def ask(envoy: Any, room: str, name: str, device: str, shape: str = "legacy",
        member_id: str | None = None) -> requests.Response:
    """Request a token for ``@name`` on ``device``, with the body shape's own path."""
    member_id = member_id or f"m-{name}-{device}"
    return envoy.post(PATH_OF_SHAPE[shape],
                      join_body(user(name), device, room, shape=shape, member_id=member_id))


def assert_admitted(resp: requests.Response, who: str) -> dict:
    assert resp.status_code == 200, f"{who}: expected a token, got HTTP {resp.status_code} {resp.text}"
    return resp.json()


def assert_refused(resp: requests.Response, who: str) -> None:
    assert resp.status_code == 403, f"{who}: expected a refusal, got HTTP {resp.status_code} {resp.text}"
    assert resp.json() == FULL


def poll(check: Callable[[], Any], what: str, timeout: float, interval: float = 0.1) -> Any:
    """Call ``check`` until it returns something truthy; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        last = check()
        if last:
            return last
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout:.1f}s waiting for {what}; last: {last!r}")
        time.sleep(interval)


def burst(envoy: Any, calls: list[tuple[str, dict]]) -> list[tuple[requests.Response, float, float]]:
    """POST every ``(path, body)`` at the same moment, one thread each, released by a barrier.

    Returns ``(response, started, finished)`` per call, in order (monotonic seconds).
    """
    barrier = threading.Barrier(len(calls))

    def one(call: tuple[str, dict]) -> tuple[requests.Response, float, float]:
        path, body = call
        http()  # open the thread's session before the barrier, so all start equal
        barrier.wait(timeout=30)
        started = time.monotonic()
        resp = envoy.post(path, body, timeout=30)
        return resp, started, time.monotonic()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        return list(pool.map(one, calls))


def shared_state(envoy: Any) -> tuple[int, int, int]:
    """What the filter holds in shared data: (keys, bytes, entries), from the admin ``/stats``.

    Each gauge moves by what every write to a bucket really changed, so they measure the
    buckets' contents, not a figure set once.
    """
    values = envoy.stats()
    names = ("shared_data_keys", "shared_data_bytes", "shared_data_entries")
    assert all(name in values for name in names), (
        f"gauges wasmcustom.voice_limit_guard.{names} missing from /stats: {values}")
    return values["shared_data_keys"], values["shared_data_bytes"], values["shared_data_entries"]


def prometheus_gauges(envoy: Any) -> dict[str, int]:
    """The same gauges as operators scrape them from ``/stats/prometheus``."""
    found: dict[str, int] = {}
    for line in envoy.prometheus().splitlines():
        match = re.match(r"^(\S*voice_limit_guard_shared_data_(keys|bytes|entries))(?:\{[^}]*\})?\s+(\d+)", line)
        if match:
            found[match.group(1)] = int(match.group(3))
    return found


def resident_kib(pid: int) -> int:
    """VmRSS of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS in /proc/{pid}/status")


# --------------------------------------------------------------------------- 1. bursts


BURST_USERS = 20
BURST_LIMIT = 3
LIVEKIT_DELAY_MS = 1000


@pytest.mark.parametrize("shapes", ["mixed", "legacy", "new"])
def test_simultaneous_burst_gets_exactly_the_limit(livekit, start_envoy, new_room, shapes):
    """20 distinct users ask at once for a room limited to 3 whose LiveKit list is empty and slow.

    Nobody is in LiveKit yet when the tokens are decided, so only the filter's own
    reservations, shared by both worker threads, can keep the room at 3: exactly 3 tokens
    and 17 "channel full" refusals. With ``mixed``, half the users ask ``/sfu/get`` and half
    ``/get_token``; both name the same LiveKit room.
    """
    envoy = start_envoy()
    room = new_room(limit=BURST_LIMIT)
    livekit.set_delay(LIVEKIT_DELAY_MS)
    before = envoy.stats()

    calls, names = [], []
    for i in range(BURST_USERS):
        shape = ("legacy", "new")[i % 2] if shapes == "mixed" else shapes
        name = f"burst{i:02d}"
        names.append(name)
        calls.append((PATH_OF_SHAPE[shape],
                      join_body(user(name), f"D{i}", room, shape=shape, member_id=f"m{i}")))
    t0 = time.monotonic()
    results = burst(envoy, calls)
    elapsed = time.monotonic() - t0
    print(f"\n{shapes}: {BURST_USERS} simultaneous requests answered in {elapsed:.2f}s")

    # All requests really were in flight together: each waited for the slow LiveKit answer.
    last_start = max(started for _, started, _ in results)
    first_end = min(finished for _, _, finished in results)
    assert last_start < first_end, "the requests did not overlap; the burst proves nothing"

    statuses = [resp.status_code for resp, _, _ in results]
    admitted = [names[i] for i, s in enumerate(statuses) if s == 200]
    assert statuses.count(200) == BURST_LIMIT and statuses.count(403) == BURST_USERS - BURST_LIMIT, (
        f"expected {BURST_LIMIT} tokens and {BURST_USERS - BURST_LIMIT} refusals, got {statuses}")
    for resp, _, _ in results:
        if resp.status_code == 403:
            assert resp.json() == FULL
        else:
            assert jwt_claims(resp.json()["jwt"])["video"]["room"] == livekit_alias(room)
    print(f"{shapes}: admitted {admitted}")

    delta = stats_delta(before, envoy.wait_for_stats(
        {"allowed": before["allowed"] + BURST_LIMIT,
         "blocked": before["blocked"] + BURST_USERS - BURST_LIMIT}))
    assert delta.get("token_requests") == BURST_USERS
    assert delta.get("allowed") == BURST_LIMIT
    assert delta.get("blocked") == BURST_USERS - BURST_LIMIT
    assert "fail_open" not in delta, f"a check failed open during the burst: {delta}"
    # The cold room was looked up once for all 20, across both worker threads.
    assert delta.get("synapse_lookups") == 1, delta
    served = envoy.worker_connections()
    assert len([w for w, n in served.items() if n > 0]) > 1, f"one worker served all: {served}"


# --------------------------------------------------------------------------- 2. reservations end


RESERVATION_SECONDS = 2


def test_reservation_of_a_user_who_never_connects_lapses(livekit, start_envoy, plugin_config, new_room):
    """A token whose user never connects holds its place only for ``reservation_seconds``.

    Otherwise a client that fetched a token and crashed would shut the room for good (limit 1).
    bob is refused while alice's place is reserved, and let in once it lapsed, not before.
    """
    envoy = start_envoy(plugin_config(reservation_seconds=RESERVATION_SECONDS))
    room = new_room(limit=1)

    assert_admitted(ask(envoy, room, "alice", "A1"), "alice")
    admitted_at = time.monotonic()
    assert_refused(ask(envoy, room, "bob", "B1"), "bob while alice's place is reserved")

    refusals = 0

    def bob_gets_in() -> requests.Response | None:
        nonlocal refusals
        resp = ask(envoy, room, "bob", "B1")
        if resp.status_code == 403:
            refusals += 1
            return None
        return resp

    resp = poll(bob_gets_in, "bob to be admitted after alice's reservation lapsed",
                timeout=RESERVATION_SECONDS + 3)
    waited = time.monotonic() - admitted_at
    print(f"\nbob admitted {waited:.2f}s after alice's unused token "
          f"(reservation_seconds={RESERVATION_SECONDS}, {refusals} refusals meanwhile)")
    assert_admitted(resp, "bob")
    # Not before the reservation ran out (a little slack for clocks and request time).
    assert waited >= RESERVATION_SECONDS - 0.3, f"alice's place was freed after {waited:.2f}s only"


def test_user_who_connected_and_left_frees_the_place_at_once(livekit, start_envoy, plugin_config, new_room):
    """Once a user was seen in LiveKit, their reservation is over: leaving frees the place at once.

    Limit 2, reservations long (30 s). alice and bob are admitted and connect; carol is
    refused. alice leaves: carol gets in straight away, long before alice's reservation could
    have lapsed, because the filter saw alice in LiveKit (on carol's refused request) and
    counts her as present, not reserved.
    """
    envoy = start_envoy(plugin_config(reservation_seconds=30))
    room = new_room(limit=2)
    alias = livekit_alias(room)

    livekit.connect(ask(envoy, room, "alice", "A1"))
    livekit.connect(ask(envoy, room, "bob", "B1"))
    assert_refused(ask(envoy, room, "carol", "C1"), "carol while alice and bob are connected")

    livekit.leave(alias, livekit_identity(user("alice"), "A1"))
    t0 = time.monotonic()
    assert_admitted(ask(envoy, room, "carol", "C1"), "carol after alice left")
    print(f"\ncarol admitted {time.monotonic() - t0:.2f}s after alice left (reservation_seconds=30)")
    # bob, still connected, and carol's new reservation fill the room again.
    assert_refused(ask(envoy, room, "dave", "D1"), "dave with bob connected and carol admitted")


# --------------------------------------------------------------------------- 3. no phantom places


def test_refusal_leaves_no_reservation(livekit, start_envoy, new_room):
    """A refused user holds no place: when the room empties, the next user gets in at once.

    Limit 1, someone already connected (a participant the filter never admitted). carol is
    refused; once that participant leaves, erin (not carol) is admitted immediately: carol's
    refusal reserved nothing.
    """
    envoy = start_envoy()
    room = new_room(limit=1)
    alias = livekit_alias(room)
    present = livekit_identity(user("zed"), "Z1")
    livekit.set_room(alias, [(present, "ACTIVE")])

    assert_refused(ask(envoy, room, "carol", "C1"), "carol with zed connected")
    assert_refused(ask(envoy, room, "carol", "C2", shape="new"), "carol's other device")
    livekit.leave(alias, present)
    assert_admitted(ask(envoy, room, "erin", "E1"), "erin in the emptied room")
    assert_refused(ask(envoy, room, "carol", "C1"), "carol once erin holds the place")


@pytest.mark.check_fails
def test_fail_open_leaves_no_reservation(start_envoy, fault_server, new_room):
    """A token let through because the check failed holds no place afterwards.

    Limit 1. LiveKit answers 500: alice's token passes (``fail_open``). LiveKit recovers with
    an empty room: bob is admitted, which he would not be had alice's fail-open reserved the
    only place. Then the room is full again (bob's reservation): carol is refused.
    """
    livekit_fault = fault_server("status", status=500)
    envoy = start_envoy(livekit=livekit_fault)
    room = new_room(limit=1)
    before = envoy.stats()

    assert_admitted(ask(envoy, room, "alice", "A1"), "alice while LiveKit fails")
    after_failure = envoy.stats()
    assert stats_delta(before, after_failure).get("fail_open") == 1
    assert livekit_fault.hits >= 1

    livekit_fault.mode, livekit_fault.body = "ok", {"participants": []}
    assert_admitted(ask(envoy, room, "bob", "B1"), "bob after LiveKit recovered")
    assert_refused(ask(envoy, room, "carol", "C1"), "carol with bob's place reserved")
    delta = stats_delta(after_failure, envoy.stats())
    assert delta.get("allowed") == 1 and delta.get("blocked") == 1 and "fail_open" not in delta, delta


# --------------------------------------------------------------------------- 4. hashed identities


def test_second_device_behind_hashed_identity_is_the_same_user(livekit, start_envoy, new_room):
    """On ``/get_token`` LiveKit lists hashed identities; the filter maps them back to users.

    Limit 1. alice joins with ``/get_token`` and connects (LiveKit shows only a hash). Her
    second device (other device and member id) is let in, and once both devices are
    connected she still counts as one user; bob is refused.
    """
    envoy = start_envoy()
    room = new_room(limit=1)
    alias = livekit_alias(room)

    first = assert_admitted(ask(envoy, room, "alice", "A1", shape="new", member_id="mA1"), "alice A1")
    identity = jwt_claims(first["jwt"])["sub"]
    assert identity == livekit_identity(user("alice"), "A1", "mA1") and "alice" not in identity
    livekit.connect(first)
    assert [p["identity"] for p in livekit.list_participants(alias)] == [identity]

    second = ask(envoy, room, "alice", "A2", shape="new", member_id="mA2")
    assert_admitted(second, "alice's second device")
    assert_refused(ask(envoy, room, "bob", "B1", shape="new", member_id="mB1"), "bob")

    livekit.connect(second)
    assert len(livekit.list_participants(alias)) == 2
    assert_admitted(ask(envoy, room, "alice", "A3", shape="new", member_id="mA3"), "alice's third device")
    assert_refused(ask(envoy, room, "bob", "B1", shape="new", member_id="mB1"), "bob, alice on two devices")
    assert_refused(ask(envoy, room, "bob", "B1"), "bob on /sfu/get")


def test_hashed_first_device_and_legacy_second_device(livekit, start_envoy, new_room):
    """alice's first device joins with ``/get_token`` (hashed identity), her second with ``/sfu/get``.

    Both name the same LiveKit room; the second device is alice, so it is let in (limit 1),
    and bob is still refused with both of alice's devices connected.
    """
    envoy = start_envoy()
    room = new_room(limit=1)

    first = assert_admitted(ask(envoy, room, "alice", "A1", shape="new", member_id="mA1"), "alice A1")
    livekit.connect(first)
    second = assert_admitted(ask(envoy, room, "alice", "A2"), "alice's second device on /sfu/get")
    assert jwt_claims(second["jwt"])["video"]["room"] == jwt_claims(first["jwt"])["video"]["room"]
    livekit.connect(second)
    assert_refused(ask(envoy, room, "bob", "B1"), "bob on /sfu/get")
    assert_refused(ask(envoy, room, "bob", "B1", shape="new", member_id="mB1"), "bob on /get_token")


# --------------------------------------------------------------------------- 5. bounded state


ROOMS = 10_000
WORKERS = 32
# A room record whose user never connects expires `reservation_seconds` + 20 s (the age past
# which a participant list is asked for again) after its admission; the limit after its TTL. So
# the state held reflects the last half minute of traffic only.
SHORT_RESERVATION_SECONDS = 2
SHORT_LIMIT_TTL_SECONDS = 1


def test_state_stays_bounded_after_ten_thousand_rooms(livekit, start_envoy, plugin_config, fault_server):
    """Shared data has no expiry and no key listing, so the filter must drop what it no longer needs.

    10,000 distinct rooms, each with a limit (so each gets a cached limit and a room record
    with a reservation), are joined once each on `/sfu/get` (identities that name their user,
    so no pairing is kept): keeping them all would be 20,000 entries. The filter's gauges,
    moved by each write's real change, show the keys fixed at the stated capacity, the bytes
    within its cap, and the entries held after 10,000 rooms no more than after 5,000 (give or
    take the traffic rate) and far fewer than the rooms seen. (Records that outlive their
    reservations, pairings of hashed identities and lapses, are evicted from a full bucket
    instead: `occupancy::tests::a_bucket_full_of_ended_calls_takes_new_rooms`.)
    """
    synapse_fault = fault_server("ok", body={"state": [
        {"type": "io.lotus.voice_limit", "state_key": "", "content": {"max_users": 5}}]})
    envoy = start_envoy(
        plugin_config(reservation_seconds=SHORT_RESERVATION_SECONDS,
                      limit_cache_ttl_seconds=SHORT_LIMIT_TTL_SECONDS,
                      stale_limit_seconds=SHORT_LIMIT_TTL_SECONDS,
                      synapse={"max_lookups_per_second": 0}),
        synapse=synapse_fault)
    pid = envoy.process.pid
    keys0, bytes0, entries0 = shared_state(envoy)
    rss0 = resident_kib(pid)
    print(f"\nstart: {keys0} keys, {bytes0} bytes, {entries0} entries, Envoy VmRSS {rss0 / 1024:.1f} MiB")
    assert (keys0, entries0) == (STATE_KEYS, 0)
    before = envoy.stats()

    def join(i: int) -> int:
        # Users of another homeserver (a stand-in vouches for their OpenID tokens): 10,000
        # accounts on the test Synapse would take longer to make than the test itself.
        body = join_body(f"@u{i:05d}:example.org", "D", f"!bounded{i:05d}:{SERVER}")
        return envoy.post("/sfu/get", body, timeout=30).status_code

    samples: list[tuple[int, int, int, int, float]] = []
    t0 = time.monotonic()
    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        for start in range(0, ROOMS, 1000):
            statuses = list(pool.map(join, range(start, start + 1000)))
            assert statuses == [200] * 1000, (
                f"rooms {start}..{start + 999}: {sum(s != 200 for s in statuses)} not admitted, "
                f"statuses {sorted(set(statuses))}")
            samples.append((start + 1000, *shared_state(envoy), time.monotonic() - t0))
    elapsed = time.monotonic() - t0
    rss = resident_kib(pid)

    for rooms, keys, held, entries, at in samples:
        print(f"{rooms:6d} rooms after {at:5.1f}s: {keys} keys, {held:8d} bytes, {entries:5d} entries")
    # Memory is printed for the record only: the state is a few hundred KiB at most, which
    # Envoy's resident size cannot resolve.
    print(f"{ROOMS} rooms in {elapsed:.1f}s ({ROOMS / elapsed:.0f} requests/s), "
          f"Envoy VmRSS {rss0 / 1024:.1f} -> {rss / 1024:.1f} MiB")

    delta = stats_delta(before, envoy.stats())
    assert delta.get("token_requests") == ROOMS and delta.get("allowed") == ROOMS, delta
    assert synapse_fault.hits >= ROOMS, "every room's limit is looked up once"

    assert all(keys == STATE_KEYS for _, keys, _, _, _ in samples), samples
    assert all(0 < held <= STATE_BYTES_CAP for _, _, held, _, _ in samples), samples
    assert all(entries > 0 for _, _, _, entries, _ in samples), samples
    entries_at_half = next(entries for rooms, _, _, entries, _ in samples if rooms == ROOMS // 2)
    entries_at_end = samples[-1][3]
    assert entries_at_end <= 1.5 * entries_at_half, (
        f"entries held kept growing with the rooms seen: {entries_at_half} at 5,000 rooms, "
        f"{entries_at_end} at 10,000")
    assert entries_at_end < ROOMS, f"{entries_at_end} entries held for {ROOMS} rooms seen"

    prom = prometheus_gauges(envoy)
    print(f"/stats/prometheus: {prom}")
    assert sorted(prom) == [f"voice_limit_guard_shared_data_{g}" for g in ("bytes", "entries", "keys")], prom
    assert prom["voice_limit_guard_shared_data_keys"] == STATE_KEYS, prom
