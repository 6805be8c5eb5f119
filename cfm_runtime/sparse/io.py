"""Reading neuron bundles from flash: coalesced runs, parallel `os.preadv`, a per-layer neuron cache.

Random 4 KiB reads are slow on flash and sequential ones fast (FACTS.md), so a layer's misses are
sorted by pack position and merged into runs whose gaps are at most `max_gap` bundles (reading a
few unneeded neurons is cheaper than another request); the runs of a layer are spread over a
thread pool (`os.preadv` releases the GIL) and scattered straight into their destination rows.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def plan_runs(positions: np.ndarray, max_gap: int) -> list[tuple[int, int]]:
    """Sorted pack positions -> [(start, end)) runs, merging gaps of at most max_gap positions."""
    if len(positions) == 0:
        return []
    breaks = np.nonzero(np.diff(positions) > max_gap + 1)[0]
    starts = np.concatenate(([positions[0]], positions[breaks + 1]))
    ends = np.concatenate((positions[breaks], [positions[-1]])) + 1
    return list(zip(starts.tolist(), ends.tolist()))


def drop_page_cache(path) -> None:
    """Evict a file from the page cache (cold-flash measurements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class IOCounters:
    def __init__(self):
        self.lock = threading.Lock()
        self.bytes = self.reads = 0

    def add(self, nbytes: int, reads: int) -> None:
        with self.lock:
            self.bytes += nbytes
            self.reads += reads


class BundleFile:
    """The pack's neurons.bin: reads of bundle ranges [start, end) of a layer into row buffers."""

    def __init__(self, path, layer_offsets: list[int], bundle_bytes: int, threads: int = 8):
        self.fd = os.open(path, os.O_RDONLY)
        self.offsets, self.bundle = layer_offsets, bundle_bytes
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="cfm-neurons")
        self.io = IOCounters()

    def close(self) -> None:
        self.pool.shutdown(wait=True)
        os.close(self.fd)

    def read_rows(self, layer: int, start: int, rows: list[memoryview]) -> None:
        """Read consecutive bundles from `start` of `layer` into the byte buffers `rows` (one preadv)."""
        off = self.offsets[layer] + start * self.bundle
        want = sum(r.nbytes for r in rows)
        got = os.preadv(self.fd, rows, off)
        if got != want:
            raise OSError(f"short read from the neuron pack: {got} of {want} bytes at offset {off}")
        self.io.add(want, 1)

    def read_block(self, layer: int, start: int, out: np.ndarray) -> None:
        """Read bundles [start, start + len(out)) of `layer` into contiguous rows out [n, bytes] (parallel chunks)."""
        n = out.shape[0]
        step = max(1, -(-n // max(1, self.pool._max_workers)))
        futures = [self.pool.submit(self.read_rows, layer, start + s, [memoryview(out[s:s + step]).cast("B")])
                   for s in range(0, n, step)]
        for f in futures:
            f.result()

    def read_scattered(self, layer: int, runs: list[tuple[int, int]], dest_of) -> None:
        """Read runs of `layer` in parallel; dest_of(position) gives the row buffer for each bundle."""
        # one preadv takes at most IOV_MAX (1024) buffers: long runs go in pieces
        pieces = [(s, min(s + 512, b)) for a, b in runs for s in range(a, b, 512)]
        futures = [self.pool.submit(self.read_rows, layer, a, [dest_of(p) for p in range(a, b)]) for a, b in pieces]
        for f in futures:
            f.result()


class NeuronCache:
    """One layer's cache of cold bundles: `capacity` rows, least-recently-used eviction.

    Keyed by pack position; `last[slot]` is the decode step that last used a slot, so a neuron
    kept over consecutive tokens is a hit (LLM-in-a-Flash's sliding window is LRU with a window of steps).
    """

    def __init__(self, capacity: int, n_positions: int, row_bytes: int):
        self.capacity = capacity
        self.rows = np.zeros((capacity, row_bytes), dtype=np.uint8)
        self.slot_of = np.full(n_positions, -1, dtype=np.int64)
        self.pos_of = np.full(capacity, -1, dtype=np.int64)
        self.last = np.full(capacity, -1, dtype=np.int64)

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes

    def lookup(self, positions: np.ndarray, step: int) -> np.ndarray:
        """Slots of positions (-1 for misses); marks hits as used at `step`."""
        slots = self.slot_of[positions]
        hit = slots >= 0
        self.last[slots[hit]] = step
        return slots

    def assign(self, positions: np.ndarray, step: int) -> np.ndarray:
        """Give missing positions slots, evicting the least recently used not used at `step`; -1 if full."""
        free = np.nonzero(self.last < step)[0]
        n = min(len(positions), len(free))
        victims = free[np.argsort(self.last[free], kind="stable")[:n]]
        old = self.pos_of[victims]
        self.slot_of[old[old >= 0]] = -1
        self.pos_of[victims] = positions[:n]
        self.slot_of[positions[:n]] = victims
        self.last[victims] = step
        out = np.full(len(positions), -1, dtype=np.int64)
        out[:n] = victims
        return out
