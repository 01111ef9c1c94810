"""Screenshots of the operator console for docs/console.md, made from a seeded store so they
stay current: `docs/console/overview.png`, `message.png` and `dead.png`.

    .venv/bin/python tools/console_screenshots.py [--out docs/console]

It runs the real relay in process (the shipped relay.toml, a SQLite store in a temporary
directory) on a clock of its own, fixed at 2026-11-26 15:00 UTC so the pictures only change
when the console does. An hour of purchases, refunds and an outage of Faurya (a fake on
loopback: 503 for eight minutes, 422 for a few orders) is sent through the public port as
signed webhooks; then headless Chromium signs in to the console and takes the pictures. Needs
Debian's `chromium` and `chromium-driver` and the `selenium` package (the dev extras); no
browser is ever downloaded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import uuid
from calendar import timegm
from pathlib import Path
from typing import Any

from aiohttp import ClientSession, web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from relay import logs  # noqa: E402 - after the path
from relay.app import create_admin_app, create_app  # noqa: E402
from relay.config import load  # noqa: E402
from relay.console.auth import SERVICE  # noqa: E402
from relay.console.service import Caller, ConsoleService, ListFilters, Role  # noqa: E402
from relay.models import MessageStatus  # noqa: E402
from relay.verify import sign  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FIXTURES = REPO / "tests" / "fixtures" / "polar"
NOW = float(timegm((2026, 11, 26, 15, 0, 0, 0, 0, 0)))
# Made-up credentials of a throwaway relay that lives as long as this script.
SECRET = "polar_whs_screenshots_0000000000000000"  # noqa: S105 - not a real secret
TOKEN = "console-screenshots-token"  # noqa: S105 - not a real token
WIDTH = 1280
FAURYA_PORT = 47808
OUTAGE_MINUTES = range(40, 48)  # Faurya answers 503
# Orders Faurya refuses for good (422): the dead letters, with their amounts.
DEAD_ORDERS = {
    "ord_9Xk2mQ7vT4": (29900, "usd", 44),  # first caught in the outage, then refused
    "ord_4Fh8sLw2Pz": (14900, "eur", 25),
    "ord_7Tq1bNc6Yd": (4900, "usd", 33),
    "ord_2Wm5kRj8Ha": (9900, "usd", 52),
    "ord_6Vd3hTs9Ke": (19900, "usd", 15),
    "ord_8Nc4pGx2Lb": (2900, "eur", 29),
}
# Orders Faurya keeps answering 503 to: still retrying at the end of the hour.
RETRYING_ORDERS = {"ord_3Jp7wEr5Qm": (4900, "usd", 56)}
FEATURED = "ord_9Xk2mQ7vT4"


class StepClock:
    """The relay's clock for the seeding: moved by hand, minute by minute."""

    def __init__(self, t: float) -> None:
        self.t = t

    def now(self) -> float:
        return self.t


