"""Features combined on the fast path: decode speed vs plain int4 and llama-cpp-python, and quality vs fp32.

Configurations (all greedy, 2 threads, one process for the edge; a center process on loopback when split):
- `int4`: the default local run (native decode step);
- `int4+brick`: a rank-8 brick on all seven linears of 8 layers (0, 1, 24-29), unfused side terms;
- `int4 split`: layers 2:28 on an int4 center, fp16 hidden states on the wire;
- `int4+brick split`: the brick's layers on the edge, 2:24 on the center;
- `sparse split`: the predictor-sparse FFN (fp32, density 0.6) on the edge's layers, 2:28 on the center.
Runtimes alternate every `--chunk` decode tokens with an untimed pause before each turn (as bench_decode.py:
spinning workers of the previous runtime would otherwise steal the cores), llama-cpp-python among them;
medians of the repetitions and of the paired per-chunk ratios. Split runs also report the round trip and
the center's compute per token, and the per-token overhead beyond compute.

Quality: perplexity and top-1 agreement over the held-out texts (cfm_bench/data/eval_texts.json), against fp32
with the same brick where the configuration has one (fp32 without it otherwise).

    python benchmarks/bench_compose.py [--reps 3] [--decode 64] [--chunk 8]

Saves benchmarks/results/compose.json and compose.png.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.bench_decode import PROMPTS, CfmSteps, LlamaCppSteps, perplexity, run_interleaved  # noqa: E402
from benchmarks.common import environment, median, save  # noqa: E402
from cfm_bench.center_service import CenterProcess  # noqa: E402
from cfm_bench.split import EVAL_TEXTS  # noqa: E402
from cfm_runtime import (CenterOptions, LoadOptions, RunOptions, SparseOptions, load_model)  # noqa: E402
from cfm_runtime.bricks import Brick, BrickStore, base_info  # noqa: E402
from cfm_runtime.bricks.lora import random_pairs  # noqa: E402
from cfm_runtime.memory import release_freed_memory  # noqa: E402
from cfm_runtime.tokenizer import quiet_stderr  # noqa: E402

BRICK_LAYERS = (0, 1, 24, 25, 26, 27, 28, 29)
TARGETS = {"int4+brick": 0.85, "int4 split": 0.75}  # decode speed vs plain int4 (issue 17)


class RunSteps(CfmSteps):
    """A generator's runner (local or split), greedy, with the thread setup `Generator.stream` uses."""

    def __init__(self, model, run: RunOptions):
        super().__init__(model)
        self.run, self.gen = run, None

    def new_runner(self):
        if self.gen is not None:
            self.gen.close()
        self.gen = self.model.new_generator(self.run)
        self.gen.runner.begin()
        return self.gen.runner

    def split_report(self) -> dict | None:
        return self.runner.report().get("split")

    def close(self) -> None:
        if self.gen is not None:
            self.gen.close()


def make_brick(model, store: BrickStore) -> None:
    store.save(Brick("bench8", random_pairs(model.transformer, BRICK_LAYERS), base_info(model)))


def configs(address: str, store: BrickStore) -> dict[str, tuple[LoadOptions, RunOptions]]:
    brick = (("bench8", 1.0),)
    int4, fp32 = LoadOptions(weights="int4", progress=False), LoadOptions(weights="fp32", progress=False)
    sparse = LoadOptions(sparse=SparseOptions(sparse=True), progress=False)
    return {
        "int4": (int4, RunOptions(brick_store=store.root)),
        "int4+brick": (int4, RunOptions(bricks=brick, brick_store=store.root)),
        "int4 split": (int4, RunOptions(center=CenterOptions(address, (2, 28), wire="fp16"), brick_store=store.root)),
        "int4+brick split": (int4, RunOptions(center=CenterOptions(address, (2, 24), wire="fp16"), bricks=brick,
                                              brick_store=store.root)),
        "sparse split": (sparse, RunOptions(center=CenterOptions(address, (2, 28), wire="fp16"),
                                            brick_store=store.root)),
        "fp32 reference": (fp32, RunOptions(brick_store=store.root)),
        "fp32+brick reference": (fp32, RunOptions(bricks=brick, brick_store=store.root)),
    }


def held_out(model) -> dict[str, list[int]]:
    d = json.loads(EVAL_TEXTS.read_text())
    ids = {k: model.tokenizer.encode(t) for k, t in d["texts"].items()}
    ids["chat"] = model.encode_prompt(d["chat"])
    return ids


def all_logits(model, run: RunOptions, texts: dict[str, list[int]]) -> dict[str, np.ndarray]:
    out = {}
    for name, ids in texts.items():
        gen = model.new_generator(run)
        try:
            out[name] = gen.runner.forward(ids, all_logits=True)
        finally:
            gen.close()
    return out


