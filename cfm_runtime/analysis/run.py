"""The analyses behind `cfm analyze`: each writes a JSON file and PNG figures into an output folder.

One activation pass over the labelled set (cached in OUT/collection.npz) feeds all of them. Neuron
scores and sets are computed on a stratified 75% split; masking, perturbation and prefetch are
evaluated on the held-out 25%.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..errors import CfmError
from ..options import LoadOptions, SparseOptions
from ..runtime import load_model
from . import figures, preload
from .collect import CDF_BINS, Collection, CollectOptions, collect, encode, template_prefix_len
from .masking import MaskedMLP, masked, mean_nll
from .prefetch import evaluate_prefetch
from .prompts import FUNCTIONS, load_instances
from .scores import (check_against_sklearn, functionality_scores, layer_summary, partition_similarity,
                     top_sets)

LEVELS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@dataclass
class AnalysisOptions:
    per_function: int | None = None  # prompts per function (None: all of them)
    responses: str = "auto"  # see prompts.load_instances
    max_tokens: int = 32  # answer length when responses are generated now
    top: float = 0.05  # size of a function's neuron set, as a fraction of each layer
    test_size: float = 0.25
    mask_levels: tuple = LEVELS
    mask_texts: int = 2  # held-out texts per function for the masking curves
    perturb_texts: int | None = 5  # held-out texts per function for the 7x7 matrix (None: all)
    hot_fractions: tuple = (0.1, 0.2, 0.3, 0.5)
    probe_layer: int = 3  # hidden state after this many layers feeds the function classifier
    seed: int = 0
    progress: bool = True
    # the prefetch measured on the real sparse runtime (cfm_runtime.analysis.preload); None: simulation only
    cache_budget_mb: float | None = None  # RAM budget of the sparse model (its neuron cache is 25% of it)
    cache_prompts: int = 5  # held-out prompts per function
    cache_tokens: int = 32  # tokens generated per prompt
    cache_selection: str = "oracle"  # neuron selection while decoding: oracle (true top-k) or predictor
    cache_density: float | None = None  # mean fraction of neurons computed (default: the runtime's)
    cache_pack: str | None = None  # neuron pack directory (default: the model's, built if missing)
    cache_cold: bool = True  # evict the pack from the page cache around each run
    cache_predictor: str | None = None  # predictor kind to load (for the budget split; default: the runtime's)
    cache_rank_texts: int | None = 12  # training texts per function that rank each function's neurons
    collect: CollectOptions = field(default_factory=CollectOptions)


def _write(out: Path, name: str, data: dict) -> Path:
    path = out / name
    path.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    return path


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return np.round(x.astype(np.float64), 5).tolist() if x.dtype.kind == "f" else x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    raise TypeError(type(x))


class Analysis:
    """Lazily computed shared state of one analysis run on one model."""

    def __init__(self, model, out: Path, opts: AnalysisOptions | None = None):
        self.model, self.out, self.opts = model, Path(out), opts or AnalysisOptions()
        if self.opts.per_function is not None and self.opts.per_function < 3:
            raise CfmError("per_function must be at least 3 (a train/held-out split needs them)")
        if not 0 < self.opts.top < 1:
            raise CfmError(f"top must be in (0, 1), got {self.opts.top}")
        if not 0 <= self.opts.probe_layer <= model.config.n_layers:
            raise CfmError(f"probe_layer must be in 0..{model.config.n_layers}, got {self.opts.probe_layer}")
        if self.opts.cache_budget_mb is not None:
            if not self.opts.cache_budget_mb > 0:
                raise CfmError(f"the prefetch RAM budget must be a positive number of MB, got {self.opts.cache_budget_mb}")
            if self.opts.cache_prompts < 1 or self.opts.cache_tokens < 2:
                raise CfmError("prefetch measurement: at least 1 prompt per function and 2 tokens per prompt")
            if self.opts.cache_selection not in ("oracle", "predictor"):
                raise CfmError(f"prefetch selection must be oracle or predictor, got {self.opts.cache_selection!r}")
        self.out.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------ shared state

    @cached_property
    def instances(self):
        return load_instances(self.model, self.opts.responses, self.opts.max_tokens, self.opts.per_function,
                              self.opts.progress)

    @cached_property
    def encoded(self):
        prefix = template_prefix_len(self.model)
        return [encode(self.model, x, prefix, self.opts.collect.max_len) for x in self.instances]

    def _cache_key(self) -> dict:
        st = self.model.path.stat() if self.model.path.exists() else None
        return {"model": str(self.model.path), "size": st.st_size if st else None,
                "texts": [[x.prompt, x.response] for x in self.instances], "collect": asdict(self.opts.collect)}

    @cached_property
    def collection(self) -> Collection:
        path = self.out / "collection.npz"
        key = self._cache_key()
        if path.is_file():
            c = Collection.load(path)
            if c.meta.get("key") == key:
                return c
        c = collect(self.model, self.instances, self.opts.collect, self.opts.progress)
        c.meta["key"] = key
        c.save(path)
        return c

    @cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.model_selection import train_test_split

        labels = np.array([x.label for x in self.instances])
        idx = np.arange(len(labels))
        n_test = max(int(round(self.opts.test_size * len(idx))), len(FUNCTIONS))  # >= one per function
        train, test = train_test_split(idx, test_size=n_test, stratify=labels, random_state=self.opts.seed)
        return np.sort(train), np.sort(test)

    @cached_property
    def ap(self) -> np.ndarray:
        """Functionality scores [7, L, F] on the training split."""
        train = self.split[0]
        return functionality_scores(self.collection.mean_act[train], self.collection.labels[train], len(FUNCTIONS))

    @cached_property
    def ap_random(self) -> np.ndarray:
        """The same scores against shuffled labels: the chance level."""
        train = self.split[0]
        shuffled = np.random.default_rng(self.opts.seed).permutation(self.collection.labels[train])
        return functionality_scores(self.collection.mean_act[train], shuffled, len(FUNCTIONS))

    @cached_property
    def top(self) -> np.ndarray:
        return top_sets(self.ap, self.opts.top)

    def held_out(self, per_function: int | None) -> dict[str, list]:
        """Held-out encoded texts grouped by function, at most per_function each."""
        groups: dict[str, list] = {f: [] for f in FUNCTIONS}
        for j in self.split[1]:
            g = groups[self.instances[j].function]
            if per_function is None or len(g) < per_function:
                g.append(self.encoded[j])
        return groups

    # ------------------------------------------------------------ analyses

    def sparsity(self) -> Path:
        """Figure 6 (CDF of per-token normalised activations) and Figure 7 (masking the lowest neurons)."""
        c = self.collection
        x = (np.arange(CDF_BINS) + 1) / CDF_BINS
        per_layer = np.cumsum(c.cdf_hist, 1) / c.cdf_hist.sum(1, keepdims=True)
        total = np.cumsum(c.cdf_hist.sum(0)) / c.cdf_hist.sum()
        n_layers = per_layer.shape[0]
        shown = sorted({0, n_layers // 4, n_layers // 2, 3 * n_layers // 4, n_layers - 1})
        curves = {f"layer {i}": per_layer[i] for i in shown} | {"all layers": total}
        figures.cdf(x, curves, self.out / "sparsity_cdf.png", "CDF of per-token normalised |activation|")
        masking_curves = self._masking_curves()
        figures.masking(list(self.opts.mask_levels), {f"by {k}": masking_curves[k]["loss_change"] for k in ("act", "output")},
                        self.out / "sparsity_masking.png", "masking the lowest neurons per token")
        at = {f"{t:g}": float(total[int(t * CDF_BINS) - 1]) for t in (0.05, 0.1, 0.2, 0.5)}
        return _write(self.out, "sparsity.json", {
            "what": "CDF of |act|/max|act| per token and layer over the user text and answer tokens; loss change "
                    "when masking the lowest k% neurons per token on held-out texts",
            "tokens": c.meta.get("tokens"),
            "fraction_below_fraction_of_max": at,
            "fraction_below_0.2_of_max_per_layer": per_layer[:, int(0.2 * CDF_BINS) - 1],
            "neurons_for_90pct_l1_mass_per_layer": c.l1_90,
            "neurons_for_90pct_l1_mass_mean": float(c.l1_90.mean()),
            "masking": masking_curves,
        })

    def _masking_curves(self) -> dict:
        from tqdm import tqdm

        texts = [e for g in self.held_out(self.opts.mask_texts).values() for e in g]
        t = self.model.transformer
        base = mean_nll(t, texts)
        result = {}
        jobs = [(by, lv) for by in ("act", "output") for lv in self.opts.mask_levels]
        nll = {}
        for by, lv in tqdm(jobs, desc="masking", disable=not self.opts.progress):
            with masked(t, lambda i, mlp: MaskedMLP(mlp, drop_lowest=lv, by=by)):
                nll[by, lv] = mean_nll(t, texts)
        for by in ("act", "output"):
            deltas = [nll[by, lv] - base for lv in self.opts.mask_levels]
            result[by] = {"levels": list(self.opts.mask_levels), "loss_change": deltas,
                          "ppl_change_pct": [100 * (np.exp(d) - 1) for d in deltas]}
        result["dense_loss"] = base
        result["texts"] = len(texts)
        return result

    def functions(self) -> Path:
        """Figure 8: per-layer best and top-5% functionality scores against shuffled labels."""
        ap, rnd = self.ap, self.ap_random
        s, r = layer_summary(ap, self.opts.top), layer_summary(rnd, self.opts.top)
        figures.layer_scores(s, r, self.out / "functions_layers.png", "functionality scores per layer")
        train = self.split[0]
        c = self.collection
        check = check_against_sklearn((c.labels[train] == 0).astype(np.int64), c.mean_act[train, 0])
        return _write(self.out, "functions.json", {
            "what": "average precision of each neuron's per-instance mean |act| against each function's 0/1 label "
                    "(training split); random = the same against shuffled labels",
            "functions": list(FUNCTIONS),
            "instances_train": len(train),
            "best_per_layer": s["best"].mean(0), "top5_per_layer": s["top"].mean(0),
            "random_best_per_layer": r["best"].mean(0), "random_top5_per_layer": r["top"].mean(0),
            "best_per_function": dict(zip(FUNCTIONS, ap.reshape(len(FUNCTIONS), -1).max(1))),
            "random_best_per_function": dict(zip(FUNCTIONS, rnd.reshape(len(FUNCTIONS), -1).max(1))),
            "top5_mean_per_function": dict(zip(FUNCTIONS, s["top"].mean(1))),
            "random_top5_mean_per_function": dict(zip(FUNCTIONS, r["top"].mean(1))),
            "neurons_above_random_best": float((ap > rnd.max()).mean()),
            "max_abs_diff_vs_sklearn": check,
        })

    def partition(self) -> Path:
        """Figure 10: similarity of the functions' top-5% neuron sets."""
        sim = partition_similarity(self.top)
        rnd = partition_similarity(top_sets(self.ap_random, self.opts.top))
        names = list(FUNCTIONS)
        figures.heatmap(sim["overlap"], names, names, self.out / "partition.png",
                        f"overlap of top-{100 * self.opts.top:g}% neuron sets (random {self.opts.top:g})", ".2f")
        off = ~np.eye(len(names), dtype=bool)
        return _write(self.out, "partition.json", {
            "what": "overlap |A∩B|/|A| of the top neuron sets (per layer) of two functions; jaccard |A∩B|/|A∪B|",
            "functions": names, "overlap": sim["overlap"], "jaccard": sim["jaccard"],
            "overlap_offdiag_mean": float(sim["overlap"][off].mean()),
            "overlap_offdiag_max": float(sim["overlap"][off].max()),
            "random_expected_overlap": self.opts.top,
            "shuffled_labels_overlap_offdiag_mean": float(rnd["overlap"][off].mean()),
        })

    def perturb(self) -> Path:
        """Figure 9: prune each function's top neurons, perplexity increase on every function's texts."""
        from tqdm import tqdm

        t = self.model.transformer
        groups = self.held_out(self.opts.perturb_texts)
        base = np.array([mean_nll(t, groups[g]) for g in FUNCTIONS])
        rng = np.random.default_rng(self.opts.seed)
        control = np.zeros_like(self.top[0])
        for i in range(control.shape[0]):
            control[i, rng.choice(control.shape[1], int(self.top[0, i].sum()), replace=False)] = True
        sets = list(self.top) + [control]
        nll = np.zeros((len(sets), len(FUNCTIONS)))
        for r, drop in enumerate(tqdm(sets, desc="perturb", disable=not self.opts.progress)):
            keep = torch.from_numpy(~drop)  # [L, F]
            with masked(t, lambda i, mlp: MaskedMLP(mlp, keep=keep[i])):
                nll[r] = [mean_nll(t, groups[g]) for g in FUNCTIONS]
        increase = 100 * (np.exp(nll - base) - 1)  # % perplexity increase
        names = list(FUNCTIONS)
        m = increase[:-1]
        figures.heatmap(m, names, names, self.out / "perturb.png", "perplexity increase (%) after pruning",
                        ".0f", xlabel="evaluated on", ylabel="pruned top neurons of")
        off = ~np.eye(len(names), dtype=bool)
        return _write(self.out, "perturb.json", {
            "what": "perplexity increase (%) on each function's held-out texts (columns) after zeroing the top "
                    "neurons of each function (rows); last row of `with_control`: a random set of equal size",
            "functions": names, "increase_pct": m, "random_control_pct": increase[-1],
            "base_perplexity": dict(zip(names, np.exp(base))),
            "texts_per_function": {g: len(v) for g, v in groups.items()},
            "diagonal_is_column_max": int((m.argmax(0) == np.arange(len(names))).sum()),
            "diagonal_is_row_max": int((m.argmax(1) == np.arange(len(names))).sum()),
            "diagonal_mean_pct": float(np.diag(m).mean()), "offdiag_mean_pct": float(m[off].mean()),
        })

    def prefetch(self) -> Path:
        """Function classifier on an early layer and the simulated hot-cache hit rate with and without it."""
        return _write(self.out, "prefetch.json", evaluate_prefetch(self))

    def prefetch_cache(self) -> Path:
        """The prefetch on the real sparse runtime: cache hit rate and flash bytes with and without it."""
        o = self.opts
        sparse = load_model(self.model.path, LoadOptions(
            threads=self.model.threads, progress=o.progress,
            sparse=SparseOptions(ram_budget_mb=o.cache_budget_mb, strategy="predictor", density=o.cache_density,
                                 pack=o.cache_pack, predictor=o.cache_predictor,
                                 density_plan="uniform")))  # as measured (docs/analysis.md)
        try:
            result = preload.measure(self, sparse, o.cache_prompts, o.cache_tokens, o.cache_cold,
                                     o.cache_selection, rank_texts=o.cache_rank_texts)
        finally:
            sparse.close()
        preload.figure(result, self.out / "prefetch_cache.png")
        return _write(self.out, "prefetch_cache.json", result)

    def run(self, what: str) -> list[Path]:
        real = [self.prefetch_cache] if self.opts.cache_budget_mb is not None else []
        jobs = {"sparsity": [self.sparsity], "functions": [self.functions], "partition": [self.partition],
                "perturb": [self.perturb], "prefetch": [self.prefetch, *real], "prefetch-cache": real,
                "all": [self.sparsity, self.functions, self.partition, self.perturb, self.prefetch, *real]}
        if what == "prefetch-cache" and not real:
            raise CfmError("prefetch-cache measures the real sparse runtime: give it a RAM budget (--ram-budget MB)")
        if what not in jobs:
            raise CfmError(f"unknown analysis {what!r}; choose from {', '.join(jobs)}")
        return [job() for job in jobs[what]]
