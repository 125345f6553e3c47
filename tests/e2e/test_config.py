"""The plugin configuration as operators write it: a bad one stops Envoy with a log line that
names the key, secrets may come from the environment, and no secret is ever logged."""

from __future__ import annotations

import pytest

from conftest import requires_standins, requires_wasm
from guard import ask, assert_channel_full, counting, fill_room
from stack import DELETE, LIVEKIT_SECRET, rejection_lines

pytestmark = [requires_wasm]

UNSET_VARIABLE = "VLG_TEST_VARIABLE_THAT_IS_NOT_SET"

# (overrides of the default configuration, text the refusal must name)
BAD_CONFIGS = {
    "missing_synapse": ({"synapse": DELETE}, "synapse is required"),
    "missing_admin_token": ({"synapse": {"admin_token": DELETE}}, "synapse.admin_token"),
    "missing_synapse_cluster": ({"synapse": {"cluster": DELETE}}, "synapse.cluster"),
    "missing_livekit_cluster": ({"livekit": {"cluster": DELETE}}, "livekit.cluster"),
    "missing_api_key": ({"livekit": {"api_key": DELETE}}, "livekit.api_key"),
    "missing_api_secret": ({"livekit": {"api_secret": DELETE}}, "livekit.api_secret"),
    "empty_cluster": ({"synapse": {"cluster": ""}}, "synapse.cluster"),
    "unknown_key": ({"max_users": 3}, "max_users"),
    "unknown_nested_key": ({"livekit": {"url": "ws://x"}}, "livekit.url"),
    "timeout_as_string": ({"synapse": {"timeout_ms": "500"}}, "synapse.timeout_ms"),
    "negative_ttl": ({"limit_cache_ttl_seconds": -1}, "limit_cache_ttl_seconds"),
    "ttl_as_float": ({"limit_cache_ttl_seconds": 1.5}, "limit_cache_ttl_seconds"),
    "secret_as_number": ({"livekit": {"api_secret": 12345}}, "livekit.api_secret"),
    "section_as_string": ({"livekit": "livekit"}, "livekit"),
    "token_paths_as_string": ({"token_paths": "/sfu/get"}, "token_paths"),
    "token_path_without_slash": ({"token_paths": ["sfu/get"]}, "token_paths"),
    "empty_token_paths": ({"token_paths": []}, "token_paths"),
    "failure_mode_maybe": ({"failure_mode": "maybe"}, "failure_mode"),
    "failure_mode_wrong_case": ({"failure_mode": "Open"}, "failure_mode"),
    "empty_state_type": ({"limit_state_type": ""}, "limit_state_type"),
    "env_variable_not_set": ({"livekit": {"api_secret": DELETE, "api_secret_env": UNSET_VARIABLE}},
                             "livekit.api_secret_env"),
    "secret_given_twice": ({"synapse": {"admin_token_env": "VLG_ADMIN_TOKEN"}}, "synapse.admin_token"),
}


def _no_upstreams() -> dict:
    """Upstreams for an Envoy that is expected never to serve: closed loopback ports."""
    return {"lk_jwt": ("127.0.0.1", 1), "synapse": ("127.0.0.1", 1), "livekit": ("127.0.0.1", 1)}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_configuration_stops_envoy_naming_the_key(start_envoy, plugin_config, synapse, case):
    overrides, named = BAD_CONFIGS[case]
    log = start_envoy(plugin_config(**overrides), expect_rejection=True,
                      env={"VLG_ADMIN_TOKEN": "x"}, **_no_upstreams())
    reasons = [line for line in rejection_lines(log) if "configuration rejected" in line]
    assert len(reasons) >= 1, log[-3000:]
    assert named in reasons[0]
    assert synapse.admin_token not in log
    assert LIVEKIT_SECRET not in log


@pytest.mark.parametrize("text, named", [
    ("{", "not valid JSON"), ("[]", "configuration"), ("", "not valid JSON")],
    ids=["truncated_json", "array", "empty"])
def test_unreadable_configuration_stops_envoy(start_envoy, text, named):
    log = start_envoy(text, expect_rejection=True, **_no_upstreams())
    assert any(named in line for line in rejection_lines(log)), log[-3000:]


# --------------------------------------------------------------------------- secrets


