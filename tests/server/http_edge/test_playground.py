"""The playground in a real browser: Debian's Chromium, driven by Playwright for Python (its own
browser download is not used; scripts/browser_setup.sh installs both). The page loads its models,
a grid of digits appears, and a text stream appears and grows. Skipped, naming the script, where
Chromium or Playwright is missing; with CI=true that fails instead."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from server.runtime.front import free_port
from tests.serving import ServerThread

pytestmark = pytest.mark.timeout(180)

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]  # fmt: skip  # the machine's network is closed: no calls out


def browser_or_skip() -> str:
    missing = []
    if shutil.which("chromium") is None and not os.path.exists(CHROMIUM):
        missing.append("Debian's chromium")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing.append("the playwright package")
    if missing:
        reason = f"{' and '.join(missing)} not installed: run scripts/browser_setup.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{reason}; CI=true requires the browser test")
        pytest.skip(reason)
    return shutil.which("chromium") or CHROMIUM


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    browser_or_skip()
    port = free_port()
    with ServerThread(http_port=port):
        yield f"http://127.0.0.1:{port}/"


def test_the_playground_draws_digits_and_streams_text(page_url: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_or_skip(), headless=True, args=FLAGS)
        try:
            page = browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(page_url)
            page.wait_for_function("document.getElementById('image-model').options.length > 0", timeout=30_000)
            assert page.locator("#image-model option").count() == 3 and page.locator("#text-model option").count() == 1

            page.select_option("#image-model", "gan")
            page.fill("#n", "20")
            page.click("#draw")
            page.wait_for_function("document.querySelectorAll('#grid img').length === 20", timeout=30_000)
            loaded = page.evaluate("Array.from(document.querySelectorAll('#grid img')).every(i => i.complete && i.naturalWidth === 28)")
            assert loaded, "the grid's images did not decode as 28x28 PNGs"
            assert "20 samples, seed 7" in page.inner_text("#image-status")

            page.fill("#max-tokens", "60")
            page.click("#stream")
            page.wait_for_function("document.getElementById('text').textContent.length > 'ROMEO:'.length + 20", timeout=30_000)
            page.wait_for_function("!document.getElementById('stream').disabled", timeout=30_000)  # the stream ended
            text = page.inner_text("#text")
            assert text.startswith("ROMEO:") and len(text) > len("ROMEO:") + 20
            assert errors == []
        finally:
            browser.close()
