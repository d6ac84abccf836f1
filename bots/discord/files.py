"""Fit a result image under Discord's attachment size limit: PNG, else a smaller JPEG, else nothing."""

from __future__ import annotations

import io
import logging

from PIL import Image

from core.images import open_image

logger = logging.getLogger(__name__)

JPEG_QUALITIES = (90, 80, 65)
SHRINK_STEPS = 4
SHRINK_FACTOR = 0.75


def fit_image(png: bytes, limit: int, stem: str) -> tuple[str, bytes] | None:
    """(file name, bytes) no larger than `limit`, or None when even a small JPEG does not fit."""
    if len(png) <= limit:
        return f"{stem}.png", png
    image = open_image(png).convert("RGB")
    for quality in JPEG_QUALITIES:
        data = _jpeg(image, quality)
        if len(data) <= limit:
            return f"{stem}.jpg", data
    for _ in range(SHRINK_STEPS):
        width, height = image.size
        image = image.resize(
            (max(1, int(width * SHRINK_FACTOR)), max(1, int(height * SHRINK_FACTOR))),
            Image.Resampling.LANCZOS,
        )
        data = _jpeg(image, JPEG_QUALITIES[-1])
        if len(data) <= limit:
            return f"{stem}.jpg", data
    return None


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()
