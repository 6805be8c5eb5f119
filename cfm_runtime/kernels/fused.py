"""A whole span of decoder layers as one onnxruntime graph: the fast path for quantized weights.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one MatMulNBits for q|k|v,
GroupQueryAttention (rotary inside, KV written in place into the `KVCache` tensors, which are bound
by pointer as both past and present: no copy, no reallocation per token), MatMulNBits for o,
gate|up and down, each with its offset term as one Gemm (`GraphBuilder.linear`). Hidden states are
2-D [tokens, d] inside the graph (Gemm is 2-D only) and 3-D only around GroupQueryAttention. One
`session.run` per token instead of ~25 torch ops per layer.

It is built from, and only used for, the stock module configuration: every projection a
`QuantizedLinear`, every `mlp` an `MLP`, every `self_attn` an `Attention`. If any module was
replaced or wrapped (a LoRA brick, a sparse FFN), `usable()` is False and callers take the module
path. Both paths write the same rotated keys and values into the same `SpanCache`.
"""

from __future__ import annotations

import numpy as np
import torch

from ..model import MLP, Attention, SpanCache, Transformer
from .graph import FLOAT, INT32, MS, GraphBuilder, bind_tensor
from .packing import concat


def _stock_modules(t: Transformer, start: int, end: int, head: bool = False) -> tuple:
    """The module objects the graph was built from (identity, not equality: a wrapper is a change).

    Checked before every decode step, so it reads the `_modules` dicts directly: `nn.Module.__getattr__`
    and `ModuleList.__getitem__` made this ~1 ms of Python per token."""
    out = [t.norm, getattr(t, "lm_head", None)] if head else []
    for layer in list(t.layers._modules.values())[start:end]:
        sub = layer._modules
        a, m = sub["self_attn"]._modules, sub["mlp"]._modules
        out += [layer, sub["self_attn"], sub["mlp"], sub["input_layernorm"], sub["post_attention_layernorm"],
                a["q_proj"], a["k_proj"], a["v_proj"], a["o_proj"], m["gate_proj"], m["up_proj"], m["down_proj"]]
    return tuple(out)


def projections(layer) -> tuple:
    """A layer's q, k, v, o, gate, up and down projections."""
    a, m = layer.self_attn, layer.mlp
    return a.q_proj, a.k_proj, a.v_proj, a.o_proj, m.gate_proj, m.up_proj, m.down_proj


def supported(t: Transformer, start: int, end: int, head: bool = False) -> bool:
    """Whether layers [start, end) (and the head) are the stock modules with quantized projections."""
    from ..quant import QuantizedHead, QuantizedLinear

    if head and type(getattr(t, "lm_head", None)) is not QuantizedHead:
        return False
    for i in range(start, end):
        a, m = t.layers[i].self_attn, t.layers[i].mlp
        if type(a) is not Attention or type(m) is not MLP:
            return False
        if not all(type(p) is QuantizedLinear for p in projections(t.layers[i])):
            return False
        if any(p.bias is not None for p in (a.o_proj, m.gate_proj, m.up_proj, m.down_proj)):
            return False
    return True


