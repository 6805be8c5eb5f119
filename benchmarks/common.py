"""Shared benchmark helpers: environment record, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

PROMPT = (
    "You are reading a report about the history of computing. The first electronic computers filled whole rooms "
    "and used vacuum tubes that failed often. Transistors replaced the tubes in the late 1950s, and integrated "
    "circuits followed a decade later, putting many transistors on one chip. Microprocessors arrived in the early "
    "1970s and made personal computers possible. By the 1990s, home computers were connected through the internet, "
    "and the following decades brought smartphones, cloud services and machine learning systems trained on large "
    "amounts of data. Today, small language models can run on a laptop or a phone without a network connection. "
    "Summarise the main steps of this history in a few sentences, then explain why running a model locally matters "
    "for privacy."
)


def versions(packages) -> dict:
    """Installed version of each package (None if it is not installed)."""
    out = {}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def environment(threads: int) -> dict:
    return {
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cores_available": len(os.sched_getaffinity(0)),
        "threads": threads,
        "python": platform.python_version(),
        "versions": versions(("torch", "llama_cpp_python", "onnxruntime", "numpy", "cfm-runtime")),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def median(xs):
    return statistics.median(xs) if xs else None


def save(name: str, data: dict, out_dir: Path | None = None) -> Path:
    out_dir = Path(out_dir or RESULTS)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    path.write_text(json.dumps(data, indent=2))
    return path


def token_nll(logits, ids: list[int]):
    """Per-position negative log-likelihood [len(ids) - 1] of ids[1:] under logits [len(ids), vocab] (numpy,
    float64 log-softmax)."""
    import numpy as np

    lg = logits[:-1].astype(np.float64)
    top = lg.max(-1, keepdims=True)
    return top[:, 0] + np.log(np.exp(lg - top).sum(-1)) - lg[np.arange(len(ids) - 1), ids[1:]]
