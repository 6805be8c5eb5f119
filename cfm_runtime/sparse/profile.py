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
from .bundle import STORED, BundleCodec
from .ffn import DenseStore, SparseFFN
from .stats import calibration_texts, coactivation_order, collect, neuron_mass, token_sequences, topk_mask

LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7)
CLUSTER = 32  # neurons per co-activation cluster, the unit of the hot set


def bundle_codec(model, down: str | None = None) -> BundleCodec:
    """The bundle layout for `model`: gate/up in the file's blocks if it stores them all as Q4_1 or all as Q8_0,
    else Q8_0; down columns as the file's own codes where it stores them as Q4_1 (`down` None), else in `down`
    (default Q8_0)."""
    def types(*names):
        return {model.stored_type(f"layers.{i}.mlp.{name}.weight") for i in range(model.config.n_layers)
                for name in names}

    gate_up = types("gate_proj", "up_proj")
    if down is None:
        down = "q4_1_file" if types("down_proj") == {"Q4_1"} else "q8_0"
    kind = gate_up.pop() if len(gate_up) == 1 and gate_up <= set(STORED) else STORED[-1]
    return BundleCodec(model.config.d_model, kind.lower(), down)


def layer_bundles(model, codec: BundleCodec, i: int, order: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Layer i's bundles [F, bytes] in pack `order` and its shared down table (`BundleCodec.encode`)."""
    def blocks(name: str, kind: str) -> np.ndarray:
        return model.stored_blocks(f"layers.{i}.mlp.{name}.weight", (kind,))[1]

    gate, up = blocks("gate_proj", codec.gate_up.upper()), blocks("up_proj", codec.gate_up.upper())
    down = blocks("down_proj", "Q4_1") if codec.shared else model.transformer.layers[i].mlp.down_proj.weight.numpy()
    return codec.encode(gate, up, down, order)


def build_pack(model, root: Path, *, source_digest: str, calib_files=None, chat_answers: int = 4,
               max_tokens: int | None = None, rank: int = pred.DEFAULT_RANK, sens_tokens: int = 128,
               levels=LEVELS, progress: bool = True, down: str | None = None) -> Path:
    """Profile `model` (dense, fp32 in RAM) and write its pack to `root` (replaced if present); `down`: the kind of
    the down columns (`bundle.KINDS`; default the file's own codes where it can)."""
    t0 = time.time()
    root = Path(root)
    tmp = root.with_name(root.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        seqs = token_sequences(model, calibration_texts(calib_files), chat_answers)
        if max_tokens:
            seqs = truncate_total(seqs, max_tokens)
        acts = collect(model, seqs)
        n_layers = len(model.transformer.layers)
        split = int(acts.n_tokens * 0.85)  # the rest is held out for predictor recall
        tables, layers, nets = {}, [], []
        act = model.config.activation
        bar = tqdm(range(n_layers), desc="profiling layers", unit="layer", disable=not progress)
        for i in bar:
            x, a, mlp = acts.inputs[i], acts.acts[i], model.transformer.layers[i].mlp
            order, cmass = coactivation_order(a[:split], CLUSTER)
            low = pred.train(x[:split], mlp, rank=rank, activation=act)
            q4 = pred.QuantPredictor.fit(mlp, act)
            nets.append(q4)
            tables.update(layer_tables(i, order, cmass, a[:split], low, q4))
            layers.append({"n": int(a.shape[1]),
                           "recall": {f"{d:g}": pred.recall(q4, x[split:], a[split:], d) for d in levels},
                           "recall_lowrank": {f"{d:g}": pred.recall(low, x[split:], a[split:], d) for d in levels}})
        orders = [tables[f"layers.{i}.order"].numpy() for i in range(n_layers)]
        codec = bundle_codec(model, down)

        def each_layer():
            for i in range(n_layers):
                bundles, shared = layer_bundles(model, codec, i, orders[i])
                if shared is not None:
                    tables[packfmt.shared_key(i)] = torch.from_numpy(shared)
                yield bundles

        entries = packfmt.write_layers(tmp / packfmt.NEURONS, each_layer())
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tables.items()}, str(tmp / packfmt.TABLES))
        sens = sensitivity(model, tail_sequences(seqs, acts.n_tokens - split, sens_tokens), nets, levels)
        for entry, layer in zip(entries, layers):
            layer.update(entry)
        manifest = {
            "format": packfmt.FORMAT, "version": packfmt.VERSION,
            "fingerprint": model.fingerprint(), "source_digest": source_digest,
            "model": {"name": model.config.name, "n_layers": n_layers, "d_model": model.config.d_model,
                      "d_ff": model.config.d_ff, "activation": model.config.activation},
            "bundle": codec.manifest(), "cluster": CLUSTER,
            "align": packfmt.ALIGN,
            "predictors": {"int4": pred.cost(nets[0], model.config.d_model, model.config.d_ff),
                           "lowrank": pred.cost(low, model.config.d_model, model.config.d_ff)},
            "calibration": {"tokens": acts.n_tokens, "held_out_tokens": acts.n_tokens - split,
                            "files": [str(f) for f in calib_files] if calib_files else "cfm_runtime/data/calib"},
            "density": {"levels": list(levels), "loss_increase": sens.tolist(), "measure": "mean KL from dense, nats"},
            "layers": layers, "files": {}, "build_seconds": round(time.time() - t0, 1),
        }
        packfmt.write_manifest(tmp, manifest)
    except BaseException:  # an interrupted or failed build (Ctrl-C, SIGTERM, an error) leaves nothing behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
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