def quality(logits: dict[str, dict], texts: dict[str, list[int]]) -> dict:
    out = {}
    for name, lg in logits.items():
        if "reference" in name:
            continue
        ref = logits["fp32+brick reference" if "brick" in name else "fp32 reference"]
        base = perplexity(ref, texts)
        ppl = perplexity(lg, texts)
        agree = np.mean(np.concatenate([lg[k].argmax(-1) == ref[k].argmax(-1) for k in texts]))
        out[name] = {"reference": "fp32 with the brick" if "brick" in name else "fp32",
                     "perplexity": round(ppl, 4), "reference_perplexity": round(base, 4),
                     "perplexity_delta_pct": round(100 * (ppl / base - 1), 3), "top1_agreement": round(float(agree), 4)}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    names = [n for n in s if n != "llama_cpp"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    vs_int4 = [s[n]["decode_vs_int4_chunks"] for n in names]
    axes[0].bar(names, vs_int4, color=["#4c72b0" if n == "int4" else "#55a868" for n in names])
    for name, target in TARGETS.items():
        if name in names:
            axes[0].hlines(target, names.index(name) - 0.4, names.index(name) + 0.4, colors="red", linestyles="--")
    axes[0].set_ylabel("decode speed vs plain int4 (median of paired chunks)")
    axes[0].set_title("combinations vs plain int4 (red: targets)")
    vs_cpp = [s[n]["decode_vs_llama_cpp_chunks"] for n in names]
    axes[1].bar(names, vs_cpp, color="#8172b2")
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylabel("decode speed vs llama-cpp-python")
    axes[1].set_title(f"same run (load avg {result['environment']['loadavg'][0]:.1f} at start)")
    for ax in axes:
        ax.tick_params(axis="x", rotation=25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args(argv)
    from cfm_runtime.reference import open_llama

    loadavg = os.getloadavg()
    store = BrickStore(Path(tempfile.mkdtemp()) / "bricks")
    with CenterProcess(None, args.threads, (2, 28), weights="int4") as center:
        address = f"127.0.0.1:{center.info['grpc_port']}"
        runs = {}
        for name, (load, run) in configs(address, store).items():  # a model each: bricks live on a model
            model = load_model(None, replace(load, threads=args.threads))
            release_freed_memory()
            if not store.exists("bench8"):
                make_brick(model, store)
            runs[name] = RunSteps(model, run)
        first = runs["int4"].model
        with quiet_stderr():
            llm = open_llama(first.path, n_ctx=2048, n_batch=512, n_threads=args.threads,
                             n_threads_batch=args.threads, verbose=False)
        steppers = {"llama_cpp": LlamaCppSteps(llm), **{n: r for n, r in runs.items() if "reference" not in n}}
        prompts = [first.encode_prompt(p) for p in PROMPTS]
        run_interleaved(steppers, prompts[0][:16], 8, 4)  # warm-up: graphs, kernels, center session
        raw = {n: [] for n in steppers}
        chunks = {n: [] for n in steppers}
        splits = {n: [] for n in steppers}
        for rep in range(args.reps):
            for ids in prompts:
                out = run_interleaved(steppers, ids, args.decode, args.chunk)
                for n, r in out.items():
                    raw[n].append((r["prompt_tps"], r["decode_tps"]))
                    chunks[n].append(r["chunk_s"])
                    if n != "llama_cpp" and steppers[n].split_report():
                        splits[n].append(steppers[n].split_report())
            print(f"rep {rep + 1}: " + ", ".join(f"{n} {raw[n][-1][1]:.1f}" for n in steppers), flush=True)
        summary = summarize(raw, chunks, splits)
        texts = held_out(first)
        logits = {n: all_logits(r.model, r.run, texts) for n, r in runs.items()}
        for r in runs.values():
            r.close()
    result = {"benchmark": "compose", "environment": environment(args.threads) | {"loadavg": loadavg,
                                                                                "loadavg_end": os.getloadavg()},
              "settings": vars(args), "brick_layers": list(BRICK_LAYERS), "brick_rank": 8, "targets": TARGETS,
              "summary": summary, "quality": quality(logits, texts),
              "held_out_tokens": sum(len(v) for v in texts.values())}
    out_dir = Path(args.out) if args.out else None
    path = save("compose", result, out_dir)
    plot(result, path.with_suffix(".png"))
    print(json.dumps({n: {k: v for k, v in s.items() if "ratio" in k or "vs" in k} for n, s in summary.items()},
                     indent=1))
    print(json.dumps(result["quality"], indent=1))
    return result


def summarize(raw: dict, chunks: dict, splits: dict) -> dict:
    out = {}
    for n, runs in raw.items():
        paired_int4 = [a / b for ca, cb in zip(chunks["int4"], chunks[n]) for a, b in zip(ca, cb)]
        paired_cpp = [a / b for ca, cb in zip(chunks["llama_cpp"], chunks[n]) for a, b in zip(ca, cb)]
        out[n] = {"prompt_tps": median([r[0] for r in runs]), "decode_tps": median([r[1] for r in runs]),
                  "decode_vs_int4_chunks": round(median(paired_int4), 3),
                  "decode_vs_llama_cpp_chunks": round(median(paired_cpp), 3)}
        if splits[n]:
            last = splits[n][-1]
            out[n] |= {"round_trip_ms": last["round_trip_ms"], "center_compute_ms": last["center_compute_ms"],
                       "overhead_beyond_compute_ms": round(last["round_trip_ms"] - last["center_compute_ms"], 2),
                       "positions_local": last["positions_local"], "fallbacks": len(last["fallbacks"])}
    base = out["int4"]["decode_tps"]
    for n in out:
        out[n]["decode_vs_int4_medians"] = round(out[n]["decode_tps"] / base, 3)
    return out


if __name__ == "__main__":
    main()
