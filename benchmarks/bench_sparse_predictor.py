"""Predictor quality vs rank: recall on held-out calibration tokens and end-to-end perplexity on held-out text.

The predictor (cfm_runtime/sparse/predictor.py) reconstructs the FFN's gate and up pre-activations at
rank r and scores neurons by |act(g^) * u^|. For each rank, with and without the activation-sensitivity
weighting: per-layer recall / mass recall of the oracle top-k (15% of the calibration tokens, held out
from the fit), and perplexity / top-1 agreement with dense on cfm_bench/data/eval_texts.json (never used in
calibration) at uniform densities 0.3 / 0.5 / 0.7, through the real SparseFFN (measure mode: per-token
top-k of predicted scores, masked). The oracle (true top-k) is measured beside it. Cost per token in
multiply-adds and bytes relative to the dense FFN.

    python benchmarks/bench_sparse_predictor.py [--ranks 32 64 96 128 192] [--chat-answers 4]

Writes benchmarks/results/sparse_predictor.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sparse import evaluate, held_out  # noqa: E402  (one perplexity loop for both)
from benchmarks.common import environment, save  # noqa: E402

DENSITIES = (0.3, 0.5, 0.7)


def end_to_end(model, nets, strategy: str, densities, texts, base, base_top) -> list[dict]:
    """Perplexity change and top-1 agreement with dense through SparseFFN modules in measure mode."""
    from cfm_runtime.sparse.engine import SparseEngine
    from cfm_runtime.sparse.profile import ram_module

    layers = model.transformer.layers
    originals = [layer.mlp for layer in layers]
    n = model.config.d_ff
    modules = [ram_module(i, layer.mlp, np.arange(n), nets[i] if nets else None) for i, layer in enumerate(layers)]
    engine = SparseEngine(modules)
    rows = []
    try:
        for layer, m in zip(layers, modules):
            layer.mlp = m
        for d in densities:
            dens = d if isinstance(d, list) else [d] * len(layers)
            engine.configure(strategy=strategy, densities=dens, measure=True)
            ppl, top = evaluate(model, texts)
            agree = float(torch.cat([a == b for a, b in zip(top, base_top)]).float().mean())
            rows.append({"density": round(float(np.mean(dens)), 3), "ppl": round(ppl, 3),
                         "ppl_change_pct": round(100 * (ppl / base - 1), 2), "top1_agreement": round(agree, 3)})
    finally:
        for layer, mlp in zip(layers, originals):
            layer.mlp = mlp
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64, 96, 128, 192])
    ap.add_argument("--chat-answers", type=int, default=4)
    ap.add_argument("--no-unweighted", action="store_true", help="skip the unweighted-SVD comparison")
    args = ap.parse_args()
    import cfm_runtime
    from cfm_runtime.sparse import predictor as pred
    from cfm_runtime.sparse.stats import calibration_texts, collect, token_sequences

    torch.set_num_threads(2)
    model = cfm_runtime.load_model(threads=2, weights="fp32")
    seqs = token_sequences(model, calibration_texts(), args.chat_answers)
    acts = collect(model, seqs)
    split = int(acts.n_tokens * 0.85)
    texts = held_out(model)
    base, base_top = evaluate(model, texts)
    print(f"calibration tokens {acts.n_tokens}, held-out eval tokens {sum(map(len, texts))}, dense ppl {base:.3f}")
    data = {"environment": environment(2), "calibration_tokens": acts.n_tokens, "fit_tokens": split,
            "eval_tokens": sum(map(len, texts)), "dense_ppl": round(base, 3), "densities": list(DENSITIES),
            "oracle": end_to_end(model, None, "oracle", DENSITIES, texts, base, base_top), "predictors": []}
    print("oracle", data["oracle"], flush=True)
    layers = model.transformer.layers
    q4 = [pred.QuantPredictor.fit(layer.mlp, model.config.activation) for layer in layers]
    data["int4"] = {"cost": pred.cost(q4[0], model.config.d_model, model.config.d_ff),
                    "recall_mean": {f"{d:g}": round(float(np.mean([pred.recall(q4[i], acts.inputs[i][split:],
                                                                                acts.acts[i][split:], d)["recall"]
                                                                    for i in range(len(layers))])), 4)
                                    for d in DENSITIES},
                    "end_to_end": end_to_end(model, q4, "predictor", DENSITIES, texts, base, base_top)}
    print("int4", data["int4"], flush=True)
    for weighting in ((True,) if args.no_unweighted else (True, False)):
        for rank in args.ranks:
            t0 = time.time()
            nets = [pred.train(acts.inputs[i][:split], layers[i].mlp, rank=rank, activation=model.config.activation,
                               weighting=weighting) for i in range(len(layers))]
            fit_s = time.time() - t0
            rec = {f"{d:g}": [pred.recall(nets[i], acts.inputs[i][split:], acts.acts[i][split:], d)
                              for i in range(len(layers))] for d in DENSITIES}
            row = {"rank": rank, "weighting": weighting, "fit_seconds_all_layers": round(fit_s, 1),
                   "cost": pred.cost(nets[0], model.config.d_model, model.config.d_ff),
                   "recall_mean": {d: round(float(np.mean([r["recall"] for r in v])), 4) for d, v in rec.items()},
                   "mass_recall_mean": {d: round(float(np.mean([r["mass_recall"] for r in v])), 4)
                                        for d, v in rec.items()},
                   "recall_min_layer": {d: round(float(np.min([r["recall"] for r in v])), 4) for d, v in rec.items()},
                   "end_to_end": end_to_end(model, nets, "predictor", DENSITIES, texts, base, base_top)}
            data["predictors"].append(row)
            print(json.dumps({k: row[k] for k in ("rank", "weighting", "recall_mean", "mass_recall_mean")}),
                  row["end_to_end"], flush=True)
    save("sparse_predictor", data)


if __name__ == "__main__":
    main()
