"""The Llama-family transformer, defined once, runnable as spans of layers.

`Transformer.forward_span(h, start, end, caches)` runs layers [start, end) on hidden states
h [B, T, D]; each of the B sequences brings its own `SpanCache`. The edge, the center and a
local-only run all call the same code on different spans.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache, SpanCache
from .config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Rotary:
    """cos/sin tables grown on demand; `apply` rotates [H, T, hd] at given positions."""

    def __init__(self, config: ModelConfig):
        hd = config.head_dim
        inv = 1.0 / (config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
        if config.rope_freq_factors:
            inv = inv / torch.tensor(config.rope_freq_factors, dtype=torch.float64)
        self.inv_freq = inv
        self.neox = config.rope_style == "neox"
        self.cos = self.sin = torch.empty(0, hd // 2)

    def _grow(self, n: int) -> None:
        n = max(n, 2 * self.cos.shape[0], 256)
        angles = torch.outer(torch.arange(n, dtype=torch.float64), self.inv_freq)
        self.cos, self.sin = angles.cos().float(), angles.sin().float()

    def tables(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [n, hd/2] for positions 0..n-1 (what a fused kernel bakes in)."""
        if n > self.cos.shape[0]:
            self._grow(n)
        return self.cos[:n].contiguous(), self.sin[:n].contiguous()

    def apply(self, x: torch.Tensor, offset: int) -> torch.Tensor:
        t = x.shape[-2]
        if offset + t > self.cos.shape[0]:
            self._grow(offset + t)
        cos, sin = self.cos[offset:offset + t], self.sin[offset:offset + t]  # [T, hd/2]
        if self.neox:
            x1, x2 = x.chunk(2, dim=-1)
            return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
        x1, x2 = x[..., 0::2], x[..., 1::2]  # adjacent pairs, llama.cpp's "normal" layout
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, rotary: Rotary):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.attn_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.attn_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=False)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        # Projections are batched; attention is per sequence because each has its own cache.
        out = torch.stack([self._attend(q[i], k[i], v[i], caches[i]) for i in range(b)])
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))

    def _attend(self, q, k, v, cache: KVCache) -> torch.Tensor:
        pos, t = cache.offset, q.shape[1]
        q, k = self.rotary.apply(q, pos), self.rotary.apply(k, pos)
        cache.append(k.detach().numpy(), v.detach().numpy())
        if k.requires_grad and pos == 0:  # training: the keys and values of this very forward carry the gradient
            keys, values = k, v
        else:
            keys, values = torch.from_numpy(cache.k)[:, :pos + t], torch.from_numpy(cache.v)[:, :pos + t]
        mask, causal = None, t > 1
        if t > 1 and pos > 0:  # queries sit at pos..pos+t-1, keys at 0..pos+t-1
            mask = torch.arange(pos + t)[None, :] <= torch.arange(pos, pos + t)[:, None]
            causal = False
        return F.scaled_dot_product_attention(
            q[None], keys[None], values[None], attn_mask=mask, is_causal=causal, enable_gqa=True
        )[0]


ACTIVATIONS = {"silu": F.silu, "relu": F.relu}  # ModelConfig.activation -> the gate's nonlinearity


class MLP(nn.Module):
    """Gated FFN: down(act(gate x) * up x). Sparse/offloaded FFNs replace this module."""

    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.up_proj = nn.Linear(c.d_model, c.d_ff, bias=False)
        self.down_proj = nn.Linear(c.d_ff, c.d_model, bias=False)
        self.act = ACTIVATIONS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, rotary: Rotary):
        super().__init__()
        self.input_layernorm = RMSNorm(c.d_model, c.rms_eps)
        self.self_attn = Attention(c, rotary)
        self.post_attention_layernorm = RMSNorm(c.d_model, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, caches: Sequence[KVCache]) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), caches)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    """Embeddings, a stack of blocks runnable as spans, final norm and LM head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.rotary = Rotary(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, self.rotary) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.rms_eps)
        # None: the head is the embedding (tied); else nn.Linear, or a quantized head (cfm_runtime.backends)
        self.lm_head = None if config.tied_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    @classmethod
    def from_weights(cls, config: ModelConfig, weights: dict[str, torch.Tensor]) -> "Transformer":
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(weights, strict=True, assign=True)
        model.rotary = Rotary(config)  # the one built under the meta device holds no values
        for layer in model.layers:
            layer.self_attn.rotary = model.rotary
        return model.eval().requires_grad_(False)

    def new_cache(self, start: int = 0, end: int | None = None, max_len: int | None = None) -> SpanCache:
        return SpanCache(self.config, start, self.config.n_layers if end is None else end, max_len)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] -> hidden states [B, T, D]."""
        return self.embed_tokens(ids)

    def forward_span(self, h: torch.Tensor, start: int, end: int, caches: Sequence[SpanCache]) -> torch.Tensor:
        """Run layers [start, end) on h [B, T, D]; caches[i] belongs to sequence i."""
        for i in range(start, end):
            h = self.layers[i](h, [c[i] for c in caches])
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and LM head: [B, T, D] -> logits [B, T, vocab]."""
        if self.lm_head is None:
            return F.linear(self.norm(h), self.embed_tokens.weight)
        return self.lm_head(self.norm(h))
