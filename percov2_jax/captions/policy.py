"""The caption length cap: PerCo generated captions with BLIP-2 at ``max_length=32`` tokens.

By default a *token* is a whitespace-separated word: ``len(text.split())``, where whitespace is
any run of Unicode whitespace (spaces, tabs, newlines). A custom ``count_tokens`` (for example
a BPE tokenizer's count) can replace the rule.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

_WORD = re.compile(r"\S+")


class CaptionTooLongError(ValueError):
    """A caption has more tokens than the policy allows."""


def count_words(text: str) -> int:
    """The number of whitespace-separated words in ``text`` (str) -> int."""
    return len(text.split())


@dataclasses.dataclass(frozen=True)
class CaptionPolicy:
    """What to do with a caption longer than ``max_tokens``.

    Attributes:
      max_tokens: int | None, the cap (>= 1); None disables it.
      on_overflow: "error" raises `CaptionTooLongError` naming the count and the cap;
        "truncate" keeps the longest *prefix* of the text that ends at the end of a word and has
        at most ``max_tokens`` tokens. With the default word rule that is the text up to the end
        of its ``max_tokens``-th word: leading whitespace and the whitespace between the kept
        words are kept as they were, the whitespace after the last kept word is dropped.
      count_tokens: Callable[[str], int] | None, the token count; None counts words.

    A caption within the cap is returned unchanged, whitespace and all.
    """

    max_tokens: int | None = 32
    on_overflow: str = "error"
    count_tokens: Callable[[str], int] | None = None

    def __post_init__(self):
        if self.max_tokens is not None and (
            isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            raise ValueError(f"max_tokens must be a positive int or None, got {self.max_tokens!r}")
        if self.on_overflow not in ("error", "truncate"):
            raise ValueError(f"on_overflow must be 'error' or 'truncate', got {self.on_overflow!r}")

    def count(self, text: str) -> int:
        """The number of tokens of ``text`` (str) under this policy's rule."""
        return (self.count_tokens or count_words)(text)

    def apply(self, text: str) -> str:
        """``text`` (str) if within the cap, else truncated or an error (see the class)."""
        if self.max_tokens is None:
            return text
        n = self.count(text)
        if n <= self.max_tokens:
            return text
        if self.on_overflow == "error":
            raise CaptionTooLongError(
                f"caption has {n} tokens, more than the cap of {self.max_tokens} "
                f"(use on_overflow='truncate' or a larger max_tokens): {text[:80]!r}"
            )
        ends = [m.end() for m in _WORD.finditer(text)]
        if self.count_tokens is None:
            return text[: ends[self.max_tokens - 1]]
        # A custom count need not be additive over words: binary search for the longest word
        # prefix that fits (assumes the count never decreases as words are added).
        if ends and self.count(text[: ends[-1]]) <= self.max_tokens:
            return text[: ends[-1]]
        lo, hi = 0, len(ends)  # the prefix of `lo` words fits (0 words: ""), of `hi` words not
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self.count(text[: ends[mid - 1]]) <= self.max_tokens:
                lo = mid
            else:
                hi = mid
        return text[: ends[lo - 1]] if lo else ""
