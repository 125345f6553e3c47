"""The guard's admission behaviour through the real stack: Envoy with the filter, a real Synapse
holding the limits, the real LiveKit server and the lk-jwt-service stand-in.

Users connect real LiveKit clients with their issued JWTs, so every limit below is reached the
way it is in production: by people actually in the call.
"""

from __future__ import annotations

import json
import re
import time
import uuid

import pytest
import requests

from conftest import requires_standins, requires_wasm
from guard import (
    SHAPES,
    ask,
    assert_channel_full,
    assert_token_issued,
    counting,
    fill_room,
    identity,
    module_envoy,
    poll,
    still_serving,
    token_body,
)
from stack import DECISION_PHASE, join_body, livekit_alias

pytestmark = [requires_wasm, requires_standins]

# What one token request costs when the room's limit is looked up and LiveKit consulted.
LOOKED_UP_AND_CHECKED = {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1}
CACHED_AND_CHECKED = {"token_requests": 1, "limit_cache_hits": 1, "livekit_lookups": 1}


envoy, _log_on_failure = module_envoy("filter")


def join(envoy, standins, path, shape, who, device, room, state=None):
    """Ask for a token and connect to LiveKit with it, as Element Call does; return the answer."""
    resp = ask(envoy, path, shape, who, device, room)
    assert resp.status_code == 200, resp.text
    standins.connect(resp, state=state)
    return resp


# --------------------------------------------------------------------------- below and at the limit


@pytest.mark.parametrize("path, shape", SHAPES)
def test_allowed_below_the_limit_passes_lk_jwt_answer(envoy, standins, new_room, path, shape):
    """Below the limit the guard is invisible: lk-jwt-service's 200 arrives as it was sent."""
    room = new_room(limit=2)
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "alice", "A1", room)
    assert_token_issued(resp, room, shape, "alice", "A1", standins)
    assert counts.guard == {**LOOKED_UP_AND_CHECKED, "allowed": 1}
    assert counts.list_participants == 1


@pytest.mark.parametrize("path, shape", SHAPES)
def test_third_user_refused_when_two_are_in_the_call(envoy, standins, new_room, path, shape):
    room = new_room(limit=2)
    join(envoy, standins, path, shape, "alice", "A1", room)
    join(envoy, standins, path, shape, "bob", "B1", room)
    with counting(envoy, standins) as counts:
        refused = ask(envoy, path, shape, "carol", "C1", room)
    assert_channel_full(refused)
    assert counts.guard == {**CACHED_AND_CHECKED, "blocked": 1}
    assert counts.list_participants == 1


@pytest.mark.parametrize("path, shape", SHAPES)
def test_place_freed_when_a_user_leaves(envoy, standins, new_room, path, shape):
    room = new_room(limit=2)
    join(envoy, standins, path, shape, "alice", "A1", room)
    join(envoy, standins, path, shape, "bob", "B1", room)
    assert_channel_full(ask(envoy, path, shape, "carol", "C1", room))

    standins.leave(livekit_alias(room), identity(shape, "bob", "B1"))
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "carol", "C1", room)
    assert_token_issued(resp, room, shape, "carol", "C1", standins)
    assert counts.guard == {**CACHED_AND_CHECKED, "allowed": 1}


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("state", ["JOINED", "ACTIVE"])
def test_a_participant_counts_before_its_media_connects(envoy, standins, new_room, path, shape,
                                                       state):
    """bob connected only LiveKit's signalling (listed JOINED: no media yet) or fully (ACTIVE):
    either way he holds his place. (A participant that leaves is dropped from LiveKit's list at
    once: see test_place_freed_when_a_user_leaves.)"""
    room = new_room(limit=2)
    join(envoy, standins, path, shape, "alice", "A1", room)
    join(envoy, standins, path, shape, "bob", "B1", room, state=state)
    bob = identity(shape, "bob", "B1")
    listed = standins.livekit.states(livekit_alias(room))
    assert bob in listed and (listed[bob] != "ACTIVE" if state == "JOINED" else True)
    with counting(envoy, standins) as counts:
        assert_channel_full(ask(envoy, path, shape, "carol", "C1", room))
    assert counts.guard == {**CACHED_AND_CHECKED, "blocked": 1}


