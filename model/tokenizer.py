"""M2Tokenizer: a thin wrapper over a Hugging Face `tokenizer.json` with the M2 markers as single ids.

Token ids in, text out; the chat format itself lives in `m2rl.agent.format`. The Jinja twin of that format,
`chat_template.jinja` beside this file, is saved with the tokenizer for transformers and vLLM users.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

BOS = "]~!b["
MESSAGE_OPEN = "]~b]"
EOS = "[e~["
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<minimax:tool_call>", "</minimax:tool_call>"
MARKERS: tuple[str, ...] = (BOS, MESSAGE_OPEN, EOS, THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE)

TINY_TOKENIZER_PATH = Path(__file__).parent / "assets" / "tiny_tokenizer.json"
# The M2 format as a Jinja chat template (the twin of m2rl.agent.render.render()), saved with every tokenizer.
CHAT_TEMPLATE_PATH = Path(__file__).parent / "chat_template.jinja"
CHAT_TEMPLATE_FILE = "chat_template.jinja"


def chat_template() -> str:
    """The Jinja source of the M2 chat template that `save_pretrained` writes."""
    return CHAT_TEMPLATE_PATH.read_text(encoding="utf-8")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable, or lacks an M2 marker."""


class M2Tokenizer:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tok = tokenizer
        self._marker_ids: dict[str, int] = {}
        for marker in MARKERS:
            tid = tokenizer.token_to_id(marker)
            if tid is None:
                raise TokenizerError(f"tokenizer has no single token for M2 marker {marker!r}")
            # A marker must encode to exactly its own id, otherwise it is not a special (unsplittable) token.
            if tokenizer.encode(marker, add_special_tokens=False).ids != [tid]:
                raise TokenizerError(f"M2 marker {marker!r} is not a special token (it gets split)")
            self._marker_ids[marker] = tid

    @classmethod
    def from_file(cls, path: str | Path) -> M2Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on malformed JSON
            raise TokenizerError(f"cannot read tokenizer file {path}: {e}") from e
        return cls(tok)

    @classmethod
    def tiny(cls) -> M2Tokenizer:
        """The committed small BPE (model/assets/tiny_tokenizer.json) used by the `tiny` preset."""
        return cls.from_file(TINY_TOKENIZER_PATH)

    @property
    def backend(self) -> Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._marker_ids[BOS]

    @property
    def eos_id(self) -> int:
        return self._marker_ids[EOS]

    @property
    def pad_id(self) -> int:
        # No dedicated pad token: padded positions are masked, so EOS is a safe filler.
        return self._marker_ids[EOS]

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise KeyError(f"token {token!r} is not in the vocabulary")
        return tid

    def id_to_token(self, token_id: int) -> str:
        tok = self._tok.id_to_token(token_id)
        if tok is None:
            raise KeyError(f"token id {token_id} is out of range (vocab size {self.vocab_size})")
        return tok

    def encode(self, text: str) -> list[int]:
        """Text to ids; markers become their single special ids; no BOS is added."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        """Ids to text, markers included (byte-level: decode(encode(s)) == s)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.vocab_size}): {bad[:5]}")
        return self._tok.decode(ids, skip_special_tokens=False)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja,
        loadable by `transformers.AutoTokenizer.from_pretrained(directory)` (whose `apply_chat_template`
        then renders the M2 format) and vLLM."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(directory / "tokenizer.json"))
        special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": None}
        added = {
            str(tid): {
                "content": marker, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True,
            }
            for marker, tid in self._marker_ids.items()
        }
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "added_tokens_decoder": added,
            "additional_special_tokens": [m for m in MARKERS if m not in (BOS, EOS)],
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1 << 20,
            **special,
            # transformers 5 reads chat_template.jinja first; older readers (transformers 4, TGI, llama.cpp's
            # GGUF converter) read this key. Both hold the same text.
            "chat_template": chat_template(),
        }
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False),
                                                        encoding="utf-8")
        (directory / CHAT_TEMPLATE_FILE).write_text(chat_template(), encoding="utf-8")
        (directory / "special_tokens_map.json").write_text(
            json.dumps({k: v for k, v in special.items() if v is not None}, indent=2, ensure_ascii=False)
        )
