"""Offline English-to-Chinese prompt translation over `prompts/glossary.tsv`.

Rows are `english<TAB>chinese`; a Chinese side of `-` marks a stop word that is dropped. A header
`# --- <section> ---` gives the word class of the rows below it (see `SECTIONS`); a word may appear once
per class ("fall" the season and "fall" the verb). Translation runs in three steps: match the longest
phrase over base forms (plurals, tenses, comparatives, -ly adverbs, irregular verbs), group the matches
into chunks (counted noun groups, locative and time phrases, verbs with their adverbs), then order the
chunks the Chinese way (time first, place before the verb). Words the list does not know stay as written
and are reported, never dropped.
"""

from __future__ import annotations

import enum
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from core.prompting.data import PromptDataError, read_data_file
from core.prompting.language import is_han

STOP = "-"
CLAUSE_BREAK = "，"
SLOT = "…"


class WordClass(enum.Enum):
    STOP = "stop"
    OTHER = "other"
    NOUN = "noun"
    ANIMATE = "animate"  # people and animals: "at" them is 对着, not 在
    PLACE = "place"
    WEATHER = "weather"  # weather, light, sky bodies: "in" it is 在…中, "at" it is 对着
    TIME = "time"  # a noun naming a time: "at night" is a time phrase, not a place
    ADJECTIVE = "adjective"
    ADVERB = "adverb"
    VERB = "verb"
    PREPOSITION = "preposition"  # Chinese side is a frame around the noun group: 在…上
    LOCATIVE = "locative"  # a whole place phrase ("on the moon")
    TIME_PHRASE = "time phrase"  # a whole time phrase ("at night")
    NUMBER = "number"
    STYLE = "style"


W = WordClass
# section header -> (word class, default measure word when counted)
SECTIONS: dict[str, tuple[WordClass, str]] = {
    "stop words": (W.STOP, ""),
    "pronouns and auxiliaries": (W.STOP, ""),
    "relations and small words that carry meaning": (W.OTHER, ""),
    "locative prepositions": (W.PREPOSITION, ""),
    "locative phrases": (W.LOCATIVE, ""),
    "time phrases": (W.TIME_PHRASE, ""),
    "numbers": (W.NUMBER, ""),
    "animals": (W.ANIMATE, "只"),
    "people": (W.ANIMATE, "个"),
    "body": (W.NOUN, "个"),
    "clothing and objects": (W.NOUN, "个"),
    "food": (W.NOUN, "份"),
    "flowers": (W.NOUN, "朵"),
    "trees and plants": (W.NOUN, "棵"),
    "buildings and mountains": (W.PLACE, "座"),
    "rivers and roads": (W.PLACE, "条"),
    "places": (W.PLACE, "个"),
    "times": (W.TIME, ""),
    "weather and nature": (W.WEATHER, "个"),
    "colours": (W.ADJECTIVE, ""),
    "materials": (W.ADJECTIVE, ""),
    "adjectives": (W.ADJECTIVE, ""),
    "emotions": (W.ADJECTIVE, ""),
    "adverbs": (W.ADVERB, ""),
    "actions": (W.VERB, ""),
    "styles, art and quality terms": (W.STYLE, "个"),
    "photography": (W.STYLE, "个"),
    "emoji": (W.NOUN, "个"),
}
MEASURE_WORDS = {
    "dog": "条", "fish": "条", "snake": "条", "dragon": "条", "goldfish": "条", "koi": "条", "horse": "匹",
    "pony": "匹", "cow": "头", "elephant": "头", "star": "颗", "book": "本", "car": "辆", "bus": "辆",
    "bicycle": "辆", "bike": "辆", "boat": "艘", "ship": "艘", "sailboat": "艘", "lantern": "盏",
    "lamp": "盏", "candle": "支", "sword": "把", "chair": "把", "umbrella": "把", "key": "把",
    "knife": "把", "cloud": "朵", "bridge": "座", "letter": "封", "picture": "幅", "painting": "幅",
    "cup": "杯", "bowl": "碗", "bottle": "瓶", "leaf": "片", "feather": "根", "apple": "个", "egg": "个",
}  # fmt: skip
NOMINAL = frozenset({W.NOUN, W.ANIMATE, W.PLACE, W.WEATHER, W.TIME, W.STYLE})
MODIFIERS = frozenset({W.ADJECTIVE})
# Determiners are dropped, and ignored inside phrases: "rode his horse" matches "ride horse".
DETERMINERS = frozenset({"a", "an", "the", "his", "her", "their", "my", "your", "our", "its"})
# Prepositions whose phrase stands before the verb in Chinese; the others (穿过, 进, 到…上) follow it.
FRONTED = ("在", "对着", "沿着", "朝着", "从", "向")
_PLACE_REACH = 4  # how many chunks a place phrase may jump back to find its verb
IN_MIDDLE = frozenset({"sky", "water", "sea", "ocean", "air", "crowd", "dark", "darkness", "dream", "smoke"})
IN_ON = frozenset({"tree", "bed", "sofa", "couch", "field"})
IRREGULAR = dict(
    pair.split(":")
    for pair in (
        "ran:run ate:eat eaten:eat saw:see seen:see flew:fly flown:fly went:go gone:go came:come "
        "sat:sit stood:stand took:take taken:take gave:give given:give got:get gotten:get made:make "
        "found:find held:hold told:tell said:say thought:think knew:know known:know swam:swim swum:swim "
        "sang:sing sung:sing drank:drink drunk:drink wrote:write written:write rode:ride ridden:ride "
        "fell:fall fallen:fall hid:hide hidden:hide broke:break broken:break woke:wake woken:wake "
        "began:begin begun:begin caught:catch brought:bring bought:buy fought:fight taught:teach "
        "built:build felt:feel left:leave lost:lose met:meet slept:sleep kept:keep led:lead sent:send "
        "spent:spend stole:steal stolen:steal threw:throw thrown:throw grew:grow grown:grow "
        "drew:draw drawn:draw blew:blow blown:blow wore:wear worn:wear tore:tear torn:tear chose:choose "
        "chosen:choose spoke:speak spoken:speak froze:freeze frozen:freeze shone:shine shook:shake "
        "shaken:shake rose:rise risen:rise drove:drive driven:drive struck:strike hung:hang dug:dig "
        "fed:feed heard:hear paid:pay laid:lay lay:lie lain:lie sold:sell stuck:stick swept:sweep "
        "wept:weep understood:understand forgot:forget forgotten:forget became:become won:win "
        "sank:sink sunk:sink span:spin spun:spin sprang:spring stung:sting bit:bite bitten:bite "
        "slid:slide crept:creep leapt:leap knelt:kneel dreamt:dream burnt:burn lit:light "
        "children:child men:man women:woman feet:foot teeth:tooth mice:mouse geese:goose"
    ).split()
)


