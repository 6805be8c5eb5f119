"""`cfm bench split`, `cfm bench privacy` and `cfm link`: the split and privacy benchmarks and the link emulator
(`cfm_bench`)."""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

from cfm_runtime.errors import CfmError


def add_parser(sub) -> None:
    add_link_parser(sub)
    b = sub.add_parser("bench", help="benchmarks on this machine")
    bsub = b.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bsub.add_parser("split", help="latency of local, split and center-only inference over emulated links")
    p.add_argument("--quick", action="store_true", help="2 cells, 1 split, few tokens (under 2 minutes)")
    p.add_argument("--out", default="split-bench", help="folder for split.json and the PNG plots (default split-bench)")
    p.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
    p.add_argument("--edge-threads", type=int, default=None, help="edge CPU threads (default 1: a slower device)")
    p.add_argument("--center-threads", type=int, default=None, help="center CPU threads (default 2)")
    p.add_argument("--rtt", default=None, metavar="MS,MS,..", help="RTT grid in ms (default 1,10,30,80,150)")
    p.add_argument("--rate", default=None, metavar="MBIT,..", help="bandwidth grid in Mbit/s (default 1,10,100)")
    p.add_argument("--decode-tokens", type=int, default=None, help="decode steps timed per run (default 16)")
    p.add_argument("--weights", choices=("int4", "fp32"), default=None,
                   help="the edge's and the center's weights (default int4, as `cfm generate` runs)")
    p.set_defaults(func=cmd_bench_split)
    add_privacy_parser(bsub)


def _numbers(text: str, flag: str) -> tuple:
    try:
        xs = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise CfmError(f"{flag} {text!r}: write comma-separated numbers, e.g. 1,10,100") from None
    if not xs or any(x <= 0 or not math.isfinite(x) for x in xs):
        raise CfmError(f"{flag} {text!r}: every value must be a positive number")
    return xs


def settings_from_args(args):
    from cfm_bench.split import QUICK, Settings  # the benchmark tooling: imported when a benchmark runs

    s = QUICK if args.quick else Settings()
    changes = {}
    if args.rtt:
        changes["rtts_ms"] = _numbers(args.rtt, "--rtt")
    if args.rate:
        changes["rates_mbit"] = _numbers(args.rate, "--rate")
    changes |= _counts(args, ("edge_threads", "center_threads", "decode_tokens"))
    if args.weights:
        changes["weights"] = args.weights
    return replace(s, **changes)


def _counts(args, names: tuple[str, ...]) -> dict:
    """The given flags among `names`, each checked >= 1."""
    out = {}
    for name in names:
        value = getattr(args, name)
        if value is not None:
            if value < 1:
                raise CfmError(f"--{name.replace('_', '-')} must be >= 1")
            out[name] = value
    return out


def _out_dir(args) -> Path:
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CfmError(f"--out {out} is a file; give a folder")
    return out


def cmd_bench_split(args) -> int:
    s = settings_from_args(args)
    out = _out_dir(args)
    from cfm_bench.split import run

    result = run(s, out, args.model)
    sm = result["summary"]
    print(json.dumps(sm, indent=1))
    print(f"wrote {out / 'split.json'} and {', '.join(result['plots'])} in {result['environment']['elapsed_s']} s")
    return 0


def add_privacy_parser(bsub) -> None:
    p = bsub.add_parser("privacy", help="what a center could recover from a split run's hidden states, and what "
                                        "private edge defences cost")
    p.add_argument("--quick", action="store_true", help="6 texts, split 2:28, one noise level (a few minutes)")
    p.add_argument("--budget", action="store_true", help="the grid of benchmarks/results/privacy.json: every split, "
                                                         "defences at 2:28, fewer texts (~30 min on 2 cores)")
    p.add_argument("--package-data", action="store_true",
                   help="also write the summary the planner quotes (cfm_runtime/data/privacy.json)")
    p.add_argument("--out", default="privacy-bench", help="folder for privacy.json and privacy.png (default privacy-bench)")
    p.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: every core)")
    p.add_argument("--per-kind", type=int, default=None, help="held-out texts per kind: chat, code, personal (default 12)")
    p.add_argument("--noise", default=None, metavar="S,S,..", help="noise levels relative to each row's norm (default 0.1,0.3,1)")
    p.add_argument("--brick-steps", type=int, default=None, help="training steps of the private brick (default 80; 0: none)")
    p.set_defaults(func=cmd_bench_privacy)


def privacy_settings_from_args(args):
    from cfm_bench.privacy import BUDGET, QUICK, Settings  # the benchmark tooling: imported when a benchmark runs

    if args.quick and args.budget:
        raise CfmError("--quick and --budget are two grids: give one")
    s = QUICK if args.quick else BUDGET if args.budget else Settings()
    changes = {}
    if args.noise is not None:
        changes["noises"] = _numbers(args.noise, "--noise") if args.noise else ()
    changes |= _counts(args, ("threads", "per_kind"))
    if args.brick_steps is not None:
        if args.brick_steps < 0:
            raise CfmError("--brick-steps must be >= 0 (0: no trained brick)")
        changes["trained_brick"] = args.brick_steps > 0
        if args.brick_steps:
            changes["brick"] = replace(s.brick, steps=args.brick_steps)
    return replace(s, **changes)


def cmd_bench_privacy(args) -> int:
    s = privacy_settings_from_args(args)
    out = _out_dir(args)
    from cfm_bench.privacy import run, write_package_data

    result = run(s, out, args.model)
    print(json.dumps(result["summary"], indent=1))
    if args.package_data:
        print(f"wrote {write_package_data(result)}")
    print(f"wrote {out / 'privacy.json'} and {', '.join(result['plots'])} in {result['environment']['elapsed_s']} s")
    return 0


def add_link_parser(sub) -> None:
    p = sub.add_parser("link", help="emulate a network link (delay, jitter, bandwidth, loss) as a TCP proxy")
    p.add_argument("--to", required=True, help="HOST:PORT to forward to (e.g. the center)")
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT to listen on (default 127.0.0.1:0)")
    p.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay (RTT is twice this)")
    p.add_argument("--jitter-ms", type=float, default=0.0)
    p.add_argument("--rate-mbit", type=float, default=None, help="bandwidth cap in Mbit/s (default unlimited)")
    p.add_argument("--loss", type=float, default=0.0, help="probability a segment needs a retransmission")
    p.add_argument("--check", action="store_true", help="measure the link against its own settings and exit")
    p.set_defaults(func=cmd_link)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise CfmError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def cmd_link(args) -> int:
    from cfm_bench.link import LinkEmulator, LinkSpec, measure

    spec = LinkSpec(args.delay_ms, args.jitter_ms, args.rate_mbit, args.loss)
    if args.check:
        print(json.dumps({"requested": {"rtt_ms": 2 * spec.delay_ms, "rate_mbit": spec.rate_mbit},
                          "measured": measure(spec)}, indent=2))
        return 0
    link = LinkEmulator(_hostport(args.to), spec, _hostport(args.listen))
    port = link.start()
    print(f"link 127.0.0.1:{port} -> {args.to}: {spec}", file=sys.stderr, flush=True)
    try:
        while True:
            time.sleep(3600)
    finally:
        link.stop()
