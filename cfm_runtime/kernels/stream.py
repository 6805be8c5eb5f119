"""The native kernel's weights within a RAM budget: what the budget does not hold is read from the model file
each time it is used.

A budget (`plan`) holds, in this order: the norms and rotary tables, a few staging slots (when anything is
streamed), the LM head (also the embedding table when tied), then as many whole layers as fit. Which layers:
the first ones this process runs, each held from its first use on (`Held.pin`): a local run holds layers from
the first, a split run's edge its own layers and never the center's. The rest is *streamed*: each decoder
layer, and the head in parts of about a layer's size when it does not fit, is read into a staging slot just
before the kernel uses it, read ahead on a reader thread while the kernel computes. Reads go straight from the
file with O_DIRECT where the file system allows it: no page cache, so under a cgroup memory cap there is nothing
to reclaim and nothing that pushes out the held weights. Held parts are anonymous copies read the same way.

A streamed unit gives the kernel the very bytes it reads from the mapped file, and head parts come in whole
groups of 16 rows, so a budget changes the speed, never the numbers (`tests/test_stream.py`).
"""

from __future__ import annotations

import mmap
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from .blocks import BlockLayer, BlockWeights

ALIGN = 4096  # O_DIRECT's offset, length and buffer alignment (a page; the file system's block divides it)
SLOTS = 3  # staging slots: one in use by the kernel, two read ahead
LAYER_KINDS = ("q", "k", "v", "o", "gate", "up", "down")
MB = 2**20


class BudgetError(ValueError):
    """A budget or a model this module cannot serve (`cfm_runtime.runtime` reports it as a CfmError)."""


def mapped_offset(a: np.ndarray) -> tuple[str, int] | None:
    """(file, byte offset) of an array that is a view of a memory-mapped file (`np.memmap`), else None."""
    base = a
    while isinstance(base.base, np.ndarray):
        base = base.base
    if not isinstance(base, np.memmap) or base.filename is None:
        return None
    return base.filename, a.ctypes.data - base.ctypes.data + base.offset


@dataclass
class Unit:
    """What is read in one go: file runs (aligned start, aligned length, position in the buffer) and where each
    tensor lands (name -> offset in the buffer)."""

    key: tuple  # ("layer", i) or ("head", first row, rows)
    runs: list[tuple[int, int, int]]
    parts: dict[str, int]
    nbytes: int  # buffer bytes (aligned)


def _unit(key: tuple, tensors: dict[str, tuple[int, int]], max_gap: int = 1 << 16) -> Unit:
    """A unit of tensors {name: (file offset, bytes)}: neighbours in the file (gaps up to max_gap) share a run."""
    spans = sorted(tensors.items(), key=lambda kv: kv[1][0])
    groups: list[list] = []
    for name, (off, n) in spans:
        if groups and off - groups[-1][-1][1][0] - groups[-1][-1][1][1] <= max_gap:
            groups[-1].append((name, (off, n)))
        else:
            groups.append([(name, (off, n))])
    runs, parts, at = [], {}, 0
    for group in groups:
        start = group[0][1][0] // ALIGN * ALIGN
        end = -(-max(off + n for _, (off, n) in group) // ALIGN) * ALIGN
        runs.append((start, end - start, at))
        for name, (off, _) in group:
            parts[name] = at + off - start
        at += end - start
    return Unit(key, runs, parts, at)


class FileReader:
    """Reads file runs into page-aligned buffers: O_DIRECT where the file system takes it, else buffered reads
    whose pages are dropped from the cache after each read."""

    def __init__(self, path: str, direct: bool = True):
        self.path = path
        self.direct = False
        flag = getattr(os, "O_DIRECT", 0) if direct else 0
        if flag:
            try:
                fd = os.open(path, os.O_RDONLY | flag)
                probe = mmap.mmap(-1, ALIGN, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                try:
                    os.preadv(fd, [probe], 0)
                    self.fd, self.direct = fd, True
                except OSError:
                    os.close(fd)
                finally:
                    probe.close()
            except OSError:
                pass
        if not self.direct:
            self.fd = os.open(path, os.O_RDONLY)
        self.rows_fd = os.open(path, os.O_RDONLY)  # small random reads (embedding rows), no read-ahead
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self.rows_fd, 0, 0, os.POSIX_FADV_RANDOM)

    def read(self, unit: Unit, buf: memoryview) -> int:
        total = 0
        for start, length, at in unit.runs:
            done = 0
            while done < length:
                n = os.preadv(self.fd, [buf[at + done:at + length]], start + done)
                if n <= 0:
                    break  # the file's end: the aligned run reaches past it
                done += n
            if not self.direct and hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self.fd, start, length, os.POSIX_FADV_DONTNEED)
            total += done
        return total

    def pread(self, offset: int, n: int) -> bytes:
        return os.pread(self.rows_fd, n, offset)

    def close(self) -> None:
        """Close the files (once: a number closed twice could by then be another file's)."""
        fds, self.fd, self.rows_fd = (self.fd, self.rows_fd), -1, -1
        for fd in fds:
            if fd >= 0:
                os.close(fd)


