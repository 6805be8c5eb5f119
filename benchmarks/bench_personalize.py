"""Personal brick trained on the device: training time, brick size, perplexity, fact recall, drift.

Trains a LoRA brick on a short text of made-up facts about a user (tests/data/personal_facts.json,
shared with tests/test_bricks.py) with the `cfm brick train` defaults (TrainConfig), then measures
held-out perplexity on other sentences about the user, recall of the facts asked in chat as a user
would (greedy; none of the questions is copied from the training text), and drift on unrelated
input: top-1 agreement and KL against the base model on cfm_bench/data/eval_texts.json, and the greedy
answers to general questions (unchanged, or still containing the base model's correct answer word).
Saves benchmarks/results/personalize.json; `--sweep` trains a grid of options instead and saves
benchmarks/results/personalize_sweep.json (one row per setting, same measurements); `--only` picks
named settings or ad-hoc ones (field=value+field=value) and saves personalize_sweep_TAG.json. The base
model's answers are cached in the temp folder (per model and data), so parallel sweeps share them.
On a shared machine use --threads 1: two-thread torch slows down 3-5x when the cores are oversubscribed.

    python benchmarks/bench_personalize.py [--threads 2] [--steps N] [--rank R] [--top-layers L] [--anchor-weight W]
    python benchmarks/bench_personalize.py --sweep [--only "anchor_weight=10,anchor_weight=10+steps=80" --tag x]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save  # noqa: E402

import cfm_runtime  # noqa: E402
from cfm_bench.split import EVAL_TEXTS  # noqa: E402
from cfm_runtime.bricks import Brick, BrickStore, apply_brick, base_info, remove_brick  # noqa: E402
from cfm_runtime.bricks.lora import TARGET_KINDS  # noqa: E402
from cfm_runtime.bricks.routing import DEFAULT_THRESHOLD, route, signature  # noqa: E402
from cfm_runtime.bricks.train import TrainConfig, load_examples, mean_loss, train_lora  # noqa: E402

DATA = Path(__file__).parent.parent / "tests" / "data"
MAX_TOKENS = 24
ATTN = tuple(k for k in TARGET_KINDS if k.startswith("self_attn"))
MLP = tuple(k for k in TARGET_KINDS if k.startswith("mlp"))


def ask(model, q: str, n: int = MAX_TOKENS) -> str:
    return "".join(model.generate([{"role": "user", "content": q}], temperature=0, max_tokens=n))


def same_greedy(model, q: str, answer_ids: list[int]) -> bool:
    """True when greedy decoding gives `answer_ids` again: the argmax at every position of the base
    model's own answer is that answer's next token (one forward instead of a decode loop)."""
    prompt = model.encode_prompt([{"role": "user", "content": q}])
    logits = model.logits(prompt + answer_ids)
    return bool((logits[len(prompt) - 1:-1].argmax(-1) == np.array(answer_ids)).all())


def drift(model, texts: list[list[int]], base: list[np.ndarray]) -> dict:
    agree, kls = [], []
    for ids, b in zip(texts, base):
        logits = torch.from_numpy(model.logits(ids))
        lb = torch.log_softmax(torch.from_numpy(b), -1)
        lp = torch.log_softmax(logits, -1)
        agree.append(float((logits.argmax(-1) == lb.argmax(-1)).float().mean()))
        kls.append(float((lb.exp() * (lb - lp)).sum(-1).mean()))
    return {"top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls))}


def decode_tps(model, n: int = 32) -> float:
    stats = None
    for c in model.stream("Once upon a time", temperature=0, max_tokens=n):
        stats = c.stats
    return stats.decode_tps


class Setup:
    """The model, the user's data and everything measured on the base model once."""

    def __init__(self, threads: int):
        self.model = model = cfm_runtime.load_model(threads=threads, weights="fp32")
        self.data = json.loads((DATA / "personal_facts.json").read_text())
        self.tmp = Path(tempfile.mkdtemp())
        (self.tmp / "facts.txt").write_text(self.data["facts"])
        (self.tmp / "held.txt").write_text(self.data["held_out"])
        self.examples = load_examples(self.tmp / "facts.txt", model.tokenizer)
        self.held = load_examples(self.tmp / "held.txt", model.tokenizer)
        evals = json.loads(EVAL_TEXTS.read_text())["texts"]
        self.eval_ids = [model.tokenizer.encode(t)[:256] for t in evals.values()]
        self.base_logits = [model.logits(ids) for ids in self.eval_ids]
        # the base model's answers are the same for every setting: computed once per model and data
        key = hashlib.sha256((model.fingerprint() + json.dumps(self.data) + str(MAX_TOKENS)).encode()).hexdigest()[:16]
        cache = Path(tempfile.gettempdir()) / f"cfm_bench_personalize_base_{key}.json"
        if cache.is_file():
            self.before = json.loads(cache.read_text())
        else:
            self.before = self.measure()
            cache.write_text(json.dumps(self.before))

    def measure(self, base: dict | None = None) -> dict:
        m, d = self.model, self.data
        out = {"held_out_ppl": math.exp(mean_loss(m, self.held)), "train_ppl": math.exp(mean_loss(m, self.examples)),
               "answers": {q: ask(m, q) for q in d["questions"]}, "unrelated": {}}
        for q in d["unrelated"]:
            ids = base["unrelated_ids"][q] if base is not None else None
            if ids is not None and same_greedy(m, q, ids):
                out["unrelated"][q] = base["unrelated"][q]
            else:
                out["unrelated"][q] = ask(m, q)
        if base is None:
            out["unrelated_ids"] = {}
            for q, a in out["unrelated"].items():
                ids = m.tokenizer.encode(a, add_special=False)
                # the fast check holds only for answers cut at MAX_TOKENS whose text re-encodes to as many tokens
                out["unrelated_ids"][q] = ids if len(ids) == MAX_TOKENS else None
        out["fact_recall"] = sum(w.lower() in out["answers"][q].lower() for q, w in d["questions"].items())
        return out

    def run(self, cfg: TrainConfig, keep: bool = False) -> dict:
        m = self.model
        t0 = time.perf_counter()
        result = train_lora(m, self.examples, cfg, progress=True)
        train_s = time.perf_counter() - t0
        brick = Brick("bench-me", result.pairs, base_info(m))
        apply_brick(m, brick)
        try:
            after = self.measure(self.before)
            after["drift"] = drift(m, self.eval_ids, self.base_logits)
            if keep:
                after["decode_tps"] = decode_tps(m)
        finally:
            remove_brick(m, "bench-me")
        b, d = self.before["unrelated"], self.data["unrelated"]
        unchanged = [q for q in d if after["unrelated"][q] == b[q]]
        # equivalent: unchanged, or the base model's correct answer word is still there
        equivalent = [q for q in d if q in unchanged
                      or (d[q].lower() in b[q].lower() and d[q].lower() in after["unrelated"][q].lower())]
        row = {
            "config": {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint_every",)},
            "train_seconds": round(train_s, 2),
            "loss_first_last": [round(result.losses[0], 3), round(np.mean(result.losses[-5:]), 3)],
            "held_out_ppl": round(after["held_out_ppl"], 2),
            "train_text_ppl": round(after["train_ppl"], 2),
            "fact_recall": f"{after['fact_recall']}/{len(self.data['questions'])}",
            "top1_agreement": round(after["drift"]["top1_agreement"], 4),
            "mean_kl": round(after["drift"]["mean_kl"], 4),
            "unrelated_unchanged": f"{len(unchanged)}/{len(d)}",
            "unrelated_equivalent": f"{len(equivalent)}/{len(d)}",
            "france_correct": "Paris" in after["unrelated"]["What is the capital of France?"],
            "fact_answers": after["answers"],
            "unrelated_changed": {q: after["unrelated"][q] for q in d if q not in unchanged},
        }
        if keep:
            row |= {"result": result, "brick": brick, "after": after, "routed": self.routed(brick, after)}
        return row

    def routed(self, brick: Brick, after: dict) -> dict:
        """What a user of `--bricks auto` gets: each question goes to the brick only when routing picks it
        (the brick's signature is the mean hidden state of its training text, as `cfm brick train` stores)."""
        m, d = self.model, self.data
        sig, layer = signature(m, [e.ids for e in self.examples])
        meta = {"name": "bench-me", "signature": sig, "signature_layer": layer}
        pick = {q: route(m, m.encode_prompt([{"role": "user", "content": q}]), [meta])
                for q in [*d["questions"], *d["unrelated"]]}
        answers = {q: after["answers"][q] if pick[q][0] else self.before["answers"][q] for q in d["questions"]}
        unrelated = {q: after["unrelated"][q] if pick[q][0] else self.before["unrelated"][q] for q in d["unrelated"]}
        return {
            "threshold": DEFAULT_THRESHOLD,
            "facts_routed_to_brick": f"{sum(bool(pick[q][0]) for q in d['questions'])}/{len(d['questions'])}",
            "unrelated_routed_to_brick": f"{sum(bool(pick[q][0]) for q in d['unrelated'])}/{len(d['unrelated'])}",
            "fact_recall": f"{sum(w.lower() in answers[q].lower() for q, w in d['questions'].items())}"
                           f"/{len(d['questions'])}",
            "unrelated_unchanged": f"{sum(unrelated[q] == self.before['unrelated'][q] for q in d['unrelated'])}"
                                   f"/{len(d['unrelated'])}",
            "scores": {q: round(pick[q][1].get("bench-me", float("nan")), 3) for q in pick},
        }


def sweep_configs(base: TrainConfig) -> list[tuple[str, TrainConfig]]:
    r = lambda **kw: replace(base, **kw)  # noqa: E731
    return [
        ("defaults", base),
        ("no anchor", r(anchor_weight=0.0)),
        ("anchor weight 0.3", r(anchor_weight=0.3)),
        ("anchor weight 3", r(anchor_weight=3.0)),
        ("anchor batch 1", r(anchor_batch=1)),
        ("anchor batch 4", r(anchor_batch=4)),
        ("rank 4", r(rank=4, alpha=8.0)),
        ("rank 16", r(rank=16, alpha=32.0)),
        ("rsLoRA", r(rslora=True, alpha=16.0 / math.sqrt(base.rank))),
        ("mlp only", r(targets=MLP)),
        ("attention only", r(targets=ATTN)),
        ("o/v only", r(targets=("self_attn.v_proj", "self_attn.o_proj"))),
        ("top 4 layers", r(top_layers=4)),
        ("top 12 layers", r(top_layers=12)),
        ("steps x0.6", r(steps=max(1, int(base.steps * 0.6)))),
        ("steps x1.6", r(steps=int(base.steps * 1.6))),
        ("lr x0.5", r(lr=base.lr * 0.5)),
        ("lr x2", r(lr=base.lr * 2)),
    ]


def parse_setting(base: TrainConfig, text: str, known: list[str]) -> TrainConfig:
    kinds = {"all": TARGET_KINDS, "mlp": MLP, "attn": ATTN, "ov": ("self_attn.v_proj", "self_attn.o_proj")}
    types = {f.name: type(f.default) for f in fields(TrainConfig)}
    kw = {}
    for part in text.split("+"):
        key, _, value = part.partition("=")
        if key not in types or not value:
            raise SystemExit(f"unknown setting {text!r}: use one of {known} or field=value+field=value")
        kw[key] = kinds[value] if key == "targets" else (value == "True" if types[key] is bool else types[key](value))
    return replace(base, **kw)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sweep", action="store_true", help="train a grid of options around the defaults")
    ap.add_argument("--only", default=None, help="with --sweep: comma-separated setting names to run, in order")
    ap.add_argument("--tag", default="partial", help="with --only: results go to personalize_sweep_TAG.json")
    for f in fields(TrainConfig):
        if f.name in ("steps", "rank", "alpha", "top_layers", "lr", "anchor_weight", "anchors", "anchor_batch"):
            ap.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=None)
    args = ap.parse_args()
    overrides = {f.name: getattr(args, f.name) for f in fields(TrainConfig)
                 if getattr(args, f.name, None) is not None}
    cfg = TrainConfig(**overrides)
    s = Setup(args.threads)
    base_row = {"held_out_ppl": round(s.before["held_out_ppl"], 2), "train_text_ppl": round(s.before["train_ppl"], 2),
                "fact_recall": f"{s.before['fact_recall']}/{len(s.data['questions'])}"}

    if args.sweep:
        grid = dict(sweep_configs(cfg))
        only = args.only.split(",") if args.only else list(grid)
        for n in only:  # ad-hoc settings: field=value+field=value (targets: all, mlp, attn, ov)
            if n not in grid:
                grid[n] = parse_setting(cfg, n, list(grid))
        out = {"environment": environment(args.threads), "base_model": base_row,
               "examples": len(s.examples), "target_tokens": sum(sum(e.mask) for e in s.examples),
               "defaults": asdict(cfg), "rows": []}
        for name in only:
            row = {"setting": name} | s.run(grid[name])
            out["rows"].append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "config"}), flush=True)
            path = save("personalize_sweep" + ("" if not args.only else "_" + args.tag), out)  # after every row
        print(f"saved {path}")
        return

    m = s.model
    base_tps = decode_tps(m)
    row = s.run(cfg, keep=True)
    result, brick, after, routed = row.pop("result"), row.pop("brick"), row.pop("after"), row.pop("routed")
    meta = BrickStore(s.tmp / "store").save(brick)
    out = {
        "environment": environment(args.threads),
        "config": row.pop("config") | {"examples": len(s.examples),
                                       "target_tokens": sum(sum(e.mask) for e in s.examples)},
        "train_seconds": row["train_seconds"],
        "seconds_per_step": round(row["train_seconds"] / cfg.steps, 3),
        "brick_bytes_on_disk": meta["size_bytes"],
        "brick_parameters": meta["parameters"],
        "base_model": base_row,
        "brick": row,
        "loss_curve": [round(x, 3) for x in result.losses],
        "decode_tps": {"base": base_tps, "brick_unfused": after["decode_tps"]},
        "answers": {"base": s.before["answers"], "brick": after["answers"]},
        "unrelated": {"base": s.before["unrelated"], "brick": after["unrelated"]},
        "drift_eval_texts": after["drift"],
        "bricks_auto": routed,
    }
    path = save("personalize", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("environment", "loss_curve")}, indent=1))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
