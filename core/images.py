"""PNG helpers: numpy (n,3,H,W) in [-1,1] <-> PNG bytes, grids, resizing and upload checks."""

from __future__ import annotations

import contextlib
import io
import logging
import math
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.errors import InvalidOption

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 20 * 1024 * 1024
MAX_UPLOAD_SIDE = 4096
MIN_UPLOAD_SIDE = 8
MAX_DECODE_PIXELS = 8192 * 8192
"""No image larger than this (by its header) is ever decoded: 192 MiB as RGB."""


def array_to_pngs(images: np.ndarray) -> list[bytes]:
    """Encode a batch (n,3,H,W) of floats in [-1,1] as PNG bytes, one per image."""
    arr = np.asarray(images)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected an array of shape (n,3,H,W), got {arr.shape}")
    finite = np.nan_to_num(arr.astype(np.float32), nan=0.0, posinf=1.0, neginf=-1.0)
    pixels = np.clip((finite + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)
    out = []
    for one in pixels:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(one.transpose(1, 2, 0)), "RGB").save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def png_to_array(data: bytes) -> np.ndarray:
    """Decode one image (any format Pillow reads) to (1,3,H,W) float32 in [-1,1]."""
    image = open_image(data)
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    return (pixels.transpose(2, 0, 1)[None] / 127.5 - 1.0).astype(np.float32)


def open_image(data: bytes, *, max_pixels: int = MAX_DECODE_PIXELS) -> Image.Image:
    """Decode image bytes; anything unreadable, or larger than `max_pixels` by its header, is InvalidOption.

    The size is read from the header first (Pillow's `Image.open` is lazy), so a huge picture is refused
    before its pixels are decoded. Decoding is CPU work: async callers run this in a thread."""
    with _opened(data) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidOption("The uploaded image is too large.")
        try:
            image.load()
        except (OSError, SyntaxError, ValueError, EOFError) as exc:
            raise InvalidOption("The uploaded file is not an image I can read.") from exc
        return image


def image_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the image's header (a PNG's IHDR), without decoding a single pixel."""
    with _opened(data) as image:
        width, height = image.size
        return width, height


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """Pillow's lazy open: reads the header only; pixels are decoded by `load()`."""
    if not isinstance(data, bytes | bytearray) or not data:
        raise InvalidOption("The uploaded file is empty or not an image.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InvalidOption("The uploaded file is not an image I can read.") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise InvalidOption("The uploaded image is too large.") from exc
    yield image


def check_upload_bytes(size: int, *, max_bytes: int = MAX_UPLOAD_BYTES) -> None:
    """Refuse an upload by the byte count a platform reports, before anything is downloaded."""
    if size > max_bytes:
        raise InvalidOption(f"The image is too large: at most {max_bytes // (1024 * 1024)} MB, please.")


def validate_upload(
    data: bytes,
    *,
    max_bytes: int = MAX_UPLOAD_BYTES,
    max_side: int = MAX_UPLOAD_SIDE,
    decode: bool = True,
) -> tuple[int, int]:
    """Check an uploaded image and return its (width, height); raise InvalidOption when unusable.

    Byte count, then width and height from the header, are checked before any pixel is decoded;
    with `decode` the pixels are then decoded once to prove the file is whole. That is CPU work
    (a 4096×4096 picture takes a while): from async code call it through `asyncio.to_thread`."""
    if isinstance(data, bytes | bytearray):
        check_upload_bytes(len(data), max_bytes=max_bytes)
    width, height = image_size(data)
    if width > max_side or height > max_side:
        raise InvalidOption(f"The image is too large: at most {max_side}×{max_side} pixels, please.")
    if width < MIN_UPLOAD_SIDE or height < MIN_UPLOAD_SIDE:
        raise InvalidOption(f"The image is too small: at least {MIN_UPLOAD_SIDE}×{MIN_UPLOAD_SIDE} pixels.")
    if decode:
        open_image(data, max_pixels=max_side * max_side)
    return width, height


def resize_png(data: bytes, width: int, height: int) -> bytes:
    """Resize an image to exactly (width, height) with Lanczos filtering; returns PNG bytes."""
    if width < 1 or height < 1:
        raise InvalidOption("The target size must be positive.")
    image = open_image(data).convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def grid(pngs: Sequence[bytes], columns: int | None = None) -> bytes:
    """Tile images into one PNG (2x2 for four); cells take the size of the first image."""
    if not pngs:
        raise InvalidOption("There are no images to put in a grid.")
    images = [open_image(p).convert("RGB") for p in pngs]
    cols = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = images[0].size
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    for index, image in enumerate(images):
        if image.size != (cell_w, cell_h):
            image = image.resize((cell_w, cell_h), Image.Resampling.LANCZOS)
        sheet.paste(image, ((index % cols) * cell_w, (index // cols) * cell_h))
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    return buf.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) of image bytes that are known to be whole (decodes them)."""
    width, height = open_image(data).size
    return width, height
