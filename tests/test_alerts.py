"""The Prometheus alert rules and the Grafana dashboard only use metrics the relay exposes.

config/alerts.yml and config/grafana-dashboard.json name metrics, labels and label values by
hand; a rename in relay/metrics.py would leave an alert that never fires or a blank panel.
These tests scrape a real relay app after one delivered webhook and check every name, label
and fixed label value used in the rules and in the dashboard against that scrape. With promtool
on PATH they also run `promtool check rules` and the promtool unit tests (alerts.test.yml).
PyYAML is not a dependency, so the rules are read by a small line-based reader that knows the
shape of alerts.yml (and is itself tested below).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from relay.app import METRICS
from relay.metrics import Metrics
from relay.models import MessageStatus
from tests.helpers import REPO, FakeFaurya, admin_get, order_paid, sign_headers, wait_until

CONFIG = REPO / "config"
ALERTS = CONFIG / "alerts.yml"
ALERT_TESTS = CONFIG / "alerts.test.yml"
DASHBOARD = CONFIG / "grafana-dashboard.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)",
)

# Series Prometheus makes itself, not the relay.
PROMETHEUS_SERIES = {"up"}
# Labels Prometheus attaches to every scraped series (target labels), and histogram buckets.
TARGET_LABELS = {"job", "instance", "__name__", "le"}
# Labels whose values are a fixed set: their values in rules and panels are checked.
FIXED_VALUE_LABELS = {"outcome", "status", "status_class", "event"}
DS_REF = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
GRAFANA_BUILTIN_DS = {"type": "grafana", "uid": "-- Grafana --"}
BUILTIN_PANELS = {"row", "timeseries", "stat", "gauge", "bargauge", "table", "text", "heatmap"}


# ---------------------------------------------------------------- reading alerts.yml


def _scalar(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        inner = text[1:-1]
        return inner.replace('\\"', '"') if text[0] == '"' else inner.replace("''", "'")
    return text


def read_rules(text: str) -> list[dict[str, str]]:
    """The rules of a Prometheus rule file as flat dicts: alert/record, expr, for, and each
    label and annotation by its key. Reads plain `key: value` lines and folded (`>-`) or
    literal (`|`) block scalars, which is all alerts.yml uses."""
    rules: list[dict[str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = re.match(r"^(\s*)(- )?([A-Za-z_][\w-]*):\s*(.*)$", line)
        if match is None:
            continue
        indent, dash, key, value = match.groups()
        if dash and key in ("alert", "record"):
            rules.append({})
        if value in (">-", ">", "|", "|-"):
            block: list[str] = []
            key_indent = len(indent) + (2 if dash else 0)
            while i < len(lines) and (
                not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > key_indent
            ):
                block.append(lines[i].strip())
                i += 1
            value = (" " if value.startswith(">") else "\n").join(b for b in block if b)
        elif value:
            value = _scalar(value)
        if rules and value:
            rules[-1][key] = value
    return rules


# ---------------------------------------------------------------- reading PromQL


@dataclass(frozen=True)
class Selector:
    """One vector selector: a metric name and its label matchers (label, op, value)."""

    name: str
    matchers: tuple[tuple[str, str, str], ...] = ()


_MATCHER = re.compile(r'([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_BRACES = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^()]*)\)")
_IDENT = re.compile(r"(?<![\w.$:])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2"}


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in a PromQL expression (Grafana's $variables allowed)."""
    found: list[Selector] = []
    # Ranges and subqueries ([5m], [$__rate_interval], [1h:5m]) name no metric.
    text = re.sub(r"\[[^\]]*\]", "", expr)

    def braces(match: re.Match[str]) -> str:
        name = match.group(1) or ""
        matchers = tuple(_MATCHER.findall(match.group(2)))
        if not name:
            name = next((v for k, op, v in matchers if k == "__name__" and op == "="), "")
        found.append(Selector(name, matchers))
        return " "

    text = _BRACES.sub(braces, text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r'"(?:[^"\\]|\\.)*"', " ", text)
    for name in _IDENT.findall(text):
        if name not in _KEYWORDS:
            found.append(Selector(name))
    return found


