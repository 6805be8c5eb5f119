"""CLI wiring of the center–edge split: `cfm center serve`, `cfm plan`, and `--center` on generate/chat."""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

from cfm_runtime.errors import CfmError


def add_parser(sub) -> None:
    from center import cli as center_cli

    center_cli.add_parser(sub)
    for name in ("generate", "chat"):
        if name in sub.choices:
            add_center_args(sub.choices[name])
    p = sub.add_parser("plan", help="measure the link to a center and propose a split (or local-only)")
    p.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores available)")
    add_center_args(p, required=True)
    p.add_argument("--json", action="store_true", help="print the plan and measurements as JSON")
    p.set_defaults(func=cmd_plan)


def add_center_args(p, required: bool = False) -> None:
    g = p.add_argument_group("split with a center")
    g.add_argument("--center", required=required, default=None, metavar="HOST:PORT",
                   help="run the middle layers on this center; falls back to local layers if it fails")
    if required:
        p.set_defaults(split="auto")
    else:
        g.add_argument("--split", default="auto", metavar="A:B|auto|center",
                       help="layers A:B on the center; 'auto' asks the planner (default), 'center' takes its whole span")
    g.add_argument("--wire", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="hidden states on the wire: fp32 exact (default), fp16/bf16 half the bytes")
    g.add_argument("--center-token", default=None,
                   help="bearer token for the center (default: env CFM_CENTER_TOKEN)")
    g.add_argument("--center-tls", action="store_true", help="connect with TLS (system roots)")
    g.add_argument("--center-tls-ca", default=None, metavar="PEM", help="connect with TLS trusting this CA file")
    g.add_argument("--center-timeout", type=float, default=10.0,
                   help="seconds to wait for the center per step before finishing locally (default 10)")


def split_options(args) -> dict:
    ca = None
    if args.center_tls_ca:
        if not Path(args.center_tls_ca).is_file():
            raise CfmError(f"--center-tls-ca {args.center_tls_ca} does not exist")
        ca = Path(args.center_tls_ca).read_bytes()
    if args.center_timeout <= 0:
        raise CfmError("--center-timeout must be > 0")
    return dict(wire=args.wire, timeout=args.center_timeout, tls=args.center_tls, tls_ca=ca,
                token=args.center_token or os.environ.get("CFM_CENTER_TOKEN") or None)


def parse_split(text: str) -> tuple[int, int] | str:
    if text in ("auto", "center"):
        return text
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise CfmError(f"--split {text!r}: write A:B (layers on the center), 'auto' or 'center'") from None
    return a, b


def _client(args, opts):
    from .center_client import CenterClient

    return CenterClient(args.center, opts["token"], opts["tls_ca"], opts["tls"], opts["timeout"])


def new_generator(args, model):
    """The generator for --center: split per --split (the planner by default), local if it says so."""
    from .center_client import CenterFailure
    from .planner import plan
    from .split import SplitGenerator, SplitOptions, SplitRunner

    opts, split = split_options(args), parse_split(args.split)
    if split == "auto":
        try:
            p = plan(model, _client(args, opts), args.wire)
        except CenterFailure as e:
            print(f"[split: center {args.center} unreachable ({e}); running locally, will reconnect]", file=sys.stderr)
            split = None
        else:
            print(f"[{p.describe()}]", file=sys.stderr)
            if p.split is None:
                return model.new_generator()
            split = p.split
    runner = SplitRunner(model, args.center, None if split == "center" else split, SplitOptions(**opts))
    atexit.register(runner.close)  # frees the session's KV cache on the center now, not at idle expiry
    return SplitGenerator(runner, model.tokenizer, model.config.context_length)


def format_report(r: dict) -> str:
    segs = " ".join(f"{s}-{e}:{w}" for s, e, w in r["segments"])
    falls = "; ".join(f"at {f['position']}: {f['reason']}" for f in r["fallbacks"])
    return (f"[split: center {r['center']} layers {r['layers']['center']}, edge {r['layers']['edge']}, wire {r['wire']} | "
            f"positions center {r['positions_center']} local {r['positions_local']} ({segs}) | "
            f"round trip {r['round_trip_ms']} ms, center compute {r['center_compute_ms']} ms, "
            f"batch {r['center_batch_mean']} | reconnects {r['reconnects']}, replays {r.get('replays', 0)}"
            + (f" | FALLBACK {falls}" if falls else "") + "]")


def cmd_plan(args) -> int:
    from cfm_runtime import load_model

    from .center_client import CenterFailure
    from .planner import plan

    model = load_model(args.model, threads=args.threads)
    try:
        p = plan(model, _client(args, split_options(args)), args.wire)
    except CenterFailure as e:
        raise CfmError(f"cannot reach the center at {args.center}: {e}") from None
    print(json.dumps(p.to_dict(), indent=2) if args.json else p.describe())
    return 0
