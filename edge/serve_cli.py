"""`cfm serve`: the OpenAI-compatible API (edge/server.py), imported only when the command runs."""

from __future__ import annotations

import contextlib
import sys

from cfm_runtime.errors import CfmError
from edge import split_cli


def model_id(model) -> str:
    """A short id for the base model: GGUF basename + size label, else the file or folder name."""
    meta = model.metadata if model.format == "gguf" else {}
    parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
    name = "-".join(parts) if parts else model.path.stem
    return name.lower().replace(" ", "-")


def add_parser(sub) -> None:
    from edge.cli import add_model_args

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat/completions, completions, models)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (required off loopback)")
    split_cli.add_center_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import sys

    from edge.cli import load, new_generator
    from edge.server import Engine, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        raise CfmError(f"listening on {args.host} exposes the model beyond this machine; pass --api-key KEY")
    model = load(args)
    generator = new_generator(args, model)
    engine = Engine(model, generator, model_id(model), brick_models(model, generator))

    def ready(port: int) -> None:
        print(f"serving {', '.join(engine.model_ids())} at http://{args.host}:{port}/v1", file=sys.stderr, flush=True)

    serve(engine, args.host, args.port, args.api_key, ready)
    return 0


def brick_models(model, generator, store=None) -> dict:
    """Model id "base+brick" -> a context manager that puts that brick on the model for one request.

    Only bricks made for this base model are offered; in split mode only those whose layers all
    run on the edge (a brick never travels to the center, and the center cannot apply it).
    """
    from cfm_runtime.bricks import apply_brick, remove_brick
    from cfm_runtime.bricks.store import BrickStore

    store = store or BrickStore()
    base = model_id(model)
    span = getattr(getattr(generator, "runner", None), "span", None)
    out = {}
    for name in store.names():
        try:
            brick = store.load(name)
            apply_brick(model, brick)
            remove_brick(model, name)
        except CfmError as e:
            print(f"[brick {name} not offered: {e}]", file=sys.stderr)
            continue
        if span and any(span[0] <= layer < span[1] for layer in brick.layers):
            print(f"[brick {name} not offered: it changes layers {span[0]}..{span[1] - 1}, which run on the center]",
                  file=sys.stderr)
            continue
        out[f"{base}+{name}"] = _brick_context(model, brick, apply_brick, remove_brick)
    return out


def _brick_context(model, brick, apply_brick, remove_brick):
    @contextlib.contextmanager
    def on():
        apply_brick(model, brick)
        try:
            yield
        finally:
            remove_brick(model, brick.name)
    return on
