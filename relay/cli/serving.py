"""`relay serve` and `relay dev`: the relay itself, and the relay with a local Faurya sink."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from relay import hardening, logs
from relay.cli.options import common, config_path, file_warnings, load_config, with_db

if TYPE_CHECKING:
    from relay.cli.options import Subparsers

log = logs.get_logger("relay.cli")


def add_serving_parsers(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("serve", parents=[common(), with_db()], help="run the relay")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port; 0 = any)")
    p.set_defaults(func=cmd_serve)

    p = subparsers.add_parser(
        "dev",
        parents=[common()],
        help="the relay with a generated secret and a local Faurya sink that "
        "prints every revenue call",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="listen address for webhooks (default: 127.0.0.1)"
    )
    p.add_argument(
        "--port", type=int, default=8080, help="listen port for webhooks (default: 8080; 0 = any)"
    )
    p.add_argument("--db", help="default: a temporary database")
    p.set_defaults(func=cmd_dev)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.configure(config.log.level, config.log.format, cache=True)
    for warning in hardening.warnings(config) + file_warnings(config):
        log.warning("unsafe_setting", warning=warning)
    # aiohttp and the app load only for the commands that need them: `relay check` and the
    # operator commands start in a fraction of the time.
    from relay import serve

    serve.run(config)
    return 0


def cmd_dev(args: argparse.Namespace) -> int:
    # devtools imports aiohttp; loaded only by the commands that use it.
    from relay import devtools

    return devtools.cmd_dev(args, config_path(args))
