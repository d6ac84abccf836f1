"""The story feature through the web adapter: API, exports, gallery page, on a real loopback server."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from pypdf import PdfReader

from bots.web.app import AttachmentShelf
from core.story import export
from tests import web_support
from tests.support import CHROMIUM, PatternEngine, skip_needing, skip_unless

ROOM = "月光屋"
LILY = "穿红斗篷的小女孩"
SCRIPT = (
    "/story new 月亮的故事 --style 儿童绘本",
    f"/cast add 莉莉: {LILY}",
    "/story add 莉莉在月光下的森林里散步。",
    "/story add An old owl watches the moon from the hill at night.",
    "/story add 莉莉和猫头鹰 look at the big moon together.",
)
GALLERY_SCREENSHOT = Path("/tmp/huahua-story.png")
PHONE_SCREENSHOT = Path("/tmp/huahua-story-phone.png")
CHAT_SCREENSHOT = Path("/tmp/huahua-story-chat.png")


class Web:
    def __init__(self, server: web_support.Web) -> None:
        self.server = server
        self.client = server.client
        self.service = server.service

    async def say(self, text: str, room: str = ROOM) -> dict[str, Any]:
        response = await self.client.post("/api/messages", json={"chat": room, "text": text})
        assert response.status == 200, await response.text()
        return await response.json()

    async def get_json(self, path: str, status: int = 200) -> dict[str, Any]:
        response = await self.client.get(path)
        assert response.status == status, await response.text()
        return await response.json()

    async def wait_done(self, job_id: str) -> dict[str, Any]:
        """Follow the job's server-sent events to its final one."""
        response = await self.client.get(f"/api/jobs/{job_id}/events")
        kind, data = "", {}
        async for raw in response.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                kind = line[len("event: ") :]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: ") :])
        assert kind == "done", (kind, data)
        return data

    async def story_of_room(self) -> dict[str, Any]:
        return await self.get_json(f"/api/chats/{ROOM}/story")

    async def until(self, check: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        """The room's story once `check` holds (the book records variants from a job listener)."""
        for _ in range(200):
            story = await self.story_of_room()
            if check(story):
                return story
            await asyncio.sleep(0.02)
        raise AssertionError(f"the story never reached the expected state: {story}")

    async def illustrated(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Run the whole script, /illustrate 3, and wait for the three pictures."""
        for line in SCRIPT:
            await self.say(line)
        data = await self.say("/illustrate 3")
        for job in data["jobs"]:
            await self.wait_done(job["id"])
        story = await self.until(lambda s: all(scene["images"] for scene in s["scenes"]))
        return story, data["jobs"]


StartWeb = Callable[..., Awaitable[Web]]


@pytest.fixture
async def start_web(tmp_path) -> AsyncIterator[StartWeb]:
    started: list[web_support.Web] = []

    async def start(**settings: Any) -> Web:
        server = await web_support.start_web(tmp_path, PatternEngine(), **settings)
        started.append(server)
        return Web(server)

    yield start
    for server in started:
        await server.close()


def _png_size(data: bytes) -> tuple[int, int]:
    with Image.open(io.BytesIO(data)) as image:
        return image.size


async def test_a_whole_story_through_the_web_api(start_web):
    web = await start_web()
    for line in SCRIPT:
        data = await web.say(line)
        assert data["job"] is None and len(data["replies"]) == 1, data
    data = await web.say("/illustrate 3")
    jobs = data["jobs"]
    # the three panels are one job, drawn as one batch: a line per panel, then how they are drawn
    assert len(jobs) == 1 and data["job"] == jobs[0] and len(data["replies"]) == 1
    assert data["replies"][0].count("🖼 Panel") == 3 and "Panels 1–3 are drawn together" in data["replies"][0]
    [job] = jobs
    story_id = job["meta"]["story_id"]
    assert job["meta"] == {"story_id": story_id, "story_scene": "1"} and job["panels"] == [1, 2, 3]
    assert job["kind"] == "scene" and job["params"]["n"] == 3
    done = await web.wait_done(job["id"])
    assert done["status"] == "done" and len(done["images"]) == 3

    story = await web.until(lambda s: all(scene["images"] for scene in s["scenes"]))
    assert story["id"] == story_id and story["title"] == "月亮的故事" and story["style"] == "儿童绘本"
    assert story["cast"] == [
        {"name": "莉莉", "description": LILY, "reference_url": None, "reference_from": ""}
    ]
    scenes = story["scenes"]
    assert [scene["index"] for scene in scenes] == [1, 2, 3]
    assert [scene["excerpt"] for scene in scenes] == [line.split(" ", 2)[2] for line in SCRIPT[2:]]
    assert LILY in scenes[0]["prompt_zh"] and LILY in scenes[2]["prompt_zh"]
    assert LILY not in scenes[1]["prompt_zh"]
    for i, scene in enumerate(scenes):
        assert scene["images"] == [done["images"][i]]
        assert scene["chosen"] == scene["images"][0]
        assert f"提示词 {i + 1}: {scene['prompt_zh']}" in done["caption"]
        assert scene["seed"] == job["params"]["seed"] + i and scene["drawn_with"] == [1, 2, 3]
        assert scene["params"]["width"] == job["params"]["width"] and scene["model"].startswith("pattern")
        picture = await web.client.get(scene["images"][0])
        assert picture.status == 200
        assert _png_size(await picture.read()) == (scene["params"]["width"], scene["params"]["height"])
    assert len(set(done["images"])) == 3  # each panel from its own prompt and seed
    assert await web.get_json(f"/api/stories/{story_id}") == story

    # 🔄 on the batch: it is drawn again with a new seed, and each new picture joins its own panel
    bob = web.server.browser("bob")
    response = await bob.post(f"/api/jobs/{job['id']}/actions", json={"action": "reroll", "index": 0})
    assert response.status == 200
    reroll = await response.json()
    assert reroll["meta"] == {"story_id": story_id, "story_scene": "1"} and reroll["kind"] == "reroll"
    assert reroll["panels"] == [1, 2, 3]
    rerolled = await web.wait_done(reroll["id"])
    story = await web.until(lambda s: all(len(scene["images"]) == 2 for scene in s["scenes"]))
    first = story["scenes"][0]
    for i, scene in enumerate(story["scenes"]):
        assert scene["images"] == [scenes[i]["images"][0], rerolled["images"][i]]
    assert first["images"][0] != first["images"][1]

    # V2 on the batch: a variation of panel 2 alone, which joins panel 2
    response = await bob.post(f"/api/jobs/{job['id']}/actions", json={"action": "variation", "index": 1})
    assert response.status == 200, await response.text()
    variation = await response.json()
    assert variation["meta"] == {"story_id": story_id, "story_scene": "2"} and variation["panels"] == [2]
    assert variation["prompt_zh"] == scenes[1]["prompt_zh"] and variation["params"]["n"] == 1
    varied = await web.wait_done(variation["id"])
    story = await web.until(lambda s: len(s["scenes"][1]["images"]) == 3)
    assert story["scenes"][1]["images"][2] == varied["images"][0]
    assert [len(scene["images"]) for scene in story["scenes"]] == [2, 3, 2]

    # ⭐ in the gallery: picture 2 of panel 1
    response = await bob.post(f"/api/stories/{story_id}/choose", json={"scene": 1, "picture": 2})
    assert response.status == 200, await response.text()
    chosen = await response.json()
    assert chosen["scenes"][0]["chosen"] == first["images"][1]
    assert (await web.story_of_room())["scenes"][0]["chosen"] == first["images"][1]
    # ⭐ under a chat picture: the action "choose" puts the first one back
    response = await web.client.post(f"/api/jobs/{job['id']}/actions", json={"action": "choose", "index": 0})
    assert response.status == 200 and (await response.json())["id"] == job["id"]
    assert (await web.story_of_room())["scenes"][0]["chosen"] == first["images"][0]
    # ⭐3 under the rerolled batch's pictures chooses for panel 3, not panel 1
    response = await web.client.post(
        f"/api/jobs/{reroll['id']}/actions", json={"action": "choose", "index": 2}
    )
    assert response.status == 200
    chosen_now = [scene["chosen"] for scene in (await web.story_of_room())["scenes"]]
    assert chosen_now == [first["images"][0], scenes[1]["images"][0], rerolled["images"][2]]

    # the storybook: one picture per panel in the HTML, cover + panels + cast pages in the PDF
    response = await web.client.get(f"/api/stories/{story_id}/export.html")
    assert response.status == 200 and response.content_type == "text/html"
    assert "filename" in response.headers["Content-Disposition"]
    assert ".html" in response.headers["Content-Disposition"]
    html = await response.text()
    assert html.count("<img") == 3 and "月亮的故事" in html and LILY in html
    if export.find_cjk_font() is None:
        skip_needing("a CJK font for the PDF", "apt-get install fonts-noto-cjk")
    response = await web.client.get(f"/api/stories/{story_id}/export.pdf")
    assert response.status == 200 and response.content_type == "application/pdf"
    assert ".pdf" in response.headers["Content-Disposition"]
    assert len(PdfReader(io.BytesIO(await response.read())).pages) == 1 + 3 + 1


async def test_reply_attachments_are_served(start_web):
    web = await start_web()
    story, _ = await web.illustrated()
    shown = await web.say("/story show")
    assert [item["name"] for item in shown["attachments"]] == ["panel-1.png", "panel-2.png", "panel-3.png"]
    # stored pictures are linked by their digest, the same URLs as the story's panels
    assert [item["url"] for item in shown["attachments"]] == [scene["chosen"] for scene in story["scenes"]]

    exported = await web.say("/story export")
    names = [item["name"] for item in exported["attachments"]]
    assert names == ["月亮的故事.html", "月亮的故事.pdf"]
    html_url, pdf_url = (item["url"] for item in exported["attachments"])
    assert html_url.startswith("/api/attachments/")
    response = await web.client.get(html_url)
    assert response.status == 200 and response.content_type == "text/html"
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]
    direct = await web.client.get(f"/api/stories/{story['id']}/export.html")
    assert await response.read() == await direct.read()
    response = await web.client.get(pdf_url)
    assert response.status == 200 and response.content_type == "application/pdf"
    assert (await response.read()).startswith(b"%PDF")

    for path in ("/api/attachments/AAAAAAAAAAAAAAAAAAAAAAAA/x.pdf", "/api/attachments/bad!/x.pdf"):
        response = await web.client.get(path)
        assert response.status == 404 and "expired" in (await response.json())["error"]["message"]


def test_the_attachment_shelf_expires_and_stays_within_its_bytes():
    now = [0.0]
    shelf = AttachmentShelf(ttl_s=10, max_bytes=100, clock=lambda: now[0])
    first = shelf.put("a.html", b"a" * 60)
    assert first is not None and shelf.get(first).data == b"a" * 60
    second = shelf.put("b.html", b"b" * 60)
    assert second is not None and shelf.get(first) is None and shelf.get(second).name == "b.html"
    assert shelf.put("huge.pdf", b"c" * 101) is None and shelf.get(second) is not None
    now[0] = 10.0
    assert shelf.get(second) is None
    third = shelf.put("c.html", b"c" * 100)
    assert third is not None and shelf.get(third) is not None


async def test_the_gallery_page_is_served(start_web):
    web = await start_web()
    await web.say(SCRIPT[0])
    story = await web.story_of_room()
    response = await web.client.get(f"/stories/{story['id']}")
    assert response.status == 200 and response.content_type == "text/html"
    page = await response.text()
    assert "/static/story.js" in page
    script = await web.client.get("/static/story.js")
    assert script.status == 200 and "textContent" in await script.text()


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/stories/nope"),
        ("GET", "/api/stories/nope/export.html"),
        ("GET", "/api/stories/nope/export.pdf"),
        ("POST", "/api/stories/nope/choose"),
        ("GET", "/stories/nope"),
    ],
)
async def test_an_unknown_story_is_404(start_web, method, path):
    web = await start_web()
    body = {"scene": 1, "picture": 1}
    response = await web.client.request(method, path, json=body if method == "POST" else None)
    assert response.status == 404
    if path.startswith("/api/"):
        assert "can't find that story" in (await response.json())["error"]["message"]


async def test_a_room_without_a_story_is_404_and_a_bad_room_400(start_web):
    web = await start_web()
    data = await web.get_json("/api/chats/empty/story", status=404)
    assert "/story new" in data["error"]["message"]
    data = await web.get_json(f"/api/chats/{'x' * 65}/story", status=400)
    assert "short printable name" in data["error"]["message"]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"scene": 1, "picture": 0}, "pictures 1 to 1"),
        ({"scene": 1, "picture": 2}, "pictures 1 to 1"),
        ({"scene": 4, "picture": 1}, "panel from 1 to 3"),
        ({"scene": 1, "picture": "1"}, "'picture' must be a whole number"),
        ({"scene": True, "picture": 1}, "'scene' must be a whole number"),
        ({"scene": 1}, "'picture' is missing"),
        ({"scene": 1, "picture": 1, "user": "alice"}, "Leave out 'user'"),
        ([1, 2], "JSON object"),
    ],
)
async def test_bad_choose_input_is_400(start_web, body, fragment):
    web = await start_web()
    story, _ = await web.illustrated()
    response = await web.client.post(f"/api/stories/{story['id']}/choose", json=body)
    assert response.status == 400
    assert fragment in (await response.json())["error"]["message"]
    assert (await web.story_of_room())["scenes"][0]["chosen"] == story["scenes"][0]["chosen"]


async def test_choose_on_a_plain_picture_is_400(start_web):
    web = await start_web()
    job = (await web.say("/imagine 一只猫 --seed 3"))["job"]
    await web.wait_done(job["id"])
    assert job["meta"] == {}
    response = await web.client.post(f"/api/jobs/{job['id']}/actions", json={"action": "choose", "index": 0})
    assert response.status == 400 and "story" in (await response.json())["error"]["message"]


async def test_the_pdf_without_a_chinese_font_is_503(start_web, monkeypatch):
    web = await start_web()
    story, _ = await web.illustrated()
    monkeypatch.setattr(export, "_FONT_CANDIDATES", ())
    monkeypatch.setenv("PATH", "/nonexistent")
    export.find_cjk_font.cache_clear()
    try:
        response = await web.client.get(f"/api/stories/{story['id']}/export.pdf")
    finally:
        monkeypatch.undo()
        export.find_cjk_font.cache_clear()
    assert response.status == 503
    assert "Chinese font" in (await response.json())["error"]["message"]


# the pages in headless Chromium ------------------------------------------------------------------


@skip_unless(CHROMIUM.exists(), f"Chromium at {CHROMIUM}", "apt-get install chromium")
async def test_the_chat_and_gallery_pages_in_chromium(start_web, browser):
    web = await start_web()
    base = web.server.base_url
    page = await browser.new_page(viewport={"width": 1280, "height": 900})
    await page.goto(base)
    await page.fill("#chat", ROOM)
    await page.dispatch_event("#chat", "change")
    hostile = '<img src=x onerror="window.pwned=1">'
    for line in (*SCRIPT, f"/story add 莉莉 waves goodbye {hostile}", "/illustrate 3"):
        await page.fill("#text", line)
        await page.click("#send")
        await page.locator(".msg.mine", has_text=line[:12]).last.wait_for()
    cards = page.locator(".job")
    await page.wait_for_function(
        "document.querySelectorAll('.job[data-status=done]').length === 1", timeout=30_000
    )
    assert await cards.count() == 1  # the three panels, drawn as one batch
    story = await web.until(lambda s: all(scene["chosen"] for scene in s["scenes"]))
    first = cards.first
    assert "panels 1–3" in await first.locator(".kind").inner_text()
    href = await first.locator("a.story-link").get_attribute("href")
    assert href == f"/stories/{story['id']}"
    assert await page.locator(".job button.choose").count() == 3

    # 🔄 on the card: the batch again, a second picture for each panel; ⭐ from the chat on panel 1's
    await first.locator("button.reroll").click()
    await page.wait_for_function(
        "document.querySelectorAll('.job[data-status=done]').length === 2", timeout=30_000
    )
    await cards.nth(1).locator("button.choose").first.click()
    await page.locator(".msg.bot", has_text="is now panel 1").wait_for()
    story = await web.until(lambda s: all(len(scene["images"]) == 2 for scene in s["scenes"]))
    assert story["scenes"][0]["chosen"] == story["scenes"][0]["images"][1]
    await cards.nth(1).locator("button.choose").nth(2).click()
    await page.locator(".msg.bot", has_text="is now panel 3").wait_for()

    await page.fill("#text", "/story export")
    await page.click("#send")
    await page.locator("a.attachment", has_text=".pdf").wait_for()
    links = await page.locator("a.attachment").all_inner_texts()
    assert links == ["📎 月亮的故事.html", "📎 月亮的故事.pdf"]
    await page.screenshot(path=str(CHAT_SCREENSHOT), full_page=True)

    # the gallery: title, cast, three panels; ⭐ on picture 1 of panel 1 makes it the large one
    gallery = await browser.new_page(viewport={"width": 1280, "height": 900})
    await gallery.goto(f"{base}stories/{story['id']}")
    await gallery.wait_for_function("document.body.dataset.loaded === 'true'")
    assert await gallery.locator("#title").inner_text() == "月亮的故事"
    assert await gallery.locator("#cast-list dt").all_inner_texts() == ["莉莉"]
    assert await gallery.locator("figure.panel").count() == 3
    excerpts = await gallery.locator("figure.panel .excerpt").all_inner_texts()
    assert excerpts == [scene["excerpt"] for scene in story["scenes"]] and hostile in excerpts[2]
    panel = gallery.locator("#panel-1")
    assert await panel.locator(".main img").get_attribute("src") == story["scenes"][0]["images"][1]
    assert await panel.locator(".thumb").count() == 2
    assert await gallery.locator("#panel-2 .thumb").count() == 2
    await panel.locator(".thumb[data-picture='1'] button.star").click()
    await gallery.locator("#notice", has_text="picture 1").wait_for()
    src = await gallery.locator("#panel-1 .main img").get_attribute("src")
    assert src == story["scenes"][0]["images"][0]
    assert (await web.story_of_room())["scenes"][0]["chosen"] == src
    assert await gallery.locator("#export-pdf").get_attribute("href") == (
        f"/api/stories/{story['id']}/export.pdf"
    )
    # the thumbnails load lazily: bring each into view, then every picture must have loaded
    await gallery.evaluate("[...document.images].forEach((img) => img.scrollIntoView())")
    await gallery.wait_for_function(
        "[...document.images].every((img) => img.complete && img.naturalWidth > 0)"
    )
    assert await gallery.evaluate("window.pwned === undefined")
    assert await page.evaluate("window.pwned === undefined")
    await gallery.screenshot(path=str(GALLERY_SCREENSHOT), full_page=True)
    await gallery.set_viewport_size({"width": 390, "height": 844})
    assert await gallery.evaluate("document.documentElement.scrollWidth <= 390")
    await gallery.screenshot(path=str(PHONE_SCREENSHOT), full_page=True)
