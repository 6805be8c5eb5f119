"""The brick store on the device: one folder per brick under `$CFM_HOME/bricks` (else
`$XDG_DATA_HOME/cfm/bricks`, else `~/.local/share/cfm/bricks`).

A brick folder is a PEFT LoRA folder (`adapter_config.json`, `adapter_model.safetensors`, HF
layout, usable by `peft` as is) plus `brick.json`: name, description, targets, rank, size,
checksum, the base model's fingerprint and the routing signature. Every write goes to a
temporary folder in the store and is renamed into place, so a failed write leaves the store as it was.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .formats import PEFT_CONFIG, PEFT_WEIGHTS, BrickError, read_peft, split_name, write_peft
from .lora import LoraPair

META = "brick.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class Brick:
    """A LoRA brick in HF layout: pairs by module name (`layers.3.self_attn.q_proj`) and metadata."""

    name: str
    pairs: dict[str, LoraPair]
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({split_name(n)[0] for n in self.pairs})

    @property
    def modules(self) -> list[str]:
        return sorted({split_name(n)[1] for n in self.pairs})

    @property
    def ranks(self) -> list[int]:
        return sorted({p.rank for p in self.pairs.values()})

    @property
    def n_params(self) -> int:
        return sum(p.a.numel() + p.b.numel() for p in self.pairs.values())

    def describe(self) -> dict:
        """Metadata derived from the tensors (kept in brick.json)."""
        return {"name": self.name, "layers": self.layers, "modules": self.modules, "rank": max(self.ranks),
                "ranks": self.ranks, "parameters": self.n_params}


def default_root() -> Path:
    if os.environ.get("CFM_HOME"):
        return Path(os.environ["CFM_HOME"]) / "bricks"
    data = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data) / "cfm" / "bricks"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise BrickError(f"invalid brick name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    return name


def folder_checksum(folder: Path) -> str:
    h = hashlib.sha256()
    for fname in (PEFT_CONFIG, PEFT_WEIGHTS):
        h.update((folder / fname).read_bytes())
    return h.hexdigest()


class BrickStore:
    """Bricks on this device: list, load (checksum verified), save (atomic), remove."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root else default_root()

    def path(self, name: str) -> Path:
        return self.root / check_name(name)

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / META).is_file() and _NAME.match(p.name))

    def info(self, name: str) -> dict:
        path = self.path(name) / META
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise BrickError(f"no brick named {name!r} in {self.root} (bricks: {known}); see `cfm brick list`")
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise BrickError(f"brick {name!r} is corrupt ({path}: {e}); remove it with `cfm brick remove {name}`") from e

    def list(self) -> list[dict]:
        return [self.info(n) for n in self.names()]

    def load(self, name: str) -> Brick:
        meta = self.info(name)
        folder = self.path(name)
        try:
            checksum = folder_checksum(folder)
        except OSError as e:
            raise BrickError(f"brick {name!r} is incomplete ({e}); remove it with `cfm brick remove {name}`") from e
        if checksum != meta.get("checksum"):
            raise BrickError(f"brick {name!r} is corrupt: its files do not match the checksum in {META}; "
                             f"remove it with `cfm brick remove {name}` and add it again")
        pairs, _ = read_peft(folder)
        return Brick(name, pairs, meta)

    def exists(self, name: str) -> bool:
        return (self.path(name) / META).is_file()

    def save(self, brick: Brick, overwrite: bool = False) -> dict:
        """Write the brick atomically; returns its metadata (with size and checksum)."""
        final = self.path(brick.name)
        if final.exists() and not overwrite:
            raise BrickError(f"a brick named {brick.name!r} exists already; choose another --name or remove it first")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{brick.name}-", dir=self.root))
        try:
            write_peft(tmp, brick.pairs, base_model=brick.meta.get("base_model", ""))
            meta = dict(brick.meta) | brick.describe()
            meta["size_bytes"] = sum(f.stat().st_size for f in tmp.iterdir())
            meta["checksum"] = folder_checksum(tmp)
            meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
            if final.exists():
                old = Path(tempfile.mkdtemp(prefix=f".old-{brick.name}-", dir=self.root))
                os.replace(final, old / "brick")
                os.replace(tmp, final)
                shutil.rmtree(old)
            else:
                os.replace(tmp, final)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        brick.meta = meta
        return meta

    def remove(self, name: str) -> None:
        folder = self.path(name)
        if not folder.exists():
            raise BrickError(f"no brick named {name!r} in {self.root}; see `cfm brick list`")
        trash = Path(tempfile.mkdtemp(prefix=f".rm-{name}-", dir=self.root))
        os.replace(folder, trash / "brick")  # gone from the store at once, then deleted
        shutil.rmtree(trash)