def secret_env(synapse) -> dict[str, str]:
    return {"VLG_ADMIN_TOKEN": synapse.admin_token, "VLG_LK_KEY": "devkey",
            "VLG_LK_SECRET": LIVEKIT_SECRET}


def config_from_env(plugin_config) -> dict:
    return plugin_config(
        synapse={"admin_token": DELETE, "admin_token_env": "VLG_ADMIN_TOKEN"},
        livekit={"api_key": DELETE, "api_key_env": "VLG_LK_KEY",
                 "api_secret": DELETE, "api_secret_env": "VLG_LK_SECRET"})


def exercise(envoy, standins, new_room) -> None:
    """Every path that logs: allowed, blocked, no limit, unknown room, and a failed check."""
    room = new_room(limit=1)
    assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    fill_room(standins, room, "legacy", [("alice", "A1")])
    assert_channel_full(ask(envoy, "/sfu/get", "legacy", "bob", "B1", room))
    assert ask(envoy, "/get_token", "new", "bob", "B1", new_room()).status_code == 200
    assert ask(envoy, "/sfu/get", "legacy", "bob", "B1", "!nowhere:test.local").status_code == 200
    assert envoy.post("/sfu/get", b"{nope").status_code == 400


@requires_standins
def test_secrets_from_environment_work(start_envoy, standins, plugin_config, synapse, new_room):
    """``*_env`` keys read secrets that Envoy hands to the VM, and the checks work with them."""
    envoy = start_envoy(config_from_env(plugin_config), env=secret_env(synapse))
    with counting(envoy, standins) as counts:
        exercise(envoy, standins, new_room)
    assert counts.guard["blocked"] == 1
    assert "fail_open" not in counts.guard


def envoys_own_dump(line: str, secrets_in: str) -> bool:
    """Lines where Envoy itself, not the filter, prints a secret at debug level.

    Envoy's router dumps the headers of every outgoing request, so the Bearer header of the
    Synapse lookup shows up as ``'authorization', 'Bearer ...'``; and with secrets written
    into the configuration, Envoy's config dumps show them (which is why ``*_env`` exists).
    Operators must not run Envoy at debug level where its log is not as protected as the
    secrets; the filter cannot prevent these.
    """
    if line.startswith("'authorization', 'Bearer "):
        return True
    return secrets_in == "configuration" and "][debug][config]" in line and " config: {" in line


@pytest.mark.check_fails
@requires_standins
@pytest.mark.parametrize("secrets_in", ["environment", "configuration"])
def test_no_secret_in_the_debug_log(start_envoy, standins, plugin_config, synapse, new_room,
                                    fault_server, secrets_in):
    """The filter never logs the admin token or the LiveKit secret, at debug level, on any path
    including failed checks (a LiveKit that answers garbage, a Synapse that answers 502). The LiveKit secret is never sent
    anywhere, so with secrets from the environment it appears nowhere in Envoy's log."""
    if secrets_in == "environment":
        config, env = config_from_env(plugin_config), secret_env(synapse)
    else:
        config, env = plugin_config(), None
    envoy = start_envoy(config, env=env, log_level="debug")
    exercise(envoy, standins, new_room)

    broken = start_envoy(config, env=env, log_level="debug", livekit=fault_server("garbage"))
    room = new_room(limit=1)
    assert ask(broken, "/sfu/get", "legacy", "alice", "A1", room).status_code == 200
    assert broken.stats()["fail_open"] == 1

    # A failing Synapse lookup (the call that carries the admin token) logs no secret either.
    no_synapse = start_envoy(config, env=env, log_level="debug",
                             synapse=fault_server("status", status=502))
    assert ask(no_synapse, "/sfu/get", "legacy", "alice", "A1", "!down:test.local").status_code == 200
    assert no_synapse.stats()["fail_open"] == 1

    for proxy in (envoy, broken, no_synapse):
        proxy.stop()  # Envoy buffers its log file; stopping flushes it
        lines = proxy.log_text().splitlines()
        filter_lines = [line for line in lines if "wasm log voice_limit_guard" in line]
        assert filter_lines, "the filter logged nothing"
        for name, value in (("admin token", synapse.admin_token), ("LiveKit secret", LIVEKIT_SECRET)):
            leaks = [line for line in lines if value in line and not envoys_own_dump(line, secrets_in)]
            assert not leaks, f"{name} in {proxy.log_path}:\n" + "\n".join(leaks[:5])
            assert not [line for line in filter_lines if value in line]