_IRREGULAR_PLURALS = frozenset({"children", "men", "women", "feet", "teeth", "mice", "geese"})


@dataclass(frozen=True)
class Entry:
    """One glossary row: the Chinese for an English word or phrase, and its word class."""

    english: str
    chinese: str
    word_class: WordClass = W.OTHER
    measure: str = ""


@dataclass(frozen=True)
class Token:
    text: str
    kind: str  # latin, number, han, letters, brk, other


@dataclass(frozen=True)
class GlossaryResult:
    text_zh: str
    unknown_words: tuple[str, ...]


@dataclass
class _Unit:
    """One matched word or phrase on its way to a chunk."""

    chinese: str
    word_class: WordClass
    english: str = ""
    measure: str = ""
    latin: bool = False  # kept as written (unknown word, digits): spaced from its latin neighbours
    verb_form: bool = False  # an inflected verb (-ing, -ed, irregular past)
    article_before: bool = False


@dataclass
class _Chunk:
    kind: str  # noun, verb, adverb, place, time, motion, and, other
    pieces: list[tuple[str, bool]] = field(default_factory=list)


_TOKEN = re.compile(
    r"(?P<latin>\d*[A-Za-zÀ-ÖØ-öø-ɏ]+(?:['’][A-Za-zÀ-ÖØ-öø-ɏ]+)*)"
    r"|(?P<number>\d+(?:\.\d+)?)"
    r"|(?P<han>[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)"
    r"|(?P<letters>[^\W\d_\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+)"
    r"|(?P<brk>[,;.!?，。；！？\n])"
    r"|(?P<other>\S)"
)
_PHRASE_SPACE = re.compile(r"[\s\-]+")
_SECTION = re.compile(r"^#\s*---\s*(.+?)\s*---\s*$")


