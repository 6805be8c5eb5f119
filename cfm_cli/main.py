"""The `cfm` command: one entry point, one subcommand (or group) per job, each in its own module."""

from __future__ import annotations

import argparse
import sys

from cfm_runtime.errors import CfmError

from . import analyze, bench, bricks, center, plan, profile, run, serve


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfm", description="Configurable foundation models on small machines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (run, serve, bricks, profile, analyze, center, plan, bench):
        group.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CfmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
