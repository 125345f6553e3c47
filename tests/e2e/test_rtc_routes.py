"""The guard on the MatrixRTC routes, end to end through the real Synapse.

Current clients ask their homeserver for a LiveKit token
(``POST /_matrix/client/v1/rtc/livekit/get_token``); Synapse authenticates them and forwards the
request to lk-jwt-service, registered as its application service, at ``synapse.proxy_url``:
here the Envoy with the guard, in front of the lk-jwt-service stand-in. The guard decides before
lk-jwt-service sees the body, so a refused request creates no LiveKit room (the stand-in's
``/stats``). Clients connect to the real LiveKit with the tokens they get.

These are the counterparts of the legacy routes' decision tests: limits, bursts, a present
user's second member id, hashed identities, failures, unreadable bodies, untrusted requests,
federation requests and path spellings.
"""

from __future__ import annotations

import json
import secrets
import threading
from typing import Any, Callable, NamedTuple

import pytest

from conftest import requires_standins
from guard import CHANNEL_FULL, elapsed, poll
from stack import (
    LEGACY_SLOT,
    RTC_CLIENT_TOKEN_PATHS,
    RTC_FEDERATION_TOKEN_PATHS,
    http,
    jwt_claims,
    livekit_alias,
    rtc_identity,
)

pytestmark = requires_standins

RTC_COUNTERS = ("token_requests", "allowed", "blocked", "fail_open", "fail_closed",
                "unreadable_requests", "untrusted_requests", "relayed_requests",
                "released_reservations", "token_mismatches")


class User(NamedTuple):
    id: str
    token: str


@pytest.fixture(scope="module")
def people(synapse: Any) -> list[User]:
    """Eight users of the session's Synapse with their own access tokens."""
    made = []
    for n in range(8):
        localpart, password = f"rtcg-{n}-{secrets.token_hex(3)}", secrets.token_hex(8)
        made.append(User(synapse.register_user(localpart, password), synapse.login(localpart, password)))
    return made


@pytest.fixture
def call_room(synapse: Any) -> Callable[..., str]:
    """Factory: ``call_room(limit, members)``: a public room with that limit, the members joined."""
    def make(limit: Any, members: list[User]) -> str:
        room = synapse.create_room(preset="public_chat")
        if limit is not None:
            synapse.set_limit(room, limit)
        for member in members:
            synapse.join_room(room, member.token)
        return room
    return make


@pytest.fixture
def guard(start_envoy: Any, synapse: Any, plugin_config: Any) -> Any:
    """The Envoy with the guard at Synapse's proxy URL, trusting only Synapse's hs_token."""
    return start_envoy(plugin_config(synapse={"hs_token": synapse.appservice.hs_token}),
                       listen_port=synapse.proxy_port)


def counts(envoy: Any) -> dict[str, int]:
    stats = envoy.stats()
    return {name: stats.get(name, 0) for name in RTC_COUNTERS}


def delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before[k] for k in after if after[k] != before[k]}


def issued(stats: dict) -> int:
    return sum(stats.get("issued", {}).values())


def created(stats: dict) -> int:
    return sum(stats.get("create_room", {}).values())


def assert_refused_full(resp: Any) -> None:
    """The guard's 403 as Synapse relays it to the client."""
    assert resp.status_code == 403, resp.text
    assert resp.json() == json.loads(CHANNEL_FULL)


def ask(synapse: Any, user: User, room: str, member: str, standins: Any, **kwargs: Any) -> Any:
    return synapse.rtc_token(user.token, room, member, standins.livekit_ws_url, **kwargs)


def join(livekit: Any, resp: Any) -> str:
    """Connects a real client with the token and waits until LiveKit lists it ACTIVE."""
    assert resp.status_code == 200, resp.text
    claims = jwt_claims(resp.json()["jwt"])
    alias, identity = claims["video"]["room"], claims["sub"]
    livekit.connect(resp.json()["jwt"])
    poll(lambda: livekit.livekit.states(alias).get(identity) == "ACTIVE",
         f"LiveKit to list {identity} ACTIVE", 10)
    return identity