def test_present_users_second_device_allowed_on_sfu_get(envoy, standins, new_room):
    """Legacy identities are ``user:device``, so the guard recognises a user already in the call."""
    room = new_room(limit=2)
    join(envoy, standins, "/sfu/get", "legacy", "alice", "A1", room)
    join(envoy, standins, "/sfu/get", "legacy", "bob", "B1", room)
    with counting(envoy, standins) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "alice", "A2", room)
    assert_token_issued(resp, room, "legacy", "alice", "A2", standins)
    assert counts.guard == {**CACHED_AND_CHECKED, "allowed": 1}
    # Two devices of alice still make two users with bob: carol stays out.
    standins.connect(resp)
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", room))


def test_user_id_with_port_recognised_as_present(envoy, standins, new_room):
    """``@alice:example.org:8448`` (a server name with a port) joins through the guard, which
    learns that ``@alice:example.org:8448:A1`` is her and not ``@alice:example.org``: her
    second device gets in, the port-less ``@alice:example.org`` does not."""
    room = new_room(limit=2)
    alias = livekit_alias(room)
    bob = ("@bob:test.local:B1", "ACTIVE")
    standins.set_room(alias, [bob])

    def alice_body(server: str, device: str) -> dict:
        return {"room": room, "device_id": device,
                "openid_token": {"access_token": f"openid:@alice:{server}", "token_type": "Bearer",
                                 "matrix_server_name": server, "expires_in": 3600}}

    with counting(envoy, standins) as counts:
        assert envoy.post("/sfu/get", alice_body("example.org:8448", "A1")).status_code == 200
        standins.set_room(alias, [("@alice:example.org:8448:A1", "ACTIVE"), bob])
        second = envoy.post("/sfu/get", alice_body("example.org:8448", "A2"))
        assert_channel_full(envoy.post("/sfu/get", alice_body("example.org", "A3")))
    assert "fail_open" not in counts.guard
    if DECISION_PHASE == "response":
        assert second.status_code == 200
        assert counts.guard["allowed"] == 2 and counts.guard["blocked"] == 1
    else:
        # Decided on the request, nobody can say whose another homeserver's OpenID token is
        # (only lk-jwt-service asks that server): it may only take a free place, and there is
        # none. The learning still holds for /get_token, whose claim lk-jwt-service proves.
        assert_channel_full(second)
        assert counts.guard["allowed"] == 1 and counts.guard["blocked"] == 2
        assert counts.guard["unverified_requesters"] == 3


@pytest.mark.parametrize("path, shape", SHAPES)
def test_user_id_with_port_in_the_call_unseen_gets_another_device(envoy, standins, new_room,
                                                                   path, shape):
    """``@alice:example.org:8448`` is in the call on a device whose token the guard never saw
    (she joined before the room had its limit, or before this Envoy started):
    ``@alice:example.org:8448:A1``, which the Matrix grammar alone reads as ``@alice:example.org``'s
    device ``8448:A1``. Where the guard knows who asks (decided on lk-jwt-service's token, or
    ``/get_token``, whose claim lk-jwt-service proves), her new device gets in without a new
    place: carol stays out; once bob leaves, carol gets his place (alice counted once)."""
    room = new_room(limit=2)
    alias = livekit_alias(room)
    alice_a1 = ("@alice:example.org:8448:A1", "ACTIVE")
    bob = (identity(shape, "bob", "B1"), "ACTIVE")
    standins.set_room(alias, [alice_a1, bob])
    body = join_body("@alice:example.org:8448", "A2", room, shape=shape, member_id="m-alice-A2")
    with counting(envoy, standins) as counts:
        second = envoy.post(path, body)
        assert_channel_full(ask(envoy, path, shape, "carol", "C1", room))
    assert "fail_open" not in counts.guard
    if shape == "legacy" and DECISION_PHASE == "request":
        # Decided on the request, nobody can say whose another homeserver's OpenID token is:
        # it may only take a free place, and there is none.
        assert_channel_full(second)
        return
    assert second.status_code == 200, second.text
    assert counts.guard["allowed"] == 1 and counts.guard["blocked"] == 1
    standins.connect(second)
    standins.leave(alias, bob[0])
    assert_token_issued(ask(envoy, path, shape, "carol", "C1", room), room, shape, "carol", "C1",
                        standins)


