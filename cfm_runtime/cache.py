"""KV caches: one layer's keys and values for one sequence, and a sequence's caches for a span of layers.

Plain numpy (float32, contiguous [Hkv, capacity, hd]), so the native kernel writes them in place by address
and a process without torch can hold them; the torch modules read them as zero-copy tensor views.
"""

from __future__ import annotations

import numpy as np

from .config import ModelConfig


class KVCache:
    """One layer's keys and values for one sequence: [Hkv, capacity, hd], grown in steps of 256 positions."""

    step = 256

    def __init__(self, n_kv_heads: int, head_dim: int, max_len: int):
        self.max_len = max_len
        self.offset = 0
        self.k = np.empty((n_kv_heads, 0, head_dim), dtype=np.float32)
        self.v = np.empty((n_kv_heads, 0, head_dim), dtype=np.float32)

    def reserve(self, end: int) -> None:
        """Make room for positions [0, end) (a kernel writes in place): grows to a multiple of `step`."""
        assert end <= self.max_len, "caller must check the context length"
        if end > self.k.shape[1]:
            cap = min(self.max_len, -(-end // self.step) * self.step)
            for name in ("k", "v"):
                old = getattr(self, name)
                grown = np.zeros((old.shape[0], cap, old.shape[2]), dtype=np.float32)
                grown[:, :self.offset] = old[:, :self.offset]
                setattr(self, name, grown)

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Keys and values [Hkv, t, hd] of the next t positions."""
        end = self.offset + k.shape[1]
        self.reserve(end)
        self.k[:, self.offset:end] = k
        self.v[:, self.offset:end] = v
        self.offset = end

    def truncate(self, n: int) -> None:
        self.offset = min(self.offset, n)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    @property
    def k_ptr(self) -> int:
        """Address of the keys [Hkv, capacity, hd] (contiguous float32), for the native kernel."""
        return self.k.ctypes.data

    @property
    def v_ptr(self) -> int:
        return self.v.ctypes.data


class SpanCache:
    """The KV caches of one sequence for layers [start, end)."""

    def __init__(self, config: ModelConfig, start: int, end: int, max_len: int | None = None):
        self.start, self.end = start, end
        self.max_len = max_len or config.context_length
        self.layers = [KVCache(config.n_kv_heads, config.head_dim, self.max_len) for _ in range(start, end)]

    def __getitem__(self, layer: int) -> KVCache:
        return self.layers[layer - self.start]

    @property
    def offset(self) -> int:
        return self.layers[0].offset if self.layers else 0

    def truncate(self, n: int) -> None:
        for c in self.layers:
            c.truncate(n)

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.layers)
