"""Routing: pick the brick whose training data looks most like the prompt, or none.

A brick's signature is the mean of its training data's unit-normalised hidden states at an
early (edge) layer. A prompt is scored against each signature by the cosine of both after
subtracting a reference mean (general text), so what every text shares does not count.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch

from ..errors import CfmError
from .lora import attached, set_weight

DEFAULT_THRESHOLD = 0.35
REFERENCE_TEXTS = [
    "The history of science is the study of the development of science and scientific knowledge.",
    "def main():\n    for i in range(10):\n        print(i)\n",
    "<|im_start|>user\nCan you recommend a good book?<|im_end|>\n<|im_start|>assistant\nSure! Here is one.",
    "The recipe needs two cups of flour, one egg and a pinch of salt. Bake for twenty minutes.",
    "The stock market rose on Tuesday as investors welcomed the central bank's decision.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
]


def signature_layer(n_layers: int) -> int:
    """The layer whose output is summarised: early enough that the edge always holds it."""
    return min(4, n_layers)


@contextmanager
def bricks_off(transformer):
    """Signatures describe the base model's view of a text: attached bricks are switched off meanwhile."""
    weights = attached(transformer)
    for name in weights:
        set_weight(transformer, name, 0.0)
    try:
        yield
    finally:
        for name, w in weights.items():
            set_weight(transformer, name, w)


def hidden_mean(model, texts_ids: list[list[int]], layer: int) -> np.ndarray:
    """Mean unit-normalised hidden state [D] after layers [0, layer) over each text's own content:
    the first position (attention sink) and the chat template's fixed head and tail are left out,
    since every chat prompt shares them and they would swamp what the user wrote."""
    tr = model.transformer
    total, count = torch.zeros(tr.config.d_model, dtype=torch.float64), 0
    with torch.inference_mode(), bricks_off(tr):
        for ids in texts_ids:
            h = tr.forward_span(tr.embed(torch.tensor([ids])), 0, layer, [tr.new_cache(0, layer, len(ids))])[0]
            a, b = content_span(model, ids)
            h = h[a:b]
            total += torch.nn.functional.normalize(h, dim=-1).double().sum(0)
            count += h.shape[0]
    return (total / max(count, 1)).numpy()


_TEMPLATE: dict[int, list[int]] = {}


def content_span(model, ids: list[int]) -> tuple[int, int]:
    """[a, b) of `ids` that is not the chat template rendered around an empty user message."""
    key = id(model)
    if key not in _TEMPLATE:
        try:
            _TEMPLATE[key] = model.encode_prompt([{"role": "user", "content": ""}])
        except CfmError:  # no chat template: only the attention sink is skipped
            _TEMPLATE[key] = ids[:1]
    t = _TEMPLATE[key]
    a = 0
    while a < min(len(ids), len(t)) and ids[a] == t[a]:
        a += 1
    b = len(ids)
    while b > a and len(ids) - b < len(t) - a and ids[b - 1] == t[len(t) - (len(ids) - b) - 1]:
        b -= 1
    a = max(a, 1)
    return (a, b) if b > a else (max(0, len(ids) - 1), len(ids))


_REFERENCE: dict[tuple[int, int], np.ndarray] = {}


def reference(model, layer: int) -> np.ndarray:
    key = (id(model), layer)
    if key not in _REFERENCE:
        _REFERENCE[key] = hidden_mean(model, [model.tokenizer.encode(t) for t in REFERENCE_TEXTS], layer)
    return _REFERENCE[key]


def signature(model, texts_ids: list[list[int]]) -> tuple[list[float], int]:
    """(signature, layer) of a brick's training data."""
    layer = signature_layer(model.config.n_layers)
    return hidden_mean(model, texts_ids, layer).tolist(), layer


def scores(model, prompt_ids: list[int], metas: list[dict]) -> dict[str, float]:
    """Brick name -> similarity of the prompt to its signature (bricks without a signature are left out)."""
    out = {}
    for meta in metas:
        sig, layer = meta.get("signature"), meta.get("signature_layer")
        if sig is None or layer is None or len(sig) != model.config.d_model:
            continue
        ref = reference(model, layer)
        p = hidden_mean(model, [prompt_ids], layer) - ref
        s = np.asarray(sig) - ref
        out[meta["name"]] = float(p @ s / (np.linalg.norm(p) * np.linalg.norm(s) + 1e-12))
    return out


def route(model, prompt_ids: list[int], metas: list[dict], threshold: float = DEFAULT_THRESHOLD
          ) -> tuple[str | None, dict[str, float]]:
    """(best brick name or None if no score reaches `threshold`, all scores)."""
    s = scores(model, prompt_ids, metas)
    best = max(s, key=s.get, default=None)
    return (best if best is not None and s[best] >= threshold else None), s
