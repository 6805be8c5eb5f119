"""Load on `cfm serve` and on `cfm center serve`: latency percentiles, queue depth, refusals, RSS over time.

Both servers run in their own processes (their RSS is sampled from /proc). `cfm serve`: waves of N
concurrent streaming chat clients (httpx), each asking for `--max-tokens` tokens; per request the time to
the first token and to the end, or a 429; /health is sampled for the queue depth. The center: waves of N
concurrent sessions, each a 32-position prefill and `--steps` decode steps; per step its latency; Info is
sampled for live sessions and allocated KV bytes. The machine's load average is recorded per wave (another
process may share the cores). Saves benchmarks/results/serve_load.json and .png.

    python benchmarks/bench_serve_load.py [--levels 1,4,16,64,100] [--sessions 1,8,32,64] [--max-queue 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, environment, save  # noqa: E402

from cfm_runtime.protocol.proto import pb  # noqa: E402
from cfm_runtime.split.client import CenterClient, CenterFailure  # noqa: E402

D, SPAN, PREFILL = 576, (2, 28), 32
QUESTIONS = ["Name a colour.", "Say hi.", "What is two plus two?", "Name a fruit.", "Name an animal.",
             "Give me a number.", "Name a city.", "Say goodbye."]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))], 1)


class Sampler:
    """A thread sampling `probe()` every `period` seconds into `rows` (with the time since start)."""

    def __init__(self, probe, period: float = 0.25):
        self.probe, self.period, self.rows = probe, period, []
        self.t0 = time.monotonic()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.wait(self.period):
            try:
                self.rows.append({"t": round(time.monotonic() - self.t0, 2), **self.probe()})
            except (httpx.HTTPError, OSError, CenterFailure):
                pass

    def close(self) -> list[dict]:
        self.stop.set()
        self.thread.join()
        return self.rows


def start(cmd: list[str], marker: str, stream: str) -> tuple[subprocess.Popen, str]:
    """Start a server process; -> (process, the line holding `marker`)."""
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", *cmd], text=True,
                            stdout=subprocess.PIPE if stream == "stdout" else subprocess.DEVNULL,
                            stderr=subprocess.PIPE if stream == "stderr" else subprocess.DEVNULL)
    pipe = proc.stdout if stream == "stdout" else proc.stderr
    for line in pipe:
        if marker in line:
            threading.Thread(target=pipe.read, daemon=True).start()
            return proc, line.strip()
    raise RuntimeError(f"{cmd[0]} exited before it was ready")


# ------------------------------------------------------------------ cfm serve


async def one_request(client: httpx.AsyncClient, url: str, i: int, max_tokens: int) -> dict:
    body = {"model": "smollm2-135m", "messages": [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            "temperature": 0, "max_tokens": max_tokens, "stream": True}
    t0 = time.perf_counter()
    first, tokens = None, 0
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after"),
                    "seconds": time.perf_counter() - t0}
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"content": "' in line and '"content": ""' not in line:
                first = first or time.perf_counter() - t0
                tokens += 1
    return {"status": 200, "ttft": first, "seconds": time.perf_counter() - t0, "chunks": tokens}


async def wave(url: str, n: int, max_tokens: int) -> list[dict]:
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        return await asyncio.gather(*(one_request(client, url, i, max_tokens) for i in range(n)))


def serve_load(levels: list[int], max_tokens: int, max_queue: int, weights: str, threads: int) -> dict:
    proc, line = start(["serve", "--port", "0", "--weights", weights, "--threads", str(threads), "--max-queue",
                        str(max_queue)], "serving", "stderr")
    url = line.rsplit(" at ", 1)[1].removesuffix("/v1")
    try:
        asyncio.run(wave(url, 1, 4))  # warm-up
        t0 = time.monotonic()

        def probe() -> dict:
            h = httpx.get(url + "/health", timeout=5).json()
            return {"waiting": h["waiting"], "busy": h["busy"], "rss_mb": round(rss_mb(proc.pid), 1)}

        sampler = Sampler(probe)
        rows = []
        for n in levels:
            load0, start_t = os.getloadavg()[0], round(time.monotonic() - t0, 2)
            results = asyncio.run(wave(url, n, max_tokens))
            rows.append(summarize_serve(n, results, load0, start_t, round(time.monotonic() - t0, 2)))
            print(json.dumps(rows[-1]), flush=True)
        timeline = sampler.close()
        return {"max_tokens": max_tokens, "max_queue": max_queue, "weights": weights, "threads": threads,
                "waves": rows, "timeline": timeline}
    finally:
        proc.terminate()
        proc.wait(30)


def summarize_serve(n: int, results: list[dict], load0: float, start_t: float, end_t: float) -> dict:
    ok = [r for r in results if r["status"] == 200]
    refused = [r for r in results if r["status"] == 429]
    lat = [r["seconds"] * 1000 for r in ok]
    ttft = [r["ttft"] * 1000 for r in ok if r["ttft"]]
    wall = max(r["seconds"] for r in results)
    return {"clients": n, "served": len(ok), "refused_429": len(refused),
            "other_status": sorted({r["status"] for r in results} - {200, 429}),
            "latency_ms_p50": percentile(lat, 0.5), "latency_ms_p95": percentile(lat, 0.95),
            "ttft_ms_p50": percentile(ttft, 0.5), "ttft_ms_p95": percentile(ttft, 0.95),
            "refusal_ms_p95": percentile([r["seconds"] * 1000 for r in refused], 0.95),
            "retry_after_s": sorted({int(r["retry_after"]) for r in refused}) if refused else [],
            "wall_s": round(wall, 2), "chunks_per_s": round(sum(r["chunks"] for r in ok) / wall, 1),
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)], "t": [start_t, end_t]}


# ------------------------------------------------------------------ the center


def one_session(address: str, steps: int, out: list, barrier: threading.Barrier) -> None:
    client = CenterClient(address, timeout=600)
    try:
        barrier.wait()
        t0 = time.perf_counter()
        stream = client.session(pb.OpenSession(span_start=SPAN[0], span_end=SPAN[1], dtype=pb.DTYPE_FLOAT32))
        stream.step(0, torch.randn(PREFILL, D))
        prefill = time.perf_counter() - t0
        lat = []
        for i in range(steps):
            t = time.perf_counter()
            stream.step(PREFILL + i, torch.randn(1, D))
            lat.append((time.perf_counter() - t) * 1000)
        stream.close()
        out.append({"ok": True, "prefill_ms": prefill * 1000, "step_ms": lat})
    except CenterFailure as e:
        out.append({"ok": False, "error": str(e)[:200]})
    finally:
        client.close()


def center_load(levels: list[int], steps: int, max_kv_mb: float, threads: int) -> dict:
    proc, line = start(["center", "serve", "--port", "0", "--threads", str(threads), "--max-kv-mb", str(max_kv_mb)],
                       "listening", "stdout")
    address = line.split()[1]
    info_client = CenterClient(address, timeout=30)
    try:
        t0 = time.monotonic()

        def probe() -> dict:
            lim = info_client.info().limits
            return {"sessions": lim.active_sessions, "kv_mb": round(lim.used_kv_bytes / 2**20, 1),
                    "rss_mb": round(rss_mb(proc.pid), 1)}

        one_session(address, 4, [], threading.Barrier(1))  # warm-up
        sampler = Sampler(probe)
        rows = []
        for n in levels:
            load0, start_t = os.getloadavg()[0], round(time.monotonic() - t0, 2)
            out: list = []
            barrier = threading.Barrier(n)
            threads_ = [threading.Thread(target=one_session, args=(address, steps, out, barrier)) for _ in range(n)]
            for t in threads_:
                t.start()
            for t in threads_:
                t.join()
            ok = [r for r in out if r["ok"]]
            lat = [x for r in ok for x in r["step_ms"]]
            rows.append({"sessions": n, "completed": len(ok), "failed": len(out) - len(ok),
                         "errors": sorted({r["error"] for r in out if not r["ok"]})[:3],
                         "step_ms_p50": percentile(lat, 0.5), "step_ms_p95": percentile(lat, 0.95),
                         "prefill_ms_p50": percentile([r["prefill_ms"] for r in ok], 0.5),
                         "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)],
                         "t": [start_t, round(time.monotonic() - t0, 2)]})
            print(json.dumps(rows[-1]), flush=True)
        timeline = sampler.close()
        return {"span": list(SPAN), "prefill": PREFILL, "steps": steps, "max_kv_mb": max_kv_mb, "threads": threads,
                "waves": rows, "timeline": timeline}
    finally:
        info_client.close()
        proc.terminate()
        proc.wait(30)


# ------------------------------------------------------------------ plot


def plot(serve: dict, center: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 2, figsize=(11, 7))
    w = serve["waves"]
    x = [r["clients"] for r in w]
    a = ax[0][0]
    a.plot(x, [r["latency_ms_p50"] for r in w], "o-", label="latency p50")
    a.plot(x, [r["latency_ms_p95"] for r in w], "o--", label="latency p95")
    a.plot(x, [r["ttft_ms_p50"] for r in w], "s-", label="first token p50")
    for r in w:
        if r["refused_429"]:
            a.annotate(f"{r['refused_429']} x 429", (r["clients"], r["latency_ms_p50"]), textcoords="offset points",
                       xytext=(-20, -22), fontsize=8)
    a.set(xscale="log", yscale="log", xlabel="concurrent streaming clients", ylabel="ms",
          title=f"cfm serve: {serve['max_tokens']} tokens per answer, --max-queue {serve['max_queue']}")
    a.legend(fontsize=8)
    _timeline(ax[0][1], serve["timeline"], {"waiting": ("#c63", "requests waiting")},
              "cfm serve: queue depth and RSS over time", ylabel="waiting")
    c = center["waves"]
    a = ax[1][0]
    x = [r["sessions"] for r in c]
    a.plot(x, [r["step_ms_p50"] for r in c], "o-", label="decode step p50")
    a.plot(x, [r["step_ms_p95"] for r in c], "o--", label="decode step p95")
    a.plot(x, [r["prefill_ms_p50"] for r in c], "s-", label=f"open + {PREFILL}-position prefill p50")
    a.set(xscale="log", yscale="log", xlabel="concurrent sessions", ylabel="ms",
          title=f"center layers {SPAN[0]}:{SPAN[1]}, --max-kv-mb {center['max_kv_mb']:g}")
    a.legend(fontsize=8)
    _timeline(ax[1][1], center["timeline"], {"sessions": ("#c63", "live sessions"),
                                             "kv_mb": ("#2a7", "KV MB allocated")},
              "center: sessions, KV bytes and RSS over time")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def _timeline(a, tl: list[dict], series: dict, title: str, ylabel: str | None = None) -> None:
    """`series` {key: (colour, label)} over time on `a`, and the RSS on a second axis."""
    t = [r["t"] for r in tl]
    for key, (colour, label) in series.items():
        a.plot(t, [r[key] for r in tl], color=colour, label=label)
    a.set(xlabel="s", ylabel=ylabel, title=title)
    b = a.twinx()
    b.plot(t, [r["rss_mb"] for r in tl], color="#27a", label="RSS MB")
    b.set_ylabel("RSS MB")
    a.legend(loc="upper left", fontsize=8)
    b.legend(loc="upper right", fontsize=8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--levels", default="1,4,16,64,100", help="concurrent clients of cfm serve, per wave")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=32)
    ap.add_argument("--weights", default="int4")
    ap.add_argument("--sessions", default="1,8,32,64", help="concurrent center sessions, per wave")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--max-kv-mb", type=float, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG from the saved JSON")
    args = ap.parse_args()
    if args.replot:
        data = json.loads((RESULTS / "serve_load.json").read_text())
        print(plot(data["serve"], data["center"], RESULTS / "serve_load.png"))
        return
    serve = serve_load([int(x) for x in args.levels.split(",")], args.max_tokens, args.max_queue, args.weights,
                       args.threads)
    center = center_load([int(x) for x in args.sessions.split(",")], args.steps, args.max_kv_mb, args.threads)
    path = save("serve_load", {"env": environment(args.threads), "serve": serve, "center": center})
    print(f"saved {path} and {plot(serve, center, path.with_suffix('.png'))}")


if __name__ == "__main__":
    main()
