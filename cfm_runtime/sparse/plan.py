"""Two allocation problems solved from the pack's profile: per-layer densities and the hot set.

Densities (after TEAL's per-layer allocation): the profile measures, for each layer alone and each
density level, the end-to-end loss increase it causes (mean KL divergence of the model's next-token
distribution from dense, on held-out calibration tokens, predictor selection); the densities with
the least summed increase at the target mean are found exactly (see `densities`).

Hot set: neurons are stored in clusters of equal size, each with its share of its layer's
activation mass (shares sum to 1 per layer). Choosing clusters to maximise covered mass under a
byte budget is a knapsack whose items all weigh the same, so taking the heaviest clusters across
all layers is exactly optimal (PowerInfer's ILP reduces to this when batches are equal-sized).
Within a layer clusters are stored heaviest first, so each layer's hot set is a prefix.
"""

from __future__ import annotations

import numpy as np

from ..errors import CfmError
from ..options import DENSITY_PLANS

# the per-layer plan, measured end to end on held-out text (benchmarks/results/sparse_plan.json): perplexity
# +0.24% vs +1.29% uniform at mean density 0.6, +5.5% vs +5.9% at 0.5 (top-1 agreement 1 point lower)
DEFAULT_PLAN = "planned"


def plan_densities(manifest: dict, density: float, plan: str = DEFAULT_PLAN) -> list[float]:
    """Per-layer densities with mean `density` for a pack's `manifest`: the same for every layer ("uniform"), or
    its per-layer plan ("planned", from the loss increases its profile measured)."""
    if plan not in DENSITY_PLANS:
        raise CfmError(f"density plan {plan!r} is unknown; choose one of {', '.join(DENSITY_PLANS)}")
    n = len(manifest["layers"])
    if density >= 1.0:
        return [1.0] * n
    if plan == "uniform":
        return [density] * n
    d = manifest["density"]
    return densities(d["levels"], np.array(d["loss_increase"]), density)


def densities(levels: list[float], loss_increase: np.ndarray, target: float) -> list[float]:
    """Per-layer densities with mean <= target minimising the summed loss increase [L, len(levels)].

    Each layer takes one of `levels` or 1.0 (no loss). With the loss increases measured one layer
    at a time and assumed additive, this is a multiple-choice knapsack; densities are on a 1% grid,
    so dynamic programming over (layer, density units used) solves it exactly (a greedy by marginal
    loss per unit of density, as in TEAL, is optimal only when each layer's loss curve is convex).
    """
    lv = [float(v) for v in levels] + [1.0]
    cost = np.concatenate((np.maximum(loss_increase, 0.0), np.zeros((loss_increase.shape[0], 1))), axis=1)
    units = [int(round(100 * v)) for v in lv]
    n = cost.shape[0]
    cap = int(np.floor(100 * target * n + 1e-6))
    if cap >= 100 * n:
        return [1.0] * n
    if cap < min(units) * n:
        return [min(lv)] * n
    best = np.full(cap + 1, np.inf)  # best[u]: least loss of the layers so far using exactly u units
    best[0] = 0.0
    choice = np.zeros((n, cap + 1), dtype=np.int64)
    for i in range(n):
        nxt = np.full(cap + 1, np.inf)
        for j, u in enumerate(units):
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + cost[i, j]
            better = cand < nxt
            nxt[better], choice[i, better] = cand[better], j
        best = nxt
    u = int(np.argmin(best))
    out = []
    for i in range(n - 1, -1, -1):
        j = int(choice[i, u])
        out.append(lv[j])
        u -= units[j]
    return out[::-1]


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
