"""`cfm bench split`: where (and whether) to split, measured on this machine over emulated links.

For every cell of an (RTT, bandwidth) grid, all on loopback through `cfm_bench.link.LinkEmulator`:
time to first token and per-token decode latency (median, p95) of
- local-only (the whole model on the edge),
- split runs (`cfm_runtime.split.SplitRunner` against a real center in its own process) at the planner's
  choice and at fixed splits, with fp32 and fp16 hidden states on the wire,
- center-only (the whole model on the server, token ids sent in the clear: the privacy-losing
  baseline, `cfm_bench.center_service`),
with bytes on the wire per token, the center's compute time apart from network time, and the
planner's predicted latency for each. Offline, the quality cost of each wire dtype (fp16, bf16 and
int8 with a per-row scale, which the protocol does not carry yet) at each split point. Writes
`split.json` and PNG plots (`cfm_bench.plots`) to --out.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from cfm_runtime import LoadOptions, SparseOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.loading import resolve_model_path
from cfm_runtime.memory import release_freed_memory
from cfm_runtime.protocol import wire
from cfm_runtime.sparse import pack_dir, source_digest
from cfm_runtime.split import planner
from cfm_runtime.split.client import CenterClient

from .center_service import CenterProcess
from .link import LinkEmulator, LinkSpec
from .plots import plot_all
from .runs import HOST, CenterOnlyRun, LocalRun, SplitRun, close_all, interleaved

EVAL_TEXTS = Path(__file__).resolve().parent / "data" / "eval_texts.json"
PROMPT = ("You are reading a report about the history of computing. The first electronic computers filled whole "
          "rooms and used vacuum tubes that failed often. Transistors replaced the tubes in the late 1950s, and "
          "integrated circuits followed a decade later. Summarise this history in a few sentences.")


@dataclass
class Settings:
    rtts_ms: tuple = (1, 10, 30, 80, 150)
    rates_mbit: tuple = (1, 10, 100)
    splits: tuple = ((2, 28), (8, 22))  # layers [a, b) on the center; the planner's choice is added
    wires: tuple = ("fp32", "fp16")  # measured live; int8 and bf16 only offline (quality, bytes, prediction)
    weights: str = "int4"  # the edge's and the center's weights: the product's default (fp32: the reference)
    prompt_tokens: int = 32
    decode_tokens: int = 16
    quality_tokens: int = 64  # per eval text
    loopback_tokens: int = 24
    edge_threads: int = 1  # the device is slower than its server: 1 core vs 2
    center_threads: int = 2
    local_variants: bool = True  # the other weights and the sparse FFN, measured once
    quick: bool = False


QUICK = Settings(rtts_ms=(1, 80), rates_mbit=(10,), splits=((2, 28),), prompt_tokens=16, decode_tokens=5,
                 quality_tokens=24, loopback_tokens=6, local_variants=False, quick=True)


# ---------------------------------------------------------------- the edge alone


def local_variants(model_path, s: Settings, prompt: list[int]) -> list[dict]:
    """Other ways to run everything on the edge, measured once (they do not depend on the link).

    Both come from other subsystems (`cfm_runtime.kernels`, `cfm_runtime.sparse`); a failure to load is
    recorded in the result with its reason, not hidden."""
    other = "fp32" if s.weights == "int4" else "int4"
    loaders = {f"local {other}": lambda: load_model(model_path, LoadOptions(threads=s.edge_threads, weights=other,
                                                                            progress=False)),
               "local sparse": lambda: _load_sparse(model_path, s.edge_threads)}
    out = []
    for name, load in loaders.items():
        t0 = time.perf_counter()
        try:
            m = load()
            r = measure([LocalRun(m, name)], prompt, 2 * s.decode_tokens)[0]
        except Exception as e:  # noqa: BLE001 -- another subsystem's error, reported in the JSON
            out.append({"config": name, "kind": "local-variant", "error": f"{type(e).__name__}: {e}"})
            continue
        finally:
            m = None
            release_freed_memory()
        out.append(r | {"config": name, "kind": "local-variant", "load_s": round(time.perf_counter() - t0, 1)})
    return out


def _load_sparse(model_path, threads: int):
    """`--sparse` as a user runs it (the kernel's sparse FFN at the pack's planned densities), if the neuron pack
    was built; building one takes minutes."""
    path = resolve_model_path(model_path)
    if not (pack_dir(path, source_digest(path)) / "manifest.json").is_file():
        raise CfmError(f"no neuron pack for {path.name}: build it once with `cfm profile`, then rerun")
    return load_model(model_path, LoadOptions(threads=threads, sparse=SparseOptions(sparse=True), progress=False))


# ---------------------------------------------------------------- the planner


def _probe_bytes(rate_mbit: float | None) -> int:
    """Bandwidth probe of ~0.2 s at the link rate (the planner's default 1 MiB takes 8 s at 1 Mbit/s)."""
    if not rate_mbit:
        return 2**20
    return int(min(2**20, max(16 * 1024, rate_mbit * 1e6 / 8 * 0.2)))


def plan_cell(model, address: str, rate_mbit: float | None, wires) -> tuple[dict, object]:
    """The planner's measurements through the link and its choice of split and wire dtype."""
    client = CenterClient(address, timeout=60.0)
    try:
        m = planner.measure(model, client, wire.parse_dtype("fp32"), probes=5, probe_bytes=_probe_bytes(rate_mbit))
    finally:
        client.close()
    plans = {w: planner.choose(with_wire(m, w)) for w in wires}
    best_wire = min(plans, key=lambda w: plans[w].predicted_ms)
    p = plans[best_wire]
    choice = {"split": list(p.split) if p.split else None, "wire": best_wire if p.split else None,
              "config": config_name(p.split, best_wire), "predicted_ms": round(p.predicted_ms, 2),
              "measurements": asdict(m)}
    return choice, m


def with_wire(m, wire_name: str):
    """The planner's measurements (taken at fp32: 4 bytes per element) with another wire dtype's bytes."""
    return replace(m, bytes_per_position=wire_bytes_per_position(m.bytes_per_position // 4, wire_name))


def wire_bytes_per_position(d: int, wire_name: str) -> int:
    return d + 4 if wire_name == "int8" else wire.bytes_per_position(d, wire.parse_dtype(wire_name))


def config_name(split, wire_name: str | None) -> str:
    return "local" if split is None else f"split {split[0]}:{split[1]} {wire_name}"


def predict(m, run: dict) -> float | None:
    if run["kind"] == "local":
        return planner.predict(m, None)
    if run["kind"] == "split":
        return planner.predict(with_wire(m, run["wire"]), tuple(run["split"]))
    return None  # center-only: not a plan the planner may choose


# ---------------------------------------------------------------- one grid cell


def run_cell(model, center: dict, rtt_ms: float, rate_mbit: float | None, s: Settings, prompt: list[int]) -> dict:
    spec = LinkSpec(delay_ms=rtt_ms / 2, rate_mbit=rate_mbit)
    with LinkEmulator((HOST, center["grpc_port"]), spec) as glink, \
            LinkEmulator((HOST, center["token_port"]), spec) as tlink:
        address = f"{HOST}:{glink.port}"
        choice, m = plan_cell(model, address, rate_mbit, s.wires)
        chosen = [tuple(choice["split"])] if choice["split"] else []
        splits = list(dict.fromkeys([tuple(x) for x in s.splits] + chosen))
        runs = [LocalRun(model)]
        runs += [SplitRun(model, address, split, w, glink) for split in splits for w in s.wires]
        runs.append(CenterOnlyRun(tlink.port, tlink))
        results = measure(runs, prompt, s.decode_tokens)
        lateness = {"grpc_link": glink.lateness_ms(), "token_link": tlink.lateness_ms()}
    for r in results:
        p = predict(m, r)
        r["predicted_ms"] = None if p is None else round(p, 2)
        if r["kind"] == "split":
            transfer = (r["bytes_up_per_token"] + r["bytes_down_per_token"]) * 8 / (rate_mbit * 1e3) if rate_mbit else 0
            r["overhead_ms"] = round(r["network_ms"] - rtt_ms - transfer, 2)
    int8 = {f"{a}:{b}": round(predict(m, {"kind": "split", "wire": "int8", "split": (a, b)}), 2) for a, b in splits}
    return {"rtt_ms": rtt_ms, "rate_mbit": rate_mbit, "loadavg_1min": os.getloadavg()[0], "planner": choice,
            "emulator_lateness_ms": lateness, "runs": results,
            "int8_predicted_ms": int8, **judge(results, choice)}


def measure(runs: list, prompt: list[int], n: int) -> list[dict]:
    try:
        return interleaved(runs, prompt, n)
    finally:
        close_all(runs)


def judge(runs: list[dict], choice: dict) -> dict:
    """Best configuration of the cell; is the planner's choice within 10% of it?"""
    best = min(runs, key=lambda r: r["median_ms"])
    private = [r for r in runs if r["kind"] != "center-only"]
    best_private = min(private, key=lambda r: r["median_ms"])
    mine = next((r for r in runs if r["config"] == choice["config"]), None)
    return {"best": best["config"], "best_ms": best["median_ms"], "best_private": best_private["config"],
            "best_private_ms": best_private["median_ms"], "planner_measured_ms": mine and mine["median_ms"],
            "planner_within_10pct": bool(mine and mine["median_ms"] <= 1.1 * best_private["median_ms"])}


# ---------------------------------------------------------------- loopback overhead


def loopback_overhead(model, center: dict, s: Settings, prompt: list[int]) -> dict:
    """Split per-token cost beyond compute, straight on loopback and through a zero-delay emulator."""
    split = tuple(s.splits[0])
    with LinkEmulator((HOST, center["grpc_port"]), LinkSpec()) as link:
        direct, proxied, local = measure([SplitRun(model, f"{HOST}:{center['grpc_port']}", split, "fp32"),
                                          SplitRun(model, f"{HOST}:{link.port}", split, "fp32", link),
                                          LocalRun(model)], prompt, s.loopback_tokens)
        out = {"grpc_ping_ms": round(_ping_ms(f"{HOST}:{center['grpc_port']}"), 3),
               "emulator_lateness_ms": link.lateness_ms()}
    for name, r in (("direct", direct), ("emulator_zero_delay", proxied)):
        out[name] = {"overhead_ms": r["network_ms"], "run": r}
    out["local"] = local
    return out


def _ping_ms(address: str, n: int = 30) -> float:
    """Median empty gRPC round trip: the floor of any split step's overhead."""
    client = CenterClient(address)
    try:
        client.ping()
        return float(np.median([client.ping() for _ in range(n)])) * 1000
    finally:
        client.close()


# ---------------------------------------------------------------- quality of the wire dtypes


def roundtrip(h: torch.Tensor, wire_name: str) -> torch.Tensor:
    """h [T, D] as the far end sees it after `wire_name` on the wire."""
    if wire_name == "int8":  # per-row absmax scale, symmetric
        scale = h.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        return (h / scale).round().clamp(-127, 127) * scale
    dtype = wire.parse_dtype(wire_name)
    back = wire.decode(wire.encode(h.numpy(), dtype), hidden_size=h.shape[1], dtype=dtype, max_rows=h.shape[0])
    return torch.from_numpy(back)


def eval_texts(model, max_tokens: int) -> list[list[int]]:
    d = json.loads(EVAL_TEXTS.read_text())
    ids = [model.tokenizer.encode(t) for t in d["texts"].values()] + [model.encode_prompt(d["chat"])]
    return [x[:max_tokens] for x in ids]


@torch.inference_mode()
def wire_quality(model, texts: list[list[int]], splits, wires=("fp16", "bf16", "int8")) -> list[dict]:
    """Top-1 agreement and logit differences vs fp32 when the hidden states at a and b cross the wire."""
    t, n = model.transformer, model.config.n_layers
    d = model.config.d_model
    rows = {(a, b, w): [] for a, b in splits for w in wires}
    for ids in texts:
        h = t.embed(torch.tensor([ids]))
        ref = t.head(t.forward_span(h, 0, n, [t.new_cache(0, n, len(ids))]))[0]
        for a, b in splits:
            h_a = t.forward_span(h, 0, a, [t.new_cache(0, a, len(ids))])[0]
            for w in wires:
                x = t.forward_span(roundtrip(h_a, w)[None], a, b, [t.new_cache(a, b, len(ids))])[0]
                y = t.forward_span(roundtrip(x, w)[None], b, n, [t.new_cache(b, n, len(ids))])
                rows[(a, b, w)].append((t.head(y)[0], ref))
    out = []
    for (a, b, w), pairs in rows.items():
        got, ref = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        diff = (got - ref).abs()
        out.append({"split": [a, b], "wire": w, "positions": got.shape[0],
                    "top1_agreement": round(float((got.argmax(-1) == ref.argmax(-1)).float().mean()), 4),
                    "max_logit_diff": round(float(diff.max()), 4), "mean_logit_diff": round(float(diff.mean()), 5),
                    "bytes_per_position": wire_bytes_per_position(d, w),
                    "bytes_saved_vs_fp32": 1 - wire_bytes_per_position(d, w) / wire_bytes_per_position(d, "fp32")})
    return out


# ---------------------------------------------------------------- environment and summary


def environment(model, s: Settings, center: dict) -> dict:
    versions = {}
    for pkg in ("torch", "grpcio", "protobuf", "numpy", "matplotlib", "cfm-runtime"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    n = model.config.n_layers
    return {"machine": platform.machine(), "cpu": _cpu_name(), "cores_available": len(os.sched_getaffinity(0)),
            "python": platform.python_version(), "versions": versions, "git_commit": _git_commit(),
            "edge_threads": torch.get_num_threads(), "center_threads": center["threads"],
            "edge_backend": model.backend.report()["backend"], "center_backend": center["backend"],
            "center_span": center["span"], "center_layer_decode_ms": round(center["layer_decode_ms"], 3),
            "model": str(model.path), "model_name": model.config.name, "n_layers": n,
            "model_fingerprint": model.fingerprint(0, n), "loadavg_start": os.getloadavg(),
            "time_start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def summarize(cells: list[dict], loopback: dict, variants: list[dict]) -> dict:
    preds = [(r["predicted_ms"], r["median_ms"], r["kind"]) for c in cells for r in c["runs"] if r["predicted_ms"]]
    within = [abs(p - m) <= 0.25 * m for p, m, _ in preds]
    overheads = [r["overhead_ms"] for c in cells for r in c["runs"] if "overhead_ms" in r]
    return {
        "cells": len(cells),
        "planner_predictions": len(preds),
        "planner_within_25pct": sum(within),
        "planner_within_25pct_by_kind": {k: f"{sum(w for w, (_, _, kk) in zip(within, preds) if kk == k)}/"
                                            f"{sum(1 for *_, kk in preds if kk == k)}" for k in ("local", "split")},
        "planner_median_abs_error_pct": round(float(np.median([abs(p - m) / m * 100 for p, m, _ in preds])), 1),
        "planner_choice_within_10pct_of_best_private": sum(c["planner_within_10pct"] for c in cells),
        "planner_choice_is_best_private": sum(c["planner"]["config"] == c["best_private"] for c in cells),
        "best_per_cell": {f"rtt {c['rtt_ms']:g} ms, {c['rate_mbit']:g} Mbit/s": c["best"] for c in cells},
        "best_private_per_cell": {f"rtt {c['rtt_ms']:g} ms, {c['rate_mbit']:g} Mbit/s": c["best_private"]
                                  for c in cells},
        "split_overhead_ms_loopback": loopback["direct"]["overhead_ms"],
        "grpc_empty_ping_ms_loopback": loopback["grpc_ping_ms"],
        "split_overhead_ms_emulator_zero_delay": loopback["emulator_zero_delay"]["overhead_ms"],
        "split_overhead_ms_grid_median": round(float(np.median(overheads)), 2) if overheads else None,
        "emulator_lateness_ms_per_delivery_median": round(float(np.median(
            [c["emulator_lateness_ms"]["grpc_link"]["median"] for c in cells])), 3),
        "emulator_lateness_ms_per_delivery_p95": round(float(np.median(
            [c["emulator_lateness_ms"]["grpc_link"]["p95"] for c in cells])), 3),
        "local_variants_ms_per_token": {v["config"]: v.get("median_ms", v.get("error")) for v in variants},
    }


# ---------------------------------------------------------------- the whole benchmark


def prompt_ids(model, n: int) -> list[int]:
    ids = model.encode_prompt([{"role": "user", "content": PROMPT}])
    if len(ids) < n:
        raise CfmError(f"the benchmark prompt has {len(ids)} tokens; ask for at most that many prompt tokens")
    return ids[:n]


def _log(msg: str) -> None:
    print(f"[bench split {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(s: Settings, out_dir: Path, model_path=None) -> dict:
    """Run the grid, write split.json and the plots to out_dir; returns the result."""
    t_start = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_model(model_path, LoadOptions(threads=s.edge_threads, weights=s.weights, progress=False))
    prompt = prompt_ids(model, s.prompt_tokens)
    with CenterProcess(model_path, s.center_threads, weights=s.weights) as cp:
        center = cp.info
        env = environment(model, s, center)
        _log(f"center pid {center['pid']} serving {center['span']}; loopback overhead")
        measure([LocalRun(model)], prompt[:8], 2)  # warm-up
        loopback = loopback_overhead(model, center, s, prompt)
        variants = local_variants(model_path, s, prompt) if s.local_variants else []
        for v in variants:
            _log(f"{v['config']}: " + (v.get("error") or f"{v['median_ms']} ms per token, TTFT {v['ttft_ms']} ms"))
        cells = []
        for rate in s.rates_mbit:
            for rtt in s.rtts_ms:
                cells.append(run_cell(model, center, rtt, rate, s, prompt))
                c = cells[-1]
                _log(f"RTT {rtt:g} ms, {rate:g} Mbit/s: best {c['best']} {c['best_ms']} ms; "
                     f"planner {c['planner']['config']} {c['planner_measured_ms']} ms")
    splits = sorted({tuple(r["split"]) for c in cells for r in c["runs"] if r["split"]})
    _log(f"wire quality at {splits}")
    if s.weights != "fp32":  # the wire's cost is measured against the fp32 model, without the weights' own
        model = None
        release_freed_memory()
        model = load_model(model_path, LoadOptions(threads=s.edge_threads, weights="fp32", progress=False))
    quality = wire_quality(model, eval_texts(model, s.quality_tokens), splits)
    env |= {"loadavg_end": os.getloadavg(), "elapsed_s": round(time.perf_counter() - t_start, 1)}
    result = {"benchmark": "split", "settings": asdict(s), "environment": env,
              "summary": summarize(cells, loopback, variants),
              "loopback": loopback, "quality": quality, "cells": cells,
              "local_variants": variants, "notes": NOTES}
    _save(result, out_dir)  # the measurements survive a plotting failure
    result["plots"] = [p.name for p in plot_all(result, out_dir)]
    _save(result, out_dir)
    return result


def _save(result: dict, out_dir: Path) -> None:
    (out_dir / "split.json").write_text(json.dumps(result, indent=1, allow_nan=False))  # NaN would be a bug


NOTES = [
    "int8 with a per-row scale is not a cfm.v1 wire dtype: its quality is measured offline (quantize -> dequantize "
    "of the real hidden states at both split points) and its latency is the planner's prediction only.",
    "TTFT is from the prompt's first byte to the first token, the median of 3 prefills from position 0 (the "
    "session is opened before timing).",
    "The edge and the center run the weights in settings.weights (int4: the product's default); the wire-quality "
    "rows compare against the fp32 model.",
    "center-only sends token ids in the clear (the server sees the text): a baseline, not a deployment option.",
    "overhead_ms = round trip - center compute - emulated RTT - bytes at the emulated rate (gRPC, serialisation, "
    "scheduling, the emulator's own proxying). emulator_lateness_ms is how late the emulator delivered segments "
    "after their due time (host scheduling; a round trip has two deliveries).",
    "The link emulator runs in the edge's process (a thread with its own event loop).",
]
