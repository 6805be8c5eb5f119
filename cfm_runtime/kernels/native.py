"""The native kernel (`cfm_kernel.cpp`): decode steps and prompt chunks of an int4 model in one C call each.

It reads the weights as GGUF blocks in place (Q4_1 linears, a Q8_0 head and embedding: `BlockWeights`), so a
GGUF file's own mapped pages are the model in memory; every position, of a prompt chunk or of a decode step,
goes through the same arithmetic (a chunk gives the same bits as the same tokens one at a time). A plain C
ABI through ctypes: no torch is needed to load or run it.

The library is compiled at install time by setup.py (`build.compile_kernel`, -O3 -march=native -fopenmp);
where that did not happen, `load()` compiles it once into the user cache (a few seconds) and says so through
`notice`. Without a compiler, without AVX2/FMA/F16C, or with `CFM_NATIVE=0`, `load()` returns None (the
reason in `failure()`) and callers take another path.
"""

from __future__ import annotations

import ctypes
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import build, stream
from .blocks import BlockWeights, down_columns

SIDE_KINDS = ("q", "k", "v", "o", "gate", "up", "down")  # the kernel's order of a layer's linears
# Extra time of one more position in a call, relative to a one-position call (speculative decoding's prior for
# its verification steps, refined by the steps it times), by path. Measured on 2 threads, embedded model, 1 to 9
# positions after a 73- or 145-token prompt: rows in groups of 16 (AVX-512 VNNI, a Xeon) 0.11-0.18, ~0.5-0.7 ms
# per position over a 3.9-4.1 ms step (0.16-0.27 as fitted inside generation); a row at a time 0.43-0.48 on an
# AMD EPYC.
POSITION_COST = {"groups": 0.2, "rows": 0.45}
# How much slower streamed weights arrive than the kernel reads held ones: 2-core Xeon, ~24 GB/s through the kernel
# (94 MB in a ~4 ms step) against 1.7 GB/s of O_DIRECT reads from its disk.
STREAM_SLOWDOWN = 14.0
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failure: str | None = None
_P = ctypes.c_void_p


def cache_dir() -> Path:
    base = os.environ.get("CFM_HOME") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / ("kernels" if os.environ.get("CFM_HOME") else "cfm/kernels")


def load(notice=None) -> ctypes.CDLL | None:
    """The kernel library, or None (the reason is in `failure()`). `notice(message)` is called before a build."""
    global _lib, _failure
    with _lock:
        if _lib is not None or _failure is not None:
            return _lib
        if os.environ.get("CFM_NATIVE", "1") == "0":
            _failure = "turned off by CFM_NATIVE=0"
            return None
        installed = Path(__file__).with_name(build.library_name())
        try:
            if installed.is_file():
                path = installed
            else:
                if notice is not None and not (cache_dir() / build.library_name()).is_file():
                    notice("compiling the native kernel (once, a few seconds)...")
                path = build.compile_kernel(cache_dir())
            # the kernel's OpenMP workers spin briefly (GOMP_SPINCOUNT iterations, some microseconds) at the
            # end of a parallel region, then sleep. Spinning without end loses the core to any other runnable
            # thread on a busy 2-core machine (230 ms per step vs 13 ms sleeping, measured under load); sleeping
            # at once pays a wake-up per region, ~60 regions a token (a quiet 2-core machine: 95 tok/s with
            # no spin, 245-265 with 2,000-10,000). Read once, when the kernel's OpenMP runtime starts; values
            # the user set are kept.
            os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
            os.environ.setdefault("GOMP_SPINCOUNT", "10000")
            lib = _bind(ctypes.CDLL(str(path)))
        except (OSError, RuntimeError) as e:
            _failure = f"the native kernel could not be built or loaded: {e}"
            warnings.warn(_failure + "; running on the slower onnxruntime path", stacklevel=2)
            return None
        if not lib.cfm_available():
            _failure = "this CPU or build has no AVX2/FMA/F16C (the native kernel's instructions)"
            return None
        _lib = lib
        return _lib


