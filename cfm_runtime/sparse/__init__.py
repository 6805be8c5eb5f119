"""The neuron pack's sparse FFN and offload (fp32 weights): hot neurons in RAM, cold ones streamed from the pack.

`load_model(weights="fp32", ram_budget_mb=48)` offloads (density 1.0: the file's own FFN weights);
`load_model(weights="fp32", sparse=True, density=0.6)` runs predictor-selected neurons (predictor "int4", the
layer's own 4-bit gate and up rows, or "lowrank"; by default int4 unless it would take over half of the RAM
budget); both combine. (`sparse=True` on int4 weights is the native kernel's own sparse FFN,
`kernels.native.SparseFFN`, which reads only the pack's density plan.) Here: `build_pack(model, root)` profiles
a model and writes its pack (`cfm profile`); `attach(transformer, pack, options)` puts the sparse FFNs in place.
See docs/sparse.md."""

from __future__ import annotations

import importlib

# name -> its module: imported on first use, so reading a pack's manifest (`pack`, `plan`: no torch) does not
# load the torch sparse FFN
_HOMES = {"SparseEngine": "engine", "attach": "load", "build_pack": "profile", "NeuronPack": "pack",
          "PackError": "pack", "default_root": "pack", "is_current": "pack", "open_pack": "pack", "pack_dir": "pack",
          "source_digest": "pack"}


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)


__all__ = sorted(_HOMES)