@pytest.mark.parametrize("path, shape", SHAPES)
def test_device_ids_with_colons_count_as_one_user(envoy, standins, new_room, path, shape):
    """lk-jwt-service does not check device ids: one account asking with ``a:1``, ``b:1`` and
    ``1:z`` is still one user, and the next real user gets the last place."""
    room = new_room(limit=3)
    alias = livekit_alias(room)
    connected = [(identity(shape, "bob", "B1"), "ACTIVE")]
    standins.set_room(alias, connected)
    with counting(envoy, standins) as counts:
        for device in ("a:1", "b:1", "1:z"):
            assert_token_issued(ask(envoy, path, shape, "mallory", device, room), room, shape,
                                "mallory", device, standins)
            connected.append((identity(shape, "mallory", device), "ACTIVE"))
            standins.set_room(alias, connected)
        assert_token_issued(ask(envoy, path, shape, "carol", "C1", room), room, shape,
                            "carol", "C1", standins)
        connected.append((identity(shape, "carol", "C1"), "ACTIVE"))
        standins.set_room(alias, connected)
        assert_channel_full(ask(envoy, path, shape, "dave", "D1", room))
    assert counts.guard == {"token_requests": 5, "synapse_lookups": 1, "limit_cache_hits": 4,
                            "livekit_lookups": 5, "allowed": 4, "blocked": 1}


@pytest.mark.parametrize("path, shape", SHAPES)
def test_query_string_does_not_hide_a_token_path(envoy, standins, new_room, path, shape):
    room = new_room(limit=1)
    fill_room(standins, room, shape, [("alice", "A1")])
    resp = envoy.post(f"{path}?via=elsewhere", token_body(shape, "carol", "C1", room))
    assert_channel_full(resp)


# --------------------------------------------------------------------------- no limit


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("limit", [None, 0, -1, "abc", "", "1.5", "0", True, [2], {"n": 2}],
                         ids=["no_event", "zero", "negative", "abc", "empty_string", "fraction_string",
                              "zero_string", "bool", "list", "object"])
def test_no_limit_means_allowed_without_asking_livekit(envoy, standins, new_room, path, shape, limit):
    """Without a usable limit LiveKit is never asked, however full the call is."""
    room = new_room(limit=limit)
    fill_room(standins, room, shape, [("alice", "A1"), ("bob", "B1"), ("dave", "D1")])
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "carol", "C1", room)
    assert_token_issued(resp, room, shape, "carol", "C1", standins)
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "allowed": 1}
    assert counts.list_participants == 0


@pytest.mark.parametrize("path, shape", SHAPES)
def test_room_unknown_to_synapse_has_no_limit(envoy, standins, path, shape):
    room = f"!unknown-{uuid.uuid4().hex}:test.local"
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "carol", "C1", room)
    assert_token_issued(resp, room, shape, "carol", "C1", standins)
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "allowed": 1}
    assert counts.list_participants == 0


def test_limit_in_another_state_key_is_ignored(envoy, standins, synapse, new_room):
    """Only the event with the empty state key is the room's limit."""
    room = new_room()
    synapse.set_state(room, "io.lotus.voice_limit", {"max_users": 1}, state_key="other")
    fill_room(standins, room, "legacy", [("alice", "A1")])
    assert ask(envoy, "/sfu/get", "legacy", "carol", "C1", room).status_code == 200


# --------------------------------------------------------------------------- limit forms that count


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("limit, room_version", [
    (2, None), ("2", None), (" 2 ", None), ("2.0", None), (2.0, "5")],
    ids=["int", "string", "padded_string", "float_string", "float"])
