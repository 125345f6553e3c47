"""Replacing the filter in a running Envoy, through ECDS (envoy/envoy-ecds.yaml), under load.

Each test runs Envoy with the shipped ECDS bootstrap and filter file (ports, cluster addresses
and paths changed only), keeps token requests flowing into a full room while a new module or a
new configuration is published with envoy/ecds_publish.py, and then reads every answer in
order: before the publication, in flight while Envoy swapped, and after. The room's members
must get their token every time and a newcomer must be refused every time, whichever filter
answered.

State the guard keeps in proxy-wasm shared data (the limit cache, reservations, identities
learnt from /get_token) is set up before the swap and read after it, which measures what a
replaced VM keeps (envoy/HOT-SWAP.md reports the figures).

Every user is a user of the test Synapse with a real OpenID token, which the lk-jwt-service
stand-in checks with Synapse for every request, as lk-jwt-service does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable

import pytest

from conftest import _failed, _slug, requires_standins, requires_wasm
from guard import CHANNEL_FULL, ask, assert_channel_full, counting, fill_room, user
from hotswap import EcdsEnvoy, Kind, Swap, TokenLoad, rebuilt_module
from stack import WASM_PATH, join_body, jwt_claims, livekit_alias, livekit_identity, wait_until

pytestmark = [requires_wasm, requires_standins]

# On top of the shipped settings: state must outlive the test's seconds of load, so that what
# a swap does to it is what is read afterwards, not an expiry.
TEST_SETTINGS = {"limit_cache_ttl_seconds": 300, "reservation_seconds": 120}
LOAD_RATE = 250  # requests a second at most, over four threads
PER_PHASE = 300  # requests answered before the publication, and again after the swap
FIGURES: dict[str, Any] = {}


@pytest.fixture
def ecds_envoy(request: pytest.FixtureRequest, synapse: Any, standins: Any) -> Callable[..., EcdsEnvoy]:
    """Factory: an Envoy on envoy/envoy-ecds.yaml, its guard asking the real LiveKit directly."""
    started: list[EcdsEnvoy] = []

    def make(**settings: Any) -> EcdsEnvoy:
        envoy = EcdsEnvoy(lk_jwt=standins.jwt_address, synapse=synapse, livekit=standins.livekit.address,
                          admin_token=synapse.admin_token, settings={**TEST_SETTINGS, **settings},
                          name=f"envoy-{_slug(request.node.name)}-{len(started)}")
        started.append(envoy)
        return envoy.start()

    yield make
    for envoy in started:
        if _failed(request) and envoy.process is not None:
            print(f"\n--- {envoy.name}: {envoy.log_path} (excerpt) ---\n{envoy.log_excerpt()}")
        envoy.stop()


# --------------------------------------------------------------------------- the room under load


def full_room(new_room: Callable[..., str], livekit: Any) -> tuple[str, list[Kind]]:
    """A room limited to 2 with m1 and m2 connected to LiveKit, and the requests of the load:
    each member asks again (one per endpoint), two newcomers ask (one per endpoint)."""
    room = new_room(limit=2)
    alias = livekit_alias(room)
    livekit.set_room(alias, [(livekit_identity(user("m1"), "M1"), "ACTIVE"),
                             (livekit_identity(user("m2"), "M2"), "ACTIVE")])

    def token_for_room(body: bytes) -> bool:
        return jwt_claims(json.loads(body)["jwt"])["video"]["room"] == alias

    def refused(body: bytes) -> bool:
        return body == CHANNEL_FULL

    def encoded(body: dict) -> bytes:
        return json.dumps(body).encode()

    return room, [
        Kind("member /sfu/get", "/sfu/get", encoded(join_body(user("m1"), "M1", room)), 200, token_for_room),
        Kind("newcomer /sfu/get", "/sfu/get", encoded(join_body(user("n1"), "N1", room)), 403, refused),
        Kind("member /get_token", "/get_token",
             encoded(join_body(user("m2"), "M2", room, shape="new", member_id="m-m2")), 200, token_for_room),
        Kind("newcomer /get_token", "/get_token",
             encoded(join_body(user("n2"), "N2", room, shape="new", member_id="m-n2")), 403, refused),
    ]


@dataclass
class Run:
    load: TokenLoad
    swap: Swap
    counts: Any  # guard.Counts over the whole load


def under_load(envoy: EcdsEnvoy, kinds: list[Kind], publish: Callable[[], Swap]) -> Run:
    """Load running, ``PER_PHASE`` answers, the swap, ``PER_PHASE`` answers after it."""
    with counting(envoy) as counts:
        with TokenLoad(envoy.address, kinds, rate=LOAD_RATE) as load:
            load.wait_for(PER_PHASE, after=load.started_at, what="answers before the swap")
            swap = publish()
            load.wait_for(PER_PHASE, after=swap.settled_at, what="answers after the swap")
    return Run(load, swap, counts)


def assert_every_answer_right(run: Run, kinds: list[Kind]) -> dict[str, list]:
    """No error, no 5xx, no wrong decision, in any phase; each phase really saw traffic; the
    guard's counters, shared by old and new filter, count every request exactly once."""
    load, swap = run.load, run.swap
    failures = load.failures()
    assert not failures, (f"{len(failures)} wrong answers, first: {failures[:5]}; {load.summary(swap)}")
    phases = load.phases(swap)
    for phase in ("before", "after"):
        seen = {o.kind for o in phases[phase]}
        assert seen == {k.name for k in kinds}, f"{phase}: only {seen}"
    # Requests were in flight while Envoy swapped, and they too got the right answer.
    assert phases["across"], load.summary(swap)
    refused = sum(1 for o in load.outcomes if o.status == 403)
    assert run.counts.guard.get("token_requests") == load.completed(), run.counts.guard
    assert run.counts.guard.get("blocked") == refused, run.counts.guard
    assert run.counts.guard.get("allowed") == load.completed() - refused, run.counts.guard
    return phases


