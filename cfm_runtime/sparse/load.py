"""`attach(transformer, pack, ...)`: replace every FFN by a SparseFFN over a neuron pack, weights in RAM or on flash.

With a RAM budget the transformer's own FFN weights are not needed (`cfm_runtime.runtime` loads the
checkpoint without them, as meta tensors), so peak memory stays near the budgeted size.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import CfmError
from ..memory import release_freed_memory
from ..options import SparseOptions
from . import pack as packfmt
from .engine import SparseEngine
from .ffn import Decoder, FlashStore, RamStore, SparseFFN
from .io import BundleFile, NeuronCache
from .plan import DEFAULT_PLAN, covered_mass, hot_counts, plan_densities
from .profile import native_int4, predictor_from


# Without the native kernel each layer's int4 predictor is an onnxruntime session, which takes 5-7 MB of anonymous
# memory on its first run beyond its 1.3 MB of weights (prepacked weights, arena, thread pool; measured on the
# embedded model: 30 sessions +186 MB). It counts against the RAM budget with the weights.
INT4_SESSION_BYTES = 6 << 20


def predictor_bytes(pack: packfmt.NeuronPack, kind: str, rank: int | None = None) -> int:
    """RAM a predictor of `kind` takes for all layers: its weights, and for int4 in onnxruntime the sessions."""
    man = pack.manifest["model"]
    if kind == "lowrank" and rank is not None:
        return pack.n_layers * rank * (man["d_model"] + 2 * man["d_ff"]) * 4
    if kind == "int4" and native_int4(pack):
        return pack.n_layers * 2 * man["d_ff"] * pack.codec.part_bytes("q4_1")
    key = f".{packfmt.PREDICTOR_KEYS[kind]}."
    weights = sum(v.numel() * v.element_size() for k, v in pack.tables.items() if key in k)
    return weights + (pack.n_layers * INT4_SESSION_BYTES if kind == "int4" else 0)


def choose_predictor(pack: packfmt.NeuronPack, ram_budget_mb: float | None, kind: str | None) -> tuple[str, int | None]:
    """(kind, rank): as asked, else int4 (near-exact) unless it takes over half of the RAM budget, then
    the low-rank predictor cut to the rank that fits a quarter of the budget (its SVD directions are
    nested, so a prefix of the stored rank is the best predictor of that rank)."""
    if kind is not None and kind not in packfmt.PREDICTOR_KEYS:
        raise CfmError(f"predictor {kind!r} is unknown; choose one of {', '.join(packfmt.PREDICTOR_KEYS)}")
    budget = None if ram_budget_mb is None else ram_budget_mb * 2**20
    if kind == "int4" or (kind is None and (budget is None or predictor_bytes(pack, "int4") <= budget / 2)):
        return "int4", None
    stored = pack.manifest["predictors"]["lowrank"]["rank"]
    if budget is None:
        return "lowrank", stored
    rank = min(stored, int(budget / 4 // predictor_bytes(pack, "lowrank", 1)))
    if rank < 8:
        raise CfmError(f"--ram-budget {ram_budget_mb:g} MB leaves no room for a predictor; raise it")
    return "lowrank", rank


def budget_plan(pack: packfmt.NeuronPack, ram_budget_mb: float, sparse: bool, cache_fraction: float,
                predictor: str = "int4", rank: int | None = None) -> dict:
    """Hot neuron counts per layer and the byte split of the budget (hot, cache, staging, work buffer, shared down
    tables, predictors)."""
    man = pack.manifest
    bb, cluster, n = pack.bundle_bytes, man["cluster"], man["model"]["d_ff"]
    budget = int(ram_budget_mb * 2**20)
    predictors = predictor_bytes(pack, predictor, rank) if sparse else 0
    cache = int(budget * cache_fraction) if sparse else 0
    staging = 2 * n * bb
    work = work_bytes(pack)
    tables = pack.n_layers * pack.codec.shared_bytes(n)
    cmass = [pack.cluster_mass(i) for i in range(pack.n_layers)]
    counts = [0] * pack.n_layers
    for _ in range(3):  # staging shrinks with the hot set: iterate to a fixed point
        left = budget - predictors - cache - staging - work - tables
        if left < 0:
            mb = lambda b: f"{b / 2**20:.1f}"  # noqa: E731
            parts = f"staging {mb(staging)}, fp32 work buffer {mb(work)}, down tables {mb(tables)}" + (
                f", neuron cache {mb(cache)} ({100 * cache_fraction:g}% of the budget), predictor {mb(predictors)}"
                if sparse else "")
            raise CfmError(f"--ram-budget {ram_budget_mb:g} MB does not hold this model's fixed parts ({parts} MB) "
                           "and any hot neurons; raise it" + (" or drop --sparse" if sparse else ""))
        counts = hot_counts(cmass, cluster, left // (cluster * bb))
        staging = 2 * max(n - c for c in counts) * bb
    hot = sum(counts) * bb
    return {"counts": counts, "cache_rows": cache // bb // pack.n_layers, "staging_rows": staging // (2 * bb),
            "report": {"ram_budget_mb": ram_budget_mb,
                       "ffn_weights_mb": round((hot + cache + staging + work + tables + predictors) / 2**20, 1),
                       "hot_mb": round(hot / 2**20, 1), "cache_mb": round(cache / 2**20, 1),
                       "staging_mb": round(staging / 2**20, 1), "work_mb": round(work / 2**20, 1),
                       "down_tables_mb": round(tables / 2**20, 1),
                       "predictors_mb": round(predictors / 2**20, 1),
                       **({"predictor": predictor if rank is None else f"lowrank-{rank}"} if sparse else {}),
                       "hot_neurons_pct": round(100 * sum(counts) / (n * pack.n_layers), 1),
                       "hot_mass_covered": round(covered_mass(cmass, counts, cluster), 3)}}


def work_bytes(pack: packfmt.NeuronPack) -> int:
    """The fp32 buffer where a layer's bundles are decoded to be computed on (`ffn.Decoder`)."""
    return pack.manifest["model"]["d_ff"] * 3 * pack.manifest["model"]["d_model"] * 4


