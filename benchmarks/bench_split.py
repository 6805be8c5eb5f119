"""Latency of local, split and center-only inference over emulated links: `cfm bench split` as a script.

    python benchmarks/bench_split.py [--quick] [--out DIR]     # default DIR: benchmarks/results/split

Writes split.json (every measurement and the environment) and PNG plots; see cfm_bench/split.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfm_cli.main import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "results" / "split")]
    sys.exit(main(["bench", "split", *argv]))
