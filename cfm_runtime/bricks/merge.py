"""Weighted merging of bricks made for the same base model.

The merged update of a module is exactly sum_k w_k * s_k * B_k A_k: the A's are stacked and the
scaled B's placed side by side (rank r_1 + r_2 + ...), so bricks with different ranks or target
modules merge without approximation; a module only one brick touches keeps that brick's update.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .formats import raise_problems
from .lora import LoraPair
from .store import Brick


def check_compatible(bricks: list[Brick], weights: list[float]) -> None:
    problems = []
    if len(bricks) < 2:
        problems.append("give at least two bricks to merge")
    names = [b.name for b in bricks]
    if len(set(names)) != len(names):
        problems.append(f"a brick is listed twice: {names}")
    for b, w in zip(bricks, weights):
        if not math.isfinite(w) or w == 0:
            problems.append(f"{b.name}: weight {w} must be a finite, non-zero number")
    bases = {b.meta.get("base_fingerprint") for b in bricks}
    if len(bases) > 1 or None in bases:
        detail = ", ".join(f"{b.name}: {b.meta.get('base_model') or '?'} "
                           f"({str(b.meta.get('base_fingerprint'))[:12]})" for b in bricks)
        problems.append(f"the bricks were made for different base models ({detail}); "
                        "only bricks of the same base model can be merged")
    raise_problems("cannot merge", problems)


def merge_pairs(bricks: list[Brick], weights: list[float]) -> dict[str, LoraPair]:
    modules = sorted({m for b in bricks for m in b.pairs})
    out = {}
    for m in modules:
        parts = [(b.pairs[m], w) for b, w in zip(bricks, weights) if m in b.pairs]
        a = torch.cat([p.a for p, _ in parts], 0)  # [sum r, in]
        b = torch.cat([w * p.scale * p.b for p, w in parts], 1)  # [out, sum r]
        out[m] = LoraPair(a, b, 1.0)
    return out


def merged_signature(bricks: list[Brick], weights: list[float]) -> tuple[list[float] | None, int | None]:
    """Weighted mean of the signatures the bricks have (a brick without one does not route)."""
    have = [(b, w) for b, w in zip(bricks, weights) if b.meta.get("signature") is not None and w != 0]
    layers = {b.meta.get("signature_layer") for b, _ in have}
    if not have or len(layers) != 1:
        return None, None
    w = np.abs(np.array([w for _, w in have]))[:, None]
    sigs = np.array([b.meta["signature"] for b, _ in have])
    return (np.sum(w * sigs, 0) / w.sum()).tolist(), layers.pop()


def merge_bricks(bricks: list[Brick], weights: list[float], name: str, description: str = "") -> Brick:
    """A new brick whose update is the weighted sum of the bricks' updates."""
    check_compatible(bricks, weights)
    signature, layer = merged_signature(bricks, weights)
    keep = ("base_fingerprint", "base_model", "arch", "n_layers", "d_model")
    meta = {k: bricks[0].meta.get(k) for k in keep}
    meta |= {"description": description or "merge of " + ", ".join(f"{b.name}:{w:g}" for b, w in zip(bricks, weights)),
             "source": "merge", "merged_from": {b.name: w for b, w in zip(bricks, weights)},
             "signature": signature, "signature_layer": layer}
    return Brick(name, merge_pairs(bricks, weights), meta)
