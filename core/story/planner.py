"""Excerpt -> scene: who, where, when, what happens and the mood; then the scene's Chinese prompt.

Planning reads the excerpt (translated to Chinese when needed) with jieba, the cast names added to its
dictionary, and the place, time, season and mood words of `prompts/story.toml`. Composing is pure: the
cast descriptions, the action, the carried-over setting and the story style are fitted into the
77-token budget by priority.
"""

from __future__ import annotations

import logging
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import jieba

from core.errors import EmptyPrompt
from core.prompting.budget import DEFAULT_LIMIT, PromptPart, TokenCounter, dedupe_parts, fit_parts
from core.prompting.data import PromptDataError, read_data_file
from core.prompting.language import detect_language
from core.prompting.normalize import clean_text, normalize_chinese
from core.prompting.styles import StyleBook
from core.prompting.translator import Translator
from core.story.model import CastMember, Continuity, ScenePlan, Story

logger = logging.getLogger(__name__)

SEPARATOR = "，"
_SENTENCE = re.compile(r"[。！？!?；;\n]+|(?<![\d.])\.(?!\d)")
_TRIM = " ，,、：:\"'“”‘’「」"
# priorities, highest kept longest: the lead sentence (required) > people not named in it > the other
# sentences > place > time > season > mood > style tags > quality tags
_PEOPLE, _DETAIL, _PLACE, _TIME, _SEASON, _MOOD, _STYLE, _QUALITY = 900, 800, 700, 650, 600, 500, 300, 200


@dataclass(frozen=True)
class Lexicon:
    """Scene words: Chinese key -> prompt text, plus the pronouns resolved to the last named character."""

    locations: dict[str, str]
    times: dict[str, str]
    seasons: dict[str, str]
    moods: dict[str, str]
    pronouns_zh: tuple[str, ...]
    pronouns_en: tuple[str, ...]

    @classmethod
    def from_file(cls, path: Path) -> Lexicon:
        try:
            data = tomllib.loads(read_data_file(path))
        except tomllib.TOMLDecodeError as err:
            raise PromptDataError(f"{path.name} is not valid TOML: {err}.") from err
        try:
            tables = {name: {str(k): str(v) for k, v in data[name].items()} for name in _TABLES}
            pronouns = data["pronouns"]
            return cls(
                **tables,
                pronouns_zh=tuple(pronouns["chinese"]),
                pronouns_en=tuple(word.lower() for word in pronouns["english"]),
            )
        except (KeyError, AttributeError, TypeError) as err:
            raise PromptDataError(f"{path.name} needs the tables {', '.join(_TABLES)} and pronouns.") from err


_TABLES = ("locations", "times", "seasons", "moods")


class ScenePlanner:
    """The offline planner. `plan` is async only because translation may call a service."""

    name = "offline"

    def __init__(
        self,
        lexicon: Lexicon,
        translator: Translator,
        tokenizer: TokenCounter,
        styles: StyleBook,
        limit: int = DEFAULT_LIMIT,
    ) -> None:
        self.lexicon = lexicon
        self.translator = translator
        self.tokenizer = tokenizer
        self.styles = styles
        self.limit = limit

    async def to_chinese(self, text: str) -> tuple[str, str, tuple[str, ...]]:
        """(Chinese text, detected language, notes) for any text, e.g. a cast description."""
        cleaned, _ = clean_text(text)
        if not cleaned:
            raise EmptyPrompt("That text is empty; write what happens in the scene.")
        language = detect_language(cleaned)
        if language == "zh":
            return normalize_chinese(cleaned), language, ()
        translation = await self.translator.translate(cleaned, language)
        notes = translation.notes
        if translation.unknown_words:
            notes += (f"Kept as written (not in my dictionary): {', '.join(translation.unknown_words[:8])}.",)
        return normalize_chinese(translation.text_zh), language, notes

    async def plan(self, excerpt: str, story: Story) -> ScenePlan:
        chinese, language, notes = await self.to_chinese(excerpt)
        return self.plan_chinese(excerpt, chinese, language, story, notes)

    def plan_chinese(
        self, excerpt: str, chinese: str, language: str, story: Story, notes: tuple[str, ...] = ()
    ) -> ScenePlan:
        """The pure part of planning, once the excerpt is in Chinese."""
        words = self._segment(chinese, story.cast)
        named = _cast_in_order(excerpt, chinese, story.cast)
        last = story.continuity.last_character
        if last and last not in named and story.member(last) and self._has_pronoun(excerpt, words):
            named = (last, *named)
        carried = story.continuity
        location = _first_match(self.lexicon.locations, chinese, words)
        time_of_day = _first_match(self.lexicon.times, chinese, words)
        season = _first_match(self.lexicon.seasons, chinese, words)
        return ScenePlan(
            characters=named,
            action=chinese,
            location=location or carried.location,
            time_of_day=time_of_day or carried.time_of_day,
            season=season or carried.season,
            mood=_first_match(self.lexicon.moods, chinese, words),
            language=language,
            planner=self.name,
            notes=notes,
        )

    def _segment(self, chinese: str, cast: tuple[CastMember, ...]) -> list[str]:
        tokenizer = _jieba()
        for member in cast:
            tokenizer.add_word(member.name, freq=100_000)
        return [word for word in tokenizer.cut(chinese) if word.strip()]

    def _has_pronoun(self, excerpt: str, words: list[str]) -> bool:
        if any(word in self.lexicon.pronouns_zh for word in words):
            return True
        latin = set(re.findall(r"[a-z]+", excerpt.lower()))
        return bool(latin & set(self.lexicon.pronouns_en))

    def compose(self, plan: ScenePlan, story: Story) -> tuple[str, tuple[str, ...]]:
        """The scene's Chinese prompt within the budget, and what was cut.

        The lead sentence (the first that names someone) is required; the excerpt's other sentences follow
        as details. Each present character's first mention, or else the first pronoun, becomes their
        description; a character mentioned neither way gets the description as a part of its own.
        """
        sentences = [s.strip(_TRIM) for s in _SENTENCE.split(plan.action) if s.strip(_TRIM)]
        unnamed: list[str] = []
        for name in plan.characters:
            member = story.member(name)
            if member is None:
                continue
            by_name = partial(_replace_name, member=member)
            by_pronoun = partial(self._replace_pronoun, member=member)
            if not (_replace_first(sentences, by_name) or _replace_first(sentences, by_pronoun)):
                unnamed.append(member.description)
        lead = next(
            (i for i, text in enumerate(sentences) if any(m.description in text for m in story.cast)), 0
        )
        parts: list[PromptPart] = []
        for i, text in enumerate(sentences):
            parts.append(PromptPart(text, required=True) if i == lead else PromptPart(text, _DETAIL - i))
        parts += [
            PromptPart(text, _PEOPLE - i, required=not sentences and i == 0) for i, text in enumerate(unnamed)
        ]
        said = plan.action
        for text, priority in (
            (plan.location, _PLACE),
            (plan.time_of_day, _TIME),
            (plan.season, _SEASON),
            (plan.mood, _MOOD),
        ):
            if text:
                parts.extend(PromptPart(piece, priority) for piece in text.split("，") if piece not in said)
        style = self.styles.find(story.style) if story.style else None
        if style is not None:
            parts += [PromptPart(tag, _STYLE - i) for i, tag in enumerate(style.tags)]
        parts += [PromptPart(tag, _QUALITY - i) for i, tag in enumerate(self.styles.quality)]
        kept, cut = fit_parts(dedupe_parts(parts), self.tokenizer, self.limit, SEPARATOR)
        return SEPARATOR.join(part.text for part in kept), tuple(part.text for part in cut if part.text)

    def _replace_pronoun(self, text: str, member: CastMember) -> str:
        for pronoun in self.lexicon.pronouns_zh:
            if pronoun in text and not text[text.index(pronoun) + 1 : text.index(pronoun) + 2] == "们":
                return text.replace(pronoun, member.description, 1)
        return text