def tokenize(text: str) -> Iterator[Token]:
    for match in _TOKEN.finditer(text):
        yield Token(match.group(), match.lastgroup or "other")


@lru_cache(maxsize=8192)
def word_forms(word: str) -> tuple[tuple[str, str], ...]:
    """(form, how it was derived) for a lower-case word: itself first, then its likely base forms."""
    forms: list[tuple[str, str]] = [(word, "")]
    if word.endswith(("'s", "’s")):
        word = word[:-2]
        forms.append((word, "possessive"))

    def add(form: str, how: str) -> None:
        if len(form) >= 2 and all(form != seen for seen, _ in forms):
            forms.append((form, how))

    if word in IRREGULAR:
        add(IRREGULAR[word], "plural" if word in _IRREGULAR_PLURALS else "past")
    if word.endswith("ies") and len(word) > 4:
        add(word[:-3] + "y", "plural")
    if word.endswith("ves"):
        add(word[:-3] + "f", "plural")
        add(word[:-3] + "fe", "plural")
    if word.endswith("es"):
        add(word[:-2], "plural")
    if word.endswith("s") and not word.endswith("ss"):
        add(word[:-1], "plural")
    for suffix, how in (("ing", "ing"), ("ed", "past"), ("er", "comparative"), ("est", "superlative")):
        if word.endswith(suffix) and len(word) > len(suffix) + 2:
            stem = word[: -len(suffix)]
            add(stem, how)
            add(stem + "e", how)
            if len(stem) > 2 and stem[-1] == stem[-2]:
                add(stem[:-1], how)
            if suffix != "ing" and stem.endswith("i"):
                add(stem[:-1] + "y", how)
    if word.endswith("ly") and len(word) > 4:
        stem = word[:-2]
        add(stem, "adverb")
        if stem.endswith("i"):
            add(stem[:-1] + "y", "adverb")
        if stem[-1] not in "aeiou":
            add(word[:-1] + "e", "adverb")  # gently -> gentle
    return tuple(forms)


def lemmas(word: str) -> list[str]:
    """The word and its likely base forms: plurals, tenses, comparatives, -ly, possessive 's."""
    return [form for form, _ in word_forms(word.lower())]