def layer_tables(i: int, order, cmass, a: torch.Tensor, low, q4) -> dict[str, torch.Tensor]:
    p = f"layers.{i}."
    t = {p + "order": torch.from_numpy(order), p + "cluster_mass": torch.from_numpy(cmass.astype(np.float32)),
         p + "mass": torch.from_numpy(neuron_mass(a).astype(np.float32)),
         p + "frequency": topk_mask(a, 0.5).float().mean(0)}
    t.update({packfmt.predictor_prefix(i, "lowrank") + k: v.detach().clone() for k, v in low.state_dict().items()})
    t.update({packfmt.predictor_prefix(i, "int4") + k: v.clone() for k, v in q4.state().items()})
    return t


@torch.inference_mode()
def sensitivity(model, sequences: list[list[int]], nets, levels) -> np.ndarray:
    """End-to-end loss increase [L, len(levels)] of each layer alone at each density, predictor selection.

    Mean KL(dense || sparse) of the next-token distributions over the given (held-out calibration)
    tokens, with only layer i sparse (per-token top-k of its predictor's scores). The dense hidden
    states entering every block are kept, so layer i's runs start at block i.
    """
    t = model.transformer
    n_layers, n = len(t.layers), model.config.d_ff
    out = np.zeros((n_layers, len(levels)))
    n_tok = sum(len(s) for s in sequences)
    for ids in sequences:
        h = t.embed(torch.tensor([ids]))
        cache = t.new_cache(max_len=len(ids))
        hidden = []
        for i in range(n_layers):
            hidden.append(h)
            h = t.forward_span(h, i, i + 1, [cache])
        ref = torch.log_softmax(t.head(h)[0].float(), -1)
        for i, layer in enumerate(t.layers):
            dense = layer.mlp
            layer.mlp = ram_module(i, dense, np.arange(n), nets[i])
            layer.mlp.strategy, layer.mlp.measure = "predictor", True
            try:
                for j, d in enumerate(levels):
                    layer.mlp.density = d
                    cache = t.new_cache(i, max_len=len(ids))
                    logp = torch.log_softmax(t.head(t.forward_span(hidden[i], i, n_layers, [cache]))[0].float(), -1)
                    kl = (ref.exp() * (ref - logp)).sum(-1).sum().item()
                    out[i, j] += kl / n_tok
            finally:
                layer.mlp = dense
    return out


def tail_sequences(seqs: list[list[int]], n_tokens: int, max_tokens: int) -> list[list[int]]:
    """The last n_tokens of the concatenated sequences, as sequences, cut to max_tokens in all."""
    out, skip = [], sum(len(s) for s in seqs) - n_tokens
    for s in seqs:
        part = s[max(0, skip):]
        skip -= len(s)
        if part:
            out.append(part)
    return truncate_total(out, max_tokens)


def ram_module(i: int, mlp, order: np.ndarray, predictor) -> SparseFFN:
    """A SparseFFN over a dense MLP's weights (fp32, in RAM, pack order)."""
    rows = torch.stack((mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight.T))  # [3, F, D]
    return SparseFFN(i, DenseStore(rows[:, torch.from_numpy(order)].contiguous()), mlp.act, len(order),
                     predictor=predictor)


@torch.no_grad()
def predictor_from(pack: packfmt.NeuronPack, i: int, order: np.ndarray, activation: str, kind: str = "int4",
                   rank: int | None = None, bundles: np.ndarray | None = None):
    """Layer i's predictor of the given kind ("int4" or "lowrank", cut to `rank`), its outputs in `order` (output p
    scores neuron order[p]: the pack's order, or np.arange for the model's). `bundles`: layer i's bundles if the
    caller has them read already (the native int4 predictor is made of their gate/up rows)."""
    if kind == "int4" and native_int4(pack):  # the pack's own gate/up rows
        rows = pack.bundles(i) if bundles is None else bundles  # in the pack's order
        rows = rows[np.argsort(pack.order(i))[order]]  # in `order`
        part = pack.codec.part_bytes("q4_1")
        return pred.NativePredictor(rows[:, :part], rows[:, part:2 * part], activation, torch.get_num_threads())
    state = pack.predictor_state(i, kind)
    idx = torch.from_numpy(order)
    if kind == "int4":
        d_model = state["mins"].shape[0] * 32
        return pred.QuantPredictor.from_state(state, d_model, activation, idx)
    if rank is not None:  # SVD directions are nested: the first `rank` are the best rank-`rank` predictor
        state = {"proj.weight": state["proj.weight"][:rank], "gate.weight": state["gate.weight"][:, :rank],
                 "up.weight": state["up.weight"][:, :rank]}
    (rank, d_model), d_ff = state["proj.weight"].shape, state["up.weight"].shape[0]
    net = pred.LowRankPredictor(d_model, d_ff, rank, activation)
    net.load_state_dict(state)
    return net.permuted(idx)


def native_int4(pack: packfmt.NeuronPack) -> bool:
    """Whether the int4 predictor runs in the native kernel over the pack's own Q4_1 gate/up rows (else it is the
    stored 4-bit copy in onnxruntime)."""
    from ..kernels import native

    return pack.codec.gate_up == "q4_1" and native.load() is not None


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
    return json.dumps({k: manifest[k] for k in ("fingerprint", "bundle", "cluster", "calibration", "build_seconds")})
