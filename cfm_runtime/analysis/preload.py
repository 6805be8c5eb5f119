"""Function-aware prefetch on the real sparse runtime (not a simulation).

After a prompt's prefill, a classifier on the hidden state after `probe_layer` layers predicts the
prompt's function, and that function's most often selected cold neurons are read into each layer's
neuron cache (`SparseEngine.preload`: the decode read path, counted in the flash telemetry) before
the first decode step. `measure` runs held-out prompts through the runtime under a RAM budget with
and without the preload, dropping the pack file's page cache so reads are cold, and reports the
cache hit rate, flash bytes per token (decode only, and including the preload) and tokens/s.

Neuron selection in the measurement is the `oracle`: each decode step computes the true activations
|silu(gate·x)·(up·x)| of all neurons (from weights read through the store once, kept in RAM as a
measuring device, outside the budget) and fetches the top-k by the same cache as the predictor path.
So the hit rates do not depend on the trained predictor's quality; the oracle's extra compute lowers
tokens/s equally with and without the preload.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tqdm import tqdm

from ..errors import CfmError
from ..generate import Generator
from ..runners import LocalRunner
from ..sampling import SamplingParams
from ..sparse.io import NeuronCache
from . import figures
from .collect import run_sequence, template_prefix_len
from .prefetch import probe_features, train_classifier
from .prompts import FUNCTIONS

CONDITIONS = ("none", "static", "function", "function_true_label")
DEFAULT_CONDITIONS = ("none", "static", "function")


class OracleScorer(nn.Module):
    """A stand-in predictor returning the true |act| of every neuron (pack order); optionally counts,
    per token from `record_from`, which k neurons it selects into `counts` [n]."""

    def __init__(self, gate_up: torch.Tensor, act, k: int):
        super().__init__()
        self.w, self.act, self.k = gate_up, act, k
        self.counts: np.ndarray | None = None
        self.record_from = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (self.act(F.linear(x, self.w[0])) * F.linear(x, self.w[1])).abs()
        if self.counts is not None:
            sel = s.reshape(-1, s.shape[-1])[self.record_from:].topk(self.k, dim=-1).indices
            self.counts += np.bincount(sel.reshape(-1).numpy(), minlength=len(self.counts))
        return s


def flash_modules(model) -> list:
    """The SparseFFN modules of a model loaded with a RAM budget and a caching strategy."""
    engine = model.sparse
    mods = engine.modules if engine is not None else []
    if not mods or any(getattr(m.store, "cache", None) is None for m in mods):
        raise CfmError("the prefetch measurement needs a sparse model with a neuron cache: "
                       "load_model(..., ram_budget_mb=B, sparse_strategy='predictor')")
    return mods


def use_oracle(model) -> None:
    """Select neurons by their true activations (through the cache path of the `predictor` strategy).

    The measurement is about the LRU neuron cache, so every miss goes through it: the runtime's
    switch to one whole-layer read when the misses cover most of a layer is turned off here."""
    for m in flash_modules(model):
        w = m.store.full()  # [3, n, D] fp32 in pack order, read through the store
        m.predictor = OracleScorer(w[:2].clone(), m.act, m.k)
        m.strategy = "predictor"
        m.store.full_read_at = float("inf")


def reset_caches(model) -> None:
    """Empty every layer's neuron cache (a fresh session)."""
    for m in flash_modules(model):
        c = m.store.cache
        m.store.cache = NeuronCache(c.capacity, len(c.slot_of), c.rows.shape[1])


def drop_page_cache(model) -> None:
    """Evict the neuron pack from the OS page cache, so the next reads come from the disk."""
    os.posix_fadvise(model.sparse.file.fd, 0, 0, os.POSIX_FADV_DONTNEED)


