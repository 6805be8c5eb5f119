"""Prompt and decode tokens/s: cfm_runtime vs llama-cpp-python on the same GGUF, same threads, one run.

Runs alternate (llama.cpp, cfm, llama.cpp, cfm, ...) so machine noise hits both alike; medians and
ratios are reported and saved to benchmarks/results/speed.json.

    python benchmarks/bench_speed.py [--model PATH] [--threads 2] [--reps 3] [--decode 128]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import PROMPT, environment, median, save  # noqa: E402

import cfm_runtime  # noqa: E402
from cfm_runtime.tokenizer import quiet_stderr  # noqa: E402


def run_llama_cpp(llm, ids: list[int], n_decode: int) -> tuple[float, float]:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    t_prompt = time.perf_counter() - t0
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        llm.eval([tok])
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t_decode = time.perf_counter() - t0
    return len(ids) / t_prompt, n_decode / t_decode


def run_cfm(model, ids: list[int], n_decode: int) -> tuple[float, float]:
    runner = model.new_runner()
    t0 = time.perf_counter()
    logits = runner.forward(ids)[-1]
    t_prompt = time.perf_counter() - t0
    tok = int(torch.argmax(logits))
    t0 = time.perf_counter()
    for _ in range(n_decode):
        tok = int(torch.argmax(runner.forward([tok])[-1]))
    t_decode = time.perf_counter() - t0
    return len(ids) / t_prompt, n_decode / t_decode


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=128)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)

    import llama_cpp

    model = cfm_runtime.load_model(args.model, threads=args.threads)
    ids = model.encode_prompt([{"role": "user", "content": PROMPT}])
    with quiet_stderr():
        llm = llama_cpp.Llama(str(model.path), n_ctx=1024, n_batch=512, n_threads=args.threads,
                              n_threads_batch=args.threads, verbose=False)
    run_llama_cpp(llm, ids[:16], 4)  # warm-up both
    run_cfm(model, ids[:16], 4)
    raw = {"llama_cpp": [], "cfm_fp32": []}
    for rep in range(args.reps):
        raw["llama_cpp"].append(run_llama_cpp(llm, ids, args.decode))
        raw["cfm_fp32"].append(run_cfm(model, ids, args.decode))
        print(f"rep {rep + 1}: llama.cpp {raw['llama_cpp'][-1]}, cfm {raw['cfm_fp32'][-1]}", flush=True)
    summary = {}
    for name, runs in raw.items():
        summary[name] = {"prompt_tps": median([r[0] for r in runs]), "decode_tps": median([r[1] for r in runs])}
    base = summary["llama_cpp"]
    for name, s in summary.items():
        s["prompt_ratio_vs_llama_cpp"] = s["prompt_tps"] / base["prompt_tps"]
        s["decode_ratio_vs_llama_cpp"] = s["decode_tps"] / base["decode_tps"]
    result = {
        "benchmark": "speed",
        "model": str(model.path),
        "prompt_tokens": len(ids),
        "decode_tokens": args.decode,
        "reps": args.reps,
        "environment": environment(args.threads),
        "summary": summary,
        "raw": {k: [{"prompt_tps": p, "decode_tps": d} for p, d in v] for k, v in raw.items()},
    }
    path = save("speed", result, args.out)
    print(f"{'runtime':<12} {'prompt tok/s':>13} {'decode tok/s':>13} {'prompt x':>9} {'decode x':>9}")
    for name, s in summary.items():
        print(f"{name:<12} {s['prompt_tps']:>13.1f} {s['decode_tps']:>13.1f} "
              f"{s['prompt_ratio_vs_llama_cpp']:>9.2f} {s['decode_ratio_vs_llama_cpp']:>9.2f}")
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
