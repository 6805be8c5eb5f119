"""What every command group shares: the model, sampling, sparse, brick and center flags, turned into the
library's typed options at this boundary (no argparse namespace goes into library code), and the
telemetry lines printed with --stats."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from cfm_runtime import CenterOptions, LoadOptions, RunOptions, SparseOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.options import parse_spec
from cfm_runtime.kernels import native


def notice(message: str) -> None:
    """A user-facing line on standard error (progress, choices the library made)."""
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- model and load options


def add_model_args(p: argparse.ArgumentParser, bricks: bool = True, sparse: bool = True) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores available)")
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default=None,
                   help="weight format of the layers: int4 re-packs Q4_1 exactly and decodes fastest (default: "
                        "int4; fp32 with --sparse and --ram-budget or --predictor lowrank)")
    p.add_argument("--lm-head", choices=("fp32", "int8"), default=None,
                   help="LM head format (default: int8 with --weights int8/int4, else fp32)")
    if bricks:
        add_brick_args(p)
    if sparse:
        add_sparse_args(p)


def add_sparse_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ram-budget", type=ram_budget, default=None, metavar="MB|auto",
                   help="keep MB of weights in RAM and read the rest from the model file each token (int4; with "
                        "--weights fp32: MB of FFN weights, the rest from the neuron pack); auto: what the memory "
                        "limit leaves, which a plain run also uses when the model would not fit")
    p.add_argument("--sparse", action="store_true",
                   help="compute only the FFN neurons of largest activation (int4: every position, in the native "
                        "kernel; --weights fp32: predicted neurons when decoding, from the neuron pack)")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="mean fraction of FFN neurons computed with --sparse (default 0.6)")
    p.add_argument("--sparse-strategy", choices=("dense", "oracle", "predictor"), default=None,
                   help="neuron selection: dense, oracle (true top-k, for measurement), predictor")
    p.add_argument("--predictor", choices=("int4", "lowrank"), default=None,
                   help="neuron predictor of the fp32 sparse FFN (default: int4 unless it takes over half of "
                        "--ram-budget; the int4 path selects exactly)")
    p.add_argument("--density-plan", choices=("planned", "uniform"), default=None,
                   help="per-layer densities from the pack's sensitivity table (default) or the same for every layer")
    p.add_argument("--pack", default=None, metavar="DIR", help="neuron pack directory (default: per-model cache)")


def ram_budget(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a number of MB or 'auto', not {text!r}") from None


def sparse_options(args) -> SparseOptions:
    return SparseOptions(ram_budget_mb=getattr(args, "ram_budget", None), sparse=getattr(args, "sparse", False),
                         density=getattr(args, "density", None), strategy=getattr(args, "sparse_strategy", None),
                         pack=getattr(args, "pack", None), predictor=getattr(args, "predictor", None),
                         density_plan=getattr(args, "density_plan", None))


def load_options(args, **changes) -> LoadOptions:
    """The model flags of `add_model_args` as LoadOptions (`changes` override them)."""
    values = dict(threads=args.threads, weights=getattr(args, "weights", None),
                  lm_head=getattr(args, "lm_head", None), sparse=sparse_options(args))
    return LoadOptions(**(values | changes))


def load(args, **changes):
    """Load the model the flags describe; says so when the native kernel is compiled (where setup.py did not)."""
    native.load(notice=notice)
    return load_model(args.model, load_options(args, **changes))


# ---------------------------------------------------------------- run options: bricks and a center


def add_brick_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bricks", default=None, metavar="NAMES|auto",
                   help="personal bricks to apply: NAME[:WEIGHT],... from the brick store, or 'auto' to pick "
                        "the best-matching brick (or none) for each prompt")
    p.add_argument("--brick-threshold", type=float, default=None, metavar="S",
                   help="with --bricks auto: lowest routing score that selects a brick (default 0.35)")


def parse_bricks(text: str | None) -> tuple[tuple[str, float], ...] | str | None:
    if not text or text == "auto":
        return text or None
    return tuple(parse_spec(s.strip()) for s in text.split(",") if s.strip())


def add_speculate_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--speculate", choices=("off", "lookup", "edge", "auto"), default="auto",
                   help="verify drafted tokens several per step (greedy output unchanged): 'lookup' drafts from "
                        "n-gram matches in the prompt and answer, 'edge' from this device's layers of a split, "
                        "'auto' (default) drafts by lookup where it is measured to pay, 'off' decodes one token "
                        "per step")


def add_center_args(p: argparse.ArgumentParser, required: bool = False) -> None:
    add_speculate_arg(p)
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
    g.add_argument("--min-edge-layers", type=int, default=1, metavar="N",
                   help="privacy floor: the planner keeps at least N layers here before the center (default 1; "
                        "measured recovery in docs/privacy.md)")


def parse_split(text: str) -> tuple[int, int] | str:
    if text in ("auto", "center"):
        return text
    try:
        a, b = (int(x) for x in text.split(":"))
    except ValueError:
        raise CfmError(f"--split {text!r}: write A:B (layers on the center), 'auto' or 'center'") from None
    return a, b


def center_options(args) -> CenterOptions | None:
    if not getattr(args, "center", None):
        return None
    ca = None
    if args.center_tls_ca:
        if not Path(args.center_tls_ca).is_file():
            raise CfmError(f"--center-tls-ca {args.center_tls_ca} does not exist")
        ca = Path(args.center_tls_ca).read_bytes()
    return CenterOptions(args.center, parse_split(args.split), wire=args.wire, timeout=args.center_timeout,
                         tls=args.center_tls, tls_ca=ca, min_edge_layers=args.min_edge_layers,
                         token=args.center_token or os.environ.get("CFM_CENTER_TOKEN") or None)


def run_options(args) -> RunOptions:
    """The bricks and center flags as RunOptions; the library's notices go to standard error."""
    return RunOptions(center=center_options(args), bricks=parse_bricks(getattr(args, "bricks", None)),
                      brick_threshold=getattr(args, "brick_threshold", None), log=notice,
                      speculate=getattr(args, "speculate", "auto"))


