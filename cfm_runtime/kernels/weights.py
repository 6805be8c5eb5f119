"""The weights the onnxruntime graphs (`fused`) read: plain tensors and MatMulNBits blocks, no modules.

The model side (`cfm_runtime.backends`) fills these from its modules; the native kernel reads `blocks`
(the file's GGUF blocks) instead. The kernels know nothing of modules, spans or bricks.
"""

from __future__ import annotations

from dataclasses import dataclass

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

