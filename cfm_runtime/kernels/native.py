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

import hashlib
import os
import threading
import warnings
from pathlib import Path

import torch

from .graph import ACCURACY_LEVEL
from .packing import concat
from .weights import DecoderWeights

SOURCE = Path(__file__).with_name("q4_decode.cpp")
# the build is cached under this name: a digest of the source keeps builds of other versions apart
NAME = "cfm_q4_decode_" + hashlib.blake2b(SOURCE.read_bytes(), digest_size=4).hexdigest()
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

            src = SOURCE
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


SIDE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")  # the kernel's order of a layer's linears


class NativeDecoder:
    """Decode steps (one position per sequence, any batch) of a span of the int4 decoder `w` (every layer and the
    head are loaded; a call picks the span) through the compiled kernel, with optional low-rank side terms."""

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
        self._sides: set[tuple[int, str]] = set()

    def set_sides(self, sides: dict) -> None:
        """Low-rank side terms {(layer, kind): (A [r, in], B [out, r])} replacing the previous ones."""
        empty = torch.empty(0)
        for layer, kind in self._sides - set(sides):
            self.decoder.set_side(layer, SIDE_KINDS.index(kind), empty, empty)
        for (layer, kind), (a, b) in sides.items():
            self.decoder.set_side(layer, SIDE_KINDS.index(kind), a, b)
        self._sides = set(sides)

    @torch.inference_mode()
    def step(self, x: torch.Tensor, caches: list, first: int, last: int, head: bool = False) -> torch.Tensor:
        """One position per sequence: x [B, d] entering layer `first`; caches[i]: sequence i's per-layer KV caches
        (`model.KVCache`) of layers [first, last), each at its next position. -> [B, d] leaving layer last - 1, or
        with `head` the logits [B, vocab]; appends the position to every cache."""
        pos = [c[0].offset for c in caches] if last > first else [0] * x.shape[0]
        for seq, p in zip(caches, pos):
            for kv in seq:
                kv.reserve(p + 1)
        out = self._run(x, pos, [seq for seq in caches], first, last, x.shape[0] if head else 0)
        for seq, p in zip(caches, pos):
            for kv in seq:
                kv.offset = p + 1
        return out

    @torch.inference_mode()
    def chunk(self, x: torch.Tensor, layers: list, first: int, last: int, head: int = 0) -> torch.Tensor:
        """T positions of one sequence: x [T, d] after the cached ones; `layers`: its KV caches of [first, last).
        Computed exactly as T single steps would be. -> [T, d], or with head = n > 0 the logits [n, vocab] of
        the last n positions; appends the T positions to the caches."""
        t = x.shape[0]
        start = layers[0].offset if layers else 0
        for kv in layers:
            kv.reserve(start + t)
        out = self._run(x, list(range(start, start + t)), [layers] * t, first, last, head)
        for kv in layers:
            kv.offset = start + t
        return out

    def _run(self, x: torch.Tensor, pos: list[int], caches: list, first: int, last: int, head: int) -> torch.Tensor:
        return self.decoder.forward(x.float().contiguous(), pos, first, last, [[kv.k for kv in seq] for seq in caches],
                                    [[kv.v for kv in seq] for seq in caches], head)
