"""Execution backends: how a model's layers are computed, chosen once per module configuration.

- `ModuleBackend`: the torch modules as they are (fp32 `nn.Linear`, `QuantizedLinear`, LoRA bricks,
  sparse FFNs): every configuration runs here.
- `FusedBackend`: quantized weights in the stock module layout: prompts through one onnxruntime graph
  of the whole model, single-token steps through the native kernel (or the graph where it cannot be
  built). About 5x the module path's decode speed on the embedded model.

`choose_backend` decides from the modules (a wrapped or replaced module means the module path);
`cfm_runtime.runtime.Model` calls it at load time and whenever bricks or a sparse FFN change the modules.
Both backends read and write the same `SpanCache`, so a runner may switch between them at any token.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import native
from .kernels.fused import FusedSpan
from .kernels.graph import ACCURACY_LEVEL
from .kernels.quant import QuantizedHead, QuantizedLinear
from .kernels.weights import DecoderWeights, LayerWeights
from .model import MLP, Attention, SpanCache, Transformer

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def quantize_model(transformer: Transformer, weights: str = "int4", lm_head: str = "int8",
                   threads: int | None = None, accuracy: int | None = None) -> Transformer:
    """Replace the block linears by `QuantizedLinear` (in place) and, for lm_head "int8", install an 8-bit head.

    accuracy: None = int8 activations everywhere (fast); 0 = fp32 activations everywhere (slower;
    int4 from a Q4_1 file then gives the fp32 logits to ~1e-4).
    """
    if weights == "fp32":
        return transformer
    acc = ACCURACY_LEVEL if accuracy is None else accuracy
    for layer in transformer.layers:
        for path in PROJECTIONS:
            parent_name, attr = path.split(".")
            parent = getattr(layer, parent_name)
            module = getattr(parent, attr)
            if isinstance(module, nn.Linear):
                setattr(parent, attr, QuantizedLinear.from_linear(module, weights, threads, acc))
    if lm_head == "int8":
        w = transformer.embed_tokens.weight if transformer.lm_head is None else transformer.lm_head.weight
        transformer.lm_head = QuantizedHead.from_weight(w.data, threads)
        transformer.lm_head.accuracy = acc
    return transformer


def weight_bytes_per_token(transformer: Transformer) -> int:
    """Bytes of weights one decode step reads: every block linear, the LM head, one embedding row."""
    total = transformer.config.d_model * 4
    for layer in transformer.layers:
        for path in PROJECTIONS:
            parent_name, attr = path.split(".")
            total += _module_bytes(getattr(getattr(layer, parent_name), attr))
        total += sum(p.numel() * 4 for n, p in layer.named_parameters() if "layernorm" in n)
    head = transformer.lm_head
    total += transformer.embed_tokens.weight.numel() * 4 if head is None else _module_bytes(head)
    return total


def _module_bytes(m: nn.Module) -> int:
    if isinstance(m, QuantizedLinear):
        return m.nbytes
    return sum(p.numel() * p.element_size() for p in m.parameters())


# ---------------------------------------------------------------- the module path


class ModuleBackend:
    """The torch modules, whatever they hold."""

    name = "modules"

    def __init__(self, t: Transformer):
        self.t = t

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [len(ids) or 1, vocab] of ids after the cached positions; appends them to `cache`."""
        h = self.span(self.t.embed(torch.tensor([ids])), 0, self.t.config.n_layers, cache)
        return self.t.head(h if all_logits else h[:, -1:])[0]

    def span(self, h: torch.Tensor, start: int, end: int, cache: SpanCache) -> torch.Tensor:
        """Layers [start, end) on h [1, T, D] -> [1, T, D]."""
        return self.t.forward_span(h, start, end, [cache])

    def torch_threads(self) -> int | None:
        return None  # torch computes: its threads are left as set

    def report(self) -> dict:
        return {"backend": self.name}


# ---------------------------------------------------------------- the fused path


def stock_modules(t: Transformer) -> tuple:
    """The module objects a fused backend is built from (identity, not equality: a wrapper is a change)."""
    out = [t.norm, t.lm_head]
    for layer in t.layers:
        a, m = layer.self_attn, layer.mlp
        out += [layer, a, m, layer.input_layernorm, layer.post_attention_layernorm, *_projections(layer)]
    return tuple(out)


def _projections(layer) -> tuple:
    """q, k, v, o, gate, up, down (None where a replaced module has no such projection)."""
    return tuple(getattr(getattr(layer, parent), name, None) for parent, name in (p.split(".") for p in PROJECTIONS))