class Glossary:
    """Immutable English phrase -> Chinese table with word classes."""

    def __init__(self, entries: Mapping[str, str] | Iterable[Entry]) -> None:
        rows = (
            [Entry(key, chinese) for key, chinese in entries.items()]
            if isinstance(entries, Mapping)
            else list(entries)
        )
        self._entries: dict[str, list[Entry]] = {}
        for row in rows:
            self._entries.setdefault(_phrase_key(row.english), []).append(row)
        self._max_words = max((len(key.split(" ")) for key in self._entries), default=1)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self._entries.values())

    def __contains__(self, phrase: object) -> bool:
        return isinstance(phrase, str) and _phrase_key(phrase) in self._entries

    @classmethod
    def from_file(cls, path: Path) -> Glossary:
        rows: list[Entry] = []
        seen: set[tuple[str, WordClass]] = set()
        word_class, measure = W.OTHER, ""
        for number, raw in enumerate(read_data_file(path).splitlines(), start=1):
            line = raw.strip()
            if line.startswith("#"):
                header = _SECTION.match(line)
                if header:
                    if header.group(1) not in SECTIONS:
                        known = ", ".join(SECTIONS)
                        raise PromptDataError(
                            f"{path.name} line {number} names an unknown section '{header.group(1)}' "
                            f"(known: {known})."
                        )
                    word_class, measure = SECTIONS[header.group(1)]
                continue
            if not line:
                continue
            fields = [part.strip() for part in line.split("\t")]
            if len(fields) != 2 or not fields[0] or not fields[1]:
                raise PromptDataError(
                    f"{path.name} line {number} must be 'english<TAB>chinese' (or '-' for a stop word)."
                )
            key = _phrase_key(fields[0])
            if " " not in key and len(fields[0].split()) > 1:
                raise PromptDataError(
                    f"{path.name} line {number}: '{fields[0]}' is just '{key}' once determiners "
                    "(a, the, his...) are ignored; list the single word instead."
                )
            row_class = W.STOP if fields[1] == STOP else word_class
            if (key, row_class) in seen:
                raise PromptDataError(f"{path.name} line {number} repeats the entry '{fields[0]}'.")
            seen.add((key, row_class))
            rows.append(Entry(key, fields[1], row_class, MEASURE_WORDS.get(key, measure)))
        if not rows:
            raise PromptDataError(f"{path.name} has no entries.")
        return cls(rows)

    def lookup(self, phrase: str) -> str | None:
        """The Chinese for a phrase ("" for a stop word), trying base forms of its words."""
        words = [word for word in _phrase_key(phrase).split(" ") if word]
        if not words:
            return None
        unit = self._match_words(words)
        return None if unit is None else unit.chinese

    def translate(self, text: str) -> GlossaryResult:
        """Phrase-by-phrase translation; Han text passes through, unknown words stay as written."""
        units, unknown = self._units(list(tokenize(text)))
        clauses: list[list[tuple[str, bool]]] = []
        for clause in _split_clauses(units):
            pieces = _order(_chunks(clause))
            if pieces:
                clauses.append(pieces)
        joined: list[tuple[str, bool]] = []
        for pieces in clauses:
            if joined:
                joined.append((CLAUSE_BREAK, False))
            joined.extend(pieces)
        return GlossaryResult(_join(joined), tuple(unknown))

    def _units(self, tokens: list[Token]) -> tuple[list[_Unit], list[str]]:
        units: list[_Unit] = []
        unknown: list[str] = []
        seen_unknown: set[str] = set()

        def report(word: str, key: str) -> None:
            if key not in seen_unknown:
                seen_unknown.add(key)
                unknown.append(word)

        index = 0
        article = False
        while index < len(tokens):
            token = tokens[index]
            index += 1
            if token.kind == "latin":
                if token.text.lower() in DETERMINERS:
                    article = True
                    continue
                span, unit = self._longest_match(tokens, index - 1)
                if unit is None:
                    units.append(_Unit(token.text, W.OTHER, token.text.lower(), latin=True))
                    report(token.text, token.text.lower())
                else:
                    unit.article_before = article
                    units.append(unit)
                    index += span - 1
            elif token.kind == "brk":
                units.append(_Unit(CLAUSE_BREAK, W.OTHER))
            elif token.kind == "han":
                units.append(_Unit(token.text, W.OTHER))
            elif token.kind == "number":
                units.append(_Unit(token.text, W.NUMBER, token.text, latin=True))
            else:
                rows = self._entries.get(token.text)
                if rows and rows[0].chinese != STOP:
                    units.append(_Unit(rows[0].chinese, rows[0].word_class, token.text, rows[0].measure))
                elif token.kind == "letters" or token.text.isalnum() or _is_symbol(token.text):
                    units.append(_Unit(token.text, W.OTHER, token.text, latin=token.kind == "letters"))
                    report(token.text, token.text)
            article = False
        return units, unknown

    def _longest_match(self, tokens: list[Token], start: int) -> tuple[int, _Unit | None]:
        words: list[str] = []
        ends: list[int] = []
        position = start
        while position < len(tokens) and len(words) < self._max_words:
            token = tokens[position]
            if token.kind != "latin":
                if token.text == "-" and words and position + 1 < len(tokens):
                    position += 1  # "close-up", "snow-covered"
                    continue
                break
            lowered = token.text.lower()
            if lowered not in DETERMINERS:
                words.append(lowered)
                ends.append(position + 1)
            position += 1
        for length in range(len(words), 0, -1):
            unit = self._match_words(words[:length])
            if unit is not None:
                return ends[length - 1] - start, unit
        return 1, None

    def _match_words(self, words: list[str]) -> _Unit | None:
        heads = [words[:-1]]
        if len(words) > 1:
            bases = [self._base(word) for word in words[:-1]]
            if bases != heads[0]:
                heads.append(bases)
        fallback: _Unit | None = None
        for head in heads:
            for form, how in word_forms(words[-1]):
                rows = self._entries.get(" ".join([*head, form]))
                unit = _inflect(rows, how, words[-1]) if rows else None
                if unit is None:
                    continue
                if how in ("ing", "past") and unit.word_class is not W.VERB:
                    fallback = fallback or unit  # "stared" is "stare" before it is "star"
                    continue
                return unit
        return fallback

    def _base(self, word: str) -> str:
        for form, _ in word_forms(word)[1:]:
            if form in self._entries:
                return form
        return word


