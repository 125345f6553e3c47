"""Envoy running envoy/envoy-ecds.yaml, and what it takes to watch a filter being replaced under
load: the ECDS file published with envoy/ecds_publish.py, Envoy's ECDS and Wasm runtime
statistics, a module with other bytes and the same code, and a bounded token-request load
that records every answer in order.

No test-framework imports, like :mod:`stack`.
"""

from __future__ import annotations

import http.client as httpclient
import importlib.util
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml  # PyYAML: a dependency of Synapse, so in the test virtualenv

from stack import (
    LIVEKIT_KEY,
    LIVEKIT_SECRET,
    REPO,
    Envoy,
    StackError,
    _socket_address,
    envoy_binary,
    http,
    wait_until,
)

ECDS_BOOTSTRAP = REPO / "envoy" / "envoy-ecds.yaml"
ECDS_RESOURCE = REPO / "envoy" / "ecds" / "voice_limit_guard.yaml"
PUBLISHER = REPO / "envoy" / "ecds_publish.py"
FILTER = "voice_limit_guard"
ECDS_PREFIX = f"extension_config_discovery.http_filter.{FILTER}."
V8_PREFIX = "wasm.envoy.wasm.runtime.v8."


def load_publisher() -> Any:
    """envoy/ecds_publish.py as a module, for edits it does not offer, written its way."""
    spec = importlib.util.spec_from_file_location("ecds_publish", PUBLISHER)
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


publisher = load_publisher()


# --------------------------------------------------------------------------- modules


def _leb128(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def rebuilt_module(source: Path, target: Path, label: str) -> Path:
    """A copy of ``source`` with a custom section appended: other bytes (so Envoy, which keys
    its VMs by the module's content, loads it as a new module and replaces every VM), the same
    code (custom sections are not executed), hence the same decisions before and after."""
    name = b"voice-limit-guard.build"
    payload = _leb128(len(name)) + name + label.encode()
    section = b"\x00" + _leb128(len(payload)) + payload  # id 0: a custom section
    target.write_bytes(source.read_bytes() + section)
    return target


# --------------------------------------------------------------------------- Envoy with ECDS


class EcdsEnvoy(Envoy):
    """Envoy running envoy/envoy-ecds.yaml with its filter from a copy of envoy/ecds/.

    Only what a test stack must change is changed: ports (0: chosen by the kernel), cluster
    addresses, the watched path (a per-test copy) and the module (the build under test,
    published into a per-test directory with ecds_publish.py). ``settings`` are configuration
    settings published on top of the shipped ones before Envoy starts.
    """

    def __init__(self, lk_jwt: Any, synapse: Any, livekit: Any, admin_token: str,
                 settings: dict[str, Any] | None = None, name: str = "envoy-ecds", **options: Any):
        env = {"SYNAPSE_ADMIN_TOKEN": admin_token, "LK_JWT_HS_TOKEN": "hs_token_unused_here",
               "LIVEKIT_KEY": LIVEKIT_KEY,
               "LIVEKIT_SECRET": LIVEKIT_SECRET}
        super().__init__(lk_jwt=lk_jwt, synapse=synapse, livekit=livekit, env=env, name=name, **options)
        self.resource_path = self.dir / "ecds" / "voice_limit_guard.yaml"
        self.module_dir = self.dir / "modules"
        self.settings = dict(settings or {})
        self.last_publish_output = ""

    def bootstrap(self) -> dict:
        config = yaml.safe_load(ECDS_BOOTSTRAP.read_text())
        config["admin"]["address"] = _socket_address("127.0.0.1", 0)
        listener = config["static_resources"]["listeners"][0]
        listener["name"] = "main"  # what Envoy._listener_port looks for
        listener["address"] = _socket_address("127.0.0.1", 0)
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        (guard,) = [f for f in hcm["http_filters"] if "config_discovery" in f]
        guard["config_discovery"]["config_source"]["path_config_source"]["path"] = str(self.resource_path)
        for cluster in config["static_resources"]["clusters"]:
            host, port = self.clusters[cluster["name"]]
            endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
            endpoint["address"] = _socket_address(host, port)
        return config

    def write_config(self) -> Path:
        self.resource_path.parent.mkdir(parents=True, exist_ok=True)
        self.resource_path.write_text(ECDS_RESOURCE.read_text())
        status = self.publish(wasm=self.wasm_path, settings=self.settings)
        if status != 0:
            raise StackError(f"publishing the initial filter failed:\n{self.last_publish_output}")
        return super().write_config()

    # publishing -----------------------------------------------------------------------------

    def publish(self, wasm: Path | None = None, settings: dict[str, Any] | None = None,
                unset: tuple[str, ...] = (), validate: bool = False) -> int:
        """Run ecds_publish.py on this Envoy's ECDS file as an operator would: a process of its
        own, beside Envoy, with Envoy's environment. Returns its exit status; its output is kept
        in ``last_publish_output``."""
        argv = [sys.executable, str(PUBLISHER), "--resource", str(self.resource_path),
                "--module-dir", str(self.module_dir), "--envoy", envoy_binary()]
        if wasm is not None:
            argv += ["--wasm", str(wasm)]
        for key, value in (settings or {}).items():
            argv += ["--set", f"{key}={json.dumps(value)}"]
        for key in unset:
            argv += ["--unset", key]
        if validate:
            argv.append("--validate")
        result = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                                env={**os.environ, **self.env})
        self.last_publish_output = result.stdout + result.stderr
        return result.returncode

    def resource(self) -> dict:
        return yaml.safe_load(self.resource_path.read_text())

    def rewrite(self, change: Callable[[dict], None]) -> int:
        """Change the ECDS resource in a way ecds_publish.py does not offer (``change`` edits the
        parsed document), and put it in place the same way: a new file renamed onto the path."""
        document = self.resource()
        change(document)
        document["version_info"] = publisher.version_of(document)
        publisher._write_atomically(self.resource_path, publisher.dump(document).encode())
        return 0

    def swap(self, **publish_args: Any) -> "Swap":
        """Publish and wait until Envoy has applied or rejected it (see :class:`Swap`)."""
        return Swap(self).run(lambda: self.publish(**publish_args))

    # observation ----------------------------------------------------------------------------

    def runtime_stats(self) -> dict[str, Any]:
        """Envoy's ECDS statistics for the filter (short names: ``config_reload``,
        ``config_fail``, ``version_text``...) and its V8 VM counts (``v8.created``,
        ``v8.active``)."""
        resp = http().get(f"{self.admin_url}/stats", timeout=5, params={
            "format": "json",
            "filter": rf"^({ECDS_PREFIX}|{V8_PREFIX})".replace(".", r"\.")})
        resp.raise_for_status()
        values: dict[str, Any] = {}
        for stat in resp.json().get("stats", []):
            name, value = stat.get("name", ""), stat.get("value")
            if value is None:
                continue
            if name.startswith(ECDS_PREFIX):
                values[name[len(ECDS_PREFIX):]] = value
            elif name.startswith(V8_PREFIX):
                values["v8." + name[len(V8_PREFIX):]] = value
        return values

    def served_module(self) -> str:
        """The module file of the filter Envoy reports (``/config_dump``)."""
        config = self.served_filter()["ecds_filter"]["typed_config"]["config"]
        return config["vm_config"]["code"]["local"]["filename"]

    def served_filter(self) -> dict:
        """The filter configuration Envoy reports as its ECDS resource (``/config_dump``)."""
        resp = http().get(f"{self.admin_url}/config_dump", params={"resource": "ecds_filters"}, timeout=5)
        resp.raise_for_status()
        (config,) = resp.json()["configs"]
        return config


