"""Exact limits across guard replicas: an edge Envoy routes each room to one guard.

The stack of ``envoy/edge.yaml``: 2 edge Envoys (the module in its edge role, a RING_HASH
cluster hashing the room header) in front of 3 guard replicas, each an Envoy with the guard in
front of its own lk-jwt-service stand-in; one real Synapse and one real LiveKit behind them all.
Bursts of distinct users over both edges, for 10 limited rooms at once:

- with room affinity every room admits exactly its limit, whichever replica it lands on;
- without it (the edges spread requests over the replicas) rooms overshoot, as the README says;
- with a replica killed mid-burst, its rooms move to the others, and what that costs is measured.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
import yaml

from conftest import FOREIGN_SERVERS, requires_standins, requires_wasm
from realstack import LkJwtService
from stack import Envoy, _socket_address, http, join_body, stats_delta

pytestmark = [requires_wasm, requires_standins]

REPO = Path(__file__).resolve().parents[2]
EDGE_EXAMPLE = REPO / "envoy" / "edge.yaml"
ROOM_HEADER = "x-vlg-room"
REPLICAS = 3
EDGES = 2
ROOMS = 10
USERS_PER_ROOM = 20
LIMIT = 3
SHAPES = {"legacy": "/sfu/get", "new": "/get_token"}


class EdgeEnvoy(Envoy):
    """An edge Envoy run from ``envoy/edge.yaml`` itself, with its addresses made local: the
    guard replicas' listeners as the ``guards`` cluster, ports chosen by the OS. Without
    ``affinity`` the room filter and the hash policy are taken out, so requests spread over
    the replicas as any load balancer would."""

    def __init__(self, guards: list[Envoy], affinity: bool = True, **options: Any):
        super().__init__(lk_jwt=guards[0].address, with_filter=affinity, **options)
        self.guards = guards
        self.affinity = affinity

    def bootstrap(self) -> dict:
        config = yaml.safe_load(EDGE_EXAMPLE.read_text())
        config["admin"]["address"] = _socket_address("127.0.0.1", 0)
        listener = config["static_resources"]["listeners"][0]
        listener["name"] = "main"  # the name the stack reads the port of
        listener["address"] = _socket_address("127.0.0.1", 0)
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["access_log"] = self.access_log()
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]
        wasm = hcm["http_filters"][0]["typed_config"]["config"]
        if self.affinity:
            wasm["vm_config"]["code"]["local"]["filename"] = str(self.wasm_path)
        else:
            hcm["http_filters"].pop(0)
            route.pop("hash_policy")
        (cluster,) = config["static_resources"]["clusters"]
        cluster["load_assignment"]["endpoints"][0]["lb_endpoints"] = [
            {"endpoint": {"address": _socket_address(*guard.address)}} for guard in self.guards]
        return config

    def edge_stats(self) -> dict[str, int]:
        """The edge's own counters and the guards cluster's health, from the admin ``/stats``."""
        resp = http().get(f"{self.admin_url}/stats", params={
            "filter": r"^(wasmcustom\.voice_limit_guard\.|cluster\.guards\.(membership_healthy|"
                      r"upstream_rq_retry|health_check\.failure|upstream_cx_connect_fail))",
            "format": "json"}, timeout=5)
        resp.raise_for_status()
        return {stat["name"].rsplit(".", 1)[-1] if "wasmcustom" in stat["name"] else stat["name"]:
                int(stat["value"]) for stat in resp.json().get("stats", []) if "value" in stat}


@pytest.fixture(scope="module")
def lk_jwt_replicas(standins: Any, synapse: Any) -> Iterator[list[LkJwtService]]:
    """One lk-jwt-service stand-in per guard replica, all in front of the one LiveKit."""
    homeservers = {synapse.server_name: synapse.base_url}
    homeservers.update({name: standins.foreign.url for name in FOREIGN_SERVERS})
    started: list[LkJwtService] = []
    try:
        for i in range(REPLICAS):
            started.append(LkJwtService(standins.livekit_ws_url, homeservers,
                                        name=f"replica-lk-jwt-{i}").start())
        yield started
    finally:
        for service in started:
            service.stop()


@pytest.fixture
def tiers(request: pytest.FixtureRequest, start_envoy: Any, lk_jwt_replicas: list[LkJwtService]):
    """Factory: ``tiers(affinity=True)`` starts the guard replicas and the edges in front."""
    edges: list[EdgeEnvoy] = []

    def make(affinity: bool = True) -> tuple[list[Envoy], list[EdgeEnvoy]]:
        guards = [start_envoy(lk_jwt=service.address) for service in lk_jwt_replicas]
        for i in range(EDGES):
            edge = EdgeEnvoy(guards, affinity=affinity,
                             name=f"edge-{request.node.name[:40]}-{i}".replace("[", "_").replace("]", "_"))
            edges.append(edge.start())
        return guards, edges

    yield make
    for edge in edges:
        edge.stop()


def limited_rooms(new_room: Any) -> list[str]:
    return [new_room(limit=LIMIT) for _ in range(ROOMS)]


def requests_for(rooms: list[str], tag: str) -> list[tuple[int, str, str, dict]]:
    """``(room index, user, path, body)`` for USERS_PER_ROOM distinct users per room, body
    shapes alternating (both shapes of a room name the same LiveKit room's Matrix room)."""
    calls = []
    for r, room in enumerate(rooms):
        for u in range(USERS_PER_ROOM):
            user = f"@{tag}-r{r}-u{u}:example.org"
            shape = ("legacy", "new")[u % 2]
            calls.append((r, user, SHAPES[shape], join_body(user, f"D{u}", room, shape=shape)))
    return calls


def fire(edges: list[EdgeEnvoy], calls: list[tuple[int, str, str, dict]],
         after_responses: tuple[int, Any] | None = None) -> list[int]:
    """Sends every call at once (call i through edge i % EDGES, one thread each, released by a
    barrier); returns the status codes in order. ``after_responses=(n, action)`` runs
    ``action`` once n responses have come back, while the rest are still in flight."""
    barrier = threading.Barrier(len(calls))
    done = threading.Semaphore(0)
    statuses: list[int] = [0] * len(calls)

    def one(i: int) -> None:
        _, _, path, body = calls[i]
        http()  # the thread's session exists before the barrier
        barrier.wait(timeout=60)
        try:
            statuses[i] = edges[i % len(edges)].post(path, body, timeout=60).status_code
        except requests.RequestException:
            statuses[i] = -1
        done.release()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(one, i) for i in range(len(calls))]
        if after_responses is not None:
            count, action = after_responses
            for _ in range(count):
                assert done.acquire(timeout=120), "the burst stalled"
            action()
        for future in futures:
            future.result(timeout=120)
    return statuses


