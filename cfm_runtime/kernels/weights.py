"""The weights a fused kernel reads: plain arrays and packed blocks, no modules.

`DecoderWeights` (torch tensors, MatMulNBits packing) feeds the onnxruntime graphs (`fused`), filled from a
model's modules; `BlockWeights` (numpy, GGUF blocks) feeds the native kernel (`native`), read from the model
file itself (`cfm_runtime.loading.block_weights`). The kernels know nothing of modules, spans or bricks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .packing import Packed


@dataclass
class LayerWeights:
    """One decoder layer: RMSNorm gains [d] and the seven packed projections (q/k/v biases optional)."""

    ln1: torch.Tensor
    ln2: torch.Tensor
    q: Packed
    k: Packed
    v: Packed
    o: Packed
    gate: Packed
    up: Packed
    down: Packed
    qkv_bias: torch.Tensor | None  # [q + 2 kv] or None
    accuracy: int  # MatMulNBits accuracy level of the layer's projections


@dataclass
class DecoderWeights:
    """Sizes, rotary tables and the layers (by index; any subset) of a Llama-family decoder."""

    d_model: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    eps: float
    activation: str  # "silu" | "relu"
    interleaved_rope: bool  # adjacent pairs (llama.cpp "normal"); False: the two halves ("neox")
    cos: torch.Tensor  # [context_length, head_dim / 2]
    sin: torch.Tensor
    layers: dict[int, LayerWeights]
    final_norm: torch.Tensor | None = None  # [d]; with `head`, the model's last norm and LM head
    head: Packed | None = None  # [vocab, d]
    head_accuracy: int = 4


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
