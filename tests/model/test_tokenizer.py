import importlib.util
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from m2rl.model import M2Config, M2Tokenizer
from m2rl.model.tokenizer import MARKERS, TINY_TOKENIZER_PATH, TokenizerError


@pytest.fixture(scope="module")
def tok() -> M2Tokenizer:
    return M2Tokenizer.tiny()


def test_every_marker_is_one_special_id(tok):
    ids = {m: tok.token_to_id(m) for m in MARKERS}
    assert len(set(ids.values())) == len(MARKERS)
    text = "".join(f"x{m} y" for m in MARKERS)
    enc = tok.encode(text)
    for m, i in ids.items():
        assert enc.count(i) == 1, m
    assert tok.bos_id == ids["]~!b["] and tok.eos_id == ids["[e~["]
    # glued to other text, markers still split out as single ids
    assert tok.encode("abc<think>def")[: len(tok.encode("abc"))] == tok.encode("abc")
    assert tok.token_to_id("<think>") in tok.encode("abc<think>def")


def test_no_bos_added(tok):
    assert tok.encode("hello")[0] != tok.bos_id
    assert tok.encode("") == []


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(s):
    tok = M2Tokenizer.tiny()
    assert tok.decode(tok.encode(s)) == s


@settings(max_examples=50, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(MARKERS)), max_size=8))
def test_roundtrip_with_markers(parts):
    tok = M2Tokenizer.tiny()
    s = "".join(parts)
    assert tok.decode(tok.encode(s)) == s


def test_vocab_matches_tiny_preset(tok):
    assert tok.vocab_size == M2Config.from_preset("tiny").vocab_size
    assert 1000 <= tok.vocab_size <= 8192


def test_asset_is_reproducible():
    path = Path(TINY_TOKENIZER_PATH).with_name("make_tiny_tokenizer.py")
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if mod.corpus_sha256(mod.build_corpus()) != mod.CORPUS_SHA256:
        pytest.skip("this Python's stdlib differs from the corpus the asset was built from")
    fresh = json.loads(mod.train().to_str())
    committed = json.loads(Path(TINY_TOKENIZER_PATH).read_text())
    assert fresh == committed


def test_transformers_autotokenizer_agrees(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    s = "]~!b[]~b]user\nsalut 世界 🙂<think>\nx\n</think>\n<minimax:tool_call>[e~["
    assert hf.encode(s, add_special_tokens=False) == tok.encode(s)
    assert hf.decode(tok.encode(s)) == s
    assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id


def test_errors(tok, tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        M2Tokenizer.from_file(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read"):
        M2Tokenizer.from_file(tmp_path / "bad.json")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([tok.vocab_size])
    with pytest.raises(KeyError):
        tok.token_to_id("<not-a-token-at-all>")
    with pytest.raises(TypeError):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_tokenizer_without_markers_is_rejected(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel()
    t.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="marker"):
        M2Tokenizer.from_file(tmp_path)
