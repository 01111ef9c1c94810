"""The operator console in a real headless Chromium, against a relay in process (real SQLite
store, fake Faurya on loopback): sign in with the admin token, search an order id, open its
dead message, replay it once Faurya is fixed and see it delivered; discard another with a
reason and find it on the audit page. And the revenue ledger: open it from the navigation, see
a difference between Polar and Faurya, follow its link to the message, retry from the ledger.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` package (dev
extras); without them the tests are skipped. No browser is ever downloaded. Selenium blocks:
each browser step runs in a thread while the relay serves on the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from relay.models import MessageStatus
from tests.admin_helpers import ADMIN_TOKEN
from tests.polar_fake import serve as serve_polar
from tests.test_browser_checkout import CHROMEDRIVER, CHROMIUM, FLAGS, MISSING
from tests.test_console_pages import (  # noqa: F401 - make_console is a fixture used here
    Console,
    MakeConsole,
    make_console,
    seed_ledger,
)

if TYPE_CHECKING:
    from pytest_aiohttp import AiohttpServer
    from selenium.webdriver import Chrome as WebDriver

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(MISSING is not None, reason=f"headless Chromium unavailable: {MISSING}"),
]


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    """One headless Chromium for the module, with a fresh profile (so no cookie carries over
    from another module)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('console-profile')}")
    options.add_argument("--window-size=1280,900")
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: WebDriver, base: str) -> str:
    """Open the console, land on the login form, paste the token; the page title after."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    assert "/login?next=" in driver.current_url
    driver.find_element(By.NAME, "token").send_keys(ADMIN_TOKEN)
    driver.find_element(By.CSS_SELECTOR, ".login button[type=submit]").click()
    WebDriverWait(driver, 10).until(lambda d: "/login" not in d.current_url)
    return str(driver.title)


def open_order(driver: WebDriver, order_id: str) -> str:
    """Search the order id from the overview's search box and open its one message; the
    message page's status pill."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.LINK_TEXT, "Overview").click()
    WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Overview"))
    box = driver.find_element(By.CSS_SELECTOR, "input[name=q]")
    box.send_keys(order_id)
    box.submit()
    WebDriverWait(driver, 10).until(lambda d: f"q={order_id}" in d.current_url)
    rows = driver.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == 1, driver.page_source
    assert order_id in rows[0].text
    rows[0].find_element(By.CSS_SELECTOR, "td.id a").click()
    WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Message #"))
    return str(driver.find_element(By.CSS_SELECTOR, "h1 .pill").text)


def click(driver: WebDriver, label: str) -> str:
    """Press the button labelled `label`; the notice on the page it leads to (the form
    posts, then the browser follows the redirect: wait for the page that says `done=`)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.XPATH, f"//button[normalize-space()='{label}']").click()
    WebDriverWait(driver, 10).until(lambda d: "done=" in d.current_url)
    return str(driver.find_element(By.CSS_SELECTOR, ".notice").text)


def status_after_reload(driver: WebDriver, want: str) -> str:
    """Reload the message page until its status pill says `want` (a deadline, not a sleep)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def shows(d: WebDriver) -> bool:
        d.refresh()
        return bool(d.find_element(By.CSS_SELECTOR, "h1 .pill").text == want)

    WebDriverWait(driver, 10, poll_frequency=0.1).until(shows)
    return str(driver.find_element(By.CSS_SELECTOR, "h1 .pill").text)


def discard(driver: WebDriver, reason: str) -> str:
    from selenium.webdriver.common.by import By

    driver.find_element(By.ID, "reason").send_keys(reason)
    return click(driver, "Discard")


def audit_rows(driver: WebDriver) -> list[str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.LINK_TEXT, "Audit").click()
    WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Audit"))
    return [row.text for row in driver.find_elements(By.CSS_SELECTOR, "tbody tr")]