def failure() -> str | None:
    return _failure


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    i, f = ctypes.c_int, ctypes.c_float
    lib.cfm_available.restype = i
    lib.cfm_new.restype = _P
    lib.cfm_new.argtypes = [i, i, i, i, i, i, i, i, f, i, _P, _P]
    lib.cfm_free.argtypes = [_P]
    lib.cfm_set_groups.restype = i
    lib.cfm_set_groups.argtypes = [_P, i]
    lib.cfm_set_layer.argtypes = [_P, i] + [_P] * 9
    lib.cfm_set_head.argtypes = [_P, _P, _P, _P]
    lib.cfm_set_side.restype = i
    lib.cfm_set_side.argtypes = [_P, i, i, i, _P, _P]
    lib.cfm_embed.argtypes = [_P, i, _P, _P]
    lib.cfm_forward.restype = i
    lib.cfm_forward.argtypes = [_P, i, _P, _P, i, i, _P, _P, _P, i, _P]
    lib.cfm_head_rows.restype = i
    lib.cfm_head_rows.argtypes = [_P, i, _P, _P, i, _P, i]
    lib.cfm_q41_matmul.restype = i
    lib.cfm_q41_matmul.argtypes = [i, _P, _P, i, i, _P, _P, i]
    lib.cfm_set_sparse.restype = i
    lib.cfm_set_sparse.argtypes = [_P, i, i, _P, _P]
    lib.cfm_bundles_f32.restype = i
    lib.cfm_bundles_f32.argtypes = [ctypes.c_int64, ctypes.c_int64, i, _P, _P, _P, _P, _P, i]
    return lib


def supported(w: BlockWeights | None) -> bool:
    """Whether the kernel implements this decoder (SiLU, adjacent-pair rotary, no attention biases)."""
    return w is not None and w.activation == "silu" and w.interleaved_rope and not w.qkv_bias


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


@dataclass(frozen=True)
class SparseFFN:
    """The kernel's sparse FFN: layer i computes, at every position, the keep[i] neurons (of d_ff) of largest
    |activation|, selected from the layer's own gate and up rows (exact), and reads only their down columns
    (`columns[i]`: `blocks.down_columns`, None where the layer is dense)."""

    keep: tuple[int, ...]
    columns: tuple[tuple[np.ndarray, np.ndarray] | None, ...]

    @classmethod
    def build(cls, w: BlockWeights, densities: list[float]) -> "SparseFFN":
        """Per-layer densities -> the neurons kept (rounded, at least 1) and the down columns of the sparse layers."""
        keep = tuple(max(1, min(w.d_ff, round(dens * w.d_ff))) for dens in densities)
        return cls(keep, tuple(down_columns(layer.down, w.d_model) if k < w.d_ff else None
                               for k, layer in zip(keep, w.layers)))

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes + s.nbytes for c, s in (x for x in self.columns if x is not None))

    def report(self, d_ff: int) -> dict:
        return {"density": round(sum(self.keep) / (d_ff * len(self.keep)), 3),
                "layers_sparse": sum(k < d_ff for k in self.keep),
                "min_density": round(min(self.keep) / d_ff, 3), "max_density": round(max(self.keep) / d_ff, 3),
                "down_columns_mb": round(self.nbytes / 2**20, 1)}


