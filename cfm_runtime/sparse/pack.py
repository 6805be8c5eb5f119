"""The neuron pack: a model's FFN weights as row-column bundles on flash, plus its profile.

Directory layout (one per model, named by the model's source digest):
- `neurons.bin`: per layer, an aligned segment of bundles in pack order (co-activation clusters,
  heaviest first). A bundle is one neuron's gate row, up row and down column as GGUF blocks (`bundle.py`:
  the file's own gate/up blocks, the down column re-blocked along the hidden axis).
- `tables.safetensors`: per layer the pack order (pack position -> neuron id), neuron mass and
  frequency, cluster mass, and two predictors: a 4-bit copy of gate and up (`predictor_int4.*`) and a
  low-rank reconstruction of them (`predictor.*`).
- `manifest.json`: format version, the model's fingerprint and source digest, sizes, blake2b
  checksums of every file and layer segment, densities and predictor recall. Written last: a pack
  without a manifest is incomplete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import CfmError
from ..gguf_file import read_gguf
from .bundle import BundleCodec

if TYPE_CHECKING:  # the tables are torch tensors (safetensors.torch); reading a manifest needs no torch
    import torch

FORMAT = "cfm-neuron-pack"
VERSION = 3  # 3: quantized bundles; 2: int4 and low-rank gate/up predictors, fp16 bundles; 1: linear scores
PREDICTOR_KEYS = {"int4": "predictor_int4", "lowrank": "predictor"}  # predictor kind -> its tables' name


ALIGN = 4096
NEURONS, TABLES, MANIFEST = "neurons.bin", "tables.safetensors", "manifest.json"


def predictor_prefix(i: int, kind: str) -> str:
    return f"layers.{i}.{PREDICTOR_KEYS[kind]}."


def shared_key(i: int) -> str:
    """Layer i's shared down table in the tables file (`bundle.BundleCodec.encode`)."""
    return f"layers.{i}.down_shared"


class PackError(CfmError):
    """A neuron pack that is missing, foreign, truncated or corrupt."""


def default_root() -> Path:
    """$CFM_HOME/packs if set, else the user cache dir (~/.cache/cfm/packs or $XDG_CACHE_HOME/cfm/packs)."""
    home = os.environ.get("CFM_HOME")
    if home:
        return Path(home).expanduser() / "packs"
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "cfm" / "packs"


def source_digest(path: Path) -> str:
    """blake2b of a checkpoint's weight bytes as stored (GGUF tensor data or safetensors files)."""
    h = hashlib.blake2b(digest_size=16)
    if path.is_dir():
        for f in sorted(path.glob("*.safetensors")):
            h.update(file_digest(f).encode())
        return h.hexdigest()
    _, tensors = read_gguf(path)
    for t in tensors:
        h.update(f"{t.name}{tuple(t.shape)}{t.qtype.name}".encode())
        h.update(memoryview(np.ascontiguousarray(t.data)).cast("B"))
    return h.hexdigest()


def pack_dir(path: Path, digest: str, root: Path | None = None) -> Path:
    """The per-model cache folder of `path`'s pack."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.stem if path.is_file() else path.name)
    return Path(root or default_root()) / f"{slug}-{digest[:16]}"


def file_digest(path: Path, start: int = 0, length: int | None = None, chunk: int = 8 << 20) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        f.seek(start)
        left = length if length is not None else 1 << 62
        while left > 0:
            buf = f.read(min(chunk, left))
            if not buf:
                break
            h.update(buf)
            left -= len(buf)
    return h.hexdigest()


def write_layers(path: Path, layer_bundles) -> list[dict]:
    """Write an iterable of a layer's bundles [F, bytes] as aligned segments; returns their manifest entries."""
    entries = []
    with open(path, "wb") as f:
        for arr in layer_bundles:
            offset = f.tell()
            data = np.ascontiguousarray(arr).tobytes()
            f.write(data)
            f.write(b"\0" * (-len(data) % ALIGN))
            entries.append({"offset": offset, "bytes": len(data),
                            "blake2b": hashlib.blake2b(data, digest_size=16).hexdigest()})
    return entries


