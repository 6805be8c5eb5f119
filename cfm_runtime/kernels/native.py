"""The native decode step: one token through the whole int4 model in one C++ call (`q4_decode.cpp`).

The onnxruntime graph (`fused.py`) cannot read Q4_1 blocks in one op: `MatMulNBits` has only integer
zero points, so each linear needs a separate offset term (block sums and a Gemm), ~3 ms of a ~16 ms step
on the embedded model. This kernel reads the same packed weights (`packing`, scheme "mid": 4-bit codes,
fp32 scale and offset per block of 32) with the offset inside the row loop, as llama.cpp's Q4_1 x Q8 dot
product does, with int8 activations per block (AVX2 integer dot products) and OpenMP threads over rows.

It is compiled on first use with torch's C++ extension loader (g++, -O3 -march=native; ~1 minute, cached
under ~/.cache/torch_extensions). Where that fails (no compiler, no AVX2/FMA) `load()` returns None
and decoding stays on the onnxruntime graph; `CFM_NATIVE=0` turns it off. Used only for single-token
steps on the stock int4 configuration; prompts go through the graph. Both write the same rotated keys
and values into the same `SpanCache`.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from ..model import SpanCache, Transformer

NAME = "cfm_q4_decode"
_lock = threading.Lock()
_module: object | None = None
_failure: str | None = None


def load(notice=None):
    """The compiled extension, or None (the reason is in `failure()`). `notice()` is called first when it
    has to be compiled (not in torch's extension cache yet), so a CLI can say why it waits."""
    global _module, _failure
    with _lock:
        if _module is not None or _failure is not None:
            return _module
        if os.environ.get("CFM_NATIVE", "1") == "0":
            _failure = "turned off by CFM_NATIVE=0"
            return None
        try:
            from torch.utils import cpp_extension

            src = Path(__file__).with_name("q4_decode.cpp")
            if notice is not None and not any(Path(cpp_extension.get_default_build_root()).glob(f"*/{NAME}/{NAME}*.so")):
                notice()
            mod = cpp_extension.load(name=NAME, sources=[str(src)], verbose=False,
                                     extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                     extra_ldflags=["-fopenmp"])
            if not mod.available():
                _failure = "this CPU has no AVX2/FMA (the native kernel's instructions)"
                return None
            _module = mod
        except Exception as e:  # no compiler, headers or ninja: the onnxruntime graph remains
            first_line = (str(e).splitlines() or [""])[0][:200]
            _failure = f"could not build the native kernel: {type(e).__name__}: {first_line}"
            warnings.warn(_failure + "; decoding on the onnxruntime graph", stacklevel=2)
        return _module


def failure() -> str | None:
    return _failure


def supported(t: Transformer) -> bool:
    """The stock int4 configuration: "mid"-packed 4-bit projections without biases, an 8-bit symmetric
    head, int8 activations (accuracy level 4; a model built with fp32 activations keeps the graph), SiLU,
    adjacent-pair rotary (what the kernel implements)."""
    from ..quant import QuantizedHead
    from .fused import projections, supported as graph_supported
    from .graph import ACCURACY_LEVEL

    c = t.config
    if not graph_supported(t, 0, c.n_layers, head=True) or c.rope_style == "neox" or c.activation != "silu":
        return False
    head = t.lm_head.packed
    if (type(t.lm_head) is not QuantizedHead or head.bits != 8 or head.zero_points is not None
            or head.mins is not None or t.lm_head.accuracy != ACCURACY_LEVEL):
        return False
    for layer in t.layers:
        for p in projections(layer):
            q = p.packed
            if p.bias is not None or q.bits != 4 or q.zero_points is not None or q.mins is None or p.accuracy != ACCURACY_LEVEL:
                return False
    return True


class NativeDecoder:
    """Single-token decode steps of `t` through the compiled kernel (see the module docstring)."""

    def __init__(self, t: Transformer, threads: int, module):
        from .fused import _stock_modules
        from .packing import concat

        c = t.config
        layers = []
        for layer in t.layers:
            a, m = layer.self_attn, layer.mlp
            parts = [layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach()]
            for p in (concat([a.q_proj.packed, a.k_proj.packed, a.v_proj.packed]), a.o_proj.packed,
                      concat([m.gate_proj.packed, m.up_proj.packed]), m.down_proj.packed):
                parts += [torch.from_numpy(p.codes), torch.from_numpy(p.scales),
                          torch.from_numpy(p.mins.T.copy())]  # offsets row-major [n, k/32]
            layers.append(parts)
        t.rotary.apply(torch.zeros(1, 1, c.head_dim), c.context_length - 1)  # grow the tables to the context
        head = t.lm_head.packed
        self.t = t
        self.modules = _stock_modules(t, 0, c.n_layers, head=True)  # checked by FusedRunner.usable
        self.decoder = module.Q4Decoder(layers, t.norm.weight.detach(), torch.from_numpy(head.codes),
                                        torch.from_numpy(head.scales), t.rotary.cos[:c.context_length].contiguous(),
                                        t.rotary.sin[:c.context_length].contiguous(), c.n_heads, c.n_kv_heads,
                                        c.head_dim, float(t.norm.eps), threads)

    @torch.inference_mode()
    def step(self, token: int, cache: SpanCache) -> torch.Tensor:
        """Logits [vocab] of `token` at the cache's next position; appends it to the cache."""
        layers = [cache[i] for i in range(self.t.config.n_layers)]
        pos = layers[0].offset
        for kv in layers:
            kv.reserve(pos + 1)
        x = self.t.embed(torch.tensor([[token]]))[0, 0].float()
        logits = self.decoder.step(x, pos, [kv.k for kv in layers], [kv.v for kv in layers])
        for kv in layers:
            kv.offset = pos + 1
        return logits