# ---------------------------------------------------------------- sampling


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from a token's logit once this answer has it, -2..2 (OpenAI's; default 0)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtracted per time this answer has the token, -2..2 (OpenAI's; default 0)")
    p.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit; -100 bans it (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-object", action="store_true",
                       help="answer with a JSON object (constrained decoding; OpenAI's json_object mode)")
    shape.add_argument("--json-schema", metavar="FILE|JSON",
                       help="answer with JSON valid against this schema (a file, or the schema's text)")
    shape.add_argument("--grammar-file", metavar="FILE",
                       help="answer following this grammar: GBNF (llama.cpp's format) or Lark")


def sampling_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
                presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                logit_bias=_logit_bias(args.logit_bias), grammar=_grammar(args))


def _logit_bias(specs: list[str]) -> dict[int, float]:
    bias = {}
    for spec in specs:
        tid, sep, value = spec.partition("=")
        try:
            bias[int(tid)] = float(value)
        except ValueError:
            raise CfmError(f"--logit-bias takes ID=BIAS (a token id and a number), got {spec!r}") from None
    return bias


def _grammar(args):
    if not (args.json_object or args.json_schema or args.grammar_file):
        return None
    from cfm_runtime.grammar import Grammar

    if args.json_object:
        return Grammar.json_object()
    if args.grammar_file:
        try:
            return Grammar.text(Path(args.grammar_file).read_text(), f"--grammar-file {args.grammar_file}")
        except OSError as e:
            raise CfmError(f"--grammar-file: cannot read {args.grammar_file}: {e.strerror}") from None
    text = args.json_schema
    if not text.lstrip().startswith("{"):
        try:
            text = Path(text).read_text()
        except OSError as e:
            raise CfmError(f"--json-schema: cannot read {args.json_schema}: {e.strerror}") from None
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise CfmError(f"--json-schema is not JSON: {e}") from None
    return Grammar.json_schema(schema, name=args.json_schema if text is not args.json_schema else "--json-schema")


# ---------------------------------------------------------------- telemetry lines


def print_stats(stats) -> None:
    d = stats.to_dict()
    print(f"[prompt {d['prompt_tokens']} tok ({d['cached_tokens']} cached) at {d['prompt_tps']:.1f} tok/s | "
          f"generated {d['generated_tokens']} tok at {d['decode_tps']:.1f} tok/s | "
          f"peak RSS {d['peak_rss_mb']:.0f} MB | finish {d['finish_reason']}]", file=sys.stderr)
    if "split" in stats.extra:
        print(format_split_report(stats.extra["split"]), file=sys.stderr)
    if "sparse" in stats.extra:
        print(format_sparse_report(stats.extra["sparse"]), file=sys.stderr)
    if "sparse_ffn" in stats.extra:
        r = stats.extra["sparse_ffn"]
        print(f"[sparse FFN (native kernel) density {r['density']} ({r['min_density']}-{r['max_density']}) on "
              f"{r['layers_sparse']} layers | down columns {r['down_columns_mb']} MB]", file=sys.stderr)
    if "ram_budget" in stats.extra:
        print(format_budget_report(stats.extra["ram_budget"]), file=sys.stderr)
    if "speculative" in stats.extra:
        print(format_speculative_report(stats.extra["speculative"], "split" in stats.extra), file=sys.stderr)


def format_split_report(r: dict) -> str:
    segs = " ".join(f"{s}-{e}:{w}" for s, e, w in r["segments"])
    falls = "; ".join(f"at {f['position']}: {f['reason']}" for f in r["fallbacks"])
    return (f"[split: center {r['center']} layers {r['layers']['center']}, edge {r['layers']['edge']}, wire {r['wire']} | "
            f"positions center {r['positions_center']} local {r['positions_local']} ({segs}) | "
            f"round trip {r['round_trip_ms']} ms, center compute {r['center_compute_ms']} ms, "
            f"batch {r['center_batch_mean']} | reconnects {r['reconnects']}, replays {r.get('replays', 0)}"
            + (f" | FALLBACK {falls}" if falls else "") + "]" + (f"\n[{r['privacy']}]" if r.get("privacy") else ""))


def format_speculative_report(r: dict, split: bool) -> str:
    rate = "n/a" if r["acceptance_rate"] is None else f"{100 * r['acceptance_rate']:.0f}%"
    per_step = "n/a" if r["tokens_per_step"] is None else f"{r['tokens_per_step']:.2f}"
    where = " (one round trip each while the center serves)" if split else ""
    return (f"[speculate {r['mode']} ({r['drafter']}) | {r['steps']} steps{where}, {per_step} tokens per step | "
            f"drafted {r['drafted']}, accepted {r['accepted']} ({rate})]")


def format_budget_report(r: dict) -> str:
    held = ", ".join(f"{k} {v}" for k, v in r["held_mb"].items())
    read = (f" | read {r['read_mb']} MB in {r['reads']} reads, waited {r['read_wait_s']} s"
            if "read_mb" in r else "")
    return (f"[RAM budget {r['ram_budget_mb']:g} MB | held MB: {held} ({r['held_layers']} of {r['layer_room']} "
            f"layers, head "
            f"{'held' if r['head_held'] else 'streamed'}) | {r['streamed_mb_per_pass']} MB read from the file "
            f"per pass{' (direct I/O)' if r['direct_io'] else ''}{read}]")


def format_sparse_report(r: dict) -> str:
    hit = "n/a" if r.get("cache_hit_rate") is None else f"{100 * r['cache_hit_rate']:.0f}%"
    budget = (f" | FFN weights {r['ffn_weights_mb']} MB of {r['ram_budget_mb']:g} MB budget (hot {r['hot_mb']}, "
              f"cache {r['cache_mb']}, staging {r['staging_mb']}, work {r.get('work_mb', 0)}, "
              f"down tables {r.get('down_tables_mb', 0)}, predictors {r['predictors_mb']})"
              if "ram_budget_mb" in r else "")
    return (f"[sparse {r['strategy']} density {r['density_mean']} | neurons computed {r['neurons_computed_pct']}% | "
            f"flash {r['flash_mb_per_token']} MB/token in {r['flash_reads_per_token']} reads | cache hits {hit} | "
            f"RSS {r['rss_mb']:.0f} MB, fixed overhead {r['fixed_overhead_mb']:.0f} MB{budget}]")
