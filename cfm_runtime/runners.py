"""Runners: token ids through the whole model, keeping a KV cache; the generator drives one.

Every runner (local, split) has the same small interface, `Runner`; its `report()` is the telemetry the
generator merges into each answer's `GenerationStats.extra`.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np


class Runner(Protocol):
    """Runs token ids through the whole model, keeping a KV cache of `n_past` positions."""

    n_past: int

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        """Feed ids after the cached ones; logits [len(ids) or 1, vocab] in float32."""

    def truncate(self, n: int) -> None:
        """Forget cached positions from n on."""

    def begin(self) -> None:
        """An answer starts: `report()` covers what happens from here on."""

    def report(self) -> dict:
        """Telemetry since `begin()`, merged into `GenerationStats.extra`."""

    def torch_threads(self) -> int | None:
        """Torch threads to use while generating (None: leave them as set)."""

    def center_layers(self) -> frozenset[int]:
        """The layers that run on a center (none for a local runner)."""

    def close(self) -> None:
        """Release what the runner holds outside this process (e.g. a center session)."""


class LocalRunner:
    """All layers on this machine through the model's execution backend, prompt fed in chunks.

    `model` is a `cfm_runtime.Model`: its `backend` is read at every call, so a backend re-chosen
    between answers (bricks on or off) is used from the next call on. Subclasses replace `_run`, the
    computation of one chunk (the split runner sends the middle layers to a center).
    """

    def __init__(self, model, max_len: int | None = None, chunk: int = 512):
        self.model, self.chunk = model, chunk
        self.cache = model.new_cache(max_len=max_len)
        self._sparse_since: dict | None = None

    @property
    def n_past(self) -> int:
        return self.cache.offset

    def forward(self, ids: list[int], all_logits: bool = False) -> np.ndarray:
        outs = []
        for s in range(0, len(ids), self.chunk):
            last = s + self.chunk >= len(ids)
            logits = self._run(ids[s:s + self.chunk], all_logits)
            if all_logits or last:
                outs.append(logits)
        return np.concatenate(outs)

    def _run(self, ids: list[int], all_logits: bool) -> np.ndarray:
        """One chunk after the cached positions -> logits [len(ids) or 1, vocab]."""
        return self.model.backend.forward(ids, self.cache, all_logits)

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)

    def begin(self) -> None:
        sparse = self.model.sparse
        self._sparse_since = sparse.counters() if sparse is not None else None

    def report(self) -> dict:
        out = self.model.backend.report()
        sparse = self.model.sparse
        if sparse is not None and self._sparse_since is not None:
            out["sparse"] = sparse.report(self._sparse_since)
        return out

    def torch_threads(self) -> int | None:
        return self.model.backend.torch_threads()

    def center_layers(self) -> frozenset[int]:
        return frozenset()

    def close(self) -> None:
        pass
