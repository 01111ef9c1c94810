"""The admin listener (console, API, /metrics) as the tests drive it: the tokens, a bearer
header, signing in, the console forms' CSRF token, and a relay in process beside its admin
listener (the conftest fixture `make_listeners` starts both)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from relay.console.auth import SERVICE
from relay.console.service import ConsoleService
from tests.helpers import Client, FakeFaurya, order_paid, sign_headers

# Fake tokens of the admin listener: none may reach a page, an answer or a log.
ADMIN_TOKEN = "adm_test_token_2f6d93be"
READ_TOKEN = "read_test_token_c81e0d41"
CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')  # the token in every console form


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def sign_in(admin: Client, token: str = ADMIN_TOKEN) -> None:
    """Sign in to the console with `token` (303 to the next page)."""
    resp = await admin.post("/login", data={"token": token, "next": "/"}, allow_redirects=False)
    assert resp.status == 303, await resp.text()


async def csrf_of(admin: Client, path: str = "/") -> str:
    """The CSRF token of the console page at `path`."""
    resp = await admin.get(path, allow_redirects=False)
    html = await resp.text()
    assert resp.status == 200, html
    found = CSRF_RE.search(html)
    assert found, html
    return found.group(1)


@dataclass
class AdminRelay:
    """A relay in process (its public app) and its admin listener, both on loopback ports,
    delivering to `faurya`, which answers 422 (permanent: dead at once) to the Polar order ids
    in `refused` and 200 to the rest."""

    main: Client
    admin: Client
    faurya: FakeFaurya
    refused: set[str] = field(default_factory=set)

    @property
    def service(self) -> ConsoleService:
        return self.admin.app[SERVICE]

    async def send(self, polar_id: str, order_id: str, **metadata: Any) -> None:
        """A signed order.paid through the public port, as Polar sends it."""
        body = order_paid(polar_id, orderId=order_id, **metadata)
        resp = await self.main.post("/webhooks/polar", data=body, headers=sign_headers(body))
        assert resp.status == 202, await resp.text()