def admitted_per_room(calls: list[tuple[int, str, str, dict]], statuses: list[int]) -> list[int]:
    admitted = [0] * ROOMS
    for (room, _, _, _), status in zip(calls, statuses):
        admitted[room] += status == 200
    return admitted


def token_requests(guards: list[Envoy], before: list[dict[str, int]]) -> list[int]:
    return [stats_delta(b, g.stats()).get("token_requests", 0) for g, b in zip(guards, before)]


# --------------------------------------------------------------------------- with affinity


def test_each_room_admits_exactly_its_limit_across_replicas(tiers, new_room):
    """10 rooms limited to 3, 20 distinct users each, 200 requests at once over 2 edges and 3
    guard replicas: every room admits exactly 3, and the rooms were spread over the replicas."""
    guards, edges = tiers(affinity=True)
    rooms = limited_rooms(new_room)
    calls = requests_for(rooms, "aff")
    before = [g.stats() for g in guards]
    statuses = fire(edges, calls)

    admitted = admitted_per_room(calls, statuses)
    served = token_requests(guards, before)
    print(f"\nwith affinity: admitted per room {admitted}; token requests per replica {served}")
    assert sorted(set(statuses)) == [200, 403], statuses
    assert admitted == [LIMIT] * ROOMS
    assert sum(served) == ROOMS * USERS_PER_ROOM
    assert sum(1 for n in served if n) >= 2, f"all rooms landed on one replica: {served}"
    # Each room's requests met one guard: a replica's share is a whole number of rooms.
    assert all(n % USERS_PER_ROOM == 0 for n in served), served
    routed = sum(edge.edge_stats().get("routed_requests", 0) for edge in edges)
    assert routed == ROOMS * USERS_PER_ROOM


