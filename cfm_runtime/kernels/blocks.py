"""The weights the native kernel reads: GGUF blocks (Q4_1 linears, a Q8_0 head and embedding) in numpy arrays,
views of the mapped model file where it holds these types (other sources are quantized to them with the gguf
package's `quants.quantize`, llama.cpp's rounding). No torch: a process that only runs the kernel never loads it.
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



def down_columns(down: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """A Q4_1 down projection's blocks [d, F / 32 * 20] (blocks along the FFN axis) as columns, one per neuron:
    (cols [F, d / 2]: the file's 4-bit codes of neuron n along the hidden axis, element 2j in the low nibble of byte
    j and 2j + 1 in the high one; shared [F / 32, d * 4]: per block of 32 neurons the file's fp16 scales of the d
    rows, then their mins). The same values as the file: weight[r, n] = scale[n // 32, r] * code[n, r] + min[...]."""
    blocks = np.ascontiguousarray(down).reshape(d, -1, 20)  # [d, F / 32, Q4_1 block]
    qs = blocks[:, :, 4:]
    codes = np.concatenate((qs & 15, qs >> 4), axis=2).reshape(d, -1).T  # [F, d], neuron-major
    cols = np.ascontiguousarray(codes[:, 0::2] | (codes[:, 1::2] << 4))
    shared = np.ascontiguousarray(blocks[:, :, :4].reshape(d, -1, 2, 2).transpose(1, 2, 0, 3)).reshape(-1, d * 4)
    return cols, shared
