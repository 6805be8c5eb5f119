"""Center load: aggregate decode tokens/s with many sessions, with and without batching.

A center runs in its own process (layers 2:28 of the embedded model). Client threads each open a
session, send a 32-position prefill, then decode steps of one position as fast as answers come back.
Configurations: 1 session; N sessions with batching (--max-batch 32); N sessions without it
(--max-batch 1). Saves benchmarks/results/center_load.json.

    python benchmarks/bench_center_load.py [--sessions 16] [--steps 24] [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common import environment, save  # noqa: E402

from cfm_runtime.protocol.proto import pb  # noqa: E402
from cfm_runtime.split.client import CenterClient  # noqa: E402

D, SPAN, PREFILL = 576, (2, 28), 32


def start_center(max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cfm_cli", "center", "serve", "--port", "0", "--layers",
                             f"{SPAN[0]}:{SPAN[1]}", "--threads", str(threads), "--max-batch", str(max_batch)],
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
    batches = []
    for i in range(steps):
        batches.append(stream.step(PREFILL + i, torch.randn(1, D)).batch_size)
    out.append((time.perf_counter(), batches))
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
    seconds = max(end for end, _ in results) - t0
    batch = [b for _, bs in results for b in bs]
    return {"sessions": sessions, "decode_steps": sessions * steps, "seconds": round(seconds, 3),
            "tokens_per_s": round(sessions * steps / seconds, 2), "mean_batch": round(sum(batch) / len(batch), 2),
            "per_session_tokens_per_s": round(steps / seconds, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = {}
    for name, max_batch, sessions in (("1 session", 32, 1), (f"{args.sessions} sessions, batched", 32, args.sessions),
                                      (f"{args.sessions} sessions, no batching", 1, args.sessions)):
        proc, address = start_center(max_batch, args.threads)
        try:
            run(address, 1, 4)  # warm-up
            rows[name] = {"max_batch": max_batch, **run(address, sessions, args.steps)}
        finally:
            proc.terminate()
            proc.wait()
        print(f"{name:32s} {rows[name]['tokens_per_s']:8.1f} tok/s aggregate, mean batch {rows[name]['mean_batch']}",
              flush=True)
    names = list(rows)
    summary = {"batched_vs_1_session": round(rows[names[1]]["tokens_per_s"] / rows[names[0]]["tokens_per_s"], 2),
               "batched_vs_unbatched": round(rows[names[1]]["tokens_per_s"] / rows[names[2]]["tokens_per_s"], 2)}
    print(summary)
    path = save("center_load", {"env": environment(args.threads), "span": list(SPAN), "prefill": PREFILL,
                                "steps_per_session": args.steps, "results": rows, "summary": summary})
    print(f"saved {path} and {plot(rows, path.with_suffix('.png'))}")


def plot(rows: dict, path: Path) -> Path:
    """Bar chart of aggregate decode tokens/s per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    names = list(rows)
    bars = ax.bar(names, [rows[n]["tokens_per_s"] for n in names], color=["#888", "#2a7", "#c63"])
    ax.bar_label(bars, [f"{rows[n]['tokens_per_s']:.0f} tok/s\nbatch {rows[n]['mean_batch']}" for n in names])
    ax.set_ylabel("aggregate decode tok/s")
    ax.set_title(f"center layers {SPAN[0]}:{SPAN[1]}, loopback")
    ax.margins(y=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


if __name__ == "__main__":
    main()