def _buffer(nbytes: int) -> tuple[mmap.mmap, np.ndarray]:
    """Page-aligned anonymous memory (O_DIRECT's buffers), as a mapping and a uint8 array over it."""
    mm = mmap.mmap(-1, max(ALIGN, nbytes), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return mm, np.frombuffer(mm, dtype=np.uint8)


@dataclass
class Plan:
    """What a budget holds: the head or not, room for `held_layers` layers; the rest streamed. Sizes in bytes; the
    layers' figures (`parts["layers"]`, `streamed`) are for a run that uses every layer."""

    budget: int
    head_held: bool
    held_layers: int
    head_rows: int  # rows per streamed head part
    parts: dict[str, int] = field(default_factory=dict)  # held bytes by part
    streamed: int = 0  # bytes read per pass over the model
    total: int = 0  # bytes of every weight (`weight_bytes`)


def _layer_tensors(layer: BlockLayer) -> dict[str, tuple[int, int]]:
    out = {}
    for kind in LAYER_KINDS:
        a = getattr(layer, kind)
        where = mapped_offset(a)
        if where is None:
            raise BudgetError("a RAM budget on the int4 path reads the layers from a GGUF file that stores them "
                              "as Q4_1; this model's were converted when loaded (load it with --weights fp32 and "
                              "the neuron pack's offload, or without a budget)")
        out[kind] = (where[1], a.nbytes)
    return out


def layout(w: BlockWeights) -> tuple[str, list[Unit], int]:
    """(file, a unit per layer, the head's file offset) of a model whose blocks are views of its GGUF file."""
    head = mapped_offset(w.head)
    if head is None:
        raise BudgetError("a RAM budget on the int4 path needs the LM head stored as Q8_0 in the GGUF file")
    return head[0], [_unit(("layer", i), _layer_tensors(layer)) for i, layer in enumerate(w.layers)], head[1]


def head_row_bytes(w: BlockWeights) -> int:
    return w.head.shape[1]


def _tables(w: BlockWeights) -> int:
    return w.cos.nbytes + w.sin.nbytes + w.final_norm.nbytes + sum(l.ln1.nbytes + l.ln2.nbytes for l in w.layers)


def weight_bytes(w: BlockWeights, units: list[Unit] | None = None) -> int:
    """What holding every weight takes (tables, head, layers as read from the file; `units`: the layers' units
    if the caller has them)."""
    return _tables(w) + w.head.nbytes + sum(u.nbytes for u in (units if units is not None else layout(w)[1]))


def plan(w: BlockWeights, budget_mb: float, slots: int = SLOTS) -> Plan:
    """How `budget_mb` of weights is spent (see the module's note); a budget below the fixed parts is refused
    with the parts listed."""
    budget = int(budget_mb * MB)
    _, units, _ = layout(w)
    row = head_row_bytes(w)
    head = w.head.nbytes
    layer = max(u.nbytes for u in units)
    tables = _tables(w)
    everything = weight_bytes(w, units)
    if budget >= everything:
        return Plan(budget, True, len(units), w.vocab_size,
                    {"tables": tables, "head": head, "layers": everything - tables - head}, 0, everything)
    # streamed head parts: whole groups of 16 rows, about a layer's bytes (so they share the slots)
    rows = max(16, layer // row // 16 * 16) if w.vocab_size % 16 == 0 else w.vocab_size
    slot = ALIGN + max(layer, -(-rows * row // ALIGN) * ALIGN + ALIGN)
    fixed = tables + slots * slot
    if w.vocab_size % 16:  # parts would round differently from the whole head: it must be held
        fixed += head
    if budget < fixed:
        parts = f"norms and rotary tables {tables / MB:.1f} MB, {slots} staging slots {slots * slot / MB:.1f} MB" + \
                (f", the LM head {head / MB:.1f} MB (its {w.vocab_size} rows are not in groups of 16)"
                 if w.vocab_size % 16 else "")
        raise BudgetError(f"--ram-budget {budget_mb:g} MB does not hold this model's fixed parts ({parts}: "
                       f"{fixed / MB:.1f} MB); give at least {-(-fixed // MB)} MB")
    left = budget - fixed
    head_held = w.vocab_size % 16 != 0 or left >= head
    if head_held and w.vocab_size % 16 == 0:
        left -= head
    held = 0
    for u in units:
        if left < u.nbytes:
            break
        left -= u.nbytes
        held += 1
    held_layers_bytes = sum(u.nbytes for u in units[:held])
    streamed = sum(u.nbytes for u in units[held:]) + (0 if head_held else head)
    return Plan(budget, head_held, held, rows,
                {"tables": tables, "staging": slots * slot, "head": head if head_held else 0,
                 "layers": held_layers_bytes}, streamed, everything)


class WeightStream:
    """Streamed units read into staging slots on a reader thread, ahead of their use.

    What comes next is learned: each unit's successor is the unit acquired after it last time (at first, the
    file's order), so the read-ahead follows the calls as they come (a split run's edge uses only some layers; a
    prompt chunk and a decode step take the same path). A needed unit with no free slot takes the slot of a
    unit read ahead but not in use."""

    def __init__(self, reader: FileReader, units: list[Unit], slots: int = SLOTS):
        self.reader, self.units = reader, {u.key: u for u in units}
        order = [u.key for u in units]
        self._next = {k: order[(i + 1) % len(order)] for i, k in enumerate(order)}
        self._last: tuple | None = None
        size = max(u.nbytes for u in units)
        self._buffers = [_buffer(size) for _ in range(slots)]
        self._free = list(range(slots))
        self._pending: dict[tuple, tuple[Future, int]] = {}  # read or being read into a slot
        self._in_use: set[tuple] = set()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="cfm-weights")
        self.bytes_read = 0
        self.reads = 0
        self.wait_s = 0.0

    def _read(self, key: tuple, slot: int) -> None:
        n = self.reader.read(self.units[key], memoryview(self._buffers[slot][0]))
        self.bytes_read += n
        self.reads += 1

    def _start(self, key: tuple) -> None:  # under the lock
        if key not in self._pending and self._free:
            slot = self._free.pop()
            self._pending[key] = (self._pool.submit(self._read, key, slot), slot)

    def acquire(self, key: tuple) -> int:
        """Address of `key`'s bytes in a slot (read now if no read-ahead has it); hold it until `release`."""
        return self._buffers[self._acquire(key)][1].ctypes.data

    def take(self, key: tuple, out: np.ndarray) -> None:
        """Copy `key`'s bytes into `out` (through a slot, so a read-ahead of it is used) and stop streaming it."""
        slot = self._acquire(key)
        try:
            out[:] = self._buffers[slot][1][:len(out)]
        finally:
            self.release(key)
        with self._lock:
            after = self._next.pop(key)
            for k, v in self._next.items():
                if v == key:
                    self._next[k] = after if after != key else k
            if self._last == key:
                self._last = None
            entry = self._pending.pop(key, None)  # read ahead again by the release: wait for it, free its slot
        if entry is not None:
            entry[0].result()
            with self._lock:
                self._free.append(entry[1])
        del self.units[key]

    def _acquire(self, key: tuple) -> int:
        with self._lock:
            if self._last is not None and self._last != key:
                self._next[self._last] = key
            self._last = key
            if key not in self._pending and not self._free:
                spare = next((k for k in self._pending if k not in self._in_use), None)
                if spare is None:
                    raise RuntimeError(f"all {len(self._buffers)} staging slots are in use")
                future, slot = self._pending.pop(spare)
                future.result()  # a read in flight finishes before its slot is reused
                self._free.append(slot)
            self._start(key)
            future, slot = self._pending[key]
            self._in_use.add(key)
        t = time.perf_counter()
        future.result()
        self.wait_s += time.perf_counter() - t
        self._read_ahead(key)
        return slot

    def release(self, key: tuple) -> None:
        with self._lock:
            _, slot = self._pending.pop(key)
            self._in_use.discard(key)
            self._free.append(slot)
        self._read_ahead(key)  # the freed slot takes the next unit at once, while held layers compute

    def _read_ahead(self, key: tuple) -> None:
        """Start reading the units expected after `key` into whatever slots are free."""
        with self._lock:
            k = key
            for _ in range(len(self._next)):
                k = self._next[k]
                if not self._free or k == key:
                    break
                self._start(k)

    def parts(self, key: tuple, base: int) -> dict[str, int]:
        return {name: base + at for name, at in self.units[key].parts.items()}

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._buffers = []


@dataclass
class Held:
    """The weights as a plan holds them: `weights` (held parts are anonymous copies; streamed layers keep their
    mapped views, which the kernel is never pointed at) and the stream of the rest (None if all is held).
    Layers are held from their first use while the plan has room (`pin`); `pinned` lists them."""

    weights: BlockWeights
    plan: Plan
    stream: WeightStream | None
    reader: FileReader
    head_parts: list[tuple[int, int]]  # streamed head: (first row, rows) per part
    embed_offset: int  # file offset of the embedding rows (read one by one when the head is streamed)
    direct: bool = False
    _keep: list = field(default_factory=list)
    pinned: set[int] = field(default_factory=set)
    pinned_bytes: int = 0

    def room(self) -> bool:
        """Whether another layer can be held."""
        return len(self.pinned) < self.plan.held_layers

    def pin(self, i: int) -> BlockLayer:
        """Hold layer i from now on (the plan must have room): its bytes are copied into anonymous memory, through
        the stream, which stops streaming it. -> the layer over the copy (the same bytes as the file's)."""
        key = ("layer", i)
        unit = self.stream.units[key]
        mm, arr = _buffer(unit.nbytes)
        self.stream.take(key, arr[:unit.nbytes])
        self._keep.append(mm)
        self.pinned_bytes += unit.nbytes
        layer = self.weights.layers[i]
        self.weights.layers[i] = replace(layer, **{k: _view(arr, unit.parts[k], getattr(layer, k))
                                                   for k in LAYER_KINDS})
        self.pinned.add(i)
        return self.weights.layers[i]

    def report(self) -> dict:
        p = self.plan
        held = dict(p.parts)
        if "layers" in held and self.stream is not None:  # the layers held so far
            held["layers"] = self.pinned_bytes
        out = {"ram_budget_mb": round(p.budget / MB, 1),
               "held_mb": {k: round(v / MB, 1) for k, v in held.items()},
               "held_layers": len(self.pinned) if self.stream is not None else p.held_layers,
               "layer_room": p.held_layers, "head_held": p.head_held,
               "streamed_mb_per_pass": round(p.streamed / MB, 1), "direct_io": self.direct}
        if self.stream is not None:
            out.update(read_mb=round(self.stream.bytes_read / MB, 1), reads=self.stream.reads,
                       read_wait_s=round(self.stream.wait_s, 3))
        return out

    def embed_rows(self, tokens: np.ndarray, d: int) -> np.ndarray:
        """Q8_0 embedding rows read from the file, dequantized as the kernel does (float(scale) * int8)."""
        row = (d // 32) * 34
        out = np.empty((len(tokens), d), dtype=np.float32)
        for j, t in enumerate(tokens):
            raw = np.frombuffer(self.reader.pread(self.embed_offset + int(t) * row, row), dtype=np.uint8)
            blocks = raw.reshape(-1, 34)
            scale = blocks[:, :2].copy().view(np.float16).astype(np.float32)
            out[j] = (scale * blocks[:, 2:].view(np.int8).astype(np.float32)).reshape(-1)
        return out

    def close(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.reader.close()


def _view(arr: np.ndarray, at: int, like: np.ndarray) -> np.ndarray:
    return arr[at:at + like.nbytes].reshape(like.shape)


def hold(w: BlockWeights, budget_mb: float, slots: int = SLOTS, direct: bool = True) -> Held:
    """Read what `plan(w, budget_mb)` holds into anonymous memory and set up the stream of the rest (with
    `direct`, O_DIRECT reads where the file system allows them). When not everything fits, layers are held from
    their first use (`Held.pin`)."""
    p = plan(w, budget_mb, slots)
    path, units, head_offset = layout(w)
    embed = mapped_offset(w.embed)
    reader = FileReader(path, direct)
    keep: list = []

    def copy(unit: Unit) -> np.ndarray:
        mm, arr = _buffer(unit.nbytes)
        reader.read(unit, memoryview(mm))
        keep.append(mm)
        return arr

    everything = p.streamed == 0
    layers = []
    for i, layer in enumerate(w.layers):
        norms = {"ln1": np.array(layer.ln1, dtype=np.float32), "ln2": np.array(layer.ln2, dtype=np.float32)}
        if everything:
            arr = copy(units[i])
            layers.append(BlockLayer(**norms, **{k: _view(arr, units[i].parts[k], getattr(layer, k))
                                                 for k in LAYER_KINDS}))
        else:
            layers.append(replace(layer, **norms))
    head, streamed, head_parts = w.head, [] if everything else list(units), []
    if p.head_held:
        unit = _unit(("head",), {"head": (head_offset, w.head.nbytes)})
        head = _view(copy(unit), unit.parts["head"], w.head)
    else:
        row = head_row_bytes(w)
        for first in range(0, w.vocab_size, p.head_rows):
            rows = min(p.head_rows, w.vocab_size - first)
            head_parts.append((first, rows))
            streamed.append(_unit(("head", first, rows), {"head": (head_offset + first * row, rows * row)}))
    tied = embed is not None and embed[1] == head_offset
    weights = replace(w, layers=layers, head=head, embed=head if (tied and p.head_held) else w.embed,
                      final_norm=np.array(w.final_norm, dtype=np.float32))
    stream = WeightStream(reader, streamed, slots) if streamed else None
    return Held(weights, p, stream, reader, head_parts, embed[1] if embed else -1, reader.direct, keep)
