"""Train a LoRA brick on the device, on the user's own text; nothing leaves the machine.

Only the top layers [start, n_layers) get LoRA pairs and gradients. Everything below is frozen
and run forward only, once per example, by `frozen(ids) -> h [1, T, D]` at layer `start`: the
local lower layers by default, or any other producer of those hidden states (e.g. an edge/center
split whose center span runs forward only). Those hidden states are computed once and reused
every epoch, so the frozen part costs one forward pass per example in total.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CfmError
from .formats import from_model_layout
from .config import TrainConfig  # noqa: F401 (callers import it from here too)
from .lora import LoraPair, attach, attached, detach

FrozenFn = Callable[[list[int]], torch.Tensor]


# General chats the brick should not change: a KL term keeps the model's own predictions on them.
ANCHOR_CHATS = [
    [{"role": "user", "content": "How many legs does a spider have?"},
     {"role": "assistant", "content": "A spider has eight legs, unlike insects, which have six."}],
    [{"role": "user", "content": "Write a Python function that adds two numbers."},
     {"role": "assistant", "content": "def add(a, b):\n    return a + b"}],
    [{"role": "user", "content": "Why is the sky blue?"},
     {"role": "assistant", "content": "Sunlight is scattered by the air, and blue light is scattered most."}],
    [{"role": "user", "content": "Give me a synonym for happy."},
     {"role": "assistant", "content": "Joyful, cheerful or content."}],
    [{"role": "user", "content": "Who wrote Romeo and Juliet?"},
     {"role": "assistant", "content": "William Shakespeare wrote Romeo and Juliet."}],
]
ANCHOR_TEXTS = [
    "The Industrial Revolution began in Britain in the late eighteenth century, when new machines and steam "
    "power changed how goods were made and how people lived and worked.",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes the air pressure is lower, so water "
    "boils at a lower temperature.",
]


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[t]: predict ids[t] (loss on it)


# ------------------------------------------------------------------ data


def _chat_example(tokenizer, messages: list[dict], seq_len: int) -> Example:
    """Loss on assistant turns only: each turn's tokens are found by rendering growing prefixes."""
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=False))
    mask = [False] * len(ids)
    for k, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        start = len(tokenizer.encode(tokenizer.apply_chat_template(messages[:k], add_generation_prompt=True)))
        end = len(tokenizer.encode(tokenizer.apply_chat_template(messages[:k + 1], add_generation_prompt=False)))
        mask[start:end] = [True] * (min(end, len(ids)) - start)
    return Example(ids[:seq_len], mask[:seq_len])


def _text_examples(tokenizer, text: str, seq_len: int) -> list[Example]:
    out = []
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        ids = tokenizer.encode(para)
        for s in range(0, len(ids), seq_len):
            part = ids[max(0, s - 1):s + seq_len] if s else ids[:seq_len]
            if len(part) > 1:
                out.append(Example(part, [False] + [True] * (len(part) - 1)))
    return out


def load_examples(path: str | os.PathLike, tokenizer, seq_len: int = 256) -> list[Example]:
    """Plain text (paragraphs split at blank lines) or JSONL: one chat per line as {"messages": [...]}
    or a bare list of messages (loss on assistant turns), or {"text": ...}."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CfmError(f"cannot read training data {path}: {e}") from e
    if path.suffix in (".jsonl", ".json"):
        examples = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                examples.extend(_jsonl_line(tokenizer, line, f"{path}:{n}", seq_len))
    else:
        examples = _text_examples(tokenizer, raw, seq_len)
    examples = [e for e in examples if any(e.mask[1:])]
    if not examples:
        raise CfmError(f"{path} holds no training text (plain text, or JSONL chats with assistant turns)")
    return examples


def _jsonl_line(tokenizer, line: str, where: str, seq_len: int) -> list[Example]:
    from ..tokenizer import check_messages

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise CfmError(f"{where}: not valid JSON ({e})") from e
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return _text_examples(tokenizer, obj["text"], seq_len)
    messages = obj.get("messages") if isinstance(obj, dict) else obj
    try:
        check_messages(messages)
    except CfmError as e:
        raise CfmError(f"{where}: {e}") from e
    if not any(m.get("role") == "assistant" for m in messages):
        raise CfmError(f"{where}: a chat needs at least one assistant message to learn from")
    return [_chat_example(tokenizer, messages, seq_len)]


def data_digest(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps([e.ids, e.mask]).encode())
    return h.hexdigest()


# ------------------------------------------------------------------ training


def local_frozen(transformer, start: int) -> FrozenFn:
    """Hidden states at layer `start` from this machine's lower layers (forward only)."""

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            h = transformer.embed(torch.tensor([ids]))
            return transformer.forward_span(h, 0, start, [transformer.new_cache(0, start, len(ids))])

    return run


