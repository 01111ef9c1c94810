"""The docs say what the code does: the README's list of log events is exactly the events
logged, the Dockerfile quotes the shipped shutdown grace, every `relay dev` option has help."""

from __future__ import annotations

import argparse
import ast
import re
import tomllib

from relay.cli import build_parser
from relay.models import IngestOutcome
from tests.helpers import REPO

LEVELS = {"debug", "info", "warning", "warn", "error", "exception", "critical", "msg", "fatal"}
# Event names built at run time, by the source text of the expression, and what they become.
DYNAMIC = {
    "f'webhook_{result.outcome.value}'": {f"webhook_{o.value}" for o in IngestOutcome},
}


def names_of(node: ast.expr) -> set[str]:
    """The event names a log call's first argument can take."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return names_of(node.body) | names_of(node.orelse)
    source = ast.unparse(node)
    assert source in DYNAMIC, f"a log event name the test cannot read: {source} (add to DYNAMIC)"
    return DYNAMIC[source]


def logged_events() -> dict[str, str]:
    """Event name -> where it is logged, for every structlog call in relay/: a call of a log
    level method on a logger made by get_logger (module-level `log`)."""
    found: dict[str, str] = {}
    for path in sorted((REPO / "relay").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        loggers = {
            target.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Call)
            and ast.unparse(node.value.func).endswith("get_logger")
            for target in node.targets
            if isinstance(target, ast.Name)
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in LEVELS
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id in loggers
                and node.args
            ):
                for name in names_of(node.args[0]):
                    found.setdefault(name, f"{path.relative_to(REPO)}:{node.lineno}")
    return found


def documented_events() -> set[str]:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- log-events -->(.*?)<!-- /log-events -->", readme, re.S)
    assert block is not None, "README.md has no <!-- log-events --> list"
    return set(re.findall(r"`([a-z0-9_]+)`", block.group(1)))


def test_the_scan_finds_the_log_calls() -> None:
    """The AST scan sees the events logged in several modules (so an empty scan cannot pass)."""
    logged = logged_events()
    assert {"relay_listening", "webhook_accepted", "delivery_succeeded", "store_closed"} <= set(
        logged
    )


def test_every_logged_event_is_in_the_readme() -> None:
    """Each event name the code logs is in the README's list of log events."""
    logged = logged_events()
    missing = {name: where for name, where in logged.items() if name not in documented_events()}
    assert missing == {}


def test_every_event_in_the_readme_is_logged() -> None:
    """Each event in the README's list is logged somewhere in the code."""
    assert documented_events() - set(logged_events()) == set()


def test_the_dockerfile_states_the_shipped_shutdown_grace() -> None:
    """The Dockerfile's note on `docker stop` quotes relay.toml's shutdown_grace_s."""
    shipped = tomllib.loads((REPO / "relay.toml").read_text(encoding="utf-8"))
    grace_s = float(shipped["server"]["shutdown_grace_s"])
    dockerfile = (REPO / "Dockerfile").read_text(encoding="utf-8")
    quoted = re.findall(r"shutdown_grace_s[ ,=]+(\d+) s\b", dockerfile)
    assert quoted == [f"{grace_s:g}"]


def test_every_option_of_relay_dev_has_help() -> None:
    """`relay dev --help` explains each of its options (--host and --port had none)."""
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    dev = sub.choices["dev"]
    bare = [a.option_strings[0] for a in dev._actions if a.option_strings and not a.help]
    assert bare == []
