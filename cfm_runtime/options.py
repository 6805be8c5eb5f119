"""What a run is made of: load options (the model and its execution backend) and run options (the generator).

The CLI, `cfm serve` and the Python API all fill these and hand them to `cfm_runtime.runtime`, which
validates them here, in one place: a bad value or a combination that does not work is one `CfmError`
saying what to change.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

from .errors import BrickError, CfmError

WEIGHT_FORMATS = ("fp32", "int8", "int4")
HEAD_FORMATS = ("fp32", "int8")
SPARSE_STRATEGIES = ("dense", "oracle", "predictor")
PREDICTORS = ("int4", "lowrank")
DENSITY_PLANS = ("planned", "uniform")
WIRE_DTYPES = ("fp32", "fp16", "bf16")
SPECULATE_MODES = ("off", "lookup", "edge", "auto")  # cfm_runtime.speculative
DEFAULT_DENSITY = 0.6


def parse_spec(spec: str) -> tuple[str, float]:
    """A brick spec 'name:0.5' -> ('name', 0.5); a bare name has weight 1."""
    name, sep, w = spec.rpartition(":")
    if not sep:
        return spec, 1.0
    try:
        return name, float(w)
    except ValueError:
        raise BrickError(f"bad brick weight in {spec!r}: write NAME:WEIGHT, e.g. style:0.5") from None


@dataclass(frozen=True)
class SparseOptions:
    """The RAM budget and the sparse FFN.

    `ram_budget_mb` (MB or "auto"): the weights kept in RAM. On the int4 path (the default) it holds the whole
    model's weights: the native kernel reads what it does not hold from the model file at each use
    (`cfm_runtime.kernels.stream`); "auto" spends what this process's memory limit leaves, which a plain run
    also does when the model would not fit. With fp32 weights it holds FFN weights, the rest read from the
    neuron pack, and combines with predictor-driven sparsity (`sparse`; see `cfm_runtime.sparse`).

    `sparse` on int4 weights (the default without a budget) is the native kernel's sparse FFN: each position's
    neurons of largest activation, selected exactly from the layer's own gate and up rows, at the pack's planned
    (or uniform) densities; with a budget or the low-rank predictor it is the torch sparse FFN on fp32 weights."""

    ram_budget_mb: float | str | None = None
    sparse: bool = False
    density: float | None = None  # mean fraction of neurons computed (default 0.6 with a sparse strategy)
    strategy: str | None = None  # "dense" | "oracle" | "predictor" (default: predictor with sparse, else dense)
    pack: str | Path | None = None  # neuron pack folder (default: the per-model cache, built on first use)
    predictor: str | None = None  # "int4" | "lowrank" (default: int4 unless it takes over half the budget)
    density_plan: str | None = None  # "planned" | "uniform" (default: planned)
    cache_fraction: float = 0.25  # share of the RAM budget kept as a neuron cache (with a sparse strategy)

    @property
    def active(self) -> bool:
        return self.ram_budget_mb is not None or self.sparse or self.strategy is not None

    @property
    def ffn(self) -> bool:
        """Whether anything asks for the torch sparse FFN or the neuron pack (not a RAM budget alone)."""
        return bool(self.sparse or self.strategy is not None or self.predictor or self.density_plan
                    or self.pack is not None or self.density is not None)

    def resolved(self) -> "SparseOptions":
        """Defaults filled in and every value checked (all problems in one error)."""
        strategy = self.strategy or ("predictor" if self.sparse else "dense")
        density = self.density if self.density is not None else (DEFAULT_DENSITY if strategy != "dense" else 1.0)
        problems = []
        if strategy not in SPARSE_STRATEGIES:
            problems.append(f"sparse strategy (--sparse-strategy) {strategy!r} is unknown; choose one of {', '.join(SPARSE_STRATEGIES)}")
        budget = self.ram_budget_mb
        if budget is not None and budget != "auto" and not (isinstance(budget, (int, float)) and budget > 0):
            problems.append(f"the RAM budget (--ram-budget) must be a positive number of MB or 'auto', got {budget!r}")
        if not 0.0 < density <= 1.0:
            problems.append(f"density (--density) must be in (0, 1], got {density}")
        if self.predictor is not None and self.predictor not in PREDICTORS:
            problems.append(f"predictor (--predictor) {self.predictor!r} is unknown; choose one of {', '.join(PREDICTORS)}")
        if self.density_plan is not None and self.density_plan not in DENSITY_PLANS:
            problems.append(f"density plan (--density-plan) {self.density_plan!r} is unknown; choose one of {', '.join(DENSITY_PLANS)}")
        if (self.predictor or self.density_plan) and not self.active:
            problems.append("a predictor and a density plan go with sparse=True or a RAM budget "
                            "(--sparse, --ram-budget); add one or drop them")
        _raise(problems)
        return replace(self, strategy=strategy, density=float(density),
                       density_plan=self.density_plan or "planned")


@dataclass(frozen=True)
class LoadOptions:
    """How a model is loaded: weight formats, threads, sparse FFN and offload, config overrides."""

    threads: int | None = None  # CPU threads (default: every core this process may run on)
    weights: str | None = None  # "fp32" | "int8" | "int4"; None: int4, or fp32 for the neuron pack's sparse FFN
    lm_head: str | None = None  # "fp32" | "int8"; None: int8 with quantized weights, else fp32
    sparse: SparseOptions = field(default_factory=SparseOptions)
    progress: bool | None = None  # progress bars while loading (None: only for large files)
    overrides: dict = field(default_factory=dict)  # config fields replacing the file's (e.g. activation="relu")

    def resolved(self) -> "LoadOptions":
        """Defaults filled in; every value and every combination checked (all problems in one error)."""
        ffn = self.sparse.ffn  # a sparse FFN or the neuron pack, not a RAM budget alone
        # the native kernel's sparse FFN (int4) holds the model in RAM and selects neurons exactly; a budget or the
        # low-rank predictor with a sparse FFN means the torch one over the neuron pack (fp32)
        pack_ffn = ffn and (self.sparse.ram_budget_mb is not None or self.sparse.predictor == "lowrank")
        weights = self.weights or ("fp32" if pack_ffn else "int4")
        sparse = self.sparse
        if sparse.active:
            checked = sparse.resolved()  # a budget alone on the int4 path keeps its own form (no FFN defaults)
            sparse = checked if ffn or weights == "fp32" else sparse
        lm_head = self.lm_head or ("fp32" if weights == "fp32" else "int8")
        problems = []
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            problems.append(f"threads (--threads) must be an integer >= 1, got {self.threads!r}")
        if weights not in WEIGHT_FORMATS:
            problems.append(f"weights (--weights) must be one of {', '.join(WEIGHT_FORMATS)}; got {weights!r}")
        if lm_head not in HEAD_FORMATS:
            problems.append(f"lm_head (--lm-head) must be one of {', '.join(HEAD_FORMATS)}; got {lm_head!r}")
        elif weights == "fp32" and lm_head != "fp32":
            problems.append("a quantized LM head needs quantized weights (--weights int8 or int4)")
        if ffn and weights == "int8":
            problems.append(refusal("the sparse FFN and the neuron pack (--sparse, --sparse-strategy, --density, "
                                    "--predictor, --density-plan, --pack)", "int8 weights",
                                    "the sparse FFN runs on int4 weights (the native kernel) or fp32 (the neuron "
                                    "pack); choose one of those"))
        elif ffn and weights == "int4" and sparse.ram_budget_mb is not None:
            problems.append(refusal("the sparse FFN (--sparse, --sparse-strategy, --density)",
                                    "a RAM budget on int4 weights (--ram-budget)",
                                    "the native kernel's sparse FFN holds the model in RAM; offload a sparse FFN "
                                    "from the neuron pack with --weights fp32, or drop one of them"))
        elif ffn and weights == "int4" and sparse.predictor == "lowrank":
            problems.append(refusal("the low-rank predictor (--predictor lowrank)", "int4 weights",
                                    "on int4 weights the native kernel selects neurons from the layer's own gate "
                                    "and up rows (exact); drop --predictor or add --weights fp32"))
        elif sparse.ram_budget_mb is not None and weights == "int8":
            problems.append(refusal("a RAM budget (--ram-budget)", "int8 weights",
                                    "the budget holds int4 weights (the native kernel) or fp32 FFN weights "
                                    "(the neuron pack); choose one of those"))
        elif sparse.ram_budget_mb == "auto" and weights == "fp32":
            problems.append(refusal("--ram-budget auto", "fp32 weights",
                                    "auto sizes the int4 path's budget; give the fp32 offload a number of MB"))
        _raise(problems)
        return replace(self, weights=weights, lm_head=lm_head, sparse=sparse)


@dataclass(frozen=True)
class CenterOptions:
    """A split run: layers [a, b) on the center at `address`, the rest on this device."""

    address: str  # HOST:PORT
    split: tuple[int, int] | str = "auto"  # (a, b); "auto": the planner (it may choose local-only); "center"
    wire: str = "fp32"  # hidden states on the wire: "fp32" (exact), "fp16", "bf16"
    token: str | None = None  # bearer token
    tls: bool = False
    tls_ca: bytes | None = None  # PEM of a CA to trust (implies TLS)
    timeout: float = 10.0  # seconds to wait for one step before finishing locally
    reconnect_interval: float = 5.0  # seconds between reconnection attempts while running locally
    min_edge_layers: int = 1  # privacy floor: layers the planner keeps on this device before the center

    def check(self) -> None:
        problems = []
        floor = self.min_edge_layers
        if not isinstance(floor, int) or isinstance(floor, bool) or floor < 1:
            problems.append(f"the privacy floor (--min-edge-layers) must be an integer >= 1, got {floor!r}")
        elif isinstance(self.split, tuple) and len(self.split) == 2 and self.split[0] < floor:
            problems.append(f"split (--split) {self.split[0]}:{self.split[1]} keeps {self.split[0]} layers on this device "
                            f"before the center, under the privacy floor (--min-edge-layers) {floor}; start the "
                            f"center's layers at {floor} or later, or use --split auto")
        host, sep, port = self.address.rpartition(":")
        if not sep or not host or not port.isdigit():
            problems.append(f"center address (--center) {self.address!r}: write it as HOST:PORT, e.g. 127.0.0.1:50051")
        if self.wire not in WIRE_DTYPES:
            problems.append(f"wire dtype (--wire) {self.wire!r} is unknown; use one of {', '.join(WIRE_DTYPES)}")
        if not (isinstance(self.split, tuple) and len(self.split) == 2) and self.split not in ("auto", "center"):
            problems.append(f"split (--split) {self.split!r}: give (A, B) (layers on the center), 'auto' or 'center'")
        if not (isinstance(self.timeout, (int, float)) and math.isfinite(self.timeout) and self.timeout > 0):
            problems.append(f"the center timeout (--center-timeout) must be > 0 seconds, got {self.timeout!r}")
        _raise(problems)


@dataclass(frozen=True)
class RunOptions:
    """How a generator runs: where the layers run, and which bricks answer."""

    center: CenterOptions | None = None  # None: every layer on this device
    bricks: tuple[tuple[str, float], ...] | str | None = None  # ((name, weight), ...) from the store, or "auto"
    brick_threshold: float | None = None  # with bricks="auto": lowest routing score that selects a brick
    brick_store: str | Path | None = None  # the brick store's folder (default: $CFM_HOME/bricks, ...)
    log: Callable[[str], None] | None = None  # where user-facing notices go (the CLI: standard error)
    speculate: str = "auto"  # "off" | "lookup" | "edge" | "auto": drafted tokens verified several per step

    def check(self) -> None:
        if self.center is not None:
            self.center.check()
        problems = []
        if isinstance(self.bricks, str) and self.bricks != "auto":
            problems.append(f"bricks {self.bricks!r}: give ((name, weight), ...) or 'auto'")
        if self.brick_threshold is not None and self.bricks != "auto":
            problems.append("a brick threshold goes with bricks='auto' (--bricks auto)")
        if self.speculate not in SPECULATE_MODES:
            problems.append(f"speculate (--speculate) {self.speculate!r} is unknown; choose one of "
                            f"{', '.join(SPECULATE_MODES)}")
        elif self.speculate == "edge" and self.center is None:
            problems.append("speculate='edge' drafts with the layers this device keeps in a split run; give a center "
                            "(--center HOST:PORT) or use 'lookup' or 'auto'")
        _raise(problems)


def refusal(a: str, b: str, why: str) -> str:
    """The one wording of a combination that does not work: the pair, then why and what to do."""
    return f"{a} does not combine with {b}: {why}"


def _raise(problems: list[str]) -> None:
    if problems:
        raise CfmError("; ".join(problems))