def layer_densities(pack: packfmt.NeuronPack, density: float, plan: str = DEFAULT_PLAN) -> list[float]:
    """Per-layer densities with mean `density`: the same for every layer, or the pack's per-layer plan."""
    return plan_densities(pack.manifest, density, plan)


def attach(transformer, pack: packfmt.NeuronPack, options: SparseOptions, threads: int = 8,
           max_gap: int = 4) -> SparseEngine:
    """Replace every layers[i].mlp by a SparseFFN over `pack` (resolved `options`); returns their engine."""
    ram_budget_mb, strategy, predictor = options.ram_budget_mb, options.strategy, options.predictor
    layers = transformer.layers
    use_pred = strategy == "predictor"
    kind, rank = choose_predictor(pack, ram_budget_mb, predictor) if use_pred else (None, None)
    if use_pred and predictor is None and kind == "lowrank":  # a warning: the CLI shows it, callers may filter it
        warnings.warn(f"the int4 predictor ({predictor_bytes(pack, 'int4') / 2**20:.0f} MB with its runtime) does not fit "
                      f"half of --ram-budget {ram_budget_mb:g} MB; using the low-rank one (rank {rank}), which selects "
                      "neurons poorly on SiLU models (docs/sparse.md: +119% perplexity at density 0.6 on the embedded "
                      "model)", stacklevel=2)
    dens = layer_densities(pack, options.density, options.density_plan)
    man = pack.manifest["model"]
    work = np.empty((man["d_ff"], 3, man["d_model"]), np.float32)

    def decoder(i: int) -> Decoder:
        return Decoder(pack.codec, work, pack.order(i), pack.shared(i), torch.get_num_threads())

    if ram_budget_mb is None:
        modules = [_ram_module(i, layer.mlp, pack, kind, rank, decoder(i)) for i, layer in enumerate(layers)]
        name = kind if rank is None else f"lowrank-{rank}"
        engine = SparseEngine(modules, budget={"predictor": name} if kind else None)
    else:
        engine = _flash_engine(transformer, pack, ram_budget_mb, kind, rank, options.cache_fraction, max_gap,
                               threads, decoder)
    engine.configure(strategy=strategy, densities=dens)
    for layer, m in zip(layers, engine.modules):
        layer.mlp = m
    release_freed_memory()
    return engine


def _ram_module(i: int, mlp, pack, kind: str | None, rank: int | None, decoder: Decoder) -> SparseFFN:
    order = pack.order(i)
    bundles = pack.bundles(i)
    net = predictor_from(pack, i, order, pack.manifest["model"]["activation"], kind, rank, bundles) if kind else None
    return SparseFFN(i, RamStore(bundles, decoder), mlp.act, len(order), predictor=net, order=order)


def _flash_engine(transformer, pack, ram_budget_mb, kind, rank, cache_fraction, max_gap, threads,
                  decoder) -> SparseEngine:
    use_pred = kind is not None
    plan = budget_plan(pack, ram_budget_mb, use_pred, cache_fraction, kind or "int4", rank)
    n, bb = transformer.config.d_ff, pack.bundle_bytes
    file = BundleFile(pack.neurons_path, [pack.layer(i)["offset"] for i in range(pack.n_layers)], bb, threads)
    modules = []
    for i, layer in enumerate(transformer.layers):
        hot = np.empty((plan["counts"][i], bb), dtype=np.uint8)
        file.read_block(i, 0, hot)
        cache = NeuronCache(plan["cache_rows"], n, bb) if use_pred else None
        store = FlashStore(i, hot, n, file, None, cache, max_gap, decoder(i))
        net = predictor_from(pack, i, pack.order(i), transformer.config.activation, kind, rank) if use_pred else None
        modules.append(SparseFFN(i, store, layer.mlp.act, n, predictor=net, order=pack.order(i)))
    file.io.bytes = file.io.reads = 0
    engine = SparseEngine(modules, file, plan["staging_rows"], bb, plan["report"])
    for m in modules:
        m.store.shared = engine
    return engine
