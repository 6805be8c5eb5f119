"""`cfm serve`: the OpenAI-compatible API (edge/server.py), imported only when the command runs."""

from __future__ import annotations

from cfm_runtime.errors import CfmError


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
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    import sys

    from edge.cli import load, new_generator
    from edge.server import Engine, serve

    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        raise CfmError(f"listening on {args.host} exposes the model beyond this machine; pass --api-key KEY")
    model = load(args)
    engine = Engine(model, new_generator(args, model), model_id(model))

    def ready(port: int) -> None:
        print(f"serving {', '.join(engine.model_ids())} at http://{args.host}:{port}/v1", file=sys.stderr, flush=True)

    serve(engine, args.host, args.port, args.api_key, ready)
    return 0
