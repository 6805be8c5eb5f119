"""The lean execution backend: the native kernel alone over the model file's blocks, with no torch at all.

A GGUF model with Q4_1 linears runs here by default (`cfm_runtime.runtime.load_model`): its weights are the
file's mapped pages (reclaimable, like llama.cpp's), or within a RAM budget anonymous copies of some and the rest
read from the file at each use (`kernels.stream`); its KV caches are numpy arrays, and nothing is dequantized.
The kernel's sparse FFN runs here too (`kernels.native.SparseFFN`). Features that need the torch modules (bricks,
fp32, the neuron pack's sparse FFN) make the model load its torch form.
"""

from __future__ import annotations

import numpy as np

from .cache import SpanCache
from .kernels.native import NativeDecoder


def native_span(decoder: NativeDecoder, h: np.ndarray, start: int, end: int, caches: list[SpanCache]) -> np.ndarray:
    """Layers [start, end) on h [B, T, D]: one position per sequence in one call (a batch of sequences), else
    each sequence's T positions in one call."""
    if h.shape[1] == 1:
        return decoder.step(h[:, 0], [[c[i] for i in range(start, end)] for c in caches], start, end)[:, None]
    return np.stack([decoder.chunk(h[j], [c[i] for i in range(start, end)], start, end)
                     for j, c in enumerate(caches)])


def native_span_head(decoder: NativeDecoder, h: np.ndarray, start: int, n_layers: int, cache: SpanCache,
                     all_logits: bool) -> np.ndarray:
    """Layers [start, n), final norm and head on one sequence h [1, T, D] -> logits [T or 1, vocab]."""
    layers = [cache[i] for i in range(start, n_layers)]
    return decoder.chunk(h[0], layers, start, n_layers, head=h.shape[1] if all_logits else 1)


class NativeBackend:
    """Every position through the native kernel; numpy in and out (see `cfm_runtime.backends` for the others)."""

    name = "native"

    def __init__(self, decoder: NativeDecoder, n_layers: int):
        self.decoder, self.n_layers = decoder, n_layers

    def embed(self, ids: list[int]) -> np.ndarray:
        """Token embeddings [1, T, D] from the Q8_0 embedding rows."""
        return self.decoder.embed(ids)[None]

    def forward(self, ids: list[int], cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        """Logits [len(ids) or 1, vocab] of ids after the cached positions; appends them to `cache`."""
        return self.span_head(self.embed(ids), 0, cache, all_logits)

    def span(self, h: np.ndarray, start: int, end: int, caches: list[SpanCache]) -> np.ndarray:
        return h if start == end else native_span(self.decoder, h, start, end, caches)

    def span_head(self, h: np.ndarray, start: int, cache: SpanCache, all_logits: bool = False) -> np.ndarray:
        return native_span_head(self.decoder, h, start, self.n_layers, cache, all_logits)

    def torch_threads(self) -> int | None:
        return None  # no torch here

    @property
    def position_cost(self) -> float:
        """Extra time of one more position in a forward, relative to one position (`native.POSITION_COST`)."""
        return self.decoder.position_cost

    def report(self) -> dict:
        return {"backend": self.name, "decode_path": "native", "kernel": self.decoder.path} | self.decoder.report()
