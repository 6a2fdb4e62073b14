"""The dashboard in a real browser: headless Chromium (Debian's, driven by Selenium through its
chromedriver) loads the page from a running API, over rollups made by the real tick and
aggregator; the graph shows their known peak, the live count moves when a real WebSocket client
connects to a running gateway, and a bad key is refused on the page. A screenshot is kept in
``test-artifacts/`` (``METERING_TEST_ARTIFACTS``)."""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait
from websockets.asyncio.client import connect

from metering.core.database import get_engine, unit_of_work
from metering.gateway.sdk import Meter
from metering.limits import staff
from metering.live.service import tick
from metering.live.store import DatacenterStore, GlobalStore
from metering.rollups.service import Aggregator
from tests import processes
from tests.conftest import Env
from tests.factories import Tenant, tenant
from tests.scratch import REDIS_URL

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ARTIFACTS = Path(os.environ.get("METERING_TEST_ARTIFACTS", "test-artifacts"))


@pytest.fixture
def browser() -> Iterator[WebDriver]:
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        message = "Debian's chromium and chromium-driver are not installed"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (.ci/run installs them)")
        pytest.skip(f"{message}: apt-get install chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1200,2400",
    ):
        options.add_argument(flag)  # fmt: skip
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def seed(env: Env, a1: Tenant, a2: Tenant) -> None:
    """Twenty minutes ago, for a few seconds: a1 at 7 connections and a2 at 5 at the same
    second (the account's peak, 12), then 3 and 2. Folded by the real tick and aggregator."""
    client = redis.Redis.from_url(REDIS_URL)
    dc = DatacenterStore(client, env.prefix, "dc1")
    g = GlobalStore(client, env.prefix)
    meter = Meter(dc, "seed-fe")
    t = int(time.time()) - 1200

    def second(t: int) -> None:
        meter.flush()
        assert tick(g, {"dc1": dc}, liveness_timeout=3600, sample_retention=3600, now=t).committed

    for app, n in ((a1, 7), (a2, 5)):
        for _ in range(n):
            meter.connection_opened(str(app.app_id))
    second(t)
    for app, n in ((a1, 4), (a2, 3)):
        for _ in range(n):
            meter.connection_closed(str(app.app_id))
    for s in range(t + 1, t + 4):
        second(s)
    assert Aggregator(get_engine(), g, {"dc1": dc}).run().committed
    for app, n in ((a1, 3), (a2, 2)):  # the seeding frontend's connections go: live is 0
        for _ in range(n):
            meter.connection_closed(str(app.app_id))
    meter.flush()
    client.close()


def open_with(driver: WebDriver, port: int, key: str) -> None:
    driver.get(f"http://127.0.0.1:{port}/dashboard")
    driver.execute_script("sessionStorage.clear()")
    driver.get(f"http://127.0.0.1:{port}/dashboard")
    driver.find_element(By.ID, "key").send_keys(key)
    driver.find_element(By.CSS_SELECTOR, "#key-form button").click()
    assert key not in driver.current_url


def wait(driver: WebDriver, check: Callable[[WebDriver], object], timeout: float = 15) -> None:
    WebDriverWait(driver, timeout, poll_frequency=0.1).until(check)


def text(driver: WebDriver, element_id: str) -> str:
    return driver.find_element(By.ID, element_id).text


def test_the_dashboard_shows_the_peak_the_live_count_and_refuses_a_bad_key(
    env: Env,
    api_port: int,
    start_gateway: Callable[..., processes.Process],
    browser: WebDriver,
) -> None:
    a1 = tenant("platform", name="acme")
    a2 = tenant("platform", account_id=a1.account_id, name="acme")
    with unit_of_work() as session:
        staff.create_package(session, "pro", {"connections": (10, 25)})
        staff.set_package(session, a1.account_id, "pro", by="test")
    seed(env, a1, a2)
    gateway = start_gateway("gw-dash")
    processes.wait_http(f"http://127.0.0.1:{api_port}/healthz")

    open_with(browser, api_port, a1.key)
    # The graph of the last hour holds the account's peak: 12, not the apps' 7 + 5 summed later.
    wait(browser, lambda d: d.find_element(By.ID, "conns-summary").get_attribute("data-peak"))
    assert browser.find_element(By.ID, "conns-summary").get_attribute("data-peak") == "12"
    assert text(browser, "conns-summary").startswith("Peak 12 (")
    traces = browser.execute_script(
        "return document.getElementById('conns-chart').data.map(t => [t.name, Math.max(...t.y)])"
    )
    assert ["peak", 12] in traces
    assert ["quota", 10] in traces
    assert ["hard limit", 25] in traces
    month = browser.find_element(By.ID, "month-connections")
    assert (month.get_attribute("data-usage"), month.get_attribute("data-level")) == ("12", "soft")
    assert "Package pro" in text(browser, "package")
    # The month's peak crossed the quota and the warning: no rejection (hard is 25).
    assert "No rejection in force." in text(browser, "rejections")

    # One of its apps: the app's own figures, without the account's limits.
    Select(browser.find_element(By.ID, "entity")).select_by_value(str(a1.app_id))
    wait(
        browser, lambda d: d.find_element(By.ID, "conns-summary").get_attribute("data-peak") == "7"
    )

    # The live count moves when a real WebSocket client connects to the gateway.
    Select(browser.find_element(By.ID, "entity")).select_by_value("account")
    wait(browser, lambda d: d.find_element(By.ID, "live-count").text == "0")
    opened = threading.Event()
    done = threading.Event()

    def client() -> None:
        async def hold() -> None:
            url = f"ws://127.0.0.1:{gateway.port}/v1/realtime?app={a2.app_id}"  # type: ignore[attr-defined]
            async with connect(url):
                opened.set()
                await asyncio.to_thread(done.wait, 30)

        asyncio.run(hold())

    holder = threading.Thread(target=client, daemon=True)
    holder.start()
    assert opened.wait(10)
    wait(browser, lambda d: d.find_element(By.ID, "live-count").text == "1")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(ARTIFACTS / "dashboard.png"))
    done.set()
    holder.join(10)
    wait(browser, lambda d: d.find_element(By.ID, "live-count").text == "0")

    # A bad key, and a key without the platform permission: a clear message, no dashboard.
    open_with(browser, api_port, "mk_not-a-key")
    wait(browser, lambda d: "refused" in d.find_element(By.ID, "login-error").text)
    assert "Invalid or missing API key" in text(browser, "login-error")
    assert not browser.find_element(By.ID, "main").is_displayed()
    open_with(browser, api_port, tenant("stats", name="s").key)
    wait(browser, lambda d: "Platform API permission required" in d.find_element(
        By.ID, "login-error").text)  # fmt: skip

    # An account with no data and no package: words, not a blank chart.
    open_with(browser, api_port, tenant("platform", name="empty").key)
    wait(browser, lambda d: d.find_element(By.ID, "conns-empty").is_displayed())
    assert text(browser, "conns-empty") == "No usage recorded for this period."
    assert text(browser, "package") == "This account is on no package: no limits apply."
    assert not browser.find_element(By.ID, "conns-chart").is_displayed()
    browser.save_screenshot(str(ARTIFACTS / "dashboard-empty.png"))
