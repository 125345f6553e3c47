"""Moderators in a full room, with the real Synapse's power levels.

A user whose level in ``m.room.power_levels`` reaches the level the room requires to send
``io.lotus.voice_limit`` (and is above the room's default level) is let into a full room, and
then counts like anyone else. The power levels are read only when a room is full; changes show
after the cache's lifetime (``limit_cache_ttl_seconds``, 1 s here).
"""

from __future__ import annotations

import secrets
import time
from typing import Any, Callable

import pytest

from conftest import requires_standins
from guard import CHANNEL_FULL, assert_channel_full, ask, counting, fill_room, poll, user
from stack import LEGACY_SLOT, join_body, livekit_alias, openid_token

pytestmark = requires_standins

TTL_S = 1
POWER = "m.room.power_levels"


@pytest.fixture
def guard(start_envoy: Any, plugin_config: Any) -> Any:
    return start_envoy(plugin_config(limit_cache_ttl_seconds=TTL_S))


@pytest.fixture
def full_call(synapse: Any, standins: Any) -> Callable[..., str]:
    """Factory: a room limited to 1 (``room_version`` optional) with alice in its call."""
    def make(room_version: str | None = None) -> str:
        extra = {"room_version": room_version} if room_version else {}
        room = synapse.create_room(**extra)
        synapse.set_limit(room, 1)
        fill_room(standins, room, "legacy", [("alice", "A1")])
        return room
    return make


def set_levels(synapse: Any, room: str, **changes: Any) -> dict:
    """Changes the room's power levels as its admin would (users merged, other keys replaced)."""
    (event,) = synapse.room_state(room, POWER)
    content = dict(event["content"])
    users = dict(content.get("users", {}))
    users.update(changes.pop("users", {}))
    content.update(users=users, **changes)
    synapse.set_state(room, POWER, content)
    return content


def after_ttl() -> None:
    time.sleep(TTL_S + 0.2)


def counters(envoy: Any) -> dict[str, int]:
    stats = envoy.stats()
    names = ("allowed", "blocked", "exempt_admissions", "power_level_lookups", "fail_open")
    return {name: stats.get(name, 0) for name in names}


def test_a_moderator_joins_a_full_room_and_then_holds_a_place(synapse, guard, full_call, standins):
    room = full_call()
    set_levels(synapse, room, users={user("mod"): 50})
    before = counters(guard)

    assert ask(guard, "/sfu/get", "legacy", "mod", "M1", room).status_code == 200
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "bob", "B1", room))

    after = counters(guard)
    assert after["exempt_admissions"] - before["exempt_admissions"] == 1
    assert after["blocked"] - before["blocked"] == 1
    # One lookup of the room's levels and one of its create event served both refusals.
    assert after["power_level_lookups"] - before["power_level_lookups"] == 2


def test_the_creator_of_a_version_12_room_gets_into_it_when_full(synapse, guard, standins):
    """Room version 12 (Synapse's default) gives the room's creator unlimited power outside
    m.room.power_levels: read from the create event, the creator gets in."""
    password = secrets.token_hex(8)
    owner = synapse.register_user("owner-" + secrets.token_hex(3), password)
    token = synapse.login(owner.split(":")[0][1:], password)
    room = synapse.create_room(token=token)
    (create,) = synapse.room_state(room, "m.room.create")
    assert create["content"].get("room_version") == "12"
    synapse.set_limit(room, 1, token=token)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    owner_name = owner.split(":")[0][1:]
    assert ask(guard, "/sfu/get", "legacy", owner_name, "O1", room).status_code == 200
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "bob", "B1", room))


def test_a_claim_of_the_creator_proven_by_another_servers_token_is_refused(
        synapse, start_envoy, plugin_config, standins):
    """/get_token, decided on the request: a claim of a version-12 room's creator made with an
    OpenID token of another homeserver (example.org) proves nothing about a user of
    test.local, whatever lk-jwt-service checks. The guard decides it as a requester nobody
    verified: not exempt, not counted as the creator, a free place only; the room is full, so
    it is refused before lk-jwt-service sees it. The creator's own claim still gets in."""
    guard = start_envoy(plugin_config(limit_cache_ttl_seconds=TTL_S, decision_phase="request"))
    password = secrets.token_hex(8)
    owner = synapse.register_user("owner-" + secrets.token_hex(3), password)
    token = synapse.login(owner.split(":")[0][1:], password)
    room = synapse.create_room(token=token)
    synapse.set_limit(room, 1, token=token)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    forged = join_body(owner, "O1", room, shape="new", member_id="m-o1")
    forged["openid_token"] = openid_token("@mallory:example.org", "example.org")
    issued_before = standins.jwt.stats()["issued"]
    before = counters(guard)
    with counting(guard) as counts:
        assert_channel_full(guard.post("/get_token", forged))
    assert counts.guard == {"token_requests": 1, "synapse_lookups": 1, "livekit_lookups": 1,
                            "unverified_requesters": 1, "blocked": 1}, counts.guard
    assert standins.jwt.stats()["issued"] == issued_before
    assert counters(guard) == {**before, "blocked": before["blocked"] + 1}
    # The creator, proven by a token of the creator's own server, is exempt.
    owner_name = owner.split(":")[0][1:]
    assert ask(guard, "/get_token", "new", owner_name, "O2", room).status_code == 200
    after = counters(guard)
    assert after["exempt_admissions"] == before["exempt_admissions"] + 1


