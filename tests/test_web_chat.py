"""The chat page of a first-time user in headless Chromium: welcome, plain text, history, badge, language."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import SecretStr

from tests.support import CHROMIUM, PatternEngine, skip_unless
from tests.web_support import Web, start_web

pytestmark = skip_unless(CHROMIUM.exists(), f"Chromium at {CHROMIUM}", "apt-get install chromium")

FINISHED = "(card) => ['done', 'failed', 'cancelled'].includes(card.dataset.status)"


@pytest.fixture
async def web(tmp_path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Web] = []

    async def start(engine: PatternEngine | None = None, **settings: Any) -> Web:
        server = await start_web(tmp_path, engine, operator=False, **settings)
        started.append(server)
        return server

    yield start
    for server in started:
        await server.close()


async def _send(page: Any, text: str) -> None:
    await page.fill("#text", text)
    await page.click("#send")


async def _finished(page: Any, count: int) -> Any:
    """Wait until `count` cards exist and all have finished; return the cards."""
    await page.wait_for_function(
        f"document.querySelectorAll('.job').length === {count} && "
        "[...document.querySelectorAll('.job')].every((c) => c.dataset.status === 'done')",
        timeout=30_000,
    )
    return page.locator(".job")


async def _no_empty_bubbles(page: Any) -> None:
    texts = await page.locator(".msg:visible").all_inner_texts()
    assert all(text.strip() for text in texts), texts


async def test_a_first_visit_plain_text_history_and_tidy_cards(web, browser):
    server = await web()
    page = await browser.new_page()
    await page.goto(server.base_url)
    assert await page.evaluate("document.documentElement.lang") == "en"
    await page.wait_for_function("document.querySelector('#engine').dataset.state === 'ok'")
    assert await page.locator("#engine").inner_text() == "pattern · test pattern"
    icon = await page.locator("link[rel=icon]").get_attribute("href")
    response = await page.request.get(server.base_url.rstrip("/") + icon)
    assert response.status == 200 and response.headers["content-type"].startswith("image/svg")
    assert (await page.request.get(server.base_url + "favicon.ico")).status == 200

    # the first screen: a welcome and an example that draws when clicked
    welcome = page.locator("#welcome")
    await welcome.wait_for()
    assert "Describe a picture" in await welcome.inner_text()
    example = await page.locator("#example").inner_text()
    await page.click("#example")
    cards = await _finished(page, 1)
    assert not await welcome.is_visible()

    # plain text draws, also after a byte-order mark; /help answers; no empty bubble anywhere
    await _send(page, "hello, can you draw a cat?")
    await _finished(page, 2)
    await _send(page, "\ufeff/imagine 一只猫 --seed 3")
    await _finished(page, 3)
    await _send(page, "/help")
    await page.locator(".msg.bot", has_text="/imagine <text>").wait_for()
    await _no_empty_bubbles(page)
    assert await page.locator(".msg", has_text="Queued").count() == 0
    assert await page.locator(".msg.bot:visible").count() == 1

    # each card shows its prompt once
    for i in range(3):
        card = cards.nth(i)
        prompt = await card.locator(".prompt").inner_text()
        assert prompt and (await card.inner_text()).count(prompt) == 1

    # a reload shows the history: the words asked and the three results
    await page.reload()
    await _finished(page, 3)
    mine = await page.locator(".msg.mine").all_inner_texts()
    # (a job keeps the words without the options)
    assert (
        len(mine) == 3
        and example.startswith(mine[0])
        and mine[1:] == ["hello, can you draw a cat?", "一只猫"]
    )
    assert not await welcome.is_visible()
    await _no_empty_bubbles(page)
    jobs = await server.service.store.recent_jobs("web:@" + (await _user(page, server)), 10)
    assert len(jobs) == 3


async def _user(page: Any, server: Web) -> str:
    me = await page.request.get(server.base_url + "api/me")
    return str((await me.json())["user"])


@pytest.mark.parametrize(
    ("locale", "lang", "send", "done", "reroll"),
    [("zh-CN", "zh", "发送", "✅ 完成", "🔄 重画"), ("en-US", "en", "Send", "✅ Done", "🔄 Reroll")],
)
async def test_the_page_follows_the_browsers_language(web, browser, locale, lang, send, done, reroll):
    server = await web()
    context = await browser.new_context(locale=locale)
    page = await context.new_page()
    await page.goto(server.base_url)
    assert await page.evaluate("document.documentElement.lang") == lang
    assert await page.locator("#send").inner_text() == send
    await page.click("#example")
    card = (await _finished(page, 1)).first
    assert await card.locator(".status").inner_text() == done
    assert await card.locator("button.reroll").inner_text() == reroll
    labels = " ".join(
        [await page.locator(sel).inner_text() for sel in ("#send", ".who label", "#welcome", ".job .kind")]
    )
    english = ("Send", "Room", "Hello", "imagine", "Queued")
    chinese = ("发送", "房间", "你好", "绘画")
    assert not any(word in labels for word in (english if lang == "zh" else chinese)), labels
    await context.close()


async def test_the_engine_badge_shows_an_unavailable_engine(web, browser):
    server = await web(None, engine_name="wukong")
    page = await browser.new_page()
    await page.goto(server.base_url)
    await page.wait_for_function("document.querySelector('#engine').dataset.state === 'down'")
    assert "unavailable" in await page.locator("#engine").inner_text()
    assert "wukong" not in await page.locator("#engine").inner_text()
    await _send(page, "一只猫")
    error = page.locator(".msg.error")
    await error.wait_for()
    assert (await error.inner_text()).strip()


async def test_with_a_token_the_page_asks_for_it_first(web, browser):
    server = await web(web_token=SecretStr("let me in"))
    page = await browser.new_page()
    await page.goto(server.base_url)
    await page.locator("#login").wait_for()
    assert not await page.locator("#composer").is_visible()
    await page.fill("#token", "wrong")
    await page.click("#enter")
    await page.locator("#login-error", has_text="not right").wait_for()
    await page.fill("#token", "let me in")
    await page.click("#enter")
    await page.locator("#composer").wait_for()
    assert not await page.locator("#login").is_visible()
    await _send(page, "/help")
    await page.locator(".msg.bot", has_text="/imagine <text>").wait_for()
