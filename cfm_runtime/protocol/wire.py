"""Hidden states <-> `cfm.v1.Tensor`, used by both ends; decoding validates everything it reads."""

from __future__ import annotations

import math

import numpy as np

from .errors import InvalidArgument
from .proto import pb

ITEMSIZE = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_BFLOAT16: 2}
BY_NAME = {"fp32": pb.DTYPE_FLOAT32, "fp16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16}
FP16_ROW_MAX = 2.0 ** 15  # rows are scaled by powers of two to stay below this (fp16 max is 65504)


def dtype_name(dtype: int) -> str:
    return {v: k for k, v in BY_NAME.items()}.get(dtype, f"unknown dtype {dtype}")


def parse_dtype(name: str) -> int:
    if name not in BY_NAME:
        raise ValueError(f"unknown wire dtype {name!r}; use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def bytes_per_position(hidden_size: int, dtype: int) -> int:
    return hidden_size * ITEMSIZE[dtype]


def encode(h: np.ndarray, dtype: int) -> pb.Tensor:
    """h [n, D] float32 -> Tensor in `dtype`; fp16 rows beyond its range get power-of-two scales."""
    h = np.asarray(h, dtype=np.float32)
    scales = []
    if dtype == pb.DTYPE_FLOAT16:
        row_max = np.abs(h).max(axis=1)
        if bool((row_max > FP16_ROW_MAX).any()):
            factor = np.exp2(np.maximum(np.ceil(np.log2(row_max / FP16_ROW_MAX)), 0)).astype(np.float32)
            h, scales = h / factor[:, None], factor.tolist()  # exact: scaling by 2^k adds no rounding
    if dtype == pb.DTYPE_FLOAT16:
        raw = h.astype(np.float16)
    elif dtype == pb.DTYPE_BFLOAT16:
        bits = np.ascontiguousarray(h).view(np.uint32)
        raw = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    else:
        raw = h
    return pb.Tensor(dtype=dtype, shape=list(h.shape), data=np.ascontiguousarray(raw).tobytes(), row_scales=scales)


def decode(t: pb.Tensor, *, hidden_size: int, dtype: int, max_rows: int) -> np.ndarray:
    """Tensor -> float32 [n, hidden_size], or InvalidArgument saying what is wrong with it."""
    if t.dtype != dtype:
        raise InvalidArgument(f"hidden states are {dtype_name(t.dtype)} but the session uses {dtype_name(dtype)}; "
                              "send the dtype given when the session was opened")
    shape = list(t.shape)
    if len(shape) != 2:
        raise InvalidArgument(f"hidden states must have shape [n, {hidden_size}], got {shape}")
    n, d = shape
    if d != hidden_size:
        raise InvalidArgument(f"hidden size is {d} but this model's is {hidden_size}; "
                              "the edge runs a different model than the center")
    if not 1 <= n <= max_rows:
        raise InvalidArgument(f"a step carries n={n} positions; it must be 1..{max_rows} "
                              "(send long prefills in chunks of max_step_positions)")
    size = ITEMSIZE[dtype]
    if len(t.data) != n * d * size:
        raise InvalidArgument(f"data has {len(t.data)} bytes but shape {shape} of {dtype_name(dtype)} "
                              f"needs {n * d * size}")
    if dtype == pb.DTYPE_BFLOAT16:
        h = (np.frombuffer(t.data, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        h = np.frombuffer(t.data, dtype=np.float16 if dtype == pb.DTYPE_FLOAT16 else np.float32).astype(np.float32)
    h = h.reshape(n, d)
    if t.row_scales:
        if len(t.row_scales) != n or not all(math.isfinite(s) and s > 0 for s in t.row_scales):
            raise InvalidArgument(f"row_scales must hold {n} finite positive factors, got {len(t.row_scales)}")
        h = h * np.asarray(list(t.row_scales), dtype=np.float32)[:, None]
    if not bool(np.isfinite(h).all()):
        bad = int(np.flatnonzero((~np.isfinite(h)).any(axis=1))[0])
        raise InvalidArgument(f"hidden states hold NaN or infinity (first at row {bad}); "
                              "the edge's computation diverged or the data is corrupt")
    return h
