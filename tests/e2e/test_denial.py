"""Nobody turns the guard against the people it serves: a request cut short holds no place, one
account's fresh OpenID tokens hold one, and a user in the call before the guard knew them is
not locked out of it. Each test runs the attack against real Envoy, Synapse and LiveKit and then
asks as the next legitimate user does."""

from __future__ import annotations

import json
import time

import h2c
from conftest import requires_standins, requires_wasm
from guard import assert_channel_full, assert_token_issued, ask, counting, fill_room, module_envoy
from stack import wait_until

pytestmark = [requires_wasm, requires_standins]

envoy, _log_on_failure = module_envoy("denial")


def made_up_claim(name: str, room: str) -> bytes:
    """A `/get_token` body of a client with no account: a claim nobody can prove, and an
    OpenID token nobody issued."""
    return json.dumps({
        "room_id": room, "slot_id": "m.call#ROOM",
        "openid_token": {"access_token": f"made-up-{name}", "token_type": "Bearer",
                         "matrix_server_name": "test.local", "expires_in": 3600},
        "member": {"id": f"m-{name}", "claimed_user_id": f"@{name}:test.local",
                   "claimed_device_id": "D"},
    }).encode()


def test_requests_cut_short_before_their_token_hold_no_place(start_envoy, plugin_config,
                                                             fault_server, new_room, standins):
    """Mallory, without an account, sends `/get_token` requests with made-up claims into an
    empty room limited to 2 while lk-jwt-service is slow to answer, and resets each stream
    once the guard let it go on with a place. Each place is given back at the reset (before, it was held
    for `reservation_seconds`): alice, asking next, gets her token."""
    lk_jwt = fault_server("slow", upstream=standins.jwt_address, delay=2.0)
    proxy = start_envoy(plugin_config(), lk_jwt=lk_jwt)
    room = new_room(limit=2)
    with counting(proxy) as counts:
        for n, name in enumerate(["mallory1", "mallory2"], 1):
            # Reset once the guard let the request go on with a place (lk-jwt-service sees the
            # headers of every request at once, so its hits say nothing of the decision).
            reached = lambda n=n: wait_until(lambda: proxy.stats().get("allowed", 0) >= n,
                                             "the guard admitted it", 10)
            assert h2c.request(proxy.address, "POST", "/get_token", made_up_claim(name, room),
                               reset=True, reset_when=reached) is None
        wait_until(lambda: proxy.stats().get("abandoned_reservations", 0) >= 2,
                   "both places given back", 10)
        resp = ask(proxy, "/get_token", "new", "alice", "A1", room, timeout=30)
        # (Through the slow relay, whose headers are its own.)
        assert resp.status_code == 200 and resp.json()["jwt"], resp.text
    assert counts.guard["abandoned_reservations"] == 2, counts.guard
    assert counts.guard["allowed"] == 3, counts.guard


def test_a_request_cut_short_in_a_victims_name_does_not_make_the_victim_cool(
        start_envoy, plugin_config, fault_server, new_room, standins):
    """Mallory sends a `/get_token` claiming alice with a made-up OpenID token into a room
    limited to 1, and resets it once the guard let it go on to a slow lk-jwt-service. Had the place stayed
    held until `reservation_seconds` ran out, the lapse would have been alice's, and alice,
    asking for the room's last place, would have been refused as cooling down. The place was
    given back at the reset and no token ever reached alice: she gets in."""
    lk_jwt = fault_server("slow", upstream=standins.jwt_address, delay=1.0)
    proxy = start_envoy(plugin_config(reservation_seconds=1), lk_jwt=lk_jwt)
    room = new_room(limit=1)
    body = json.loads(made_up_claim("alice", room))
    body["member"]["id"] = "m-alice-A1"
    body["member"]["claimed_device_id"] = "A1"
    reached = lambda: wait_until(lambda: proxy.stats().get("allowed", 0) >= 1,
                                 "the guard admitted it", 10)
    with counting(proxy) as counts:
        assert h2c.request(proxy.address, "POST", "/get_token", json.dumps(body).encode(),
                           reset=True, reset_when=reached) is None
        # Once the reservation time is over (the decision on alice's request settles what
        # lapsed by then), alice asks.
        time.sleep(1.5)
        resp = ask(proxy, "/get_token", "new", "alice", "A1", room, timeout=30)
        assert resp.status_code == 200 and resp.json()["jwt"], resp.text
    assert "cooling_refusals" not in counts.guard, counts.guard


def fresh_token_of(user: str, nonce: int, device: str, room: str) -> dict:
    """A `/sfu/get` body with a fresh OpenID token of ``user`` (of another homeserver), as
    `/openid/request_token` mints one per request."""
    server = user.split(":", 1)[1]
    return {"room": room, "device_id": device,
            "openid_token": {"access_token": f"openid:{user}#{nonce}", "token_type": "Bearer",
                             "matrix_server_name": server, "expires_in": 3600}}


def test_fresh_openid_tokens_of_one_remote_account_hold_one_place(start_envoy, plugin_config,
                                                                  new_room, standins):
    """Mallory, an account of another homeserver, mints a fresh OpenID token for each of three
    `/sfu/get` requests into a room limited to 3 with alice in the call. Nobody here can verify
    her tokens, so each is decided for her server's stand-in; the token lk-jwt-service issues
    names her, and the place becomes hers. She holds one place, not three: bob gets the third,
    carol is refused (before, bob was refused and mallory's third token too)."""
    proxy = start_envoy(plugin_config(synapse={"server_name": "test.local"}))
    room = new_room(limit=3)
    fill_room(standins, room, "legacy", [("alice", "A1")])
    with counting(proxy) as counts:
        for nonce in (1, 2, 3):
            resp = proxy.post("/sfu/get", fresh_token_of("@mallory:example.org", nonce,
                                                         f"D{nonce}", room))
            assert resp.status_code == 200, (nonce, resp.text)
        resp = ask(proxy, "/sfu/get", "legacy", "bob", "B1", room)
        assert_token_issued(resp, room, "legacy", "bob", "B1", standins)
        assert_channel_full(ask(proxy, "/sfu/get", "legacy", "carol", "C1", room))
    assert counts.guard["rekeyed_reservations"] == 3, counts.guard
    assert counts.guard["unverified_requesters"] == 3, counts.guard


def test_a_user_in_the_call_before_the_limit_gets_back_in(envoy, new_room, standins):
    """Alice (two devices) and bob were in the call before the room had a limit, or before
    this Envoy started: the guard never saw their hashed identities admitted. With the room
    limited to 3, bob reconnecting with the same member id is bob, not a fourth user, and so
    is each of alice's devices (before, all three were refused)."""
    room = new_room(limit=3)
    fill_room(standins, room, "new", [("alice", "A1"), ("alice", "A2"), ("bob", "B1")])
    for who, device in [("bob", "B1"), ("alice", "A1"), ("alice", "A2")]:
        resp = ask(envoy, "/get_token", "new", who, device, room)
        assert_token_issued(resp, room, "new", who, device, standins)
