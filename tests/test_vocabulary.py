"""The built-in vocabulary (core/vocabulary.py): its rules, and when the tiny engine and prompting use it."""

from __future__ import annotations

import string
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from core.engine import CancelToken
from core.engines.local import tiny_engine
from core.errors import EngineUnavailable
from core.settings import Settings
from core.types import GenerationRequest
from core.vocabulary import (
    builtin_tokenizer,
    builtin_vocabulary,
    builtin_vocabulary_sha256,
    builtin_vocabulary_text,
    tiny_vocabulary,
)


def test_the_builtin_vocabulary_is_made_by_its_rules() -> None:
    lines = builtin_vocabulary()
    assert len(set(lines)) == len(lines) < 49408  # fits the tiny text encoder's embedding table
    assert [lines[i] for i in (0, 1, 99, 100, 101, 102, 103)] == [
        "[PAD]", "[unused1]", "[unused99]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
    ]  # fmt: skip
    assert builtin_tokenizer() is builtin_tokenizer()
    # every assigned character of the main CJK block is one token of its own
    cjk = "".join(chr(c) for c in range(0x4E00, 0xA000) if unicodedata.category(chr(c)) == "Lo")
    assert len(cjk) > 20_900 and builtin_tokenizer().tokenize(cjk) == list(cjk)
    # any ASCII word splits into known pieces, never [UNK]
    rng = np.random.default_rng(5)
    for _ in range(200):
        word = "".join(rng.choice(list(string.ascii_letters + string.digits), size=int(rng.integers(1, 30))))
        pieces = builtin_tokenizer().tokenize(word)
        assert "[UNK]" not in pieces and "".join(p.removeprefix("##") for p in pieces) == word.lower()
    assert builtin_vocabulary_text() == "".join(line + "\n" for line in lines)
    assert builtin_vocabulary_sha256() != "45bbac6b341c319adc98a532532882e91a9cefc0329aa57bac9ae761c27b291c"


def _settings(tmp_path: Path, **values: object) -> Settings:
    base: dict[str, object] = {"model_dir": tmp_path / "models", "engine": "tiny", "_env_file": None}
    return Settings(**{**base, **values})  # type: ignore[arg-type]


def test_the_tiny_engine_prefers_an_installed_or_configured_vocabulary(tmp_path: Path) -> None:
    assert tiny_vocabulary(_settings(tmp_path)) is builtin_tokenizer()  # nothing installed
    installed = _settings(tmp_path)
    installed.model_dir.mkdir()
    installed.resolved_vocab_path.write_text(builtin_vocabulary_text(), encoding="utf-8")
    assert tiny_vocabulary(installed) == installed.resolved_vocab_path
    configured = _settings(tmp_path / "other", vocab_path=tmp_path / "mine.txt")
    assert tiny_vocabulary(configured) == tmp_path / "mine.txt"  # named but absent: loading says so


async def test_a_configured_vocabulary_that_is_missing_is_reported(tmp_path: Path) -> None:
    engine = tiny_engine(_settings(tmp_path, vocab_path=tmp_path / "absent_vocab.txt"))
    await engine.start()
    try:
        with pytest.raises(EngineUnavailable, match=r"absent_vocab\.txt"):
            request = GenerationRequest(prompt="猫", width=64, height=64, steps=1, seed=1)
            await engine.generate(request, lambda step, total: None, CancelToken())
    finally:
        await engine.close()
