"""The sparse runtime shared by a model's SparseFFN modules: staging, prefetch, step counter, telemetry.

Prefetch: while layer i computes, the bundles of the layer that runs next here are read in the background
(i+1, or the first layer after a span that runs elsewhere: the order is learnt from the layers seen
running). In dense mode (prefill, density 1.0) that is the next layer's whole cold region into the other
of two staging buffers; in predictor mode it is the neurons its predictor picks from layer i's FFN input
(the residual stream changes little from one layer to the next), into its cache. A prefetch for a layer
that did not run next (a span moved to a center, or back) is waited for and dropped.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import psutil

from ..errors import CfmError
from ..memory import rss_high_water_mb
from .ffn import FlashStore, SparseFFN, topk_positions


class SparseEngine:
    def __init__(self, modules: list[SparseFFN], file=None, staging_rows: int = 0, row_bytes: int = 0,
                 budget: dict | None = None):
        self.modules, self.file = modules, file
        self.step = 0
        self.phase = "prefill"
        self.staging = [np.zeros((staging_rows, row_bytes), dtype=np.uint8) for _ in range(2 if file else 0)]
        self.junk = np.zeros(row_bytes, dtype=np.uint8)  # gap bundles read only to merge requests
        self.pending: dict[int, tuple[Future, np.ndarray | None]] = {}
        self.successor: dict[int, int] = {}  # layer -> the layer seen running right after it in the same pass
        self.last_layer: int | None = None
        self.background = ThreadPoolExecutor(1, thread_name_prefix="cfm-prefetch") if file else None
        self.budget = budget or {}
        self.phase_bytes = {"prefill": 0, "decode": 0}
        self.phase_reads = {"prefill": 0, "decode": 0}
        self._mark = (0, 0)
        for m in modules:
            m.shared = self

    # ------------------------------------------------------------ per-layer hooks

    def before(self, module: SparseFFN, x, sparse: bool) -> None:
        if module.layer == self.modules[0].layer:
            self._account()
            self.phase = "prefill" if x.shape[1] > 1 else "decode"
            if self.phase == "decode":
                self.step += 1
        if self.last_layer is not None and module.layer > self.last_layer:
            self.successor[self.last_layer] = module.layer
        self.last_layer = module.layer
        if not isinstance(module.store, FlashStore):
            return
        self._wait(module.layer)
        nxt = self._next(module)
        self._drop_stale(keep={module.layer} | ({nxt.layer} if nxt is not None else set()))
        if nxt is None or not isinstance(nxt.store, FlashStore):
            return
        if not nxt.sparse_now(x.shape[1]):
            self._prefetch_dense(nxt)
        elif nxt.strategy == "predictor" and not nxt.measure:
            if nxt.store.last_whole:  # it read whole last token: read all of it again, no guess needed
                self._prefetch_dense(nxt)
                return
            positions = topk_positions(nxt.scores(x), nxt.k).reshape(-1).unique().numpy()
            if nxt.store.reads_whole(nxt.store.cold_of(positions)):
                self._prefetch_dense(nxt)  # the guess covers most of the layer: read all of it, sequentially
            else:
                fut = self.background.submit(nxt.store.prefetch, positions, self.step, nxt.stats)
                self.pending[nxt.layer] = (fut, None)

    def staged(self, store: FlashStore) -> np.ndarray:
        """The staging buffer holding `store`'s cold bundles (read now if no prefetch brought them)."""
        entry = self.pending.pop(store.layer, None)
        if entry is not None and entry[1] is not None:
            entry[0].result()
            return entry[1]
        buf = self._free_buffer()
        store.read_cold(buf)
        return buf

    def staged_if_pending(self, store: FlashStore) -> np.ndarray | None:
        """The staging buffer of a whole-region prefetch for `store`'s layer, if one was started."""
        entry = self.pending.get(store.layer)
        return self.staged(store) if entry is not None and entry[1] is not None else None

    def _next(self, module: SparseFFN) -> SparseFFN | None:
        """The layer expected to run next here: the one seen after this one, else the following one."""
        layer = self.successor.get(module.layer, module.layer + 1)
        return next((m for m in self.modules if m.layer == layer), None)

    def _drop_stale(self, keep: set[int]) -> None:
        """Finish and forget prefetches for layers that did not run next (their buffers become free)."""
        for layer in [x for x in self.pending if x not in keep]:
            self.pending.pop(layer)[0].result()

    def _free_buffer(self) -> np.ndarray:
        """The staging buffer no pending layer holds (at most two layers are in flight: this and the next)."""
        busy = {id(b) for _, b in self.pending.values() if b is not None}
        return next(b for b in self.staging if id(b) not in busy)

    def _prefetch_dense(self, nxt: SparseFFN) -> None:
        buf = self._free_buffer()
        self.pending[nxt.layer] = (self.background.submit(nxt.store.read_cold, buf), buf)

    def _wait(self, layer: int) -> None:
        entry = self.pending.get(layer)
        if entry is not None and entry[1] is None:  # a cache prefetch: done before the layer reads its cache
            self.pending.pop(layer)[0].result()

    def _account(self) -> None:
        if self.file is None:
            return
        b, r = self.file.io.bytes, self.file.io.reads
        self.phase_bytes[self.phase] += b - self._mark[0]
        self.phase_reads[self.phase] += r - self._mark[1]
        self._mark = (b, r)

    def preload(self, layer: int, positions) -> int:
        """Read `layer`'s neurons at pack `positions` (best first) into its free cache rows now, through the
        decode read path (e.g. a predicted function's neurons after prefill). Counted in the flash telemetry
        (as prefill traffic when called before the first decode step); not counted as hits or misses.
        -> bytes read (including gap bundles read to merge requests)."""
        m = next((m for m in self.modules if m.layer == layer), None)
        if m is None or not isinstance(m.store, FlashStore) or m.store.cache is None:
            raise CfmError(f"layer {layer} has no neuron cache to preload: preloading needs a RAM budget "
                           "(--ram-budget) with a sparse strategy that caches neurons")
        pos = np.asarray(positions, dtype=np.int64).reshape(-1)
        if len(pos) and (pos.min() < 0 or pos.max() >= m.n):
            raise CfmError(f"preload positions must be in 0..{m.n - 1}")
        self._wait(layer)
        before = self.file.io.bytes
        m.store.prefetch(pos[pos >= m.store.n_hot][: m.store.cache.capacity], self.step, None)
        return self.file.io.bytes - before

    # ------------------------------------------------------------ settings and telemetry

    def configure(self, strategy: str | None = None, density: float | None = None, densities=None,
                  measure: bool | None = None) -> None:
        if strategy == "predictor" and any(m.predictor is None for m in self.modules):
            raise CfmError("this sparse FFN was attached without a predictor (sparse strategy dense or oracle); "
                           "load the model with the predictor strategy (sparse=True and no sparse_strategy, or "
                           "sparse_strategy='predictor') to select neurons by prediction")
        for i, m in enumerate(self.modules):
            if strategy is not None:
                m.strategy = strategy
            if densities is not None:
                m.density = densities[i]
            elif density is not None:
                m.density = density
            if measure is not None:
                m.measure = measure

    def counters(self) -> dict:
        self._account()
        return {
            "steps": sum(m.stats.steps for m in self.modules),
            "computed": sum(m.stats.computed for m in self.modules),
            "hits": sum(m.stats.hits for m in self.modules),
            "misses": sum(m.stats.misses for m in self.modules),
            "whole_reads": sum(m.stats.whole_reads for m in self.modules),
            "decode_bytes": self.phase_bytes["decode"], "decode_reads": self.phase_reads["decode"],
            "prefill_bytes": self.phase_bytes["prefill"],
            "decode_tokens": self.step,
        }

    def report(self, since: dict) -> dict:
        """Telemetry since the `counters()` snapshot `since` (one generation)."""
        now = self.counters()
        d = {k: now[k] - since[k] for k in now}
        n = self.modules[0].n
        tokens = max(1, d["decode_tokens"])
        lookups = d["hits"] + d["misses"]
        rss = psutil.Process(os.getpid()).memory_info().rss / 2**20
        return {
            "strategy": self.modules[0].strategy,
            "density_mean": round(float(np.mean([m.density for m in self.modules])), 3),
            "neurons_computed_pct": round(100 * d["computed"] / (d["steps"] * n), 1) if d["steps"] else 100.0,
            "flash_mb_per_token": round(d["decode_bytes"] / tokens / 2**20, 3),
            "flash_reads_per_token": round(d["decode_reads"] / tokens, 1),
            "prefill_flash_mb": round(d["prefill_bytes"] / 2**20, 1),
            "cache_hit_rate": round(d["hits"] / lookups, 3) if lookups else None,
            "whole_layer_reads_per_token": round(d["whole_reads"] / tokens, 1),
            "rss_mb": round(rss, 1),
            "rss_hwm_mb": round(rss_high_water_mb(), 1),
            **self.budget,
            "fixed_overhead_mb": round(rss - self.budget.get("ffn_weights_mb", 0.0), 1),
        }

    def close(self) -> None:
        if self.background is not None:
            self.background.shutdown(wait=True)
        if self.file is not None:
            self.file.close()
