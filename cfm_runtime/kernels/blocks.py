"""The weights the native kernel reads: GGUF blocks (Q4_1 linears, a Q8_0 head and embedding) in numpy arrays,
views of the mapped model file where it holds these types; and the packers for every other source.
No torch: a process that only runs the kernel never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class BlockLayer:
    """One decoder layer as GGUF blocks: RMSNorm gains (float32 [d]) and Q4_1 rows (uint8 [rows, in / 32 * 20])."""

    ln1: np.ndarray
    ln2: np.ndarray
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    o: np.ndarray
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray


@dataclass
class BlockWeights:
    """A decoder as the native kernel reads it: Q4_1 layers, a Q8_0 head and embedding (the same array when tied),
    rotary tables; arrays may be views of a memory-mapped file."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    vocab_size: int
    context_length: int
    eps: float
    activation: str
    interleaved_rope: bool
    qkv_bias: bool
    cos: np.ndarray  # float32 [context_length, head_dim / 2]
    sin: np.ndarray
    layers: list[BlockLayer]
    final_norm: np.ndarray  # float32 [d]
    head: np.ndarray  # uint8 [vocab, d / 32 * 34]
    embed: np.ndarray


def q4_1_blocks(w: np.ndarray) -> np.ndarray:
    """w [n, k] -> GGUF Q4_1 blocks uint8 [n, k/32 * 20] (fp16 d, fp16 m, nibbles: low = elements 0..15), as
    llama.cpp quantizes: d = (max - min) / 15, m = min, q = round((w - m) / d) per block of 32."""
    n, k = w.shape
    wb = np.asarray(w, dtype=np.float32).reshape(n, k // 32, 32)
    lo, hi = wb.min(-1), wb.max(-1)
    d = (hi - lo) / 15
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    q = np.clip(np.floor((wb - lo[..., None]) * inv[..., None] + 0.5), 0, 15).astype(np.uint8)
    out = np.empty((n, k // 32, 20), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:4] = lo.astype(np.float16)[..., None].view(np.uint8)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return out.reshape(n, -1)


def q8_0_blocks(w: np.ndarray) -> np.ndarray:
    """w [n, k] -> GGUF Q8_0 blocks uint8 [n, k/32 * 34] (fp16 d, 32 int8): d = max|w| / 127 per block of 32."""
    n, k = w.shape
    wb = np.asarray(w, dtype=np.float32).reshape(n, k // 32, 32)
    d = np.abs(wb).max(-1) / 127
    inv = np.where(d > 0, 1 / np.where(d > 0, d, 1), 0)
    q = np.clip(np.round(wb * inv[..., None]), -127, 127).astype(np.int8)
    out = np.empty((n, k // 32, 34), dtype=np.uint8)
    out[..., 0:2] = d.astype(np.float16)[..., None].view(np.uint8)
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n, -1)
