"""Function-aware prefetch: predict a prompt's function from an early layer, preload its neurons.

The classifier is a logistic regression on the mean hidden state of the first user tokens after
`probe_layer` layers (layers the edge runs anyway). Its prediction picks a hot set per layer for
the sparse FFN; `hit_rates` measures, on held-out prompts, the fraction of active (token, neuron)
pairs of the answer (decode) tokens that such a set covers, against a static set of equal size.
"""

from __future__ import annotations

import numpy as np
import torch

from ..sparse.bundle import BundleCodec
from . import figures
from .collect import template_prefix_len
from .prompts import FUNCTIONS


def train_classifier(features: np.ndarray, labels: np.ndarray, seed: int = 0):
    """features [N, D] (hidden states; massive activations, hence the scaler) -> fitted sklearn pipeline."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000, random_state=seed))
    return clf.fit(features, labels)


def probe_features(model, prompts: list[str], layer: int, n_tokens: int = 16) -> np.ndarray:
    """Mean hidden state after `layer` layers over each prompt's first n_tokens user tokens: [N, D].
    Runs only layers [0, layer): what the edge computes before it knows the answer."""
    t, prefix = model.transformer, template_prefix_len(model)
    out = np.zeros((len(prompts), model.config.d_model), np.float32)
    for j, p in enumerate(prompts):
        ids = model.encode_prompt([{"role": "user", "content": p}])
        cache = t.new_cache(0, max(layer, 1), max_len=len(ids))
        with torch.inference_mode():
            h = t.forward_span(t.embed(torch.tensor([ids])), 0, layer, [cache])[0]
        out[j] = h[prefix:prefix + n_tokens].mean(0).numpy()
    return out


def hot_sets(freq: np.ndarray, fixed: np.ndarray | None, size: int) -> np.ndarray:
    """Per layer the `size` neurons to keep hot: `fixed` [L, F] bool first (by frequency if it holds
    more than size), then the most frequently active others. freq [L, F] -> bool [L, F]."""
    order_key = freq + (2.0 * freq.max() + 1.0) * (fixed if fixed is not None else 0)
    idx = np.argsort(-order_key, axis=-1)[:, :size]
    mask = np.zeros(freq.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def hit_rate(counts: np.ndarray, hot: np.ndarray) -> float:
    """Fraction of active (token, neuron) pairs counts [L, F] that fall in hot [L, F]."""
    return float((counts * hot).sum() / max(counts.sum(), 1))


def evaluate_prefetch(an) -> dict:
    """Classifier accuracy per probe layer and simulated hit rates per function and hot-set size."""
    c, (train, test) = an.collection, an.split
    labels = c.labels
    accuracy = {}
    for layer in sorted({0, 1, 2, an.opts.probe_layer, 4, 6, 8, c.probe.shape[1] - 1}):
        clf = train_classifier(c.probe[train, layer], labels[train], an.opts.seed)
        accuracy[layer] = float((clf.predict(c.probe[test, layer]) == labels[test]).mean())
    clf = train_classifier(c.probe[train, an.opts.probe_layer], labels[train], an.opts.seed)
    pred = clf.predict(c.probe[test, an.opts.probe_layer])

    counts = c.active_counts.astype(np.float64)
    tokens = c.answer_tokens.astype(np.float64)
    freq_all = counts[train].sum(0) / max(tokens[train].sum(), 1)  # [L, F]
    freq_fn = np.stack([counts[train][labels[train] == f].sum(0) for f in range(len(FUNCTIONS))])
    d_ff, d_model = counts.shape[-1], c.probe.shape[-1]
    bytes_per_neuron = BundleCodec(d_model).nbytes  # a pack's bundle: gate and up rows Q4_1, down column Q8_0
    result = {"sizes": {}}
    for frac in an.opts.hot_fractions:
        size = max(1, int(round(frac * d_ff)))
        static = hot_sets(freq_all, None, size)
        by_ap = [hot_sets(freq_all, an.top[f], size) for f in range(len(FUNCTIONS))]
        by_freq = [hot_sets(freq_fn[f], None, size) for f in range(len(FUNCTIONS))]
        rows = {name: [] for name in ("static", "function_top_ap", "function_freq", "function_freq_oracle")}
        for j, p in zip(test, pred):
            rows["static"].append(hit_rate(counts[j], static))
            rows["function_top_ap"].append(hit_rate(counts[j], by_ap[p]))
            rows["function_freq"].append(hit_rate(counts[j], by_freq[p]))
            rows["function_freq_oracle"].append(hit_rate(counts[j], by_freq[labels[j]]))
        result["sizes"][f"{frac:g}"] = _per_function(rows, labels[test], counts[test], tokens[test], bytes_per_neuron)
    main = f"{0.2 if 0.2 in an.opts.hot_fractions else an.opts.hot_fractions[0]:g}"
    per_fn = result["sizes"][main]["per_function"]
    figures.bars(list(FUNCTIONS), {k: [per_fn[f][k] for f in FUNCTIONS] for k in next(iter(per_fn.values()))
                                   if not k.startswith("flash")},
                 an.out / "prefetch.png", f"simulated hot-cache hit rate, hot set {float(main):.0%} per layer",
                 "hit rate")
    return {
        "what": "SIMULATED (no flash reads): a neuron is active on a decode token if it is in that token's top "
                f"{an.opts.collect.active_fraction:.0%} by |act|; hit rate = active pairs inside the hot set; "
                "flash bytes/token = misses per token x one neuron bundle (Q4_1 gate/up rows, Q8_0 down column), "
                "no reuse between tokens",
        "classifier": {"probe_layer": an.opts.probe_layer, "probe_tokens": an.opts.collect.probe_tokens,
                       "held_out_accuracy_per_layer": accuracy, "chance": 1 / len(FUNCTIONS),
                       "held_out": len(test), "confusion": _confusion(labels[test], pred)},
        "bytes_per_neuron": bytes_per_neuron,
        **result,
    }


def _per_function(rows: dict, labels: np.ndarray, counts: np.ndarray, tokens: np.ndarray, bpn: int) -> dict:
    out = {"mean": {k: float(np.mean(v)) for k, v in rows.items()}, "per_function": {}}
    active_per_token = counts.sum((1, 2)) / np.maximum(tokens, 1)  # [n] active pairs per decode token
    for f, name in enumerate(FUNCTIONS):
        sel = labels == f
        d = {k: float(np.mean(np.array(v)[sel])) for k, v in rows.items()}
        for k in ("static", "function_freq"):
            miss = (1 - np.array(rows[k])[sel]) * active_per_token[sel]
            d[f"flash_mb_per_token_{k}"] = float(miss.mean() * bpn / 2**20)
        out["per_function"][name] = d
    return out


def _confusion(true: np.ndarray, pred: np.ndarray) -> list[list[int]]:
    m = np.zeros((len(FUNCTIONS), len(FUNCTIONS)), np.int64)
    np.add.at(m, (true, pred), 1)
    return m.tolist()
