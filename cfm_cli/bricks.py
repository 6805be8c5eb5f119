"""`cfm brick list|add|remove|show|merge|train|export`: personal bricks on this device.

Bricks live only on this device (the store in $CFM_HOME/bricks or ~/.local/share/cfm/bricks); `--bricks`
on generate, chat and serve puts them on (`cfm_runtime.RunOptions.bricks`).

Each command imports the brick machinery (torch) when it runs: every `cfm` command builds this parser,
`cfm generate` included, and that must not load torch.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from cfm_runtime.bricks.config import TrainConfig
from cfm_runtime.errors import BrickError, CfmError
from cfm_runtime.options import parse_spec

from .common import add_center_args, add_model_args, center_options, load, notice


def add_parser(sub) -> None:
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
    add_model_args(s, bricks=False, sparse=False)
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
    add_model_args(s, bricks=False, sparse=False)
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
    add_center_args(s)
    s.set_defaults(split="center")
    add_model_args(s, bricks=False, sparse=False)
    s.set_defaults(func=cmd_train)


def _train_defaults():
    return TrainConfig()


# ------------------------------------------------------------------ store commands


def _store():
    from cfm_runtime.bricks.store import BrickStore

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


def _signature(model, path) -> dict:
    from cfm_runtime.bricks.routing import signature
    from cfm_runtime.bricks.train import load_examples

    examples = load_examples(path, model.tokenizer)
    sig, layer = signature(model, [e.ids for e in examples])
    return {"signature": sig, "signature_layer": layer}


def cmd_add(args) -> int:
    from cfm_runtime.bricks.apply import import_adapter

    store = _store()
    if store.exists(args.name) and not args.force:
        raise BrickError(f"a brick named {args.name!r} exists already; choose another --name or pass --force")
    model = load(args)
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
    from cfm_runtime.bricks.merge import merge_bricks
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
    from cfm_runtime.bricks.apply import check_base
    from cfm_runtime.bricks.formats import write_gguf_adapter, write_peft

    if not args.gguf and not args.peft:
        raise CfmError("give --gguf FILE and/or --peft DIR")
    brick = _store().load(args.name)
    if args.peft:
        write_peft(Path(args.peft), brick.pairs, brick.meta.get("base_model", ""))
        print(f"wrote {args.peft}")
    if args.gguf:
        model = load(args)
        check_base(model, brick)
        write_gguf_adapter(Path(args.gguf), brick.pairs, model.config)
        print(f"wrote {args.gguf}")
    return 0


# ------------------------------------------------------------------ training


def cmd_train(args) -> int:
    from cfm_runtime.bricks.apply import apply_brick, base_info
    from cfm_runtime.bricks.routing import signature
    from cfm_runtime.bricks.store import Brick, check_name
    from cfm_runtime.bricks.train import load_examples, mean_loss, train_lora

    store = _store()
    check_name(args.name)
    if store.exists(args.name) and not (args.force or args.resume):
        raise BrickError(f"a brick named {args.name!r} exists already; choose another --name or pass --force")
    cfg = TrainConfig(rank=args.rank, alpha=args.alpha, top_layers=args.layers, steps=args.steps, lr=args.lr,
                      seq_len=args.seq_len, seed=args.seed, anchor_weight=args.anchor_weight, anchors=args.anchors)
    model = load(args)
    examples = load_examples(args.data, model.tokenizer, cfg.seq_len)
    n_tokens = sum(sum(e.mask) for e in examples)
    print(f"training brick {args.name!r}: {len(examples)} examples, {n_tokens} target tokens, "
          f"LoRA rank {cfg.rank} on layers {model.config.n_layers - cfg.top_layers}-{model.config.n_layers - 1}",
          file=sys.stderr)
    frozen, closer = None, None
    if args.center:
        from cfm_runtime.split.frozen import center_frozen  # grpc: imported when a center is used

        frozen, closer = center_frozen(model, center_options(args), model.config.n_layers - cfg.top_layers,
                                       log=notice)
    checkpoint = store.root / ".train" / args.name / "checkpoint.pt"
    if checkpoint.is_file() and not args.resume:
        print("(a checkpoint of an earlier run exists; starting over — pass --resume to continue it)",
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
