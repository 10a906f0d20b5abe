"""The text of one generated sequence as its tokens arrive: incremental detokenization and stop strings.

Decoding each new token alone would split multi-byte characters (byte-level BPE gives a character's bytes
to different tokens), and decoding everything every step is quadratic. `TextStream` decodes a short window
(vLLM's prefix/read offsets): the text of ids[prefix:] minus that of ids[prefix:read] is new, and is
released only when it does not end in a partial character (U+FFFD).

Stop strings may span tokens: the text is searched across the boundary, and the last len(longest) - 1
characters are held back from the stream until they cannot begin a stop string.
"""

from __future__ import annotations

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"  # what the decoder writes for an incomplete UTF-8 sequence


class TextStream:
    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True, stop: tuple[str, ...] = (),
                 include_stop: bool = False) -> None:
        self._tok, self._skip = tokenizer, skip_special_tokens
        self.stop, self.include_stop = stop, include_stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at the stop string once one is found)
        self.offsets: list[int] = []  # len(text) before each token: OpenAI's text_offset
        self.stopped_by: str | None = None
        self._prefix = self._read = 0  # ids[prefix:read] is already text; ids[read:] is not yet
        self._sent = 0  # characters of text handed out
        self._searched = 0  # text before this was searched for stop strings

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def push(self, token_id: int) -> str:
        """Add one token; returns the text that can be released now ("" if none). Sets `stopped_by` when
        a stop string completed: the text is then final."""
        if self.stopped_by is not None:
            raise RuntimeError("the stream already ended at a stop string")
        self.offsets.append(len(self.text))
        self.ids.append(token_id)
        before = self._decode(self.ids[self._prefix:self._read])
        after = self._decode(self.ids[self._prefix:])
        if len(after) > len(before) and not after.endswith(REPLACEMENT):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        if self.stop and self._find_stop():
            return self._release(len(self.text))
        return self._release(len(self.text) - self._hold)

    def finish(self) -> str:
        """The sequence ended: release everything, a trailing partial character included."""
        if self.stopped_by is None and self._read < len(self.ids):
            tail = self._decode(self.ids[self._prefix:])[len(self._decode(self.ids[self._prefix:self._read])):]
            self.text += tail
            self._read = len(self.ids)
            if self.stop:
                self._find_stop()
        return self._release(len(self.text))

    def _find_stop(self) -> bool:
        start = max(0, self._searched - self._hold)
        hits = [(i, s) for s in self.stop if (i := self.text.find(s, start)) >= 0]
        self._searched = len(self.text)
        if not hits:
            return False
        at, stop = min(hits)
        self.text = self.text[:at + (len(stop) if self.include_stop else 0)]
        self.stopped_by = stop
        return True

    def _release(self, upto: int) -> str:
        if upto <= self._sent:
            return ""
        out, self._sent = self.text[self._sent:upto], upto
        return out