def selection_counts(model, encoded: list, labels: np.ndarray, progress: bool = False) -> np.ndarray:
    """How often each neuron (pack position) is among the oracle's top-k on answer tokens, per function:
    [n_functions, L, n], from teacher-forced texts (prompt + stored answer) through the sparse runtime."""
    mods = flash_modules(model)
    if not all(isinstance(m.predictor, OracleScorer) for m in mods):
        raise CfmError("selection_counts needs use_oracle(model) first")
    counts = np.zeros((len(FUNCTIONS), len(mods), mods[0].n), np.int64)
    model.sparse.configure(measure=True)
    try:
        for e, f in zip(tqdm(encoded, desc="neuron selections", disable=not progress, unit="text"), labels):
            for i, m in enumerate(mods):
                m.predictor.counts, m.predictor.record_from = counts[f, i], e.response_start
            run_sequence(model.transformer, e.ids)
    finally:
        for m in mods:
            m.predictor.counts = None
        model.sparse.configure(measure=False)
    return counts


def rankings(counts: np.ndarray) -> list[list[np.ndarray]]:
    """counts [S, L, n] -> per set and layer the positions ever selected, most often first."""
    out = []
    for c in counts:
        layers = []
        for row in c:
            order = np.argsort(-row, kind="stable")
            layers.append(order[row[order] > 0])
        out.append(layers)
    return out


@dataclass
class FunctionPrefetch:
    """Predict a prompt's function from its hidden state after `probe_layer` layers, preload its neurons."""

    classifier: object  # sklearn pipeline from prefetch.train_classifier
    ranked: list  # [n_functions][L] pack positions, best first
    probe_layer: int
    prefix: int  # chat-template tokens before the user text
    probe_tokens: int = 16

    def predict(self, hidden: torch.Tensor) -> int:
        """hidden [T, D] of a fresh prompt -> function index."""
        h = hidden[self.prefix:self.prefix + self.probe_tokens] if hidden.shape[0] > self.prefix + 1 else hidden
        return int(self.classifier.predict(h.float().mean(0).numpy()[None])[0])

    def preload(self, engine, function: int) -> int:
        return sum(engine.preload(m.layer, self.ranked[function][i]) for i, m in enumerate(engine.modules))