def _inflect(rows: list[Entry], how: str, word: str) -> _Unit | None:
    """The unit for an entry reached through a derived form, or None when the form does not fit it."""
    if how in ("comparative", "superlative", "adverb"):
        adjective = next((row for row in rows if row.word_class is W.ADJECTIVE), None)
        if adjective is None or adjective.chinese == STOP:
            return None
        if how == "adverb":
            return _Unit(adjective.chinese + "地", W.ADVERB, word)
        prefix = "更" if how == "comparative" else "最"
        return _Unit(prefix + adjective.chinese, W.ADJECTIVE, word)
    verb_form = how in ("ing", "past") and word not in (row.english for row in rows)
    row = rows[0]
    if verb_form or how == "ing":
        row = next((candidate for candidate in rows if candidate.word_class is W.VERB), row)
    chinese = "" if row.chinese == STOP else row.chinese
    if how == "possessive" and chinese and row.word_class in NOMINAL:
        chinese += "的"
    return _Unit(
        chinese,
        row.word_class,
        row.english,
        row.measure,
        verb_form=verb_form and row.word_class is W.VERB,
    )


def _split_clauses(units: list[_Unit]) -> Iterator[list[_Unit]]:
    clause: list[_Unit] = []
    for unit in units:
        if unit.chinese == CLAUSE_BREAK and not unit.latin and unit.word_class is W.OTHER:
            yield clause
            clause = []
        else:
            clause.append(unit)
    yield clause


def _is_group_member(unit: _Unit) -> bool:
    return unit.word_class in NOMINAL or unit.word_class in MODIFIERS


_WORD_CHUNKS = {W.LOCATIVE: "place", W.TIME_PHRASE: "time", W.VERB: "verb", W.ADVERB: "adverb"}
"""Word classes that make a chunk of one word, and the chunk's kind."""


def _chunks(units: list[_Unit]) -> list[_Chunk]:
    """Groups a clause's units: counted noun groups, prepositional phrases, verbs and the rest."""
    units = [unit for unit in units if unit.word_class is not W.STOP or unit.english == "and"]
    chunks: list[_Chunk] = []
    index = 0
    while index < len(units):
        unit = units[index]
        cls = unit.word_class
        if cls is W.NUMBER:
            end, pieces, head = _noun_group(units, index + 1)
            if head is None:
                chunks.append(_Chunk("other", [(unit.chinese, unit.latin)]))
                index += 1
                continue
            measure = head.measure or ("" if head.word_class is W.TIME else "个")
            chunks.append(_Chunk("noun", [(unit.chinese + measure, False), *pieces]))
            index = end
        elif cls is W.PREPOSITION:
            end, pieces, head = _noun_group(units, index + 1)
            chunks.append(_prepositional(unit, pieces, head) if pieces else _Chunk("other"))
            index = max(end, index + 1)
        elif _is_group_member(unit) or _participle_modifier(units, index):
            end, pieces, _ = _noun_group(units, index)
            chunks.append(_Chunk("noun", pieces))
            index = end
        elif cls in _WORD_CHUNKS:
            chunks.append(_Chunk(_WORD_CHUNKS[cls], [(unit.chinese, False)]))
            index += 1
        elif cls is W.STOP:
            chunks.append(_Chunk("and"))
            index += 1
        else:
            chunks.append(_Chunk("other", [(unit.chinese, unit.latin)] if unit.chinese else []))
            index += 1
    return chunks


def _participle_modifier(units: list[_Unit], index: int) -> bool:
    """ "the burning bridge", "flying cars": a verb form before a noun, not right after one."""
    unit = units[index]
    if unit.word_class is not W.VERB or not unit.verb_form or index + 1 >= len(units):
        return False
    after = units[index + 1]
    if not _is_group_member(after) or after.article_before:
        return False
    before = units[index - 1] if index else None
    return unit.article_before or before is None or not _is_group_member(before)


def _noun_group(units: list[_Unit], start: int) -> tuple[int, list[tuple[str, bool]], _Unit | None]:
    """Adjectives, participles and nouns from `start`: (end, pieces, head noun or None)."""
    pieces: list[tuple[str, bool]] = []
    head: _Unit | None = None
    index = start
    while index < len(units):
        unit = units[index]
        if index > start and unit.article_before:
            break
        if _is_group_member(unit):
            pieces.append((unit.chinese, False))
            if unit.word_class in NOMINAL:
                head = unit
        elif _participle_modifier(units, index) or (
            index == start and unit.word_class is W.VERB and unit.verb_form and _next_is_member(units, index)
        ):
            pieces.append((unit.chinese + "的", False))
        else:
            break
        index += 1
    return index, pieces, head


