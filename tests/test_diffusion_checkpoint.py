"""Checkpoints: round trips in both formats, and a clear CheckpointError for every kind of bad file."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from tests.support import NO_MINDSPORE

ms = pytest.importorskip("mindspore", reason=NO_MINDSPORE)

from mindspore import Tensor  # noqa: E402

from core.diffusion import WukongConfig, WukongPipeline, check_checkpoint, save_checkpoint  # noqa: E402
from core.errors import CheckpointError  # noqa: E402

CFG = WukongConfig.tiny()
PROBE = "model.diffusion_model.out.2.conv.weight"


@pytest.fixture(scope="module")
def pipe() -> WukongPipeline:
    return WukongPipeline.random(CFG, None, seed=0)


@pytest.fixture
def vocab(tmp_path: Path) -> Path:
    path = tmp_path / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "猫", "狗"]) + "\n", encoding="utf-8")
    return path


def _arrays(pipe: WukongPipeline) -> dict[str, np.ndarray]:
    return {n: p.asnumpy() for n, p in pipe.model.named_parameters().items()}


def _write_ckpt(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    ms.save_checkpoint([{"name": n, "data": Tensor(a)} for n, a in arrays.items()], str(path))
    return path


def _outputs(pipe: WukongPipeline) -> tuple[np.ndarray, np.ndarray]:
    ids = np.zeros((1, CFG.context_length), np.int64)
    ids[0, :3] = [2, 4, 3]
    ctx = pipe.encode_tokens(ids)
    x = np.random.default_rng(5).standard_normal((1, 4, 4, 4)).astype(np.float32)
    return ctx, pipe.predict_noise(x, np.array([500]), ctx)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_round_trip_gives_identical_weights_and_outputs(
    pipe: WukongPipeline, vocab: Path, tmp_path: Path, suffix: str
) -> None:
    path = save_checkpoint(pipe, tmp_path / f"tiny{suffix}")
    loaded = WukongPipeline.load(path, vocab, config=CFG)
    assert loaded.random_weights is False and pipe.random_weights is True
    before, after = _arrays(pipe), _arrays(loaded)
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[n], after[n]) for n in before)
    for a, b in zip(_outputs(pipe), _outputs(loaded), strict=True):
        np.testing.assert_array_equal(a, b)


def test_check_checkpoint_reports_a_good_file(pipe: WukongPipeline, tmp_path: Path) -> None:
    report = check_checkpoint(save_checkpoint(pipe, tmp_path / "t.ckpt"), CFG)
    assert report.ok and report.missing == () and report.mismatched == () and report.extra == ()
    assert report.expected == report.found == report.matched == len(pipe.parameter_shapes())
    assert report.problem() == ""


def test_missing_parameter_is_named(pipe: WukongPipeline, vocab: Path, tmp_path: Path) -> None:
    arrays = _arrays(pipe)
    del arrays[PROBE]
    path = _write_ckpt(tmp_path / "missing.ckpt", arrays)
    report = check_checkpoint(path, CFG)
    assert not report.ok and report.missing == (PROBE,)
    with pytest.raises(CheckpointError, match=PROBE.replace(".", r"\.")):
        WukongPipeline.load(path, vocab, config=CFG)


def test_wrong_shape_is_named(pipe: WukongPipeline, vocab: Path, tmp_path: Path) -> None:
    arrays = _arrays(pipe)
    arrays[PROBE] = np.zeros((4, 32, 1, 1), np.float32)
    path = _write_ckpt(tmp_path / "shape.ckpt", arrays)
    report = check_checkpoint(path, CFG)
    assert report.mismatched == ((PROBE, (4, 32, 3, 3), (4, 32, 1, 1)),)
    with pytest.raises(CheckpointError, match=r"wrong shape .*out\.2\.conv\.weight"):
        WukongPipeline.load(path, vocab, config=CFG)


def test_official_config_against_tiny_file_is_a_mismatch(pipe: WukongPipeline, tmp_path: Path) -> None:
    report = check_checkpoint(save_checkpoint(pipe, tmp_path / "t.safetensors"), WukongConfig())
    assert not report.ok and report.mismatched and report.matched < report.expected


def test_extra_entries_are_ignored_with_one_log_line(
    pipe: WukongPipeline, vocab: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    arrays = _arrays(pipe)
    arrays["optimizer.moments.step"] = np.ones(3, np.float32)
    arrays["global_step"] = np.zeros(1, np.float32)
    path = _write_ckpt(tmp_path / "extra.ckpt", arrays)
    with caplog.at_level(logging.INFO, logger="core.diffusion.checkpoint"):
        loaded = WukongPipeline.load(path, vocab, config=CFG)
    lines = [r.getMessage() for r in caplog.records if "unknown checkpoint entries" in r.getMessage()]
    assert len(lines) == 1 and "ignoring 2" in lines[0]
    np.testing.assert_array_equal(_outputs(loaded)[1], _outputs(pipe)[1])
    assert set(check_checkpoint(path, CFG).extra) == {"optimizer.moments.step", "global_step"}


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_truncated_file(pipe: WukongPipeline, vocab: Path, tmp_path: Path, suffix: str) -> None:
    good = save_checkpoint(pipe, tmp_path / f"good{suffix}").read_bytes()
    bad = tmp_path / f"cut{suffix}"
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated, corrupt or not a checkpoint"):
        WukongPipeline.load(bad, vocab, config=CFG)
    with pytest.raises(CheckpointError):
        check_checkpoint(bad, CFG)


@pytest.mark.parametrize("suffix", [".ckpt", ".safetensors"])
def test_overwritten_weight_bytes(pipe: WukongPipeline, vocab: Path, tmp_path: Path, suffix: str) -> None:
    path = save_checkpoint(pipe, tmp_path / f"t{suffix}")
    blob = bytearray(path.read_bytes())
    marker = pipe.model.named_parameters()[PROBE].asnumpy().tobytes()[:64]
    at = bytes(blob).find(marker)
    assert at > 0
    blob[at : at + 64] = b"\xff" * 64  # NaN floats
    path.write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match=r"corrupt: parameter .*out\.2\.conv\.weight"):
        WukongPipeline.load(path, vocab, config=CFG)


@pytest.mark.parametrize(
    "content", [b"", b"not a checkpoint\n" * 20, bytes(range(256)) * 8, b"\x10\x00\x00\x00\x00\x00\x00\x00{"]
)
def test_garbage_file(vocab: Path, tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as caught:
        WukongPipeline.load(path, vocab, config=CFG)
    assert "garbage.ckpt" in str(caught.value)


def test_not_a_file(vocab: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        WukongPipeline.load(tmp_path / "absent.ckpt", vocab, config=CFG)
    with pytest.raises(CheckpointError, match="not a file"):
        check_checkpoint(tmp_path, CFG)


def test_missing_vocabulary_is_a_checkpoint_error(pipe: WukongPipeline, tmp_path: Path) -> None:
    path = save_checkpoint(pipe, tmp_path / "t.ckpt")
    with pytest.raises(CheckpointError, match="vocabulary"):
        WukongPipeline.load(path, tmp_path / "no-vocab.txt", config=CFG)


def test_float16_setting_keeps_norms_in_float32(pipe: WukongPipeline, vocab: Path, tmp_path: Path) -> None:
    path = save_checkpoint(pipe, tmp_path / "t.safetensors")
    half = WukongPipeline.load(path, vocab, config=CFG, dtype="float16")
    params = half.model.named_parameters()
    assert half.dtype == "float16"
    assert params[PROBE].dtype == ms.float16
    assert params["model.diffusion_model.out.0.gamma"].dtype == ms.float32
    np.testing.assert_allclose(
        params[PROBE].asnumpy().astype(np.float32), _arrays(pipe)[PROBE], rtol=1e-3, atol=1e-3
    )
