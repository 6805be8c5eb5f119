"""Functionality scores (average precision of a neuron's activations against a function's labels),
top-neuron sets and the similarity of those sets between functions."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import average_precision_score


def average_precision_columns(y: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Average precision of every column of scores [N, M] against 0/1 labels y [N] or [N, K]
    -> [M] or [K, M].

    Same definition as sklearn's `average_precision_score` (sum over thresholds of recall step x
    precision, ties grouped), vectorised over columns and sharing one sort across label sets:
    sklearn scores one column per call at ~3 ms, and a 135M model has 7 x 30 x 1536 of them (x2 with
    the random baseline). `check_against_sklearn` verifies it on sampled columns in every run.
    """
    labels = y[:, None] if y.ndim == 1 else y
    n = scores.shape[0]
    order = np.argsort(-scores, axis=0, kind="stable")
    s = np.take_along_axis(scores, order, 0)
    idx = np.arange(n)[:, None]
    is_last = np.ones(s.shape, dtype=bool)
    is_last[:-1] = s[:-1] != s[1:]
    # end of each tie group: the first group-ending index at or after i
    ends = np.minimum.accumulate(np.where(is_last, idx, n)[::-1], axis=0)[::-1]
    out = []
    for k in range(labels.shape[1]):
        pos = labels[:, k][order]  # [N, M] labels in score order
        tp = np.cumsum(pos, axis=0, dtype=np.int32)
        prec_at_end = np.take_along_axis(tp, ends, 0) / (ends + 1).astype(np.float32)
        out.append((pos * prec_at_end).sum(0) / max(int(labels[:, k].sum()), 1))
    ap = np.stack(out)
    return ap[0] if y.ndim == 1 else ap


def check_against_sklearn(y: np.ndarray, scores: np.ndarray, n_cols: int = 200, seed: int = 0) -> float:
    """Largest |difference| to sklearn's average_precision_score over sampled columns."""
    cols = np.random.default_rng(seed).choice(scores.shape[1], min(n_cols, scores.shape[1]), replace=False)
    ours = average_precision_columns(y, scores[:, cols])
    ref = np.array([average_precision_score(y, scores[:, c]) for c in cols])
    return float(np.abs(ours - ref).max())


def functionality_scores(mean_act: np.ndarray, labels: np.ndarray, n_functions: int) -> np.ndarray:
    """mean_act [N, L, F], labels [N] -> AP [n_functions, L, F]."""
    n, n_layers, d_ff = mean_act.shape
    onehot = (labels[:, None] == np.arange(n_functions)[None, :]).astype(np.int32)  # [N, n_functions]
    out = np.empty((n_functions, n_layers, d_ff), np.float32)
    for i in range(n_layers):  # one layer at a time bounds the [N, F] temporaries
        out[:, i] = average_precision_columns(onehot, mean_act[:, i])
    return out


def layer_summary(ap: np.ndarray, top: float = 0.05) -> dict:
    """Per layer: best score and the score at the top-`top` boundary (its (1-top) quantile), per function."""
    return {"best": ap.max(-1), "top": np.quantile(ap, 1.0 - top, axis=-1)}  # each [n_functions, L]


def top_sets(ap: np.ndarray, top: float = 0.05) -> np.ndarray:
    """Each function's top-`top` neurons by score within every layer: bool [n_functions, L, F]."""
    k = max(1, int(round(top * ap.shape[-1])))
    idx = np.argsort(-ap, axis=-1)[..., :k]
    mask = np.zeros(ap.shape, dtype=bool)
    np.put_along_axis(mask, idx, True, axis=-1)
    return mask


def partition_similarity(sets: np.ndarray) -> dict[str, np.ndarray]:
    """Overlap of functions' top sets [n_functions, L, F]: |A∩B|/|A| (equal sizes; random = top
    fraction) and Jaccard |A∩B|/|A∪B|, each [n_functions, n_functions]."""
    flat = sets.reshape(sets.shape[0], -1).astype(np.float64)
    inter = flat @ flat.T
    size = flat.sum(1)
    union = size[:, None] + size[None, :] - inter
    return {"overlap": inter / size[:, None], "jaccard": inter / np.maximum(union, 1)}