def _next_is_member(units: list[_Unit], index: int) -> bool:
    after = units[index + 1] if index + 1 < len(units) else None
    return after is not None and _is_group_member(after) and not after.article_before


def _prepositional(preposition: _Unit, pieces: list[tuple[str, bool]], head: _Unit | None) -> _Chunk:
    group = "".join(text for text, _ in pieces)
    if head is None:
        return _Chunk("noun", pieces)  # "dressed in red": no place, keep the words
    if head.word_class is W.TIME:
        return _Chunk("time", [(group, False)])
    frame = preposition.chinese
    if preposition.english == "in":
        if head.english in IN_ON:
            frame = "在…上"
        elif head.word_class is W.WEATHER or head.english in IN_MIDDLE:
            frame = "在…中"
    elif preposition.english == "at" and head.word_class in (W.ANIMATE, W.WEATHER):
        frame = "对着…"
    if SLOT not in frame:
        frame += SLOT
    text = frame.replace(SLOT, group)
    return _Chunk("place" if text.startswith(FRONTED) else "motion", [(text, False)])


def _order(chunks: list[_Chunk]) -> list[tuple[str, bool]]:
    """Time first, adverbs before their verb, place phrases before the verb they follow."""
    times = [chunk for chunk in chunks if chunk.kind == "time"]
    body = [chunk for chunk in chunks if chunk.kind != "time"]
    ordered: list[_Chunk] = []
    for position, chunk in enumerate(body):
        if chunk.kind == "adverb" and ordered and ordered[-1].kind == "verb":
            ordered.insert(len(ordered) - 1, chunk)
        elif chunk.kind == "place":
            ordered.insert(_verb_start(ordered), chunk)
        elif chunk.kind == "and":
            before = ordered[-1].kind if ordered else ""
            after = body[position + 1].kind if position + 1 < len(body) else ""
            if before == "noun" and after == "noun":
                then = body[position + 2].kind if position + 2 < len(body) else ""
                verb_seen = any(done.kind == "verb" for done in ordered[-_PLACE_REACH:])
                joiner = CLAUSE_BREAK if then == "verb" and verb_seen else "和"
                ordered.append(_Chunk("other", [(joiner, False)]))
        else:
            ordered.append(chunk)
    pieces: list[tuple[str, bool]] = []
    for chunk in times:
        pieces.extend(chunk.pieces)
    if times and any(chunk.pieces for chunk in ordered):
        pieces.append((CLAUSE_BREAK, False))
    for chunk in ordered:
        pieces.extend(chunk.pieces)
    return pieces


def _verb_start(ordered: list[_Chunk]) -> int:
    """Where a place phrase goes: before the verb (and its adverbs) that the last chunks belong to."""
    index = len(ordered)
    floor = max(0, index - _PLACE_REACH)
    while index > floor and ordered[index - 1].kind in ("noun", "motion", "other", "adverb"):
        index -= 1
    if index > 0 and ordered[index - 1].kind == "verb":
        index -= 1
        while index > 0 and ordered[index - 1].kind == "adverb":
            index -= 1
        return index
    return len(ordered)


def _is_symbol(text: str) -> bool:
    return unicodedata.category(text[0]) == "So"


def _phrase_key(phrase: str) -> str:
    words = _PHRASE_SPACE.sub(" ", phrase.strip().lower().replace("’", "'")).split(" ")
    kept = [word for word in words if word not in DETERMINERS] if len(words) > 1 else words
    return " ".join(kept)


def _join(pieces: list[tuple[str, bool]]) -> str:
    out: list[str] = []
    previous_latin = False
    for text, latin in pieces:
        if not text:
            continue
        if text == CLAUSE_BREAK and (not out or out[-1] == CLAUSE_BREAK):
            continue
        if out and latin and previous_latin:
            out.append(" ")
        out.append(text)
        previous_latin = latin
    while out and out[-1] == CLAUSE_BREAK:
        out.pop()
    return "".join(out)


def contains_han(text: str) -> bool:
    return any(is_han(char) for char in text)
