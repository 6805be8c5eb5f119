"""Sparse FFN and offload: quality vs density, and speed / flash traffic vs RAM budget under a memory cap.

1. Quality on held-out text (cfm_bench/data/eval_texts.json, not in the calibration set): perplexity
   change and top-1 agreement with dense, at mean densities 0.3 to 0.7, oracle and predictor (int4 and
   low-rank), uniform densities and the pack's per-layer plan.
2. Memory: `cfm generate` runs in a memory cgroup (v1, capped at --cap MB) at several --ram-budget
   values, dense offload and --sparse; llama-cpp-python and the in-RAM dense runtime under the same
   cap beside them. Tokens/s, flash MB/token, peak RSS, greedy agreement with in-RAM dense.

    python benchmarks/bench_sparse.py [--cap 600] [--budgets 32 48 96 176] [--tokens 24] [--skip-quality]
                                      [--skip-memory] [--out sparse]

Writes benchmarks/results/sparse.json and sparse.png.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, save, RESULTS  # noqa: E402

PROMPT = "Explain in a few sentences why the sea is salty."
CGROUP = Path("/sys/fs/cgroup/memory")


def held_out(model) -> list[list[int]]:
    d = json.loads((ROOT / "cfm_bench" / "data" / "eval_texts.json").read_text())
    return [model.tokenizer.encode(t) for t in d["texts"].values()] + [model.encode_prompt(d["chat"])]


@torch.inference_mode()
def evaluate(model, texts) -> tuple[float, list[torch.Tensor]]:
    total, n, top = 0.0, 0, []
    for ids in texts:
        logits = torch.from_numpy(model.logits(ids))
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        n += len(ids) - 1
        top.append(logits.argmax(-1))
    return math.exp(total / n), top


QUALITY_RUNS = (  # (strategy, predictor kind, per-layer densities, mean densities)
    ("oracle", None, "uniform", (0.3, 0.5, 0.6, 0.7)),
    ("predictor", "int4", "uniform", (0.3, 0.5, 0.6, 0.7)),
    ("predictor", "lowrank", "uniform", (0.6,)),
    ("oracle", None, "planned", (0.5,)),
    ("predictor", "int4", "planned", (0.5,)),
)


def quality(model, pack) -> list[dict]:
    """Held-out perplexity and top-1 agreement with the dense model (`model`) of each sparse configuration,
    each on a model of its own (a sparse FFN replaces the dense one)."""
    from cfm_runtime import LoadOptions, SparseOptions, load_model
    from cfm_runtime.sparse.load import layer_densities

    texts = held_out(model)
    base, base_top = evaluate(model, texts)
    rows = [{"strategy": "dense", "density": 1.0, "ppl": base, "ppl_change_pct": 0.0, "top1_agreement": 1.0}]
    for strategy, kind, plan, levels in QUALITY_RUNS:
        sparse = load_model(model.path, LoadOptions(threads=2, weights="fp32"))
        engine = sparse.attach_sparse(pack, SparseOptions(sparse=True, predictor=kind or "int4"))
        for d in levels:
            engine.configure(strategy=strategy, densities=layer_densities(pack, d, plan), measure=True)
            ppl, top = evaluate(sparse, texts)
            agree = float(torch.cat([a == b for a, b in zip(top, base_top)]).float().mean())
            rows.append({"strategy": strategy, "predictor": kind, "layer_densities": plan, "density": d,
                         "ppl": round(ppl, 3), "ppl_change_pct": round(100 * (ppl / base - 1), 2),
                         "top1_agreement": round(agree, 3)})
            print(rows[-1], flush=True)
        del sparse, engine
    return rows


def in_cgroup(cmd: list[str], cap_mb: int | None) -> dict:
    """Run cmd (in a fresh memory cgroup capped at cap_mb if given); its JSON line, or the failure."""
    group = CGROUP / f"cfm-bench-{uuid.uuid4().hex[:8]}" if cap_mb else None
    if group:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
        cmd = ["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT,
                              env=os.environ | {"OMP_NUM_THREADS": "2"})
        oom = group is not None and "oom_kill 1" in (group / "memory.oom_control").read_text()
        cg_peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20 if group else None
    finally:
        if group:
            group.rmdir()
    if proc.returncode != 0:
        return {"ok": False, "oom_killed": oom, "returncode": proc.returncode, "stderr": proc.stderr[-400:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"ok": True, "cgroup_peak_mb": cg_peak, **out}


def cfm_cmd(tokens: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cfm_cli", "generate", "--chat", "--prompt", PROMPT, "--temperature", "0",
            "--max-tokens", str(tokens), "--threads", "2", "--json", *extra]


LLAMA = """
import json, resource, sys, time
from cfm_runtime.reference import open_llama
from cfm_runtime.loading import default_model_path
llm = open_llama(default_model_path(), n_ctx=512, n_threads=2, verbose=False)
msgs = [{"role": "user", "content": sys.argv[1]}]
t0 = time.perf_counter()
out = llm.create_chat_completion(msgs, max_tokens=int(sys.argv[2]), temperature=0)
dt = time.perf_counter() - t0
n = out["usage"]["completion_tokens"]
print(json.dumps({"text": out["choices"][0]["message"]["content"], "tokens": n, "tps_end_to_end": n / dt,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def agreement(a: str, b: str) -> float:
    n = max(len(a), len(b), 1)
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return round(same / n, 3)


def memory_runs(args, pack_dir: str) -> dict:
    # the reference is the fp32 in-RAM model (offload and --sparse run on fp32 compute; the CLI's local
    # default would be int4)
    ref = in_cgroup(cfm_cmd(args.tokens, "--weights", "fp32"), None)
    runs = {"dense_in_ram_uncapped": ref,
            "dense_in_ram_capped": in_cgroup(cfm_cmd(args.tokens, "--weights", "fp32"), args.cap),
            "llama_cpp_capped": in_cgroup([sys.executable, "-c", LLAMA, PROMPT, str(args.tokens)], args.cap)}
    for b in args.budgets:
        for sparse in (False, True):
            extra = ["--ram-budget", str(b), "--pack", pack_dir] + (["--sparse"] if sparse else [])
            r = in_cgroup(cfm_cmd(args.tokens, *extra), args.cap)
            if r["ok"]:
                r["prefix_agreement_with_dense"] = agreement(r["text"], ref.get("text", ""))
            runs[f"budget_{b}{'_sparse' if sparse else ''}"] = r
            print(b, sparse, {k: r.get(k) for k in ("ok", "decode_tps", "peak_rss_mb")}, r.get("sparse"), flush=True)
    return runs


def plot(runs: dict, budgets: list[int], cap: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    for sparse, style in ((False, "o-"), (True, "s--")):
        pts = [(b, runs[f"budget_{b}{'_sparse' if sparse else ''}"]) for b in budgets]
        pts = [(b, r) for b, r in pts if r["ok"]]
        label = "offload + sparse (predictor)" if sparse else "offload, density 1.0"
        a1.plot([b for b, _ in pts], [r["decode_tps"] for _, r in pts], style, label=label)
        a2.plot([b for b, _ in pts], [r["sparse"]["flash_mb_per_token"] for _, r in pts], style, label=label)
    llama = runs["llama_cpp_capped"]
    if llama["ok"]:
        a1.axhline(llama["tps_end_to_end"], color="gray", ls=":", label="llama-cpp-python (same cap)")
    a1.set(xlabel="RAM budget for FFN weights (MB)", ylabel="decode tokens/s", title=f"cgroup cap {cap} MB")
    a2.set(xlabel="RAM budget for FFN weights (MB)", ylabel="flash MB read per token")
    for a in (a1, a2):
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cap", type=int, default=600, help="memory cgroup cap in MB")
    ap.add_argument("--budgets", type=int, nargs="+", default=[32, 48, 96, 176])
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--skip-quality", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--out", default="sparse", help="results name (benchmarks/results/NAME.json and .png)")
    ap.add_argument("--pack", default=None, help="neuron pack directory (default: the model's, built if missing)")
    args = ap.parse_args()
    import cfm_runtime
    from cfm_runtime.runtime import ensure_pack
    from cfm_runtime.sparse import open_pack

    model = cfm_runtime.load_model(threads=2, weights="fp32")
    root = (args.pack or ensure_pack(model.path))
    data = {"environment": environment(2), "pack": str(root), "cap_mb": args.cap,
            "bundle": open_pack(root, verify=False).manifest.get("bundle", "fp16"), "loadavg_before": os.getloadavg()}
    if not args.skip_quality:
        data["quality"] = quality(model, open_pack(root, verify=False))
        save(args.out, data)
    del model
    if args.skip_memory:
        return
    data["runs"] = memory_runs(args, str(root))
    data["loadavg_after"] = os.getloadavg()
    save(args.out, data)
    plot(data["runs"], args.budgets, args.cap, RESULTS / f"{args.out}.png")
    print(json.dumps({k: {kk: v.get(kk) for kk in ("ok", "decode_tps", "peak_rss_mb", "tps_end_to_end")}
                      for k, v in data["runs"].items()}, indent=1))


if __name__ == "__main__":
    main()
