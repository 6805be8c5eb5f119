"""Two allocation problems solved from the pack's profile: per-layer densities and the hot set.

Densities (TEAL-style greedy): the profile measures, for each layer, the relative error of its FFN
output on held-out calibration tokens at each density level (predictor selection); starting from
all layers dense, the step with the smallest error increase per unit of density removed is taken
until the mean density reaches the target.

Hot set: neurons are stored in clusters of equal size, each with its share of its layer's
activation mass (shares sum to 1 per layer). Choosing clusters to maximise covered mass under a
byte budget is a knapsack whose items all weigh the same, so taking the heaviest clusters across
all layers is exactly optimal (PowerInfer's ILP reduces to this when batches are equal-sized).
Within a layer clusters are stored heaviest first, so each layer's hot set is a prefix.
"""

from __future__ import annotations

import numpy as np


def densities(levels: list[float], loss_increase: np.ndarray, target: float) -> list[float]:
    """Per-layer densities with mean <= target; error [L, len(levels)] at each level (levels ascending)."""
    lv = list(levels) + [1.0]
    inc = np.concatenate((np.maximum(loss_increase, 0.0), np.zeros((loss_increase.shape[0], 1))), axis=1)
    at = np.full(inc.shape[0], len(lv) - 1)  # index into lv per layer: start dense
    while np.mean([lv[a] for a in at]) > target + 1e-9:
        cost = np.full(len(at), np.inf)
        for i, a in enumerate(at):
            if a > 0:
                cost[i] = (inc[i, a - 1] - inc[i, a]) / (lv[a] - lv[a - 1])
        if not np.isfinite(cost).any():
            break
        at[int(np.argmin(cost))] -= 1
    return [lv[a] for a in at]


def hot_counts(cluster_mass: list[np.ndarray], cluster: int, budget_clusters: int) -> list[int]:
    """Per-layer hot neuron counts: the `budget_clusters` heaviest clusters over all layers."""
    flat = np.concatenate(cluster_mass)
    owner = np.concatenate([np.full(len(m), i) for i, m in enumerate(cluster_mass)])
    take = np.argsort(-flat, kind="stable")[:max(0, budget_clusters)]
    counts = np.bincount(owner[take], minlength=len(cluster_mass)) * cluster
    return [min(int(c), len(m) * cluster) for c, m in zip(counts, cluster_mass)]


def covered_mass(cluster_mass: list[np.ndarray], counts: list[int], cluster: int) -> float:
    """Mean over layers of the activation mass share the hot set covers."""
    return float(np.mean([m[: c // cluster].sum() / max(m.sum(), 1e-12) for m, c in zip(cluster_mass, counts)]))
