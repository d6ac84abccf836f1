"""The storybook files: HTML always, PDF when a Chinese font is there, sane file names, quiet logs."""

from __future__ import annotations

import io
import logging
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from pypdf import PdfReader

from bots.web.app import _file_response
from core.logs import configure_logging
from core.service import MessageContext
from core.settings import Settings
from core.story import export
from core.story.export import CjkFont, best_cjk_font, file_name, find_cjk_font
from core.story.model import Story
from core.types import EventType
from tests.support import PatternEngine, make_service

TITLE = "月亮的故事"
EXCERPTS = ("清晨，莉莉走进了森林。", "她看见一只会说话的狐狸。")


async def _say(service, text: str):  # type: ignore[no-untyped-def]
    return await service.handle_message("web:room", "web:ann", text, MessageContext())


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[object]:
    """A service with a story of two drawn panels and one cast member."""
    service = await make_service(tmp_path, engine=PatternEngine())
    await _say(service, f"/story new {TITLE}")
    await _say(service, "/cast add 莉莉: 穿红斗篷的小女孩")
    for excerpt in EXCERPTS:
        await _say(service, f"/story add {excerpt}")
    reply = await _say(service, "/illustrate 2")
    for job in reply.jobs:
        assert [e async for e in service.subscribe(job.id)][-1].type == EventType.DONE
    yield service
    await service.stop()