def write_manifest(root: Path, manifest: dict) -> None:
    for name in (NEURONS, TABLES):
        p = root / name
        manifest["files"][name] = {"bytes": p.stat().st_size, "blake2b": file_digest(p)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(root / MANIFEST)


@dataclass
class NeuronPack:
    """An opened, verified pack: manifest, per-layer tables and predictors, and the bundle file path."""

    root: Path
    manifest: dict
    tables: dict[str, torch.Tensor]

    @property
    def neurons_path(self) -> Path:
        return self.root / NEURONS

    @property
    def n_layers(self) -> int:
        return len(self.manifest["layers"])

    @property
    def bundle_bytes(self) -> int:
        return self.manifest["bundle"]["bytes"]

    @property
    def codec(self) -> BundleCodec:
        return BundleCodec.from_manifest(self.manifest["model"]["d_model"], self.manifest["bundle"])

    def bundles(self, i: int) -> np.ndarray:
        """Layer i's bundles [F, bytes] in pack order, read from the file."""
        entry = self.layer(i)
        data = np.fromfile(self.neurons_path, dtype=np.uint8, count=entry["bytes"], offset=entry["offset"])
        return data.reshape(entry["n"], self.bundle_bytes)

    def shared(self, i: int) -> np.ndarray | None:
        """Layer i's shared down table (the file's down scales and minimums), if its bundles need one."""
        t = self.tables.get(shared_key(i))
        return None if t is None else t.numpy()

    def weights(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Layer i's FFN weights as the pack holds them, in model order: gate [F, D], up [F, D], down [D, F]."""
        return self.codec.weights(self.bundles(i), self.order(i), self.shared(i))

    def layer(self, i: int) -> dict:
        return self.manifest["layers"][i]

    def order(self, i: int) -> np.ndarray:
        return self.tables[f"layers.{i}.order"].numpy()

    def cluster_mass(self, i: int) -> np.ndarray:
        return self.tables[f"layers.{i}.cluster_mass"].numpy()

    def predictor_state(self, i: int, kind: str) -> dict[str, torch.Tensor]:
        """Layer i's stored predictor of `kind` (a key of PREDICTOR_KEYS), rows in model order."""
        p = predictor_prefix(i, kind)
        return {k[len(p):]: v for k, v in self.tables.items() if k.startswith(p)}


def open_pack(root: Path, *, source_digest: str | None = None, fingerprint: str | None = None,
              verify: bool = True) -> NeuronPack:
    """Open the pack at `root`, refusing one of another model, or a truncated or corrupt one."""
    root = Path(root)
    manifest = read_manifest(root)
    check_identity(root, manifest, source_digest, fingerprint)
    check_files(root, manifest, verify)
    from safetensors.torch import load_file

    return NeuronPack(root, manifest, load_file(str(root / TABLES)))


def is_current(root: Path) -> bool:
    """A complete pack of this format version at root (identity and checksums not checked)."""
    try:
        read_manifest(Path(root))
        return True
    except PackError:
        return False


def read_manifest(root: Path) -> dict:
    path = root / MANIFEST
    if not path.is_file():
        raise PackError(f"{root} is not a neuron pack (no {MANIFEST}; an interrupted build?); "
                        f"delete it and run `cfm profile` again")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PackError(f"{path} is corrupt ({e}); delete {root} and run `cfm profile` again") from e
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise PackError(f"{root} is not a version-{VERSION} neuron pack (format {manifest.get('format')!r}, "
                        f"version {manifest.get('version')!r}: built by another cfm-runtime); rebuild it with "
                        f"`cfm profile --model MODEL`, or delete it and the next --sparse/--ram-budget run "
                        f"rebuilds it")
    return manifest


def check_identity(root: Path, manifest: dict, source_digest: str | None, fingerprint: str | None) -> None:
    for what, want in (("source_digest", source_digest), ("fingerprint", fingerprint)):
        have = manifest.get(what)
        if want is not None and have != want:
            raise PackError(
                f"the neuron pack {root} belongs to another model ({what} {have}, this model {want}); "
                f"build one for this model with `cfm profile --model MODEL` or pass the right --pack"
            )


def check_files(root: Path, manifest: dict, verify: bool) -> None:
    for name, entry in manifest["files"].items():
        p = root / name
        size = p.stat().st_size if p.is_file() else -1
        if size != entry["bytes"]:
            state = "missing" if size < 0 else f"{size} bytes, expected {entry['bytes']} (truncated?)"
            raise PackError(f"neuron pack {root}: {name} is {state}; delete the pack and run `cfm profile` again")
        if verify and file_digest(p) != entry["blake2b"]:
            raise PackError(f"neuron pack {root}: {name} fails its checksum (corrupt); "
                            f"delete the pack and run `cfm profile` again")
