"""`cfm serve`: the OpenAI-compatible HTTP API of this device (`edge.server`)."""

from __future__ import annotations

from .common import add_center_args, add_model_args, load, notice, run_options


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat/completions, completions, models)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (required off loopback)")
    add_center_args(p)
    p.set_defaults(func=cmd_serve)


def cmd_serve(args) -> int:
    from edge.server import Engine, model_id, serve  # the HTTP stack (fastapi, uvicorn): imported when it serves

    run = run_options(args)
    model = load(args)
    generator = model.new_generator(run)
    engine = Engine(model, generator, model_id(model), generator.bricks.offered())

    def ready(port: int) -> None:
        notice(f"serving {', '.join(engine.model_ids())} at http://{args.host}:{port}/v1")

    try:
        serve(engine, args.host, args.port, args.api_key, ready)
    finally:
        generator.close()
    return 0
