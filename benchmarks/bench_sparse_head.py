"""Could a sparse LM head pay on this model? Candidates from a 4-bit head, exact rescoring, and how often a check trusts them.

The LM head (49152 x 576, the tied Q8_0 embedding) is ~28% of the bytes a decode step reads. The
cheapest candidate proposer that keeps the top-1 is a 4-bit copy of the head: score every token
approximately, rescore the top K exactly from the fp32 embedding rows (K x 576 reads), and fall back
to the full 8-bit head when the candidates are not certainly the best. This measures, on the
decode benchmark's quality texts (cfm_bench/data/eval_texts.json and the shipped calibration text):
- top-1 agreement of the 4-bit head alone, and whether the true top-1 is among its top K;
- how often the check passes: certified (exact top-1 >= the (K+1)-th approximate score plus a
  Cauchy-Schwarz bound of the 4-bit error, max_j ||dE_j|| * ||h||), or merely confident (plus
  twice the largest 4-bit error observed here);
- the saving that would be left: (8-bit head time - 4-bit head time) minus fallbacks x 8-bit time,
  with both heads timed here as onnxruntime MatMulNBits kernels.

    python benchmarks/bench_sparse_head.py [--threads 2]

Saves benchmarks/results/sparse_head.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_decode import eval_ids  # noqa: E402
from common import RESULTS, environment, save  # noqa: E402

import cfm_runtime  # noqa: E402
from cfm_runtime.kernels.packing import pack, unpack  # noqa: E402
from cfm_runtime.kernels.quant import QuantizedLinear  # noqa: E402


@torch.inference_mode()
def final_hidden(model, ids: dict[str, list[int]]) -> torch.Tensor:
    """The normed last hidden state of every position: [N, D] (what the head multiplies)."""
    t, out = model.transformer, []
    for v in ids.values():
        h = t.forward_span(t.embed(torch.tensor([v])), 0, t.config.n_layers, [t.new_cache()])
        out.append(t.norm(h)[0])
    return torch.cat(out)


def head_us(w: torch.Tensor, bits: int, scheme: str, threads: int, reps: int = 30) -> float:
    """Median microseconds of one batch-1 head product through MatMulNBits."""
    q = QuantizedLinear(pack(w, bits, 32, scheme), None, threads)
    x = torch.randn(1, w.shape[1])
    for _ in range(5):
        q(x)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        q(x)
        times.append(time.perf_counter() - t0)
    return float(np.median(times) * 1e6)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = cfm_runtime.load_model(threads=args.threads, weights="fp32")
    ids = eval_ids(model)
    h = final_hidden(model, ids)
    e = model.transformer.embed_tokens.weight.data
    z = h @ e.T
    top1 = z.argmax(1, keepdim=True)
    hn = h.norm(dim=1)
    t8 = head_us(e, 8, "sym", args.threads)
    result = {"benchmark": "sparse_head", "positions": int(h.shape[0]), "environment": environment(args.threads),
              "head_8bit_us": t8, "schemes": {}}
    for scheme in ("min", "sym"):
        e4 = unpack(pack(e, 4, 32, scheme))
        za = h @ e4.T
        err = (z - za).abs()
        bound = (e - e4).norm(dim=1).max() * hn  # |dE_j . h| <= ||dE_j|| ||h|| for every row j
        max_err = float(err.max())
        t4 = head_us(e, 4, scheme, args.threads)
        s = {"top1_agreement_4bit_alone": float((za.argmax(1, keepdim=True) == top1).float().mean()),
             "max_abs_logit_error": max_err, "mean_cauchy_schwarz_bound": float(bound.mean()),
             "head_4bit_us": t4, "by_k": {}}
        for k in (16, 64, 256):
            top = za.topk(k + 1, dim=1)
            cand = top.indices[:, :k]
            exact_best = z.gather(1, cand).max(1).values
            certified = float((exact_best >= top.values[:, k] + bound).float().mean())
            confident = float((exact_best >= top.values[:, k] + 2 * max_err).float().mean())
            s["by_k"][str(k)] = {
                "top1_in_candidates": float((cand == top1).any(1).float().mean()),
                "certified_rate": certified, "confident_rate": confident,
                "saving_us_if_certified_check": t8 - t4 - (1 - certified) * t8,
                "saving_us_if_confident_check": t8 - t4 - (1 - confident) * t8,
            }
        result["schemes"][f"int4_{scheme}"] = s
    path = save("sparse_head", result, Path(args.out or RESULTS))
    print(f"{h.shape[0]} positions; 8-bit head {t8:.0f} us")
    for name, s in result["schemes"].items():
        print(f"{name}: 4-bit head {s['head_4bit_us']:.0f} us, top-1 alone {s['top1_agreement_4bit_alone']:.3f}, "
              f"max error {s['max_abs_logit_error']:.2f}, bound {s['mean_cauchy_schwarz_bound']:.1f}")
        for k, r in s["by_k"].items():
            print(f"  K={k:>3}: top-1 in candidates {r['top1_in_candidates']:.4f}, certified {r['certified_rate']:.3f}, "
                  f"confident {r['confident_rate']:.3f}, saving {r['saving_us_if_confident_check']:.0f} us "
                  f"(confident check)")
    print(f"saved {path}")
    return result


if __name__ == "__main__":
    main()