@dataclass
class Swap:
    """One publication and what Envoy made of it.

    ``published_at`` is taken just before the rename, ``settled_at`` when Envoy's statistics
    first showed the outcome (``config_reload`` counts an update once every worker has it;
    ``config_fail`` counts a rejected one); both are ``time.monotonic()`` readings, used only
    to order requests relative to the swap.
    """

    envoy: EcdsEnvoy
    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    published_at: float = 0.0
    settled_at: float = 0.0
    status: int | None = None

    def run(self, publish: Callable[[], int], timeout: float = 60.0) -> "Swap":
        self.before = self.envoy.runtime_stats()
        self.published_at = time.monotonic()
        self.status = publish()
        assert self.status == 0, f"publishing exited with {self.status}: {self.envoy.last_publish_output}"

        def settled() -> dict | None:
            now = self.envoy.runtime_stats()
            changed = (now.get("config_reload", 0) > self.before.get("config_reload", 0)
                       or now.get("config_fail", 0) > self.before.get("config_fail", 0))
            return now if changed else None

        self.after = wait_until(settled, "Envoy to apply or reject the published filter", timeout,
                                self.envoy.process, interval=0.01)
        self.settled_at = time.monotonic()
        return self

    def delta(self, name: str) -> int:
        assert self.before is not None and self.after is not None
        return int(self.after.get(name, 0)) - int(self.before.get(name, 0))


# --------------------------------------------------------------------------- load


@dataclass(frozen=True)
class Kind:
    """One kind of request in the load: where it goes, its body and the answer it must get."""

    name: str
    path: str
    body: bytes
    status: int
    check: Callable[[bytes], bool]


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    status: int | None
    ok: bool
    error: str | None = None


