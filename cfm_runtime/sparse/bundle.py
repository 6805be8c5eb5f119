"""Neuron bundles in the model's own quantization: one FFN neuron's gate row, up row and down column.

- Gate and up rows are the file's own blocks when it stores them as Q4_1 or Q8_0 (the embedded model: Q4_1, 360
  bytes a row for d_model 576), copied as they are. Other sources (fp16, other block types, safetensors) are
  quantized to Q8_0 as llama.cpp does.
- A down column runs along the hidden axis, across the file's blocks (they run along the FFN axis). From a Q4_1
  file the bundle keeps the column's own 4-bit codes (`q4_1_file`: 288 bytes for d_model 576) and the pack keeps
  the file's per-block scales and minimums once per layer (`shared`: [F / 32, 2, d] fp16, 110 KB a layer, held
  in RAM): the exact file weights. Otherwise the column is quantized again along the hidden axis, to Q8_0 (612
  bytes) or Q4_1 (360). Re-blocking was measured on the embedded model (`benchmarks/bench_pack_quant.py`): Q8_0
  costs +0.78% perplexity, almost all of it in the two layers with massive activations; Q4_1 +13.7%.

A bundle is 1,008 bytes on the embedded model instead of 3,456 in fp16, and holds the very values of the file.
Bundles are decoded to fp32 where they are computed on (`decode`): the native kernel's `cfm_bundles_f32`, or numpy
where the kernel is not available; both compute each value as the file's dequantization does (d q + m), so all
three give the same bits.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..errors import CfmError
from ..kernels import native
from ..kernels.blocks import down_columns
from ..loading import dequantize_blocks, quantize_blocks

BLOCK = 32
KINDS = {"q8_0": (0, 34), "q4_1": (1, 20), "q4_1_file": (2, 16)}  # kind -> (kernel code, bytes per 32 values)
STORED = ("Q4_1", "Q8_0")  # gate/up kept as the file stores them; anything else is quantized to the last


@dataclass(frozen=True)
class BundleCodec:
    """The layout of a pack's bundles: d values per part, the kind of the gate/up rows and of the down column."""

    d: int
    gate_up: str = "q4_1"
    down: str = "q4_1_file"

    def __post_init__(self):
        if self.d % BLOCK:
            raise CfmError(f"a neuron pack needs d_model divisible by {BLOCK} (its blocks); this model has {self.d}")
        if self.gate_up not in ("q8_0", "q4_1") or self.down not in KINDS:
            raise CfmError(f"bundle kinds {self.gate_up!r}/{self.down!r} are unknown: gate/up q8_0 or q4_1, "
                           f"down one of {', '.join(KINDS)}")

    @property
    def kinds(self) -> tuple[str, str, str]:
        return self.gate_up, self.gate_up, self.down

    @property
    def shared(self) -> bool:
        """Whether the down columns need the layer's shared table of scales and mins."""
        return self.down == "q4_1_file"

    def part_bytes(self, kind: str) -> int:
        return self.d // BLOCK * KINDS[kind][1]

    @property
    def nbytes(self) -> int:
        return sum(self.part_bytes(k) for k in self.kinds)

    def shared_bytes(self, d_ff: int) -> int:
        return d_ff // BLOCK * self.d * 4 if self.shared else 0

    def manifest(self) -> dict:
        return {"gate_up": self.gate_up, "down": self.down, "bytes": self.nbytes}

    @classmethod
    def from_manifest(cls, d: int, entry: dict) -> "BundleCodec":
        return cls(d, entry["gate_up"], entry["down"])

    # ------------------------------------------------------------ writing

    def encode(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray, order: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None]:
        """(bundles [F, nbytes] in pack `order`, the shared table [F / 32, d * 4] or None). gate and up: blocks of
        kind `gate_up` [F, part bytes] (the file's own). down: for `q4_1_file` the file's Q4_1 blocks [d, F / 32 *
        20], else fp32 [d, F] (quantized here along the hidden axis)."""
        want = self.part_bytes(self.gate_up)
        if gate.shape[1] != want or up.shape[1] != want:
            raise ValueError(f"gate/up rows of {gate.shape[1]}/{up.shape[1]} bytes, expected {want} ({self.gate_up})")
        shared = None
        if self.shared:
            cols, shared = down_columns(down, self.d)
            cols = cols[order]
        else:
            cols = quantize_blocks(self.down.upper(), np.ascontiguousarray(down.T[order], dtype=np.float32))
        return np.ascontiguousarray(np.concatenate((gate[order], up[order], cols), axis=1)), shared

    # ------------------------------------------------------------ reading

    def decode(self, src: np.ndarray, out: np.ndarray, ids: np.ndarray | None = None,
               shared: np.ndarray | None = None, threads: int = 2) -> np.ndarray:
        """Bundles src [k, nbytes] (uint8) of neurons `ids` (model order; needed with a shared table) -> out[:k]
        [k, 3, d] fp32; returns out[:k]."""
        k = src.shape[0]
        if src.shape[1:] != (self.nbytes,) or out.shape[1:] != (3, self.d) or out.dtype != np.float32:
            raise ValueError(f"bundles {src.shape} into {out.shape} {out.dtype}: expected [k, {self.nbytes}] "
                             f"into [k, 3, {self.d}] float32")
        if self.shared and (ids is None or shared is None or len(ids) != k):
            raise ValueError("q4_1_file down columns need their neuron ids and the layer's shared table")
        dst = out[:k]
        if k == 0:
            return dst
        src = np.ascontiguousarray(src)
        if self.shared:
            ids, shared = np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(shared)
        else:
            ids = None
        lib = native.load()
        if lib is not None and dst.flags.c_contiguous:
            codes = (ctypes.c_int * 3)(*(KINDS[kind][0] for kind in self.kinds))
            lib.cfm_bundles_f32(k, self.nbytes, self.d, codes, src.ctypes.data,
                                ids.ctypes.data if ids is not None else None,
                                shared.ctypes.data if ids is not None else None, dst.ctypes.data, threads)
            return dst
        at = 0
        for part, kind in enumerate(self.kinds):
            n = self.part_bytes(kind)
            raw = src[:, at:at + n]
            if kind == "q4_1_file":
                q = np.stack((raw & 15, raw >> 4), axis=2).reshape(k, self.d).astype(np.float32)
                rows = shared.reshape(-1, 2, self.d * 2)[ids // BLOCK]  # [k, (scales, mins), d fp16]
                scale, low = (np.ascontiguousarray(rows[:, j]).view(np.float16).astype(np.float32) for j in (0, 1))
                dst[:, part] = scale * q + low
            else:
                dst[:, part] = dequantize_blocks(kind.upper(), raw).reshape(k, self.d)
            at += n
        return dst

    def weights(self, src: np.ndarray, order: np.ndarray, shared: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A layer's bundles [F, nbytes] in pack `order` -> its dense weights in model order: gate [F, d], up [F, d],
        down [d, F] (fp32), the values the sparse FFN computes with."""
        w = self.decode(src, np.empty((len(src), 3, self.d), np.float32), order, shared)
        inverse = np.argsort(order)
        return w[inverse, 0], w[inverse, 1], np.ascontiguousarray(w[inverse, 2].T)
