"""Cast reference pictures through the web chat: the multipart upload endpoint on a real loopback
server, its own body limit (far above the JSON one), refusals, and /cast show's reference."""

from __future__ import annotations

import io
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from PIL import Image
from pydantic import SecretStr

from bots.web.payload import MAX_BODY_BYTES
from core.images import MAX_UPLOAD_BYTES
from tests import web_support
from tests.support import CHROMIUM, jpeg_picture, png_claiming, skip_unless

ROOM = "月光屋"
UPLOAD = "/api/cast/picture"


@pytest.fixture
async def web(tmp_path: Path) -> AsyncIterator[web_support.Web]:
    server = await web_support.start_web(tmp_path)
    yield server
    await server.close()


def form(
    picture: bytes | None, *, name: str = "莉莉", description: str = "", chat: str = ROOM
) -> aiohttp.FormData:
    data = aiohttp.FormData(default_to_multipart=True)
    data.add_field("chat", chat)
    data.add_field("name", name)
    if description:
        data.add_field("description", description)
    if picture is not None:
        data.add_field("picture", picture, filename="picture.bin", content_type="application/octet-stream")
    return data


async def upload(web: web_support.Web, data: aiohttp.FormData, status: int = 200) -> dict:  # type: ignore[type-arg]
    response = await web.client.post(UPLOAD, data=data)
    assert response.status == status, await response.text()
    return await response.json()  # type: ignore[no-any-return]


def noise_png(side: int) -> bytes:
    """A PNG of random pixels (it does not compress): about 3 × side² bytes."""
    out = io.BytesIO()
    Image.frombytes("RGB", (side, side), secrets.token_bytes(side * side * 3)).save(out, format="PNG")
    return out.getvalue()


async def test_an_uploaded_picture_becomes_the_reference_and_cast_show_links_it(web: web_support.Web) -> None:
    await web.client.say("/story new 月亮的故事", chat=ROOM)
    answer = await upload(web, form(jpeg_picture((20, 40, 220), (300, 200)), description="穿红斗篷的小女孩"))
    assert answer["replies"][0] == "Cast: 莉莉 — 穿红斗篷的小女孩"
    assert answer["replies"][1].startswith("📌 莉莉's reference picture is set")

    shown = await web.client.say("/cast show 莉莉", chat=ROOM)
    assert "Reference: the picture you gave" in shown["replies"][0]
    (attachment,) = shown["attachments"]
    assert attachment["name"] == "莉莉-reference.png" and attachment["url"].startswith("/images/")
    picture = await web.client.get(attachment["url"])
    assert picture.status == 200
    with Image.open(io.BytesIO(await picture.read())) as image:
        assert image.size == (300, 200) and image.convert("RGB").getpixel((150, 100))[2] > 180

    story = await (await web.client.get(f"/api/chats/{ROOM}/story")).json()
    (member,) = story["cast"]
    assert member == {
        "name": "莉莉",
        "description": "穿红斗篷的小女孩",
        "reference_url": attachment["url"],  # the gallery shows the reference beside the name
        "reference_from": "picture",
    }


async def test_a_picture_of_several_megabytes_passes_the_route_limit(web: web_support.Web) -> None:
    await web.client.say("/story new 月亮的故事", chat=ROOM)
    await web.client.say("/cast add 莉莉: 小女孩", chat=ROOM)
    big = noise_png(1400)
    assert len(big) > 5 * 1024 * 1024 and len(big) > 64 * MAX_BODY_BYTES
    answer = await upload(web, form(big))  # a member already in the cast: the description may be left out
    assert answer["replies"] == ["📌 莉莉's reference picture is set: panels with them follow it."]
    member = (await web.service.handler("story").active(f"web:{ROOM}")).member("莉莉")
    with Image.open(io.BytesIO(await web.service.image(member.reference))) as image:
        assert image.size == (1024, 1024)  # kept at most 1024 a side