def figures(run: Run, phases: dict[str, list]) -> dict[str, Any]:
    load, swap = run.load, run.swap
    return {
        "requests": load.completed(),
        "rate_per_second": round(load.rate()),
        "failed": len(load.failures()),
        "before": len(phases["before"]), "in_flight_across_swap": len(phases["across"]),
        "after": len(phases["after"]),
        "swap_settled_ms": round((swap.settled_at - swap.published_at) * 1000),
        "v8_created": swap.delta("v8.created"),
        "guard_counters": run.counts.guard,
        # What clients waited, per phase (reported, never asserted).
        "latency_ms_p50_max": {phase: latency(outcomes) for phase, outcomes in phases.items()},
    }


def latency(outcomes: list) -> list[float]:
    waits = sorted(o.end - o.start for o in outcomes)
    return [round(waits[len(waits) // 2] * 1000, 1), round(waits[-1] * 1000, 1)] if waits else []


def vms_back_to(envoy: EcdsEnvoy, count: int) -> int:
    """Wait until Envoy runs ``count`` VMs again (old VMs go once no request uses them)."""
    return wait_until(lambda: envoy.runtime_stats()["v8.active"] == count,
                      f"{count} active VMs again", 15, envoy.process)


# --------------------------------------------------------------------------- shared state


class StateProbes:
    """State the guard keeps in shared data, made before a swap and read after it.

    - a reservation: bob is in the call (limit 2), dave was let in and has not connected yet,
      so erin is refused;
    - an identity learnt from /get_token: alice joined through /get_token, so LiveKit lists only
      a hash for her, which the guard maps back to her through what it learnt when it let her
      token through; with bob in the call the room is full, and only that mapping lets alice's
      second device in.
    Both rooms' limits are in the limit cache.
    """

    def __init__(self, envoy: EcdsEnvoy, new_room: Callable[..., str], livekit: Any):
        self.reserved = new_room(limit=2)
        fill_room(livekit, self.reserved, "legacy", [("bob", "B1")])
        assert ask(envoy, "/sfu/get", "legacy", "dave", "D1", self.reserved).status_code == 200
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "erin", "E1", self.reserved))

        self.learnt = new_room(limit=2)
        fill_room(livekit, self.learnt, "legacy", [("bob", "B1")])
        alice = ask(envoy, "/get_token", "new", "alice", "A1", self.learnt)
        assert alice.status_code == 200, alice.text
        livekit.connect(alice)
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", self.learnt))

    def read(self, envoy: EcdsEnvoy) -> dict[str, Any]:
        """What the guard still knows: one request per piece of state, counters around it."""
        with counting(envoy) as lookup:
            erin = ask(envoy, "/sfu/get", "legacy", "erin", "E1", self.reserved)
        alice = ask(envoy, "/get_token", "new", "alice", "A2", self.learnt)
        return {
            "limit_cached": lookup.guard.get("synapse_lookups", 0) == 0
            and lookup.guard.get("limit_cache_hits", 0) == 1,
            "reservation_counts": erin.status_code == 403,
            "identity_known": alice.status_code == 200,
            "answers": {"erin": erin.status_code, "alice_second_device": alice.status_code},
            "counters": lookup.guard,
        }

    def alice_again(self, envoy: EcdsEnvoy, count: int = 5) -> dict[str, int]:
        """alice's first device asks ``count`` times in a row (admitted on a cached participant
        list when there is one: she is in it, known through her learnt identity); the guard's
        counter changes."""
        with counting(envoy) as counts:
            for _ in range(count):
                resp = ask(envoy, "/get_token", "new", "alice", "A1", self.learnt)
                assert resp.status_code == 200, resp.text
        return counts.guard


KEPT = {"limit_cached": True, "reservation_counts": True, "identity_known": True}


def kept(state: dict[str, Any]) -> dict[str, bool]:
    return {k: state[k] for k in KEPT}


# --------------------------------------------------------------------------- tests


def test_module_swap_under_load(ecds_envoy, new_room, livekit, tmp_path):
    """A rebuilt module (other bytes, same code) replaces every VM while requests flow: every
    answer right, and the new VMs find the old ones' shared state."""
    envoy = ecds_envoy()
    _, kinds = full_room(new_room, livekit)
    probes = StateProbes(envoy, new_room, livekit)
    module = rebuilt_module(WASM_PATH, tmp_path / "voice_limit_guard.wasm", "hot swap test")
    active_before = envoy.runtime_stats()["v8.active"]
    module_before = envoy.served_module()

    run = under_load(envoy, kinds, lambda: envoy.swap(wasm=module))
    swap = run.swap

    phases = assert_every_answer_right(run, kinds)
    # Evidence of the swap: Envoy applied one update and refused none, serves the published
    # version, points at the new module, and created new VMs for it.
    assert (swap.delta("config_reload"), swap.delta("config_fail")) == (1, 0)
    assert swap.after["version_text"] == envoy.resource()["version_info"]
    published = envoy.resource()["resources"][0]["typed_config"]["config"]["vm_config"]["code"]
    assert envoy.served_module() == published["local"]["filename"] != module_before
    # One VM per worker thread and one on the main thread (concurrency 2): all new.
    assert swap.delta("v8.created") >= envoy.concurrency + 1
    # The old VMs go once nothing uses them: as many VMs as before, not twice as many.
    vms_back_to(envoy, active_before)

    state = probes.read(envoy)
    FIGURES["module swap"] = {**figures(run, phases), "v8_active": active_before, "state": state}
    print(f"\nmodule swap: {json.dumps(FIGURES['module swap'])}\n{run.load.summary(swap)}")
    assert kept(state) == KEPT, state


def test_configuration_swap_under_load(ecds_envoy, new_room, livekit):
    """New settings (limit cache TTL, participant-list cache off) while requests flow: every
    answer right, the new settings in force afterwards, shared state kept."""
    envoy = ecds_envoy()
    _, kinds = full_room(new_room, livekit)
    probes = StateProbes(envoy, new_room, livekit)
    # With participants_cache_ms 1000 (shipped), back-to-back admissions share one LiveKit list.
    cached = probes.alice_again(envoy)
    assert cached.get("livekit_cache_hits", 0) >= 1, cached
    active_before = envoy.runtime_stats()["v8.active"]

    new_settings = {"limit_cache_ttl_seconds": 120, "participants_cache_ms": 0}
    run = under_load(envoy, kinds, lambda: envoy.swap(settings=new_settings))
    swap = run.swap

    phases = assert_every_answer_right(run, kinds)
    assert (swap.delta("config_reload"), swap.delta("config_fail")) == (1, 0)
    assert swap.after["version_text"] == envoy.resource()["version_info"]
    served = envoy.served_filter()["ecds_filter"]["typed_config"]["config"]
    configuration = json.loads(served["configuration"]["value"])
    assert {k: configuration[k] for k in new_settings} == new_settings
    state = probes.read(envoy)
    # The new settings are the ones deciding: every admission now asks LiveKit.
    uncached = probes.alice_again(envoy)
    assert uncached.get("livekit_cache_hits", 0) == 0 and uncached.get("livekit_lookups") == 5, uncached
    vms_back_to(envoy, active_before)

    FIGURES["configuration swap"] = {**figures(run, phases), "v8_active": active_before, "state": state}
    print(f"\nconfiguration swap: {json.dumps(FIGURES['configuration swap'])}\n{run.load.summary(swap)}")
    assert kept(state) == KEPT, state


def test_invalid_configuration_is_rejected_and_the_filter_in_service_stays(ecds_envoy, new_room, livekit,
                                                                          tmp_path):
    """A new module with a configuration the filter refuses (an unknown key): ecds_publish.py
    --validate refuses to publish it; published anyway, Envoy rejects it and the filter in
    service (old module, old configuration) goes on checking every request; the corrected
    configuration is then applied as usual."""
    envoy = ecds_envoy()
    _, kinds = full_room(new_room, livekit)
    module = rebuilt_module(WASM_PATH, tmp_path / "voice_limit_guard.wasm", "rejected")
    text = envoy.resource_path.read_text()
    assert envoy.publish(wasm=module, settings={"bogus_key": 1}, validate=True) == 1
    assert "configuration rejected: bogus_key: unknown field `bogus_key`" in envoy.last_publish_output
    assert envoy.resource_path.read_text() == text
    served = envoy.served_filter()
    served_module = envoy.served_module()
    active = envoy.runtime_stats()["v8.active"]

    run = under_load(envoy, kinds, lambda: envoy.swap(wasm=module, settings={"bogus_key": 1}))
    swap = run.swap

    phases = assert_every_answer_right(run, kinds)
    assert (swap.delta("config_fail"), swap.delta("update_rejected")) == (1, 1)
    assert swap.after["version_text"] == served["version_info"]
    # Envoy writes its log file in batches: the filter's reason is waited for.
    wait_until(lambda: "configuration rejected: bogus_key: unknown field `bogus_key`" in envoy.log_text(),
               "the filter's reason in Envoy's log", 15, envoy.process)
    # The VM made to check the rejected filter does not stay.
    vms_back_to(envoy, active)
    # Envoy 1.40 still counts the rejected update in config_reload, and its /config_dump shows
    # the rejected resource, though the filter serving is the previous one (as every answer
    # above shows): config_fail and version_text are what tell a rejection.
    rejected_version = envoy.resource()["version_info"]
    assert envoy.served_filter()["version_info"] == rejected_version != served["version_info"]
    FIGURES["rejected configuration"] = {**figures(run, phases),
                                         "config_reload": swap.delta("config_reload"),
                                         "config_dump_version_is_rejected_one": True}
    print(f"\nrejected configuration: {json.dumps(FIGURES['rejected configuration'])}\n"
          f"{run.load.summary(swap)}")

    fixed = envoy.swap(unset=("bogus_key",))
    assert (fixed.delta("config_fail"), fixed.delta("update_rejected")) == (0, 0)
    assert fixed.delta("config_reload") == 1
    assert fixed.after["version_text"] == envoy.resource()["version_info"]
    assert envoy.served_module() != served_module
    newcomer, member = kinds[1], kinds[0]
    assert_channel_full(envoy.post(newcomer.path, newcomer.body, headers={"Content-Type": "application/json"}))
    assert envoy.post(member.path, member.body, headers={"Content-Type": "application/json"}).status_code == 200


def test_a_new_vm_id_starts_from_empty_state(ecds_envoy, new_room, livekit):
    """Shared data belongs to the vm_id: a filter published under another vm_id sees none of the
    state before it, so it asks Synapse again, forgets an admitted user who has not connected
    yet (one user too many gets in) and no longer knows /get_token identities. Envoy drops a
    vm_id's data with its last VM: going back to the first vm_id does not bring it back. This
    is why the published file keeps the vm_id."""
    envoy = ecds_envoy()
    probes = StateProbes(envoy, new_room, livekit)
    active = envoy.runtime_stats()["v8.active"]

    def vm_id(name: str) -> Callable[[dict], None]:
        def change(document: dict) -> None:
            document["resources"][0]["typed_config"]["config"]["vm_config"]["vm_id"] = name
        return change

    swap = Swap(envoy).run(lambda: envoy.rewrite(vm_id("voice_limit_guard_2")))
    assert (swap.delta("config_reload"), swap.delta("config_fail")) == (1, 0)
    state = probes.read(envoy)
    lost = {"limit_cached": False, "reservation_counts": False, "identity_known": False}
    assert kept(state) == lost, state

    vms_back_to(envoy, active)  # the first vm_id's VMs are gone
    back = Swap(envoy).run(lambda: envoy.rewrite(vm_id("voice_limit_guard")))
    assert (back.delta("config_reload"), back.delta("config_fail")) == (1, 0)
    state_back = probes.read(envoy)
    FIGURES["new vm_id"] = {"state": state, "v8_created": swap.delta("v8.created"),
                            "back_to_first_vm_id": state_back}
    print(f"\nnew vm_id: {json.dumps(FIGURES['new vm_id'])}")
    assert kept(state_back) == lost, state_back


def test_an_invalid_filter_at_start_up_refuses_every_request(ecds_envoy):
    """Without a default configuration Envoy never serves unguarded: started with a filter it
    rejects, it answers every request 500 until a valid one is published."""
    envoy = ecds_envoy(bogus_key=1)
    stats = envoy.runtime_stats()
    assert stats["config_fail"] == 1, stats
    assert envoy.get("/healthz", timeout=10).status_code == 500
    assert envoy.post("/sfu/get", {"room": "!a"}, timeout=10).status_code == 500

    fixed = envoy.swap(unset=("bogus_key",))
    assert (fixed.delta("config_reload"), fixed.delta("config_fail")) == (1, 0)
    assert envoy.get("/healthz", timeout=10).status_code == 200


@pytest.mark.parametrize("before", [None, 0o600, 0o640])
def test_publishing_never_makes_the_resource_more_readable(tmp_path, before):
    """The ECDS resource may hold an inline admin token: a publication keeps the file's mode,
    and a first one is readable by its owner only."""
    from hotswap import load_publisher

    path = tmp_path / "voice_limit_guard.yaml"
    if before is not None:
        path.write_text("old\n")
        path.chmod(before)
    load_publisher()._write_atomically(path, b"new\n")
    assert path.read_bytes() == b"new\n"
    assert path.stat().st_mode & 0o777 == (0o600 if before is None else before)
