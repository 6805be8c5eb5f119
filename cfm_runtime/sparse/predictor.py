"""Per-layer low-rank activation predictors: FFN input x [.., D] -> neuron scores [.., F].

Fitted to log(1 + a / mean_token(a)), a ranking target that does not depend on the density chosen
later, so one predictor serves every density. The fit is reduced-rank ridge regression, in closed
form: ridge least squares, then projection of the fitted scores onto their top `rank` principal
directions. It costs well under a second per layer (SGD training of the same shape took ~15 s per
layer on the shared 2-core machine), which keeps `cfm profile` and the first run short.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import topk_mask


class LowRankPredictor(nn.Module):
    """scores = up(down(x)): D -> rank -> F, (D + F) * rank multiply-adds per token."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=True)
        self.up = nn.Linear(rank, d_ff, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


def targets(a: torch.Tensor) -> torch.Tensor:
    a = a.float()
    return torch.log1p(a / a.mean(-1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def train(x: torch.Tensor, a: torch.Tensor, rank: int = 64, ridge: float = 1e-2, seed: int = 0) -> LowRankPredictor:
    """Fit one layer's predictor on inputs x [N, D] and activations a [N, F]."""
    torch.manual_seed(seed)
    x, y = x.float(), targets(a)
    mu, ym = x.mean(0), y.mean(0)
    xc, yc = x - mu, y - ym
    g = xc.T @ xc
    g += ridge * g.diagonal().mean() * torch.eye(g.shape[0], dtype=g.dtype)
    w = torch.linalg.solve(g, xc.T @ yc)  # [D, F] full-rank ridge solution
    rank = min(rank, *w.shape)
    _, _, v = torch.svd_lowrank(xc @ w, q=min(rank + 8, *w.shape), niter=2)
    v = v[:, :rank]  # [F, r] principal directions of the fitted scores
    net = LowRankPredictor(x.shape[1], y.shape[1], rank)
    down = w @ v  # [D, r]
    net.down.weight.copy_(down.T)
    net.down.bias.copy_(-(mu @ down))
    net.up.weight.copy_(v)
    net.up.bias.copy_(ym)
    return net.requires_grad_(False).eval()


@torch.inference_mode()
def recall(net: LowRankPredictor, x: torch.Tensor, a: torch.Tensor, density: float) -> dict:
    """How much of the oracle top-k the predictor's top-k recovers: neuron overlap and activation mass."""
    true = topk_mask(a, density)
    pred = topk_mask(net(x.float()), density)
    a = a.float()
    return {
        "recall": float((true & pred).sum() / true.sum()),
        "mass_recall": float((a * pred).sum() / (a * true).sum()),
    }