def _missing() -> str | None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        return (
            "needs /usr/bin/chromium and /usr/bin/chromedriver: "
            "apt-get install chromium chromium-driver"
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "needs selenium: pip install -e '.[dev]'"
    return None


class Seeder:
    """Sends an hour of webhooks through the relay's public port, minute by minute."""

    def __init__(self, base_url: str, clock: StepClock, service: ConsoleService) -> None:
        self.url = f"{base_url}/webhooks/polar"
        self.clock = clock
        self.service = service
        self.rng = random.Random(20261126)  # fixed: the same pictures each run
        self.purchase = json.loads((FIXTURES / "order.paid.purchase.json").read_text())
        self.refund = json.loads((FIXTURES / "refund.created.json").read_text())
        self.paid: list[tuple[str, int, str]] = []  # (polar id, amount, currency)

    def _uuid(self) -> str:
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _order_ref(self) -> str:
        alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz23456789"
        return "ord_" + "".join(self.rng.choice(alphabet) for _ in range(10))

    async def post(self, session: ClientSession, event: dict[str, Any]) -> None:
        body = json.dumps(event).encode()
        webhook_id = f"msg_{self.rng.getrandbits(80):020x}"
        stamp = int(self.clock.now())
        headers = {
            "webhook-id": webhook_id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(SECRET, webhook_id, stamp, body),
            "content-type": "application/json",
            "user-agent": "polar.sh webhooks",
        }
        async with session.post(self.url, data=body, headers=headers) as resp:
            if resp.status >= 300:
                raise SystemExit(f"seeding: HTTP {resp.status}: {await resp.text()}")

    def order(self, ref: str, amount: int, currency: str, attributed: bool) -> dict[str, Any]:
        event = json.loads(json.dumps(self.purchase))
        data = event["data"]
        data["id"] = self._uuid()
        data["net_amount"] = amount
        data["subtotal_amount"] = amount
        data["discount_amount"] = 0
        data["currency"] = currency
        data["metadata"]["orderId"] = ref
        if not attributed:
            for key in ("faVisitorId", "faSessionId", "faAttributionToken"):
                data["metadata"].pop(key, None)
        else:
            data["metadata"]["faSessionId"] = f"s_{self.rng.getrandbits(48):012x}"
        return event

    async def settle(self) -> None:
        """Until no message is due or in flight at the clock's time (the workers poll)."""
        for _ in range(2000):
            page = await self.service.list_messages(
                ListFilters(statuses=(MessageStatus.PENDING, MessageStatus.INFLIGHT)), limit=500
            )
            busy = [
                m
                for m in page.items
                if m.status is MessageStatus.INFLIGHT
                or (m.next_attempt_at is not None and m.next_attempt_at <= self.clock.now())
            ]
            if not busy:
                return
            await asyncio.sleep(0.02)
        raise SystemExit("seeding: the relay did not settle")

    async def hour(self, session: ClientSession) -> None:
        start = NOW - 3600
        special = {**DEAD_ORDERS, **RETRYING_ORDERS}
        dead_at = {minute: ref for ref, (_, _, minute) in special.items()}
        for minute in range(60):
            self.clock.t = start + minute * 60 + 3
            for _ in range(self.rng.choice((1, 2, 2, 3, 3, 4))):
                amount = self.rng.choice((1900, 2900, 4410, 4900, 9900, 14900))
                currency = "eur" if self.rng.random() < 0.2 else "usd"
                attributed = self.rng.random() > 0.15
                event = self.order(self._order_ref(), amount, currency, attributed)
                self.paid.append((event["data"]["id"], amount, currency))
                await self.post(session, event)
            if ref := dead_at.get(minute):
                amount, currency, _ = special[ref]
                event = self.order(ref, amount, currency, True)
                await self.post(session, event)
                if ref == FEATURED:
                    await self.refund_of(session, event["data"]["id"], 5000, currency)
            if minute in (18, 37, 55):
                polar_id, amount, currency = self.rng.choice(self.paid[:-3])
                await self.refund_of(session, polar_id, amount // 2, currency)
            await self.settle()
            self.clock.t += 30
            await self.settle()

    async def refund_of(
        self, session: ClientSession, polar_id: str, amount: int, currency: str
    ) -> None:
        event = json.loads(json.dumps(self.refund))
        event["data"].update(id=self._uuid(), order_id=polar_id, amount=amount, currency=currency)
        await self.post(session, event)


def faurya_app(clock: StepClock) -> web.Application:
    """A fake Faurya: down (503) during the outage, 422 for the DEAD_ORDERS, else 200."""

    async def revenue(request: web.Request) -> web.Response:
        body = await request.json()
        minute = int((clock.now() - (NOW - 3600)) // 60)
        if minute in OUTAGE_MINUTES or body.get("orderId") in RETRYING_ORDERS:
            return web.json_response({"error": "service unavailable"}, status=503)
        if body.get("orderId") in DEAD_ORDERS and body.get("event") == "purchase":
            return web.json_response(
                {"error": "unknown product price", "code": "price_not_found"}, status=422
            )
        return web.json_response({"ok": True, "id": f"rev_{abs(hash(body['orderId'])) % 10**8}"})

    app = web.Application()
    app.router.add_post("/api/revenue", revenue)
    return app


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, str]:
    """Serve on loopback: on `port` when it is free (the fake Faurya's URL shows on the
    message page: a fixed one keeps the picture the same), else on any free port."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
    except OSError:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, f"http://127.0.0.1:{runner.addresses[0][1]}"


def shoot(admin_url: str, message_id: int, out: Path, width: int) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"):
        options.add_argument(flag)
    options.add_argument("--force-prefers-color-scheme=light")
    options.add_argument(f"--window-size={width},900")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        driver.get(f"{admin_url}/login")
        driver.find_element(By.NAME, "token").send_keys(TOKEN)
        driver.find_element(By.CSS_SELECTOR, "form button[type=submit]").click()
        for name, path in (
            ("overview", "/"),
            ("message", f"/messages/{message_id}"),
            ("dead", "/messages?status=dead&sort=amount"),
        ):
            driver.get(admin_url + path)
            height = driver.execute_script("return document.documentElement.scrollHeight")
            driver.set_window_size(width, int(height) + 120)
            target = out / f"{name}.png"
            driver.save_screenshot(str(target))
            print(f"wrote {target.relative_to(REPO) if target.is_relative_to(REPO) else target}")
            driver.set_window_size(width, 900)
    finally:
        driver.quit()


async def main(out: Path, width: int = WIDTH) -> int:
    if problem := _missing():
        print(f"console_screenshots: {problem}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - once, before the loop runs
    logs.configure("warning", "console")
    clock = StepClock(NOW - 3600)
    # The workers' retry jitter draws from the global generator: seeded, the same delays.
    random.seed(20261126)
    faurya_runner, faurya_url = await serve(faurya_app(clock), FAURYA_PORT)
    with tempfile.TemporaryDirectory(prefix="relay-shots-") as tmp:
        env = {
            "POLAR_WEBHOOK_SECRET": SECRET,
            "FAURYA_URL": faurya_url,
            "FAURYA_SITE_ID": "site_demo",
            "FAURYA_WRITE_KEY": "wk_live_screenshots_only",
            "RELAY_ADMIN_LISTEN": "127.0.0.1:0",
            "RELAY_ADMIN_TOKEN": TOKEN,
            "RELAY_DB": str(Path(tmp) / "relay.db"),
        }
        config = load(str(REPO / "relay.toml"), env)
        main_app = create_app(config, clock=clock, poll_interval_s=0.02)
        runner, relay_url = await serve(main_app)
        admin_runner, admin_url = await serve(create_admin_app(main_app))
        try:
            service = admin_runner.app[SERVICE]
            seeder = Seeder(relay_url, clock, service)
            async with ClientSession() as session:
                await seeder.hour(session)
                # Two forged requests for the rejected page.
                async with session.post(
                    seeder.url, data=b"{}", headers={"webhook-id": "msg_forged"}
                ) as resp:
                    await resp.read()
            clock.t = NOW
            dead = await service.list_messages(ListFilters(statuses=(MessageStatus.DEAD,)))
            smallest = min(dead.items, key=lambda m: m.amount_minor or 0)
            await service.discard(
                Caller("admin", Role.ACT), smallest.id, "test order from the staging shop"
            )
            featured = await service.list_messages(ListFilters(q=FEATURED))
            purchase = next(m for m in featured.items if m.event_kind == "purchase")
            await asyncio.to_thread(shoot, admin_url, purchase.id, out, width)
        finally:
            await admin_runner.cleanup()
            await runner.cleanup()
            await faurya_runner.cleanup()
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "console"), help="directory")
    parser.add_argument("--width", type=int, default=WIDTH, help="window width (390: a phone)")
    args = parser.parse_args()
    sys.exit(asyncio.run(main(Path(args.out), args.width)))
