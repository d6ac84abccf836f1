"""Fit prompt parts into the text encoder's token budget, dropping the lowest priority first."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Protocol

DEFAULT_LIMIT = 75
"""Word pieces the text encoder reads: 77 positions minus [CLS] and [SEP]."""


class TokenCounter(Protocol):
    def count(self, text: str) -> int: ...


@dataclass(frozen=True)
class PromptPart:
    """A piece of a prompt. Higher `priority` survives longer; `required` parts are never dropped whole,
    only shortened from the end when they alone exceed the budget."""

    text: str
    priority: int = 0
    required: bool = False


def dedupe_parts(parts: list[PromptPart]) -> list[PromptPart]:
    """Drop empty parts and repeats of an earlier part's text (the first one stays)."""
    seen: set[str] = set()
    unique: list[PromptPart] = []
    for part in parts:
        if part.text and part.text not in seen:
            seen.add(part.text)
            unique.append(part)
    return unique


def fit_parts(
    parts: list[PromptPart], tokenizer: TokenCounter, limit: int = DEFAULT_LIMIT, sep: str = "，"
) -> tuple[list[PromptPart], list[PromptPart]]:
    """Keep parts (in their order) whose joined text counts at most `limit` pieces.

    Optional parts go first, lowest priority first and, among equals, the later one first. If the
    required parts alone are still too long, the last of them is cut short; the removed tail is
    reported as a cut part. Returns (kept, cut), `cut` in the order things were removed.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    sep_cost = tokenizer.count(sep) if sep.strip() else 0
    costs = [tokenizer.count(part.text) for part in parts]
    alive = [bool(part.text.strip()) for part in parts]
    cut: list[PromptPart] = [part for part, keep in zip(parts, alive, strict=True) if not keep and part.text]

    def total() -> int:
        kept_costs = [cost for cost, keep in zip(costs, alive, strict=True) if keep]
        return sum(kept_costs) + sep_cost * max(len(kept_costs) - 1, 0)

    order = sorted(
        (i for i, part in enumerate(parts) if not part.required and alive[i]),
        key=lambda i: (parts[i].priority, -i),
    )
    for i in order:
        if total() <= limit:
            break
        alive[i] = False
        cut.append(parts[i])

    kept = [part for part, keep in zip(parts, alive, strict=True) if keep]
    # Counting is additive across punctuation separators; check the real join and trim if needed.
    while kept and tokenizer.count(sep.join(part.text for part in kept)) > limit:
        last = kept[-1]
        others = sep.join(part.text for part in kept[:-1])
        room = limit - (tokenizer.count(others) + sep_cost if others else 0)
        prefix = _longest_prefix(last.text, tokenizer, room) if room > 0 else ""
        if prefix and prefix != last.text:
            kept[-1] = replace(last, text=prefix)
            cut.append(replace(last, text=last.text[len(prefix) :].strip(" ,，")))
        else:
            kept.pop()
            cut.append(last)
    return kept, cut


def _longest_prefix(text: str, tokenizer: TokenCounter, limit: int) -> str:
    """The longest prefix of `text` (ending on a whole character) that counts at most `limit` pieces."""
    low, high = 0, len(text)
    while low < high:
        middle = (low + high + 1) // 2
        if tokenizer.count(text[:middle]) <= limit:
            low = middle
        else:
            high = middle - 1
    prefix = text[:low]
    # do not end inside a Latin word: a half word becomes different word pieces
    if low < len(text) and prefix and prefix[-1].isascii() and prefix[-1].isalnum() and text[low].isascii():
        cut_at = prefix.rstrip().rfind(" ")
        if cut_at > 0:
            prefix = prefix[:cut_at]
    return prefix.rstrip(" ,，")