class NativeDecoder:
    """A decoder over `BlockWeights` (held: the kernel reads their memory) with optional low-rank side terms.
    With `held` (`stream.hold`: weights within a RAM budget) the parts it does not hold are read from the file
    as each call reaches them."""

    def __init__(self, w: BlockWeights, threads: int, lib: ctypes.CDLL, held: "stream.Held | None" = None,
                 sparse: SparseFFN | None = None):
        if held is not None and sparse is not None:
            raise ValueError("the kernel's sparse FFN holds its down columns in RAM: not with a RAM budget")
        if held is not None:
            w = held.weights
        self.w, self.lib, self.held, self.sparse = w, lib, held, sparse
        self._stream_lock = threading.Lock()
        self.d, self.vocab = w.d_model, w.vocab_size
        self.ptr = lib.cfm_new(len(w.layers), w.d_model, w.n_heads, w.n_kv_heads, w.head_dim, w.d_ff, w.vocab_size,
                               w.context_length, w.eps, threads, _ptr(w.cos), _ptr(w.sin))
        for i, layer in enumerate(w.layers):
            self._set_layer(i, layer)
        lib.cfm_set_head(self.ptr, _ptr(w.final_norm), _ptr(w.head), _ptr(w.embed))
        if sparse is not None:
            for i, (keep, cols) in enumerate(zip(sparse.keep, sparse.columns)):
                if cols is not None and lib.cfm_set_sparse(self.ptr, i, keep, _ptr(cols[0]), _ptr(cols[1])) != 0:
                    raise ValueError(f"layer {i}: the kernel refused a sparse FFN of {keep} neurons")
        self._sides: set[tuple[int, str]] = set()
        self.groups = self.set_groups(os.environ.get("CFM_KERNEL_GROUPS", "1") != "0")  # 0: the AVX2 row path

    def _set_layer(self, i: int, layer) -> None:
        self.lib.cfm_set_layer(self.ptr, i, *(_ptr(getattr(layer, k)) for k in ("ln1", "ln2", *SIDE_KINDS)))

    def __del__(self):
        if getattr(self, "held", None) is not None:
            self.held.close()
        if getattr(self, "ptr", None):
            self.lib.cfm_free(self.ptr)
            self.ptr = None

    def report(self) -> dict:
        """What it holds within a RAM budget and reads from the file, and its sparse FFN."""
        out = {}
        if self.held is not None:
            out["ram_budget"] = self.held.report()
        if self.sparse is not None:
            out["sparse_ffn"] = self.sparse.report(self.w.d_ff)
        return out

    def set_groups(self, on: bool) -> bool:
        """Rows in groups of 16 (the default where the CPU has AVX-512 VNNI) or one at a time (the AVX2 path);
        -> whether groups are used. Both paths give the same integers and differ only in float rounding."""
        self.groups = bool(self.lib.cfm_set_groups(self.ptr, int(on)))
        return self.groups

    @property
    def path(self) -> str:
        """"groups" (16 rows per register, AVX-512 VNNI) or "rows" (AVX2)."""
        return "groups" if self.groups else "rows"

    @property
    def position_cost(self) -> float:
        """Speculation's prior: with streamed weights a step also waits for the bytes it reads, which further
        positions do not add (`STREAM_SLOWDOWN`), so each costs a smaller share of the step."""
        base = POSITION_COST[self.path]
        if self.held is None or self.held.stream is None:
            return base
        share = self.held.plan.streamed / self.held.plan.total
        return base / (1 + STREAM_SLOWDOWN * share)

    def set_sides(self, sides: dict) -> None:
        """Low-rank side terms {(layer, kind): (A [r, in], B [out, r])} replacing the previous ones (copied)."""
        for layer, kind in self._sides - set(sides):
            self.lib.cfm_set_side(self.ptr, layer, SIDE_KINDS.index(kind), 0, None, None)
        for (layer, kind), (a, b) in sides.items():
            a = np.ascontiguousarray(a, dtype=np.float32)
            b = np.ascontiguousarray(b, dtype=np.float32)
            self.lib.cfm_set_side(self.ptr, layer, SIDE_KINDS.index(kind), a.shape[0], _ptr(a), _ptr(b))
        self._sides = set(sides)

    def embed(self, ids) -> np.ndarray:
        """Token embeddings [n, d] from the Q8_0 embedding rows."""
        tokens = np.ascontiguousarray(ids, dtype=np.int64)
        if self.held is not None and not self.held.plan.head_held and self.held.embed_offset >= 0:
            return self.held.embed_rows(tokens, self.d)
        out = np.empty((len(tokens), self.d), dtype=np.float32)
        self.lib.cfm_embed(self.ptr, len(tokens), _ptr(tokens), _ptr(out))
        return out

    def step(self, x: np.ndarray, caches: list, first: int, last: int, head: bool = False) -> np.ndarray:
        """One position per sequence: x [B, d] entering layer `first`; caches[i]: sequence i's KV caches
        (`cache.KVCache`) of layers [first, last), each at its next position. -> [B, d] leaving layer last - 1, or
        with `head` the logits [B, vocab]; appends the position to every cache."""
        pos = [c[0].offset for c in caches] if last > first else [0] * len(x)
        for seq, p in zip(caches, pos):
            for kv in seq:
                kv.reserve(p + 1)
        out = self._run(x, pos, caches, first, last, len(x) if head else 0)
        for seq, p in zip(caches, pos):
            for kv in seq:
                kv.offset = p + 1
        return out

    def chunk(self, x: np.ndarray, layers: list, first: int, last: int, head: int = 0) -> np.ndarray:
        """T positions of one sequence: x [T, d] after the cached ones; `layers`: its KV caches of [first, last).
        Computed exactly as T single steps would be. -> [T, d], or with head = n > 0 the logits [n, vocab] of
        the last n positions; appends the T positions to the caches."""
        t = len(x)
        start = layers[0].offset if layers else 0
        for kv in layers:
            kv.reserve(start + t)
        out = self._run(x, list(range(start, start + t)), [layers] * t, first, last, head)
        for kv in layers:
            kv.offset = start + t
        return out

    def _run(self, x: np.ndarray, pos: list[int], caches: list, first: int, last: int, head: int) -> np.ndarray:
        h = np.array(x, dtype=np.float32, order="C")  # the kernel updates it in place
        positions = np.asarray(pos, dtype=np.int64)
        caps = np.asarray([seq[0].capacity if seq else 0 for seq in caches], dtype=np.int32)
        if self.held is None or self.held.stream is None:
            return self._forward(h, positions, caches, caps, first, last, first, last, head)
        with self._stream_lock:  # one call at a time through the staging slots
            return self._streamed(h, positions, caches, caps, first, last, head)

    def _forward(self, h, positions, caches, caps, first, last, a, b, head) -> np.ndarray:
        """Layers [a, b) of a call over [first, last) (caches hold [first, last)), then the head of `head` rows."""
        rows = len(positions)
        n = max(1, rows * (b - a))
        ks = (ctypes.c_void_p * n)(*[kv.k_ptr for seq in caches for kv in seq[a - first:b - first]])
        vs = (ctypes.c_void_p * n)(*[kv.v_ptr for seq in caches for kv in seq[a - first:b - first]])
        logits = np.empty((head, self.vocab), dtype=np.float32) if head else None
        status = self.lib.cfm_forward(self.ptr, rows, _ptr(h), _ptr(positions), a, b, ks, vs, _ptr(caps), head,
                                      _ptr(logits) if head else None)
        if status != 0:
            raise RuntimeError("the native kernel was built without its instructions")
        return logits if head else h

    def _streamed(self, h, positions, caches, caps, first, last, head) -> np.ndarray:
        held, stream = self.held, self.held.stream
        for a in range(first, last):  # layers run here for the first time are held while the budget has room
            if not held.room():
                break
            if a not in held.pinned:
                self._set_layer(a, held.pin(a))
        a = first
        while a < last:  # runs of held layers in one call each, a streamed layer alone while its slot holds it
            if a in held.pinned:
                b = a + 1
                while b < last and b in held.pinned:
                    b += 1
                self._forward(h, positions, caches, caps, first, last, a, b, 0)
            else:
                b = a + 1
                key = ("layer", a)
                ptrs = stream.parts(key, stream.acquire(key))
                layer = self.w.layers[a]
                try:
                    self.lib.cfm_set_layer(self.ptr, a, _ptr(layer.ln1), _ptr(layer.ln2),
                                           *(ptrs[k] for k in SIDE_KINDS))
                    self._forward(h, positions, caches, caps, first, last, a, b, 0)
                finally:
                    stream.release(key)
            a = b
        if not head:
            return h
        if held.plan.head_held:
            return self._forward(h, positions, caches, caps, first, last, last, last, head)
        logits = np.empty((head, self.vocab), dtype=np.float32)
        x = np.ascontiguousarray(h[len(h) - head:])
        for first_row, rows in held.head_parts:
            key = ("head", first_row, rows)
            base = stream.acquire(key)
            try:
                self.lib.cfm_head_rows(self.ptr, head, _ptr(x), base + stream.units[key].parts["head"], rows,
                                       _ptr(logits) + first_row * logits.itemsize, self.vocab)
            finally:
                stream.release(key)
        return logits
