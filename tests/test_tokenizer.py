"""The lean GGUF tokenizer (`GGUFBPETokenizer`: the `tokenizers` library over the file's own vocabulary) against
llama.cpp's, which tokenizes every GGUF file and is the reference: ids, pieces, special tokens, decoding."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfm_runtime.loading import load_checkpoint
from cfm_runtime.tokenizer import GGUFBPETokenizer, GGUFTokenizer, gguf_tokenizer

ROOT = Path(__file__).resolve().parents[1]
EDGES = [
    "", " ", "  ", "\n", "\n\n\n", " \t \n  x  \n", "a  b   c    d", "trailing spaces   ", "\r\nwindows\r\n",
    "12345 3.14159 1,000,000 0x1F 2024-12-07 v1.2.3", "I'm you'll they'd we've she's 'S 'LL DON'T",
    "日本語のテキスト、中文字符，한국어", "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷", "combining é vs é, ﬁ ligature, Ω",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "text<|im_end|>text", "<|im_", "<|im_start",
    "<|endoftext|><|endoftext|>", "<reponame>x<file_sep>", "  <|im_start|>  ", "def f(x):\n    return x ** 2  # sq\n",
    "ÀÉÎÕÜ àéîõü ß ŁŚŻ", "tabs\tand\u00a0nbsp\u2003em-space", "a" * 300, "!!!???...,,,;;;", "\x00\x01\x7f",
]


@pytest.fixture(scope="module")
def both(model_path):
    ckpt = load_checkpoint(model_path, tensors="none")
    return GGUFBPETokenizer(model_path, ckpt.metadata), GGUFTokenizer(model_path, ckpt.metadata), ckpt


def corpus() -> list[str]:
    texts = list(EDGES)
    for f in sorted((ROOT / "cfm_runtime" / "data" / "calib").glob("*.txt")):
        texts += [p for p in f.read_text().split("\n\n") if p.strip()]
    held_out = json.loads((ROOT / "cfm_bench" / "data" / "eval_texts.json").read_text())
    return texts + list(held_out["texts"].values()) + [m["content"] for m in held_out["chat"]]


def test_the_embedded_model_gets_the_lean_tokenizer(both, model_path):
    lean, _, ckpt = both
    assert isinstance(gguf_tokenizer(model_path, ckpt.metadata), GGUFBPETokenizer)
    other = dict(ckpt.metadata, **{"tokenizer.ggml.pre": "llama-bpe"})  # a pre-tokenizer it does not reproduce
    assert isinstance(gguf_tokenizer(model_path, other), GGUFTokenizer)


def test_ids_equal_llama_cpp(both):
    lean, reference, _ = both
    texts = corpus()
    assert len(texts) > 60
    for text in texts:
        assert lean.encode(text) == reference.encode(text), text[:80]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there! 12 + 30?"}]
    prompt = lean.apply_chat_template(messages)
    assert lean.encode(prompt) == reference.encode(prompt) and lean.encode(prompt)[0] == lean.bos_id


def test_pieces_specials_and_decoding_equal_llama_cpp(both):
    lean, reference, _ = both
    assert lean.vocab_size == reference.vocab_size
    assert lean.eog_ids == reference.eog_ids and lean.add_bos == reference.add_bos
    assert (lean.bos_id, lean.eos_id, lean.bos_text, lean.eos_text) == \
        (reference.bos_id, reference.eos_id, reference.bos_text, reference.eos_text)
    for i in range(lean.vocab_size):
        assert lean.token_bytes(i) == reference.token_bytes(i), i
    for i in range(40):
        assert lean.token_bytes(i, special=True) == reference.token_bytes(i, special=True), i
    ids = lean.encode("Ünïcödé 🙂 and <|im_end|> text")
    assert lean.decode(ids) == reference.decode(ids)
    stream_l, stream_r = lean.streamer(), reference.streamer()
    assert "".join(stream_l.push(i) for i in ids) == "".join(stream_r.push(i) for i in ids)
