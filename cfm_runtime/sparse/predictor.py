"""Per-layer low-rank activation predictors: FFN input x [.., D] -> neuron scores [.., F].

A neuron's activation is |act(g) * u| with g = W_gate x and u = W_up x: a signed product of two
linear functions of x, which no linear map of x can rank. So the predictor reconstructs the two
*linear* pre-activations at low rank and applies the FFN's own nonlinearity:

    z = P x              (P: rank x D, one projection shared by gate and up)
    g^ = A_g z, u^ = A_u z
    score = |act(g^) * u^|

The fit is closed form (no training): with the calibration second moment S = E[x x^T] and a
per-output weight w, the best rank-r approximation of [W_gate; W_up] x in the w-weighted mean
square over calibration inputs is the projection onto the top-r left singular vectors U_r of
diag(w) [W_gate; W_up] S^(1/2) (Eckart-Young on the reconstruction error), i.e.
P = U_r^T diag(w) W and A = diag(w)^-1 U_r. The weight puts both errors in activation units
(first order): a neuron's gate error is weighted by RMS(act'(g) u), how much its activation moves
per unit of gate, and its up error by RMS(act(g)). Cost per token: rank * (D + 2F) multiply-adds.
"""

from __future__ import annotations

import ctypes

import numpy as np
import torch
from torch import nn

from ..kernels import native
from ..kernels.packing import Packed, pack
from ..kernels.quant import QuantizedLinear
from ..model import ACTIVATIONS as ACTS
from .stats import topk_mask

DEFAULT_RANK = 96


class GateUpPredictor(nn.Module):
    """A predictor that estimates a layer's gate and up pre-activations (`pre`: g, u [.., F]); its scores are
    |act(g) * u| (`forward`), and a sparse FFN adds bricks' gate/up terms to g and u first (`SparseFFN.scores`)."""

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u = self.pre(x)
        return (self.act(g) * u).abs()


class LowRankPredictor(GateUpPredictor):
    """scores = |act(A_g P x) * (A_u P x)|; rank * (D + 2F) multiply-adds per token."""

    def __init__(self, d_model: int, d_ff: int, rank: int, activation: str = "silu"):
        super().__init__()
        self.proj = nn.Linear(d_model, rank, bias=False)
        self.gate = nn.Linear(rank, d_ff, bias=False)
        self.up = nn.Linear(rank, d_ff, bias=False)
        self.activation = activation
        self.act = ACTS[activation]

    @property
    def rank(self) -> int:
        return self.proj.weight.shape[0]

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated pre-activations (g^, u^) [.., F]."""
        z = self.proj(x)
        return self.gate(z), self.up(z)

    def permuted(self, order: torch.Tensor) -> "LowRankPredictor":
        """The same predictor with outputs in another neuron order (new[p] = old[order[p]])."""
        net = LowRankPredictor(self.proj.in_features, self.gate.out_features, self.rank, self.activation)
        net.proj.weight.copy_(self.proj.weight)
        net.gate.weight.copy_(self.gate.weight[order])
        net.up.weight.copy_(self.up.weight[order])
        return net.requires_grad_(False).eval()


class QuantPredictor(GateUpPredictor):
    """scores = |act(g~) * u~| with [g~; u~] = Q4(W_gate; W_up) x: a 4-bit block copy, onnxruntime MatMulNBits.

    Full rank: 2 F D multiply-adds in the int4 kernel, 0.75 bytes per weight (4-bit codes, fp32 scale
    and min per block of 32). Re-packing a Q4_1 model's gate and up is exact, so on such a model this
    predictor selects what the oracle selects (up to the kernel's int8 activation rounding).
    """

    def __init__(self, packed, activation: str = "silu"):
        super().__init__()
        self.packed, self.activation, self.act = packed, activation, ACTS[activation]
        self.linear = QuantizedLinear(packed)
        self.d_ff = packed.n // 2

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated pre-activations (g~, u~) [.., F]."""
        y = self.linear(x)
        return y[..., : self.d_ff], y[..., self.d_ff:]

    @classmethod
    def fit(cls, mlp, activation: str = "silu") -> "QuantPredictor":
        w = torch.cat((mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach())).float()
        return cls(pack(w, 4, 32, "min"), activation)

    def state(self) -> dict[str, torch.Tensor]:
        p = self.packed
        return {"codes": torch.from_numpy(p.codes), "scales": torch.from_numpy(p.scales),
                "zero_points": torch.from_numpy(p.zero_points), "mins": torch.from_numpy(p.mins)}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor], d_model: int, activation: str,
                   order: torch.Tensor | None = None) -> "QuantPredictor":
        """From stored arrays (rows in model order); `order` permutes neurons into pack order."""
        codes, scales = state["codes"].numpy(), state["scales"].numpy()
        zps, mins = state["zero_points"].numpy(), state["mins"].numpy()
        n = codes.shape[0]
        if order is not None:
            f = n // 2
            idx = torch.cat((order, order + f)).numpy()
            codes = codes[idx]
            scales = scales.reshape(n, -1)[idx].reshape(-1)
            zps = zps.reshape(n, -1)[idx].reshape(-1)
            mins = mins[:, idx]
        packed = Packed(4, 32, n, d_model, np.ascontiguousarray(codes), np.ascontiguousarray(scales),
                        np.ascontiguousarray(zps), np.ascontiguousarray(mins))
        return cls(packed, activation)


