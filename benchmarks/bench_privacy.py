"""What a center could recover from a split run's hidden states, and what private edge defences cost:
`cfm bench privacy` as a script.

    python benchmarks/bench_privacy.py --budget [--threads N] [--out DIR]     # default DIR: benchmarks/results

Writes privacy.json (every measurement, the settings and the environment) and privacy.png, and with the default
DIR the summary the planner quotes (cfm_runtime/data/privacy.json); see cfm_bench/privacy.py and docs/privacy.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cfm_cli.main import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    if "--out" not in argv:
        argv += ["--out", str(Path(__file__).parent / "results"), "--package-data"]
    sys.exit(main(["bench", "privacy", *argv]))
