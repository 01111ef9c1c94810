"""The checkout snippet in a real headless Chromium: a shop page (served on loopback) with the
Faurya globals and config/checkout-snippet.js, the relay's checkout endpoint on another origin,
and the fake Polar API behind it. A click must end on Polar's checkout page with the IDs in
the checkout's metadata.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` package (dev
extras); without them the tests are skipped. No browser is ever downloaded: Selenium is given
both binaries, so its driver manager never runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay.app import METRICS, create_app
from relay.config import CheckoutConfig, Config
from tests.helpers import REPO
from tests.polar_fake import FakePolar, serve, with_polar_api

if TYPE_CHECKING:
    from selenium.webdriver import Chrome as WebDriver

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SNIPPET = REPO / "config" / "checkout-snippet.js"
PRODUCT = "5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
IDS = {
    "__FAURYA_VISITOR_ID__": "v_5f2c9e1ab7d34c0e",
    "__FAURYA_SESSION_ID__": "s_81d0c4a2e9f7",
    "__FAURYA_ATTRIBUTION_TOKEN__": "fat_eyJ2IjoxLCJzIjoiczgxZDBjNGEyZTlmNyJ9",
}


def _missing() -> str | None:
    if not CHROMIUM.exists():
        return f"no {CHROMIUM}: apt-get install -y chromium chromium-driver"
    if not CHROMEDRIVER.exists():
        return f"no {CHROMEDRIVER}: apt-get install -y chromium-driver"
    if importlib.util.find_spec("selenium") is None:
        return "the selenium package is not installed: pip install -e '.[dev]'"
    return None


MISSING = _missing()
pytestmark = [
    pytest.mark.e2e,
    # One Chromium for the module: under pytest-xdist (--dist loadgroup) its tests share a worker.
    pytest.mark.xdist_group("chromium"),
    pytest.mark.skipif(MISSING is not None, reason=f"headless Chromium unavailable: {MISSING}"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the module, with a fresh profile and console logs kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class Shop:
    """The merchant's page: the Faurya globals, a buy button, the snippet, a status line."""

    relay_url: str = ""
    globals: dict[str, str] = field(default_factory=dict)
    config_object: bool = False  # window.FauryaCheckout instead of data- attributes
    url: str = ""
    link: str = ""  # a Polar checkout link on the page, marked for the snippet

    def html(self) -> str:
        endpoint = f"{self.relay_url}/checkout"
        lines = [f"window.{name} = {json.dumps(value)};" for name, value in self.globals.items()]
        if self.config_object:
            config = {"endpoint": endpoint, "plan": "pro"}
            lines.append(f"window.FauryaCheckout = {json.dumps(config)};")
            button = '<button id="buy" data-faurya-checkout>Buy</button>'
        else:
            button = (
                f'<button id="buy" data-faurya-checkout data-plan="pro" '
                f'data-endpoint="{endpoint}">Buy Pro</button>'
            )
        if self.link:
            button += f'<a id="link" data-faurya-checkout-link href="{self.link}">Buy by link</a>'
        return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Shop</title>
<script>{" ".join(lines)}</script></head>
<body>
{button}
<p id="status"></p>
<script>
document.addEventListener("faurya-checkout-error", function (event) {{
  document.getElementById("status").textContent = event.detail.message;
}});
</script>
<script src="/checkout-snippet.js"></script>
</body></html>"""

    def app(self) -> web.Application:
        async def page(request: web.Request) -> web.Response:
            return web.Response(text=self.html(), content_type="text/html")

        async def snippet(request: web.Request) -> web.Response:
            return web.Response(text=SNIPPET.read_text(), content_type="text/javascript")

        app = web.Application()
        app.router.add_get("/", page)
        app.router.add_get("/checkout-snippet.js", snippet)
        return app


@dataclass
class Setup:
    shop: Shop
    polar: FakePolar
    relay: web.Application


async def start(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
    shop: Shop,
    allow: str | None = None,
) -> Setup:
    """The fake Polar, the shop's page server, and the relay allowing the shop's origin."""
    polar = await serve(aiohttp_server)
    server = await aiohttp_server(shop.app())
    shop.url = str(server.make_url("/"))
    origin = allow or shop.url.rstrip("/")
    # A budget of 6000 Polar requests a minute: at the default 60 each retry of a failing
    # checkout waits a second for its slot.
    checkout = CheckoutConfig(
        enabled=True,
        plans=(("pro", PRODUCT),),
        allow_origins=(origin,),
        global_rate_limit_per_min=6000,
    )
    relay = await aiohttp_client(
        create_app(
            dataclasses.replace(with_polar_api(config, polar), checkout=checkout),
            poll_interval_s=0.05,
        )
    )
    shop.relay_url = str(relay.make_url("")).rstrip("/")
    return Setup(shop, polar, relay.app)


def buy_and_land(driver: WebDriver, page: str, prefix: str) -> tuple[str, str]:
    """Open the page, click Buy, wait for the browser to reach a URL starting with prefix;
    (that URL, the landing page's title). Blocking: run it in a thread."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page)
    driver.find_element(By.ID, "buy").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.startswith(prefix))
    WebDriverWait(driver, 10).until(lambda d: d.title == "Polar checkout")
    return driver.current_url, driver.title


def console(driver: WebDriver) -> list[str]:
    """The page's console messages since the last call (Chromium keeps them for us)."""
    entries: list[dict[str, Any]] = driver.get_log("browser")  # type: ignore[no-untyped-call]
    return [str(entry["message"]) for entry in entries]


