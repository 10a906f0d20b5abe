"""Train the small byte-level BPE tokenizer used by the `tiny` preset.

Deterministic: the corpus is a fixed list of Python standard-library sources (code and docstrings, read
from this interpreter's stdlib) plus text shaped like M2 prompts and tool calls generated from a seeded
RNG; the `tokenizers` BPE trainer breaks ties deterministically. The committed asset was built from the
corpus whose hash is CORPUS_SHA256 (CPython 3.11.7's stdlib, tokenizers 0.23); with that corpus, re-running
reproduces `tiny_tokenizer.json` exactly. Another Python version has other stdlib text, hence other merges.

    python -m m2rl.model.assets.make_tiny_tokenizer   # or: python model/assets/make_tiny_tokenizer.py
"""

from __future__ import annotations

import hashlib
import json
import random
import sysconfig
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

VOCAB_SIZE = 4096  # the `tiny` preset's vocab_size must equal this

# Order fixes the ids: BOS, message open, EOS, then the reasoning and tool-call spans.
SPECIAL_TOKENS: tuple[str, ...] = (
    "]~!b[",
    "]~b]",
    "[e~[",
    "<think>",
    "</think>",
    "<minimax:tool_call>",
    "</minimax:tool_call>",
)

CORPUS_SHA256 = "1bddebbdd93d84d191604db8dd57a7a338e88eaba721850cd47dae140e7e0be8"

STDLIB_FILES: tuple[str, ...] = (
    "argparse.py", "ast.py", "base64.py", "bisect.py", "calendar.py", "collections/__init__.py",
    "contextlib.py", "copy.py", "csv.py", "dataclasses.py", "datetime.py", "difflib.py", "enum.py",
    "fnmatch.py", "fractions.py", "functools.py", "glob.py", "gzip.py", "heapq.py", "html/parser.py",
    "inspect.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py", "os.py", "pathlib.py",
    "pprint.py", "queue.py", "random.py", "re/_parser.py", "shlex.py", "shutil.py", "statistics.py",
    "string.py", "subprocess.py", "tempfile.py", "textwrap.py", "threading.py", "typing.py",
    "unittest/case.py", "urllib/parse.py", "uuid.py", "zipfile.py",
)

TOOL_NAMES = ("bash", "python", "read_file", "write_file", "search", "browser_open", "get_weather", "submit")
PARAM_NAMES = ("command", "code", "path", "content", "query", "url", "location", "days", "answer")
WORDS = ["the", "file", "test", "error", "run", "check", "list", "directory", "output", "result", "function", "value", "import", "return", "install", "package", "python", "bash", "fix", "bug", "line", "patch", "repository", "search", "page", "answer", "weather", "Paris", "need", "call", "tool", "first", "then", "read", "write", "look", "into", "failing", "tests", "pass", "assert", "module", "class"]


def _stdlib_text() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for name in STDLIB_FILES:
        path = root / name
        if path.is_file():
            texts.append(path.read_text(encoding="utf-8", errors="replace"))
    return texts


def _sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _conversation(rng: random.Random) -> str:
    """One M2-formatted episode (see shared/reference/m2-format.md) with random tool calls."""
    tools = rng.sample(TOOL_NAMES, 2)
    spec = "".join(
        "<tool>" + json.dumps({"name": t, "description": _sentence(rng, 6), "parameters": {
            "type": "object", "properties": {p: {"type": "string"}}, "required": [p]}}) + "</tool>\n"
        for t, p in zip(tools, rng.sample(PARAM_NAMES, 2))
    )
    out = (
        "]~!b[]~b]system\nYou are a helpful assistant.\n\n# Tools\nYou may call one or more tools to "
        "assist with the user query.\nHere are the tools available in JSONSchema format:\n\n<tools>\n"
        + spec
        + "</tools>\n\nWhen making tool calls, use XML format to invoke tools and pass parameters:\n\n"
        '<minimax:tool_call>\n<invoke name="tool-name-1">\n<parameter name="param-key-1">param-value-1'
        '</parameter>\n<parameter name="param-key-2">param-value-2</parameter>\n...\n</invoke>\n'
        "</minimax:tool_call>[e~[\n]~b]user\n" + _sentence(rng, rng.randint(5, 20)) + "[e~[\n"
    )
    for _ in range(rng.randint(1, 3)):
        tool, param = rng.choice(tools), rng.choice(PARAM_NAMES)
        value = rng.choice(["ls -la /work", "print(1 + 2)", "src/main.py", str(rng.randint(0, 999))])
        out += (
            "]~b]ai\n<think>\n" + _sentence(rng, rng.randint(5, 25)) + "\n</think>\n\n\n<minimax:tool_call>\n"
            f'<invoke name="{tool}">\n<parameter name="{param}">{value}</parameter>\n</invoke>\n'
            "</minimax:tool_call>[e~[\n]~b]tool\n<response>" + _sentence(rng, rng.randint(3, 12))
            + "</response>[e~[\n"
        )
    return out + "]~b]ai\n<think>\n" + _sentence(rng, 8) + "\n</think>\n\n" + _sentence(rng, 10) + "[e~[\n"


def build_corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return _stdlib_text() + [_conversation(rng) for _ in range(2000)]


def corpus_sha256(corpus: list[str]) -> str:
    return hashlib.sha256("\x00".join(corpus).encode()).hexdigest()


def train(vocab_size: int = VOCAB_SIZE) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Byte-level: every unicode string round-trips exactly (decode(encode(s)) == s).
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # single ids; never split by the pre-tokenizer
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(build_corpus(), trainer=trainer)
    return tok


def main() -> None:
    out = Path(__file__).with_name("tiny_tokenizer.json")
    digest = corpus_sha256(build_corpus())
    if digest != CORPUS_SHA256:
        print(f"warning: corpus {digest[:16]} differs from the committed asset's {CORPUS_SHA256[:16]} "
              f"(another Python stdlib); the tokenizer will differ")
    tok = train()
    text = json.dumps(json.loads(tok.to_str()), ensure_ascii=False, indent=None, sort_keys=False)
    out.write_text(text + "\n", encoding="utf-8")
    print(f"wrote {out} vocab={tok.get_vocab_size()} sha256={hashlib.sha256(text.encode()).hexdigest()[:16]}")


if __name__ == "__main__":
    main()
