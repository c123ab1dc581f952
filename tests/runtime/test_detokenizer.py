"""Incremental detokenization: never a broken character, chunks concatenate to the text."""

import pytest

from kiln.runtime.detokenizer import Detokenizer
from tests.helpers import make_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.mark.parametrize("text", ["héllo wörld — 日本語 ✓ the lazy dog", "the quick brown fox 🦊🦊 jumps"])
def test_token_by_token_never_breaks_utf8(tok, text):
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # some characters span several byte-level tokens
    d = Detokenizer(tok, tok.encode("prompt: "))
    chunks = []
    for t in ids:
        d.push(t)
        chunks.append(d.delta())
    d.flush()
    chunks.append(d.delta())
    assert all("\ufffd" not in c for c in chunks)
    assert "".join(chunks) == text == d.text


def test_stop_string_is_cut_and_never_streamed(tok):
    text = "the quick brown fox jumps over"
    d = Detokenizer(tok, [], stop=["fox j"])
    chunks, stopped = [], False
    for t in tok.encode(text):
        stopped = d.push(t)
        chunks.append(d.delta())
        if stopped:
            break
    d.flush()
    chunks.append(d.delta())
    assert stopped and d.text == "the quick brown " and "".join(chunks) == d.text


def test_lazy_text_equals_incremental(tok):
    """Without streaming or stop strings the text is decoded once at the end: the same text."""
    prompt = tok.encode("say: ")
    for text in ("héllo wörld — 日本語 ✓", "the quick brown fox 🦊 jumps over the lazy dog " * 3):
        inc, lazy = Detokenizer(tok, prompt), Detokenizer(tok, prompt, lazy=True)
        for t in tok.encode(text):
            inc.push(t)
            lazy.push(t)
        assert lazy.text == ""  # nothing decoded per token
        inc.flush()
        lazy.flush()
        assert lazy.text == inc.text == text
    assert not Detokenizer(tok, prompt, lazy=True, stop=["x"]).lazy  # stop strings need the text as it grows
