"""`relay check`, `map`, `sign` and `send`: the config checked and explained, and trying the
relay without Polar (the work of the last three is relay/devtools.py's)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from relay import hardening
from relay.cli.options import common, config_path, file_warnings, load_config, note_unset
from relay.config import Config
from relay.errors import ConfigError
from relay.mapping import ObjectRule, ValueRule

if TYPE_CHECKING:
    from relay.cli.options import Subparsers

RECONCILE_SCOPES = "orders:read, refunds:read, disputes:read"


def add_tool_parsers(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "check",
        parents=[common()],
        help="validate the config, print the routes (works without the secrets: unset "
        "variables show as <unset: NAME>)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail (exit 2) on unset environment variables, as relay serve does (for CI)",
    )
    p.set_defaults(func=cmd_check)

    p = subparsers.add_parser(
        "map",
        parents=[common()],
        help="dry run: print the requests the relay would send for an event",
    )
    p.add_argument("--event", required=True, help="a webhook body (JSON file, or - for stdin)")
    p.add_argument("--route", help="only this route")
    p.add_argument("--source", help="the source the event comes from (default: the first)")
    p.add_argument("--db", help="resolve lookups (refunds) from this database")
    p.set_defaults(func=cmd_map)

    p = subparsers.add_parser(
        "sign", parents=[common()], help="print Standard Webhooks headers for a body"
    )
    p.add_argument("file", help="the body (JSON file, or - for stdin)")
    p.add_argument("--secret", required=True, help="polar_whs_... or whsec_...")
    p.add_argument(
        "--scheme",
        choices=["auto", "legacy", "standard"],
        default="auto",
        help="Polar's key scheme: legacy = the secret's bytes, standard = base64 "
        "after whsec_ (auto: standard for whsec_ secrets)",
    )
    p.add_argument("--id", help="webhook-id (default: random)")
    p.add_argument("--timestamp", type=int, help="webhook-timestamp (default: now)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sign)

    p = subparsers.add_parser(
        "send",
        parents=[common()],
        help="sign a body with the configured secret and POST it to a relay",
    )
    p.add_argument("file", help="the body (JSON file, or - for stdin)")
    p.add_argument("--url", help="default: this config's server address and source path")
    p.add_argument("--secret", help="default: the source's first secret")
    p.add_argument("--source", help="default: the first source")
    p.add_argument("--id", help="webhook-id (default: random; reuse one to test dedupe)")
    p.set_defaults(func=cmd_send)


# ---------------------------------------------------------------- check


def describe_rule(rule: ValueRule | ObjectRule, indent: str) -> list[str]:
    if isinstance(rule, ObjectRule):
        lines = []
        for name, child in rule.fields:
            if isinstance(child, ObjectRule):
                lines.append(f"{indent}{name}:")
                lines += describe_rule(child, indent + "  ")
            else:
                lines.append(f"{indent}{name} = {_describe_value(child)}")
        return lines
    return [f"{indent}{_describe_value(rule)}"]


def _describe_value(rule: ValueRule) -> str:
    text = rule.source_text()
    if rule.type:
        text += f" as {rule.type}"
    if rule.transforms:
        text += " | " + " | ".join(rule.transforms)
    if rule.required:
        text += " (required)"
    return text


def _reconcile_line(config: Config) -> str:
    """What `relay serve` will reconcile, or a warning that it will not (webhooks alone miss
    what Polar gave up on, everything while an endpoint is disabled, and every lost dispute)."""
    missed = "webhooks Polar gave up on and lost disputes will never reach Faurya"
    if config.polar_api.token is None:
        # Not a warning: relaying webhooks needs no token. But say what is given up.
        return (
            f"reconcile: off, no polar_api.token: {missed}; set POLAR_ACCESS_TOKEN "
            f"(an organization access token with {RECONCILE_SCOPES})"
        )
    if config.reconcile.interval_s <= 0:
        return f"warning: reconcile: off (reconcile.interval_s = 0): {missed}"
    return (
        f"reconcile: every {config.reconcile.interval_s:g} s over the last "
        f"{config.reconcile.lookback_s / 86400:g} days (token scopes: {RECONCILE_SCOPES}; "
        "without disputes:read, lost disputes are skipped)"
    )


def cmd_check(args: argparse.Namespace) -> int:
    from relay import polar_schema

    config = load_config(args, offline=not args.strict)
    # Paths no Polar event of the route has (a typo: data.net_amunt): before deploy, not at
    # start-up, where a field Polar adds after this relay was built must not stop serving.
    if problems := polar_schema.check(config):
        raise ConfigError(problems)
    out = [f"{config_path(args)}: ok"]
    for source in config.sources.values():
        out.append(
            f"source {source.name}: POST {source.path} ({source.kind}, "
            f"{len(source.secrets)} secret(s), tolerance {source.tolerance_s} s)"
        )
    for dest in config.destinations.values():
        headers = ", ".join(f"{h.name}: {h.shown()}" for h in dest.headers)
        out.append(
            f"destination {dest.name}: POST {dest.url} (timeout {dest.timeout_s:g} s, "
            f"concurrency {dest.concurrency}{'; ' + headers if headers else ''})"
        )
    for route in config.routes:
        out.append(
            f"route {route.name}: {route.source} {' | '.join(route.events)}"
            f"{' (with conditions)' if route.when else ''} -> {route.destination}"
        )
        out.append(f"  idempotency key: {route.idempotency_key.text}")
        if route.verify_order is not None:
            from relay.order_check import compared_fields

            compared = ", ".join(compared_fields(route)) or "nothing (only that it is paid)"
            out.append(
                f"  payment check: Polar order {route.verify_order.text}, compares {compared}"
            )
        out.append("  body:")
        out += describe_rule(route.body, "    ")
    if not config.routes:
        out.append("no routes: every event is acknowledged and ignored")
    out.append(_reconcile_line(config))
    out.append(
        f"admin: /metrics on {config.admin.listen}"
        + (" (bearer token)" if config.admin.token else "")
        if config.admin.listen
        else "admin: no admin listener (admin.listen): /metrics is not served"
    )
    out += [f"warning: {w}" for w in hardening.warnings(config) + file_warnings(config)]
    print("\n".join(out))
    note_unset(config)
    return 0


# ---------------------------------------------------------------- trying it out
# devtools imports aiohttp; loaded only by these commands.


def cmd_map(args: argparse.Namespace) -> int:
    from relay import devtools

    config = load_config(args, offline=True)
    note_unset(config)
    return devtools.cmd_map(args, config)


def cmd_sign(args: argparse.Namespace) -> int:
    from relay import devtools

    return devtools.cmd_sign(args)


def cmd_send(args: argparse.Namespace) -> int:
    from relay import devtools

    # With --secret and --url nothing from the config is needed (e.g. against `relay dev`);
    # otherwise only the source's secret and the server's address: devtools says which
    # variable is missing when the secret is.
    config = None if args.secret and args.url else load_config(args, offline=True)
    return devtools.cmd_send(args, config)
