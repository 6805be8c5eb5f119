"""One pass over the labelled set with forward hooks on every `layers[i].mlp`.

The activation of FFN neuron i on a token is silu(gate·x)_i · (up·x)_i, recomputed in the hook from
the MLP's input x with the layer's own gate/up projections, so the model code is untouched and any
drop-in MLP with `gate_proj`, `up_proj` and `act` can be analysed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..errors import CfmError
from .prompts import FUNCTIONS, Instance

CDF_BINS = 1000


@dataclass
class Encoded:
    """Token ids of one instance and where its parts start: [system prefix | user text | answer]."""

    ids: list[int]
    content_start: int  # first token after the chat template's fixed prefix
    response_start: int  # first token of the answer


def template_prefix_len(model) -> int:
    """Tokens the chat template puts before every user message (its default system prompt)."""
    a = model.encode_prompt([{"role": "user", "content": "a"}])
    b = model.encode_prompt([{"role": "user", "content": "zq"}])
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def encode(model, inst: Instance, prefix_len: int, max_len: int = 384) -> Encoded:
    prompt = model.encode_prompt([{"role": "user", "content": inst.prompt}])
    answer = model.tokenizer.encode(inst.response) if inst.response else []
    ids = (prompt + answer)[:max_len]
    return Encoded(ids, min(prefix_len, len(prompt) - 1), min(len(prompt), len(ids) - 1))


@dataclass
class CollectOptions:
    active_fraction: float = 0.3  # a neuron is "active" on a token if it is in that token's top 30% by |act|
    probe_tokens: int = 16  # the classifier sees the mean hidden state of the first user tokens
    max_len: int = 384

    def __post_init__(self):
        if not 0 < self.active_fraction < 1:
            raise CfmError(f"active_fraction must be in (0, 1), got {self.active_fraction}")
        if self.probe_tokens < 1:
            raise CfmError(f"probe_tokens must be >= 1, got {self.probe_tokens}")


@dataclass
class Collection:
    """Per-instance activation statistics; N instances, L layers, F neurons per layer, D model width."""

    labels: np.ndarray  # [N] index into FUNCTIONS
    mean_act: np.ndarray  # [N, L, F] mean |act| over the user text and answer tokens
    active_counts: np.ndarray  # [N, L, F] answer (decode) tokens on which the neuron was active
    answer_tokens: np.ndarray  # [N]
    probe: np.ndarray  # [N, L+1, D] mean hidden state over the first probe_tokens user tokens (0 = embeddings)
    cdf_hist: np.ndarray  # [L, CDF_BINS] counts of per-token normalised |act| (|act| / max over the layer)
    l1_90: np.ndarray  # [L] mean fraction of neurons holding 90% of a token's L1 activation mass
    meta: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        arrays = {k: v for k, v in asdict(self).items() if k != "meta"}
        np.savez_compressed(path, meta=np.array(json.dumps(self.meta)), **arrays)

    @classmethod
    def load(cls, path: Path) -> "Collection":
        with np.load(path) as z:
            d = {k: z[k] for k in z.files}
        return cls(meta=json.loads(str(d.pop("meta"))), **d)


class _Recorder:
    """Forward hooks: per layer |act| [T, F] of the current sequence, and every layer's output."""

    def __init__(self, transformer):
        self.acts: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.handles = []
        for i, layer in enumerate(transformer.layers):
            mlp = layer.mlp
            for name in ("gate_proj", "up_proj", "act"):
                if not hasattr(mlp, name):
                    raise CfmError(f"layers[{i}].mlp has no {name}: the analysis needs a gated FFN module")
            self.handles.append(mlp.register_forward_pre_hook(self._mlp_hook(i)))
            self.handles.append(layer.register_forward_hook(self._layer_hook(i + 1)))
        self.handles.append(transformer.embed_tokens.register_forward_hook(self._layer_hook(0)))

    def _mlp_hook(self, i):
        def hook(mlp, args):
            x = args[0][0]  # [T, D], batch of one
            self.acts[i] = (mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)).abs()
        return hook

    def _layer_hook(self, i):
        def hook(module, args, out):
            self.hidden[i] = out[0]
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run_sequence(transformer, ids: list[int]) -> None:
    """Forward through every layer (no LM head): the hooks record what they need."""
    cache = transformer.new_cache(max_len=len(ids))
    with torch.inference_mode():
        transformer.forward_span(transformer.embed(torch.tensor([ids])), 0, transformer.config.n_layers, [cache])


def _token_stats(a: torch.Tensor, k_active: int):
    """a [T, F] |act| -> normalised histogram [BINS], 90%-L1 fraction (sum over T), top-k mask [T, F]."""
    norm = a / a.amax(-1, keepdim=True).clamp_min(1e-12)
    hist = torch.histc(norm, bins=CDF_BINS, min=0.0, max=1.0)
    s = a.sort(-1, descending=True).values
    cum = s.cumsum(-1) / s.sum(-1, keepdim=True).clamp_min(1e-12)
    l1 = ((cum < 0.9).sum(-1) + 1).float() / a.shape[-1]
    active = torch.zeros_like(a, dtype=torch.bool).scatter_(-1, a.topk(k_active, -1).indices, True)
    return hist, l1.sum(), active


def collect(model, instances: list[Instance], opts: CollectOptions | None = None,
            progress: bool = True) -> Collection:
    """Run every instance once and gather the statistics every analysis needs."""
    from tqdm import tqdm

    opts = opts or CollectOptions()
    c, t = model.config, model.transformer
    n, n_layers, d_ff = len(instances), c.n_layers, c.d_ff
    k_active = max(1, round(opts.active_fraction * d_ff))
    out = Collection(
        labels=np.array([x.label for x in instances], dtype=np.int64),
        mean_act=np.zeros((n, n_layers, d_ff), np.float32),
        active_counts=np.zeros((n, n_layers, d_ff), np.int32),
        answer_tokens=np.zeros(n, np.int64),
        probe=np.zeros((n, n_layers + 1, c.d_model), np.float32),
        cdf_hist=np.zeros((n_layers, CDF_BINS), np.int64),
        l1_90=np.zeros(n_layers, np.float64),
        meta={"functions": list(FUNCTIONS), "options": asdict(opts), "n_layers": n_layers, "d_ff": d_ff},
    )
    prefix = template_prefix_len(model)
    rec = _Recorder(t)
    n_tokens = 0
    try:
        for j, inst in enumerate(tqdm(instances, desc="activations", disable=not progress, unit="text")):
            e = encode(model, inst, prefix, opts.max_len)
            run_sequence(t, e.ids)
            _store(out, j, e, rec, k_active, opts.probe_tokens)
            n_tokens += len(e.ids) - e.content_start
    finally:
        rec.close()
    out.l1_90 /= max(n_tokens, 1)
    out.meta["tokens"] = n_tokens
    return out


def _store(out: Collection, j: int, e: Encoded, rec: _Recorder, k_active: int, probe_tokens: int) -> None:
    cs, rs = e.content_start, e.response_start
    out.answer_tokens[j] = len(e.ids) - rs
    for i, a in rec.acts.items():
        a = a[cs:]  # the fixed system prefix is the same for every instance: leave it out
        out.mean_act[j, i] = a.mean(0).numpy()
        hist, l1, active = _token_stats(a, k_active)
        out.cdf_hist[i] += hist.long().numpy()
        out.l1_90[i] += l1.item()
        out.active_counts[j, i] = active[rs - cs:].sum(0).int().numpy()
    for i, h in rec.hidden.items():
        out.probe[j, i] = h[cs:min(cs + probe_tokens, rs)].mean(0).numpy()
