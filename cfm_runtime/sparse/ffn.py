"""Drop-in FFN modules for `layers[i].mlp`: sparse selection over weights held in RAM or on flash.

Everything is indexed by pack position (the pack's neuron order); predictor outputs are permuted
into that order when loaded. Prefill (T > 1) is dense, since the union of many tokens' neurons is
nearly all of them; decode (T == 1) computes only the selected neurons. With `measure=True` a
sparse strategy is applied per token at any T (quality evaluation over whole texts).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .io import BundleFile, NeuronCache, plan_runs

STRATEGIES = ("dense", "oracle", "predictor")


def ffn_rows(x: torch.Tensor, w: torch.Tensor, act, keep=None) -> torch.Tensor:
    """x [.., D], bundles w [3, k, D] (fp32, each part contiguous) -> [.., D]; `keep` [.., k] masks neurons."""
    h = act(F.linear(x, w[0])) * F.linear(x, w[1])
    if keep is not None:
        h = h * keep
    return h @ w[2]


def parts(bundles: torch.Tensor) -> torch.Tensor:
    """Bundles [k, 3, D] (any dtype) -> fp32 [3, k, D]: gate rows, up rows, down columns, each contiguous."""
    return bundles.transpose(0, 1).float().contiguous()


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1, sorted=False).indices


class RamStore:
    """All of a layer's bundles in RAM, fp32 [3, F, D] in pack order (`--sparse` without a RAM budget)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def full(self) -> torch.Tensor:
        return self.rows

    def gather(self, positions: np.ndarray) -> torch.Tensor:
        return self.rows[:, torch.from_numpy(positions)]

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes


class FlashStore:
    """Hot bundles [H, 3, D] fp16 in RAM (pack positions 0..H-1); the rest read from the pack on demand."""

    def __init__(self, layer: int, hot: torch.Tensor, n: int, file: BundleFile, shared, cache: NeuronCache | None,
                 max_gap: int):
        self.layer, self.hot, self.n, self.file, self.shared = layer, hot, n, file, shared
        self.cache, self.max_gap = cache, max_gap
        self.n_hot = hot.shape[0]

    @property
    def nbytes(self) -> int:
        return self.hot.numpy().nbytes + (self.cache.nbytes if self.cache is not None else 0)

    def read_cold(self, out: np.ndarray) -> None:
        """All cold bundles into out [n - H, 3, D] (one sequential region, read in parallel chunks)."""
        self.file.read_block(self.layer, self.n_hot, out[: self.n - self.n_hot])

    def full(self) -> torch.Tensor:
        cold = self.shared.staged(self)
        return parts(torch.cat((self.hot, torch.from_numpy(cold[: self.n - self.n_hot]))))

    def fetch(self, positions: np.ndarray, step: int, stats) -> tuple[np.ndarray, np.ndarray]:
        """Make cold positions resident: -> (cache slots, -1 where a scratch row holds it; scratch rows)."""
        slots = self.cache.lookup(positions, step)
        miss = positions[slots < 0]
        stats.hits += len(positions) - len(miss)
        stats.misses += len(miss)
        scratch = np.empty((0, *self.cache.rows.shape[1:]), dtype=np.float16)
        if len(miss):
            new = self.cache.assign(miss, step)
            slots[slots < 0] = new
            overflow = miss[new < 0]
            scratch = np.empty((len(overflow), *self.cache.rows.shape[1:]), dtype=np.float16)
            where = {int(p): memoryview(self.cache.rows[s]).cast("B") for p, s in zip(miss, new) if s >= 0}
            where.update({int(p): memoryview(scratch[j]).cast("B") for j, p in enumerate(overflow)})
            junk = memoryview(self.shared.junk).cast("B")
            # the pack addresses bundles from the layer's start; cache keys count from the first cold neuron
            self.file.read_scattered(self.layer, plan_runs(miss + self.n_hot, self.max_gap),
                                     lambda p: where.get(p - self.n_hot, junk))
        return slots, scratch

    def gather(self, positions: np.ndarray, step: int, stats) -> torch.Tensor:
        hot = positions[positions < self.n_hot]
        cold = positions[positions >= self.n_hot] - self.n_hot
        slots, scratch = self.fetch(cold, step, stats)
        rows = [self.hot[torch.from_numpy(hot)],
                 torch.from_numpy(self.cache.rows[slots[slots >= 0]]), torch.from_numpy(scratch)]
        return parts(torch.cat(rows))

    def prefetch(self, positions: np.ndarray, step: int, stats) -> None:
        """Read predicted cold neurons into free cache rows only (a guess never goes to scratch)."""
        cold = np.sort(positions[positions >= self.n_hot] - self.n_hot)
        cold = cold[self.cache.slot_of[cold] < 0][: int((self.cache.last < step).sum())]
        if len(cold):
            self.fetch(cold, step, LayerStats())


class LayerStats:
    def __init__(self):
        self.steps = self.computed = self.hits = self.misses = 0


class SparseFFN(nn.Module):
    """forward(x [B, T, D]) -> [B, T, D] over a store; selection by `strategy` at `density` on decode."""

    def __init__(self, layer: int, store, act, n: int, density: float = 1.0, strategy: str = "dense",
                 predictor: nn.Module | None = None, shared=None):
        super().__init__()
        self.layer, self.store, self.act, self.n = layer, store, act, n
        self.density, self.strategy, self.predictor = density, strategy, predictor
        self.shared = shared  # the runtime: step counter, staging buffers, next layer's prefetch
        self.measure = False
        self.stats = LayerStats()

    @property
    def k(self) -> int:
        return max(1, min(self.n, int(round(self.density * self.n))))

    def sparse_now(self, t: int) -> bool:
        return self.strategy != "dense" and self.k < self.n and (t == 1 or self.measure)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is not None:
            self.shared.before(self, x, sparse=self.sparse_now(x.shape[1]))
        if not self.sparse_now(x.shape[1]):
            if x.shape[1] == 1:
                self.stats.steps += x.shape[0]
                self.stats.computed += self.n * x.shape[0]
            return ffn_rows(x, self.store.full(), self.act)
        if self.strategy == "oracle" or self.measure:
            return self._masked(x)
        return self._selected(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(x)

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token top-k of the true (oracle) or predicted activations, computed densely then masked."""
        w = self.store.full()
        if self.strategy == "oracle":
            s = (self.act(F.linear(x, w[0])) * F.linear(x, w[1])).abs()
        else:
            s = self.scores(x)
        keep = torch.zeros_like(s).scatter_(-1, topk_positions(s, self.k), 1.0)
        self.stats.steps += x.shape[0] * x.shape[1]
        self.stats.computed += self.k * x.shape[0] * x.shape[1]
        return ffn_rows(x, w, self.act, keep)

    def _selected(self, x: torch.Tensor) -> torch.Tensor:
        """Decode: gather only the predicted neurons (batch rows share the union of their selections)."""
        idx = topk_positions(self.scores(x), self.k).reshape(-1).unique().numpy()
        step = self.shared.step if self.shared is not None else 0
        if isinstance(self.store, RamStore):
            w = self.store.gather(idx)
        else:
            w = self.store.gather(idx, step, self.stats)
        self.stats.steps += x.shape[0]
        self.stats.computed += len(idx) * x.shape[0]
        return ffn_rows(x, w, self.act)
