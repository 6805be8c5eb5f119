"""What the neuron pack's quantized bundles cost in quality: three ways to store a neuron's down column.

A pack bundle holds a neuron's gate and up rows as the file's own Q4_1 blocks (exact). Its down column runs across
the file's blocks (they run along the FFN axis). Dense fp32 models on the held-out texts
(`cfm_bench/data/eval_texts.json`), against the GGUF's own weights:

- `down_q4_1_file`: the column's own 4-bit codes, the file's scales and minimums in a per-layer table (the pack's
  default for a Q4_1 file: 1,008 bytes a neuron on the embedded model; must be exact);
- `down_q8_0`: the column re-blocked along the hidden axis as Q8_0 (1,332 bytes);
- `down_q4_1`: re-blocked as Q4_1 (1,080 bytes).

For each: perplexity, its change against `file`, top-1 agreement with `file` and the mean KL(file || model) per
token, and the largest relative error of the down weights. A pack layer's weights here are `BundleCodec.weights`
of the bundles `BundleCodec.encode` makes, the same functions a pack build and the runtime use.

    python benchmarks/bench_pack_quant.py [--out pack_quant]

Writes benchmarks/results/pack_quant.json with the load average before and after.
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


def texts(model) -> dict[str, list[int]]:
    data = json.loads((ROOT / "cfm_bench" / "data" / "eval_texts.json").read_text())
    out = {name: model.tokenizer.encode(text) for name, text in data["texts"].items()}
    out["chat"] = model.encode_prompt(data["chat"])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pack_quant")
    args = ap.parse_args()

    import numpy as np
    import torch

    from cfm_runtime import load_model
    from cfm_runtime.sparse.bundle import BundleCodec
    from cfm_runtime.sparse.profile import STORED

    loadavg_before = os.getloadavg()
    model = load_model(weights="fp32")
    ids = texts(model)
    layers = model.transformer.layers
    file_weights = [tuple(getattr(layer.mlp, n).weight.detach().clone() for n in ("gate_proj", "up_proj", "down_proj"))
                    for layer in layers]

    @torch.inference_mode()
    def logits() -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(model.logits(v)).float() for k, v in ids.items()}

    def set_weights(weights) -> None:
        for layer, (g, u, d) in zip(layers, weights):
            layer.mlp.gate_proj.weight.data, layer.mlp.up_proj.weight.data = g, u
            layer.mlp.down_proj.weight.data = d

    reference = logits()
    results, n = {}, model.config.d_ff
    for down in ("q4_1_file", "q8_0", "q4_1"):
        kinds = set()
        weights, err = [], 0.0
        for i, (g, u, d) in enumerate(file_weights):
            (kind, gate), (_, up) = (model.stored_blocks(f"layers.{i}.mlp.{name}.weight", STORED)
                                     for name in ("gate_proj", "up_proj"))
            kinds.add(kind)
            codec = BundleCodec(model.config.d_model, kind.lower(), down)
            source = (model.stored_blocks(f"layers.{i}.mlp.down_proj.weight", ("Q4_1",))[1] if codec.shared
                      else d.numpy())
            bundles, shared = codec.encode(gate, up, source, np.arange(n))
            gw, uw, dw = codec.weights(bundles, np.arange(n), shared)
            assert np.array_equal(gw, g.numpy()) and np.array_equal(uw, u.numpy())  # the file's own gate/up
            err = max(err, float(np.abs(dw - d.numpy()).max() / np.abs(d.numpy()).max()))
            weights.append((torch.from_numpy(gw), torch.from_numpy(uw), torch.from_numpy(dw)))
        set_weights(weights)
        got = logits()
        nll_ref = nll = kl = agree = count = 0.0
        for k, v in ids.items():
            target = torch.tensor(v[1:])
            ref, out = torch.log_softmax(reference[k][:-1], -1), torch.log_softmax(got[k][:-1], -1)
            nll_ref += -ref.gather(1, target[:, None]).sum().item()
            nll += -out.gather(1, target[:, None]).sum().item()
            kl += (ref.exp() * (ref - out)).sum().item()
            agree += (ref.argmax(-1) == out.argmax(-1)).sum().item()
            count += len(target)
        ppl_ref, ppl = math.exp(nll_ref / count), math.exp(nll / count)
        codec = BundleCodec(model.config.d_model, kinds.pop().lower(), down)
        results[f"down_{down}"] = {
            "bundle_bytes": codec.nbytes, "fp16_bundle_bytes": 3 * model.config.d_model * 2,
            "perplexity": round(ppl, 4), "perplexity_file": round(ppl_ref, 4),
            "perplexity_change_pct": round(100 * (ppl / ppl_ref - 1), 3),
            "top1_agreement": round(agree / count, 4), "mean_kl_nats": round(kl / count, 6),
            "down_max_rel_error": round(err, 5), "tokens": int(count)}
        print(down, results[f"down_{down}"], flush=True)
        set_weights(file_weights)
    print(save(args.out, {"what": __doc__.splitlines()[0], "env": environment(torch.get_num_threads()),
                          "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(), "results": results}))


if __name__ == "__main__":
    main()