def new_pairs(transformer, cfg: TrainConfig, start: int, gen: torch.Generator) -> dict[str, LoraPair]:
    """A random (Kaiming-uniform, as PEFT) and B zero, so training starts from the base model."""
    pairs = {}
    for i in range(start, transformer.config.n_layers):
        for kind in cfg.targets:
            lin = transformer.get_submodule(f"layers.{i}.{kind}")
            bound = 1 / math.sqrt(lin.in_features)
            a = (torch.rand(cfg.rank, lin.in_features, generator=gen) * 2 - 1) * bound
            b = torch.zeros(lin.out_features, cfg.rank)
            scale = cfg.alpha / (math.sqrt(cfg.rank) if cfg.rslora else cfg.rank)
            pairs[f"layers.{i}.{kind}"] = LoraPair(nn.Parameter(a), nn.Parameter(b), scale)
    return pairs


def example_loss(transformer, h: torch.Tensor, ex: Example, start: int) -> torch.Tensor:
    """Mean next-token loss over the masked positions, gradients through layers [start, n)."""
    n = transformer.config.n_layers
    h = transformer.forward_span(h, start, n, [transformer.new_cache(start, n, h.shape[1])])
    logits = transformer.head(h)[0, :-1]  # [T-1, vocab]
    target = torch.tensor(ex.ids[1:])
    mask = torch.tensor(ex.mask[1:])
    return F.cross_entropy(logits[mask], target[mask])


def _calib_paragraphs() -> list[str]:
    from importlib import resources

    out = []
    for f in sorted(resources.files("cfm_runtime").joinpath("data", "calib").iterdir(), key=lambda f: f.name):
        if f.name.endswith(".txt"):
            out.extend(p.strip() for p in f.read_text(encoding="utf-8").split("\n\n") if p.strip())
    return out


def _stored_chats() -> list[list[dict]]:
    """The shipped labelled prompts (7 kinds of task) with the embedded model's own greedy answers."""
    from importlib import resources

    base = resources.files("cfm_runtime").joinpath("data", "functions")
    try:
        prompts = json.loads(base.joinpath("prompts.json").read_text())["functions"]
        answers = json.loads(base.joinpath("responses.json").read_text())["responses"]
    except (OSError, KeyError, json.JSONDecodeError):
        return []
    chats = []
    for kind, qs in prompts.items():
        for q, a in zip(qs, answers.get(kind, [])):
            chats.append([{"role": "user", "content": q}, {"role": "assistant", "content": a}])
    return chats


