"""Neuron bundles in the model's own quantization: one FFN neuron's gate row, up row and down column as GGUF blocks.

- Gate and up rows are the file's own blocks when it stores them as Q4_1 or Q8_0 (the embedded model: Q4_1, 360
  bytes a row for d_model 576), copied as they are: the pack computes with the very weights of the file. Other
  sources (fp16, other block types, safetensors) are quantized to Q8_0 as llama.cpp does.
- The down column runs along the hidden axis, across the file's blocks (they run along the FFN axis), so it is
  quantized again, by default to Q8_0 (612 bytes; its values are the file's Q4_1 values to ~1/254 of each block's
  largest: `benchmarks/bench_pack_quant.py` measures the cost) or to Q4_1 (360 bytes).

A bundle is 1,332 bytes on the embedded model instead of 3,456 in fp16. Bundles are decoded to fp32 where they
are computed on (`decode`): the native kernel's `cfm_bundles_f32`, or numpy where the kernel is not available,
which give the same bits.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import numpy as np

from ..errors import CfmError
from ..kernels import native
from ..loading import dequantize_blocks, quantize_blocks

BLOCK = 32
KINDS = {"q8_0": (0, 34), "q4_1": (1, 20)}  # kind -> (kernel code, bytes per block of 32 values)
STORED = ("Q4_1", "Q8_0")  # gate/up kept as the file stores them; anything else is quantized to the last


@dataclass(frozen=True)
class BundleCodec:
    """The layout of a pack's bundles: d values per part, the block kind of the gate/up rows and of the down column."""

    d: int
    gate_up: str = "q4_1"
    down: str = "q8_0"

    def __post_init__(self):
        if self.d % BLOCK:
            raise CfmError(f"a neuron pack needs d_model divisible by {BLOCK} (its blocks); this model has {self.d}")
        for kind in (self.gate_up, self.down):
            if kind not in KINDS:
                raise CfmError(f"bundle block kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")

    @property
    def kinds(self) -> tuple[str, str, str]:
        return self.gate_up, self.gate_up, self.down

    def part_bytes(self, kind: str) -> int:
        return self.d // BLOCK * KINDS[kind][1]

    @property
    def nbytes(self) -> int:
        return sum(self.part_bytes(k) for k in self.kinds)

    def manifest(self) -> dict:
        return {"gate_up": self.gate_up, "down": self.down, "bytes": self.nbytes}

    @classmethod
    def from_manifest(cls, d: int, entry: dict) -> "BundleCodec":
        return cls(d, entry["gate_up"], entry["down"])

    # ------------------------------------------------------------ writing

    def encode(self, gate: np.ndarray, up: np.ndarray, down: np.ndarray, order: np.ndarray) -> np.ndarray:
        """Bundles [F, nbytes] in pack `order`: gate and up as blocks of kind `gate_up` [F, part bytes] (the
        file's own), down as fp32 [d, F] (quantized here along the hidden axis)."""
        want = self.part_bytes(self.gate_up)
        if gate.shape[1] != want or up.shape[1] != want:
            raise ValueError(f"gate/up rows of {gate.shape[1]}/{up.shape[1]} bytes, expected {want} ({self.gate_up})")
        cols = quantize_blocks(self.down.upper(), np.ascontiguousarray(down.T[order], dtype=np.float32))
        return np.ascontiguousarray(np.concatenate((gate[order], up[order], cols), axis=1))

    # ------------------------------------------------------------ reading

    def decode(self, src: np.ndarray, out: np.ndarray, threads: int = 2) -> np.ndarray:
        """Bundles src [k, nbytes] (uint8) -> out[:k] [k, 3, d] fp32; returns out[:k]."""
        k = src.shape[0]
        if src.shape[1:] != (self.nbytes,) or out.shape[1:] != (3, self.d) or out.dtype != np.float32:
            raise ValueError(f"bundles {src.shape} into {out.shape} {out.dtype}: expected [k, {self.nbytes}] "
                             f"into [k, 3, {self.d}] float32")
        dst = out[:k]
        if k == 0:
            return dst
        src = np.ascontiguousarray(src)
        lib = native.load()
        if lib is not None and dst.flags.c_contiguous:
            codes = (ctypes.c_int * 3)(*(KINDS[kind][0] for kind in self.kinds))
            lib.cfm_bundles_f32(k, self.nbytes, self.d, codes, src.ctypes.data, dst.ctypes.data, threads)
            return dst
        at = 0
        for part, kind in enumerate(self.kinds):
            n = self.part_bytes(kind)
            dst[:, part] = dequantize_blocks(kind.upper(), src[:, at:at + n]).reshape(k, self.d)
            at += n
        return dst

    def weights(self, src: np.ndarray, order: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A layer's bundles [F, nbytes] in pack `order` -> its dense weights in model order: gate [F, d], up [F, d],
        down [d, F] (fp32), the values the sparse FFN computes with."""
        w = self.decode(src, np.empty((len(src), 3, self.d), np.float32))
        inverse = np.argsort(order)
        return w[inverse, 0], w[inverse, 1], np.ascontiguousarray(w[inverse, 2].T)

