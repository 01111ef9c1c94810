"""The code's layout holds what the README's module map says: no module shadows the standard
library, every command's parser names the function that runs it, and a delivery child's answer
crosses its socket whole."""

from __future__ import annotations

import argparse
import sys

from relay.cli import build_parser
from relay.delivery import AttemptResult
from relay.models import ErrorKind
from tests.helpers import REPO


def test_no_module_shadows_the_standard_library() -> None:
    """No module or package under relay/ has a standard library module's name (relay/operator.py
    shadowed `operator` for anything run from inside the package)."""
    names = {p.stem for p in (REPO / "relay").rglob("*.py") if p.stem != "__init__"}
    names |= {p.parent.name for p in (REPO / "relay").rglob("__init__.py")}
    assert sorted(names & sys.stdlib_module_names) == []


def parsers(parser: argparse.ArgumentParser, prefix: str) -> dict[str, argparse.ArgumentParser]:
    """Every leaf command's parser, by its command line (`outbox list`)."""
    found: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found |= parsers(sub, f"{prefix} {name}".strip())
    return found or {prefix: parser}


def test_every_command_runs_the_function_its_parser_names() -> None:
    """Each command's parser sets `func` to a callable (no dispatch by a string name)."""
    commands = parsers(build_parser(), "")
    assert {"serve", "dev", "check", "outbox list", "reprocess", "prune", "reconcile"} <= set(
        commands
    )
    for line, parser in commands.items():
        func = parser.get_default("func")
        assert callable(func), line
        assert parser.get_default("func_name") is None, line


def test_every_command_is_in_the_cli_docstring() -> None:
    """The `relay` package's docstring lists every command."""
    import relay.cli

    doc = relay.cli.__doc__ or ""
    for line in parsers(build_parser(), ""):
        assert f"`{line}`" in doc, line


def test_an_attempt_result_crosses_the_child_socket_whole() -> None:
    """`to_wire` / `from_wire` give back the same result, answered or failed."""
    for result in (
        AttemptResult.answered(429, "30", "slow down", 0.25),
        AttemptResult.failed(ErrorKind.TIMEOUT, "", 5.0),
    ):
        assert AttemptResult.from_wire(result.to_wire()) == result
