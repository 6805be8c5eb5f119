"""Sparse FFN and offload: hot neurons in RAM, cold neurons streamed from a neuron pack on flash.

`load_sparse(path, ram_budget_mb=48)` offloads (density 1.0: the same output as the dense model
with fp16 FFN weights); `load_sparse(path, sparse=True, density=0.6)` runs predictor-selected
neurons (predictor "int4", a 4-bit copy of gate and up, or "lowrank"; by default int4 unless it
would take over half of the RAM budget); both combine. `build_pack(model, root)` profiles a model and writes its pack
(`cfm profile`). See README, "Sparse FFN and offload".
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CfmError
from .ffn import STRATEGIES
from .pack import PackError, default_root, is_current, open_pack

DEFAULT_DENSITY = 0.6


def resolve_options(ram_budget_mb=None, sparse: bool = False, density: float | None = None,
                    sparse_strategy: str | None = None) -> tuple[str, float]:
    """(strategy, density) from the user-facing options, validated."""
    strategy = sparse_strategy or ("predictor" if sparse else "dense")
    if strategy not in STRATEGIES:
        raise CfmError(f"--sparse-strategy {strategy!r} is unknown; choose one of {', '.join(STRATEGIES)}")
    if ram_budget_mb is not None and not ram_budget_mb > 0:
        raise CfmError(f"--ram-budget must be a positive number of MB, got {ram_budget_mb}")
    if density is None:
        density = DEFAULT_DENSITY if strategy != "dense" else 1.0
    if not 0.0 < density <= 1.0:
        raise CfmError(f"--density must be in (0, 1], got {density}")
    return strategy, float(density)


def ensure_pack(path: Path, pack: Path | None = None, *, threads=None, progress: bool = True, **build) -> Path:
    """The pack directory for the model at `path`; profiles the model and builds it if missing."""
    from ..loading import resolve_model_path
    from ..runtime import load_model, release_freed_memory
    from .load import pack_dir, source_digest
    from .profile import build_pack

    path = resolve_model_path(path)
    digest = source_digest(path)
    root = Path(pack) if pack else pack_dir(path, digest)
    if pack is None and not is_current(root):
        import sys

        why = "stale or incomplete, rebuilding" if root.exists() else "once per model"
        print(f"building the neuron pack for {path.name} in {root} ({why})", file=sys.stderr)
        model = load_model(path, threads=threads)
        build_pack(model, root, source_digest=digest, progress=progress, **build)
        del model
        release_freed_memory()
    return root


def load_sparse(path=None, *, threads=None, progress=None, ram_budget_mb=None, sparse: bool = False,
                density: float | None = None, sparse_strategy: str | None = None, pack=None,
                cache_fraction: float = 0.25, predictor: str | None = None, density_plan: str | None = None,
                **overrides):
    """A Model with SparseFFN modules (see the module docstring); builds the pack on first use."""
    from ..loading import resolve_model_path
    from ..runtime import Model, load_model, load_tokenizer, release_freed_memory, set_threads
    from ..model import Transformer
    from .load import DEFAULT_PLAN, attach, lean_gguf_checkpoint, source_digest

    strategy, density = resolve_options(ram_budget_mb, sparse, density, sparse_strategy)
    path = resolve_model_path(path)
    root = ensure_pack(path, pack, threads=threads, progress=progress is not False)
    lean = ram_budget_mb is not None and path.is_file() and not overrides
    if lean:
        set_threads(threads)
        ckpt = lean_gguf_checkpoint(path)
        transformer = Transformer.from_weights(ckpt.config, ckpt.weights)
        ckpt.weights = {}
        model = Model(transformer, load_tokenizer(ckpt), ckpt)
        opened = open_pack(root, source_digest=source_digest(path))
        model._fingerprints[(0, model.config.n_layers)] = opened.manifest["fingerprint"]
    else:
        model = load_model(path, threads=threads, progress=progress, **overrides)
        opened = open_pack(root, fingerprint=model.fingerprint())
    release_freed_memory()
    attach(model, opened, ram_budget_mb=ram_budget_mb, strategy=strategy, density=density,
           cache_fraction=cache_fraction, predictor=predictor, plan=density_plan or DEFAULT_PLAN)
    return model


__all__ = ["PackError", "STRATEGIES", "default_root", "ensure_pack", "load_sparse", "open_pack", "resolve_options"]
