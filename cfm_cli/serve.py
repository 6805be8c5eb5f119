"""`cfm serve`: the OpenAI-compatible HTTP API of this device (`edge.server`)."""

from __future__ import annotations

from cfm_runtime.errors import CfmError
from cfm_runtime.protocol.net import is_loopback

from .common import add_center_args, add_model_args, load, notice, run_options


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP API (chat/completions, completions, models)")
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    p.add_argument("--port", type=int, default=8000, help="port (0 picks a free one; default 8000)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (required off loopback)")
    p.add_argument("--max-queue", type=int, default=32,
                   help="requests waiting for the model at most; more are answered 429 with Retry-After (default 32)")
    p.add_argument("--max-body-kb", type=int, default=1024,
                   help="largest request body in KiB; larger ones are answered 413 (default 1024)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests whose Host is NAME (repeatable; on loopback only loopback names "
                        "are answered otherwise, against DNS rebinding)")
    add_center_args(p)
    p.set_defaults(func=cmd_serve)


def check_args(args) -> None:
    """The serve flags' own rules, before the model loads."""
    problems = []
    if args.max_queue < 0:
        problems.append(f"--max-queue must be >= 0, got {args.max_queue}")
    if args.max_body_kb < 1:
        problems.append(f"--max-body-kb must be >= 1, got {args.max_body_kb}")
    if problems:
        raise CfmError("; ".join(problems))


def cmd_serve(args) -> int:
    from edge.server import Engine, model_id, serve  # the HTTP stack (fastapi, uvicorn): imported when it serves

    check_args(args)
    if not is_loopback(args.host) and not args.api_key:
        raise CfmError(f"listening on {args.host} exposes the model beyond this machine; pass --api-key KEY")
    run = run_options(args)
    model = load(args)
    generator = model.new_generator(run)
    engine = Engine(model, generator, model_id(model), generator.bricks.offered(), max_queue=args.max_queue)

    def ready(port: int) -> None:
        notice(f"serving {', '.join(engine.model_ids())} at http://{args.host}:{port}/v1")

    try:
        serve(engine, args.host, args.port, args.api_key, ready, allow_hosts=args.allow_host,
              max_body_bytes=args.max_body_kb * 1024)
    finally:
        generator.close()
    return 0
