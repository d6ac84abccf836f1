"""The web chat page in headless Chromium against the real app, service and (when possible) the tiny model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from bots.web.app import create_app
from tests.support import CHROMIUM, PatternEngine, make_service, skip_unless

IMAGINE = "/imagine 一只在月球上看书的猫 --ar 3:2 --seed 7"
SCREENSHOT = Path("/tmp/huahua-web.png")
PHONE_SCREENSHOT = Path("/tmp/huahua-web-phone.png")

pytestmark = skip_unless(CHROMIUM.exists(), f"Chromium at {CHROMIUM}", "apt-get install chromium")

# Records every width the progress bars take, so a fast job's progress is still observed.
WATCH_PROGRESS = """() => {
  window.seenProgress = [];
  new MutationObserver((changes) => {
    for (const change of changes) {
      if (change.target.classList && change.target.classList.contains("fill")) {
        window.seenProgress.push(change.target.style.width);
      }
    }
  }).observe(document.body, {attributes: true, subtree: true, attributeFilter: ["style"]});
}"""


@pytest.fixture
async def serve(tmp_path) -> AsyncIterator[Any]:
    started: list[tuple[TestServer, Any]] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> tuple[str, Any]:
        service = await make_service(tmp_path, engine=engine, **settings)
        server = TestServer(create_app(service, service.settings), host="127.0.0.1")
        await server.start_server()
        started.append((server, service))
        return str(server.make_url("/")), service

    yield start
    for server, service in started:
        await server.close()
        await service.stop()


async def _send(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def _loaded_image(page: Any, card: Any) -> dict[str, int]:
    """Wait until the card finishes and its first picture has loaded; return the picture's pixel size."""
    await page.wait_for_function(
        "(card) => ['done', 'failed', 'cancelled'].includes(card.dataset.status)",
        arg=await card.element_handle(),
        timeout=60_000,
    )
    assert await card.get_attribute("data-status") == "done", await card.inner_text()
    image = card.locator(".images img").first
    await page.wait_for_function(
        "(img) => img.complete && img.naturalWidth > 0", arg=await image.element_handle(), timeout=60_000
    )
    return await image.evaluate("(img) => ({width: img.naturalWidth, height: img.naturalHeight})")


async def test_help_and_hostile_text_render_as_plain_text(browser, serve):
    base, _ = await serve(PatternEngine())
    page = await browser.new_page()
    await page.goto(base)
    await page.wait_for_function("document.querySelector('#engine').textContent.includes('test pattern')")
    assert (await page.input_value("#chat")) == ""
    await _send(page, "/help")
    await page.locator(".msg.bot", has_text="/imagine <text>").wait_for()
    hostile = '<img src=x onerror="window.pwned=1">/imagine'
    await _send(page, hostile)
    await page.locator(".msg.mine", has_text="onerror").wait_for()
    await asyncio.sleep(0.2)
    assert await page.evaluate("window.pwned === undefined")
    assert await page.locator(".msg img").count() == 0
    texts = await page.locator(".msg.mine").all_inner_texts()
    assert any(hostile in text for text in texts)
    # plain text draws: after a reload the history shows the words as text again, and the picture
    await page.reload()
    await page.locator(".msg.mine", has_text="onerror").wait_for()
    await page.locator(".job").first.wait_for()
    assert await page.evaluate("window.pwned === undefined")


@pytest.mark.slow
async def test_imagine_reroll_in_the_page_with_the_tiny_model(browser, serve):
    base, service = await serve()
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(base)
    await page.wait_for_function(
        "document.querySelector('#engine').textContent.includes('untrained test model')"
    )
    await page.evaluate(WATCH_PROGRESS)
    await _send(page, IMAGINE)

    first = page.locator(".job").first
    await first.wait_for()
    job_id = await first.get_attribute("data-job-id")
    size = await _loaded_image(page, first)
    job = await (await page.request.get(f"{base}api/jobs/{job_id}")).json()
    assert job["status"] == "done"
    assert size == {"width": job["params"]["width"], "height": job["params"]["height"]}
    assert (await first.locator(".prompt").inner_text()) == job["prompt_zh"]
    assert "seed 7" in await first.locator(".caption").inner_text()
    assert "untrained test model" in await first.locator(".caption").inner_text()
    seen = await page.evaluate("window.seenProgress")
    assert any(width not in ("0%", "100%") for width in seen), seen
    labels = await first.locator(".actions button").all_inner_texts()
    assert labels == ["🔄 Reroll", "V1", "U1"]

    await first.locator("button.reroll").click()
    second = page.locator(".job").nth(1)
    await second.wait_for()
    await _loaded_image(page, second)
    second_id = await second.get_attribute("data-job-id")
    rerolled = await service.get_job(second_id)
    assert rerolled.kind.value == "reroll" and rerolled.parent_id == job_id
    assert await second.get_attribute("data-status") == "done"

    await page.screenshot(path=str(SCREENSHOT), full_page=True)
    await page.set_viewport_size({"width": 390, "height": 844})
    assert await page.evaluate("document.documentElement.scrollWidth <= 390")
    await page.screenshot(path=str(PHONE_SCREENSHOT), full_page=True)
