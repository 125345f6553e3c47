"""The misconfigurations docs/operations.md's troubleshooting table lists, each with the log line
or counter it says an operator will see. (A secret whose variable the VM cannot see and a
LiveKit key LiveKit rejects are shown by test_config.py::test_bad_configuration_stops_envoy_naming_the_key
[env_variable_not_set] and test_livekit.py::test_a_rejected_admin_token_is_a_counted_failure.)"""

from __future__ import annotations

import secrets
import time

import pytest

from conftest import requires_standins, requires_wasm
from guard import ask, counting, poll

pytestmark = [requires_wasm, requires_standins]


@pytest.mark.check_fails
def test_a_wrong_cluster_name_fails_open_and_names_the_cluster(start_envoy, plugin_config, new_room):
    envoy = start_envoy(plugin_config(synapse={"cluster": "synapse-typo"}))
    with counting(envoy) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "alice", "A1", new_room(limit=1))
    assert resp.status_code == 200
    assert counts.guard.get("fail_open") == 1
    poll(lambda: "call to cluster synapse-typo could not be made" in envoy.log_text(),
         "the log line naming the cluster", 5)


@pytest.mark.check_fails
def test_an_admin_token_without_admin_rights_fails_open_with_synapses_403(
        start_envoy, plugin_config, synapse, new_room):
    localpart, password = f"not-admin-{secrets.token_hex(3)}", secrets.token_hex(8)
    synapse.register_user(localpart, password)
    token = synapse.login(localpart, password)
    envoy = start_envoy(plugin_config(synapse={"admin_token": token}))
    room = new_room(limit=1)
    with counting(envoy) as counts:
        resp = ask(envoy, "/sfu/get", "legacy", "alice", "A1", room)
    assert resp.status_code == 200
    assert counts.guard.get("fail_open") == 1
    poll(lambda: f"room {room}: limit lookup failed: Synapse answered HTTP 403" in envoy.log_text(),
         "the failure's log line", 5)


def test_decision_phase_response_without_the_envoy_setting_stalls(start_envoy, plugin_config,
                                                                  new_room):
    """`decision_phase: response` in a host that leaves allow_on_headers_stop_iteration out (a
    WasmPlugin, Envoy Gateway): every token request waits for the stream idle timeout, then
    504 "stream timeout"; rooms without a limit too. The default needs no setting."""
    idle = 2.0
    stalled = start_envoy(plugin_config(decision_phase="response"), stop_iteration=False,
                          stream_idle_timeout=idle, route_timeout="1s")
    started = time.monotonic()
    resp = ask(stalled, "/sfu/get", "legacy", "alice", "A1", new_room(), timeout=30)
    took = time.monotonic() - started
    assert (resp.status_code, resp.text) == (504, "stream timeout")
    assert idle - 0.5 <= took <= idle + 5
    default = start_envoy(plugin_config(), stop_iteration=False, stream_idle_timeout=idle)
    started = time.monotonic()
    assert ask(default, "/sfu/get", "legacy", "alice", "A1", new_room()).status_code == 200
    assert time.monotonic() - started < 1.0
