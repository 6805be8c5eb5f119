"""A span of decoder layers as one onnxruntime graph: the prompt path (and fallback decode path) of int4/int8.

Per layer: SkipSimplifiedLayerNormalization (residual add + RMSNorm), one MatMulNBits for q|k|v,
GroupQueryAttention (rotary inside, KV written in place into the caller's key/value tensors, which are
bound by pointer as both past and present: no copy, no reallocation per token), MatMulNBits for o,
gate|up and down, each with its offset term as one Gemm (`GraphBuilder.linear`). Hidden states are
2-D [tokens, d] inside the graph (Gemm is 2-D only) and 3-D only around GroupQueryAttention. One
`session.run` per call instead of ~25 torch ops per layer.

Built from `DecoderWeights` (packed blocks and norms), it knows nothing of modules: the backend that
builds it (`cfm_runtime.backends`) decides when the weights it holds still describe the model. It
writes the same rotated keys and values as the torch modules, so a cache can switch paths at any token.

With `sides=True` every linear of the span also takes a low-rank side term y += (x A^T) B^T whose A^T
[in, r] and B^T [r, out] are graph inputs bound at each call (rank 0 where a linear has none): LoRA
bricks run unfused, and switching them is a rebinding, not a rebuild.
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import helper

from .graph import FLOAT, INT32, MS, GraphBuilder, bind_tensor
from .packing import concat
from .weights import DecoderWeights, LayerWeights

SIDE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")


class FusedSpan:
    """Layers [start, end) as one graph; `forward(h, caches)` runs one sequence (B = 1).

    With head=True the graph also applies the final norm and the quantized LM head to the last
    position (output "logits" [1, vocab]), so a decode step is a single session run.
    """

    def __init__(self, w: DecoderWeights, start: int, end: int, threads: int, head: bool = False, spin: bool = False,
                 sides: bool = False):
        self.w, self.start, self.end, self.head, self.sides = w, start, end, head, sides
        self.session = self._build(threads, spin)
        self._bound: tuple | None = None  # (binding, key: the caches' pointers and capacities, the sides) of the last call
        self._zeros: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._lens = torch.zeros(2, dtype=torch.int32)  # seqlens_k (= total - 1), total_sequence_length

    # ------------------------------------------------------------ graph

    def _build(self, threads: int, spin: bool):
        w, g = self.w, GraphBuilder()
        h = g.input("h", FLOAT, [1, "t", w.d_model])
        lens = g.input("lens", INT32, [2])
        seqlens = g.op("Slice", [lens, g.const(np.array([0], np.int64)), g.const(np.array([1], np.int64))])[0]
        total = g.op("Slice", [lens, g.const(np.array([1], np.int64)), g.const(np.array([2], np.int64))])[0]
        total = g.op("Squeeze", [total])[0]
        cos = g.const(w.cos.numpy(), "cos")
        sin = g.const(w.sin.numpy(), "sin")
        kv_shape = [1, w.n_kv_heads, "cap", w.head_dim]
        # 2-D [t, d] inside (Gemm takes the offset terms' adds; see GraphBuilder.linear); 3-D only around GQA
        x, pending = g.op("Reshape", [h, g.const(np.array([-1, w.d_model], np.int64), "shape")])[0], None
        for i in range(self.start, self.end):
            layer = w.layers[i]
            x, xn = self._norm(g, x, pending, layer.ln1)
            names = [g.input(f"{kind}_{i}", FLOAT, kv_shape) for kind in ("past_k", "past_v")]
            attn = self._attention(g, xn, i, layer, names, seqlens, total, cos, sin)
            x, xn = self._norm(g, x, attn, layer.ln2)
            pending = self._mlp(g, xn, i, layer)
            for kind in ("present_k", "present_v"):
                g.outputs.append(helper.make_tensor_value_info(f"{kind}_{i}", FLOAT, kv_shape))
        out = g.op("Add", [x, pending])[0] if pending is not None else x
        g.output(g.op("Reshape", [out, g.const(np.array([1, -1, w.d_model], np.int64), "shape")])[0], "h_out",
                 FLOAT, [1, "t", w.d_model])
        if self.head:
            last = g.op("Slice", [out, g.const(np.array([-1], np.int64)), g.const(np.array([2**31], np.int64)),
                                  g.const(np.array([0], np.int64))])[0]
            _, normed = self._norm(g, last, None, w.final_norm)
            g.output(g.linear(normed, w.head, accuracy=w.head_accuracy), "logits", FLOAT, [1, w.vocab_size])
        return g.session(threads, spin)

    def _norm(self, g: GraphBuilder, x: str, pending: str | None, gain: torch.Tensor) -> tuple[str, str]:
        """-> (residual stream, RMSNorm of it); folds the pending block output into the residual."""
        gamma = g.const(gain.detach().numpy(), "gamma")
        if pending is None:
            return x, g.op("SimplifiedLayerNormalization", [x, gamma], epsilon=self.w.eps, axis=-1)[0]
        y, _, _, s = g.op("SkipSimplifiedLayerNormalization", [pending, x, gamma], n_out=4, domain=MS,
                          epsilon=self.w.eps)
        return s, y

    def _attention(self, g: GraphBuilder, xn: str, i: int, layer: LayerWeights, past: list[str], seqlens, total,
                   cos, sin) -> str:
        w = self.w
        qkv = g.linear(xn, concat([layer.q, layer.k, layer.v]), accuracy=layer.accuracy)
        if self.sides:
            parts = [self._side(g, xn, i, kind, p) for kind, p in (("q", layer.q), ("k", layer.k), ("v", layer.v))]
            qkv = g.op("Add", [qkv, g.op("Concat", parts, axis=1)[0]])[0]
        if layer.qkv_bias is not None:
            qkv = g.op("Add", [qkv, g.const(layer.qkv_bias.numpy(), "bias")])[0]
        qkv = g.op("Reshape", [qkv, g.const(np.array([1, -1, layer.q.n + 2 * layer.k.n], np.int64), "shape")])[0]
        out = g.name("attn")
        g.nodes.append(helper.make_node(
            "GroupQueryAttention", [qkv, "", "", past[0], past[1], seqlens, total, cos, sin],
            [out, f"present_k_{i}", f"present_v_{i}"], domain=MS, num_heads=w.n_heads, kv_num_heads=w.n_kv_heads,
            scale=float(w.head_dim) ** -0.5, do_rotary=1, rotary_interleaved=int(w.interleaved_rope)))
        out = g.op("Reshape", [out, g.const(np.array([-1, layer.o.k], np.int64), "shape")])[0]
        return self._with_side(g, out, g.linear(out, layer.o, accuracy=layer.accuracy), i, "o", layer.o)

    def _side(self, g: GraphBuilder, x: str, i, kind: str, p) -> str:
        """(x A^T) B^T of linear `kind` of layer i: [t, in] -> [t, out]; A^T, B^T are inputs (rank "r_...")."""
        at = g.input(f"side_a_{i}_{kind}", FLOAT, [p.k, f"r_{i}_{kind}"])
        bt = g.input(f"side_b_{i}_{kind}", FLOAT, [f"r_{i}_{kind}", p.n])
        return g.op("MatMul", [g.op("MatMul", [x, at])[0], bt])[0]

    def _with_side(self, g: GraphBuilder, x: str, y: str, i, kind: str, p) -> str:
        return g.op("Add", [y, self._side(g, x, i, kind, p)])[0] if self.sides else y

    def _mlp(self, g: GraphBuilder, xn: str, i: int, layer: LayerWeights) -> str:
        gu = g.linear(xn, concat([layer.gate, layer.up]), accuracy=layer.accuracy)
        if self.sides:
            parts = [self._side(g, xn, i, "gate", layer.gate), self._side(g, xn, i, "up", layer.up)]
            gu = g.op("Add", [gu, g.op("Concat", parts, axis=1)[0]])[0]
        gate, up = g.op("Split", [gu, g.const(np.array([layer.gate.n] * 2, np.int64))], n_out=2, axis=-1)
        if self.w.activation == "silu":
            act = g.op("Mul", [gate, g.op("Sigmoid", [gate])[0]])[0]
        else:
            act = g.op("Relu", [gate])[0]
        h = g.op("Mul", [act, up])[0]
        return self._with_side(g, h, g.linear(h, layer.down, accuracy=layer.accuracy), i, "down", layer.down)

    # ------------------------------------------------------------ running

    @torch.inference_mode()
    def forward(self, h: torch.Tensor, caches, sides: dict | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """h [1, T, D] after the cached positions -> [1, T, D] (and logits [vocab] of the last position if
        built with head=True); `caches` are the span's per-layer KV caches (`cache.KVCache`: `k`, `v`
        [Hkv, capacity, hd], `offset`, `reserve`); appends T positions to them. `sides`: with a graph built
        with sides, {(layer, kind): (A^T [in, r], B^T [r, out])} (missing: rank 0)."""
        t = h.shape[1]
        pos = caches[0].offset
        for kv in caches:
            kv.reserve(pos + t)
        binding = self._binding(caches, sides or {})
        h = h.contiguous()
        out = torch.empty_like(h)
        bind_tensor(binding, "h", h)
        bind_tensor(binding, "h_out", out, output=True)
        self._lens[0], self._lens[1] = pos + t - 1, pos + t
        self.session.run_with_iobinding(binding)
        for kv in caches:
            kv.offset = pos + t
        return (out, self._logits[0]) if self.head else out

    def _binding(self, caches, sides: dict) -> "object":
        ptrs = tuple((kv.k_ptr, kv.v_ptr, kv.capacity) for kv in caches)
        key = (ptrs, id(sides))
        if self._bound is not None and self._bound[1] == key:
            return self._bound[0]
        binding = self.session.io_binding()
        bind_tensor(binding, "lens", self._lens)
        if self.head:
            self._logits = torch.empty(1, self.w.vocab_size)
            bind_tensor(binding, "logits", self._logits, output=True)
        for i, kv in zip(range(self.start, self.end), caches):
            k, v = torch.from_numpy(kv.k)[None], torch.from_numpy(kv.v)[None]  # [1, Hkv, cap, hd]: past and present
            bind_tensor(binding, f"past_k_{i}", k)
            bind_tensor(binding, f"past_v_{i}", v)
            bind_tensor(binding, f"present_k_{i}", k, output=True)
            bind_tensor(binding, f"present_v_{i}", v, output=True)
            if self.sides:
                self._bind_sides(binding, i, sides)
        self._bound = (binding, key, sides)  # the side tensors stay alive while bound
        return binding

    def _bind_sides(self, binding, i: int, sides: dict) -> None:
        layer = self.w.layers[i]
        for kind in SIDE_KINDS:
            p = getattr(layer, kind)
            at, bt = sides.get((i, kind), (None, None))
            if at is None:
                at, bt = self._zero_rank(p.k, p.n)
            bind_tensor(binding, f"side_a_{i}_{kind}", at)
            bind_tensor(binding, f"side_b_{i}_{kind}", bt)

    def _zero_rank(self, k: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (k, n)
        if key not in self._zeros:
            self._zeros[key] = (torch.empty(k, 0), torch.empty(0, n))
        return self._zeros[key]