async def test_over_the_limit_refused_by_length_and_while_streaming(web: web_support.Web) -> None:
    await web.client.say("/story new 月亮的故事", chat=ROOM)
    too_big = b"\x89PNG" + bytes(MAX_UPLOAD_BYTES)
    answer = await upload(web, form(too_big, description="小女孩"), status=413)
    assert answer["error"]["message"] == "The image is too large: at most 20 MB, please."

    boundary = "huahua-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="name"\r\n\r\n莉莉\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="picture"; filename="p.png"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: the server must count
        yield head
        for _ in range(MAX_UPLOAD_BYTES // (1024 * 1024) + 20):
            yield bytes(1024 * 1024)

    response = await web.client.post(
        UPLOAD, data=chunked(), headers={"Content-Type": f"multipart/form-data; boundary={boundary}"}
    )
    assert response.status == 413
    assert (await response.json())["error"]["message"] == "The image is too large: at most 20 MB, please."
    assert (await web.service.handler("story").active(f"web:{ROOM}")).cast == ()


async def test_a_bomb_a_non_image_and_malformed_forms_get_one_sentence(web: web_support.Web) -> None:
    await web.client.say("/story new 炸弹", chat=ROOM)
    bomb = await upload(web, form(png_claiming(9_400, 9_400), description="小女孩"), status=400)
    assert bomb["error"]["message"] == "The image is too large: at most 4096×4096 pixels, please."
    text = await upload(web, form(b"<html>not a picture</html>", description="小女孩"), status=400)
    assert "not an image" in text["error"]["message"]
    missing = await upload(web, form(None, description="小女孩"), status=400)
    assert missing["error"]["message"] == "Choose a picture to upload."
    colon = await upload(web, form(jpeg_picture(), name="莉:莉", description="x"), status=400)
    assert "colon" in colon["error"]["message"]
    impostor = form(jpeg_picture(), description="小女孩")
    impostor.add_field("user", "someone-else")
    refused = await upload(web, impostor, status=400)
    assert refused["error"]["message"] == "The form has an unexpected field 'user'."
    as_json = await web.client.post(UPLOAD, json={"name": "莉莉"})
    assert as_json.status == 415
    no_story = await upload(web, form(jpeg_picture(), description="小女孩", chat="空房间"), status=404)
    assert "no story" in no_story["error"]["message"]
    assert (await web.service.handler("story").active(f"web:{ROOM}")).cast == ()


async def test_each_browser_uploads_into_its_own_chat_and_a_token_is_asked_for(tmp_path: Path) -> None:
    server = await web_support.start_web(tmp_path)
    try:
        await server.client.say("/story new 我的故事", chat="")
        bob = server.browser("bob")
        response = await bob.post(UPLOAD, data=form(jpeg_picture(), description="小女孩", chat=""))
        assert response.status == 404  # bob's own chat has no story; alice's is not his
        alice_chat = "web:@" + (await server.user_id("alice")).removeprefix("web:")
        assert (await server.service.handler("story").active(alice_chat)).cast == ()
        answer = await upload(server, form(jpeg_picture(), description="小女孩", chat=""))
        assert "reference picture is set" in answer["replies"][-1]
    finally:
        await server.close()
    locked = await web_support.start_web(tmp_path / "locked", web_token=SecretStr("t0ken"), operator=False)
    try:
        response = await locked.client.post(UPLOAD, data=form(jpeg_picture(), description="小女孩"))
        assert response.status == 401
    finally:
        await locked.close()


async def test_by_story_id_only_its_own_chat_may_upload(tmp_path: Path) -> None:
    server = await web_support.start_web(tmp_path)
    try:
        await server.client.say("/story new 我的故事", chat="")
        alice_chat = "web:@" + (await server.user_id("alice")).removeprefix("web:")
        story = await server.service.handler("story").active(alice_chat)
        by_id = form(jpeg_picture(), description="小女孩")
        by_id.add_field("story", story.id)
        response = await server.browser("bob").post(UPLOAD, data=by_id)
        assert response.status == 403
        assert (await server.service.handler("story").active(alice_chat)).cast == ()
        mine = aiohttp.FormData(default_to_multipart=True)
        for key, value in (("story", story.id), ("name", "莉莉"), ("description", "小女孩")):
            mine.add_field(key, value)
        mine.add_field("picture", jpeg_picture(), filename="p.jpg", content_type="image/jpeg")
        assert "reference picture is set" in (await upload(server, mine))["replies"][-1]
    finally:
        await server.close()


@skip_unless(CHROMIUM.exists(), f"Chromium at {CHROMIUM}", "apt-get install chromium")
async def test_the_gallery_page_uploads_a_reference_picture(
    web: web_support.Web, browser: Any, tmp_path: Path
) -> None:
    await web.client.say("/story new 月亮的故事", chat=ROOM)
    story = await web.service.handler("story").active(f"web:{ROOM}")
    picture = tmp_path / "lili.jpg"
    picture.write_bytes(jpeg_picture((20, 40, 220), (300, 200)))
    page = await browser.new_page()
    await page.goto(f"{web.base_url}stories/{story.id}")
    await page.wait_for_function("document.body.dataset.loaded === 'true'")
    await page.fill("#cast-name", "莉莉")
    await page.fill("#cast-description", "穿红斗篷的小女孩")
    await page.set_input_files("#cast-file", str(picture))
    await page.click("#cast-picture button")
    await page.locator("#notice", has_text="reference picture is set").wait_for()
    await page.locator("#cast-list dt", has_text="莉莉").wait_for()
    member = (await web.service.handler("story").active(f"web:{ROOM}")).member("莉莉")
    assert member is not None and member.reference_from == "picture"

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(9_400, 9_400))
    await page.fill("#cast-name", "狼")
    await page.fill("#cast-description", "大灰狼")
    await page.set_input_files("#cast-file", str(bomb))
    await page.click("#cast-picture button")
    await page.locator("#notice", has_text="4096×4096").wait_for()
