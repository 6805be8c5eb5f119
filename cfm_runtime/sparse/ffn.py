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

from .bundle import BundleCodec
from .io import BundleFile, NeuronCache, plan_runs


def ffn_rows(x: torch.Tensor, w: torch.Tensor, act, keep=None, sides=None, idx=None) -> torch.Tensor:
    """x [.., D], bundles w [3, k, D] (fp32, rows contiguous) -> [.., D]; `keep` [.., k] masks neurons.
    `sides`: low-rank terms of bricks on gate/up/down (`Sides`), applied to the k neurons at pack positions
    `idx` (None: all of them, in pack order)."""
    gate, up = F.linear(x, w[0]), F.linear(x, w[1])
    if sides is not None:
        gate, up = gate + sides.rows("gate", x, idx), up + sides.rows("up", x, idx)
    h = act(gate) * up
    if keep is not None:
        h = h * keep
    y = h @ w[2]
    return y if sides is None else y + sides.cols(h, idx)


class Sides:
    """Bricks on one layer's FFN linears as low-rank terms in pack order: for gate and up, y += (x A^T) B^T over
    the computed neurons' rows of B; for down, y += (h A^T) B^T over the computed neurons' columns of A."""

    def __init__(self, terms: dict[str, tuple[torch.Tensor, torch.Tensor]], order: torch.Tensor):
        # gate/up: B [F, r] rows to pack order; down: A [r, F] columns to pack order
        self.terms = {k: (a, b[order]) if k != "down" else (a[:, order], b) for k, (a, b) in terms.items()}

    def rows(self, kind: str, x: torch.Tensor, idx) -> torch.Tensor | float:
        if kind not in self.terms:
            return 0.0
        a, b = self.terms[kind]
        return F.linear(F.linear(x, a), b if idx is None else b[idx])

    def cols(self, h: torch.Tensor, idx) -> torch.Tensor | float:
        if "down" not in self.terms:
            return 0.0
        a, b = self.terms["down"]
        return F.linear(F.linear(h, a if idx is None else a[:, idx]), b)


