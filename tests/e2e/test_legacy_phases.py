"""Where the legacy routes (``/sfu/get``, ``/get_token``) are decided, and what each phase costs
lk-jwt-service: decided on the request (the default), a refusal never reaches it; decided on
the response, it has issued the token the guard then replaces.

Runs in both deployments of ``make test-e2e`` (``stack.DECISION_PHASE``) and asserts what the
phase in force promises; the real lk-jwt-service stand-in counts what reached it."""

from __future__ import annotations

import pytest

from conftest import requires_standins, requires_wasm
from guard import SHAPES, ask, assert_channel_full, counting, module_envoy, token_body, user
from stack import DECISION_PHASE

pytestmark = [requires_wasm, requires_standins]

envoy, _log_on_failure = module_envoy("legacy-phases")


def legacy_tokens(stats: dict) -> int:
    return stats["issued"].get("legacy", 0)


@pytest.mark.parametrize("path, shape", SHAPES)
def test_a_refusal_costs_lk_jwt_service_a_token_only_when_decided_on_the_response(
        envoy, standins, full_room, real_lk_jwt, path, shape):
    """Carol asks for the full room: 403 either way. Decided on the request, lk-jwt-service
    never got her body (its handler may have started on the headers), so it issued nothing;
    decided on the response, it had already issued her the token the guard replaced."""
    before = real_lk_jwt.stats()
    with counting(envoy, standins) as counts:
        assert_channel_full(ask(envoy, path, shape, "carol", "C1", full_room))
    after = real_lk_jwt.stats()
    assert counts.guard["blocked"] == 1
    issued = legacy_tokens(after) - legacy_tokens(before)
    assert issued == (0 if DECISION_PHASE == "request" else 1)


def test_a_false_claim_on_get_token_gets_no_token(envoy, standins, new_room, real_lk_jwt):
    """``/get_token`` decided on the request counts the claimed user. Mallory claims to be
    alice, who is in the call, to slip into the full room: the guard lets the request on as
    alice's, and lk-jwt-service (0.4.0+) refuses it, as her OpenID token proves she is not."""
    room = new_room(limit=1)
    alice = ask(envoy, "/get_token", "new", "alice", "A1", room)
    assert alice.status_code == 200
    standins.connect(alice)
    body = token_body_claiming("mallory", "M1", room, claimed="alice")
    before = real_lk_jwt.stats()
    with counting(envoy, standins) as counts:
        resp = envoy.post("/get_token", body)
    assert resp.status_code in (401, 403), resp.text
    assert "jwt" not in resp.text
    assert legacy_tokens(real_lk_jwt.stats()) == legacy_tokens(before)
    assert "fail_open" not in counts.guard


def token_body_claiming(who: str, device: str, room: str, claimed: str) -> dict:
    body = token_body("new", who, device, room)
    body["member"]["claimed_user_id"] = user(claimed)
    return body


def test_sfu_get_asks_synapse_who_asks_only_for_limited_rooms(envoy, standins, new_room):
    """Decided on the request, ``/sfu/get``'s OpenID token is shown to Synapse (or found among
    the tokens it vouched for before) once per request into a limited room, and not at all for
    a room without a limit."""
    limited, unlimited = new_room(limit=3), new_room()
    stats_before = envoy.stats()
    for room in (limited, unlimited):
        assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    after = envoy.stats()
    # Asked of Synapse, or known from an earlier request with the same token.
    known = sum(after.get(k, 0) - stats_before.get(k, 0)
                for k in ("openid_lookups", "openid_cache_hits"))
    assert known == (1 if DECISION_PHASE == "request" else 0)