class TokenLoad:
    """A bounded load of token requests: ``threads`` threads, together at most ``rate`` requests
    a second, each thread cycling through the kinds. Half the threads keep one connection alive,
    the others open a new connection for every request, so both a stream on a long-lived
    connection and a fresh connection meet the swap. Every answer is recorded."""

    def __init__(self, address: tuple[str, int], kinds: list[Kind], threads: int = 4,
                 rate: float = 300.0, timeout: float = 30.0):
        self.address = address
        self.kinds = kinds
        self.threads = threads
        self.interval = threads / rate
        self.timeout = timeout
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._workers: list[threading.Thread] = []
        self.started_at = 0.0
        self.stopped_at = 0.0
        self.crashed: BaseException | None = None

    def __enter__(self) -> "TokenLoad":
        self.started_at = time.monotonic()
        for index in range(self.threads):
            thread = threading.Thread(target=self._run, args=(index, index % 2 == 0),
                                      name=f"load-{index}", daemon=True)
            self._workers.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for thread in self._workers:
            thread.join(timeout=self.timeout + 5)
        self.stopped_at = time.monotonic()

    def _run(self, index: int, keep_alive: bool) -> None:
        try:
            self._send_until_stopped(index, keep_alive)
        except BaseException as exc:  # a bug in the load itself: stop waiting for answers
            self.crashed = exc
            raise

    def _send_until_stopped(self, index: int, keep_alive: bool) -> None:
        conn: httpclient.HTTPConnection | None = None
        next_at = time.monotonic()
        step = index
        while not self._stop.is_set():
            kind = self.kinds[step % len(self.kinds)]
            step += 1
            if conn is None:
                conn = httpclient.HTTPConnection(*self.address, timeout=self.timeout)
            start = time.monotonic()
            try:
                conn.request("POST", kind.path, body=kind.body, headers={
                    "Content-Type": "application/json",
                    **({} if keep_alive else {"Connection": "close"})})
                resp = conn.getresponse()
                body = resp.read()
                outcome = Outcome(kind.name, start, time.monotonic(), resp.status,
                                  resp.status == kind.status and kind.check(body))
                if not keep_alive or resp.will_close:
                    conn.close()
                    conn = None
            except (OSError, httpclient.HTTPException) as exc:
                outcome = Outcome(kind.name, start, time.monotonic(), None, False, repr(exc))
                conn.close()
                conn = None
            self.outcomes.append(outcome)
            # Pacing only bounds the load; nothing is decided by how long anything took.
            next_at = max(next_at + self.interval, time.monotonic() - self.interval)
            self._stop.wait(max(0.0, next_at - time.monotonic()))
        if conn is not None:
            conn.close()

    # reading the record ---------------------------------------------------------------------

    def completed(self) -> int:
        return len(self.outcomes)

    def started_after(self, moment: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if o.start > moment]

    def wait_for(self, count: int, after: float, what: str, timeout: float = 120.0) -> None:
        """Wait until ``count`` requests that started after ``after`` have been answered."""
        def enough() -> bool:
            if self.crashed is not None:
                raise AssertionError(f"a load thread failed: {self.crashed!r}")
            return len(self.started_after(after)) >= count
        wait_until(enough, what, timeout)

    def phases(self, swap: Swap) -> dict[str, list[Outcome]]:
        """Requests answered before the publication, those in flight at any moment between
        publication and the swap being in place, and those sent once it was."""
        outcomes = list(self.outcomes)
        return {
            "before": [o for o in outcomes if o.end < swap.published_at],
            "across": [o for o in outcomes if o.start <= swap.settled_at and o.end >= swap.published_at],
            "after": [o for o in outcomes if o.start > swap.settled_at],
        }

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def rate(self) -> float:
        """Requests answered per second over the load's life (for the report, never asserted)."""
        span = (self.stopped_at or time.monotonic()) - self.started_at
        return len(self.outcomes) / span if span > 0 else 0.0

    def summary(self, swap: Swap) -> str:
        parts = []
        for phase, outcomes in self.phases(swap).items():
            by_kind: dict[str, dict[int | None, int]] = {}
            for o in outcomes:
                by_kind.setdefault(o.kind, {}).setdefault(o.status, 0)
                by_kind[o.kind][o.status] += 1
            parts.append(f"{phase}: {len(outcomes)} {json.dumps(by_kind, sort_keys=True)}")
        return (f"{len(self.outcomes)} requests at {self.rate():.0f}/s, "
                f"{len(self.failures())} failed; " + "; ".join(parts))
