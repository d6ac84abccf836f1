"""The storybook: a self-contained HTML file (pictures embedded) and a PDF, one page per panel."""

from __future__ import annotations

import asyncio
import base64
import html
import io
import logging
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fpdf import FPDF
from fpdf.enums import Align, XPos, YPos

from core.errors import HuahuaError

if TYPE_CHECKING:
    from core.story.book import StoryBook
    from core.story.model import Scene, Story

logger = logging.getLogger(__name__)

_FONT_CANDIDATES = (
    "/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc",
    "/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc",
    "/usr/share/fonts/truetype/wqy/wqy-microhei.ttc",
    "/usr/share/fonts/truetype/arphic/uming.ttc",
)
_SIMPLIFIED_CHINESE_FACE = {"NotoSerifCJK-Regular.ttc": 2, "NotoSansCJK-Regular.ttc": 2}
"""Index of the Simplified Chinese face inside the Noto CJK collections."""

_CSS = """
body{font-family:"Noto Serif CJK SC","Songti SC",serif;max-width:48rem;margin:2rem auto;padding:0 1rem;
color:#222;background:#fbf8f1;line-height:1.7}
h1{text-align:center;font-size:2.2rem;margin:3rem 0 1rem}
.meta{text-align:center;color:#777}
figure{margin:3rem 0;page-break-inside:avoid}
figure img{width:100%;border-radius:6px;box-shadow:0 2px 12px #0002}
figcaption{margin-top:.8rem;font-size:1.1rem}
.prompt{color:#888;font-size:.8rem}
.cast dt{font-weight:bold}.cast dd{margin:0 0 .8rem 0}
"""


async def export_html(book: StoryBook, story: Story) -> bytes:
    panels = await _panels(book, story)
    parts = [
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{html.escape(story.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(story.title)}</h1>",
        f"<p class='meta'>{len(panels)} panels{_style_text(story)} · Huahua</p>",
    ]
    for number, (scene, png) in enumerate(panels, start=1):
        encoded = base64.b64encode(png).decode("ascii")
        parts.append(
            f"<figure id='panel-{scene.index}'>"
            f"<img alt='panel {number}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(scene.excerpt)}"
            f"<div class='prompt'>{html.escape(scene.request.prompt)} · seed {scene.request.seed}</div>"
            "</figcaption></figure>"
        )
    if story.cast:
        parts.append("<section class='cast'><h2>Cast</h2><dl>")
        for member in story.cast:
            parts.append(f"<dt>{html.escape(member.name)}</dt><dd>{html.escape(member.description)}</dd>")
        parts.append("</dl></section>")
    parts.append("</body></html>")
    return "".join(parts).encode("utf-8")


async def export_pdf(book: StoryBook, story: Story) -> bytes:
    """Cover, one page per panel (picture and excerpt), and a cast page."""
    panels = await _panels(book, story)
    font = find_cjk_font()
    if font is None:
        raise HuahuaError("The PDF needs a Chinese font and none is installed (Debian: fonts-noto-cjk).")
    return await asyncio.to_thread(_render_pdf, story, panels, font)


def _render_pdf(story: Story, panels: list[tuple[Scene, bytes]], font: Path) -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_font("cjk", fname=str(font), collection_font_number=_SIMPLIFIED_CHINESE_FACE.get(font.name, 0))
    pdf.add_page()
    pdf.set_font("cjk", size=28)
    pdf.ln(80)
    _paragraph(pdf, 14, story.title, "C")
    pdf.set_font("cjk", size=12)
    _paragraph(pdf, 8, f"{len(panels)} panels{_style_text(story)}", "C")
    width = pdf.epw
    for scene, png in panels:
        pdf.add_page()
        pdf.image(io.BytesIO(png), w=width)
        pdf.ln(6)
        pdf.set_font("cjk", size=13)
        _paragraph(pdf, 8, scene.excerpt)
    if story.cast:
        pdf.add_page()
        pdf.set_font("cjk", size=18)
        _paragraph(pdf, 12, "Cast")
        pdf.set_font("cjk", size=12)
        for member in story.cast:
            _paragraph(pdf, 8, f"{member.name}: {member.description}")
            pdf.ln(2)
    return bytes(pdf.output())


def _paragraph(pdf: FPDF, line_height: float, text: str, align: str = "L") -> None:
    """Text over the page's width, then the cursor at the start of the next line."""
    pdf.multi_cell(0, line_height, text, align=Align.coerce(align), new_x=XPos.LMARGIN, new_y=YPos.NEXT)


async def _panels(book: StoryBook, story: Story) -> list[tuple[Scene, bytes]]:
    panels = []
    for scene in story.scenes:
        digest = await book.panel_image(scene)
        if digest is not None:
            panels.append((scene, await book.service.image(digest)))
    return panels


def _style_text(story: Story) -> str:
    return f" · {story.style}" if story.style else ""


@lru_cache(maxsize=1)
def find_cjk_font() -> Path | None:
    for candidate in _FONT_CANDIDATES:
        if Path(candidate).is_file():
            return Path(candidate)
    if shutil.which("fc-list") is None:
        return None
    try:
        listing = subprocess.run(
            ["fc-list", ":lang=zh", "file"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in listing.splitlines():
        path = Path(line.split(":", 1)[0].strip())
        if path.suffix.lower() in (".ttf", ".otf", ".ttc") and path.is_file():
            return path
    return None
