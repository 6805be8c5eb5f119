"""`cfm brick list|add|remove|show|merge|train|export` and `--bricks NAMES|auto` on generate/chat.

Bricks live only on this device (the store in $CFM_HOME/bricks or ~/.local/share/cfm/bricks); with
--center, the layers a brick touches are kept on the edge, so no brick weight goes to the center.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cfm_runtime.bricks import (Brick, BrickError, BrickStore, apply_brick, attached, brick_layers, import_adapter,
                                remove_brick)
from cfm_runtime.errors import CfmError


def add_bricks_arg(p) -> None:
    p.add_argument("--bricks", default=None, metavar="NAMES|auto",
                   help="personal bricks to apply: NAME[:WEIGHT],... from the brick store, or 'auto' to pick "
                        "the best-matching brick (or none) for each prompt")
    p.add_argument("--brick-threshold", type=float, default=None, metavar="S",
                   help="with --bricks auto: lowest routing score that selects a brick (default 0.35)")


def add_parser(sub) -> None:
    from edge.cli import add_model_args

    p = sub.add_parser("brick", help="personal LoRA bricks on this device: list, add, train, merge, ...")
    bs = p.add_subparsers(dest="brick_command", required=True, metavar="ACTION")

    s = bs.add_parser("list", help="bricks in the store")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_list)

    s = bs.add_parser("show", help="one brick's metadata")
    s.add_argument("name")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_show)

    s = bs.add_parser("add", help="import a PEFT LoRA folder or a llama.cpp GGUF LoRA adapter")
    s.add_argument("path", help="PEFT folder (adapter_config.json + adapter_model.safetensors) or adapter .gguf")
    s.add_argument("--name", required=True)
    s.add_argument("--description", default="")
    s.add_argument("--signature-data", default=None, metavar="FILE",
                   help="text or chat JSONL like the adapter's training data, for --bricks auto routing")
    s.add_argument("--force", action="store_true", help="replace a brick of the same name")
    add_model_args(s)
    s.set_defaults(func=cmd_add)

    s = bs.add_parser("remove", help="delete a brick from the store")
    s.add_argument("name")
    s.set_defaults(func=cmd_remove)

    s = bs.add_parser("merge", help="weighted merge of bricks of the same base model: a:0.5 b:0.5 --name c")
    s.add_argument("specs", nargs="+", metavar="NAME:WEIGHT")
    s.add_argument("--name", required=True)
    s.add_argument("--description", default="")
    s.add_argument("--force", action="store_true", help="replace a brick of the same name")
    s.set_defaults(func=cmd_merge)

    s = bs.add_parser("export", help="write a brick as a llama.cpp GGUF LoRA adapter (or a PEFT folder)")
    s.add_argument("name")
    s.add_argument("--gguf", default=None, metavar="FILE", help="llama.cpp adapter file to write")
    s.add_argument("--peft", default=None, metavar="DIR", help="PEFT folder to write")
    add_model_args(s)
    s.set_defaults(func=cmd_export)

    s = bs.add_parser("train", help="train a brick on your own text, on this device")
    s.add_argument("--data", required=True, help="plain text file, or .jsonl with chats ({\"messages\": [...]})")
    s.add_argument("--name", required=True)
    s.add_argument("--description", default="")
    d = _train_defaults()
    s.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default {d.steps})")
    s.add_argument("--rank", type=int, default=d.rank, help=f"LoRA rank (default {d.rank})")
    s.add_argument("--alpha", type=float, default=d.alpha, help=f"LoRA alpha (default {d.alpha:g})")
    s.add_argument("--layers", type=int, default=d.top_layers, help=f"train the top N layers (default {d.top_layers})")
    s.add_argument("--lr", type=float, default=d.lr, help=f"learning rate (default {d.lr:g})")
    s.add_argument("--seq-len", type=int, default=d.seq_len, help=f"tokens per training window (default {d.seq_len})")
    s.add_argument("--anchor-weight", type=float, default=d.anchor_weight,
                   help="weight of the KL term that keeps answers to general prompts as the base model gives them "
                        f"(0 disables; default {d.anchor_weight:g})")
    s.add_argument("--anchors", type=int, default=d.anchors,
                   help=f"general chats and texts in that KL term's set (default {d.anchors})")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint of this brick")
    s.add_argument("--force", action="store_true", help="replace a brick of the same name")
    s.add_argument("--center", default=None, metavar="HOST:PORT",
                   help="run the frozen middle layers on a center, forward only (gradients stay here)")
    s.add_argument("--split", default=None, metavar="A:B", help="with --center: layers A:B on the center")
    add_model_args(s)
    s.set_defaults(func=cmd_train)


def _train_defaults():
    from cfm_runtime.bricks.train import TrainConfig

    return TrainConfig()


# ------------------------------------------------------------------ store commands


def _store() -> BrickStore:
    return BrickStore()


def _line(m: dict) -> str:
    layers = m.get("layers") or []
    span = f"{layers[0]}-{layers[-1]}" if layers else "-"
    mods = ",".join(k.split(".")[-1].removesuffix("_proj") for k in m.get("modules", []))
    routed = "yes" if m.get("signature") else "no"
    return (f"{m['name']:<20} rank {m.get('rank', '?'):<3} layers {span:<7} {mods:<22} "
            f"{m.get('size_bytes', 0) / 1024:8.1f} KiB  routing {routed:<3}  {m.get('description', '')}")


def cmd_list(args) -> int:
    store = _store()
    metas = store.list()
    if args.json:
        print(json.dumps([{k: v for k, v in m.items() if k != "signature"} for m in metas], indent=2))
    elif not metas:
        print(f"no bricks in {store.root} (add one with `cfm brick add` or `cfm brick train`)")
    else:
        for m in metas:
            print(_line(m))
    return 0


def cmd_show(args) -> int:
    meta = _store().info(args.name)
    shown = {k: v for k, v in meta.items() if k != "signature"}
    shown["signature"] = f"{len(meta['signature'])} values at layer {meta['signature_layer']}" \
        if meta.get("signature") else None
    if args.json:
        print(json.dumps(shown, indent=2))
    else:
        for k, v in shown.items():
            print(f"{k:<18} {v}")
    return 0


def _load_model(args):
    from edge.cli import load

    return load(args)


def _signature(model, path) -> dict:
    from cfm_runtime.bricks.routing import signature
    from cfm_runtime.bricks.train import load_examples

    examples = load_examples(path, model.tokenizer)
    sig, layer = signature(model, [e.ids for e in examples])
    return {"signature": sig, "signature_layer": layer}


def cmd_add(args) -> int:
    store = _store()
    if store.exists(args.name) and not args.force:
        raise BrickError(f"a brick named {args.name!r} exists already; choose another --name or pass --force")
    args.bricks = None
    model = _load_model(args)
    brick = import_adapter(model, args.path, args.name, args.description)
    if args.signature_data:
        brick.meta |= _signature(model, args.signature_data)
    meta = store.save(brick, overwrite=args.force)
    print(f"added {_line(meta)}")
    return 0


def cmd_remove(args) -> int:
    _store().remove(args.name)
    print(f"removed brick {args.name}")
    return 0


def cmd_merge(args) -> int:
    from cfm_runtime.bricks.merge import merge_bricks, parse_spec
    from cfm_runtime.bricks.store import check_name

    store = _store()
    check_name(args.name)
    if store.exists(args.name) and not args.force:
        raise BrickError(f"a brick named {args.name!r} exists already; choose another --name or pass --force")
    specs = [parse_spec(s) for s in args.specs]
    bricks = [store.load(n) for n, _ in specs]
    merged = merge_bricks(bricks, [w for _, w in specs], args.name, args.description)
    meta = store.save(merged, overwrite=args.force)
    print(f"merged into {_line(meta)}")
    return 0


def cmd_export(args) -> int:
    from cfm_runtime.bricks.formats import write_gguf_adapter, write_peft

    if not args.gguf and not args.peft:
        raise CfmError("give --gguf FILE and/or --peft DIR")
    brick = _store().load(args.name)
    if args.peft:
        write_peft(Path(args.peft), brick.pairs, brick.meta.get("base_model", ""))
        print(f"wrote {args.peft}")
    if args.gguf:
        args.bricks = None
        model = _load_model(args)
        from cfm_runtime.bricks import check_base

        check_base(model, brick)
        write_gguf_adapter(Path(args.gguf), brick.pairs, model.config)
        print(f"wrote {args.gguf}")
    return 0


# ------------------------------------------------------------------ training


def cmd_train(args) -> int:
    import math

    from cfm_runtime.bricks import base_info
    from cfm_runtime.bricks.routing import signature
    from cfm_runtime.bricks.store import check_name
    from cfm_runtime.bricks.train import TrainConfig, load_examples, mean_loss, train_lora

    store = _store()
    check_name(args.name)
    if store.exists(args.name) and not (args.force or args.resume):
        raise BrickError(f"a brick named {args.name!r} exists already; choose another --name or pass --force")
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, top_layers=args.layers, steps=args.steps, lr=args.lr,
                      seq_len=args.seq_len, seed=args.seed, anchor_weight=args.anchor_weight, anchors=args.anchors)
    args.bricks = None
    model = _load_model(args)
    examples = load_examples(args.data, model.tokenizer, cfg.seq_len)
    n_tokens = sum(sum(e.mask) for e in examples)
    print(f"training brick {args.name!r}: {len(examples)} examples, {n_tokens} target tokens, "
          f"LoRA rank {cfg.rank} on layers {model.config.n_layers - cfg.top_layers}-{model.config.n_layers - 1}",
          file=sys.stderr)
    frozen, closer = None, None
    if args.center:
        frozen, closer = center_frozen(args, model, model.config.n_layers - cfg.top_layers)
    checkpoint = store.root / ".train" / args.name / "checkpoint.pt"
    if checkpoint.is_file() and not args.resume:
        print(f"(a checkpoint of an earlier run exists; starting over — pass --resume to continue it)",
              file=sys.stderr)
    before = mean_loss(model, examples)
    try:
        result = train_lora(model, examples, cfg, frozen=frozen, checkpoint=checkpoint, resume=args.resume,
                            log=lambda m: print(m, file=sys.stderr))
    finally:
        if closer:
            closer()
    sig, layer = signature(model, [e.ids for e in examples])
    meta = base_info(model) | {
        "description": args.description, "source": "trained", "signature": sig, "signature_layer": layer,
        "train": {"steps": cfg.steps, "examples": len(examples), "target_tokens": n_tokens, "lr": cfg.lr,
                  "alpha": cfg.alpha, "seconds": round(result.seconds, 1), "final_loss": result.losses[-1],
                  "loss_before": before, "split": bool(args.center)},
    }
    brick = Brick(args.name, result.pairs, meta)
    apply_brick(model, brick)
    after = mean_loss(model, examples)
    brick.meta["train"]["loss_after"] = after
    saved = store.save(brick, overwrite=True)
    checkpoint.unlink(missing_ok=True)
    print(f"saved {_line(saved)}")
    print(f"training-text perplexity {math.exp(before):.2f} -> {math.exp(after):.2f} "
          f"in {result.seconds:.1f} s", file=sys.stderr)
    return 0


def center_frozen(args, model, start: int):
    """Hidden states at layer `start` with layers A:B run forward only on the center (split training)."""
    import torch

    from edge.split import SplitOptions, SplitRunner
    from edge.split_cli import parse_split

    split = parse_split(args.split) if args.split else None
    if isinstance(split, str):
        split = None
    if split is not None and split[1] > start:
        raise CfmError(f"--split {args.split}: the trained layers {start}-{model.config.n_layers - 1} must stay on "
                       f"the edge; pick B <= {start}")
    runner = SplitRunner(model, args.center, split, SplitOptions())
    a, b = runner.span
    if b > start:
        runner.close()
        runner = SplitRunner(model, args.center, (a, start), SplitOptions())
        a, b = runner.span
    tr = model.transformer

    def run(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            runner.truncate(0)
            h = tr.forward_span(tr.embed(torch.tensor([ids])), 0, a, [runner.cache])
            h = runner.middle(h[0], 0)[None] if hasattr(runner, "middle") else runner._middle(h[0], 0)[None]
            return tr.forward_span(h, b, start, [runner.cache]).clone()

    print(f"[split training: layers {a}:{b} on the center {args.center}, forward only]", file=sys.stderr)
    return run, runner.close


# ------------------------------------------------------------------ --bricks on generate / chat


def parse_bricks(text: str) -> list[tuple[str, float]]:
    from cfm_runtime.bricks.merge import parse_spec

    return [parse_spec(s.strip()) for s in text.split(",") if s.strip()]


def apply_args(args, model) -> None:
    """--bricks NAMES: put the named bricks on the model once, for the whole run."""
    text = getattr(args, "bricks", None)
    if not text or text == "auto":
        return
    store = _store()
    for name, weight in parse_bricks(text):
        apply_brick(model, store.load(name), weight)
    print(f"[bricks: {', '.join(f'{n}:{w:g}' for n, w in attached(model.transformer).items())}]", file=sys.stderr)


class RoutedGenerator:
    """--bricks auto: before each prompt, put on the best-matching brick (or none) and say which."""

    def __init__(self, generator, model, store: BrickStore, threshold: float | None):
        from cfm_runtime.bricks.routing import DEFAULT_THRESHOLD

        self.generator, self.model, self.store = generator, model, store
        self.threshold = DEFAULT_THRESHOLD if threshold is None else threshold
        self.metas = [m for m in store.list() if m.get("signature")]
        self.current: str | None = None
        self.loaded: dict[str, Brick] = {}
        if not self.metas:
            print(f"[bricks: auto, but no brick in {store.root} has a routing signature]", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self.generator, name)

    def select(self, ids: list[int]) -> str | None:
        from cfm_runtime.bricks.routing import route

        name, scores = route(self.model, ids, self.metas, self.threshold)
        if name != self.current:
            if self.current:
                remove_brick(self.model, self.current)
            if name:
                if name not in self.loaded:
                    self.loaded[name] = self.store.load(name)
                apply_brick(self.model, self.loaded[name])
            self.generator.runner.truncate(0)  # the cached prefix was computed with other bricks
            self.generator.tokens = []
            self.current = name
        best = ", ".join(f"{n} {s:.2f}" for n, s in sorted(scores.items(), key=lambda kv: -kv[1])[:3])
        print(f"[bricks: auto -> {name or 'none'} (scores: {best or '-'}; threshold {self.threshold:g})]",
              file=sys.stderr)
        return name

    def stream(self, prompt_ids, params):
        name = self.select(prompt_ids)
        for chunk in self.generator.stream(prompt_ids, params):
            chunk.stats.extra["brick"] = name
            yield chunk


def _local_bricks_layers(args, model) -> set[int]:
    if getattr(args, "bricks", None) == "auto":
        return {layer for m in _store().list() if m.get("signature") for layer in m.get("layers", [])}
    return brick_layers(model.transformer)


def keep_bricks_local(args, model, generator):
    """With --center: the center's span must hold no layer a brick touches. A pinned --split that
    does is refused; a planned one is shrunk to the largest brick-free run of layers (or local)."""
    runner = getattr(generator, "runner", None)
    span = getattr(runner, "span", None)
    mine = _local_bricks_layers(args, model)
    if span is None or not mine or not any(span[0] <= i < span[1] for i in mine):
        return generator
    a, b = span
    pinned = getattr(args, "split", None) not in (None, "auto", "center")
    if pinned:
        runner.close()
        raise CfmError(f"--split {a}:{b} puts layers {sorted(i for i in mine if a <= i < b)} on the center, but "
                       "personal bricks touch them and bricks never leave this device; choose a split whose "
                       f"center layers avoid {sorted(mine)}, or drop --bricks")
    runs, s = [], a
    for i in range(a, b + 1):
        if i == b or i in mine:
            if i > s:
                runs.append((s, i))
            s = i + 1
    runner.close()
    if not runs:
        print(f"[bricks: every center layer {a}:{b} holds a brick; running locally]", file=sys.stderr)
        return model.new_generator()
    new = max(runs, key=lambda r: r[1] - r[0])
    print(f"[bricks: center span {a}:{b} -> {new[0]}:{new[1]} so layers with bricks stay on this device]",
          file=sys.stderr)
    from edge.split import SplitGenerator, SplitOptions, SplitRunner
    from edge.split_cli import split_options

    runner = SplitRunner(model, args.center, new, SplitOptions(**split_options(args)))
    return SplitGenerator(runner, model.tokenizer, model.config.context_length)


def wrap_generator(args, model, generator):
    """The run's generator with brick placement (split) and routing (--bricks auto) applied."""
    if getattr(args, "center", None):
        generator = keep_bricks_local(args, model, generator)
    if getattr(args, "bricks", None) == "auto":
        return RoutedGenerator(generator, model, _store(), getattr(args, "brick_threshold", None))
    return generator
