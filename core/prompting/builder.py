"""Chat text -> the Chinese prompt and negative prompt for Wukong-Huahua, with the reasons why."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

from core.errors import EmptyPrompt
from core.prompting.budget import DEFAULT_LIMIT, PromptPart, TokenCounter, dedupe_parts, fit_parts
from core.prompting.glossary import Glossary
from core.prompting.language import detect_language
from core.prompting.normalize import clean_text, normalize_chinese
from core.prompting.styles import StyleBook
from core.prompting.translator import Translator
from core.types import BuiltPrompt

logger = logging.getLogger(__name__)

SEPARATOR = "，"
_CLAUSE = re.compile(r"[,;!?。，；！？\n]+|(?<!\d)\.(?!\d)")
_TERMS = re.compile(r"[,;，；、/|\n]+")
_SHOWN_CUTS = 5

# priorities: subject head (required) > subject details > quality tags > style tags
_DETAIL, _QUALITY, _STYLE = 3000, 2000, 1000
_USER_NEGATIVE, _STYLE_NEGATIVE, _DEFAULT_NEGATIVE = 3000, 2000, 1000


class PromptBuilder:
    """Builds prompts; the translator call is the only I/O, everything else is deterministic."""

    def __init__(
        self,
        glossary: Glossary,
        styles: StyleBook,
        tokenizer: TokenCounter,
        translator: Translator,
        default_negative: Iterable[str] = (),
    ) -> None:
        self.glossary = glossary
        self.styles = styles
        self.tokenizer = tokenizer
        self.translator = translator
        self.default_negative = tuple(default_negative)
        self.limit = int(getattr(tokenizer, "max_pieces", DEFAULT_LIMIT))

    async def build(self, text: str, style: str | None = None, negative: str | None = None) -> BuiltPrompt:
        """Raises EmptyPrompt for text with nothing to draw, InvalidOption for an unknown style."""
        preset = self.styles.get(style) if style else None
        cleaned, had_markup = clean_text(text)
        if not cleaned:
            raise EmptyPrompt("Please describe the picture you want, for example: 一只在月球上看书的猫.")
        notes: list[str] = []
        if had_markup:
            notes.append("HTML-like tags were removed from your text.")

        language = detect_language(cleaned)
        unknown: tuple[str, ...] = ()
        if language == "zh":
            subject = normalize_chinese(cleaned)
        else:
            translation = await self.translator.translate(cleaned, language)
            subject = normalize_chinese(translation.text_zh)
            unknown = translation.unknown_words
            notes.extend(translation.notes)
        clauses = [clause.strip() for clause in _CLAUSE.split(subject) if clause.strip()]
        if not clauses:
            raise EmptyPrompt("I could not find anything to draw in that text; please describe a picture.")
        if unknown:
            notes.append(
                "These words are not in my dictionary and were kept as written, so the model may not "
                f"understand them: {', '.join(unknown[:10])}. Writing them in Chinese helps."
            )

        parts = [PromptPart(clauses[0], required=True)]
        parts += [PromptPart(clause, _DETAIL - i) for i, clause in enumerate(clauses[1:])]
        if preset is not None:
            parts += [PromptPart(tag, _STYLE - i) for i, tag in enumerate(preset.tags)]
        parts += [PromptPart(tag, _QUALITY - i) for i, tag in enumerate(self.styles.quality)]
        kept, cut = fit_parts(dedupe_parts(parts), self.tokenizer, self.limit, SEPARATOR)
        prompt = SEPARATOR.join(part.text for part in kept)
        if cut:
            notes.append(_cut_note(cut, self.limit))

        negative_prompt, negative_cut = self._negative(negative, preset.negative if preset else ())
        if negative_cut:
            notes.append("The negative prompt was too long, so its last default terms were left out.")
        built = BuiltPrompt(
            prompt=prompt,
            negative_prompt=negative_prompt,
            language=language,
            source_text=text,
            token_count=self.tokenizer.count(prompt),
            cut=tuple(part.text for part in cut),
            unknown_words=unknown,
            notes=tuple(notes),
        )
        logger.debug("built prompt: %d pieces, %d cut, language %s", built.token_count, len(cut), language)
        return built

    def negative_prompt(self, style: str | None = None) -> str:
        """The default negative prompt plus a style's own terms (story panels use it)."""
        preset = self.styles.get(style) if style else None
        return self._negative(None, preset.negative if preset else ())[0]

    def _negative(self, user: str | None, style_terms: tuple[str, ...]) -> tuple[str, list[PromptPart]]:
        parts: list[PromptPart] = []
        if user:
            cleaned, _ = clean_text(user)
            if detect_language(cleaned) != "zh":
                cleaned = self.glossary.translate(cleaned).text_zh
            terms = [term.strip() for term in _TERMS.split(normalize_chinese(cleaned)) if term.strip()]
            parts += [PromptPart(term, _USER_NEGATIVE - i) for i, term in enumerate(terms)]
        parts += [PromptPart(term, _STYLE_NEGATIVE - i) for i, term in enumerate(style_terms)]
        parts += [PromptPart(term, _DEFAULT_NEGATIVE - i) for i, term in enumerate(self.default_negative)]
        kept, cut = fit_parts(dedupe_parts(parts), self.tokenizer, self.limit, SEPARATOR)
        return SEPARATOR.join(part.text for part in kept), cut


def _cut_note(cut: list[PromptPart], limit: int) -> str:
    shown = "、".join(part.text[:20] for part in cut[:_SHOWN_CUTS])
    more = f" and {len(cut) - _SHOWN_CUTS} more" if len(cut) > _SHOWN_CUTS else ""
    return f"The model reads at most {limit} word pieces, so these parts were left out: {shown}{more}."
