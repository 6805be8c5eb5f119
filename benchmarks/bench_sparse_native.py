"""The sparse FFN in the native kernel (`--sparse` on int4 weights) against dense int4 and llama-cpp-python.

Speed: one process; llama-cpp-python, cfm int4 dense, cfm int4 sparse at the densities asked (the pack's planned
per-layer densities, the `--sparse` default) and the torch sparse FFN on fp32 weights (what `--sparse` ran on
before) decode in turn, 8 tokens each, paused between turns (`bench_decode.run_interleaved`), over the two chat
prompts of `bench_decode.py`, `--reps` rounds; medians, and ratios to llama.cpp in the same run.

Quality: perplexity and next-token agreement with the fp32 model on the held-out texts
(`cfm_bench/data/eval_texts.json`; the pack's density plan was measured on the calibration text, not these),
every position through the configuration as it runs (the kernel's sparse FFN selects at every position; the fp32
sparse FFN is measured with its selection on every position too).

    python benchmarks/bench_sparse_native.py [--densities 0.5,0.6,0.7] [--reps 3] [--decode 64] [--threads 2]

Writes benchmarks/results/sparse_native.json and sparse_native.png, with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import PROMPTS, CfmSteps, LlamaCppSteps, run_interleaved  # noqa: E402
from common import RESULTS, environment, median, save, token_nll  # noqa: E402

from cfm_runtime import load_model  # noqa: E402
from cfm_runtime.loading import default_model_path  # noqa: E402
from cfm_runtime.reference import open_llama  # noqa: E402
from cfm_runtime.runtime import ensure_pack  # noqa: E402
from cfm_runtime.tokenizer import quiet_stderr  # noqa: E402

EVAL = Path(__file__).parents[1] / "cfm_bench" / "data" / "eval_texts.json"


def quality(models: dict, texts: list[list[int]]) -> dict:
    """Perplexity and top-1 agreement with the first model (fp32) over `texts`."""
    logits = {name: [m.logits(ids) for ids in texts] for name, m in models.items()}
    ref = next(iter(logits.values()))
    out = {}
    for name, lgs in logits.items():
        total = sum(float(token_nll(lg, ids).sum()) for lg, ids in zip(lgs, texts))
        ppl = math.exp(total / sum(len(ids) - 1 for ids in texts))
        agree = float(np.mean(np.concatenate([a.argmax(-1) == b.argmax(-1) for a, b in zip(lgs, ref)])))
        out[name] = {"perplexity": round(ppl, 4), "top1_agreement_vs_fp32": round(agree, 4)}
    base = out[next(iter(out))]["perplexity"]
    for r in out.values():
        r["perplexity_delta_pct"] = round(100 * (r["perplexity"] / base - 1), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--densities", default="0.5,0.6,0.7")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="sparse_native")
    args = ap.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    loadavg_before = os.getloadavg()
    path = default_model_path()
    pack = ensure_pack(path, threads=args.threads)

    fp32 = load_model(path, weights="fp32", threads=args.threads)
    models = {"cfm_fp32": fp32, "cfm_int4": load_model(path, threads=args.threads)}
    for d in densities:
        models[f"cfm_int4_sparse_{d:g}"] = load_model(path, threads=args.threads, sparse=True, density=d)
    dflt = 0.6 if 0.6 in densities else densities[0]
    old = load_model(path, weights="fp32", threads=args.threads, sparse=True, density=dflt, predictor="int4",
                     pack=pack)
    models[f"cfm_fp32_sparse_{dflt:g}"] = old
    reports = {name: m.backend.report() for name, m in models.items()}

    evals = json.loads(EVAL.read_text())
    texts = [fp32.tokenizer.encode(t) for t in evals["texts"].values()] + [fp32.encode_prompt(evals["chat"])]
    old.sparse.configure(measure=True)  # its selection at every position, as the kernel's
    q = quality(models, texts)
    old.sparse.configure(measure=False)
    for name, r in q.items():
        print(name, r, flush=True)

    with quiet_stderr():
        llm = open_llama(path, n_ctx=1024, n_threads=args.threads, n_batch=512, verbose=False)
    steppers = {"llama_cpp": LlamaCppSteps(llm)} | {n: CfmSteps(m) for n, m in models.items() if n != "cfm_fp32"}
    runs = {name: {"decode_tps": [], "prompt_tps": []} for name in steppers}
    for rep in range(args.reps):
        for messages in PROMPTS:
            ids = fp32.encode_prompt(messages)
            out = run_interleaved(steppers, ids, args.decode, args.chunk, pause=0.3)
            for name, r in out.items():
                runs[name]["decode_tps"].append(r["decode_tps"])
                runs[name]["prompt_tps"].append(r["prompt_tps"])
            print(rep, {n: round(r["decode_tps"], 1) for n, r in out.items()}, flush=True)
            time.sleep(1)
    speed = {}
    for name, r in runs.items():
        ratios = [a / b for a, b in zip(r["decode_tps"], runs["llama_cpp"]["decode_tps"])]
        speed[name] = {"decode_tps": round(median(r["decode_tps"]), 1), "prompt_tps": round(median(r["prompt_tps"]), 1),
                       "decode_ratio_vs_llama_cpp": round(median(ratios), 3),
                       "decode_tps_runs": [round(x, 1) for x in r["decode_tps"]]}
    result = {"what": __doc__.splitlines()[0], "env": environment(args.threads), "loadavg_before": loadavg_before,
              "loadavg_after": os.getloadavg(), "command": "python benchmarks/bench_sparse_native.py " + " ".join(
                  sys.argv[1:]), "decode_tokens": args.decode, "reps": args.reps, "speed": speed,
              "quality_held_out": q, "held_out_tokens": sum(len(t) for t in texts), "reports": reports}
    print(save(args.out, result))
    plot(result, RESULTS / f"{args.out}.png")


def plot(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in result["speed"] if n != "llama_cpp"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.bar(range(len(names)), [result["speed"][n]["decode_ratio_vs_llama_cpp"] for n in names], color="tab:blue")
    a.axhline(1.0, color="k", lw=0.8)
    a.set_xticks(range(len(names)), [n.removeprefix("cfm_") for n in names], rotation=30, ha="right")
    a.set_ylabel("decode tok/s / llama-cpp-python (same run)")
    a.set_title("decode speed")
    q = result["quality_held_out"]
    b.bar(range(len(names)), [q[n]["perplexity_delta_pct"] for n in names], color="tab:orange")
    b.set_xticks(range(len(names)), [n.removeprefix("cfm_") for n in names], rotation=30, ha="right")
    b.set_ylabel("held-out perplexity vs fp32 (%)")
    b.set_title("quality")
    la = result["loadavg_before"]
    fig.suptitle(f"sparse FFN in the native kernel; {result['env'].get('cpu', '')} {result['env'].get('threads', '')} "
                 f"threads, load {la[0]:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main()
