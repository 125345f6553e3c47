#!/usr/bin/env python3
"""Paired A/B of filter modules in Envoy: ``make bench-ab MODULES="a.wasm b.wasm"``, or
``bench/ab.py SCENARIO ROUNDS MODULE...``.

Each MODULE is a path to a voice-limit-guard module, run on the bench's default configuration
with ``webhooks`` on, or ``empty`` for the empty Wasm filter. Every module gets its own Envoy
in front of the same upstreams as ``make bench``, next to a plain Envoy; one signed webhook
tells each guard that LiveKit's stream is live. Per round, every subject takes its turn at 1
and at 64 connections, so a burst of unrelated work on the machine spoils one round of every
subject rather than all of one. Printed per load and subject: the median of the per-round
ratios to plain Envoy (req/s and p50) and the median CPU time of that Envoy per request.

The machine's noise between two runs is larger than most single changes; compare modules
within one run, never across runs. SCENARIO is a ``make bench`` scenario key (``allowed``,
``blocked``, ...).
"""

from __future__ import annotations

import sys
from pathlib import Path

import bench as b


def subjects(modules: list[str], upstream: b.EnvoyServer) -> list[tuple[str, b.EnvoyServer]]:
    ports = b.ports_of(upstream)
    made = [("plain", b.EnvoyServer("ab-plain", b.subject_bootstrap(ports, []), env=b.SECRETS_ENV))]
    for i, module in enumerate(modules):
        if module == "empty":
            filters = [b.wasm_filter("bench_empty", b.build_empty_filter(), None)]
        else:
            config = b.guard_configuration(b.NO_BUDGET, webhooks={})
            filters = [b.wasm_filter("voice_limit_guard", Path(module), config, False)]
        envoy = b.EnvoyServer(f"ab-{i}", b.subject_bootstrap(ports, filters), env=b.SECRETS_ENV)
        if module != "empty":
            body, headers = b.webhook(b.ROOM_BLOCKED)
            b.send(envoy.ports["main"], "POST", "/sfu_webhook", body, headers)
        made.append((f"{i}: {Path(module).name}", envoy))
    return made


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[0] not in b.SCENARIOS_BY_KEY:
        print(__doc__, file=sys.stderr)
        return 2
    scenario, rounds, modules = b.SCENARIOS_BY_KEY[argv[0]], int(argv[1]), argv[2:]
    b.OUT.mkdir(exist_ok=True)
    wrk = b.ensure_wrk()
    try:
        upstream = b.EnvoyServer("upstreams", b.upstream_bootstrap(), log_level="warn")
        pairs = subjects(modules, upstream)
        for _, envoy in pairs:  # warm-up
            b.run_wrk(wrk, f"http://127.0.0.1:{envoy.ports['main']}", scenario, 64, 2, 1)
        runs: dict[tuple[str, int], list[b.Measure]] = {}
        for _ in range(rounds):
            for conns, threads in b.LOADS:
                for name, envoy in pairs:
                    envoy.process.settle()
                    ticks = envoy.process.cpu_ticks()
                    m = b.run_wrk(wrk, f"http://127.0.0.1:{envoy.ports['main']}", scenario,
                                  conns, threads, b.SECONDS)
                    m.cpu_us = ((envoy.process.cpu_ticks() - ticks) / b.CLOCK_TICKS * 1e6
                                / max(1, m.requests))
                    runs.setdefault((name, conns), []).append(m)
        print(f"{scenario.key}: {rounds} rounds of {b.SECONDS:g} s, medians")
        for conns, _ in b.LOADS:
            floor = runs[("plain", conns)]
            for name, _ in pairs:
                ms = runs[(name, conns)]
                rps = b.median([m.rps / p.rps for m, p in zip(ms, floor)])
                p50 = b.median([m.p50_ms / p.p50_ms for m, p in zip(ms, floor)])
                cpu = b.median([m.cpu_us for m in ms])
                expect = 200 if name == "plain" or name.endswith(": empty") else scenario.expect
                problems = "; ".join(p for p in (b.load_check(expect, m) for m in ms) if p)
                print(f"  {conns:2} conns  {name:<28} req/s {rps:.2f}x  p50 {p50:.2f}x  "
                      f"CPU {cpu:.0f} us/request" + (f"  ({problems})" if problems else ""))
    finally:
        b.Process.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