def test_a_client_cannot_pick_its_replica(tiers, new_room):
    """The edge overwrites the room header a client sends: requests for one room carrying
    every header value a client might try still reach one replica, and the room's limit holds."""
    guards, edges = tiers(affinity=True)
    room = new_room(limit=1)
    before = [g.stats() for g in guards]
    statuses = []
    for i in range(12):
        user = f"@pick{i}:example.org"
        statuses.append(edges[i % EDGES].post(
            "/sfu/get", join_body(user, "D", room),
            headers={ROOM_HEADER: f"forged-{i}"}).status_code)
    served = token_requests(guards, before)
    assert sorted(served) == [0, 0, 12], served
    assert statuses == [200] + [403] * 11


# --------------------------------------------------------------------------- without affinity


def test_without_affinity_rooms_overshoot(tiers, new_room):
    """The same burst with the edges spreading requests over the replicas (no room header):
    each replica admits up to the limit on its own, so rooms get more than their limit. This
    is the overshoot affinity removes."""
    guards, edges = tiers(affinity=False)
    rooms = limited_rooms(new_room)
    calls = requests_for(rooms, "noaff")
    before = [g.stats() for g in guards]
    statuses = fire(edges, calls)

    admitted = admitted_per_room(calls, statuses)
    served = token_requests(guards, before)
    print(f"\nwithout affinity: admitted per room {admitted} (total {sum(admitted)}, "
          f"limit {LIMIT} x {ROOMS} rooms = {LIMIT * ROOMS}); token requests per replica {served}")
    assert sum(served) == ROOMS * USERS_PER_ROOM
    assert all(n > 0 for n in served), served
    assert all(LIMIT <= n <= REPLICAS * LIMIT for n in admitted), admitted
    assert sum(admitted) > LIMIT * ROOMS, "no overshoot without affinity: the test shows nothing"


# --------------------------------------------------------------------------- failover


