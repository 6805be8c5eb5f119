"""Compile the native kernel (`cfm_kernel.cpp`) into a shared library with the system C++ compiler.

Run by setup.py at install time (loaded by its file path: it imports nothing of the project) and, where
that did not happen, by `native.load` on first use. The library's name carries a digest of the source, so
builds of other versions never collide.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("cfm_kernel.cpp")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]


def library_name() -> str:
    return f"_cfm_kernel_{hashlib.blake2b(SOURCE.read_bytes(), digest_size=6).hexdigest()}.so"


def compile_kernel(folder: Path) -> Path:
    """Build the library into `folder` (if it is not there already); -> its path. Raises RuntimeError with
    the compiler's message when the build fails."""
    folder = Path(folder)
    target = folder / library_name()
    if target.is_file():
        return target
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++ or g++; or set CXX)")
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        out = Path(tmp) / target.name
        proc = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(out)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
        os.replace(out, target)  # atomic: a concurrent build never sees half a library
    return target
