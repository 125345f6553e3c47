"""The monitoring in deploy/monitoring/ watches metrics that exist: every metric name the alert
rules and the dashboard use is in the /stats/prometheus of a running Envoy with the filter
(promtool checks the rules themselves: `make test-monitoring`)."""

from __future__ import annotations

import json
import re

from conftest import requires_standins, requires_wasm
from guard import ask
from stack import REPO, http

MONITORING = REPO / "deploy" / "monitoring"
# Metric names; a name followed by `=` is a label (checked separately).
NAME = re.compile(r"\b((?:voice_limit_guard|envoy)_[a-z0-9_]+)\b(?!\s*=)")
LABEL = re.compile(r"\b(envoy_[a-z0-9_]+)\s*=")


def queries() -> str:
    text = (MONITORING / "alerts.yaml").read_text()
    dashboard = json.loads((MONITORING / "dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v.get("query", "") for v in dashboard["templating"]["list"]
              if isinstance(v.get("query"), str)]
    return text + "\n" + "\n".join(exprs)


def names_used() -> set[str]:
    return set(NAME.findall(queries()))


@requires_wasm
@requires_standins
def test_every_metric_the_rules_and_the_dashboard_use_exists(start_envoy, new_room):
    used = names_used()
    assert {n for n in used if n.startswith("voice_limit_guard_")} >= {
        "voice_limit_guard_fail_open", "voice_limit_guard_blocked",
        "voice_limit_guard_shared_data_bytes"}
    # The dashboard's Envoy histograms name the connection manager and cluster; the test
    # Envoy's are "ingress" and "lk_jwt".
    envoy = start_envoy()
    assert ask(envoy, "/sfu/get", "legacy", "alice", "A1", new_room(limit=2)).status_code == 200
    scrape = http().get(f"{envoy.admin_url}/stats/prometheus", timeout=5).text
    exposed = {line.split()[2] for line in scrape.splitlines() if line.startswith("# TYPE ")}
    series = {re.split(r"[{ ]", line, maxsplit=1)[0] for line in scrape.splitlines()
              if line and not line.startswith("#")}
    missing = sorted(n for n in used if n not in exposed and n not in series)
    assert not missing, f"not in /stats/prometheus: {missing}"
    labels = set(LABEL.findall(queries()))
    assert labels and not sorted(l for l in labels if f"{l}=" not in scrape)
    # Every counter and gauge docs/operations.md lists (the edge role's aside) is there.
    text = (REPO / "docs" / "operations.md").read_text()
    documented = set(re.findall(r"^\| `([a-z_]+)` \|", text, re.M)) - {
        "routed_requests", "unroutable_requests"}
    gauges = {"shared_data_keys", "shared_data_bytes", "shared_data_entries"}
    assert {"oversized_requests", "openid_lookups", "blocked"} <= documented
    missing = sorted(n for n in documented | gauges if f"voice_limit_guard_{n}" not in exposed)
    assert not missing, f"documented but not exported: {missing}"
