"""Decode and prompt speed of every weight format vs llama-cpp-python, with bytes per token and quality.

One process, one prompt set; runtimes alternate every few decode tokens (llama.cpp 8 tokens, cfm fp32 8,
cfm int4 8, ... each continuing its own greedy sequence), so machine noise hits every runtime alike;
medians over the repetitions, ratios to llama.cpp, and the median of the per-chunk paired ratios.
Also: weight bytes read per token, a physical limit (measured read bandwidth / bytes per token),
model RSS, perplexity and top-1 agreement against cfm fp32 on cfm_bench/data/eval_texts.json, and an
onnxruntime profile of one int4 decode step (where the time goes).

    python benchmarks/bench_decode.py [--threads 2] [--reps 3] [--decode 64] [--chunk 8]
        [--configs fp32,int8,int4,int4:nospin]

Saves benchmarks/results/decode.json and decode.png.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPT, RESULTS, environment, median, save  # noqa: E402

from cfm_runtime.reference import llama_cpp_logits  # noqa: E402
from cfm_runtime.generate import torch_threads  # noqa: E402
import cfm_runtime  # noqa: E402
from cfm_runtime.gguf_file import read_gguf  # noqa: E402
from cfm_runtime import LocalRunner  # noqa: E402
from cfm_runtime.backends import FusedBackend, decoder_weights, weight_bytes_per_token  # noqa: E402
from cfm_runtime.kernels import graph  # noqa: E402
from cfm_runtime.kernels.fused import FusedSpan  # noqa: E402
from cfm_runtime.memory import release_freed_memory  # noqa: E402
from cfm_runtime.tokenizer import quiet_stderr  # noqa: E402

EVAL = Path(__file__).parents[1] / "cfm_bench" / "data" / "eval_texts.json"
CALIB = Path(cfm_runtime.__file__).parent / "data" / "calib"
PROMPTS = [
    [{"role": "user", "content": PROMPT}],
    [{"role": "user", "content": "Write a Python function that checks whether a string is a palindrome, "
                                 "then explain how it works."}],
]


# ---------------------------------------------------------------- runs


class LlamaCppSteps:
    """llama-cpp-python, greedy, one token per eval (as a chat UI streams)."""

    def __init__(self, llm):
        self.llm = llm

    def prefill(self, ids: list[int]) -> float:
        self.llm.reset()
        t0 = time.perf_counter()
        self.llm.eval(ids)
        dt = time.perf_counter() - t0
        self.tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return dt

    def decode(self, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            self.llm.eval([self.tok])
            self.tok = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return time.perf_counter() - t0


class CfmSteps:
    """A cfm_runtime model, greedy, with the thread setup `Generator.stream` uses."""

    def __init__(self, model):
        self.model = model

    def new_runner(self):
        return LocalRunner(self.model)

    def prefill(self, ids: list[int]) -> float:
        self.runner = self.new_runner()
        with torch_threads(self.runner.torch_threads()):
            t0 = time.perf_counter()
            logits = self.runner.forward(ids)[-1]
            dt = time.perf_counter() - t0
        self.tok = int(np.argmax(logits))
        return dt

    def decode(self, n: int) -> float:
        with torch_threads(self.runner.torch_threads()):
            t0 = time.perf_counter()
            for _ in range(n):
                self.tok = int(np.argmax(self.runner.forward([self.tok])[-1]))
            return time.perf_counter() - t0


def run_interleaved(steppers: dict, ids: list[int], n_decode: int, chunk: int, pause: float = 0.1) -> dict:
    """One prompt through every runtime: prefills in turn, then decode in chunks of `chunk` tokens taken in
    turn (llama.cpp 8 tokens, cfm 8 tokens, ..., each continuing its own sequence), so runtimes compared in a
    chunk ran ~0.1-1 s apart and the machine's drifts (other tenants: single 64-token runs varied 0.73-1.28x)
    hit them alike. `pause` seconds (untimed) before each turn let the previous runtime's worker threads stop
    spinning (onnxruntime's, llama.cpp's and torch's OpenMP workers all busy-wait for a while after their
    work), which would otherwise steal the cores from the next one. -> {name: {"prompt_tps", "decode_tps",
    "chunk_s": [...]}}"""
    out = {}
    for name, st in steppers.items():
        time.sleep(pause)
        out[name] = {"prompt_tps": len(ids) / st.prefill(ids), "chunk_s": []}
    for done in range(0, n_decode, chunk):
        k = min(chunk, n_decode - done)
        for name, st in steppers.items():
            time.sleep(pause)
            out[name]["chunk_s"].append(st.decode(k) / k)
    for r in out.values():
        r["decode_tps"] = 1.0 / float(np.mean(r["chunk_s"]))
    return out


# ---------------------------------------------------------------- quality


def eval_ids(model) -> dict[str, list[int]]:
    """cfm_bench/data/eval_texts.json and the shipped calibration text: ~3,100 tokens (no weight format is fitted
    on either, so both are fair for measuring quantization)."""
    d = json.loads(EVAL.read_text())
    ids = {k: model.tokenizer.encode(t) for k, t in d["texts"].items()}
    ids["chat"] = model.encode_prompt(d["chat"])
    for f in sorted(CALIB.glob("*.txt")):
        ids[f"calib_{f.stem}"] = model.tokenizer.encode(f.read_text())
    return ids


def perplexity(all_logits: dict[str, np.ndarray], ids: dict[str, list[int]]) -> float:
    nll = n = 0.0
    for name, lg in all_logits.items():
        lp = torch.log_softmax(torch.from_numpy(lg[:-1]), -1)
        nll -= float(lp.gather(1, torch.tensor(ids[name][1:])[:, None]).sum())
        n += len(ids[name]) - 1
    return float(np.exp(nll / n))


def step_logits(model, ids: list[int]) -> np.ndarray:
    """Logits of every position fed one token at a time, as decoding computes them (teacher forcing)."""
    runner = LocalRunner(model)
    with torch_threads(runner.torch_threads()):
        return np.stack([runner.forward([i])[-1] for i in ids])


def quality(logits: dict[str, dict], ids: dict[str, list[int]]) -> dict:
    ref = logits["cfm_fp32"]
    base = perplexity(ref, ids)
    out = {}
    for name, lg in logits.items():
        ppl = perplexity(lg, ids)
        agree = np.mean(np.concatenate([lg[k].argmax(-1) == ref[k].argmax(-1) for k in ids]))
        out[name] = {"perplexity": ppl, "perplexity_delta_pct": 100 * (ppl / base - 1),
                     "top1_agreement_vs_fp32": float(agree)}
    return out


# ---------------------------------------------------------------- bytes and bandwidth


def llama_cpp_bytes_per_token(path) -> int:
    """llama.cpp reads every tensor once per token (token_embd doubles as the tied LM head)."""
    _, tensors = read_gguf(path)
    return sum(t.n_bytes for t in tensors)


def read_bandwidth(threads: int, mb: int = 512, reps: int = 5) -> float:
    """Bytes/s of a streaming read (sum over a buffer much larger than the caches)."""
    torch.set_num_threads(threads)
    a = torch.ones(mb * 2**20 // 4)
    a.sum()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a.sum()
        times.append(time.perf_counter() - t0)
    return a.numel() * 4 / min(times)


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / 2**20


# ---------------------------------------------------------------- profile


def profile_decode_step(model, threads: int, steps: int = 20) -> dict:
    """Per-operator time of fused decode steps (onnxruntime profiler), microseconds per step."""
    t = model.transformer
    options = graph.session_options

    def profiled(n, spin=False):
        so = options(n, spin)
        so.enable_profiling = True
        so.profile_file_prefix = os.path.join(tempfile.gettempdir(), "cfm_decode_profile")
        return so

    graph.session_options = profiled
    try:
        span = FusedSpan(decoder_weights(t), 0, t.config.n_layers, threads, head=True)
    finally:
        graph.session_options = options
    cache = t.new_cache()
    layers = [cache[i] for i in range(t.config.n_layers)]
    span.forward(t.embed(torch.tensor([list(range(100, 300))])), layers)
    x = t.embed(torch.tensor([[42]]))
    for _ in range(steps):
        span.forward(x, layers)
    events = json.loads(Path(span.session.end_profiling()).read_text())
    runs = [e for e in events if e.get("name") == "model_run"]
    start = runs[0]["ts"] + runs[0]["dur"]  # skip the prefill run
    per_op = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > start:
            per_op[e["args"]["op_name"]] += e["dur"] / steps
    step = median([e["dur"] for e in runs[1:]])
    return {"step_us": step, "kernels_us": sum(per_op.values()),
            "per_op_us": dict(sorted(per_op.items(), key=lambda kv: -kv[1]))}


# ---------------------------------------------------------------- plot


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    dec = [summary[n]["decode_tps"] for n in names]
    a.bar(names, dec, color=["#888"] + ["#3a7"] * (len(names) - 1))
    for i, n in enumerate(names):
        lim = summary[n].get("bandwidth_limit_tps")
        if lim:
            a.plot([i - 0.4, i + 0.4], [lim, lim], "r--", lw=1)
    a.set_title("decode tok/s (red: read bandwidth / bytes per token)")
    a.tick_params(axis="x", rotation=20)
    b.bar(names, [summary[n]["prompt_tps"] for n in names], color=["#888"] + ["#37a"] * (len(names) - 1))
    b.set_title("prompt tok/s")
    b.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- main


def load_all(args) -> tuple[dict, dict]:
    models, rss = {}, {}
    for fmt in args.configs.split(","):
        fmt, _, option = fmt.partition(":")
        weights, _, head = fmt.partition("+")
        before = rss_mb()
        m = cfm_runtime.load_model(args.model, threads=args.threads, weights=weights, lm_head=head or None)
        if option in ("spin", "nospin"):  # onnxruntime workers spinning between ops (the default) or sleeping
            m.backend = FusedBackend(m.transformer, decoder_weights(m.transformer), args.threads,
                                     spin=option == "spin")
        elif option:
            raise SystemExit(f"unknown config option {option!r} in {args.configs!r} (known: spin, nospin)")
        name = f"cfm_{fmt}" + (f":{option}" if option else "")
        models[name] = m
        release_freed_memory()
        rss[name] = rss_mb() - before
    return models, rss


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8, help="decode tokens per runtime per turn (interleaving)")
    ap.add_argument("--configs", default="fp32,int8,int4",
                    help="comma-separated weight formats, each optionally +HEAD and :spin/:nospin (e.g. int4:nospin)")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    from cfm_runtime.reference import open_llama

    base_rss, load_before = rss_mb(), os.getloadavg()[0]
    models, rss = load_all(args)
    first = next(iter(models.values()))
    path = first.path
    with quiet_stderr():
        llm = open_llama(path, n_ctx=2048, n_batch=512, n_threads=args.threads,
                         n_threads_batch=args.threads, verbose=False)
    rss = {"llama_cpp": None, **rss}
    prompts = [first.encode_prompt(p) for p in PROMPTS]

    steppers = {"llama_cpp": LlamaCppSteps(llm), **{name: CfmSteps(m) for name, m in models.items()}}
    run_interleaved(steppers, prompts[0][:16], 8, 4)  # warm-up (builds the fused graphs)
    raw = {name: [] for name in steppers}
    chunk_ratios = {name: [] for name in steppers}  # per chunk: llama.cpp's time per token / this runtime's
    for rep in range(args.reps):
        for ids in prompts:
            runs = run_interleaved(steppers, ids, args.decode, args.chunk)
            for name, r in runs.items():
                raw[name].append((r["prompt_tps"], r["decode_tps"]))
                chunk_ratios[name] += [a / b for a, b in zip(runs["llama_cpp"]["chunk_s"], r["chunk_s"])]
        print(f"rep {rep + 1}: " + ", ".join(f"{n} {raw[n][-1][1]:.1f}" for n in steppers), flush=True)

    bandwidth = read_bandwidth(args.threads)
    ids = eval_ids(first)
    logits = {name: {k: m.logits(v) for k, v in ids.items()} for name, m in models.items()}
    for name, m in models.items():  # decode steps take another path (the native kernel): measure it too
        if m.backend.name == "fused":
            logits[f"{name}:steps"] = {k: step_logits(m, v) for k, v in ids.items()}
    logits["llama_cpp"] = {k: llama_cpp_logits(path, v, args.threads) for k, v in ids.items()}
    q = quality(logits, ids) if "cfm_fp32" in logits else {}
    for name in models:
        for key, value in q.pop(f"{name}:steps", {}).items():
            q.setdefault(name, {})[f"decode_steps_{key}"] = value

    bytes_per_token = {"llama_cpp": llama_cpp_bytes_per_token(path)}
    bytes_per_token.update({n: weight_bytes_per_token(m.transformer) for n, m in models.items()})
    summary = {}
    for name, runs in raw.items():
        s = {"prompt_tps": median([r[0] for r in runs]), "decode_tps": median([r[1] for r in runs]),
             "weight_mb_per_token": bytes_per_token[name] / 1e6,
             "bandwidth_limit_tps": bandwidth / bytes_per_token[name],
             "model_rss_mb": rss[name], **q.get(name, {})}
        summary[name] = s
    base = summary["llama_cpp"]
    for s in summary.values():
        s["prompt_ratio_vs_llama_cpp"] = s["prompt_tps"] / base["prompt_tps"]
        s["decode_ratio_vs_llama_cpp"] = s["decode_tps"] / base["decode_tps"]
        s["decode_fraction_of_limit"] = s["decode_tps"] / s["bandwidth_limit_tps"]
    for name, m in models.items():  # which decode step ran: the native kernel or the onnxruntime graph
        if m.backend.name == "fused":
            summary[name]["decode_path"] = m.backend.report()["decode_path"]
    for name, s in summary.items():  # the paired measure: robust to drifts between repetitions
        s["decode_ratio_median_of_chunks"] = median(chunk_ratios[name])
        s["decode_ratio_chunks_iqr"] = [float(np.percentile(chunk_ratios[name], q)) for q in (25, 75)]

    profile = None
    fast = [n for n in models if n.startswith("cfm_int4")]
    if fast:  # where the time of a decode step goes (always: the ratio alone does not say what bounds it)
        profile = profile_decode_step(models[fast[0]], args.threads)

    result = {
        "benchmark": "decode",
        "model": str(path),
        "prompt_tokens": [len(p) for p in prompts],
        "decode_tokens": args.decode,
        "decode_chunk": args.chunk,
        "reps": args.reps,
        "read_bandwidth_gb_s": bandwidth / 1e9,
        "load_average_1min_before_after": [load_before, os.getloadavg()[0]],  # other processes share the CPU
        "process_rss_before_models_mb": base_rss,
        "environment": environment(args.threads),
        "summary": summary,
        "decode_step_profile": profile,
        "raw": {k: [{"prompt_tps": p, "decode_tps": d} for p, d in v] for k, v in raw.items()},
    }
    out_dir = Path(args.out or RESULTS)
    saved = save("decode", result, out_dir)
    plot(summary, out_dir / "decode.png")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s")
    print(f"{'runtime':<16} {'prompt':>8} {'decode':>8} {'prompt x':>9} {'decode x':>9} {'chunks x':>9} "
          f"{'MB/tok':>7} {'limit':>6} {'ppl':>7} {'dppl %':>7} {'top1':>6}")
    for name, s in summary.items():
        print(f"{name:<16} {s['prompt_tps']:>8.1f} {s['decode_tps']:>8.1f} {s['prompt_ratio_vs_llama_cpp']:>9.2f} "
              f"{s['decode_ratio_vs_llama_cpp']:>9.2f} {s['decode_ratio_median_of_chunks']:>9.2f} "
              f"{s['weight_mb_per_token']:>7.1f} "
              f"{s['bandwidth_limit_tps']:>6.0f} {s.get('perplexity', float('nan')):>7.3f} "
              f"{s.get('perplexity_delta_pct', float('nan')):>7.2f} {s.get('top1_agreement_vs_fp32', float('nan')):>6.3f}")
        if "decode_steps_perplexity" in s:
            print(f"{'  decode steps':<16} {'':>57} {s['decode_steps_perplexity']:>7.3f} "
                  f"{s['decode_steps_perplexity_delta_pct']:>7.2f} {s['decode_steps_top1_agreement_vs_fp32']:>6.3f}")
    for name, s in summary.items():
        if "decode_path" in s:
            print(f"{name}: decode steps on the {s['decode_path']}")
    if profile:
        print(f"int4 decode step {profile['step_us']:.0f} us, kernels {profile['kernels_us']:.0f} us:",
              ", ".join(f"{k} {v:.0f}" for k, v in list(profile["per_op_us"].items())[:8]))
    print(f"saved {saved} and decode.png")
    return result


if __name__ == "__main__":
    main()