def test_limit_forms_that_count(envoy, standins, synapse, path, shape, limit, room_version):
    """An integral float can only be stored in an older room version (v6+ refuses floats)."""
    options = {"room_version": room_version} if room_version else {}
    room = synapse.create_room(**options)
    synapse.set_limit(room, limit)
    fill_room(standins, room, shape, [("alice", "A1")])
    assert ask(envoy, path, shape, "bob", "B1", room).status_code == 200
    fill_room(standins, room, shape, [("alice", "A1"), ("bob", "B1")])
    assert_channel_full(ask(envoy, path, shape, "carol", "C1", room))


def test_a_custom_limit_state_type(start_envoy, plugin_config, synapse, standins, new_room):
    """``limit_state_type`` names another event type: that one limits, the default does not."""
    envoy = start_envoy(plugin_config(limit_state_type="org.example.call_limit"))
    custom, default = new_room(), new_room(limit=1)
    synapse.set_state(custom, "org.example.call_limit", {"max_users": 1})
    for room in (custom, default):
        fill_room(standins, room, "legacy", [("alice", "A1")])
    with counting(envoy, standins) as counts:
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", custom))
        assert_token_issued(ask(envoy, "/sfu/get", "legacy", "carol", "C1", default), default,
                            "legacy", "carol", "C1", standins)
    assert counts.guard == {"token_requests": 2, "synapse_lookups": 2, "livekit_lookups": 1,
                            "blocked": 1, "allowed": 1}


@pytest.mark.parametrize("path, shape", SHAPES)
def test_limit_of_one(envoy, standins, new_room, path, shape):
    room = new_room(limit=1)
    join(envoy, standins, path, shape, "alice", "A1", room)
    assert_channel_full(ask(envoy, path, shape, "bob", "B1", room))


def test_rooms_are_limited_independently(envoy, standins, new_room):
    full, other = new_room(limit=1), new_room(limit=1)
    join(envoy, standins, "/sfu/get", "legacy", "alice", "A1", full)
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "bob", "B1", full))
    assert ask(envoy, "/sfu/get", "legacy", "bob", "B1", other).status_code == 200


# --------------------------------------------------------------------------- hostile room ids


HOSTILE_ROOMS = {
    "path_tricks": "!a/../b?c#d",
    "encoded_tricks": "!a%2F..%2Fb%3Fc%23d:test.local",
    "unicode": "!ünïcødé🎉\u2028<&>:test.local",
    "spaces_and_quotes": "!a b\"c'd\\e:test.local",
}

# Ids no Matrix room can have: no `!` sigil, over 255 bytes, control characters.
IMPOSSIBLE_ROOMS = {
    "long": "!" + "x" * 4000,
    "just_over_255_bytes": "!" + "é" * 128,
    "control_chars": "!nul\u0000tab\tnl\n:test.local",
    "no_sigil": "#alias:test.local",
}


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("kind", list(HOSTILE_ROOMS))
def test_hostile_room_id_is_just_an_unknown_room(envoy, standins, path, shape, kind):
    """Each id stays one path segment of the Synapse lookup, which finds no such room."""
    room = HOSTILE_ROOMS[kind]
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "carol", "C1", room)
    assert_token_issued(resp, room, shape, "carol", "C1", standins)
    # The second shape finds the first one's answer in the cache.
    looked_up = {"synapse_lookups": 1} if "synapse_lookups" in counts.guard else {"limit_cache_hits": 1}
    assert counts.guard == {"token_requests": 1, "allowed": 1, **looked_up}
    assert counts.list_participants == 0
    still_serving(envoy)


