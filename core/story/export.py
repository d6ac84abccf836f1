"""The storybook: a self-contained HTML file (pictures embedded) and a PDF, one page per panel.

The HTML is always made; the PDF needs a font with Chinese glyphs that fpdf2 can embed (an outline
font: Noto CJK, Source Han, WenQuanYi Zen/Micro Hei, Droid Sans Fallback, AR PL...), found at the usual
paths or through fontconfig. Without one, the storybook is the HTML alone, and the reply says why.
"""

from __future__ import annotations

import asyncio
import base64
import html
import io
import logging
import re
import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from fpdf import FPDF
from fpdf.enums import Align, XPos, YPos

from core.errors import HuahuaError

if TYPE_CHECKING:
    from core.story.model import Scene, Story

logger = logging.getLogger(__name__)

_NOTO_SC = 2
"""Index of the Simplified Chinese face inside the Noto CJK collections (JP, KR, SC, TC, HK)."""
_FONT_CANDIDATES: tuple[tuple[str, int], ...] = (
    # Debian/Ubuntu fonts-noto-cjk, Fedora google-noto-*-cjk-fonts, Arch noto-fonts-cjk
    ("/usr/share/fonts/opentype/noto/NotoSerifCJK-Regular.ttc", _NOTO_SC),
    ("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc", _NOTO_SC),
    ("/usr/share/fonts/google-noto-cjk/NotoSerifCJK-Regular.ttc", _NOTO_SC),
    ("/usr/share/fonts/google-noto-cjk/NotoSansCJK-Regular.ttc", _NOTO_SC),
    ("/usr/share/fonts/noto-cjk/NotoSerifCJK-Regular.ttc", _NOTO_SC),
    ("/usr/share/fonts/noto-cjk/NotoSansCJK-Regular.ttc", _NOTO_SC),
    # WenQuanYi, Droid Sans Fallback, AR PL (Debian fonts-wqy-*, fonts-droid-fallback, fonts-arphic-*)
    ("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/truetype/wqy/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc", 0),
    ("/usr/share/fonts/wqy-microhei/wqy-microhei.ttc", 0),
    ("/usr/share/fonts/truetype/droid/DroidSansFallbackFull.ttf", 0),
    ("/usr/share/fonts/google-droid-sans-fonts/DroidSansFallbackFull.ttf", 0),
    ("/usr/share/fonts/truetype/arphic/uming.ttc", 0),
    ("/usr/share/fonts/truetype/arphic/ukai.ttc", 0),
)
"""(path, face index) of fonts that are known to work, best first; then fontconfig is asked."""
_PREFERRED_FAMILIES = (
    "Noto Serif CJK SC",
    "Noto Sans CJK SC",
    "Source Han Serif SC",
    "Source Han Sans SC",
    "Noto Serif SC",
    "Noto Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "Droid Sans Fallback",
    "AR PL UMing CN",
    "AR PL UKai CN",
)
"""Families ranked by fontconfig's answer; any other outline font with Chinese comes after them."""
_NOT_FOR_BOOKS = re.compile(r"\b(unifont|bitmap|pixel|fixed|mono)\b", re.IGNORECASE)
"""Pixel and monospaced families: they have the glyphs, but a storybook set in them looks broken."""
_EMBEDDABLE = (".ttf", ".otf", ".ttc")
PDF_NEEDS_A_FONT = (
    "The PDF needs a Chinese font and none is installed (Debian: apt install fonts-noto-cjk, "
    "or fonts-wqy-zenhei)."
)


@dataclass(frozen=True)
class CjkFont:
    """A font file with Chinese glyphs, and which face of a collection (.ttc) to use."""

    path: Path
    index: int = 0
    family: str = ""


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


Panels = list[tuple["Scene", bytes]]
"""The book's chosen panels with their PNG bytes, in order (`StoryBook.panel_pictures`)."""


async def export_html(story: Story, panels: Panels) -> bytes:
    parts = [
        "<!doctype html><html lang='zh'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width,initial-scale=1'>",
        f"<title>{html.escape(story.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(story.title)}</h1>",
        f"<p class='meta'>{len(panels)} panels{_style_text(story)} · Huahua</p>",
    ]
    for number, (scene, png) in enumerate(panels, start=1):
        encoded = base64.b64encode(png).decode("ascii")
        own = scene.own_request
        parts.append(
            f"<figure id='panel-{scene.index}'>"
            f"<img alt='panel {number}' src='data:image/png;base64,{encoded}'>"
            f"<figcaption>{html.escape(scene.excerpt)}"
            f"<div class='prompt'>{html.escape(own.prompt)} · seed {own.seed}</div>"
            "</figcaption></figure>"
        )
    if story.cast:
        parts.append("<section class='cast'><h2>Cast</h2><dl>")
        for member in story.cast:
            parts.append(f"<dt>{html.escape(member.name)}</dt><dd>{html.escape(member.description)}</dd>")
        parts.append("</dl></section>")
    parts.append("</body></html>")
    return "".join(parts).encode("utf-8")


