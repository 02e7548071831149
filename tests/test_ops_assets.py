"""The operator's assets under deploy/: Prometheus alert rules (checked and unit-tested with the real
promtool) and the Grafana dashboard (its JSON, its expressions parsed by promtool, every metric it or an
alert names exported by a real serving node)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "hps-alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "hps-alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "torchrec-hps.json"


def _promtool(*args: str) -> subprocess.CompletedProcess:
    tool = shutil.which("promtool")
    assert tool, "promtool is missing: `make tools` installs it (Debian package prometheus)"
    return subprocess.run([tool, *args], capture_output=True, text=True, timeout=120)


def _dashboard_module():
    spec = importlib.util.spec_from_file_location("make_dashboard", DASHBOARD.with_name("make_dashboard.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _dashboard_exprs(board: dict):
    return [t["expr"] for p in board["panels"] for t in p["targets"]]


def _alert_exprs():
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_check_and_their_unit_tests_pass():
    checked = _promtool("check", "rules", str(RULES))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _promtool("test", "rules", str(RULE_TESTS))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # every alert has a unit test that expects it to fire
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {c["alertname"] for t in tests for c in t["alert_rule_test"] if c["exp_alerts"]}
    names = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    assert names == fired, f"alerts without a firing test: {sorted(names - fired)}"


def test_alert_unit_tests_fail_when_a_rule_is_wrong(tmp_path):
    """The unit tests can fail: with the failure-ratio threshold raised, HPSServerFailures must not pass."""
    (tmp_path / RULES.name).write_text(RULES.read_text().replace("> 0.01", "> 0.2"))
    (tmp_path / RULE_TESTS.name).write_text(RULE_TESTS.read_text())
    assert _promtool("test", "rules", str(tmp_path / RULE_TESTS.name)).returncode != 0


def test_dashboard_json_is_the_generated_one_and_well_formed():
    board = json.loads(DASHBOARD.read_text())
    assert board == _dashboard_module().dashboard(), "run python deploy/grafana/make_dashboard.py"
    for key in ("uid", "title", "schemaVersion", "panels", "templating", "time"):
        assert key in board, key
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for p in board["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0 and g["w"] > 0 and g["x"] + g["w"] <= 24, p["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another"
                cells.add((x, y))
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    variables = {v["name"] for v in board["templating"]["list"]}
    for expr in _dashboard_exprs(board):
        for name in re.findall(r"\$(\w+)", expr):
            assert name in variables or name.startswith("__"), f"undefined variable ${name} in {expr}"


def test_dashboard_expressions_parse(tmp_path):
    board = json.loads(DASHBOARD.read_text())
    rules = [{"record": f"hps:panel_{i}", "expr": expr.replace("$__rate_interval", "5m").replace(
        '"$instance"', '".*"').replace('"$model"', '".*"')} for i, expr in enumerate(_dashboard_exprs(board))]
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    checked = _promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _exported_names(text: str) -> set:
    names = set()
    for line in text.splitlines():
        m = re.match(r"# TYPE (\w+) (\w+)", line)
        if m:
            name, kind = m.groups()
            # prometheus_client writes counters' TYPE lines with their _total already
            suffixes = {"histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
            names.update(name + s for s in suffixes)
    return names


def test_every_metric_named_is_exported_by_a_serving_node(tmp_path, namespace, kafka_bootstrap):
    """Scraped from a real node (HTTP server, CPU workers, tiers, a Kafka consumer): a renamed metric breaks
    this test instead of silently emptying a panel or disarming an alert."""
    from tests.serving.conftest import start_server
    from torchrec_hps.config import KafkaConfig

    s = start_server(tmp_path, namespace.replace("-", "_").replace(".", "_"),
                     kafka=KafkaConfig(bootstrap_servers=kafka_bootstrap, poll_timeout=0.2, num_partitions=1))
    try:
        exported = _exported_names(httpx.get(f"http://{s.http_url}/metrics", timeout=10).text)
    finally:
        s.server.stop()
        s.storage.close()
    named = set()
    for expr in _dashboard_exprs(json.loads(DASHBOARD.read_text())) + _alert_exprs():
        named.update(re.findall(r"\bhps_\w+", expr))
    assert named, "no metric found in the expressions"
    missing = sorted(named - exported)
    assert not missing, f"named in deploy/ but not exported by the node: {missing}"


@pytest.mark.parametrize("metric", ["hps_tier_nodes_down", "hps_pending_invalidations", "hps_update_lag_messages"])
def test_every_degraded_state_gauge_has_an_alert(metric):
    assert any(metric in e for e in _alert_exprs()), metric
