"""The console in a real headless Chromium (Debian `chromium` + `chromium-driver`, driven by selenium):
log in, place a mock call, watch the transcript grow and both level meters move, send a key, end
the call, find it in history and play its recording. A wrong or missing token is refused.

A screenshot of the live call is kept in $VOICECALL_TEST_ARTIFACTS (default: tmp/artifacts/).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from bridge.calls import CallState
from media.dtmf import DtmfDetector
from tests.harness import run_bridge, wait_for
from tests.test_mock_e2e import BASE, FAST_MOCK

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                                reason="needs Debian chromium and chromium-driver (scripts/system-deps.sh test)")

TOKEN = "browser-test-token-0123456789"
ARTIFACTS = Path(os.environ.get("VOICECALL_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "tmp" / "artifacts"))
CONFIG = {**BASE, "rpc": {"token": TOKEN}, "recording": {"enabled": True},
          "mock": {**FAST_MOCK, "calleeHangupAfterMs": 0,
                   "calleeScript": ["Yes, Thursday at three works for me.", "Could you also book a table?",
                                    "That is all, thanks."]}}


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="voicecall-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def heard_digits(pcm: bytes) -> str:
    detector = DtmfDetector(8000)
    return "".join(detector.process(bytes(pcm)))


async def test_console_in_headless_chromium(browser: Any, tmp_path: Path) -> None:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def until(predicate: Callable[[Any], Any], timeout: float = 30) -> Any:
        # the page re-renders its lists as events arrive: an element read mid-render is simply read again
        return WebDriverWait(browser, timeout, poll_frequency=0.05,
                             ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(predicate)

    async def run(fn: Callable[[], Any]) -> Any:
        return await asyncio.to_thread(fn)  # the browser blocks; the bridge keeps serving on this loop

    def find(css: str) -> Any:
        return browser.find_element(By.CSS_SELECTOR, css)

    def text(css: str) -> str:
        return str(browser.find_element(By.CSS_SELECTOR, css).text)

    js = browser.execute_script

    async with run_bridge(CONFIG, tmp_path) as runtime:
        base = f"http://127.0.0.1:{runtime.port}"

        def log_in() -> None:
            browser.get(f"{base}/console")
            until(lambda _: find("#login-panel").is_displayed())
            # no session: the RPC WebSocket is refused
            refused = browser.execute_async_script("""
                const done = arguments[arguments.length - 1];
                const ws = new WebSocket(`ws://${location.host}/rpc`);
                ws.onopen = () => done("open"); ws.onerror = () => done("refused");""")
            assert refused == "refused"
            find("#token").send_keys("not-the-token")
            find("#login-btn").click()
            until(lambda _: text("#login-error") == "Wrong token.")
            assert not find("#app").is_displayed()
            find("#token").send_keys(TOKEN)
            find("#login-btn").click()
            until(lambda _: find("#app").is_displayed() and text("#conn") == "live")
            assert js("return document.cookie") == ""  # HttpOnly: not readable by scripts

        await run(log_in)

        def place_call() -> str:
            message = find("#message")
            message.clear()
            message.send_keys("Hi! Does Thursday at three work?")
            find("#place-call").click()
            until(lambda _: find("#detail").is_displayed() and text("#detail-id"))
            until(lambda _: find("#live tbody tr") and "mock" in text("#live tbody"))
            return text("#detail-id")

        call_id = await run(place_call)
        call = runtime.manager.calls[call_id]

        def watch_live_call() -> None:
            until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#transcript li")) >= 2, 40)
            first = len(browser.find_elements(By.CSS_SELECTOR, "#transcript li"))
            until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#transcript li")) > first, 40)
            lines = until(lambda _: [li.text for li in browser.find_elements(By.CSS_SELECTOR, "#transcript li")])
            assert lines[0].startswith("bot") and "Thursday at three" in lines[0]
            assert any(line.startswith("caller") and "Thursday at three works" in line for line in lines)
            for side in ("caller", "bot"):
                until(lambda _, s=side: float(find(f"#meter-{s}").get_attribute("data-max")) > 0.01, 40)
            ARTIFACTS.mkdir(parents=True, exist_ok=True)
            assert browser.save_screenshot(str(ARTIFACTS / "console-live-call.png"))

        await run(watch_live_call)

        def send_key() -> None:
            find("#keys").send_keys("5")
            find("#send-keys").click()
            until(lambda _: "keys sent: 5" in text("#timeline"))

        await run(send_key)
        callee = runtime.carrier.callee(call_id)
        await wait_for(lambda: "5" in heard_digits(callee.heard), timeout=20)

        def transfer_to_a_busy_line() -> None:  # the server lists voicecall.transfer, so the form shows
            assert find("#transfer-form").is_displayed()
            find("#transfer-to").send_keys("+15550000002")
            find("#transfer").click()
            until(lambda _: "transfer to +15550000002 (cold)" in text("#timeline"), 20)
            until(lambda _: "transfer busy" in text("#timeline"), 20)

        await run(transfer_to_a_busy_line)
        await wait_for(lambda: call.state == CallState.LISTENING and call.transfer.outcome == "busy", timeout=20)

        def end_and_find_in_history() -> None:
            find("#end-call").click()
            until(lambda _: "ended: hangup-bot" in text("#timeline"))
            until(lambda _: not browser.find_elements(By.CSS_SELECTOR, f'#live tr[data-call-id="{call_id}"]'))
            find("#search").send_keys(call_id[:8])

            def history() -> list[tuple[str, str]]:
                return [(row.get_attribute("data-call-id"), row.find_element(By.CSS_SELECTOR, ".state").text)
                        for row in browser.find_elements(By.CSS_SELECTOR, "#history tbody tr")]

            until(lambda _: history() == [(call_id, "hangup-bot")])

        await run(end_and_find_in_history)
        await wait_for(lambda: call.terminal)
        await runtime.manager.drain()

        def play_recording() -> None:
            find(f'#history tr[data-call-id="{call_id}"] .play').click()
            until(lambda _: js("const p = document.querySelector('#player'); "
                               "return p.readyState >= 1 && p.duration > 1 && !p.error"), 30)
            assert js("return document.querySelector('#player').src").endswith(f"/console/recordings/{call_id}")
            assert browser.save_screenshot(str(ARTIFACTS / "console-history-playback.png"))

        await run(play_recording)