async def export_pdf(story: Story, panels: Panels) -> bytes:
    """Cover, one page per panel (picture and excerpt), and a cast page; HuahuaError without a font."""
    font = await asyncio.to_thread(find_cjk_font)
    if font is None:
        raise HuahuaError(PDF_NEEDS_A_FONT)
    try:
        return await asyncio.to_thread(_render_pdf, story, panels, font)
    except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as exc:  # fpdf2 and fontTools
        logger.warning("could not make the PDF with %s: %s", font.path, exc)
        raise HuahuaError(f"The PDF could not be made with the font {font.path.name}.") from exc


async def export_files(story: Story, panels: Panels) -> tuple[tuple[str, bytes], ...]:
    """The storybook as `<title>.html` and, when a Chinese font is there, `<title>.pdf`.

    The HTML never depends on the PDF: a missing font costs the PDF only (see `pdf_problem`)."""
    files = [(file_name(story, "html"), await export_html(story, panels))]
    try:
        files.append((file_name(story, "pdf"), await export_pdf(story, panels)))
    except HuahuaError as exc:
        logger.info("storybook %s without a PDF: %s", story.id, exc.message)
    return tuple(files)


def pdf_problem(files: tuple[tuple[str, bytes], ...]) -> str | None:
    """Why `files` (from `export_files`) has no PDF, as one sentence; None when it has one."""
    if any(name.endswith(".pdf") for name, _ in files):
        return None
    return PDF_NEEDS_A_FONT if find_cjk_font() is None else "The PDF could not be made this time."


def file_name(story: Story, suffix: str) -> str:
    """`<title>.<suffix>` with the title's words kept (Chinese included), or `storybook.<suffix>`."""
    stem = re.sub(r"[^\w-]+", "-", story.title).strip("-_")[:60].strip("-_")
    return f"{stem or 'storybook'}.{suffix}"


def _render_pdf(story: Story, panels: list[tuple[Scene, bytes]], font: CjkFont) -> bytes:
    pdf = FPDF(format="A4")
    pdf.set_auto_page_break(auto=True, margin=15)
    pdf.add_font("cjk", fname=str(font.path), collection_font_number=font.index)
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


def _style_text(story: Story) -> str:
    return f" · {story.style}" if story.style else ""


@lru_cache(maxsize=1)
def find_cjk_font() -> CjkFont | None:
    """The best font for Chinese text in a PDF: a known path, else fontconfig's choice (`fc-list`)."""
    for path, index in _FONT_CANDIDATES:
        if Path(path).is_file():
            return CjkFont(Path(path), index)
    if shutil.which("fc-list") is None:
        return None
    try:
        listing = subprocess.run(
            ["fc-list", "--format", "%{file}\t%{index}\t%{family}\t%{fontformat}\n", ":lang=zh"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    font = best_cjk_font(listing)
    return font if font is not None and font.path.is_file() else None


def best_cjk_font(listing: str) -> CjkFont | None:
    """Pick from `fc-list --format '%{file}\t%{index}\t%{family}\t%{fontformat}\n' :lang=zh` lines:
    outline fonts fpdf2 can embed, preferred families first, never pixel or monospaced ones."""
    ranked: list[tuple[int, str, CjkFont]] = []
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        file, index, families = parts[0].strip(), parts[1].strip(), parts[2]
        fmt = parts[3].strip() if len(parts) > 3 else ""
        if not file.lower().endswith(_EMBEDDABLE) or fmt not in ("", "TrueType", "CFF"):
            continue
        if _NOT_FOR_BOOKS.search(families) or re.search(r"unifont|bitmap|pixel", file, re.IGNORECASE):
            continue
        names = [name.strip() for name in families.split(",")]
        rank = min(
            (_PREFERRED_FAMILIES.index(n) for n in names if n in _PREFERRED_FAMILIES),
            default=len(_PREFERRED_FAMILIES),
        )
        font = CjkFont(Path(file), int(index) if index.isdigit() else 0, names[0])
        ranked.append((rank, file, font))
    return min(ranked, key=lambda item: item[:2])[2] if ranked else None