@pytest.mark.parametrize("path, shape", SHAPES)
@pytest.mark.parametrize("kind", list(IMPOSSIBLE_ROOMS))
def test_impossible_room_id_costs_no_lookup(envoy, standins, path, shape, kind):
    """No lookup with the admin token for an id no room can have; the token passes as
    lk-jwt-service decided, and the log line quoting the id is cut short."""
    room = IMPOSSIBLE_ROOMS[kind]
    with counting(envoy, standins) as counts:
        resp = ask(envoy, path, shape, "carol", "C1", room)
    assert_token_issued(resp, room, shape, "carol", "C1", standins)
    assert counts.guard == {"token_requests": 1, "allowed": 1}
    assert counts.list_participants == 0
    assert all(len(line) < 1000 for line in envoy.log_text().splitlines() if "wasm log" in line)
    still_serving(envoy)


@pytest.mark.parametrize("path, shape", SHAPES)
def test_body_sent_in_chunks_is_read_whole(envoy, standins, new_room, path, shape):
    """A chunked body arriving in small pieces is buffered whole before the room is read."""
    room = new_room(limit=1)
    fill_room(standins, room, shape, [("alice", "A1")])
    data = json.dumps(token_body(shape, "carol", "C1", room)).encode()
    pieces = (data[i:i + 7] for i in range(0, len(data), 7))
    resp = envoy.request("POST", path, data=pieces, headers={"Content-Type": "application/json"})
    assert_channel_full(resp)


def test_client_giving_up_during_the_check_leaves_envoy_healthy(envoy, standins, new_room):
    """A client that hangs up while the guard waits for LiveKit: the late answer finds no
    stream, and nothing is left hanging or broken for the next requests."""
    room = new_room(limit=2)
    proxy = standins.proxy
    standins.set_delay(1500)
    try:
        with pytest.raises(requests.exceptions.Timeout):
            ask(envoy, "/sfu/get", "legacy", "alice", "A1", room, timeout=0.3)
    finally:
        standins.set_delay(0)
    # The late answer has reached Envoy, after its stream was gone.
    poll(lambda: proxy.answered >= proxy.list_participants_calls, "LiveKit's late answer", 10)
    still_serving(envoy)
    with counting(envoy, standins) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "bob", "B1", room)
    assert_token_issued(resp, room, "legacy", "bob", "B1", standins)
    assert counts.guard == {**CACHED_AND_CHECKED, "allowed": 1}


def test_early_alias_matches_lk_jwt_for_escaped_characters(start_envoy, fault_server, standins):
    """The alias the guard computes before the token exists must be lk-jwt-service's, or every
    check of such a room costs a second ListParticipants call. Synapse cannot create such a room,
    so a fault server in ``ok`` mode plays a Synapse that knows it with a limit."""
    limited = {"state": [{"type": "io.lotus.voice_limit", "state_key": "", "content": {"max_users": 5}}]}
    envoy = start_envoy(synapse=fault_server("ok", body=limited))
    room = "!lt<gt>amp&ls\u2028ps\u2029:test.local"  # Go's json.Marshal escapes each of these
    # With the limit cached, the early question is asked before lk-jwt-service even answers.
    assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    with counting(envoy, standins) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "bob", "B1", room)
    assert_token_issued(resp, room, "legacy", "bob", "B1", standins)
    assert counts.guard == {**CACHED_AND_CHECKED, "allowed": 1}


def test_refusals_are_logged_at_most_once_a_second_and_none_is_lost(start_envoy, standins, new_room):
    """A client retrying against a full room must not flood the log: one info line a second
    (one worker thread here), and the next line counts the refusals not logged, so the lines
    account for every refusal."""
    envoy = start_envoy(concurrency=1)
    room = new_room(limit=1)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    for _ in range(6):
        assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", room))
    time.sleep(1.05)  # past the one-second window, so the next refusal is logged
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "carol", "C1", room))

    def refusal_lines() -> list[str]:
        return [line for line in envoy.log_text().splitlines()
                if f"room {room}: refused @carol:test.local" in line]

    lines = poll(lambda: (found := refusal_lines()) and "more refusals" in found[-1] and found,
                 "the refusal lines", 5)
    untold = sum(int(re.search(r"and (\d+) more refusals", line).group(1))
                 for line in lines if "more refusals" in line)
    assert len(lines) < 7 and len(lines) + untold == 7, lines