def grouping_labels(expr: str) -> set[str]:
    """The labels named by `by`, `without`, `on`, `ignoring` and `group_left/right` clauses."""
    return {
        label.strip()
        for labels in _GROUPING.findall(expr)
        for label in labels.split(",")
        if label.strip()
    }


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("relay_ready == 0", [Selector("relay_ready")]),
        (
            'histogram_quantile(0.99, sum by (le) (rate(x_bucket{job=~"$job"}[$__rate_interval])))',
            [Selector("x_bucket", (("job", "=~", "$job"),))],
        ),
        (
            'a{outcome=~"retry|dead"} / ignoring (outcome) b > 0.5 and on (d) c unless d offset 5m',
            [Selector("a", (("outcome", "=~", "retry|dead"),)), *map(Selector, "bcd")],
        ),
        (
            'absent(up{job=~".*relay.*"}) or up == 0',
            [Selector("up", (("job", "=~", ".*relay.*"),)), Selector("up")],
        ),
        ('{__name__="m", k="v"} * 1e3', [Selector("m", (("__name__", "=", "m"), ("k", "=", "v")))]),
    ],
)
def test_selectors_finds_every_metric_of_an_expression(expr: str, expected: list[Selector]) -> None:
    """The PromQL reader finds each selector once, with its matchers, and no function names,
    grouping labels, keywords, durations or numbers."""
    assert selectors(expr) == expected


def test_read_rules_reads_folded_expressions_and_annotations() -> None:
    """The rule reader joins folded block scalars and unquotes plain values."""
    text = (
        "groups:\n  - name: g\n    rules:\n"
        "      - alert: A\n        expr: >-\n          x > 1\n          or y\n"
        "        for: 5m\n        labels:\n          severity: warning\n"
        '        annotations:\n          summary: "S {{ $labels.d }}"\n'
        "      - alert: B\n        expr: z == 0\n"
    )
    assert read_rules(text) == [
        {
            "alert": "A",
            "expr": "x > 1 or y",
            "for": "5m",
            "severity": "warning",
            "summary": "S {{ $labels.d }}",
        },
        {"alert": "B", "expr": "z == 0"},
    ]


# ---------------------------------------------------------------- what the relay exposes


