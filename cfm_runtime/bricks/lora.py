"""LoRA bricks wrap base linear layers: y = base(x) + sum_k w_k * s_k * B_k (A_k x).

The base module is only ever called (`base(x)`), so it may be any linear-like module
(fp32 nn.Linear, a quantized matmul, ...). Several bricks sit on one wrapper at once, each with
its own weight; bricks are attached and detached per request without touching the base weights.
`fuse_bricks` folds the active bricks into the weights, only when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CfmError

from .config import TARGET_KINDS  # noqa: F401 (re-exported: callers name it from here)


@dataclass
class LoraPair:
    """One module's low-rank update: delta W = scale * b @ a."""

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    def delta(self) -> torch.Tensor:
        """The dense update [out, in]."""
        return self.scale * (self.b @ self.a)


class LoRALinear(nn.Module):
    """A base linear layer plus any number of named low-rank adapters with weights."""

    def __init__(self, base: nn.Module, in_features: int, out_features: int):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = in_features, out_features
        self.adapters: dict[str, LoraPair] = {}
        self.weights: dict[str, float] = {}

    @classmethod
    def from_base(cls, base: nn.Module) -> "LoRALinear":
        return cls(base, base.in_features, base.out_features)

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # the base's own names: bricks are not part of the model's weights (nor its fingerprint)
        return self.base.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)

    def add(self, name: str, pair: LoraPair, weight: float = 1.0) -> None:
        if pair.a.shape[1] != self.in_features or pair.b.shape[0] != self.out_features:
            raise CfmError(f"brick {name!r}: LoRA pair {tuple(pair.b.shape)} x {tuple(pair.a.shape)} does not fit "
                           f"a {self.out_features}x{self.in_features} layer")
        self.adapters[name], self.weights[name] = pair, weight

    def remove(self, name: str) -> None:
        self.adapters.pop(name, None)
        self.weights.pop(name, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        for name, p in self.adapters.items():
            w = self.weights[name] * p.scale
            if w:
                y = y + w * F.linear(F.linear(x, p.a), p.b)  # x [.., in] -> [.., r] -> [.., out]
        return y

    def fused_delta(self) -> torch.Tensor | None:
        deltas = [self.weights[n] * p.delta() for n, p in self.adapters.items() if self.weights[n]]
        return torch.stack(deltas).sum(0) if deltas else None


@runtime_checkable
class AdapterHost(Protocol):
    """A module that computes some linears itself (a sparse FFN) and applies bricks on them: `attach` hands it
    the pairs of those linears instead of wrapping them."""

    linear_names: tuple[str, ...]

    def add_adapter(self, linear: str, name: str, pair: LoraPair, weight: float) -> None: ...

    def remove_adapter(self, name: str) -> None: ...

    def set_adapter_weight(self, name: str, weight: float) -> None: ...

    def adapter_weights(self) -> dict[str, float]: ...


def _parent_and_attr(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent, _, attr = name.rpartition(".")
    return root.get_submodule(parent), attr


def attach(transformer: nn.Module, name: str, pairs: dict[str, LoraPair], weight: float = 1.0) -> None:
    """Add brick `name` (pairs by module name, in the model's own row layout) to the transformer: each linear is
    wrapped in a `LoRALinear`, or handed to the module that computes it (an `AdapterHost`, e.g. a sparse FFN).

    Every target is checked first, so a refused brick leaves the transformer as it was."""
    missing = sorted(m for m in pairs if _host(transformer, m) is None and not _linear_like(transformer, m))
    if missing:
        raise CfmError(f"brick {name!r} targets {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}, "
                       "which this model does not have as linears; it was made for another layout")
    for module_name, pair in pairs.items():
        parent, attr = _parent_and_attr(transformer, module_name)
        host = _host(transformer, module_name)
        if host is not None:
            host.add_adapter(attr, name, pair, weight)
            continue
        mod = getattr(parent, attr)
        if not isinstance(mod, LoRALinear):
            mod = LoRALinear.from_base(mod)
            setattr(parent, attr, mod)
        mod.add(name, pair, weight)


def _host(transformer: nn.Module, module_name: str) -> AdapterHost | None:
    parent, _, attr = module_name.rpartition(".")
    try:
        module = transformer.get_submodule(parent)
    except AttributeError:
        return None
    return module if isinstance(module, AdapterHost) and attr in module.linear_names else None


def _linear_like(transformer: nn.Module, module_name: str) -> bool:
    parent, _, attr = module_name.rpartition(".")
    try:
        return isinstance(getattr(transformer.get_submodule(parent), attr, None), nn.Module)
    except AttributeError:
        return False


def detach(transformer: nn.Module, name: str) -> None:
    """Remove brick `name`; wrappers left without bricks give their base module back."""
    for module_name, mod in list(transformer.named_modules()):
        if isinstance(mod, AdapterHost):
            mod.remove_adapter(name)
        if isinstance(mod, LoRALinear):
            mod.remove(name)
            if not mod.adapters:
                parent, attr = _parent_and_attr(transformer, module_name)
                setattr(parent, attr, mod.base)


def set_weight(transformer: nn.Module, name: str, weight: float) -> None:
    """Change a brick's weight everywhere (0 switches it off without detaching it)."""
    for mod in transformer.modules():
        if isinstance(mod, LoRALinear) and name in mod.weights:
            mod.weights[name] = weight
        if isinstance(mod, AdapterHost):
            mod.set_adapter_weight(name, weight)


def attached(transformer: nn.Module) -> dict[str, float]:
    """Brick name -> weight for every brick on the transformer."""
    out: dict[str, float] = {}
    for mod in transformer.modules():
        if isinstance(mod, LoRALinear):
            out.update(mod.weights)
        if isinstance(mod, AdapterHost):
            out.update(mod.adapter_weights())
    return out


def brick_layers(transformer: nn.Module) -> set[int]:
    """Indices of the layers any attached brick touches (these layers must run on the edge)."""
    layers = set()
    for name, mod in transformer.named_modules():
        has = (isinstance(mod, LoRALinear) and mod.adapters) or (isinstance(mod, AdapterHost) and mod.adapter_weights())
        if has and name.startswith("layers."):
            layers.add(int(name.split(".")[1]))
    return layers


def random_pairs(transformer: nn.Module, layers, kinds=TARGET_KINDS, rank: int = 8, std: float = 0.05,
                 scale: float = 2.0, seed: int = 0) -> dict[str, LoraPair]:
    """Gaussian low-rank updates (a and b of standard deviation `std`) on the `kinds` of linears of `layers`,
    reproducible from `seed`: a stand-in personal brick for tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in layers:
        for kind in kinds:
            lin = transformer.get_submodule(f"layers.{i}.{kind}")
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.randn(rank, lin.in_features, generator=g) * std,
                                                   torch.randn(lin.out_features, rank, generator=g) * std, scale)
    return pairs


def fuse_bricks(transformer: nn.Module) -> list[str]:
    """Fold every active brick into the base nn.Linear weights and unwrap; returns the fused brick names."""
    names = sorted(n for n, w in attached(transformer).items() if w)
    hosts = [n for n, m in transformer.named_modules() if isinstance(m, AdapterHost) and m.adapter_weights()]
    if hosts:
        raise CfmError(f"cannot fuse bricks into {hosts[0]}: it is a sparse or offloaded FFN whose weights live in "
                       "its neuron pack; fuse on the dense model")
    for module_name, mod in list(transformer.named_modules()):
        if not isinstance(mod, LoRALinear):
            continue
        if not isinstance(mod.base, nn.Linear):
            raise CfmError(f"{module_name}: cannot fuse into a {type(mod.base).__name__}; fuse needs plain weights")
        delta = mod.fused_delta()
        if delta is not None:
            mod.base.weight = nn.Parameter(mod.base.weight + delta.to(mod.base.weight.dtype), requires_grad=False)
        parent, attr = _parent_and_attr(transformer, module_name)
        setattr(parent, attr, mod.base)
    return names
