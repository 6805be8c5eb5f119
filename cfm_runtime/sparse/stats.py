"""Profiling: FFN inputs and neuron activations on calibration text, statistics, co-activation clusters.

A neuron's activation is |act(gate·x) * (up·x)|: the magnitude of its contribution weight before the
down projection (FACTS.md: weighting by the down column norm adds nothing on this model).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from ..errors import CfmError

CHAT_PROMPTS = [
    "Explain in two sentences why the sky is blue.",
    "Write a haiku about autumn rain.",
    "What are three tips for learning a new language?",
    "Write a Python function that reverses a string.",
    "How many minutes are there in a week? Show the calculation.",
    "Donne-moi une recette simple de crêpes.",
]


@dataclass
class Activations:
    """Per layer: FFN inputs x [N, D] and activations a [N, F] (fp16, N calibration tokens)."""

    inputs: list[torch.Tensor]
    acts: list[torch.Tensor]

    @property
    def n_tokens(self) -> int:
        return self.inputs[0].shape[0]


def calibration_texts(files=None) -> list[str]:
    """The shipped calibration set (prose, code, math, chat, other languages, how-tos) or the given files."""
    if files:
        paths = [Path(f) for f in files]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise CfmError(f"calibration files not found: {', '.join(missing)}")
        return [p.read_text() for p in paths]
    root = resources.files("cfm_runtime") / "data" / "calib"
    return [f.read_text() for f in sorted(root.iterdir(), key=lambda f: f.name) if f.name.endswith(".txt")]


def chat_samples(model, n: int, max_tokens: int = 48) -> list[list[int]]:
    """The model's own greedy answers to chat prompts, as full token sequences (prompt + answer)."""
    out = []
    for prompt in CHAT_PROMPTS[:n]:
        messages = [{"role": "user", "content": prompt}]
        answer = "".join(model.generate(messages, max_tokens=max_tokens, temperature=0))
        out.append(model.encode_prompt(messages) + model.tokenizer.encode(answer))
    return out


def neuron_activation(mlp, x: torch.Tensor) -> torch.Tensor:
    """|act(gate x) * up x| for a dense MLP: [..., D] -> [..., F]."""
    return (mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)).abs()


@torch.inference_mode()
def collect(model, sequences: list[list[int]], max_len: int = 512) -> Activations:
    """Run token sequences through the dense model, recording every FFN's input and activations."""
    layers = model.transformer.layers
    inputs = [[] for _ in layers]
    acts = [[] for _ in layers]

    def hook(i):
        def record(mlp, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            inputs[i].append(x.half())
            acts[i].append(neuron_activation(mlp, x).half())
        return record

    handles = [layer.mlp.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)]
    try:
        for ids in sequences:
            for s in range(0, len(ids), max_len):
                model.logits(ids[s:s + max_len])
    finally:
        for h in handles:
            h.remove()
    return Activations([torch.cat(x) for x in inputs], [torch.cat(a) for a in acts])


def token_sequences(model, texts: list[str], chat_answers: int = 0) -> list[list[int]]:
    seqs = [model.tokenizer.encode(t) for t in texts if t.strip()]
    if chat_answers:
        seqs += chat_samples(model, chat_answers)
    if not seqs:
        raise CfmError("the calibration set is empty")
    return seqs


def topk_mask(a: torch.Tensor, density: float) -> torch.Tensor:
    """Boolean [N, F]: each row's top ceil(density*F) entries."""
    k = max(1, int(round(density * a.shape[-1])))
    idx = a.float().topk(k, dim=-1).indices
    return torch.zeros(a.shape, dtype=torch.bool).scatter_(-1, idx, True)


def neuron_mass(a: torch.Tensor) -> np.ndarray:
    """Mean share of each neuron in its token's L1 activation mass [F]; sums to 1 per layer."""
    a = a.float()
    return (a / a.sum(-1, keepdim=True).clamp_min(1e-12)).mean(0).numpy()


def coactivation_order(a: torch.Tensor, cluster: int, density: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Order neurons into clusters of `cluster` that fire together; clusters by falling mass.

    Greedy: the heaviest unplaced neuron seeds a cluster, which takes the unplaced neurons most
    often active with the cluster so far (counts of co-membership in per-token top-k sets).
    Returns (order [F]: pack position -> neuron id, cluster mass [F / cluster]).
    """
    m = topk_mask(a, density).float()  # [N, F]
    co = (m.T @ m).numpy()  # [F, F] co-activation counts
    mass = neuron_mass(a)
    f = a.shape[1]
    free = np.ones(f, dtype=bool)
    clusters = []
    while free.any():
        seed = int(np.argmax(np.where(free, mass, -1.0)))
        members, free[seed] = [seed], False
        score = co[seed].astype(np.float64)
        while len(members) < cluster and free.any():
            j = int(np.argmax(np.where(free, score / max(1, len(members)) + 1e-3 * mass, -np.inf)))
            members.append(j)
            free[j] = False
            score += co[j]
        clusters.append(members)
    cmass = np.array([mass[c].sum() for c in clusters])
    ranked = np.argsort(-cmass, kind="stable")
    order = np.concatenate([clusters[r] for r in ranked]).astype(np.int64)
    return order, cmass[ranked]