class Decoder:
    """One layer's bundles to fp32 for computing: the pack's codec, the layer's pack order (position -> neuron) and
    shared down table, and a work buffer [F, 3, D] shared by every layer of a model (a fresh 10 MB allocation per
    layer costs its page faults every time)."""

    def __init__(self, codec: BundleCodec, work: np.ndarray, order: np.ndarray, table: np.ndarray | None,
                 threads: int = 2):
        self.codec, self.work, self.order, self.table, self.threads = codec, work, order, table, threads

    def __call__(self, *chunks: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """Chunks (bundles [k_i, bytes], their pack positions [k_i]), concatenated -> fp32 [3, k, D]: gate rows, up
        rows, down columns, as a transposed view of the work buffer (each row stays contiguous, row stride 3·D,
        which F.linear and matmul take without another copy)."""
        at = 0
        for bundles, positions in chunks:
            self.codec.decode(bundles, self.work[at:], self.order[positions], self.table, self.threads)
            at += bundles.shape[0]
        return torch.from_numpy(self.work[:at]).transpose(0, 1)


def topk_positions(scores: torch.Tensor, k: int) -> torch.Tensor:
    return scores.topk(k, dim=-1, sorted=False).indices


class DenseStore:
    """A layer's own fp32 weights [3, F, D] in pack order (measurements over a dense model: `profile.ram_module`)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def full(self) -> torch.Tensor:
        return self.rows

    def gather(self, positions: np.ndarray) -> torch.Tensor:
        return self.rows[:, torch.from_numpy(positions)]


class RamStore:
    """All of a layer's bundles in RAM, [F, bytes] in pack order (`--sparse` without a RAM budget)."""

    def __init__(self, bundles: np.ndarray, decoder: Decoder):
        self.bundles, self.decoder = bundles, decoder

    def full(self) -> torch.Tensor:
        return self.decoder((self.bundles, np.arange(len(self.bundles))))

    def gather(self, positions: np.ndarray) -> torch.Tensor:
        return self.decoder((self.bundles[positions], positions))

    @property
    def nbytes(self) -> int:
        return self.bundles.nbytes


class FlashStore:
    """Hot bundles [H, bytes] in RAM (pack positions 0..H-1); the rest read from the pack on demand.

    A decode step's cold misses are read as merged runs into the LRU cache, unless those runs would
    cover at least `full_read_at` of the cold region: the whole region is then read sequentially into
    a staging buffer instead (no more bytes than the runs, far fewer requests, and the cache is left as
    it was: at density 0.6 on the embedded model the runs cover nearly every layer).
    """

    def __init__(self, layer: int, hot: np.ndarray, n: int, file: BundleFile, shared, cache: NeuronCache | None,
                 max_gap: int, decoder: Decoder, full_read_at: float = 0.5):
        self.layer, self.hot, self.n, self.file, self.shared = layer, hot, n, file, shared
        self.decoder = decoder
        self.cache, self.max_gap, self.full_read_at = cache, max_gap, full_read_at
        self.n_hot = hot.shape[0]
        self.last_whole = False  # did the last decode step need the whole cold region? (the next prefetch's hint)

    @property
    def nbytes(self) -> int:
        return self.hot.nbytes + (self.cache.nbytes if self.cache is not None else 0)

    def read_cold(self, out: np.ndarray) -> None:
        """All cold bundles into out [n - H, bytes] (one sequential region, read in parallel chunks)."""
        self.file.read_block(self.layer, self.n_hot, out[: self.n - self.n_hot])

    def full(self) -> torch.Tensor:
        cold = self.shared.staged(self)
        return self.decoder((self.hot, np.arange(self.n_hot)),
                            (cold[: self.n - self.n_hot], np.arange(self.n_hot, self.n)))

    def cold_of(self, positions: np.ndarray) -> np.ndarray:
        """Sorted pack positions -> their cold keys (counted from the first cold neuron)."""
        return positions[positions >= self.n_hot] - self.n_hot

    def reads_whole(self, cold: np.ndarray) -> bool:
        """Would the merged runs for the uncached of these sorted cold keys cover `full_read_at` of the region?"""
        n_cold = self.n - self.n_hot
        miss = cold[self.cache.slot_of[cold] < 0] if self.cache is not None else cold
        if n_cold == 0 or len(miss) == 0:
            return False
        return sum(b - a for a, b in plan_runs(miss, self.max_gap)) >= self.full_read_at * n_cold

    def fetch(self, positions: np.ndarray, step: int, stats) -> tuple[np.ndarray, np.ndarray]:
        """Make cold positions resident: -> (cache slots, -1 where a scratch row holds it; scratch rows)."""
        slots = self.cache.lookup(positions, step)
        miss = positions[slots < 0]
        stats.hits += len(positions) - len(miss)
        stats.misses += len(miss)
        scratch = np.empty((0, self.cache.rows.shape[1]), dtype=np.uint8)
        if len(miss):
            new = self.cache.assign(miss, step)
            slots[slots < 0] = new
            overflow = miss[new < 0]
            scratch = np.empty((len(overflow), self.cache.rows.shape[1]), dtype=np.uint8)
            where = {int(p): memoryview(self.cache.rows[s]).cast("B") for p, s in zip(miss, new) if s >= 0}
            where.update({int(p): memoryview(scratch[j]).cast("B") for j, p in enumerate(overflow)})
            junk = memoryview(self.shared.junk).cast("B")
            # the pack addresses bundles from the layer's start; cache keys count from the first cold neuron
            self.file.read_scattered(self.layer, plan_runs(miss + self.n_hot, self.max_gap),
                                     lambda p: where.get(p - self.n_hot, junk))
        return slots, scratch

    def gather(self, positions: np.ndarray, step: int, stats) -> torch.Tensor:
        hot = positions[positions < self.n_hot]
        cold = self.cold_of(positions)
        staged = self.shared.staged_if_pending(self)  # the next-layer prefetch chose a whole-region read
        self.last_whole = self.reads_whole(cold)
        if staged is None and self.last_whole:
            staged = self.shared.staged(self)
        if staged is not None:
            stats.whole_reads += 1
            return self.decoder((self.hot[hot], hot), (staged[cold], cold + self.n_hot))
        slots, scratch = self.fetch(cold, step, stats)
        # rows in pack order, as the RAM and whole-read paths have them: the down projection then sums
        # the neurons in the same order, so the output does not depend on what the cache happened to hold
        rows = np.empty((len(cold), self.cache.rows.shape[1]), dtype=np.uint8)
        cached = slots >= 0
        rows[cached] = self.cache.rows[slots[cached]]
        rows[~cached] = scratch  # the overflow misses, in the same (sorted) order
        return self.decoder((self.hot[hot], hot), (rows, cold + self.n_hot))

    def prefetch(self, positions: np.ndarray, step: int, stats) -> None:
        """Read predicted cold neurons into free cache rows only (a guess never goes to scratch)."""
        cold = self.cold_of(np.sort(positions))
        cold = cold[self.cache.slot_of[cold] < 0][: int((self.cache.last < step).sum())]
        if len(cold):
            self.fetch(cold, step, LayerStats())


class LayerStats:
    def __init__(self):
        self.steps = self.computed = self.hits = self.misses = self.whole_reads = 0


class SparseFFN(nn.Module):
    """forward(x [B, T, D]) -> [B, T, D] over a store; selection by `strategy` at `density` on decode.

    It hosts bricks on its three linears (`add_adapter`): their low-rank terms apply to the neurons it computes,
    and gate/up terms are added to the predictor's estimates (`scores`), as the oracle sees them."""

    linear_names = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, layer: int, store, act, n: int, density: float = 1.0, strategy: str = "dense",
                 predictor: nn.Module | None = None, shared=None, order: np.ndarray | None = None):
        super().__init__()
        self.layer, self.store, self.act, self.n = layer, store, act, n
        self.density, self.strategy, self.predictor = density, strategy, predictor
        self.shared = shared  # the runtime: step counter, staging buffers, next layer's prefetch
        self.measure = False
        self.stats = LayerStats()
        self.order = torch.from_numpy(order if order is not None else np.arange(n))  # pack position -> neuron
        self.adapters: dict[str, dict[str, tuple]] = {k: {} for k in self.linear_names}  # linear -> name -> (pair, w)
        self.sides: Sides | None = None

    # ------------------------------------------------------------ bricks

    def add_adapter(self, linear: str, name: str, pair, weight: float) -> None:
        """A brick's LoRA pair (`bricks.LoraPair`, the model's own row layout) on `linear` (gate/up/down_proj)."""
        self.adapters[linear][name] = (pair, weight)
        self._merge()

    def remove_adapter(self, name: str) -> None:
        for pairs in self.adapters.values():
            pairs.pop(name, None)
        self._merge()

    def set_adapter_weight(self, name: str, weight: float) -> None:
        for pairs in self.adapters.values():
            if name in pairs:
                pairs[name] = (pairs[name][0], weight)
        self._merge()

    def adapter_weights(self) -> dict[str, float]:
        return {n: w for pairs in self.adapters.values() for n, (_, w) in pairs.items()}

    def _merge(self) -> None:
        terms = {}
        for linear, pairs in self.adapters.items():
            active = [(p, w * p.scale) for p, w in pairs.values() if w]
            if active:
                terms[linear.removesuffix("_proj")] = (torch.cat([p.a for p, _ in active]).float(),
                                                       torch.cat([w * p.b for p, w in active], dim=1).float())
        self.sides = Sides(terms, self.order) if terms else None

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
            return ffn_rows(x, self.store.full(), self.act, sides=self.sides)
        if self.strategy == "oracle" or self.measure:
            return self._masked(x)
        return self._selected(x)

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """The predictor's neuron scores for x; with bricks on gate or up, their low-rank terms are added to its
        estimated pre-activations, so the selection follows what the brick changes (it is what a personal
        brick's recall rests on: `benchmarks/bench_sparse_facts.py`)."""
        if self.sides is None or not {"gate", "up"} & self.sides.terms.keys():
            return self.predictor(x)
        g, u = self.predictor.pre(x)
        g, u = g + self.sides.rows("gate", x, None), u + self.sides.rows("up", x, None)
        return (self.act(g) * u).abs()

    def _masked(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token top-k of the true (oracle) or predicted activations, computed densely then masked."""
        w = self.store.full()
        if self.strategy == "oracle":
            gate, up = F.linear(x, w[0]), F.linear(x, w[1])
            if self.sides is not None:
                gate, up = gate + self.sides.rows("gate", x, None), up + self.sides.rows("up", x, None)
            s = (self.act(gate) * up).abs()
        else:
            s = self.scores(x)
        keep = torch.zeros_like(s).scatter_(-1, topk_positions(s, self.k), 1.0)
        self.stats.steps += x.shape[0] * x.shape[1]
        self.stats.computed += self.k * x.shape[0] * x.shape[1]
        return ffn_rows(x, w, self.act, keep, sides=self.sides)

    def _selected(self, x: torch.Tensor) -> torch.Tensor:
        """Decode: gather only the predicted neurons (batch rows share the union of their selections)."""
        idx = topk_positions(self.scores(x), self.k).reshape(-1).unique().numpy()
        step = self.shared.step if self.shared is not None else 0
        if not isinstance(self.store, FlashStore):
            w = self.store.gather(idx)
        else:
            w = self.store.gather(idx, step, self.stats)
        self.stats.steps += x.shape[0]
        self.stats.computed += len(idx) * x.shape[0]
        return ffn_rows(x, w, self.act, sides=self.sides, idx=torch.from_numpy(idx))
