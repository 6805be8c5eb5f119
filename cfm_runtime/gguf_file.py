"""A fast GGUF header reader; tensor data is memory-mapped and dequantized by the `gguf` package.

`gguf.GGUFReader` builds a numpy memmap view for every element of every metadata array, which
takes ~6 s on the embedded model's 49k-token vocabulary. The layout is simple (GGUF spec:
magic, version, counts, key/value pairs, tensor infos, aligned data), so the header is parsed
here with `struct`, large arrays skipped; types, block sizes and dequantization come from `gguf`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelFileError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
MAX_ARRAY_KEPT = 4096  # by default longer metadata arrays (vocabularies, merges) are skipped, not decoded


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first): the reverse of GGUF's ne[]
    qtype: object  # gguf.GGMLQuantizationType
    offset: int  # absolute offset of the data in the file
    n_bytes: int
    data: np.ndarray | None = None  # raw memmap view: typed for float types, uint8 blocks otherwise


class _Cursor:
    def __init__(self, buf: memoryview, path: Path, max_array: int | None):
        self.buf, self.pos, self.path = buf, 0, path
        self.max_array = max_array

    def read(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated: its header ends at byte {len(self.buf)}")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self) -> str:
        n = self.read("<Q")
        if self.pos + n > len(self.buf):
            raise ModelFileError(f"{self.path} is truncated: a header string runs past the end of the file")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def _skip(self, count: int) -> bool:
        return self.max_array is not None and count > self.max_array

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.read(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.read("<I"), self.read("<Q")
            if etype in _SCALARS and self._skip(count):
                self.pos += count * struct.calcsize(_SCALARS[etype])
                return None
            if etype == _STRING and self._skip(count):
                buf, pos, end = self.buf, self.pos, len(self.buf)  # the hot loop of a skipped vocabulary
                for _ in range(count):
                    if pos + 8 > end:
                        raise ModelFileError(f"{self.path} is truncated: its header ends at byte {end}")
                    pos += 8 + struct.unpack_from("<Q", buf, pos)[0]
                self.pos = pos
                return None
            return [self.value(etype) for _ in range(count)]
        raise ModelFileError(f"{self.path} is corrupt: unknown metadata value type {vtype} at byte {self.pos}")


def read_gguf(path: Path, max_array: int | None = MAX_ARRAY_KEPT) -> tuple[dict, list[GGUFTensor]]:
    """-> (metadata, tensors with memory-mapped data). Raises ModelFileError on any damage.

    Metadata arrays longer than `max_array` come back as None (None keeps them all).
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quant_shape_to_byte_shape

    path = Path(path)
    mm, cur = _open(path, max_array)
    version = cur.read("<I")
    if version not in (2, 3):
        raise ModelFileError(f"{path} is GGUF version {version}; supported versions are 2 and 3")
    n_tensors, n_kv = cur.read("<Q"), cur.read("<Q")
    if n_tensors > 1_000_000 or n_kv > 1_000_000:
        raise ModelFileError(f"{path} is corrupt: header claims {n_tensors} tensors and {n_kv} keys")
    meta = {"GGUF.version": version}
    for _ in range(n_kv):
        key = cur.string()
        meta[key] = cur.value(cur.read("<I"))
    infos = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.read("<Q") for _ in range(cur.read("<I"))]
        raw_type, offset = cur.read("<I"), cur.read("<Q")
        infos.append((name, dims, raw_type, offset))
    align = int(meta.get("general.alignment", 32))
    data_start = -(-cur.pos // align) * align
    tensors = []
    for name, dims, raw_type, offset in infos:
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise ModelFileError(f"{path}: tensor {name} has unknown type id {raw_type}") from None
        block, type_size = GGML_QUANT_SIZES[qtype]
        n_el = int(np.prod(dims)) if dims else 1
        n_bytes = n_el * type_size // block
        start = data_start + offset
        if start + n_bytes > len(mm):
            raise ModelFileError(
                f"{path} is truncated: tensor {name} needs bytes {start}..{start + n_bytes} "
                f"but the file has {len(mm)}"
            )
        shape = tuple(reversed(dims))
        raw = mm[start:start + n_bytes]
        if qtype in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            data = raw.view(np.float32 if qtype == GGMLQuantizationType.F32 else np.float16).reshape(shape)
        elif qtype == GGMLQuantizationType.BF16:
            data = raw.view(np.uint16).reshape(shape)
        else:
            data = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
        tensors.append(GGUFTensor(name, shape, qtype, start, n_bytes, data))
    return meta, tensors


def _open(path: Path, max_array: int | None) -> tuple[np.memmap, _Cursor]:
    """The file mapped, and a cursor after its magic bytes (which are checked)."""
    try:
        mm = np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ModelFileError(f"cannot read {path}: {e}") from e
    if len(mm) < 24 or bytes(mm[:4]) != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (it does not start with the magic bytes 'GGUF')")
    cur = _Cursor(memoryview(mm), path, max_array)
    cur.pos = 4
    return mm, cur


def metadata_array(path: Path, key: str):
    """The values of metadata array `key`, one at a time (a 49k-token vocabulary without a list of it, whose
    freed strings would leave the heap fragmented); nothing if the file has no such array."""
    path = Path(path)
    _, cur = _open(path, max_array=0)  # every other array skipped
    cur.pos = 8
    _, n_kv = cur.read("<Q"), cur.read("<Q")
    for _ in range(n_kv):
        name, vtype = cur.string(), cur.read("<I")
        if name == key and vtype == _ARRAY:
            etype, count = cur.read("<I"), cur.read("<Q")
            if etype in _SCALARS:  # numbers: one view of the array
                fmt = _SCALARS[etype]
                size = struct.calcsize(fmt)
                if cur.pos + size * count > len(cur.buf):
                    raise ModelFileError(f"{path} is truncated: metadata array {key} runs past the end of the file")
                yield from np.frombuffer(cur.buf, np.dtype(fmt), count, cur.pos).tolist()
                return
            if etype != _STRING:
                for _ in range(count):
                    yield cur.value(etype)
                return
            buf, pos, end = cur.buf, cur.pos, len(cur.buf)  # strings: the hot loop of a vocabulary, inlined
            for _ in range(count):
                (n,) = struct.unpack_from("<Q", buf, pos)
                if pos + 8 + n > end:
                    raise ModelFileError(f"{path} is truncated: a header string runs past the end of the file")
                yield str(buf[pos + 8:pos + 8 + n], "utf-8", "replace")
                pos += 8 + n
            return
        cur.value(vtype)
