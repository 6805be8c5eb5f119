"""Perturbation by masking FFN neurons: a temporary wrapper around each `layers[i].mlp`, and losses."""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CfmError


class MaskedMLP(nn.Module):
    """Runs the wrapped gated MLP with some neurons zeroed before the down projection.

    `keep` [F] bool drops a fixed neuron set; `drop_lowest` in [0, 1) drops, per token, that
    fraction of neurons with the smallest score: |act| (`by="act"`) or |act|·‖W_down[:, i]‖
    (`by="output"`, the neuron's contribution to the output norm).
    """

    def __init__(self, mlp: nn.Module, keep: torch.Tensor | None = None, drop_lowest: float = 0.0,
                 by: str = "act"):
        super().__init__()
        if by not in ("act", "output"):
            raise CfmError(f"mask criterion must be 'act' or 'output', not {by!r}")
        if not 0.0 <= drop_lowest < 1.0:
            raise CfmError(f"drop_lowest must be in [0, 1), got {drop_lowest}")
        self.inner, self.keep, self.drop_lowest = mlp, keep, drop_lowest
        self.col_norm = mlp.down_proj.weight.norm(dim=0) if by == "output" else None  # [F]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.inner
        a = m.act(m.gate_proj(x)) * m.up_proj(x)  # [B, T, F]
        if self.keep is not None:
            a = a * self.keep
        k = int(round(self.drop_lowest * a.shape[-1]))
        if k > 0:
            score = a.abs() if self.col_norm is None else a.abs() * self.col_norm
            a = a.scatter(-1, score.topk(k, -1, largest=False).indices, 0.0)
        return m.down_proj(a)


@contextmanager
def masked(transformer, make):
    """Temporarily replace every layer's MLP by `make(layer_index, mlp)` (None keeps it); restores on exit."""
    originals = [layer.mlp for layer in transformer.layers]
    try:
        for i, layer in enumerate(transformer.layers):
            wrapped = make(i, originals[i])
            if wrapped is not None:
                layer.mlp = wrapped
        yield
    finally:
        for layer, mlp in zip(transformer.layers, originals):
            layer.mlp = mlp


def sequence_nll(transformer, ids: list[int], start: int) -> tuple[float, int]:
    """Summed next-token negative log-likelihood of ids[start+1:] given their prefix, and the count."""
    if start + 1 >= len(ids):
        return 0.0, 0
    cache = transformer.new_cache(max_len=len(ids))
    with torch.inference_mode():
        h = transformer.forward_span(transformer.embed(torch.tensor([ids])), 0, transformer.config.n_layers, [cache])
        logits = transformer.head(h[:, start:-1])[0]  # [n, vocab]
        target = torch.tensor(ids[start + 1:])
        return F.cross_entropy(logits.float(), target, reduction="sum").item(), len(target)


def mean_nll(transformer, encoded) -> float:
    """Token-weighted mean NLL over encoded texts (scored from their content start)."""
    total, count = 0.0, 0
    for e in encoded:
        s, n = sequence_nll(transformer, e.ids, e.content_start)
        total, count = total + s, count + n
    return total / max(count, 1)


def perplexity(nll: float) -> float:
    return math.exp(nll)