@pytest.mark.parametrize("path", ["stable", "unstable"])
def test_a_room_admits_exactly_its_limit_and_a_refusal_never_reaches_lk_jwt_service(
        path, synapse, people, call_room, guard, livekit, real_lk_jwt, standins):
    """Limit 2: two users get tokens and connect (hashed identities, mapped back to their users),
    the third is refused 403 M_FORBIDDEN before lk-jwt-service creates any room for it."""
    alice, bob, carol = people[:3]
    room = call_room(2, [alice, bob, carol])
    before, lk_before = counts(guard), real_lk_jwt.stats()

    for user, member in ((alice, "a1"), (bob, "b1")):
        resp = ask(synapse, user, room, member, standins, path=path)
        assert join(livekit, resp) == rtc_identity(user.id, member)
        assert jwt_claims(resp.json()["jwt"])["video"]["room"] == livekit_alias(room, LEGACY_SLOT)
    resp = ask(synapse, carol, room, "c1", standins, path=path)

    assert_refused_full(resp)
    lk_after = real_lk_jwt.stats()
    assert issued(lk_after) - issued(lk_before) == 2
    assert created(lk_after) - created(lk_before) == 2, "the refused request reached lk-jwt-service"
    assert delta(before, counts(guard)) == {"token_requests": 3, "allowed": 2, "blocked": 1}


def test_a_simultaneous_burst_gets_exactly_the_limit(synapse, people, call_room, guard, livekit,
                                                     real_lk_jwt, standins):
    """Six users ask at once through Synapse for a room limited to 2: two tokens, four 403s."""
    crowd = people[:6]
    room = call_room(2, crowd)
    before, lk_before = counts(guard), real_lk_jwt.stats()
    answers: dict[str, Any] = {}
    start = threading.Barrier(len(crowd))

    def go(user: User) -> None:
        start.wait()
        answers[user.id] = ask(synapse, user, room, "m", standins)

    threads = [threading.Thread(target=go, args=(user,)) for user in crowd]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    statuses = sorted(resp.status_code for resp in answers.values())
    assert statuses == [200, 200, 403, 403, 403, 403], [r.text for r in answers.values()]
    for resp in answers.values():
        if resp.status_code == 403:
            assert_refused_full(resp)
    assert issued(real_lk_jwt.stats()) - issued(lk_before) == 2
    assert delta(before, counts(guard)) == {"token_requests": 6, "allowed": 2, "blocked": 4}
    # The two who got in connect; the room holds exactly the limit.
    for resp in answers.values():
        if resp.status_code == 200:
            join(livekit, resp)
    assert len(livekit.livekit.states(livekit_alias(room, LEGACY_SLOT))) == 2


def test_a_present_user_gets_in_with_another_member_id(synapse, people, call_room, guard, livekit,
                                                       standins):
    """Limit 1, alice connected with a hashed identity: her second device (another member id)
    gets in, bob does not; after alice's devices leave, bob gets in."""
    alice, bob = people[:2]
    room = call_room(1, [alice, bob])
    first = join(livekit, ask(synapse, alice, room, "phone", standins))
    second = join(livekit, ask(synapse, alice, room, "laptop", standins))
    assert first != second

    assert_refused_full(ask(synapse, bob, room, "b", standins))

    alias = livekit_alias(room, LEGACY_SLOT)
    livekit.leave(alias, first)
    livekit.leave(alias, second)
    poll(lambda: livekit.livekit.states(alias) == {}, "alice's devices to leave LiveKit", 10)
    join(livekit, ask(synapse, bob, room, "b", standins))


def test_a_refusal_by_lk_jwt_service_gives_the_place_back(synapse, people, call_room, guard,
                                                          standins):
    """Limit 1: a user who is not in the room is admitted by the guard, refused by lk-jwt-service
    (not joined), and the place is free again for a member at once."""
    member, stranger = people[:2]
    room = call_room(1, [member])
    before = counts(guard)

    resp = ask(synapse, stranger, room, "s", standins)
    assert resp.status_code == 403 and resp.json()["errcode"] == "M_FORBIDDEN"
    assert resp.json() != json.loads(CHANNEL_FULL), "lk-jwt-service's refusal, not the guard's"
    resp = ask(synapse, member, room, "m", standins)

    assert resp.status_code == 200, resp.text
    assert delta(before, counts(guard)) == {
        "token_requests": 2, "allowed": 2, "released_reservations": 1}


