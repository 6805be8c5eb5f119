"""Per-layer low-rank activation predictors: FFN input x [.., D] -> neuron scores [.., F].

Trained on the profiled activations to regress log(1 + a / mean_token(a)): a ranking target that
does not depend on the density chosen later, so one predictor serves every density.
"""

from __future__ import annotations

import torch
from torch import nn

from .stats import topk_mask


class LowRankPredictor(nn.Module):
    """scores = B relu(A x): D -> rank -> F (PowerInfer's predictor shape, without the output sigmoid)."""

    def __init__(self, d_model: int, d_ff: int, rank: int):
        super().__init__()
        self.down = nn.Linear(d_model, rank, bias=True)
        self.up = nn.Linear(rank, d_ff, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x)))


def targets(a: torch.Tensor) -> torch.Tensor:
    a = a.float()
    return torch.log1p(a / a.mean(-1, keepdim=True).clamp_min(1e-12))


def train(x: torch.Tensor, a: torch.Tensor, rank: int = 96, steps: int = 300, batch: int = 512,
          lr: float = 3e-3, seed: int = 0) -> LowRankPredictor:
    """Fit one layer's predictor on inputs x [N, D] and activations a [N, F] (a few seconds on a CPU)."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = x.float(), targets(a)
    # inputs carry a few huge channels (massive activations): standardise them inside the first layer
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-3)
    net = LowRankPredictor(x.shape[1], a.shape[1], rank)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    xs = (x - mu) / sd
    with torch.enable_grad():
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(batch, x.shape[0]),), generator=g)
            loss = nn.functional.mse_loss(net(xs[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return fold_standardisation(net, mu, sd).requires_grad_(False).eval()


def fold_standardisation(net: LowRankPredictor, mu: torch.Tensor, sd: torch.Tensor) -> LowRankPredictor:
    """A((x - mu) / sd) + b == (A / sd) x + (b - A mu / sd): the runtime feeds raw x."""
    with torch.no_grad():
        w = net.down.weight / sd
        net.down.bias -= w @ mu
        net.down.weight.copy_(w)
    return net


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
