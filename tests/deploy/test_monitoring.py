"""deploy/grafana/imgrec.json and deploy/prometheus/alerts.yml, checked offline against the app.

Every PromQL expression of the dashboard and the rules names only metrics and labels that the
app's registry exposes (a renamed metric or label fails here, not on an operator's screen),
parses (promtool, from Debian's `prometheus` package, checks the dashboard's expressions as
recording rules), and the alerts pass their unit tests (deploy/prometheus/alerts.test.yml).
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from helpers.apps import running
from helpers.daemons import require_binary
from prometheus_client.metrics import MetricWrapperBase

from app.main import create_app
from app.serving.metrics import Metrics
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "deploy" / "grafana" / "imgrec.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = REPO / "deploy" / "prometheus" / "alerts.test.yml"
# labels every scraped series gets from Prometheus itself
TARGET_LABELS = {"job", "instance"}
GRAFANA_VARIABLES = {"$job": ".*", "$instance": ".*", "$__rate_interval": "5m"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_count", "_sum", "_created")}


def exposed() -> dict[str, set[str]]:
    """Each sample name the app's metrics expose -> its label names (``le`` on buckets)."""
    out: dict[str, set[str]] = {}
    for metric in vars(Metrics()).values():
        if not isinstance(metric, MetricWrapperBase):
            continue
        # the declared names, also of metrics no request has given a label set yet
        name, kind, labels = metric._name, metric._type, set(metric._labelnames)
        for suffix in SUFFIXES[kind]:
            out[name + suffix] = labels | ({"le"} if suffix == "_bucket" else set())
    return out


def dashboard() -> dict[str, Any]:
    result: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return result


def panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in dash["panels"]:
        yield p
        yield from p.get("panels", [])


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in panels(dashboard()) for t in p.get("targets", [])]


def alert_rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def check_names(expr: str, known: dict[str, set[str]]) -> None:
    """Metric names, selector labels and grouping labels of one expression exist."""
    names = set(re.findall(r"\b(imgrec_[a-z0-9_]+)\b", expr))
    assert names, f"no imgrec metric in {expr!r}"
    unknown = names - known.keys()
    assert not unknown, f"{sorted(unknown)} not exposed by the app (in {expr!r})"
    for name, selector in re.findall(r"\b(imgrec_[a-z0-9_]+)\{([^}]*)\}", expr):
        used = set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", selector))
        assert used <= known[name] | TARGET_LABELS, (name, used - known[name], expr)
    available = set().union(*(known[n] for n in names)) | TARGET_LABELS
    for group in re.findall(r"\b(?:by|on|without)\s*\(([^)]*)\)", expr):
        used = {g.strip() for g in group.split(",") if g.strip()}
        assert used <= available, (used - available, expr)


# -- the dashboard -------------------------------------------------------------------------------
def test_dashboard_expressions_use_the_apps_metrics_and_labels() -> None:
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    known = exposed()
    for expr in exprs:
        check_names(expr, known)
    covered = {n for e in exprs for n in re.findall(r"\b(imgrec_[a-z0-9_]+)\b", e)}
    # everything the issue asks for: throughput, latency, queue, batches, rejections, store,
    # the model's version
    for wanted in ("imgrec_requests_total", "imgrec_request_seconds_bucket",
                   "imgrec_queue_depth", "imgrec_queue_capacity", "imgrec_batch_size_bucket",
                   "imgrec_rejections_total", "imgrec_store_up", "imgrec_store_outages_total",
                   "imgrec_store_unstored_images_total", "imgrec_model_info", "imgrec_ready"):
        assert wanted in covered, wanted


def test_dashboard_is_well_formed() -> None:
    dash = dashboard()
    assert dash["uid"] == "imgrec" and dash["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    defined = {f"${name}" for name in variables} | {"$__rate_interval"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    occupied: set[tuple[int, int]] = set()
    for p in panels(dash):
        g = p["gridPos"]
        cells = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert g["x"] + g["w"] <= 24 and not cells & occupied, f"{p['title']} overlaps"
        occupied |= cells
        if p["type"] == "row":
            continue
        assert p["title"] and p["description"] and p["targets"], p["title"]
        assert p["datasource"]["uid"] == "${datasource}"
        for t in p["targets"]:
            used = set(re.findall(r"\$[a-z_]+", t["expr"]))
            assert used <= defined, (p["title"], used - defined)


def test_dashboard_expressions_parse(tmp_path: Path) -> None:
    """promtool parses each expression (Grafana's variables filled in) as a recording rule."""
    promtool = require_binary("promtool")
    rules = []
    for i, expr in enumerate(dashboard_exprs()):
        for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
            expr = expr.replace(var, value)
        rules.append({"record": f"imgrec_dashboard:panel_{i}", "expr": expr})
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- the alerts ----------------------------------------------------------------------------------
def test_alerts_cover_the_issue_and_read_like_alerts() -> None:
    rules = alert_rules()
    assert {r["alert"] for r in rules} >= {
        "ImgrecDown", "ImgrecNotReady", "ImgrecServerErrors", "ImgrecOverloaded",
        "ImgrecQueueNearFull", "ImgrecStoreDown", "ImgrecLatencyHigh", "ImgrecModelReloadFailed"}
    known = exposed()
    for r in rules:
        assert re.fullmatch(r"\d+m", r["for"]), r["alert"]
        assert r["labels"]["severity"] in ("critical", "warning"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
        check_names(r["expr"], known)


def test_promtool_checks_and_unit_tests_the_rules() -> None:
    promtool = require_binary("promtool")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERT_TESTS)]):
        done = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCESS" in done.stdout + done.stderr


# -- the metrics the two need --------------------------------------------------------------------
async def test_model_info_and_queue_capacity_are_exposed(
        tiny_settings: Callable[..., Settings]) -> None:
    app = create_app(tiny_settings(embed_store="memory", warmup_batches=0, max_queue=77))
    async with running(app) as c:
        text = (await c.get("/metrics")).text
        card = app.state.service.card
    assert (f'imgrec_model_info{{name="{card.name}",version="{card.version}",'
            f'weights_sha256="{card.weights_sha256}"}} 1.0') in text
    assert "imgrec_queue_capacity 77.0" in text
    assert [line for line in text.splitlines() if line.startswith("imgrec_model_info{")] != []


def test_a_model_switch_leaves_one_model_info_series() -> None:
    metrics = Metrics()
    for version in ("1", "2"):
        card = type("Card", (), {"name": "m", "version": version, "weights_sha256": "ab"})()
        metrics.serving(card, 10)  # type: ignore[arg-type]
    samples = [s for family in metrics.registry.collect() if family.name == "imgrec_model_info"
               for s in family.samples]
    assert [s.labels["version"] for s in samples] == ["2"]