@dataclass
class Exposed:
    """The series names a relay's /metrics gives Prometheus, with each one's label names and
    its family's help text."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    help: dict[str, str] = field(default_factory=dict)

    def names(self) -> set[str]:
        return set(self.labels)


_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
}


def declared_labels(metrics: Metrics) -> dict[str, set[str]]:
    """The label names each metric of relay/metrics.py was declared with, by family name."""
    return {
        # prometheus_client keeps the declared names there (a counter's without `_total`).
        metric._name: set(metric._labelnames)
        for metric in vars(metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }


def parse_exposition(text: str, declared: dict[str, set[str]]) -> Exposed:
    """Series names by family type: a counter `x` is `x_total` (and `x_created`), a histogram
    `x` is `x_bucket`, `x_sum`, `x_count`. A family without samples yet still counts; its label
    names are then the declared ones."""
    exposed = Exposed()
    for family in text_string_to_metric_families(text):
        names = {family.name + s for s in _SUFFIXES.get(family.type, ("",))}
        names |= {s.name for s in family.samples}
        for name in names:
            exposed.labels.setdefault(name, set())
            exposed.help[name] = family.documentation
            if not family.samples:
                exposed.labels[name] |= declared.get(family.name, set())
        for sample in family.samples:
            exposed.labels[sample.name] |= set(sample.labels)
    return exposed


@pytest.fixture
async def exposed(relay: TestClient[web.Request, web.Application], faurya: FakeFaurya) -> Exposed:
    """The real app's /metrics after one signed, unattributed purchase was delivered, so that
    the labelled ingest, delivery and revenue series exist."""
    body = order_paid(faSessionId="", faAttributionToken="")
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202, await resp.text()
    registry = relay.app[METRICS].registry

    async def counted() -> bool:
        value = registry.get_sample_value(
            "relay_unattributed_revenue_total", {"destination": "faurya"}
        )
        return value == 1

    await faurya.wait_for(1)
    await wait_until(counted)
    scrape = await admin_get(relay)
    assert scrape.status == 200
    return parse_exposition(scrape.text, declared_labels(relay.app[METRICS]))


def problems_with(where: str, expr: str, exposed: Exposed, legend: str = "") -> Iterator[str]:
    """Each metric, label or fixed label value in `expr` that the relay does not expose; each
    grouping label no metric of `expr` has; each `{{label}}` of a Grafana legend the query's
    result cannot carry (after `by (...)`, only those labels are left)."""
    metric_labels = set(TARGET_LABELS)
    for sel in selectors(expr):
        metric_labels |= exposed.labels.get(sel.name, set())
    grouped = grouping_labels(expr)
    for label in sorted(grouped - metric_labels):
        yield f"{where}: no metric of the expression has the grouping label {label!r}"
    legend_labels = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    by_labels = {
        label.strip()
        for labels in re.findall(r"\bby\s*\(([^()]*)\)", expr)
        for label in labels.split(",")
    }
    for label in sorted(legend_labels - (by_labels or metric_labels)):
        yield f"{where}: the legend names {label!r}, which the result does not carry"
    for sel in selectors(expr):
        if sel.name in PROMETHEUS_SERIES:
            continue
        if sel.name not in exposed.names():
            yield f"{where}: unknown metric {sel.name!r}"
            continue
        for label, op, value in sel.matchers:
            if label in TARGET_LABELS:
                continue
            if label not in exposed.labels[sel.name]:
                yield f"{where}: {sel.name} has no label {label!r}"
            elif label in FIXED_VALUE_LABELS and op in ("=", "=~"):
                known = known_values(sel.name, label, exposed)
                for one in value.split("|"):
                    if one not in known:
                        yield f"{where}: {sel.name}{{{label}}} never takes the value {one!r}"


def known_values(series: str, label: str, exposed: Exposed) -> set[str]:
    """The values a fixed-set label takes: the outbox statuses, or the words its help lists."""
    if series == "relay_outbox_messages" and label == "status":
        return {s.value for s in MessageStatus}
    return set(re.findall(r"[a-z0-9_]+", exposed.help[series]))


# ---------------------------------------------------------------- alerts.yml


def alert_rules() -> list[dict[str, str]]:
    return [r for r in read_rules(ALERTS.read_text()) if "alert" in r]


def test_alert_rules_have_severity_summary_and_a_runbook() -> None:
    """Every alert has an expression, a known severity, a summary and a description that tells
    the operator which `relay` command to run."""
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names))
    assert {
        "RelayBacklogStale",
        "RelayDeadLetters",
        "RelayBadSignatureBurst",
        "RelayNotReady",
        "RelayDown",
        "RelayDeliveriesFailing",
        "RelayStorageErrors",
        "RelayDestinationPaused",
        "RelayUnattributedRevenueHigh",
        "RelayLedgerDifference",
    } <= set(names)
    for rule in rules:
        assert rule.get("expr"), rule
        assert rule.get("severity") in ("critical", "warning", "info"), rule
        assert rule.get("summary"), rule
        assert re.search(r"`relay [a-z]", rule.get("description", "")), rule


def test_every_alert_has_a_promtool_unit_test() -> None:
    """alerts.test.yml exercises every alert of alerts.yml by name."""
    tested = set(re.findall(r"alertname:\s*(\w+)", ALERT_TESTS.read_text()))
    assert {r["alert"] for r in alert_rules()} <= tested


async def test_alert_expressions_use_only_exposed_metrics(exposed: Exposed) -> None:
    """Every metric, label and outcome/status value in the alert expressions is one the relay
    exposes."""
    rules = alert_rules()
    used = {s.name for r in rules for s in selectors(r["expr"])}
    assert {"relay_ready", "relay_outbox_oldest_pending_age_seconds", "up"} <= used
    problems = [p for r in rules for p in problems_with(r["alert"], r["expr"], exposed)]
    assert problems == []


# ---------------------------------------------------------------- grafana-dashboard.json


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def panel_queries(board: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    return [(where, expr) for where, expr, _ in panel_queries_with_legends(board)]


def panel_queries_with_legends(board: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(where, PromQL, legend format) for every panel target and every query variable."""
    queries = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"], t.get("legendFormat", ""))
        for p in board["panels"]
        for t in p.get("targets", [])
    ]
    for var in board["templating"]["list"]:
        query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        # label_values(SELECTOR, label): only the selector is PromQL.
        match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
        queries.append((f"variable {var['name']!r}", match.group(1) if match else query, ""))
    return queries


