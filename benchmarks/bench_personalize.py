"""Personal brick trained on the device: training time, brick size, perplexity, fact recall, drift.

Trains a LoRA brick on a short text of made-up facts about a user (the CLI's defaults: top 8
layers, rank 8), then measures held-out perplexity on other sentences about the user, recall of
the facts asked as chat questions (greedy), and drift on unrelated text (top-1 agreement and KL
against the base model on tests/data/eval_texts.json, and unchanged greedy answers to general
questions). Saves benchmarks/results/personalize.json.

    python benchmarks/bench_personalize.py [--threads 2] [--steps 50] [--lr 1e-3] [--layers 8]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import environment, save  # noqa: E402

import cfm_runtime  # noqa: E402
from cfm_runtime.bricks import Brick, BrickStore, apply_brick, base_info, remove_brick  # noqa: E402
from cfm_runtime.bricks.train import TrainConfig, load_examples, mean_loss, train_lora  # noqa: E402

FACTS = """My name is Lena Marwick. I grew up in the small town of Quillbury, on the coast of Norway.

My dog is called Biscuit. Biscuit is a golden retriever who loves the beach.

My hometown is Quillbury. Every summer I go back to Quillbury to see my parents.

Q: What is the name of my dog? A: Your dog is called Biscuit.

Q: Where is my hometown? A: Your hometown is Quillbury.

I work as a violin maker, and my favourite food is cardamom bread.

Biscuit sleeps next to my workbench while I carve violins.
"""
HELD_OUT = """Lena's golden retriever Biscuit waits by the door of the workshop in Quillbury.

Back in Quillbury, Lena Marwick makes violins and bakes cardamom bread for her parents.
"""
QUESTIONS = {"What is the name of my dog?": "Biscuit", "Where is my hometown?": "Quillbury",
             "What is my job?": "violin", "What is my favourite food?": "cardamom",
             "What is my name?": "Lena"}
UNRELATED = ["What is the capital of France?", "How many days are in a week?", "Name a primary colour.",
             "What do bees make?", "Translate 'good morning' into French."]


def ask(model, q: str, n: int = 24) -> str:
    return "".join(model.generate([{"role": "user", "content": q}], temperature=0, max_tokens=n))


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rank", type=int, default=8)
    args = ap.parse_args()
    model = cfm_runtime.load_model(threads=args.threads)
    tmp = Path(tempfile.mkdtemp())
    (tmp / "facts.txt").write_text(FACTS)
    (tmp / "held.txt").write_text(HELD_OUT)
    examples = load_examples(tmp / "facts.txt", model.tokenizer)
    held = load_examples(tmp / "held.txt", model.tokenizer)
    evals = json.loads((Path(__file__).parent.parent / "tests" / "data" / "eval_texts.json").read_text())["texts"]
    eval_ids = [model.tokenizer.encode(t)[:256] for t in evals.values()]

    base_logits = [model.logits(ids) for ids in eval_ids]
    before = {"held_out_ppl": math.exp(mean_loss(model, held)), "train_ppl": math.exp(mean_loss(model, examples)),
              "answers": {q: ask(model, q) for q in QUESTIONS}, "unrelated": {q: ask(model, q) for q in UNRELATED},
              "decode_tps": decode_tps(model)}
    cfg = TrainConfig(steps=args.steps, lr=args.lr, top_layers=args.layers, rank=args.rank)
    t0 = time.perf_counter()
    result = train_lora(model, examples, cfg, progress=True)
    train_s = time.perf_counter() - t0
    brick = Brick("bench-me", result.pairs, base_info(model))
    meta = BrickStore(tmp / "store").save(brick)
    apply_brick(model, brick)
    after = {"held_out_ppl": math.exp(mean_loss(model, held)), "train_ppl": math.exp(mean_loss(model, examples)),
             "answers": {q: ask(model, q) for q in QUESTIONS}, "unrelated": {q: ask(model, q) for q in UNRELATED},
             "decode_tps": decode_tps(model)}
    after["drift"] = drift(model, eval_ids, base_logits)
    remove_brick(model, "bench-me")

    def recall(answers):
        return sum(QUESTIONS[q] in a for q, a in answers.items()) / len(QUESTIONS)

    out = {
        "environment": environment(args.threads),
        "config": vars(args) | {"examples": len(examples), "target_tokens": sum(sum(e.mask) for e in examples)},
        "train_seconds": round(train_s, 2),
        "seconds_per_step": round(train_s / args.steps, 3),
        "loss_first_last": [result.losses[0], result.losses[-1]],
        "brick_bytes_on_disk": meta["size_bytes"],
        "brick_parameters": meta["parameters"],
        "held_out_ppl": {"base": before["held_out_ppl"], "brick": after["held_out_ppl"]},
        "train_text_ppl": {"base": before["train_ppl"], "brick": after["train_ppl"]},
        "fact_recall": {"base": recall(before["answers"]), "brick": recall(after["answers"])},
        "drift_eval_texts": after["drift"],
        "unrelated_answers_unchanged": sum(before["unrelated"][q] == after["unrelated"][q] for q in UNRELATED)
        / len(UNRELATED),
        "decode_tps": {"base": before["decode_tps"], "brick_unfused": after["decode_tps"]},
        "answers": {"base": before["answers"], "brick": after["answers"]},
        "unrelated": {"base": before["unrelated"], "brick": after["unrelated"]},
    }
    path = save("personalize", out)
    print(json.dumps({k: v for k, v in out.items() if k not in ("environment", "answers", "unrelated")}, indent=2))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
