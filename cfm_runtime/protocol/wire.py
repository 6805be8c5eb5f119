"""Hidden states <-> `cfm.v1.Tensor`, used by both ends; decoding validates everything it reads."""

from __future__ import annotations

import math

import torch

from .errors import InvalidArgument
from .proto import pb

TORCH_DTYPES = {pb.DTYPE_FLOAT32: torch.float32, pb.DTYPE_FLOAT16: torch.float16, pb.DTYPE_BFLOAT16: torch.bfloat16}
BY_NAME = {"fp32": pb.DTYPE_FLOAT32, "fp16": pb.DTYPE_FLOAT16, "bf16": pb.DTYPE_BFLOAT16}
FP16_ROW_MAX = 2.0 ** 15  # rows are scaled by powers of two to stay below this (fp16 max is 65504)


def dtype_name(dtype: int) -> str:
    return {v: k for k, v in BY_NAME.items()}.get(dtype, f"unknown dtype {dtype}")


def parse_dtype(name: str) -> int:
    if name not in BY_NAME:
        raise ValueError(f"unknown wire dtype {name!r}; use one of {', '.join(BY_NAME)}")
    return BY_NAME[name]


def bytes_per_position(hidden_size: int, dtype: int) -> int:
    return hidden_size * TORCH_DTYPES[dtype].itemsize


def encode(h: torch.Tensor, dtype: int) -> pb.Tensor:
    """h [n, D] float32 -> Tensor in `dtype`; fp16 rows beyond its range get power-of-two scales."""
    scales = []
    if dtype == pb.DTYPE_FLOAT16:
        row_max = h.abs().amax(dim=1)
        if bool((row_max > FP16_ROW_MAX).any()):
            exp = torch.ceil(torch.log2(row_max / FP16_ROW_MAX)).clamp(min=0)
            factor = torch.exp2(exp)  # exact: scaling by 2^k adds no rounding
            h, scales = h / factor[:, None], factor.tolist()
    data = h.to(TORCH_DTYPES[dtype]).contiguous()
    raw = data.view(torch.int16) if dtype == pb.DTYPE_BFLOAT16 else data
    return pb.Tensor(dtype=dtype, shape=list(h.shape), data=raw.numpy().tobytes(), row_scales=scales)


def decode(t: pb.Tensor, *, hidden_size: int, dtype: int, max_rows: int) -> torch.Tensor:
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
    size = TORCH_DTYPES[dtype].itemsize
    if len(t.data) != n * d * size:
        raise InvalidArgument(f"data has {len(t.data)} bytes but shape {shape} of {dtype_name(dtype)} "
                              f"needs {n * d * size}")
    raw = torch.frombuffer(bytearray(t.data), dtype=torch.int16 if dtype == pb.DTYPE_BFLOAT16 else TORCH_DTYPES[dtype])
    h = (raw.view(torch.bfloat16) if dtype == pb.DTYPE_BFLOAT16 else raw).view(n, d).float()
    if t.row_scales:
        if len(t.row_scales) != n or not all(math.isfinite(s) and s > 0 for s in t.row_scales):
            raise InvalidArgument(f"row_scales must hold {n} finite positive factors, got {len(t.row_scales)}")
        h = h * torch.tensor(list(t.row_scales))[:, None]
    if not bool(torch.isfinite(h).all()):
        bad = int((~torch.isfinite(h)).any(dim=1).nonzero()[0])
        raise InvalidArgument(f"hidden states hold NaN or infinity (first at row {bad}); "
                              "the edge's computation diverged or the data is corrupt")
    return h