@pytest.fixture
def no_font(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A machine without any Chinese font: none at the known paths, and no fontconfig."""
    monkeypatch.setattr(export, "_FONT_CANDIDATES", ())
    monkeypatch.setenv("PATH", "/nonexistent")
    find_cjk_font.cache_clear()
    yield
    monkeypatch.undo()
    find_cjk_font.cache_clear()


def _text(pdf: PdfReader, page: int) -> str:
    """A page's text as pypdf reads it (it leaves a NUL before each of fpdf2's two-byte glyph codes)."""
    return pdf.pages[page].extract_text().replace("\x00", "")


needs_font = pytest.mark.skipif(
    find_cjk_font() is None, reason="needs a Chinese font (Debian: apt install fonts-noto-cjk)"
)


async def test_without_a_font_the_html_still_comes(service, no_font) -> None:  # type: ignore[no-untyped-def]
    reply = await _say(service, "/story export")
    assert [name for name, _ in reply.attachments] == [f"{TITLE}.html"]
    html = reply.attachments[0][1].decode()
    assert html.count("<img ") == 2 and all(excerpt in html for excerpt in EXCERPTS)
    assert reply.texts == (
        f"📚 The storybook “{TITLE}”: 2 panels, as HTML only. The PDF needs a Chinese font and none is "
        "installed (Debian: apt install fonts-noto-cjk, or fonts-wqy-zenhei).",
    )


@needs_font
async def test_with_a_font_both_come_and_fonttools_stays_quiet(  # type: ignore[no-untyped-def]
    service, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, logging.getLogger("fontTools").level)
    try:
        configure_logging(Settings(_env_file=None))  # type: ignore[call-arg]  # as every entry point does
        reply = await _say(service, "/story export")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.getLogger("fontTools").setLevel(saved[2])
    assert reply.texts[0].endswith("2 panels, as HTML and PDF.")
    files = dict(reply.attachments)
    assert list(files) == [f"{TITLE}.html", f"{TITLE}.pdf"]
    pdf = PdfReader(io.BytesIO(files[f"{TITLE}.pdf"]))
    assert len(pdf.pages) == 1 + 2 + 1  # cover, panels, cast
    assert TITLE in _text(pdf, 0) and EXCERPTS[1] in _text(pdf, 2)
    logged = capsys.readouterr().err
    assert "fontTools" not in logged


@pytest.mark.parametrize(
    ("listing", "chosen"),
    [
        # the machine: a pixel font listed first, WenQuanYi installed too
        (
            "/usr/share/fonts/opentype/unifont/unifont.otf\t0\tUnifont\tCFF\n"
            "/usr/share/fonts/X11/misc/wenquanyi_12pt.pcf\t0\tWenQuanYi Bitmap Song\tPCF\n"
            "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc\t1\tWenQuanYi Zen Hei Mono,文泉驛等寬\tTrueType\n"
            "/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc\t0\tWenQuanYi Zen Hei,文泉驛正黑\tTrueType\n",
            ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
        ),
        # a Noto CJK collection: the Simplified Chinese face, not the Japanese one listed first
        (
            "/f/NotoSansCJK-Regular.ttc\t0\tNoto Sans CJK JP,Noto Sans CJK JP Regular\tCFF\n"
            "/f/NotoSansCJK-Regular.ttc\t2\tNoto Sans CJK SC,Noto Sans CJK SC Regular\tCFF\n"
            "/f/NotoSansCJK-Regular.ttc\t7\tNoto Sans Mono CJK SC\tCFF\n"
            "/f/DroidSansFallbackFull.ttf\t0\tDroid Sans Fallback\tTrueType\n",
            ("/f/NotoSansCJK-Regular.ttc", 2),
        ),
        # nothing preferred: any outline font with Chinese beats none
        ("/f/SomeKai.ttf\t0\tSome Kai\tTrueType\n/f/x.pcf.gz\t0\tMing\tPCF\n", ("/f/SomeKai.ttf", 0)),
        # only pixel, bitmap and monospaced fonts: no PDF rather than an ugly one
        (
            "/f/unifont.otf\t0\tUnifont\tCFF\n/f/m.ttf\t0\tAR PL Mono\tTrueType\n/f/b.bdf\t0\tSong\tBDF\n",
            None,
        ),
        ("", None),
    ],
)
def test_the_best_chinese_font_from_fontconfig(listing: str, chosen: tuple[str, int] | None) -> None:
    font = best_cjk_font(listing)
    assert (None if font is None else (str(font.path), font.index)) == chosen


@needs_font
def test_fontconfig_alone_finds_a_font_that_embeds(monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("fc-list") is None:
        pytest.skip("needs fontconfig's fc-list")
    monkeypatch.setattr(export, "_FONT_CANDIDATES", ())
    find_cjk_font.cache_clear()
    try:
        font = find_cjk_font()
    finally:
        monkeypatch.undo()
        find_cjk_font.cache_clear()
    assert isinstance(font, CjkFont) and font.path.suffix.lower() in (".ttf", ".otf", ".ttc")
    story = Story(id="s", chat="web:r", title=TITLE, style=None, base_seed=1, created_by="u", created_at=0.0)
    pdf = PdfReader(io.BytesIO(export._render_pdf(story, [], font)))
    assert TITLE in _text(pdf, 0)


@pytest.mark.parametrize(
    ("title", "name"),
    [
        (TITLE, f"{TITLE}.pdf"),
        ("Lily & the wolf!", "Lily-the-wolf.pdf"),
        ("!!!", "storybook.pdf"),
        ("  ", "storybook.pdf"),
        ("长" * 80, "长" * 60 + ".pdf"),
    ],
)
def test_file_names(title: str, name: str) -> None:
    story = Story(id="s", chat="web:r", title=title, style=None, base_seed=1, created_by="u", created_at=0.0)
    assert file_name(story, "pdf") == name


@pytest.mark.parametrize(
    ("name", "stem", "plain"),
    [
        (f"{TITLE}.pdf", "storybook", "storybook.pdf"),
        (f"{TITLE}.html", "download", "download.html"),
        ("panel-1.png", "download", "panel-1.png"),
        ("Lily 月亮.pdf", "storybook", "Lily.pdf"),
    ],
)
def test_download_headers_never_say_a_bare_suffix(name: str, stem: str, plain: str) -> None:
    disposition = _file_response(b"data", name, ascii_stem=stem).headers["Content-Disposition"]
    assert f'filename="{plain}"' in disposition
    assert "filename*=UTF-8''" in disposition
