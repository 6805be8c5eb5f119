"""Split brick training: the frozen layers below the trained ones run forward only, partly on a center."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..errors import CfmError
from ..options import CenterOptions
from .runner import SplitRunner


def center_frozen(model, center: CenterOptions, start: int, log: Callable[[str], None] | None = None):
    """-> (run(ids) -> hidden states [1, T, D] at layer `start`, close): layers [0, start) forward only, the
    center taking [a, b) (its span, cut to end at `start`: the trained layers and their gradients stay here)."""
    split = center.split if isinstance(center.split, tuple) else None
    if split is not None and split[1] > start:
        raise CfmError(f"--split {split[0]}:{split[1]}: the trained layers {start}-{model.config.n_layers - 1} must "
                       f"stay on the edge; pick B <= {start}")
    runner = SplitRunner(model, center, split)
    a, b = runner.span
    if b > start:
        runner.close()
        runner = SplitRunner(model, center, (a, start))
        a, b = runner.span
    backend = model.backend

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            runner.truncate(0)
            h = backend.span(backend.embed(ids), 0, a, [runner.cache])
            h = runner.middle(h[0], 0)[None]
            return torch.from_numpy(np.array(backend.span(h, b, start, [runner.cache]), np.float32))

    if log is not None:
        log(f"[split training: layers {a}:{b} on the center {center.address}, forward only]")
    return run, runner.close