def decoder_weights(t: Transformer) -> DecoderWeights | None:
    """The fused kernels' view of `t`, or None when its modules are not the stock quantized layout (every
    `mlp` an `MLP`, every `self_attn` an `Attention`, every projection a `QuantizedLinear`, no bias
    outside q/k/v). The head is included only when it is a `QuantizedHead`."""
    c = t.config
    layers = {}
    for i, layer in enumerate(t.layers):
        a, m = layer.self_attn, layer.mlp
        if type(a) is not Attention or type(m) is not MLP:
            return None
        projections = _projections(layer)
        if not all(type(p) is QuantizedLinear for p in projections):
            return None
        if any(p.bias is not None for p in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
            return None
        q, k, v, o, gate, up, down = (p.packed for p in projections)
        layers[i] = LayerWeights(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                                 q, k, v, o, gate, up, down, _qkv_bias(a), a.q_proj.accuracy)
    head = t.lm_head if type(t.lm_head) is QuantizedHead else None
    cos, sin = t.rotary.tables(c.context_length)
    return DecoderWeights(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.context_length,
                          float(t.norm.eps), c.activation, c.rope_style != "neox", cos, sin, layers,
                          t.norm.weight.detach() if head is not None else None,
                          head.packed if head is not None else None,
                          head.accuracy if head is not None else ACCURACY_LEVEL)


def _qkv_bias(a: Attention) -> torch.Tensor | None:
    biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
    if all(b is None for b in biases):
        return None
    return torch.cat([b if b is not None else torch.zeros(p.out_features)
                      for b, p in zip(biases, (a.q_proj, a.k_proj, a.v_proj))]).detach()


class FusedBackend:
    """Quantized stock modules: one onnxruntime graph for prompts, the native kernel for single-token steps.

    Holds no cache of its own; the graph (~2 s to build) and the native decoder are built on first use.
    """

    name = "fused"

    def __init__(self, t: Transformer, weights: DecoderWeights, threads: int, spin: bool = True,
                 use_native: bool = True):
        self.t, self.w, self.threads, self.spin = t, weights, threads, spin
        self.modules = stock_modules(t)  # what the weights were read from (checked when re-choosing)
        self._span: FusedSpan | None = None
        self._native, self._native_tried = None, not use_native

    def native(self) -> native.NativeDecoder | None:
        """The compiled decode step for these weights, or None (not buildable here, or not the int4 layout)."""
        if not self._native_tried:
            self._native_tried = True
            module = native.load() if native.supported(self.w) else None
            if module is not None:
                self._native = native.NativeDecoder(self.w, self.threads, module)
        return self._native

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [len(ids) or 1, vocab] (a fresh tensor); appends len(ids) positions to cache."""
        t, n = self.t, self.t.config.n_layers
        layers = [cache[i] for i in range(n)]
        if len(ids) == 1 and not all_logits and self.native() is not None:
            return self._native.step(t.embed(torch.tensor([[ids[0]]]))[0, 0], layers)[None]
        if self._span is None:
            self._span = FusedSpan(self.w, 0, n, self.threads, head=self.w.head is not None, spin=self.spin)
        out = self._span.forward(t.embed(torch.tensor([ids])), layers)
        h, logits = out if self._span.head else (out, None)
        if all_logits:
            return t.head(h)[0]
        if logits is None:
            return t.head(h[:, -1:])[0]
        return logits[None].clone()

    def span(self, h: torch.Tensor, start: int, end: int, cache: SpanCache) -> torch.Tensor:
        """Layers [start, end) on h [1, T, D]: through the modules (the graph covers the whole model only)."""
        return self.t.forward_span(h, start, end, [cache])

    def torch_threads(self) -> int | None:
        """1 while the fused kernels do the work: torch only samples and looks up embeddings, and its OpenMP
        workers, spinning after each of those small parallel ops, took the cores from onnxruntime's and the
        native kernel's (0.69x -> 0.76x llama.cpp decode, and 0.85x with onnxruntime's workers spinning)."""
        return 1

    def report(self) -> dict:
        path = "native" if self._native is not None else f"graph ({native.failure() or 'native kernel not used'})"
        return {"backend": self.name, "decode_path": path}


def choose_backend(t: Transformer, threads: int, previous: FusedBackend | None = None
                   ) -> ModuleBackend | FusedBackend:
    """The fused backend when `t` holds the stock quantized modules (reusing `previous` if it was built from
    these very modules), else the module backend."""
    if previous is not None and stock_modules(t) == previous.modules:
        return previous
    w = decoder_weights(t)
    return FusedBackend(t, w, threads) if w is not None else ModuleBackend(t)

