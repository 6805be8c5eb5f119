"""Per-layer density plan vs uniform density, end to end on held-out text (int4 predictor selection).

Measures each layer's end-to-end sensitivity (mean KL from dense with only that layer sparse) on the
last `--sens-tokens` calibration tokens at densities 0.3-0.7, solves the per-layer plan
(cfm_runtime/sparse/plan.py) at mean densities 0.5 and 0.6, and compares held-out perplexity of the
plan with uniform density at the same mean.

    python benchmarks/bench_sparse_plan.py --pack DIR [--sens-tokens 64]

Writes benchmarks/results/sparse_plan.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_sparse import evaluate, held_out  # noqa: E402
from benchmarks.common import environment, save  # noqa: E402

LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pack", required=True)
    ap.add_argument("--sens-tokens", type=int, default=64)
    ap.add_argument("--means", type=float, nargs="+", default=[0.5, 0.6])
    args = ap.parse_args()
    import torch

    import cfm_runtime
    from cfm_runtime import SparseOptions
    from cfm_runtime.sparse import open_pack
    from cfm_runtime.sparse.plan import densities
    from cfm_runtime.sparse.profile import predictor_from, sensitivity, tail_sequences
    from cfm_runtime.sparse.stats import calibration_texts, token_sequences

    model = cfm_runtime.load_model(threads=2, weights="fp32")
    pack = open_pack(Path(args.pack), verify=False)
    n = model.config.d_ff
    nets = [predictor_from(pack, i, np.arange(n), model.config.activation, "int4")
            for i in range(pack.n_layers)]
    # predictor_from permutes outputs by `order`; identity order keeps model order for the sensitivity run
    seqs = token_sequences(model, calibration_texts(), 0)
    sens = sensitivity(model, tail_sequences(seqs, args.sens_tokens, args.sens_tokens), nets, LEVELS)
    texts = held_out(model)
    base, base_top = evaluate(model, texts)
    rows = []
    sparse = cfm_runtime.load_model(threads=2, weights="fp32")
    engine = sparse.attach_sparse(pack, SparseOptions(sparse=True, predictor="int4"))
    for mean in args.means:
        for plan, dens in (("uniform", [mean] * pack.n_layers), ("planned", densities(LEVELS, sens, mean))):
            engine.configure(strategy="predictor", densities=dens, measure=True)
            ppl, top = evaluate(sparse, texts)
            agree = float(torch.cat([a == b for a, b in zip(top, base_top)]).float().mean())
            rows.append({"mean_density": mean, "plan": plan, "densities": dens, "ppl": round(ppl, 3),
                         "ppl_change_pct": round(100 * (ppl / base - 1), 2), "top1_agreement": round(agree, 3)})
            print(rows[-1], flush=True)
    save("sparse_plan", {"environment": environment(2), "pack": args.pack, "sens_tokens": args.sens_tokens,
                         "levels": list(LEVELS), "sensitivity_kl": np.round(sens, 5).tolist(),
                         "dense_ppl": round(base, 3), "rows": rows})


if __name__ == "__main__":
    main()
