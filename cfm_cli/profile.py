"""`cfm profile`: profile a model on calibration text and build its neuron pack (sparse FFN, offload)."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from cfm_runtime import LoadOptions, load_model
from cfm_runtime.loading import resolve_model_path


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="profile a model on calibration text and build its neuron pack")
    p.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder (default: embedded model)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores available)")
    p.add_argument("--calib", nargs="+", default=None, metavar="FILE",
                   help="calibration text files (default: the shipped set: prose, code, math, chat, languages)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="pack directory (default: $CFM_HOME/packs/ or ~/.cache/cfm/packs/, named by the model)")
    p.add_argument("--chat-answers", type=int, default=4, help="the model's own chat answers added to the set")
    p.add_argument("--max-tokens", type=int, default=None, help="use at most this many calibration tokens")
    p.add_argument("--json", action="store_true", help="print the manifest summary as JSON")
    p.set_defaults(func=cmd_profile)


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops a build like Ctrl-C: its partial folder is removed


def cmd_profile(args) -> int:
    from cfm_runtime.sparse import build_pack, pack_dir, source_digest  # torch: only for this command

    signal.signal(signal.SIGTERM, _interrupt)
    path = resolve_model_path(args.model)
    digest = source_digest(path)
    root = Path(args.out) if args.out else pack_dir(path, digest)
    model = load_model(path, LoadOptions(threads=args.threads, weights="fp32"))  # profiled on the dense weights
    build_pack(model, root, source_digest=digest, calib_files=args.calib, chat_answers=args.chat_answers,
               max_tokens=args.max_tokens)
    man = json.loads((root / "manifest.json").read_text())
    recall = [layer["recall"]["0.5"]["recall"] for layer in man["layers"]]
    summary = {"pack": str(root), "fingerprint": man["fingerprint"], "tokens": man["calibration"]["tokens"],
               "neurons_mb": round(man["files"]["neurons.bin"]["bytes"] / 2**20, 1),
               "predictor_recall_at_0.5": [round(r, 3) for r in recall], "build_seconds": man["build_seconds"]}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"wrote {root} ({summary['neurons_mb']} MB of neurons, {summary['tokens']} calibration tokens, "
              f"{summary['build_seconds']} s)", file=sys.stderr)
        print("predictor recall at density 0.5 per layer: " + " ".join(f"{r:.2f}" for r in recall), file=sys.stderr)
    return 0