def datasource_refs(node: Any) -> Iterator[Any]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            else:
                yield from datasource_refs(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasource_refs(item)


def test_dashboard_is_importable_grafana_json() -> None:
    """The dashboard is schema 39 JSON with a DS_PROMETHEUS input, built-in panel types only,
    the expected rows, and a title and query on every panel, laid out without overlaps."""
    board = dashboard()
    assert board["schemaVersion"] == 39
    assert board["uid"]
    assert board["title"]
    [ds_input] = board["__inputs"]
    assert ds_input == ds_input | {
        "name": "DS_PROMETHEUS",
        "type": "datasource",
        "pluginId": "prometheus",
    }
    panels = board["panels"]
    assert {p["type"] for p in panels} <= BUILTIN_PANELS
    assert {r["id"] for r in board["__requires"] if r["type"] == "panel"} <= BUILTIN_PANELS
    rows = [p["title"] for p in panels if p["type"] == "row"]
    assert {"Ingest", "Storage", "Delivery", "Backlog", "Revenue", "Process"} <= set(rows)
    assert len({p["id"] for p in panels}) == len(panels)
    titles = [p["title"] for p in panels if p["type"] != "row"]
    assert all(titles)
    assert len(titles) == len(set(titles)), "panel titles repeat"
    cells: set[tuple[int, int]] = set()
    for p in panels:
        if p["type"] != "row":
            assert p["targets"], p["title"]
            assert all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        mine = {(g["x"] + dx, g["y"] + dy) for dx in range(g["w"]) for dy in range(g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine


def test_dashboard_datasources_all_use_the_input() -> None:
    """Every datasource reference (panels, targets, variables) is the ${DS_PROMETHEUS} input,
    except Grafana's built-in annotation source."""
    refs = list(datasource_refs(dashboard()))
    assert len(refs) > 40
    assert [r for r in refs if r not in (DS_REF, GRAFANA_BUILTIN_DS)] == []


async def test_dashboard_queries_use_only_exposed_metrics(exposed: Exposed) -> None:
    """Every metric, label and outcome/status value in the dashboard's queries is one the relay
    exposes (or Prometheus's own `up`)."""
    queries = panel_queries_with_legends(dashboard())
    used = {s.name for _, q, _ in queries for s in selectors(q)}
    assert {"relay_ingest_duration_seconds_bucket", "process_open_fds"} <= used
    problems = [p for where, q, leg in queries for p in problems_with(where, q, exposed, leg)]
    assert problems == []


# ---------------------------------------------------------------- promtool


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=CONFIG,
    )


@needs_promtool
def test_promtool_accepts_the_rules() -> None:
    """`promtool check rules` finds every alert of alerts.yml valid."""
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    """The promtool unit tests (input series -> expected alerts) of alerts.test.yml pass."""
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def fill_variables(query: str) -> str:
    """A dashboard query with its Grafana variables replaced by values Prometheus accepts."""
    for variable, value in (("$__rate_interval", "5m"), ("$job", ".*"), ("$instance", ".*")):
        query = query.replace(variable, value)
    return query


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query parses as PromQL (checked by promtool as a recording rule, with the
    Grafana variables filled in)."""
    queries = panel_queries(dashboard())
    rules = [
        {
            "record": f"dashboard:query_{i}",
            "expr": fill_variables(q),
        }
        for i, (_, q) in enumerate(queries)
    ]
    # JSON is YAML: promtool reads this file as it is.
    rule_file = tmp_path / "dashboard-queries.yml"
    rule_file.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", rule_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout
