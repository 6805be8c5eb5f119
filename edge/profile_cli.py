"""`cfm profile`: build a model's neuron pack; the shared sparse/offload flags and their report line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


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


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram-budget", type=float, default=None, metavar="MB",
                   help="offload the FFN: keep MB of FFN weights in RAM, stream the rest from the neuron pack")
    p.add_argument("--sparse", action="store_true", help="compute only predicted FFN neurons when decoding")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="mean fraction of FFN neurons computed with --sparse (default 0.6)")
    p.add_argument("--sparse-strategy", choices=("dense", "oracle", "predictor"), default=None,
                   help="neuron selection: dense, oracle (true top-k, for measurement), predictor")
    p.add_argument("--predictor", choices=("int4", "lowrank"), default=None,
                   help="neuron predictor for --sparse (default: int4 unless it takes over half of --ram-budget)")
    p.add_argument("--density-plan", choices=("planned", "uniform"), default=None,
                   help="per-layer densities from the pack's sensitivity table (default) or the same for every layer")
    p.add_argument("--pack", default=None, metavar="DIR", help="neuron pack directory (default: per-model cache)")


def sparse_options(args) -> dict:
    opts = {k: getattr(args, k, None) for k in ("ram_budget", "density", "sparse_strategy", "pack", "predictor",
                                                 "density_plan")}
    out = {"ram_budget_mb": opts["ram_budget"], "density": opts["density"],
           "sparse_strategy": opts["sparse_strategy"], "pack": opts["pack"], "predictor": opts["predictor"],
           "density_plan": opts["density_plan"]}
    if getattr(args, "sparse", False):
        out["sparse"] = True
    return {k: v for k, v in out.items() if v is not None}


def format_report(r: dict) -> str:
    hit = "n/a" if r.get("cache_hit_rate") is None else f"{100 * r['cache_hit_rate']:.0f}%"
    budget = (f" | FFN weights {r['ffn_weights_mb']} MB of {r['ram_budget_mb']:g} MB budget (hot {r['hot_mb']}, "
              f"cache {r['cache_mb']}, staging {r['staging_mb']}, work {r.get('work_mb', 0)}, "
              f"predictors {r['predictors_mb']})"
              if "ram_budget_mb" in r else "")
    return (f"[sparse {r['strategy']} density {r['density_mean']} | neurons computed {r['neurons_computed_pct']}% | "
            f"flash {r['flash_mb_per_token']} MB/token in {r['flash_reads_per_token']} reads | cache hits {hit} | "
            f"RSS {r['rss_mb']:.0f} MB, fixed overhead {r['fixed_overhead_mb']:.0f} MB{budget}]")


def cmd_profile(args) -> int:
    from cfm_runtime.loading import resolve_model_path
    from cfm_runtime.runtime import load_model
    from cfm_runtime.sparse.load import pack_dir, source_digest
    from cfm_runtime.sparse.profile import build_pack

    path = resolve_model_path(args.model)
    digest = source_digest(path)
    root = Path(args.out) if args.out else pack_dir(path, digest)
    model = load_model(path, threads=args.threads)
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