def _replace_first(sentences: list[str], change: Callable[[str], str]) -> bool:
    """Apply `change` to the first sentence it alters; whether one was altered."""
    for i, text in enumerate(sentences):
        changed = change(text)
        if changed != text:
            sentences[i] = changed
            return True
    return False


def next_continuity(plan: ScenePlan, previous: Continuity) -> Continuity:
    """The plan's place and time carry over; the last named character is remembered for pronouns."""
    return replace(
        previous,
        location=plan.location,
        time_of_day=plan.time_of_day,
        season=plan.season,
        last_character=plan.characters[-1] if plan.characters else previous.last_character,
    )


_JIEBA: jieba.Tokenizer | None = None


def _jieba() -> jieba.Tokenizer:
    """One jieba tokenizer for the process (its dictionary takes about a second to load)."""
    global _JIEBA
    if _JIEBA is None:
        jieba.setLogLevel(logging.WARNING)
        _JIEBA = jieba.Tokenizer()
    return _JIEBA


def _cast_in_order(excerpt: str, chinese: str, cast: tuple[CastMember, ...]) -> tuple[str, ...]:
    """Cast names found in the original or the Chinese text, in order of first appearance."""
    found: list[tuple[int, str]] = []
    for member in cast:
        positions = [
            p for p in (_find_name(excerpt, member.name), _find_name(chinese, member.name)) if p >= 0
        ]
        if positions:
            found.append((min(positions), member.name))
    return tuple(name for _, name in sorted(found))


def _find_name(text: str, name: str) -> int:
    if name.isascii():
        match = re.search(rf"(?<![A-Za-z]){re.escape(name)}(?![A-Za-z])", text, re.IGNORECASE)
        return match.start() if match else -1
    return text.find(name)


def _replace_name(text: str, member: CastMember) -> str:
    """The first mention of the name becomes the description; later mentions stay names."""
    if member.name.isascii():
        pattern = re.compile(rf"(?<![A-Za-z]){re.escape(member.name)}(?![A-Za-z])", re.IGNORECASE)
        return pattern.sub(member.description, text, count=1)
    return text.replace(member.name, member.description, 1)


def _first_match(table: dict[str, str], text: str, words: list[str]) -> str | None:
    """The table entry whose key appears first in the text; longer keys win at one position.

    Single-character keys must be whole jieba words, so 雪 does not match 雪白.
    """
    best: tuple[int, int, str] | None = None
    whole = set(words)
    for key, value in table.items():
        if len(key) == 1 and key not in whole:
            continue
        position = text.find(key)
        if position < 0:
            continue
        rank = (position, -len(key), value)
        if best is None or rank < best:
            best = rank
    return best[2] if best else None