async def test_sign_in_find_replay_a_dead_order_and_discard_another(
    browser: WebDriver,
    make_console: MakeConsole,  # noqa: F811 - the fixture imported above
) -> None:
    """The 2 a.m. path in a browser: sign in, search the order, open its dead message, replay
    it after Faurya is fixed and watch it turn delivered; discard another dead one with a
    reason and find that reason on the audit page."""
    from relay.config import Secret

    console: Console = await make_console(token=Secret(ADMIN_TOKEN), read_token=None)
    console.refused |= {"pol-replay", "pol-discard"}
    await console.send("pol-replay", "ord_replay_me")
    await console.send("pol-discard", "ord_discard_me")
    await console.settled("ord_replay_me", MessageStatus.DEAD)
    await console.settled("ord_discard_me", MessageStatus.DEAD)
    base = str(console.admin.make_url("")).rstrip("/")

    title = await asyncio.to_thread(sign_in, browser, base)
    assert title.startswith("Overview")
    assert await asyncio.to_thread(open_order, browser, "ord_replay_me") == "dead"

    console.refused.discard("pol-replay")  # the fix: Faurya accepts this order now
    notice = await asyncio.to_thread(click, browser, "Replay")
    assert notice.startswith("Replay scheduled")
    await console.settled("ord_replay_me", MessageStatus.DELIVERED)
    assert await asyncio.to_thread(status_after_reload, browser, "delivered") == "delivered"

    assert await asyncio.to_thread(open_order, browser, "ord_discard_me") == "dead"
    notice = await asyncio.to_thread(discard, browser, "test order from the staging shop")
    assert notice.startswith("Discarded")
    assert (await console.message("ord_discard_me")).status is MessageStatus.DISCARDED

    rows = await asyncio.to_thread(audit_rows, browser)
    discards = [r for r in rows if "discard" in r and "test order from the staging shop" in r]
    assert len(discards) == 1, rows
    assert "admin" in discards[0]
    assert any("replay" in r for r in rows), rows


def open_ledger(driver: WebDriver) -> list[str]:
    """Open the ledger from the navigation; the text of each difference it lists."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.LINK_TEXT, "Ledger").click()
    WebDriverWait(driver, 10).until(lambda d: d.title.startswith("Revenue ledger"))
    assert driver.find_elements(By.CSS_SELECTOR, "svg.ledger-chart"), driver.page_source
    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "li.difference")]


def follow_message_link(driver: WebDriver, message_id: int) -> str:
    """Click the ledger's link to a message; the message page's status pill."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.CSS_SELECTOR, f"li.difference a[href='/messages/{message_id}']").click()
    WebDriverWait(driver, 10).until(lambda d: d.title.startswith(f"Message #{message_id}"))
    return str(driver.find_element(By.CSS_SELECTOR, "h1 .pill").text)


async def test_ledger_shows_a_difference_links_its_message_and_retries_it(
    browser: WebDriver,
    make_console: MakeConsole,  # noqa: F811 - the fixture imported above
    aiohttp_server: AiohttpServer,
) -> None:
    """The ledger page in a browser: opened from the navigation it charts Polar against
    Faurya and lists the differences; the dead purchase's difference links to its message,
    and its Retry now button (a form, no script) sends it once Faurya accepts it."""
    from relay.config import Secret

    polar = await serve_polar(aiohttp_server)
    console: Console = await make_console(token=Secret(ADMIN_TOKEN), read_token=None, polar=polar)
    seed = await seed_ledger(console.main, polar, console.refused)
    base = str(console.admin.make_url("")).rstrip("/")
    await asyncio.to_thread(browser.delete_all_cookies)
    assert (await asyncio.to_thread(sign_in, browser, base)).startswith("Overview")

    differences = await asyncio.to_thread(open_ledger, browser)
    assert len(differences) == 3, differences
    [dead] = [d for d in differences if f"message #{seed.dead_message}" in d]
    assert "+25.00 USD" in dead
    assert f"relay outbox retry {seed.dead_message}" in dead
    assert any(seed.lost_order in d and "+5.00 EUR" in d for d in differences), differences
    pill = await asyncio.to_thread(follow_message_link, browser, seed.dead_message)
    assert pill == "dead"

    console.refused.clear()  # the fix: Faurya accepts the order now
    await asyncio.to_thread(open_ledger, browser)
    notice = await asyncio.to_thread(click, browser, "Retry now")
    assert notice.startswith("Retry scheduled")
    await console.settled("ord_dead", MessageStatus.DELIVERED)
    differences = await asyncio.to_thread(open_ledger, browser)
    assert not any(f"message #{seed.dead_message}" in d for d in differences), differences
