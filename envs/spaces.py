"""`UnicodeText`: a Gymnasium `Text` space that contains any Unicode string up to a maximum length.

`gymnasium.spaces.Text.contains` checks every character against an explicit charset (alphanumeric by
default), so a tool reply with a newline, a bracket or an emoji would fall outside a default `Text`
space. Listing all 1.1M code points as the charset would cost ~100 MB per space. This subclass keeps
`Text`'s sampling over a small printable charset (what `check_env` and `space.sample()` use) and
widens membership to every string of encodable code points (no lone surrogates), which is exactly
what the env can produce: observations are cleaned with `encode("utf-8", "replace")`.
"""

from __future__ import annotations

import string
from typing import Any

from gymnasium.spaces import Text

SAMPLE_CHARSET = string.ascii_letters + string.digits + string.punctuation + " \n"


class UnicodeText(Text):
    def __init__(self, max_length: int, *, min_length: int = 0, seed: Any = None) -> None:
        super().__init__(max_length, min_length=min_length, charset=SAMPLE_CHARSET, seed=seed)

    def contains(self, x: Any) -> bool:
        if not isinstance(x, str) or not self.min_length <= len(x) <= self.max_length:
            return False
        try:
            x.encode("utf-8")  # fails only on lone surrogates, which no tokenizer can represent
        except UnicodeEncodeError:
            return False
        return True

    def __repr__(self) -> str:
        return f"UnicodeText({self.min_length}, {self.max_length})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, UnicodeText)
            and self.min_length == other.min_length
            and self.max_length == other.max_length
        )
