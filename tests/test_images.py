import io

import numpy as np
import pytest
from PIL import Image

from core.errors import InvalidOption
from core.images import array_to_pngs, grid, png_size, png_to_array, resize_png, validate_upload


def _png(width: int, height: int, color: tuple[int, int, int] = (255, 0, 0), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buf, format=fmt)
    return buf.getvalue()


def test_round_trip_keeps_pixels() -> None:
    rng = np.random.default_rng(0)
    arr = rng.uniform(-1, 1, size=(2, 3, 16, 24)).astype(np.float32)
    pngs = array_to_pngs(arr)
    assert len(pngs) == 2
    assert all(p.startswith(b"\x89PNG") for p in pngs)
    back = np.concatenate([png_to_array(p) for p in pngs])
    assert back.shape == (2, 3, 16, 24)
    assert np.abs(back - arr).max() <= 1.0 / 127.5 + 1e-6


def test_extremes_and_nan_are_clipped() -> None:
    arr = np.array([-5.0, 5.0, np.nan], dtype=np.float32).reshape(1, 3, 1, 1) * np.ones((1, 3, 2, 2))
    pixel = np.asarray(Image.open(io.BytesIO(array_to_pngs(arr)[0])))[0, 0]
    assert pixel.tolist() == [0, 255, 128]


def test_wrong_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="n,3,H,W"):
        array_to_pngs(np.zeros((3, 8, 8)))


def test_grid_of_four_is_two_by_two() -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    sheet = Image.open(io.BytesIO(grid([_png(10, 20, c) for c in colors])))
    assert sheet.size == (20, 40)
    assert sheet.getpixel((5, 5)) == colors[0]
    assert sheet.getpixel((15, 5)) == colors[1]
    assert sheet.getpixel((5, 25)) == colors[2]
    assert sheet.getpixel((15, 25)) == colors[3]


def test_grid_of_three_leaves_a_blank_cell_and_empty_is_an_error() -> None:
    assert png_size(grid([_png(8, 8)] * 3)) == (16, 16)
    with pytest.raises(InvalidOption):
        grid([])


def test_resize_png_gives_exact_size_from_jpeg() -> None:
    out = resize_png(_png(30, 20, fmt="JPEG"), 64, 48)
    assert out.startswith(b"\x89PNG")
    assert png_size(out) == (64, 48)


@pytest.mark.parametrize("data", [b"", b"not an image at all", _png(8, 8)[:40]])
def test_bad_uploads_are_invalid_option(data: bytes) -> None:
    with pytest.raises(InvalidOption):
        validate_upload(data)
    with pytest.raises(InvalidOption):
        png_to_array(data)


def test_upload_limits() -> None:
    assert validate_upload(_png(64, 32)) == (64, 32)
    with pytest.raises(InvalidOption, match="too large"):
        validate_upload(_png(64, 64), max_side=32)
    with pytest.raises(InvalidOption, match="too large"):
        validate_upload(_png(64, 64), max_bytes=10)
    with pytest.raises(InvalidOption, match="too small"):
        validate_upload(_png(4, 64))


def test_wrong_type_is_invalid_option() -> None:
    with pytest.raises(InvalidOption):
        validate_upload("a string")  # type: ignore[arg-type]