def anchor_examples(tokenizer, n: int, seed: int = 0, seq_len: int = 256, on: str = "answers") -> list[Example]:
    """`n` general sequences for the KL anchor; mask: the positions whose predictions are kept.

    Drawn from ANCHOR_CHATS/ANCHOR_TEXTS, the shipped task prompts with the base model's own answers
    (data/functions) and the calibration text (data/calib), in a seeded order that mixes the sources.
    With on="answers" a chat is anchored on its assistant tokens (where answers are decided), a plain
    text on all of them; with "all", every position.
    """
    items = [("chat", c) for c in ANCHOR_CHATS + _stored_chats()]
    items += [("text", t) for t in ANCHOR_TEXTS + _calib_paragraphs()]
    random.Random(seed).shuffle(items)
    out = []
    for kind, item in items[:n]:
        if kind == "chat":
            ex = _chat_example(tokenizer, item, seq_len)
        else:
            ids = tokenizer.encode(item)[:seq_len]
            ex = Example(ids, [True] * len(ids))
        if on == "all":
            ex = Example(ex.ids, [True] * len(ex.ids))
        out.append(ex)
    return out


def _anchors(model, frozen: FrozenFn, start: int, cfg: TrainConfig) -> list[tuple]:
    """(hidden states at `start`, the base model's last hidden states [T, D], positions) per anchor.

    The base model's distribution is kept as its final hidden states (the LM head is re-applied
    when needed): a few KB per token instead of a vocabulary-sized row."""
    tr, out = model.transformer, []
    n = tr.config.n_layers
    for ex in anchor_examples(model.tokenizer, cfg.anchors, cfg.seed, cfg.seq_len, cfg.anchor_on):
        h = frozen(ex.ids)
        pos = torch.tensor(ex.mask[1:] + [False])  # logits at t predict token t + 1
        with torch.no_grad():
            base_h = tr.forward_span(h, start, n, [tr.new_cache(start, n, h.shape[1])])[:, pos]
        out.append((h, base_h, pos))
    return out


def anchor_kl(tr, h: torch.Tensor, base_h: torch.Tensor, pos: torch.Tensor, start: int) -> torch.Tensor:
    """KL(base || current) at the anchored positions, averaged: how far the brick moved general predictions."""
    with torch.no_grad():
        base_logp = F.log_softmax(tr.head(base_h)[0], -1)
    n = tr.config.n_layers
    top = tr.forward_span(h, start, n, [tr.new_cache(start, n, h.shape[1])])
    logp = F.log_softmax(tr.head(top[:, pos])[0], -1)  # the LM head only where it is needed
    return F.kl_div(logp, base_logp, log_target=True, reduction="batchmean")


@dataclass
class TrainResult:
    pairs: dict[str, LoraPair]  # HF layout, plain tensors
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0
    start_layer: int = 0


def _order(n: int, seed: int, step: int) -> int:
    epoch, k = divmod(step, n)
    perm = list(range(n))
    random.Random(seed * 100003 + epoch).shuffle(perm)
    return perm[k]


def _save_checkpoint(path: Path, step, pairs, opt, cfg, digest, losses) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"step": step, "a": {k: p.a.detach() for k, p in pairs.items()},
             "b": {k: p.b.detach() for k, p in pairs.items()}, "optimizer": opt.state_dict(),
             "config": asdict(cfg), "data": digest, "losses": losses}
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_checkpoint(path: Path, pairs, opt, cfg, digest) -> tuple[int, list[float]]:
    try:
        state = torch.load(path, weights_only=True)
    except (OSError, RuntimeError, EOFError) as e:
        raise CfmError(f"checkpoint {path} is unreadable ({e}); delete it to start over") from e
    mine = asdict(cfg) | {"steps": None, "checkpoint_every": None}
    theirs = state["config"] | {"steps": None, "checkpoint_every": None}
    theirs["targets"] = tuple(theirs["targets"])
    if theirs != mine or state["data"] != digest:
        raise CfmError(f"checkpoint {path} was made with other data or options; delete it to start over, "
                       "or resume with the same data and options")
    with torch.no_grad():
        for k, p in pairs.items():
            p.a.copy_(state["a"][k])
            p.b.copy_(state["b"][k])
    opt.load_state_dict(state["optimizer"])
    return state["step"], list(state["losses"])