# --------------------------------------------------------------------------- the example configuration


EXAMPLE_ENV = {"SYNAPSE_ADMIN_TOKEN": "syt_example", "LK_JWT_HS_TOKEN": "hs_example",
               "LIVEKIT_KEY": "devkey", "LIVEKIT_SECRET": "example-secret"}


def test_example_configuration_validates_and_a_broken_copy_does_not(tmp_path):
    """``envoy --mode validate`` runs the plugin's on_configure: the shipped example passes, and
    the same file with a bad ``failure_mode`` fails naming the key."""
    from stack import REPO, Envoy

    example = REPO / "envoy" / "envoy.yaml"
    if not example.exists():
        pytest.skip(f"{example} not written yet")
    ok, output = Envoy.validate(example, env=EXAMPLE_ENV, cwd=REPO)
    assert ok, output

    text = example.read_text()
    assert '"failure_mode": "open"' in text
    broken = tmp_path / "envoy.yaml"
    broken.write_text(text.replace('"failure_mode": "open"', '"failure_mode": "maybe"'))
    ok, output = Envoy.validate(broken, env=EXAMPLE_ENV, cwd=REPO)
    assert not ok
    assert "failure_mode" in output

    ok, output = Envoy.validate(example, env={k: v for k, v in EXAMPLE_ENV.items() if k != "LIVEKIT_SECRET"},
                                cwd=REPO)
    assert not ok
    assert "LIVEKIT_SECRET" in output


def _wasm_filter(document: dict) -> dict:
    """The Wasm HTTP filter's ``config`` in an Envoy bootstrap or an Istio EnvoyFilter."""
    if document.get("kind") == "EnvoyFilter":
        return document["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
    hcm = document["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    wasm = next(f for f in hcm["typed_config"]["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    return wasm["typed_config"]["config"]


def test_istio_example_matches_the_validated_envoy_example(tmp_path):
    """deploy/istio/envoyfilter-file.yaml cannot be run here (no Istio); it must set the same Wasm
    filter as envoy/envoy.yaml, and its plugin configuration must pass the filter's checks."""
    import json

    import yaml

    from stack import REPO, Envoy

    envoy_example = yaml.safe_load((REPO / "envoy" / "envoy.yaml").read_text())
    istio_example = yaml.safe_load((REPO / "deploy" / "istio" / "envoyfilter-file.yaml").read_text())
    plain, istio = _wasm_filter(envoy_example), _wasm_filter(istio_example)
    assert istio["allow_on_headers_stop_iteration"] is True
    for key in ("name", "root_id", "failure_policy"):
        assert istio[key] == plain[key]
    assert istio["vm_config"]["environment_variables"] == plain["vm_config"]["environment_variables"]
    plain_plugin = json.loads(plain["configuration"]["value"])
    istio_plugin = json.loads(istio["configuration"]["value"])
    for upstream in ("synapse", "livekit"):
        for key in ("cluster", "authority"):
            plain_plugin[upstream].pop(key, None)
            istio_plugin[upstream].pop(key, None)
    # LiveKit's webhooks reach one pod of a Service: the Istio examples, made for any number of
    # replicas, leave them off (docs/security.md#livekits-webhooks).
    assert "webhooks" not in istio_plugin
    plain_plugin.pop("webhooks")
    assert istio_plugin == plain_plugin

    # The Istio plugin configuration, run through the filter's on_configure by Envoy itself.
    text = (REPO / "envoy" / "envoy.yaml").read_text()
    start = text.index("value: |") + len("value: |")
    end = text.index("- name: envoy.filters.http.router")
    indent = " " * 20
    istio_value = "\n".join(indent + line for line in istio["configuration"]["value"].splitlines())
    patched = tmp_path / "envoy.yaml"
    patched.write_text(text[:start] + "\n" + istio_value + "\n          " + text[end:])
    ok, output = Envoy.validate(patched, env=EXAMPLE_ENV, cwd=REPO)
    assert ok, output