def test_concurrent_refused_requests_of_a_non_member_leave_no_place(synapse, people, call_room,
                                                                   guard, standins):
    """A non-member's burst of requests into a room limited to 1: each is admitted by the guard
    and refused by lk-jwt-service; once all are answered the place is free (no hoarding)."""
    member, stranger = people[:2]
    room = call_room(1, [member])
    before = counts(guard)
    start = threading.Barrier(4)
    answers = []

    def go(n: int) -> None:
        start.wait()
        answers.append(ask(synapse, stranger, room, f"s{n}", standins).status_code)

    threads = [threading.Thread(target=go, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [403] * 4
    resp = ask(synapse, member, room, "m", standins)
    assert resp.status_code == 200, resp.text
    after = delta(before, counts(guard))
    # The place ends with the last refusal of the requests holding it at the time: once if all
    # four overlapped, more often if some were answered before others arrived.
    assert 1 <= after["released_reservations"] <= 4, after
    assert after["allowed"] == 5 and "blocked" not in after, after


def test_a_request_without_synapses_token_gets_no_token(synapse, people, call_room, guard,
                                                        real_lk_jwt, standins):
    """Straight to the Envoy, as Synapse never sends it: no hs_token, a wrong one, or a claimed
    user of the client's own choosing: 401 from the guard, and lk-jwt-service sees nothing."""
    alice = people[0]
    room = call_room(None, [alice])
    body = {"room_id": room, "slot_id": LEGACY_SLOT, "member_id": "m",
            "url": standins.livekit_ws_url}
    before, lk_before = counts(guard), real_lk_jwt.stats()
    for authorization, errcode in ((None, "M_MISSING_TOKEN"), ("Bearer guessed", "M_UNKNOWN_TOKEN"),
                                   (f"Basic {synapse.appservice.hs_token}", "M_UNKNOWN_TOKEN")):
        headers = {"X-Matrix-User-Identifier": alice.id}
        if authorization:
            headers["Authorization"] = authorization
        resp = http().post(guard.url + RTC_CLIENT_TOKEN_PATHS["stable"], json=body,
                           headers=headers, timeout=10)
        assert resp.status_code == 401, resp.text
        assert resp.json()["errcode"] == errcode
    assert delta(before, counts(guard)) == {"token_requests": 3, "untrusted_requests": 3}
    assert real_lk_jwt.stats()["requests"] == lk_before["requests"]


def test_a_federation_request_takes_a_place(synapse, people, call_room, guard, standins,
                                            real_lk_jwt):
    """A federation request, sent to the proxy path as Synapse forwards it (hs_token,
    X-Matrix-Origin, the user in the body), is decided like a client's and holds a place."""
    alice, bob = people[:2]
    room = call_room(1, [alice, bob])
    origin = synapse.server_name
    body = {"user_id": alice.id, "url": standins.livekit_ws_url, "room_id": room,
            "slot_id": LEGACY_SLOT, "member_id": "fed"}
    headers = {"Authorization": f"Bearer {synapse.appservice.hs_token}", "X-Matrix-Origin": origin}
    before = counts(guard)

    resp = http().post(guard.url + RTC_FEDERATION_TOKEN_PATHS["stable"], json=body, headers=headers,
                       timeout=10)
    assert resp.status_code == 200, resp.text
    assert jwt_claims(resp.json()["jwt"])["sub"] == rtc_identity(alice.id, "fed")

    assert_refused_full(ask(synapse, bob, room, "b", standins))
    assert delta(before, counts(guard)) == {"token_requests": 2, "allowed": 1, "blocked": 1}


@pytest.mark.parametrize("path", [
    "/_matrix/client/v1/rtc/livekit/get_token/",
    "/_matrix/client/v1/rtc//livekit/get_token",
    "/_matrix/client/v1/rtc/livekit/get%5Ftoken",
    "/_matrix/client/unstable/org.example.other/rtc/livekit/get_token",
    "/_matrix/client/V1/RTC/LiveKit/get_token?access_token=x",
])
def test_path_spellings_do_not_slip_past(path, synapse, people, call_room, guard, livekit,
                                         standins):
    """A full room refuses a newcomer on every spelling of the route a server might accept."""
    alice, bob = people[:2]
    room = call_room(1, [alice, bob])
    join(livekit, ask(synapse, alice, room, "a", standins))
    body = {"room_id": room, "slot_id": LEGACY_SLOT, "member_id": "b",
            "url": standins.livekit_ws_url}
    headers = {"Authorization": f"Bearer {synapse.appservice.hs_token}",
               "X-Matrix-User-Identifier": bob.id}
    resp = http().post(guard.url + path, json=body, headers=headers, timeout=10)
    assert resp.status_code == 403, resp.text
    assert resp.content == CHANNEL_FULL


def test_other_paths_under_the_prefix_and_other_homeservers_pass(synapse, people, call_room, guard,
                                                                 standins):
    """delegate_delayed_leave is not a token route; a request naming another homeserver's SFU
    is lk-jwt-service's to relay (the stand-in cannot: 502), both untouched by the guard."""
    alice, bob = people[:2]
    room = call_room(1, [alice, bob])
    before = counts(guard)
    resp = synapse.request("POST", "/_matrix/client/v1/rtc/livekit/delegate_delayed_leave",
                           alice.token, json={})
    assert resp.status_code == 200, resp.text
    resp = ask(synapse, bob, room, "b", standins, server_name="elsewhere.example")
    assert resp.status_code == 502, resp.text
    assert delta(before, counts(guard)) == {"token_requests": 1, "relayed_requests": 1}


def test_unreadable_requests_go_on_and_are_refused_by_lk_jwt_service(synapse, people, call_room,
                                                                     guard, standins):
    """A body the guard cannot decide on passes to lk-jwt-service, which refuses it; its answer
    reaches the client unchanged."""
    alice = people[0]
    room = call_room(1, [alice])
    before = counts(guard)
    for body in ({"room_id": room, "slot_id": LEGACY_SLOT, "url": standins.livekit_ws_url},
                 {"room_id": 5, "slot_id": LEGACY_SLOT, "member_id": "m"}):
        resp = synapse.rtc_token(alice.token, room, "m", standins.livekit_ws_url, body=body)
        assert resp.status_code == 400, resp.text
    assert delta(before, counts(guard)) == {"token_requests": 2}


def test_a_token_for_a_request_the_guard_cannot_read_is_answered_503(
        synapse, people, fault_server, start_envoy, plugin_config, standins):
    """An upstream that issues a token for anything: the token of an unreadable request is
    replaced by 503 in both failure modes."""
    alice = people[0]
    minted = {"jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig"}
    upstream = fault_server("ok", body=minted)
    for mode in ("open", "closed"):
        envoy = start_envoy(plugin_config(failure_mode=mode), lk_jwt=upstream,
                            listen_port=synapse.proxy_port)
        resp = synapse.rtc_token(alice.token, "!r:x", "m", standins.livekit_ws_url,
                                 body={"room_id": "!r:x"})
        assert resp.status_code == 503, resp.text
        assert resp.json()["errcode"] == "M_UNKNOWN"
        assert envoy.stats().get("unreadable_requests") == 1
        envoy.stop()


@pytest.mark.check_fails
@pytest.mark.parametrize("service", ["synapse", "livekit"])
@pytest.mark.parametrize("mode,expected", [("open", 200), ("closed", 503)])
def test_a_failing_service_fails_per_failure_mode(service, mode, expected, synapse, people,
                                                  call_room, fault_server, start_envoy,
                                                  plugin_config, standins, real_lk_jwt):
    """Synapse's admin API or LiveKit's API failing: the request goes on (open) or is answered
    503 (closed), and in closed mode lk-jwt-service never sees it."""
    alice = people[0]
    room = call_room(1, [alice])
    broken = fault_server("status", status=500)
    envoy = start_envoy(plugin_config(failure_mode=mode), listen_port=synapse.proxy_port,
                        **{service: broken})
    lk_before = real_lk_jwt.stats()
    resp = ask(synapse, alice, room, "m", standins)
    assert resp.status_code == expected, resp.text
    assert envoy.stats().get(f"fail_{mode}") == 1
    assert issued(real_lk_jwt.stats()) - issued(lk_before) == (1 if mode == "open" else 0)


def test_decided_in_a_host_without_allow_on_headers_stop_iteration(
        synapse, people, call_room, start_envoy, plugin_config, livekit, standins):
    """As Istio's WasmPlugin and Envoy Gateway render the filter (no
    allow_on_headers_stop_iteration): the MatrixRTC routes never pause on headers, so the limit
    holds and no request waits for the stream idle timeout."""
    idle = 3.0
    envoy = start_envoy(plugin_config(synapse={"hs_token": synapse.appservice.hs_token}),
                        listen_port=synapse.proxy_port, stop_iteration=False,
                        stream_idle_timeout=idle)
    assert "allow_on_headers_stop_iteration" not in envoy.config_path.read_text()
    alice, bob, carol = people[:3]
    room = call_room(2, [alice, bob, carol])
    open_room = call_room(None, [alice])
    before = counts(envoy)
    answers = []
    for user, member, where in ((alice, "a", room), (bob, "b", room), (carol, "c", room),
                                (alice, "a2", room), (alice, "o", open_room)):
        resp, seconds = elapsed(lambda: ask(synapse, user, where, member, standins))
        assert seconds < idle, f"{user.id} waited {seconds:.1f}s"
        answers.append(resp.status_code)
        if resp.status_code == 200 and where == room:
            join(livekit, resp)
    assert answers == [200, 200, 403, 200, 200]
    assert delta(before, counts(envoy)) == {"token_requests": 5, "allowed": 4, "blocked": 1}