def test_a_replica_killed_mid_burst(tiers, new_room):
    """A guard replica is killed (SIGKILL) once a third of a burst has been answered. Requests
    it held fail (the edge answers 503; a client retries); new requests for its rooms go to the
    next replica on the ring at once (connect failures are retried there). That replica never
    saw the places the dead one reserved for users not yet in LiveKit, so those rooms can
    admit up to one more limit's worth of users. Envoy rebuilds its ring with more points per
    replica left, so some rooms of the live replicas move between them too, each move another
    guard that has not seen the room's reservations: a room admits at most one limit per
    replica it meets, and rooms that do not move stay exact."""
    guards, edges = tiers(affinity=True)
    rooms = limited_rooms(new_room)
    calls = requests_for(rooms, "fail")
    before = [g.stats() for g in guards]
    killed: dict[str, Any] = {}

    def kill_busiest() -> None:
        served = token_requests(guards, before)
        victim = max(range(REPLICAS), key=lambda i: served[i])
        killed.update(index=victim, served=served, at=time.monotonic())
        guards[victim].process._signal_group(signal.SIGKILL)

    statuses = fire(edges, calls, after_responses=(len(calls) // 3, kill_busiest))
    # Clients whose request died with the replica ask again.
    failed = [i for i, s in enumerate(statuses) if s not in (200, 403)]
    for i in failed:
        _, _, path, body = calls[i]
        statuses[i] = edges[i % EDGES].post(path, body).status_code

    # How long the edges kept the dead replica in their ring (active health checks).
    def ejected() -> bool:
        return all(edge.edge_stats().get("cluster.guards.membership_healthy") == REPLICAS - 1
                   for edge in edges)
    deadline = time.monotonic() + 30
    while not ejected() and time.monotonic() < deadline:
        time.sleep(0.1)
    ejected_after = time.monotonic() - killed["at"]

    admitted = admitted_per_room(calls, statuses)
    retries = sum(edge.edge_stats().get("cluster.guards.upstream_rq_retry", 0) for edge in edges)
    print(f"\nreplica {killed['index']} killed after {len(calls) // 3} answers "
          f"(token requests per replica then: {killed['served']}); "
          f"{len(failed)} requests failed with it and were asked again; {retries} connect "
          f"failures retried on the next replica; ejected from the ring after {ejected_after:.1f}s")
    print(f"admitted per room: {admitted} (limit {LIMIT}); "
          f"{sum(max(0, n - LIMIT) for n in admitted)} users over the limit in total")
    assert ejected(), "the edges never took the dead replica out of the ring"
    assert sorted(set(statuses)) == [200, 403], statuses
    assert all(LIMIT <= n <= REPLICAS * LIMIT for n in admitted), admitted
    # Rooms that stayed on their replica never overshoot.
    assert admitted.count(LIMIT) >= 1, admitted
    guards[killed["index"]].stop()


# --------------------------------------------------------------------------- the example itself


def test_the_edge_example_validates_as_written(tmp_path):
    """``envoy/edge.yaml`` passes ``envoy --mode validate`` unchanged (which runs the module's
    configuration check), and a guard configuration key in it would be refused."""
    ok, output = Envoy.validate(EDGE_EXAMPLE, cwd=REPO)
    assert ok, output
    broken = tmp_path / "edge.yaml"
    broken.write_text(EDGE_EXAMPLE.read_text().replace(
        '{"room_header": "x-vlg-room",', '{"room_header": "x-vlg-room", "failure_mode": "open",'))
    ok, output = Envoy.validate(broken, cwd=REPO)
    assert not ok and "failure_mode: unknown field `failure_mode`" in output, output


def test_a_body_without_a_readable_room_goes_to_any_replica(tiers, new_room):
    """A token request whose body names no room the edge can read is counted unroutable and
    sent on without the header; the guard that gets it answers it as its own checks say."""
    guards, edges = tiers(affinity=True)
    before = edges[0].edge_stats()
    resp = edges[0].post("/sfu/get", b"not json", headers={ROOM_HEADER: "forged"})
    assert resp.status_code == 400, resp.text  # lk-jwt-service's own answer
    after = edges[0].edge_stats()
    assert after.get("unroutable_requests", 0) - before.get("unroutable_requests", 0) == 1
    assert after.get("routed_requests", 0) == before.get("routed_requests", 0)


def test_the_istio_form_matches_the_edge_example():
    """``deploy/istio/replicas.yaml`` cannot run here (no Istio): its gateway filter must carry
    the validated edge configuration, and its DestinationRule must hash the header that
    configuration sets."""
    example = yaml.safe_load(EDGE_EXAMPLE.read_text())
    hcm = example["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    edge_wasm = hcm["http_filters"][0]["typed_config"]["config"]
    edge_config = json.loads(edge_wasm["configuration"]["value"])
    hashed = hcm["route_config"]["virtual_hosts"][0]["routes"][0]["route"]["hash_policy"]
    assert hashed == [{"header": {"header_name": edge_config["room_header"]}}]

    documents = {doc["kind"]: doc for doc in yaml.safe_load_all(
        (REPO / "deploy" / "istio" / "replicas.yaml").read_text())}
    assert set(documents) == {"DestinationRule", "EnvoyFilter"}
    lb = documents["DestinationRule"]["spec"]["trafficPolicy"]["loadBalancer"]
    assert lb["consistentHash"]["httpHeaderName"] == edge_config["room_header"]
    # Nothing a client can cause ejects a replica (and so moves its rooms): no 5xx counts,
    # only connect failures, resets and timeouts; the edge example checks health actively.
    outlier = documents["DestinationRule"]["spec"]["trafficPolicy"]["outlierDetection"]
    assert outlier["splitExternalLocalOriginErrors"] is True
    assert outlier["consecutive5xxErrors"] == 0 and outlier["consecutiveGatewayErrors"] == 0
    guards = next(c for c in example["static_resources"]["clusters"] if c["name"] == "guards")
    assert "outlier_detection" not in guards and guards["health_checks"]
    (patch,) = documents["EnvoyFilter"]["spec"]["configPatches"]
    assert patch["match"]["context"] == "GATEWAY"
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    istio_wasm = patch["patch"]["value"]["typed_config"]["config"]
    assert istio_wasm["allow_on_headers_stop_iteration"] is True
    assert json.loads(istio_wasm["configuration"]["value"]) == edge_config
    for key in ("root_id", "failure_policy"):
        assert istio_wasm[key] == edge_wasm[key]