class FusedSpan:
    """Layers [start, end) of `t` as one graph; `forward(h, cache)` runs one sequence (B = 1).

    With head=True the graph also applies the final norm and the quantized LM head to the last
    position (output "logits" [1, vocab]), so a decode step is a single session run.
    """

    def __init__(self, t: Transformer, start: int, end: int, threads: int, head: bool = False, spin: bool = False):
        if not supported(t, start, end, head):
            raise ValueError("the fused path needs the stock modules with QuantizedLinear projections")
        self.t, self.start, self.end, self.head = t, start, end, head
        self.modules = _stock_modules(t, start, end, head)
        self.session = self._build(threads, spin)
        self._bound: tuple | None = None  # (binding, cache, data pointers) of the last call
        self._lens = torch.zeros(2, dtype=torch.int32)  # seqlens_k (= total - 1), total_sequence_length

    def usable(self) -> bool:
        """True while the transformer still holds exactly the modules the graph was built from."""
        return _stock_modules(self.t, self.start, self.end, self.head) == self.modules

    # ------------------------------------------------------------ graph

    def _build(self, threads: int, spin: bool):
        c, g = self.t.config, GraphBuilder()
        h = g.input("h", FLOAT, [1, "t", c.d_model])
        lens = g.input("lens", INT32, [2])
        seqlens = g.op("Slice", [lens, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])[0]
        total = g.op("Slice", [lens, g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))])[0]
        total = g.op("Squeeze", [total])[0]
        self.t.rotary.apply(torch.zeros(1, 1, c.head_dim), c.context_length - 1)  # grow the tables to the context
        cos = g.const(self.t.rotary.cos[:c.context_length].numpy(), "cos")
        sin = g.const(self.t.rotary.sin[:c.context_length].numpy(), "sin")
        kv_shape = [1, c.n_kv_heads, "cap", c.head_dim]
        # 2-D [t, d] inside (Gemm takes the offset terms' adds; see GraphBuilder.linear); 3-D only around GQA
        x, pending = g.op("Reshape", [h, g.const(np.array([-1, c.d_model], np.int64), "shape")])[0], None
        for i in range(self.start, self.end):
            layer = self.t.layers[i]
            x, xn = self._norm(g, x, pending, layer.input_layernorm)
            names = [g.input(f"{kind}_{i}", FLOAT, kv_shape) for kind in ("past_k", "past_v")]
            attn = self._attention(g, xn, layer.self_attn, names, seqlens, total, cos, sin)
            x, xn = self._norm(g, x, attn, layer.post_attention_layernorm)
            pending = self._mlp(g, xn, layer.mlp)
            for kind, past in zip(("present_k", "present_v"), names):
                g.outputs.append(_value_info(f"{kind}_{i}", kv_shape))
        out = g.op("Add", [x, pending])[0] if pending is not None else x
        g.output(g.op("Reshape", [out, g.const(np.array([1, -1, c.d_model], np.int64), "shape")])[0], "h_out",
                 FLOAT, [1, "t", c.d_model])
        if self.head:
            last = g.op("Slice", [out, g.const(np.array([-1], np.int64)), g.const(np.array([2**31], np.int64)),
                                  g.const(np.array([0], np.int64))])[0]
            _, normed = self._norm(g, last, None, self.t.norm)
            head = self.t.lm_head
            g.output(g.linear(normed, head.packed, accuracy=head.accuracy), "logits", FLOAT, [1, c.vocab_size])
        return g.session(threads, spin)

    def _norm(self, g: GraphBuilder, x: str, pending: str | None, norm) -> tuple[str, str]:
        """-> (residual stream, RMSNorm of it); folds the pending block output into the residual."""
        gamma = g.const(norm.weight.detach().numpy(), "gamma")
        if pending is None:
            return x, g.op("SimplifiedLayerNormalization", [x, gamma], epsilon=norm.eps, axis=-1)[0]
        y, _, _, s = g.op("SkipSimplifiedLayerNormalization", [pending, x, gamma], n_out=4, domain=MS,
                          epsilon=norm.eps)
        return s, y

    def _attention(self, g: GraphBuilder, xn: str, a: Attention, past: list[str], seqlens, total, cos, sin) -> str:
        c = self.t.config
        qkv = g.linear(xn, concat([a.q_proj.packed, a.k_proj.packed, a.v_proj.packed]),
                       accuracy=a.q_proj.accuracy)
        biases = [p.bias for p in (a.q_proj, a.k_proj, a.v_proj)]
        if any(b is not None for b in biases):
            bias = torch.cat([b if b is not None else torch.zeros(p.out_features)
                              for b, p in zip(biases, (a.q_proj, a.k_proj, a.v_proj))])
            qkv = g.op("Add", [qkv, g.const(bias.numpy(), "bias")])[0]
        i = past[0].split("_")[-1]
        qkv = g.op("Reshape", [qkv, g.const(np.array([1, -1, a.q_proj.out_features + 2 * a.k_proj.out_features],
                                                     np.int64), "shape")])[0]
        out = g.name("attn")
        g.nodes.append(_gqa_node(qkv, past, seqlens, total, cos, sin, [out, f"present_k_{i}", f"present_v_{i}"],
                                 c.n_heads, c.n_kv_heads, c.head_dim, c.rope_style != "neox"))
        out = g.op("Reshape", [out, g.const(np.array([-1, a.o_proj.in_features], np.int64), "shape")])[0]
        return g.linear(out, a.o_proj.packed, accuracy=a.o_proj.accuracy)

    def _mlp(self, g: GraphBuilder, xn: str, m: MLP) -> str:
        gu = g.linear(xn, concat([m.gate_proj.packed, m.up_proj.packed]), accuracy=m.gate_proj.accuracy)
        gate, up = g.op("Split", [gu, g.const(np.array([m.gate_proj.out_features] * 2, np.int64))], n_out=2, axis=-1)
        if m.act is torch.nn.functional.silu:
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]
        else:
            act = g.op("Relu", [gate])[0]
        return g.linear(g.op("Mul", [act, up])[0], m.down_proj.packed, accuracy=m.down_proj.accuracy)

    # ------------------------------------------------------------ running

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, cache: SpanCache) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h [1, T, D] after the cached positions -> [1, T, D] (and logits [vocab] of the last position if
        built with head=True); appends T positions to `cache`."""
        t = h.shape[1]
        pos = cache[self.start].offset
        layers = [cache[i] for i in range(self.start, self.end)]
        for kv in layers:
            kv.reserve(pos + t)
        binding = self._binding(cache, layers)
        h = h.contiguous()
        out = torch.empty_like(h)
        bind_tensor(binding, "h", h)
        bind_tensor(binding, "h_out", out, output=True)
        self._lens[0], self._lens[1] = pos + t - 1, pos + t
        self.session.run_with_iobinding(binding)
        for kv in layers:
            kv.offset = pos + t
        return (out, self._logits[0]) if self.head else out

    def _binding(self, cache: SpanCache, layers) -> "object":
        ptrs = tuple(kv.k.data_ptr() for kv in layers) + tuple(kv.v.data_ptr() for kv in layers)
        if self._bound is not None and self._bound[1] is cache and self._bound[2] == ptrs:
            return self._bound[0]
        binding = self.session.io_binding()
        bind_tensor(binding, "lens", self._lens)
        if self.head:
            self._logits = torch.empty(1, self.t.config.vocab_size)
            bind_tensor(binding, "logits", self._logits, output=True)
        for i, kv in zip(range(self.start, self.end), layers):
            k, v = kv.k[None], kv.v[None]  # [1, Hkv, cap, hd]: the buffer is both past and present
            bind_tensor(binding, f"past_k_{i}", k)
            bind_tensor(binding, f"past_v_{i}", v)
            bind_tensor(binding, f"present_k_{i}", k, output=True)
            bind_tensor(binding, f"present_v_{i}", v, output=True)
        self._bound = (binding, cache, ptrs)
        return binding


def _value_info(name: str, shape):
    from onnx import helper

    return helper.make_tensor_value_info(name, FLOAT, shape)


def _gqa_node(qkv, past, seqlens, total, cos, sin, outputs, n_heads, n_kv, head_dim, interleaved):
    from onnx import helper

    return helper.make_node(
        "GroupQueryAttention", [qkv, "", "", past[0], past[1], seqlens, total, cos, sin], outputs, domain=MS,
        num_heads=n_heads, kv_num_heads=n_kv, scale=float(head_dim) ** -0.5, do_rotary=1,
        rotary_interleaved=int(interleaved))


class FusedRunner:
    """The fast path of `LocalRunner`: token ids -> logits through one fused graph of the whole model.

    Holds no cache of its own: it reads and writes the runner's `SpanCache`, so a runner can switch
    between this path and the module path at any token.
    """

    def __init__(self, t: Transformer, threads: int, spin: bool = True, native: bool = True):
        self.t, self.threads, self.spin = t, threads, spin
        self._span: FusedSpan | None = None
        self._native, self._native_tried = None, not native  # single-token steps: kernels/native.py

    def usable(self) -> bool:
        if self._native is None:
            return self._span.usable() if self._span is not None else supported(self.t, 0, self.t.config.n_layers)
        # one walk of the modules for both parts (checked every token); a native decoder implies the stock head,
        # so a span built beside it holds the same head=True snapshot
        current = _stock_modules(self.t, 0, self.t.config.n_layers, head=True)
        return current == self._native.modules and (self._span is None or current == self._span.modules)

    def native(self):
        """The compiled decode step for this model, or None (not built here, or not the stock int4 layout)."""
        if not self._native_tried:
            from . import native

            self._native_tried = True
            module = native.load() if native.supported(self.t) else None
            if module is not None:
                self._native = native.NativeDecoder(self.t, self.threads, module)
        return self._native

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> torch.Tensor:
        """Logits [len(ids) or 1, vocab] (a fresh tensor); appends len(ids) positions to cache."""
        t = self.t
        if len(ids) == 1 and not all_logits and self.native() is not None:
            return self._native.step(ids[0], cache)[None]
        if self._span is None:  # built on first use: ~2 s, and no memory for it unless this path runs
            head = supported(t, 0, t.config.n_layers, head=True)
            self._span = FusedSpan(t, 0, t.config.n_layers, self.threads, head=head, spin=self.spin)
        out = self._span.forward(t.embed(torch.tensor([ids])), cache)
        h, logits = out if self._span.head else (out, None)
        if all_logits:
            return t.head(h)[0]
        if logits is None:
            return t.head(h[:, -1:])[0]
        return logits[None].clone()
