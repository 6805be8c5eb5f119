"""The center on Ray Serve vs the single-process center: aggregate decode tokens/s and p95 per-token latency
against the number of concurrent sessions, and the cost of the Serve proxy hop per step.

Configurations (layers 2:28 of the embedded model, 1 torch thread per center process):
  center   `cfm center serve --threads 1`, one process, clients connect directly;
  serve-1  1 Serve replica behind Serve's gRPC proxy (same compute as `center`: the difference is the hop);
  serve-2  2 Serve replicas (both cores of this machine).
Client threads each open a session, send a 16-position prefill, then decode steps of one position as
fast as answers come back (random hidden states: the centre's work does not depend on their values).
The proxy hop is measured twice: unary Ping round trip, and per decode step as round trip minus the
center's own compute time (StepResult.compute_ms), each vs the direct connection.

    python benchmarks/bench_ray_serve.py [--sessions 1,4,16,32] [--steps 8]
Saves benchmarks/results/ray_serve.json and ray_serve.png.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import RESULTS, environment, save  # noqa: E402

from cfm_runtime.protocol.proto import pb  # noqa: E402
from cfm_runtime.split.client import CenterClient  # noqa: E402

D, SPAN, PREFILL = 576, (2, 28), 16


def start_center() -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", "center", "serve", "--port", "0", "--layers",
                             f"{SPAN[0]}:{SPAN[1]}", "--threads", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("listening "):
            return proc, line.split()[1]
    raise RuntimeError("center exited before listening")


def one_session(address: str, steps: int, out: list, start: threading.Barrier) -> None:
    client = CenterClient(address, timeout=300)
    stream = client.session(pb.OpenSession(span_start=SPAN[0], span_end=SPAN[1], dtype=pb.DTYPE_FLOAT32))
    stream.step(0, torch.randn(PREFILL, D))
    start.wait()
    lat, overhead, batches = [], [], []
    for i in range(steps):
        t0 = time.perf_counter()
        r = stream.step(PREFILL + i, torch.randn(1, D))
        ms = (time.perf_counter() - t0) * 1000
        lat.append(ms)
        overhead.append(ms - r.compute_ms)
        batches.append(r.batch_size)
    out.append((time.perf_counter(), lat, overhead, batches))
    stream.close()
    client.close()


def run(address: str, sessions: int, steps: int) -> dict:
    results: list = []
    barrier = threading.Barrier(sessions + 1)
    threads = [threading.Thread(target=one_session, args=(address, steps, results, barrier)) for _ in range(sessions)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = max(r[0] for r in results) - t0
    lat = sorted(x for r in results for x in r[1])
    over = [x for r in results for x in r[2]]
    return {"sessions": sessions, "steps": steps, "tokens_per_s": round(sessions * steps / wall, 2),
            "p50_ms": round(statistics.median(lat), 1), "p95_ms": round(lat[int(0.95 * (len(lat) - 1))], 1),
            "overhead_ms": round(statistics.median(over), 1),
            "batch_mean": round(statistics.mean(b for r in results for b in r[3]), 2)}


def ping_ms(address: str, n: int = 30) -> float:
    client = CenterClient(address, timeout=60)
    client.ping()
    ms = sorted(client.ping() * 1000 for _ in range(n))
    client.close()
    return round(statistics.median(ms), 2)


def sweep(name: str, address: str, sessions: list[int], steps: int) -> dict:
    rows = []
    for n in sessions:
        rows.append(run(address, n, steps))
        print(f"{name:8s} {rows[-1]}", flush=True)
    return {"ping_ms": ping_ms(address), "rows": rows}


def serve_sweeps(sessions: list[int], steps: int) -> dict:
    import ray

    from center.ray_serve import APP_NAME, deploy, shutdown

    from ray import serve

    out = {}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        port = _free_port()
        for replicas in (1, 2):
            deploy({"replicas": replicas, "layers": f"{SPAN[0]}:{SPAN[1]}", "threads": 1, "max_sessions": 64,
                    "session_positions": 64},
                   grpc_port=port)
            out[f"serve-{replicas}"] = sweep(f"serve-{replicas}", f"127.0.0.1:{port}", sessions, steps)
            serve.delete(APP_NAME)
    finally:
        shutdown()
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for name, res in data["configs"].items():
        xs = [r["sessions"] for r in res["rows"]]
        a.plot(xs, [r["tokens_per_s"] for r in res["rows"]], marker="o", label=name)
        b.plot(xs, [r["p95_ms"] for r in res["rows"]], marker="o", label=name)
    for ax, title in ((a, "aggregate decode steps/s"), (b, "p95 per-step latency, ms")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent sessions")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("center layers 2:28, 1 thread per process, 2-core machine")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sessions", default="1,4,16,32")
    ap.add_argument("--steps", type=int, default=8)
    args = ap.parse_args()
    sessions = [int(x) for x in args.sessions.split(",")]
    configs = {}
    proc, address = start_center()
    try:
        configs["center"] = sweep("center", address, sessions, args.steps)
    finally:
        proc.kill()
        proc.wait()
    configs.update(serve_sweeps(sessions, args.steps))
    c, s1 = configs["center"], configs["serve-1"]
    hop = {"ping_ms": round(s1["ping_ms"] - c["ping_ms"], 2),
           "step_overhead_ms_1_session": round(s1["rows"][0]["overhead_ms"] - c["rows"][0]["overhead_ms"], 1)}
    data = {"environment": environment(1), "span": list(SPAN), "prefill": PREFILL, "configs": configs,
            "serve_proxy_hop": hop}
    print("Serve proxy hop:", hop)
    path = save("ray_serve", data)
    plot(data, RESULTS / "ray_serve.png")
    print(f"saved {path} and {RESULTS / 'ray_serve.png'}")


if __name__ == "__main__":
    main()