def train_lora(model, examples: list[Example], cfg: TrainConfig, frozen: FrozenFn | None = None,
               checkpoint: Path | None = None, resume: bool = False, progress: bool = True,
               log: Callable[[str], None] | None = None, stop_after: int | None = None) -> TrainResult:
    """Train LoRA pairs on the top `cfg.top_layers` layers; returns them in HF layout.

    `frozen(ids)` gives the hidden states entering the first trained layer; default: local layers.
    With `checkpoint`, state is saved every `cfg.checkpoint_every` steps and at the end; `resume`
    continues from it (same data and options required) and gives the same result as an uninterrupted run.
    `stop_after` ends this run after that many steps (checkpoint saved), e.g. to train in slices.
    """
    from tqdm import tqdm

    tr = model.transformer
    n = tr.config.n_layers
    if not 1 <= cfg.top_layers <= n:
        raise CfmError(f"--layers must be between 1 and {n} (the model's layers), got {cfg.top_layers}")
    if attached(tr):
        raise CfmError("remove the bricks on the model before training a new one")
    start = n - cfg.top_layers
    frozen = frozen or local_frozen(tr, start)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    pairs = new_pairs(tr, cfg, start, gen)
    params = [t for p in pairs.values() for t in (p.a, p.b)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = lambda s: min(1.0, (s + 1) / 10) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    digest = data_digest(examples)
    step, losses = 0, []
    if resume and checkpoint is not None and checkpoint.is_file():
        step, losses = _load_checkpoint(checkpoint, pairs, opt, cfg, digest)
        if log:
            log(f"resuming from step {step} ({checkpoint})")
    resumed = step
    last = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    t0 = time.perf_counter()
    hidden = [frozen(e.ids) for e in examples]  # forward-only part, once per example
    _unfreeze_rotary_tables(tr)
    anchors = _anchors(model, frozen, start, cfg) if cfg.anchor_weight and cfg.anchor_batch else []
    attach(tr, "__training__", pairs)
    try:
        bar = tqdm(total=cfg.steps, initial=step, desc="training", unit="step", disable=not progress, leave=True)
        while step < last:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * sched(step)
            k = _order(len(examples), cfg.seed, step)
            loss = example_loss(tr, hidden[k], examples[k], start)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for j in range(min(cfg.anchor_batch, len(anchors)) if anchors else 0):
                anchor = anchors[_order(len(anchors), cfg.seed + 1, step * cfg.anchor_batch + j)]
                (cfg.anchor_weight / cfg.anchor_batch * anchor_kl(tr, *anchor, start)).backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            bar.update(1)
            bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
            if checkpoint is not None and (step % cfg.checkpoint_every == 0 or step == last):
                _save_checkpoint(checkpoint, step, pairs, opt, cfg, digest, losses)
        bar.close()
    finally:
        detach(tr, "__training__")
    plain = {k: LoraPair(p.a.detach().clone(), p.b.detach().clone(), p.scale) for k, p in pairs.items()}
    return TrainResult(from_model_layout(plain, tr.config), losses, time.perf_counter() - t0, resumed, start)


def _unfreeze_rotary_tables(tr) -> None:
    # tables grown under inference_mode (generation) cannot enter autograd; normal copies can
    rot = tr.rotary
    if rot.cos.is_inference():
        rot.cos, rot.sin = rot.cos.clone(), rot.sin.clone()


def mean_loss(model, examples: list[Example]) -> float:
    """Mean per-token loss on the masked positions with whatever bricks are on (perplexity = exp)."""
    tr = model.transformer
    total, count = 0.0, 0
    with torch.inference_mode():
        for e in examples:
            h = tr.embed(torch.tensor([e.ids]))
            h = tr.forward_span(h, 0, tr.config.n_layers, [tr.new_cache(max_len=len(e.ids))])
            logits = tr.head(h)[0, :-1]
            mask = torch.tensor(e.mask[1:])
            loss = F.cross_entropy(logits[mask], torch.tensor(e.ids[1:])[mask], reduction="sum")
            total, count = total + float(loss), count + int(mask.sum())
    return total / max(count, 1)
