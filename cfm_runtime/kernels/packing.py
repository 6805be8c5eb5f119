"""Block quantization of a weight [N, K] into onnxruntime's MatMulNBits layout.

Layout (com.microsoft MatMulNBits): codes [N, K/block, block*bits/8] packed low nibble first,
fp32 scales [N * K/block], uint8 zero points (two per byte for 4 bits, each row padded to whole
bytes; or none, meaning the middle code 2^(bits-1)); value = scale * (code - zero_point). The CPU
kernels only run fast with integer zero points (float zero points fall back to a dequantizing path
~30x slower), and fastest with none, so a Q4_1 block (value = d*q + m) keeps its codes and scale with
the middle code as zero point, and the rest of the offset goes to a separate exact term (schemes
"mid" and "min" below).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Packed:
    """MatMulNBits operands of one weight [n, k]."""

    bits: int
    block: int
    n: int
    k: int
    codes: np.ndarray  # uint8 [n, k/block, block*bits/8]
    scales: np.ndarray  # float32 [n * k/block]
    zero_points: np.ndarray | None  # uint8 [n * ceil(k/block * bits / 8)]; None: the kernel's implicit 2^(bits-1)
    mins: np.ndarray | None = None  # float32 [k/block, n]: per-block offsets (Q4_1's m), added as x_blocksums @ mins

    @property
    def nbytes(self) -> int:
        extra = (0 if self.mins is None else self.mins.nbytes) + (0 if self.zero_points is None else self.zero_points.nbytes)
        return self.codes.nbytes + self.scales.nbytes + extra


SCHEMES = ("min", "mid", "asym", "sym")


def pack(w: torch.Tensor, bits: int = 4, block: int = 32, scheme: str = "min") -> Packed:
    """Block-quantize w [n, k] (k a multiple of block).

    scheme "min":  value = scale * code + min per block (the Q4_1 grid: re-packing a Q4_1 tensor is exact),
                   stored as scale * (code - zp) + (min + zp * scale) with the integer zp nearest -min/scale:
                   the kernel's int8-quantized activations then meet centred weights, and `mins` holds only
                   the small remainder (|.| <= scale / 2 unless zp is clamped). With zp = 0 the kernel would
                   multiply the activation rounding error by the uncentred codes (+1.3% perplexity on the
                   embedded model vs +0.0-0.3% centred, int8 activations everywhere).
    scheme "mid":  the same grid, stored as scale * (code - 2^(bits-1)) + (min + 2^(bits-1) * scale) with no zero
                   points at all: MatMulNBits then takes its faster path without them (0.84x -> 0.98x llama.cpp
                   decode, measured), and Q4_1 blocks sit close enough to that middle code that the int8
                   activation rounding costs no more (perplexity on the eval texts 8.563 vs 8.573 centred).
                   The default for int4 weights.
    scheme "asym": value = scale * (code - zp), integer zp (grid holds 0; re-fitting a Q4_1 grid loses quality).
    scheme "sym":  value = scale * (code - 2^(bits-1)), scale = absmax / (2^(bits-1) - 1) (exact for Q8_0 at 8 bits);
                   no zero points (the kernel's implicit one is that middle code).
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    n, k = w.shape
    if k % block:
        raise ValueError(f"in_features {k} is not a multiple of the block size {block}")
    with _one_thread():  # small elementwise ops: extra threads only add barrier waits (10x slower on a busy box)
        return _pack(w, bits, block, scheme)


def _pack(w: torch.Tensor, bits: int, block: int, scheme: str) -> Packed:
    n, k = w.shape
    qmax, mins = (1 << bits) - 1, None
    wb = w.detach().float().reshape(n, k // block, block)
    if scheme == "sym":
        half = 1 << (bits - 1)
        scale = wb.abs().amax(-1) / (half - 1)
        zp = torch.full_like(scale, half)
    else:
        lo, hi = wb.amin(-1), wb.amax(-1)
        if scheme == "asym":  # the grid must hold 0 so that zero points are integers in range
            lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scale = (hi - lo) / qmax
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if scheme in ("min", "mid"):
        q = ((wb - lo[..., None]) / scale[..., None]).round().clamp(0, qmax).to(torch.uint8)
        zp = (-lo / scale).round().clamp(0, qmax) if scheme == "min" else torch.full_like(scale, 1 << (bits - 1))
        mins = (lo + zp * scale).T.contiguous().numpy()
        zps = _pack_zero_points(zp.to(torch.uint8), bits).numpy() if scheme == "min" else None
        return Packed(bits, block, n, k, _pack_codes(q, bits).numpy(), scale.reshape(-1).numpy().copy(), zps, mins)
    if scheme == "asym":
        zp = (-lo / scale).round().clamp(0, qmax)
    q = (wb / scale[..., None] + zp[..., None]).round().clamp(0, qmax).to(torch.uint8)
    zps = None if scheme == "sym" else _pack_zero_points(zp.to(torch.uint8), bits).numpy()
    return Packed(bits, block, n, k, _pack_codes(q, bits).numpy(), scale.reshape(-1).numpy().copy(), zps, mins)


@contextmanager
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return q.contiguous()
    return (q[..., 0::2] | (q[..., 1::2] << 4)).contiguous()


def _pack_zero_points(zp: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return zp.reshape(-1).contiguous()
    if zp.shape[1] % 2:  # each row starts on a byte boundary
        zp = torch.cat((zp, torch.zeros(zp.shape[0], 1, dtype=torch.uint8)), dim=1)
    return (zp[:, 0::2] | (zp[:, 1::2] << 4)).reshape(-1).contiguous()


def unpack(p: Packed) -> torch.Tensor:
    """The fp32 weight [n, k] that the packed operands stand for."""
    codes = torch.from_numpy(p.codes)
    nb = p.k // p.block
    if p.bits == 4:
        q = torch.stack((codes & 0x0F, codes >> 4), dim=-1).reshape(p.n, nb, p.block)
    else:
        q = codes.reshape(p.n, nb, p.block)
    if p.zero_points is None:
        zp = torch.full((p.n, nb), 1 << (p.bits - 1), dtype=torch.uint8)
    elif p.bits == 4:
        zp = torch.from_numpy(p.zero_points).reshape(p.n, -1)
        zp = torch.stack((zp & 0x0F, zp >> 4), dim=-1).reshape(p.n, -1)[:, :nb]
    else:
        zp = torch.from_numpy(p.zero_points).reshape(p.n, nb)
    scale = torch.from_numpy(p.scales).reshape(p.n, nb)
    w = (q.float() - zp.float()[..., None]) * scale[..., None]
    if p.mins is not None:
        w = w + torch.from_numpy(p.mins).T[..., None]
    return w.reshape(p.n, p.k)


def concat(parts: list[Packed]) -> Packed:
    """Stack packed weights along n (rows): fused q|k|v or gate|up projections."""
    a = parts[0]
    assert all(p.bits == a.bits and p.block == a.block and p.k == a.k for p in parts)
    assert len({p.mins is None for p in parts}) == 1 and len({p.zero_points is None for p in parts}) == 1
    mins = None if a.mins is None else np.concatenate([p.mins for p in parts], axis=1)
    zps = None if a.zero_points is None else np.concatenate([p.zero_points for p in parts])
    return Packed(a.bits, a.block, sum(p.n for p in parts), a.k, np.concatenate([p.codes for p in parts]),
                  np.concatenate([p.scales for p in parts]), zps, mins)

