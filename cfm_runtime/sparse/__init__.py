"""Sparse FFN and offload: hot neurons in RAM, cold neurons streamed from a neuron pack on flash.

`cfm_runtime.load_model(sparse=SparseOptions(ram_budget_mb=48))` offloads (density 1.0: the same output as
the dense model with fp16 FFN weights); `SparseOptions(sparse=True, density=0.6)` runs predictor-selected
neurons (predictor "int4", a 4-bit copy of gate and up, or "lowrank"; by default int4 unless it would
take over half of the RAM budget); both combine. Here: `build_pack(model, root)` profiles a model and
writes its pack (`cfm profile`); `attach(transformer, pack, options)` puts the sparse FFNs in place.
See docs/sparse.md.
"""

from __future__ import annotations

from .engine import SparseEngine
from .load import attach, pack_dir, source_digest
from .pack import NeuronPack, PackError, default_root, is_current, open_pack
from .profile import build_pack

__all__ = ["NeuronPack", "PackError", "SparseEngine", "attach", "build_pack", "default_root", "is_current", "open_pack",
           "pack_dir", "source_digest"]
