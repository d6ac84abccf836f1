"""Prompt building: language, normalisation, translation, styles and the token budget."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.prompting.budget import DEFAULT_LIMIT, PromptPart, TokenCounter, fit_parts
from core.prompting.builder import PromptBuilder
from core.prompting.data import DEFAULT_PROMPTS_DIR, PromptDataError, data_lines
from core.prompting.glossary import Glossary
from core.prompting.styles import Style, StyleBook
from core.prompting.translator import GlossaryTranslator, LlmTranslator, Translation, Translator
from core.settings import Settings

__all__ = [
    "DEFAULT_LIMIT",
    "DEFAULT_PROMPTS_DIR",
    "Glossary",
    "GlossaryTranslator",
    "LlmTranslator",
    "PromptBuilder",
    "PromptData",
    "PromptDataError",
    "PromptPart",
    "Style",
    "StyleBook",
    "TokenCounter",
    "Translation",
    "Translator",
    "fit_parts",
    "load_prompt_builder",
    "load_prompt_data",
]


@dataclass(frozen=True)
class PromptData:
    """Everything under prompts/ that prompt building needs, loaded once."""

    glossary: Glossary
    styles: StyleBook
    default_negative: tuple[str, ...]
    directory: Path


def load_prompt_data(directory: Path | None = None) -> PromptData:
    """Read glossary.tsv, styles.toml and negative.txt; PromptDataError names any malformed file."""
    directory = directory or DEFAULT_PROMPTS_DIR
    negative_path = directory / "negative.txt"
    negative = tuple(
        term.strip()
        for _, line in data_lines(negative_path)
        for term in line.replace("，", ",").split(",")
        if term.strip()
    )
    return PromptData(
        glossary=Glossary.from_file(directory / "glossary.tsv"),
        styles=StyleBook.from_file(directory / "styles.toml"),
        default_negative=negative,
        directory=directory,
    )


def load_prompt_builder(settings: Settings, directory: Path | None = None) -> PromptBuilder:
    """The builder the settings ask for: data from `settings.prompts_dir`, the real tokenizer when the
    vocabulary is present (for `tiny`, the tiny engine's own), and the glossary or LLM translator."""
    from core.tokenizer import WordPieceTokenizer, load_tokenizer
    from core.vocabulary import tiny_vocabulary

    vocab = tiny_vocabulary(settings) if settings.engine == "tiny" else settings.resolved_vocab_path
    tokenizer = vocab if isinstance(vocab, WordPieceTokenizer) else load_tokenizer(vocab)

    data = load_prompt_data(directory or settings.prompts_dir)
    glossary_translator = GlossaryTranslator(data.glossary)
    translator: Translator = glossary_translator
    if settings.translator == "llm":
        translator = LlmTranslator.from_settings(settings, glossary_translator, data.directory)
    return PromptBuilder(
        data.glossary,
        data.styles,
        tokenizer,
        translator,
        default_negative=data.default_negative,
    )