def test_rooms_with_space_cost_no_power_level_lookup(synapse, guard, new_room, standins):
    room = new_room(limit=3)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    before = counters(guard)
    assert ask(guard, "/sfu/get", "legacy", "bob", "B1", room).status_code == 200
    assert counters(guard)["power_level_lookups"] == before["power_level_lookups"]


def test_a_user_promoted_while_the_room_is_full_gets_in_after_the_ttl(synapse, guard, full_call):
    room = full_call()
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "carol", "C1", room))
    set_levels(synapse, room, users={user("carol"): 100})
    # Within the TTL the levels seen are still served; after it, carol is a moderator.
    after_ttl()
    assert ask(guard, "/sfu/get", "legacy", "carol", "C1", room).status_code == 200


def test_a_demoted_moderator_is_refused(synapse, guard, full_call):
    room = full_call()
    set_levels(synapse, room, users={user("dan"): 50})
    # A refusal reads the levels while dan is a moderator...
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "eve", "E1", room))
    set_levels(synapse, room, users={user("dan"): 0})
    # ...and once they are older than the TTL, his demotion is seen.
    after_ttl()
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "dan", "D1", room))


def test_the_level_to_set_the_limit_and_users_default(synapse, guard, full_call):
    """The threshold is the level needed to send the limit event; users at users_default are
    never exempt, even where that default reaches it."""
    room = full_call()
    set_levels(synapse, room, users={user("erin"): 60, user("fay"): 80},
               events={"io.lotus.voice_limit": 70, POWER: 100, "m.room.name": 50})
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "erin", "E1", room))
    room = full_call()
    set_levels(synapse, room, users={user("fay"): 80},
               events={"io.lotus.voice_limit": 70, POWER: 100})
    assert ask(guard, "/sfu/get", "legacy", "fay", "F1", room).status_code == 200
    # Everyone may set the limit: nobody stands out, nobody is exempt.
    room = full_call()
    set_levels(synapse, room, users={user("gus"): 50}, users_default=50, state_default=50)
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "gus", "G1", room))


def test_the_limit_event_can_name_its_own_threshold(synapse, guard, full_call):
    """``exempt_power_level`` in the limit event replaces the level to send it: here 30, below
    the room's 50, so a user at 40 gets in and one at 20 does not."""
    room = full_call()
    set_levels(synapse, room, users={user("hal"): 40, user("ivy"): 20})
    synapse.set_state(room, "io.lotus.voice_limit", {"max_users": 1, "exempt_power_level": 30})
    assert ask(guard, "/sfu/get", "legacy", "hal", "H1", room).status_code == 200
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "ivy", "I1", room))


def test_an_unusual_power_levels_event_is_read_and_fails_nothing(synapse, guard, full_call):
    """Synapse refuses levels that are not integers (the parser's unit tests cover those), so
    here: negative levels, a limit event anyone above the default may send, and keys of other
    applications holding nested values. Nothing fails, and only a user above the default
    reaches the level."""
    room = full_call()
    set_levels(synapse, room, users={user("kim"): 0, user("lou"): -5}, users_default=-10,
               events={"io.lotus.voice_limit": 0, POWER: 100},
               **{"org.example.custom": {"nested": [1, {"deep": True}]}})
    before = counters(guard)
    assert ask(guard, "/sfu/get", "legacy", "kim", "K1", room).status_code == 200
    assert_channel_full(ask(guard, "/sfu/get", "legacy", "lou", "L1", room))
    after = counters(guard)
    assert after["fail_open"] == before["fail_open"]
    assert after["exempt_admissions"] - before["exempt_admissions"] == 1


def test_a_moderator_gets_in_through_synapses_client_server_route(synapse, start_envoy,
                                                                 plugin_config, livekit,
                                                                 standins):
    """The same on the MatrixRTC route, decided before lk-jwt-service sees the request."""
    envoy = start_envoy(plugin_config(synapse={"hs_token": synapse.appservice.hs_token}),
                        listen_port=synapse.proxy_port)
    accounts = {}
    room = synapse.create_room(preset="public_chat")
    synapse.set_limit(room, 1)
    for name in ("rtc-owner", "rtc-mod", "rtc-guest"):
        localpart, password = f"{name}-{secrets.token_hex(3)}", secrets.token_hex(8)
        accounts[name] = (synapse.register_user(localpart, password), synapse.login(localpart, password))
        synapse.join_room(room, accounts[name][1])
    set_levels(synapse, room, users={accounts["rtc-mod"][0]: 50})
    first = synapse.rtc_token(accounts["rtc-owner"][1], room, "o", standins.livekit_ws_url)
    assert first.status_code == 200, first.text
    livekit.connect(first.json()["jwt"])
    alias = livekit_alias(room, LEGACY_SLOT)
    poll(lambda: len(livekit.livekit.states(alias)) == 1, "the owner in the call", 10)

    mod = synapse.rtc_token(accounts["rtc-mod"][1], room, "m", standins.livekit_ws_url)
    guest = synapse.rtc_token(accounts["rtc-guest"][1], room, "g", standins.livekit_ws_url)

    assert mod.status_code == 200, mod.text
    assert guest.status_code == 403 and guest.content.strip() == CHANNEL_FULL
    assert envoy.stats().get("exempt_admissions") == 1
