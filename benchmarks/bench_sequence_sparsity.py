"""Per-sequence FFN sparsity (GRIFFIN, arXiv 2404.01365) on the embedded model: what it would cost in quality.

Each held-out text is split in half. The first half is the prompt: it runs dense, and its FFN activations choose
each layer's neurons once (GRIFFIN's score: each token's activation vector normalised to unit length, then the
norm of each neuron's column over the prompt). The second half then runs with every other neuron of the layer
off, and is scored: perplexity and top-1 agreement against the dense model on the same positions. Two
granularities: single neurons (what a kernel over re-blocked down columns would compute) and the Q4_1 file's
blocks of 32 consecutive neurons (what a kernel could compute from the file's own down blocks, unchanged).

It measures quality only, on the fp32 torch form; nothing here is a runtime path (docs/memory.md says what
would use it).

    python benchmarks/bench_sequence_sparsity.py [--densities 0.3,0.4,0.5,0.6,0.7] [--out sequence_sparsity]

Writes benchmarks/results/sequence_sparsity.json with the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, save  # noqa: E402

BLOCK = 32  # Q4_1 block: consecutive down-projection columns sharing a scale and a minimum


def texts(model) -> dict[str, list[int]]:
    data = json.loads((ROOT / "cfm_bench" / "data" / "eval_texts.json").read_text())
    out = {name: model.tokenizer.encode(text) for name, text in data["texts"].items()}
    out["chat"] = model.tokenizer.encode(model.tokenizer.apply_chat_template(data["chat"], add_generation_prompt=False))
    return out


def run(model, ids: list[int], prompt: int, masks=None):
    """Logits of ids [T, vocab] and the prompt positions' FFN activations per layer; with masks (per layer, a
    0/1 vector over neurons), positions from `prompt` on compute only the neurons kept."""
    import torch

    acts, hooks = {}, []

    def hook(i):
        def pre(module, args):
            a = args[0]
            acts[i] = a[0, :prompt].detach().clone()
            if masks is None:
                return None
            b = a.clone()
            b[:, prompt:] *= masks[i]
            return (b,)
        return pre

    for i, layer in enumerate(model.transformer.layers):
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook(i)))
    try:
        with torch.no_grad():
            logits = model.logits(ids)
    finally:
        for h in hooks:
            h.remove()
    return logits, acts


def scores(acts) -> dict:
    """GRIFFIN's per-neuron score over the prompt: the column norms of the row-normalised activations."""
    return {i: (a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)).norm(dim=0) for i, a in acts.items()}


def mask(score, density: float, block: int):
    import torch

    f = score.numel()
    if block == 1:
        keep = score.topk(max(1, round(density * f))).indices
        m = torch.zeros(f)
        m[keep] = 1.0
        return m
    per = (score ** 2).reshape(-1, block).sum(-1)
    keep = per.topk(max(1, round(density * f / block))).indices
    m = torch.zeros(f // block)
    m[keep] = 1.0
    return m.repeat_interleave(block)


def nll(logits, ids: list[int], start: int) -> tuple[float, int]:
    import numpy as np

    z = logits[start - 1:len(ids) - 1].astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    targets = np.asarray(ids[start:])
    return float(-logp[np.arange(len(targets)), targets].sum()), len(targets)


def main() -> None:
    from cfm_runtime import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--densities", default="0.3,0.4,0.5,0.6,0.7")
    ap.add_argument("--out", default="sequence_sparsity")
    args = ap.parse_args()
    densities = [float(d) for d in args.densities.split(",")]
    model = load_model(weights="fp32", threads=2)
    result = {"env": environment(2), "loadavg_before": os.getloadavg(), "texts": {}, "rows": []}
    data, dense = texts(model), {}
    for name, ids in data.items():
        prompt = len(ids) // 2
        logits, acts = run(model, ids, prompt)
        dense[name] = (logits, scores(acts), prompt)
        result["texts"][name] = {"tokens": len(ids), "prompt": prompt}
    base_nll = sum(nll(dense[name][0], ids, dense[name][2])[0] for name, ids in data.items())
    count = sum(len(ids) - dense[name][2] for name, ids in data.items())
    result["dense_ppl"] = math.exp(base_nll / count)
    for block in (1, BLOCK):
        for d in densities:
            total, agree = 0.0, 0
            for name, ids in data.items():
                logits0, score, prompt = dense[name]
                logits, _ = run(model, ids, prompt, {i: mask(s, d, block) for i, s in score.items()})
                total += nll(logits, ids, prompt)[0]
                agree += int((logits[prompt - 1:-1].argmax(-1) == logits0[prompt - 1:-1].argmax(-1)).sum())
            row = {"granularity": "neuron" if block == 1 else f"block of {block}", "density": d,
                   "ppl": math.exp(total / count), "ppl_change": math.exp(total / count) / result["dense_ppl"] - 1,
                   "top1_vs_dense": agree / count}
            result["rows"].append(row)
            print(row, flush=True)
    result["scored_tokens"] = count
    result["loadavg_after"] = os.getloadavg()
    print(save(args.out, result))


if __name__ == "__main__":
    main()
