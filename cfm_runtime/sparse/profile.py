"""`build_pack(model, root)`: profile a dense model on calibration text and write its neuron pack."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from . import pack as packfmt
from . import predictor as pred
from .ffn import RamStore, SparseFFN
from .engine import SparseEngine
from .stats import calibration_texts, coactivation_order, collect, neuron_mass, token_sequences, topk_mask

LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.85)
CLUSTER = 32  # 32 fp16 bundles of D=576 are 27 pages: clusters stay 4 KiB aligned


def build_pack(model, root: Path, *, source_digest: str, calib_files=None, chat_answers: int = 4,
               max_tokens: int | None = None, rank: int = 64, sens_tokens: int = 384,
               levels=LEVELS, progress: bool = True) -> Path:
    """Profile `model` (dense, fp32 in RAM) and write its pack to `root` (replaced if present)."""
    t0 = time.time()
    root = Path(root)
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    seqs = token_sequences(model, calibration_texts(calib_files), chat_answers)
    if max_tokens:
        seqs = truncate_total(seqs, max_tokens)
    acts = collect(model, seqs)
    n_layers = len(model.transformer.layers)
    split = int(acts.n_tokens * 0.85)  # the rest is held out for predictor recall
    tables, layers, nets = {}, [], []
    bar = tqdm(range(n_layers), desc="profiling layers", unit="layer", disable=not progress)
    for i in bar:
        x, a = acts.inputs[i], acts.acts[i]
        order, cmass = coactivation_order(a[:split], CLUSTER)
        net = pred.train(x[:split], a[:split], rank=rank)
        nets.append(net)
        tables.update(layer_tables(i, order, cmass, a[:split], net))
        layers.append({"n": int(a.shape[1]), "recall": {f"{d:g}": pred.recall(net, x[split:], a[split:], d)
                                                          for d in levels}})
    orders = [tables[f"layers.{i}.order"].numpy() for i in range(n_layers)]
    entries = packfmt.write_layers(tmp / packfmt.NEURONS,
                                   (packfmt.bundles(model.transformer.layers[i].mlp, orders[i])
                                    for i in range(n_layers)))
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp / packfmt.TABLES))
    sens = sensitivity(model, [x[split:][:sens_tokens] for x in acts.inputs], nets, levels)
    for entry, layer in zip(entries, layers):
        layer.update(entry)
    manifest = {
        "format": packfmt.FORMAT, "version": packfmt.VERSION,
        "fingerprint": model.fingerprint(), "source_digest": source_digest,
        "model": {"name": model.config.name, "n_layers": n_layers, "d_model": model.config.d_model,
                  "d_ff": model.config.d_ff, "activation": model.config.activation},
        "dtype": "fp16", "bundle_bytes": packfmt.bundle_bytes(model.config.d_model), "cluster": CLUSTER,
        "align": packfmt.ALIGN, "predictor_rank": rank,
        "calibration": {"tokens": acts.n_tokens, "held_out_tokens": acts.n_tokens - split,
                        "files": [str(f) for f in calib_files] if calib_files else "cfm_runtime/data/calib"},
        "density": {"levels": list(levels), "output_error": sens.tolist()},
        "layers": layers, "files": {}, "build_seconds": round(time.time() - t0, 1),
    }
    packfmt.write_manifest(tmp, manifest)
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def truncate_total(seqs: list[list[int]], n: int) -> list[list[int]]:
    out, left = [], n
    for s in seqs:
        if left <= 0:
            break
        out.append(s[:left])
        left -= len(out[-1])
    return out


def layer_tables(i: int, order, cmass, a: torch.Tensor, net) -> dict[str, torch.Tensor]:
    p = f"layers.{i}."
    t = {p + "order": torch.from_numpy(order), p + "cluster_mass": torch.from_numpy(cmass.astype(np.float32)),
         p + "mass": torch.from_numpy(neuron_mass(a).astype(np.float32)),
         p + "frequency": topk_mask(a, 0.5).float().mean(0)}
    t.update({p + "predictor." + k: v.detach().clone() for k, v in net.state_dict().items()})
    return t


@torch.inference_mode()
def sensitivity(model, x_by_layer, net_by_layer, levels) -> np.ndarray:
    """Relative FFN output error [L, len(levels)] of each layer at each density, predictor selection.

    ||y_sparse - y||^2 / ||y||^2 averaged over held-out calibration tokens: a per-layer proxy for the
    loss increase (end-to-end loss per layer and level costs L x levels full forwards).
    """
    out = np.zeros((len(x_by_layer), len(levels)))
    for i, (x, net) in enumerate(zip(x_by_layer, net_by_layer)):
        mlp, x = model.transformer.layers[i].mlp, x.float()
        h = mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)  # [N, F]
        y = mlp.down_proj(h)
        scores = net(x)
        for j, d in enumerate(levels):
            keep = topk_mask(scores, d).float()
            err = (mlp.down_proj(h * keep) - y).pow(2).sum(-1) / y.pow(2).sum(-1).clamp_min(1e-12)
            out[i, j] = err.mean().item()
    return out


def ram_module(i: int, mlp, order: np.ndarray, predictor) -> SparseFFN:
    """A SparseFFN over a dense MLP's weights (fp32, in RAM, pack order)."""
    rows = torch.stack((mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T))  # [3, F, D]
    return SparseFFN(i, RamStore(rows[:, torch.from_numpy(order)].contiguous()), mlp.act, len(order),
                     predictor=predictor)


def predictor_from(tables, i: int, order: np.ndarray, rank: int) -> pred.LowRankPredictor:
    """Layer i's predictor with outputs permuted into pack order."""
    p = f"layers.{i}.predictor."
    state = {k[len(p):]: v for k, v in tables.items() if k.startswith(p)}
    d_model, d_ff = state["down.weight"].shape[1], state["up.weight"].shape[0]
    net = pred.LowRankPredictor(d_model, d_ff, state["down.weight"].shape[0])
    idx = torch.from_numpy(order)
    state["up.weight"], state["up.bias"] = state["up.weight"][idx], state["up.bias"][idx]
    net.load_state_dict(state)
    return net.requires_grad_(False).eval()


def mean_loss(model, seqs: list[list[int]]) -> float:
    total, n = 0.0, 0
    for ids in seqs:
        if len(ids) < 2:
            continue
        logits = torch.from_numpy(model.logits(ids))
        total += torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item()
        n += len(ids) - 1
    return total / max(n, 1)


def perplexity(model, seqs) -> float:
    return math.exp(mean_loss(model, seqs))


def summary(manifest: dict) -> str:
    return json.dumps({k: manifest[k] for k in ("fingerprint", "dtype", "cluster", "calibration", "build_seconds")})
