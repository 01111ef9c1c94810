"""Golden tests: every Polar fixture through the shipped relay.toml, against checked-in requests.

Each `tests/golden/<fixture>.json` holds what the relay would send for that fixture (route,
destination URL, headers with secrets masked, key, body), or why it sends nothing. Refunds are
mapped twice: with the purchase recorded by the relay (found by the lookup) and without.
Regenerate after a deliberate change with `UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_golden.py`
and review the diff.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config
from relay.mapping import map_event
from tests.helpers import FIXTURES, REPO, shipped_config

GOLDEN = Path(__file__).parent / "golden"
FIXTURE_NAMES = sorted(p.name for p in FIXTURES.glob("*.json"))
FAURYA_URL = "https://faurya.example"


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return shipped_config(FAURYA_URL, tmp_path / "relay.db")


def requests_for(config: Config, event: dict[str, Any], found: Any = None) -> dict[str, Any]:
    mapped = map_event(config.routes, "polar", event, found)
    out: dict[str, Any] = {"status": mapped.status.value}
    if mapped.reason:
        out["reason"] = mapped.reason
    out["requests"] = [
        {
            "route": m.route,
            "method": "POST",
            "url": config.destinations[m.destination].url,
            "headers": {h.name: h.shown() for h in config.destinations[m.destination].headers}
            | {"content-type": "application/json", "idempotency-key": m.idempotency_key},
            "body": json.loads(m.body),
        }
        for m in mapped.messages
    ]
    return out


def purchase_body(config: Config) -> dict[str, Any]:
    """What the relay sent for the purchase fixture: the refund lookup finds this."""
    event = json.loads((FIXTURES / "order.paid.purchase.json").read_bytes())
    [message] = map_event(config.routes, "polar", event).messages
    return dict(json.loads(message.body))


def check(name: str, actual: dict[str, Any]) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN"):
        path.write_text(json.dumps(actual, indent=2, ensure_ascii=False) + "\n")
    assert path.exists(), f"no golden file {path}; run with UPDATE_GOLDEN=1 and review it"
    assert actual == json.loads(path.read_text())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_maps_to_the_golden_requests(config: Config, name: str) -> None:
    """Each fixture gives exactly the checked-in requests (no lookups found)."""
    event = json.loads((FIXTURES / name).read_bytes())
    check(name, requests_for(config, event))


def test_refund_of_a_recorded_purchase_carries_its_order_and_attribution(config: Config) -> None:
    """A succeeded refund of a purchase the relay recorded gets that purchase's orderId and
    attribution through the lookup."""
    event = json.loads((FIXTURES / "refund.created.json").read_bytes())
    found = {"polar-refund-succeeded": {"purchase": purchase_body(config)}}
    actual = requests_for(config, event, found)
    check("refund.created.with-purchase.json", actual)
    body = actual["requests"][0]["body"]
    assert body["orderId"] == "ord_7Hq2kP9xL3"
    assert body["attribution"]["faSessionId"] == "s_81d0c4a2e9f7"


@pytest.mark.parametrize("status", ["pending", "failed", "canceled"])
def test_refund_that_has_not_succeeded_sends_nothing(config: Config, status: str) -> None:
    """A refund counts once, when it succeeds: other statuses are ignored."""
    event = json.loads((FIXTURES / "refund.created.json").read_bytes())
    event["data"]["status"] = status
    assert requests_for(config, event) == {"status": "ignored", "requests": []}


def test_no_golden_file_is_stale() -> None:
    """Every golden file belongs to a fixture (or the with-purchase refund case)."""
    expected = set(FIXTURE_NAMES) | {"refund.created.with-purchase.json"}
    assert {p.name for p in GOLDEN.glob("*.json")} == expected


@pytest.mark.parametrize("path", [REPO / "relay.toml", *sorted((REPO / "config").glob("*.toml"))])
def test_every_shipped_config_passes_relay_check(path: Path) -> None:
    """relay.toml and every example under config/ pass `relay check` (exit 0)."""
    env = dict(
        os.environ,
        POLAR_WEBHOOK_SECRET="polar_whs_check",
        FAURYA_URL=FAURYA_URL,
        FAURYA_SITE_ID="site",
        FAURYA_WRITE_KEY="key",
    )
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check", "--config", str(path)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
