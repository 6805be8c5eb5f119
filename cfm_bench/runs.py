"""Timed generations for `cfm bench split`: local, split and center-only, interleaved step by step.

On a shared machine the compute speed swings by 2x within seconds, so runs of one grid cell are
not timed one after another: every configuration prefills the prompt, then they take decode steps
round-robin, so all of them meet the same machine load. Greedy decoding; each step is timed with
the telemetry it caused (round trip, center compute, bytes through the link emulator). The time to first
token is the median of several prefills of the prompt (round-robin too, each from position 0): one sample
swings by tens of milliseconds on a shared machine.
"""

from __future__ import annotations

import time

import numpy as np

from cfm_runtime import CenterOptions, LocalRunner
from cfm_runtime.errors import CfmError
from cfm_runtime.protocol import wire
from cfm_runtime.split.runner import SplitRunner

from .center_service import TokenClient
from .link import LinkEmulator

HOST = "127.0.0.1"
REQUEST_BYTES, REPLY_BYTES = 12, 8  # center-only decode step: position, count, one id; token, compute ms


def _argmax(logits: np.ndarray) -> int:
    return int(logits[-1].argmax())


def _bytes(link: LinkEmulator | None) -> dict:
    return {"up": link.bytes_forwarded[0], "down": link.bytes_forwarded[1]} if link else {}


def _med(xs) -> float:
    return round(float(np.median(xs)), 2)


class LocalRun:
    """The whole model on the edge."""

    def __init__(self, model, config: str = "local"):
        self.runner, self.config = LocalRunner(model), config

    def forward(self, ids: list[int]) -> int:
        return _argmax(self.runner.forward(ids))

    def restart(self) -> None:
        self.runner.truncate(0)

    def counters(self) -> dict:
        return {}

    def result(self, prefills: list[dict], steps: list[dict]) -> dict:
        return {"config": self.config, "kind": "local", "split": None, "wire": None}

    def close(self) -> None:
        pass


class SplitRun:
    """`cfm_runtime.split.SplitRunner` against a center, optionally through a link emulator."""

    def __init__(self, model, address: str, split: tuple[int, int], wire_name: str, link: LinkEmulator | None = None):
        self.split, self.wire, self.link = split, wire_name, link
        self.config = f"split {split[0]}:{split[1]} {wire_name}"
        self.payload = 2 * wire.bytes_per_position(model.config.d_model, wire.parse_dtype(wire_name))
        self.runner = SplitRunner(model, CenterOptions(address, split, wire=wire_name, timeout=60.0), split)
        if self.runner.stream is None:
            raise CfmError(f"the benchmark cannot reach its center at {address}: {self.runner.log.fallbacks}")

    def forward(self, ids: list[int]) -> int:
        return _argmax(self.runner.forward(ids))

    def restart(self) -> None:
        self.runner.truncate(0)

    def counters(self) -> dict:
        log = self.runner.log
        return {"trips": log.round_trips, "rt": log.round_trip_ms, "center": log.center_ms, **_bytes(self.link)}

    def result(self, prefills: list[dict], steps: list[dict]) -> dict:
        rt = [s["rt"] / max(1, s["trips"]) for s in steps]
        center = [s["center"] / max(1, s["trips"]) for s in steps]
        report = self.runner.split_report()
        out = {"config": self.config, "kind": "split", "split": list(self.split), "wire": self.wire,
               "round_trip_ms": _med(rt), "center_compute_ms": _med(center),
               "network_ms": _med([a - b for a, b in zip(rt, center)]),
               "edge_compute_ms": _med([s["seconds"] * 1000 - a for s, a in zip(steps, rt)]),
               "ttft_network_ms": _med([p["rt"] - p["center"] for p in prefills]),
               "payload_bytes_per_token": self.payload,
               "fallbacks": report["fallbacks"], "positions_local": report["positions_local"]}
        return out | _per_token_bytes(steps, self.link)

    def close(self) -> None:
        self.runner.close()


class CenterOnlyRun:
    """The privacy-losing baseline: token ids to a server that runs the whole model (`center_service`)."""

    config = "center-only"

    def __init__(self, port: int, link: LinkEmulator | None = None):
        self.client, self.link, self.pos, self.compute_ms = TokenClient(HOST, port), link, 0, 0.0

    def forward(self, ids: list[int]) -> int:
        token, ms = self.client.step(self.pos, ids)
        self.pos += len(ids)
        self.compute_ms += ms
        return token

    def restart(self) -> None:
        self.pos = 0  # the service rewinds its cache to the request's position

    def counters(self) -> dict:
        return {"center": self.compute_ms, **_bytes(self.link)}

    def result(self, prefills: list[dict], steps: list[dict]) -> dict:
        return {"config": self.config, "kind": "center-only", "split": None, "wire": "token ids",
                "center_compute_ms": _med([s["center"] for s in steps]),
                "network_ms": _med([s["seconds"] * 1000 - s["center"] for s in steps]),
                "ttft_network_ms": _med([p["seconds"] * 1000 - p["center"] for p in prefills]),
                "payload_bytes_per_token": REQUEST_BYTES + REPLY_BYTES} | _per_token_bytes(steps, self.link)

    def close(self) -> None:
        self.client.close()


def _per_token_bytes(steps: list[dict], link) -> dict:
    if not link:
        return {}
    n = len(steps)
    return {"bytes_up_per_token": round(sum(s["up"] for s in steps) / n, 1),
            "bytes_down_per_token": round(sum(s["down"] for s in steps) / n, 1)}


def _timed(run, ids: list[int]) -> tuple[int, dict]:
    """One forward: (next token, elapsed seconds and the change of each counter)."""
    before = run.counters()
    t0 = time.perf_counter()
    token = run.forward(ids)
    seconds = time.perf_counter() - t0
    after = run.counters()
    return token, {"seconds": seconds} | {k: after[k] - before[k] for k in after}


def interleaved(runs: list, prompt: list[int], n: int, prefills: int = 3) -> list[dict]:
    """`prefills` prefills of the prompt per run, then n greedy decode steps, round-robin; one result per run."""
    tokens, timed, steps = [0] * len(runs), [[] for _ in runs], [[] for _ in runs]
    for _ in range(prefills):
        for k, run in enumerate(runs):
            run.restart()
            tokens[k], prefill = _timed(run, prompt)
            timed[k].append(prefill)
    for _ in range(n):
        for k, run in enumerate(runs):
            tokens[k], step = _timed(run, [tokens[k]])
            steps[k].append(step)
    out = []
    for run, pre, st in zip(runs, timed, steps):
        ms = [s["seconds"] * 1000 for s in st]
        ttft = [p["seconds"] * 1000 for p in pre]
        out.append(run.result(pre, st) | {
            "ttft_ms": _med(ttft), "ttft_samples_ms": [round(x, 2) for x in ttft],
            "per_token_ms": [round(x, 2) for x in ms],
            "median_ms": _med(ms), "p95_ms": round(float(np.percentile(ms, 95)), 2)})
    return out


def close_all(runs: list) -> None:
    for run in runs:
        run.close()