def buy_and_fail(driver: WebDriver, page: str) -> dict[str, Any]:
    """Open the page, click Buy, wait for the snippet's error; what the page shows then."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    console(driver)  # drop what earlier pages logged
    driver.get(page)
    button = driver.find_element(By.ID, "buy")
    button.click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "status").text != "")
    return {
        "url": driver.current_url,
        "status": driver.find_element(By.ID, "status").text,
        "enabled": button.is_enabled(),
        "busy": button.get_attribute("aria-busy"),
        "console": console(driver),
    }


def created(app: web.Application) -> float:
    value = app[METRICS].registry.get_sample_value("relay_checkouts_total", {"outcome": "created"})
    return value or 0.0


async def test_a_click_lands_on_polar_checkout_with_the_faurya_ids(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
) -> None:
    """The snippet posts the three globals cross-origin to the relay (CORS preflight and
    all); Polar gets the plan's product with them and a generated orderId in the metadata,
    and the browser lands on the checkout page Polar returned."""
    setup = await start(aiohttp_server, aiohttp_client, config, Shop(globals=dict(IDS)))

    url, title = await asyncio.to_thread(
        buy_and_land, browser, setup.shop.url, f"{setup.polar.url}/checkout/"
    )

    [call] = setup.polar.checkouts
    assert url == call.answer["url"]
    assert title == "Polar checkout"
    assert call.json["products"] == [PRODUCT]
    metadata = call.json["metadata"]
    assert re.fullmatch(r"ord_[0-9a-f]{32}", metadata.pop("orderId"))
    assert metadata == {
        "faVisitorId": IDS["__FAURYA_VISITOR_ID__"],
        "faSessionId": IDS["__FAURYA_SESSION_ID__"],
        "faAttributionToken": IDS["__FAURYA_ATTRIBUTION_TOKEN__"],
    }
    assert created(setup.relay) == 1


async def test_without_faurya_globals_the_ids_are_left_out(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
) -> None:
    """A page without Faurya's globals (configured by window.FauryaCheckout, as for a visitor
    whose ad blocker stopped Faurya's script) still checks out: the metadata carries only the
    orderId (Polar refuses "")."""
    shop = Shop(config_object=True)
    setup = await start(aiohttp_server, aiohttp_client, config, shop)

    url, _ = await asyncio.to_thread(
        buy_and_land, browser, shop.url, f"{setup.polar.url}/checkout/"
    )

    [call] = setup.polar.checkouts
    assert url == call.answer["url"]
    assert list(call.json["metadata"]) == ["orderId"]


async def test_a_failed_checkout_reenables_the_button(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
) -> None:
    """Polar down: the relay answers 502, the snippet logs the reason, enables the button
    again and tells the page; the browser stays on the shop."""
    setup = await start(aiohttp_server, aiohttp_client, config, Shop(globals=dict(IDS)))
    setup.polar.outage(503, retry_after="0")

    seen = await asyncio.to_thread(buy_and_fail, browser, setup.shop.url)

    assert seen["url"] == setup.shop.url
    assert seen["status"] == "could not create the checkout; try again"
    assert seen["enabled"] is True
    assert seen["busy"] is None
    assert any("[faurya-checkout] could not create the checkout" in m for m in seen["console"])
    assert setup.polar.checkouts == []
    assert created(setup.relay) == 0


async def test_a_page_from_another_origin_is_refused_by_cors(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
) -> None:
    """A relay that does not list the page's origin: the browser's preflight is refused, the
    snippet reports the failure, and Polar is never asked."""
    setup = await start(
        aiohttp_server,
        aiohttp_client,
        config,
        Shop(globals=dict(IDS)),
        allow="https://shop.example",
    )

    seen = await asyncio.to_thread(buy_and_fail, browser, setup.shop.url)

    assert seen["url"] == setup.shop.url
    assert seen["enabled"] is True
    assert seen["status"] == "Failed to fetch"  # all a page learns of a CORS refusal
    assert any("[faurya-checkout] Failed to fetch" in m for m in seen["console"])
    assert setup.polar.calls == []


def follow_link(driver: WebDriver, page: str, prefix: str) -> str:
    """Open the page, click the checkout link, wait for Polar's page; the URL landed on."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(page)
    driver.find_element(By.ID, "link").click()
    WebDriverWait(driver, 10).until(lambda d: d.current_url.startswith(prefix))
    WebDriverWait(driver, 10).until(lambda d: d.title == "Polar checkout")
    return str(driver.current_url)


async def test_a_checkout_link_carries_the_attribution_token_as_reference_id(
    browser: WebDriver,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    config: Config,
) -> None:
    """A Polar checkout link marked data-faurya-checkout-link gets the visitor's attribution
    token as reference_id (the only free field a link copies into metadata); a link that has a
    reference_id of its own keeps it."""
    shop = Shop(globals=dict(IDS))
    setup = await start(aiohttp_server, aiohttp_client, config, shop)
    prefix = f"{setup.polar.url}/checkout/"

    shop.link = f"{prefix}polar_cl_abc?utm_source=news"
    url = await asyncio.to_thread(follow_link, browser, shop.url, prefix)
    token = IDS["__FAURYA_ATTRIBUTION_TOKEN__"]
    assert url == f"{prefix}polar_cl_abc?utm_source=news&reference_id={token}"

    shop.link = f"{prefix}polar_cl_abc?reference_id=mine"
    url = await asyncio.to_thread(follow_link, browser, shop.url, prefix)
    assert url == f"{prefix}polar_cl_abc?reference_id=mine"