class PrefetchRunner(LocalRunner):
    """A LocalRunner that, after a prompt's prefill, predicts its function and preloads its neurons.

    `choose(hidden) -> function index or None` overrides the classifier (for the measurement's
    control conditions); `after_prefill()` runs after the prefill and again after a preload (e.g. to
    drop the page cache for cold reads)."""

    def __init__(self, model, max_len: int, engine, prefetch: FunctionPrefetch | None, choose=None,
                 after_prefill=None):
        super().__init__(model, max_len=max_len)
        self.engine, self.prefetch = engine, prefetch
        self.choose, self.after_prefill = choose, after_prefill
        self.predicted: int | None = None
        self.preload_bytes, self.preload_seconds = 0, 0.0

    def forward(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        if len(ids) == 1 or self.prefetch is None:
            out = super().forward(ids, all_logits)
            if len(ids) > 1 and self.after_prefill:
                self.after_prefill()
            return out
        seen = {}

        def keep(mod, args, out):  # returns None: the layer's output stays as it is
            seen.setdefault("h", out[0])

        handle = self.model.transformer.layers[self.prefetch.probe_layer - 1].register_forward_hook(keep)
        try:
            out = super().forward(ids, all_logits)
        finally:
            handle.remove()
        if self.after_prefill:
            self.after_prefill()
        t0 = time.perf_counter()
        f = self.choose(seen["h"]) if self.choose else self.prefetch.predict(seen["h"])
        self.predicted = f
        if f is not None:
            self.preload_bytes += self.prefetch.preload(self.engine, f)
        self.preload_seconds += time.perf_counter() - t0
        if f is not None and self.after_prefill:
            self.after_prefill()  # the preloaded rows live in the process: evict what their reads cached
        return out


def run_prompt(model, ids: list[int], prefetch: FunctionPrefetch | None, choose, max_tokens: int, cold: bool) -> dict:
    """One generation (greedy) from an empty neuron cache; telemetry of its decode steps."""
    engine = model.sparse
    reset_caches(model)
    if cold:
        drop_page_cache(model)

    def after_prefill():
        if cold:
            drop_page_cache(model)

    runner = PrefetchRunner(model, len(ids) + max_tokens + 1, engine, prefetch, choose, after_prefill)
    since = engine.counters()
    stats = None
    for chunk in Generator(runner, model.tokenizer, model.config.context_length).stream(
            ids, SamplingParams(max_tokens=max_tokens, temperature=0.0)):
        stats = chunk.stats
    now = engine.counters()
    d = {k: now[k] - since[k] for k in now}
    tokens = max(1, d["decode_tokens"])
    lookups = d["hits"] + d["misses"]
    return {"predicted": runner.predicted, "decode_tokens": d["decode_tokens"],
            "hits": d["hits"], "misses": d["misses"], "computed": d["computed"],
            "cache_hit_rate": d["hits"] / lookups if lookups else None,
            "decode_bytes": d["decode_bytes"], "preload_bytes": runner.preload_bytes,
            "flash_mb_per_token": d["decode_bytes"] / tokens / 2**20,
            "flash_mb_per_token_with_preload": (d["decode_bytes"] + runner.preload_bytes) / tokens / 2**20,
            "preload_seconds": runner.preload_seconds, "decode_tps": stats.decode_tps,
            "text_tokens": stats.generated_tokens}


def measure(an, sparse_model, per_function: int = 5, max_tokens: int = 32, cold: bool = True,
            selection: str = "oracle", conditions=DEFAULT_CONDITIONS, rank_texts: int | None = None) -> dict:
    """Held-out prompts of `an` (an Analysis on the dense model) through `sparse_model` with each preload
    condition: none, static (most often selected neurons over all functions), function (classifier's
    prediction), function_true_label (the prompt's own function: the classifier's ceiling)."""
    if selection not in ("oracle", "predictor"):
        raise CfmError(f"selection must be oracle or predictor, got {selection!r}")
    bad = [c for c in conditions if c not in CONDITIONS]
    if bad or "none" not in conditions:
        raise CfmError(f"conditions must include 'none' and come from {', '.join(CONDITIONS)}; got {conditions}")
    train, test = an.split
    labels = np.array([x.label for x in an.instances])
    pl = an.opts.probe_layer
    if pl < 1:
        raise CfmError("the real prefetch measurement needs probe_layer >= 1 (a layer the prefill runs)")
    # the classifier's features: the same as the collection's probe, computed from the prompts alone
    feats = probe_features(an.model, [an.instances[j].prompt for j in train], pl, an.opts.collect.probe_tokens)
    clf = train_classifier(feats, labels[train], an.opts.seed)
    engine = sparse_model.sparse
    # neuron rankings always from the oracle's selections on the training texts
    saved = [(m.predictor, m.strategy) for m in flash_modules(sparse_model)]
    use_oracle(sparse_model)
    t0 = time.perf_counter()
    ranking = np.array([j for f in range(len(FUNCTIONS)) for j in train[labels[train] == f][:rank_texts]])
    counts = selection_counts(sparse_model, [an.encoded[j] for j in ranking], labels[ranking], an.opts.progress)
    ranking_seconds = time.perf_counter() - t0
    if selection == "predictor":
        for m, (pred, strat) in zip(flash_modules(sparse_model), saved):
            m.predictor, m.strategy = pred, strat
    ranked = rankings(np.concatenate([counts, counts.sum(0, keepdims=True)]))
    static = len(FUNCTIONS)
    pf = FunctionPrefetch(clf, ranked, pl, template_prefix_len(sparse_model), an.opts.collect.probe_tokens)

    held = [j for f in range(len(FUNCTIONS)) for j in test[labels[test] == f][:per_function]]
    rows: dict[str, list[dict]] = {k: [] for k in conditions}
    jobs = [(j, k) for j in held for k in conditions]  # conditions interleaved: machine noise hits all alike
    for j, cond in tqdm(jobs, desc="prefetch runs", disable=not an.opts.progress, unit="run"):
        label = int(labels[j])
        choose = {"none": None, "static": lambda h: static, "function": None,
                  "function_true_label": lambda h, f=label: f}[cond]
        ids = sparse_model.encode_prompt([{"role": "user", "content": an.instances[j].prompt}])
        r = run_prompt(sparse_model, ids, None if cond == "none" else pf, choose, max_tokens, cold)
        r.update(instance=int(j), label=label)
        rows[cond].append(r)

    per_fn = {}
    for f, name in enumerate(FUNCTIONS):
        per_fn[name] = {k: _pool([r for r in v if r["label"] == f]) for k, v in rows.items()}
    fn_rows = rows.get("function", [])
    cap = flash_modules(sparse_model)[0].store.cache.capacity
    return {
        "what": "REAL sparse runtime: neurons read from the pack through the LRU neuron cache under a RAM budget; "
                "after each held-out prompt's prefill the cache is preloaded (or not) through "
                "SparseEngine.preload; greedy decode; cache emptied before every run"
                + ("; pack evicted from the page cache before the prefill, after it and after the preload "
                   "(cold reads)" if cold else "; page cache warm"),
        "selection": selection, "cold": cold, "max_tokens": max_tokens, "prompts_per_function": per_function,
        "budget": engine.budget, "cache_rows_per_layer": cap,
        "density_per_layer": [round(m.density, 3) for m in flash_modules(sparse_model)],
        "hot_neurons_per_layer": [m.store.n_hot for m in flash_modules(sparse_model)],
        "classifier_training_texts": len(train), "ranking_texts": len(ranking), "ranking_seconds": round(ranking_seconds, 1),
        "neurons_ranked_per_layer_mean": {n: float(np.mean([len(x) for x in ranked[f]]))
                                          for f, n in enumerate([*FUNCTIONS, "static"])},
        "classifier_accuracy_in_runtime": (float(np.mean([r["predicted"] == r["label"] for r in fn_rows]))
                                           if fn_rows else None),
        "mean": {k: _pool(v) for k, v in rows.items()},
        "per_function": per_fn,
        "runs": rows,
    }


def _pool(rows: list[dict]) -> dict:
    """Pooled over runs: hit rate = hits / lookups, bytes / decode tokens; tokens/s = median of runs."""
    if not rows:
        return {}
    tokens = max(1, sum(r["decode_tokens"] for r in rows))
    hits, misses = sum(r["hits"] for r in rows), sum(r["misses"] for r in rows)
    dec, pre = sum(r["decode_bytes"] for r in rows), sum(r["preload_bytes"] for r in rows)
    return {"runs": len(rows), "decode_tokens": tokens,
            "cache_hit_rate": hits / max(1, hits + misses),
            "cold_misses_per_token": misses / tokens,
            "flash_mb_per_token": dec / tokens / 2**20,
            "flash_mb_per_token_with_preload": (dec + pre) / tokens / 2**20,
            "preload_mb_per_prompt": pre / len(rows) / 2**20,
            "preload_seconds_mean": float(np.mean([r["preload_seconds"] for r in rows])),
            "decode_tps_median": float(np.median([r["decode_tps"] for r in rows]))}


def figure(result: dict, path) -> None:
    names = list(FUNCTIONS) + ["mean"]
    conds = list(result["mean"])
    get = lambda k, c: [result["per_function"][n][c][k] for n in FUNCTIONS] + [result["mean"][c][k]]  # noqa: E731
    panels = [("cache hit rate", "hit rate", {c: get("cache_hit_rate", c) for c in conds}),
              ("flash MB per decode token", "MB/token", {c: get("flash_mb_per_token", c) for c in conds}),
              ("flash MB per token incl. preload", "MB/token",
               {c: get("flash_mb_per_token_with_preload", c) for c in conds})]
    b = result["budget"]
    figures.bar_panels(names, panels, path,
                       f"function-aware preload, real runtime ({result['selection']} selection, "
                       f"RAM budget {b.get('ram_budget_mb')} MB, cache {b.get('cache_mb')} MB)")
