"""Execution backends: how a model's layers are computed, chosen once per module configuration.

- `ModuleBackend`: the torch modules as they are (fp32 `nn.Linear`, `QuantizedLinear`, LoRA bricks,
  sparse FFNs): every configuration runs here.
- `FusedBackend`: quantized weights in the stock module layout (bricks on them become unfused low-rank side
  terms): every position through the native kernel (prompt chunks and single steps alike, so an answer does
  not depend on which path computed the cached positions; decode steps of many sequences in one call), or
  through onnxruntime graphs of the span where the kernel cannot be built. About 5x the module path's
  decode speed on the embedded model.

`choose_backend` decides from the modules (a wrapped or replaced module means the module path);
`cfm_runtime.runtime.Model` calls it at load time and whenever bricks or a sparse FFN change the modules.
Both backends read and write the same `SpanCache`, so a runner may switch between them at any token.

Every backend (these two and `native_backend.NativeBackend`, the torch-free one) takes and returns numpy
arrays: hidden states [B, T, D] and logits; torch stays inside these two.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from .errors import CfmError
from .kernels import native
from .kernels.fused import FusedSpan
from .kernels.graph import ACCURACY_LEVEL
from .kernels.quant import QuantizedHead, QuantizedLinear
from .bricks.lora import LoRALinear
from .kernels.blocks import BlockWeights
from .kernels.weights import DecoderWeights, LayerWeights
from .model import MLP, Attention, SpanCache, Transformer
from .native_backend import native_span, native_span_head

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

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token embeddings [1, T, D]."""
        with torch.inference_mode():
            return self.t.embed(torch.tensor([ids])).numpy()

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        """Logits [len(ids) or 1, vocab] of ids after the cached positions; appends them to `cache`."""
        return self.span_head(self.embed(ids), 0, cache, all_logits)

    @torch.inference_mode()
    def span(self, h: np.ndarray, start: int, end: int, caches: list[SpanCache]) -> np.ndarray:
        """Layers [start, end) on h [B, T, D] -> [B, T, D]; caches[i] belongs to sequence i."""
        return self.t.forward_span(torch.from_numpy(np.ascontiguousarray(h)), start, end, caches).numpy()

    @torch.inference_mode()
    def span_head(self, h: np.ndarray, start: int, cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        """Layers [start, n), final norm and head on one sequence h [1, T, D] -> logits [T or 1, vocab]."""
        x = self.t.forward_span(torch.from_numpy(np.ascontiguousarray(h)), start, self.t.config.n_layers, [cache])
        return self.t.head(x if all_logits else x[:, -1:])[0].numpy()

    def torch_threads(self) -> int | None:
        return None  # torch computes: its threads are left as set

    @property
    def position_cost(self) -> float:
        """Extra time of one more position in a forward, relative to one position: fp32 matrix products read the
        weights once for every position (0.1-0.2 measured on 2 cores, docs/speculative.md)."""
        return 0.2

    def report(self) -> dict:
        return {"backend": self.name}


# ---------------------------------------------------------------- the fused path


def _base(module: nn.Module) -> nn.Module:
    """The linear a brick wraps (or the module itself)."""
    return module.base if isinstance(module, LoRALinear) else module


def stock_modules(t: Transformer) -> tuple:
    """The module objects a fused backend is built from, under any brick wrappers (identity, not equality:
    a replaced module is a change; a brick put on or taken off is not, its side term is passed apart)."""
    out = [t.norm, t.lm_head]
    for layer in t.layers:
        out += [layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                *(_base(p) for p in _projections(layer))]
    return tuple(out)


def _projections(layer) -> tuple:
    """q, k, v, o, gate, up, down (None where a replaced module has no such projection)."""
    return tuple(getattr(getattr(layer, parent), name, None) for parent, name in (p.split(".") for p in PROJECTIONS))


def decoder_weights(t: Transformer) -> DecoderWeights | None:
    """The fused kernels' view of `t`, or None when its modules are not the stock quantized layout (every
    `mlp` an `MLP`, every `self_attn` an `Attention`, every projection a `QuantizedLinear`, possibly under a
    brick wrapper, no bias outside q/k/v). The head is included only when it is a `QuantizedHead`."""
    c = t.config
    layers = {}
    for i, layer in enumerate(t.layers):
        a, m = layer.self_attn, layer.mlp
        if type(a) is not Attention or type(m) is not MLP:
            return None
        projections = [_base(p) for p in _projections(layer)]
        if not all(type(p) is QuantizedLinear for p in projections):
            return None
        q, k, v, o, gate, up, down = projections
        if any(p.bias is not None for p in (o, gate, up, down)):
            return None
        layers[i] = LayerWeights(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                                 q.packed, k.packed, v.packed, o.packed, gate.packed, up.packed, down.packed,
                                 _qkv_bias(q, k, v), q.accuracy)
    head = t.lm_head if type(t.lm_head) is QuantizedHead else None
    cos, sin = t.rotary.tables(c.context_length)
    return DecoderWeights(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.vocab_size, c.context_length,
                          float(t.norm.eps), c.activation, c.rope_style != "neox", cos, sin, layers,
                          t.norm.weight.detach() if head is not None else None,
                          head.packed if head is not None else None,
                          head.accuracy if head is not None else ACCURACY_LEVEL)


def _qkv_bias(q: QuantizedLinear, k: QuantizedLinear, v: QuantizedLinear) -> torch.Tensor | None:
    if all(p.bias is None for p in (q, k, v)):
        return None
    return torch.cat([p.bias if p.bias is not None else torch.zeros(p.out_features) for p in (q, k, v)]).detach()


def side_terms(t: Transformer) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    """The bricks on `t` as one low-rank term per linear: {(layer, kind): (A [r, in], B [out, r])}, every active
    brick's pair stacked (rank r = the sum of theirs), its weight and scale folded into B (`bricks.merge`)."""
    out = {}
    for i, layer in enumerate(t.layers):
        for path, module in zip(PROJECTIONS, _projections(layer)):
            if isinstance(module, LoRALinear):
                pairs = [(p, module.weights[n] * p.scale) for n, p in module.adapters.items() if module.weights[n]]
                if pairs:
                    a = torch.cat([p.a for p, _ in pairs]).float().contiguous()
                    b = torch.cat([w * p.b for p, w in pairs], dim=1).float().contiguous()
                    out[(i, path.split(".")[1].removesuffix("_proj"))] = (a.detach(), b.detach())
    return out


NATIVE_SPARSE_ONLY = ("the sparse FFN on int4 weights runs in the native kernel, over the stock int4 modules and "
                      "the 8-bit head; load with --weights fp32 for the neuron pack's sparse FFN")


class FusedBackend:
    """Quantized stock modules: onnxruntime graphs for prompts, the native kernel for single-token steps (or the
    graph where it cannot be built); bricks run as unfused low-rank side terms on both.

    Holds no cache of its own; each span's graph (~2 s to build) and the native decoder are built on first use.
    """

    name = "fused"

    def __init__(self, t: Transformer, weights: DecoderWeights, threads: int, spin: bool = True,
                 blocks: Callable[[], BlockWeights] | None = None, sparse: native.SparseFFN | None = None):
        self.t, self.w, self.threads, self.spin = t, weights, threads, spin
        self.blocks = blocks  # the file's blocks for the native kernel (read on first use); None: graphs only
        self.sparse = sparse  # the native kernel's sparse FFN (the graphs have none: it needs the kernel)
        self.modules = stock_modules(t)  # what the weights were read from (checked when re-choosing)
        self._spans: dict[tuple, FusedSpan] = {}
        self._native, self._native_tried = None, blocks is None
        self.sides: dict = {}  # (layer, kind) -> (A, B): the bricks, for the native kernel
        self._graph_sides: dict = {}  # the same as graph inputs: (A^T, B^T)

    def set_sides(self, sides: dict) -> None:
        """The bricks' side terms from now on (a new dict each time: graphs rebind by identity)."""
        self.sides = sides
        self._graph_sides = {key: (a.T.contiguous(), b.T.contiguous()) for key, (a, b) in sides.items()}
        if self._native is not None:
            self._native.set_sides({key: (a.numpy(), b.numpy()) for key, (a, b) in sides.items()})

    def native(self) -> native.NativeDecoder | None:
        """The native kernel over the file's blocks, or None (not buildable here, or a layout it lacks)."""
        if not self._native_tried:
            self._native_tried = True
            lib = native.load()
            blocks = self.blocks() if lib is not None else None
            if native.supported(blocks):
                self._native = native.NativeDecoder(blocks, self.threads, lib, sparse=self.sparse)
                self.set_sides(self.sides)
            elif self.sparse is not None:
                raise CfmError(NATIVE_SPARSE_ONLY)
        return self._native

    def _graph(self, start: int, end: int, head: bool) -> FusedSpan:
        key = (start, end, head, bool(self.sides))
        if key not in self._spans:
            self._spans[key] = FusedSpan(self.w, start, end, self.threads, head=head, spin=self.spin,
                                         sides=bool(self.sides))
        return self._spans[key]

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token embeddings [1, T, D]."""
        if self.native() is not None:
            return self._native.embed(ids)[None]
        with torch.inference_mode():
            return self.t.embed(torch.tensor([ids])).numpy()

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        """Logits [len(ids) or 1, vocab]; appends len(ids) positions to cache."""
        return self.span_head(self.embed(ids), 0, cache, all_logits)

    def span(self, h: np.ndarray, start: int, end: int, caches: list[SpanCache]) -> np.ndarray:
        """Layers [start, end) on h [B, T, D] -> [B, T, D] through the native kernel (one position per sequence:
        the whole batch in one call; several: each sequence's chunk in one call), else the span's graph."""
        if start == end:
            return h
        if self.native() is not None:
            return native_span(self._native, h, start, end, caches)
        graph = self._graph(start, end, head=False)
        with torch.inference_mode():
            return np.concatenate([graph.forward(torch.from_numpy(np.ascontiguousarray(h[j:j + 1])),
                                                 [c[i] for i in range(start, end)], self._graph_sides).numpy()
                                   for j, c in enumerate(caches)])

    def span_head(self, h: np.ndarray, start: int, cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        """Layers [start, n), final norm and head on one sequence h [1, T, D] -> logits [T or 1, vocab]."""
        n = self.t.config.n_layers
        if self.native() is not None:
            return native_span_head(self._native, h, start, n, cache, all_logits)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(h))
            if start == n:
                return self.t.head(x if all_logits else x[:, -1:])[0].numpy()
            graph = self._graph(start, n, head=self.w.head is not None)
            out = graph.forward(x, [cache[i] for i in range(start, n)], self._graph_sides)
            x, logits = out if graph.head else (out, None)
            if all_logits:
                return self.t.head(x)[0].numpy()
            if logits is None:
                return self.t.head(x[:, -1:])[0].numpy()
            return logits[None].numpy().copy()

    def torch_threads(self) -> int | None:
        """1 while the fused kernels do the work: torch only samples and looks up embeddings, and its OpenMP
        workers, spinning after each of those small parallel ops, took the cores from onnxruntime's and the
        native kernel's (0.69x -> 0.76x llama.cpp decode, and 0.85x with onnxruntime's workers spinning)."""
        return 1

    @property
    def position_cost(self) -> float:
        """Extra time of one more position in a forward, relative to one position (`native.POSITION_COST`)."""
        decoder = self.native()
        return decoder.position_cost if decoder is not None else native.POSITION_COST["rows"]

    def report(self) -> dict:
        decoder = self.native()
        if decoder is not None:
            return {"backend": self.name, "decode_path": "native", "kernel": decoder.path} | decoder.report()
        return {"backend": self.name, "decode_path": f"graph ({native.failure() or 'a layout the kernel lacks'})"}


def choose_backend(t: Transformer, threads: int, previous: FusedBackend | None = None,
                   blocks: Callable[[], BlockWeights] | None = None,
                   sparse: native.SparseFFN | None = None) -> ModuleBackend | FusedBackend:
    """The fused backend when `t` holds the stock quantized modules (under any bricks: they become side terms),
    reusing `previous` if it was built from these very modules; else the module backend. `blocks` gives the
    native kernel its weights (the model file's blocks), `sparse` its sparse FFN."""
    if previous is not None and stock_modules(t) == previous.modules:
        backend = previous
    else:
        w = decoder_weights(t)
        # the kernel computes with int8 activations and the 8-bit head: a model built otherwise keeps the graphs
        int8 = w is not None and (w.head is not None and w.head_accuracy == ACCURACY_LEVEL
                                  and all(x.accuracy == ACCURACY_LEVEL for x in w.layers.values()))
        if sparse is not None and not int8:
            raise CfmError(NATIVE_SPARSE_ONLY)
        if w is None:
            return ModuleBackend(t)
        backend = FusedBackend(t, w, threads, blocks=blocks if int8 else None, sparse=sparse)
    backend.set_sides(side_terms(t))
    return backend