class NativePredictor(GateUpPredictor):
    """The int4 predictor in the native kernel: scores = |act(g~) * u~| with [g~; u~] the layer's own Q4_1 gate and
    up rows (a pack's bundles hold them as the file stores them) times x, int8 activations, as the kernel computes
    a layer's linears. Its weights are those rows alone, 2 F D / 32 * 20 bytes (1.06 MB a layer here): no
    onnxruntime session, whose prepacking, arena and thread pool took 6 MB a layer beside them."""

    def __init__(self, gate: np.ndarray, up: np.ndarray, activation: str = "silu", threads: int = 2):
        super().__init__()
        self.gate, self.up = np.ascontiguousarray(gate, dtype=np.uint8), np.ascontiguousarray(up, dtype=np.uint8)
        self.activation, self.act, self.threads = activation, ACTS[activation], threads
        self.d_ff, self.d_model = gate.shape[0], gate.shape[1] // 20 * 32

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes

    def pre(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The estimated pre-activations (g~, u~) [.., F]."""
        rows = np.ascontiguousarray(x.detach().reshape(-1, self.d_model).float().numpy())
        y = np.empty((len(rows), 2 * self.d_ff), dtype=np.float32)
        parts = (ctypes.c_void_p * 2)(self.gate.ctypes.data, self.up.ctypes.data)
        counts = (ctypes.c_int * 2)(self.d_ff, self.d_ff)
        if native.load().cfm_q41_matmul(2, parts, counts, self.d_model, len(rows), rows.ctypes.data, y.ctypes.data,
                                        self.threads) != 0:
            raise RuntimeError("the native kernel was built without its instructions")
        y = torch.from_numpy(y).reshape(*x.shape[:-1], 2 * self.d_ff)
        return y[..., : self.d_ff], y[..., self.d_ff:]


def predictor_bytes(net: nn.Module) -> int:
    if isinstance(net, QuantPredictor):
        return net.packed.nbytes
    if isinstance(net, NativePredictor):
        return net.nbytes
    return sum(p.numel() * p.element_size() for p in net.parameters())


def act_grad(activation: str, g: torch.Tensor) -> torch.Tensor:
    if activation == "relu":
        return (g > 0).float()
    s = torch.sigmoid(g)
    return s * (1 + g * (1 - s))


@torch.no_grad()
def train(x: torch.Tensor, mlp, rank: int = DEFAULT_RANK, activation: str = "silu", ridge: float = 1e-4,
          weighting: bool = True) -> LowRankPredictor:
    """Fit one layer's predictor on calibration FFN inputs x [N, D] and the layer's dense `mlp`."""
    x = x.float()
    wg, wu = mlp.gate_proj.weight.detach().float(), mlp.up_proj.weight.detach().float()  # [F, D]
    f, d = wg.shape
    rank = min(rank, d)
    s = x.T @ x / x.shape[0]
    s += ridge * s.diagonal().mean() * torch.eye(d)
    chol = torch.linalg.cholesky(s)  # S = L L^T: (W L)(W L)^T = W S W^T
    act = ACTS[activation]
    if weighting:
        g, u = x @ wg.T, x @ wu.T
        w_g = (act_grad(activation, g) * u).pow(2).mean(0).sqrt()
        w_u = act(g).pow(2).mean(0).sqrt()
        w = torch.cat((w_g, w_u)).clamp_min(1e-6)
    else:
        w = torch.ones(2 * f)
    ww = w[:, None] * torch.cat((wg, wu))  # [2F, D]
    m = (ww @ chol).double()  # [2F, D]: its top-r left singular vectors, via the small [D, D] Gram matrix
    evals, evecs = torch.linalg.eigh(m.T @ m)
    top = evals.argsort(descending=True)[:rank]
    u_r = (m @ evecs[:, top] / evals[top].clamp_min(1e-30).sqrt()).float()  # [2F, r]
    net = LowRankPredictor(d, f, rank, activation)
    net.proj.weight.copy_(u_r.T @ ww)
    a = u_r / w[:, None]
    net.gate.weight.copy_(a[:f])
    net.up.weight.copy_(a[f:])
    return net.requires_grad_(False).eval()


def cost(net: nn.Module, d_model: int, d_ff: int) -> dict:
    """Predictor multiply-adds and bytes per token, and their shares of the dense FFN (fp16 bundles)."""
    if isinstance(net, QuantPredictor):
        macs, kind, rank = 2 * d_model * d_ff, "int4", None
    else:
        macs, kind, rank = net.rank * (d_model + 2 * d_ff), "lowrank", net.rank
    ffn = 3 * d_model * d_ff
    nbytes = predictor_bytes(net)
    return {"kind": kind, "rank": rank, "macs": macs, "bytes": nbytes, "macs_share_of_ffn": round(macs / ffn, 4),
            "bytes_share_of_fp16_ffn": round(nbytes / (2 * ffn), 4)}


@torch.inference_mode()
def recall(net: nn.Module, x: torch.Tensor, a: torch.Tensor, density: float) -> dict:
    """How much of the oracle top-k the predictor's top-k recovers: neuron overlap and activation mass."""
    true = topk_mask(a, density)
    pred = topk_mask(net(x.float()), density)
    a = a.float()
    return {
        "recall": round(float((true & pred).sum() / true.sum()), 4),
        "mass_recall": round(float((a * pred).sum() / (a * true).sum()), 4),
    }
