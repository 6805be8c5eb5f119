"""The native decode step: one token through a whole int4 decoder in one C++ call (`q4_decode.cpp`).

The onnxruntime graph (`fused.py`) cannot read Q4_1 blocks in one op: `MatMulNBits` has only integer
zero points, so each linear needs a separate offset term (block sums and a Gemm), ~3 ms of a ~16 ms step
on the embedded model. This kernel reads the same packed weights (`packing`, scheme "mid": 4-bit codes,
fp32 scale and offset per block of 32) with the offset inside the row loop, as llama.cpp's Q4_1 x Q8 dot
product does, with int8 activations per block (AVX2 integer dot products) and OpenMP threads over rows.

It is compiled on first use with torch's C++ extension loader (g++, -O3 -march=native; ~1 minute, cached
under ~/.cache/torch_extensions). Where that fails (no compiler, no AVX2/FMA) `load()` returns None
and decoding stays on the onnxruntime graph; `CFM_NATIVE=0` turns it off. Used for single-token steps
(`cfm_runtime.backends` decides when); prompts go through the graph. Both write the same rotated keys
and values into the same caches.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import torch

from .graph import ACCURACY_LEVEL
from .packing import concat
from .weights import DecoderWeights

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


def supported(w: DecoderWeights) -> bool:
    """Whether the kernel implements this decoder: every layer "mid"-packed 4-bit projections without biases,
    an 8-bit symmetric head, int8 activations (accuracy level 4; a model built with fp32 activations keeps the
    graph), SiLU, adjacent-pair rotary."""
    if w.activation != "silu" or not w.interleaved_rope or w.head is None or w.final_norm is None:
        return False
    if w.head.bits != 8 or w.head.zero_points is not None or w.head.mins is not None or w.head_accuracy != ACCURACY_LEVEL:
        return False
    for layer in w.layers.values():
        if layer.qkv_bias is not None or layer.accuracy != ACCURACY_LEVEL:
            return False
        for q in (layer.q, layer.k, layer.v, layer.o, layer.gate, layer.up, layer.down):
            if q.bits != 4 or q.zero_points is not None or q.mins is None:
                return False
    return len(w.layers) > 0


class NativeDecoder:
    """Single-token decode steps of the whole decoder `w` (every layer and the head) through the compiled kernel."""

    def __init__(self, w: DecoderWeights, threads: int, module):
        layers = []
        for i in range(len(w.layers)):
            layer = w.layers[i]
            parts = [layer.ln1.detach(), layer.ln2.detach()]
            for p in (concat([layer.q, layer.k, layer.v]), layer.o, concat([layer.gate, layer.up]), layer.down):
                parts += [torch.from_numpy(p.codes), torch.from_numpy(p.scales),
                          torch.from_numpy(p.mins.T.copy())]  # offsets row-major [n, k/32]
            layers.append(parts)
        self.n_layers = len(layers)
        self.decoder = module.Q4Decoder(layers, w.final_norm.detach(), torch.from_numpy(w.head.codes),
                                        torch.from_numpy(w.head.scales), w.cos.contiguous(), w.sin.contiguous(),
                                        w.n_heads, w.n_kv_heads, w.head_dim, float(w.eps), threads)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, caches) -> torch.Tensor:
        """Logits [vocab] of the token whose embedding is x [d] at the caches' next position; `caches` are the
        per-layer KV caches (`model.KVCache`) of every layer; appends the position to them."""
        pos = caches[0].offset
        for kv in caches:
            kv.reserve(pos + 1)
        logits = self.decoder.step(x.float(), pos, [kv.k for kv in caches], [kv.v for kv in caches])
        for kv in caches:
            kv.offset = pos + 1
        return logits
