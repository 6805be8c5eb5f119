"""The `cfm` command: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import sys

from cfm_runtime.errors import CfmError
from edge import bench_split, bricks_cli, link, serve_cli, split_cli
from edge import analyze_cli
from edge import profile_cli


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=None,
                   help="GGUF file or Hugging Face folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores available)")
    bricks_cli.add_bricks_arg(p)
    profile_cli.add_sparse_args(p)
    p.add_argument("--weights", choices=("fp32", "int8", "int4"), default=None,
                   help="weight format of the layers: int4 re-packs Q4_1 exactly and decodes fastest (default: "
                        "int4 when running locally, fp32 with --center, --sparse or --ram-budget)")
    p.add_argument("--lm-head", choices=("fp32", "int8"), default=None,
                   help="LM head format (default: int8 with --weights int8/int4, else fp32)")


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-tokens", "-n", type=int, default=256, help="tokens to generate at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, help="0 disables (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, help="1 disables (default 0.95)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="1 disables (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling (default: random)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def sampling_options(args) -> dict:
    return dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cfm", description="Configurable foundation models on small machines.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    g.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads standard input)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, speeds, memory)")
    g.add_argument("--stats", action="store_true", help="print speed and memory to standard error")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (KV cache kept between turns)")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    add_sampling_args(c)
    c.add_argument("--stats", action="store_true", help="print speed after each answer")
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="model metadata, sizes and memory needed")
    add_model_args(i)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    # Subsystems register their own subcommands here, one line each: module.add_parser(sub)
    analyze_cli.add_parser(sub)
    bricks_cli.add_parser(sub)
    profile_cli.add_parser(sub)
    serve_cli.add_parser(sub)
    link.add_parser(sub)
    split_cli.add_parser(sub)
    bench_split.add_parser(sub)
    return parser


def runtime_options(args) -> dict:
    """Options of `add_model_args` passed on to load_model (each feature adds its own here)."""
    sparse = profile_cli.sparse_options(args)
    return {"weights": args.weights or default_weights(args, sparse), "lm_head": args.lm_head, **sparse}


def default_weights(args, sparse: dict) -> str:
    """int4 (exact Q4_1 weights, +0.0-0.3% perplexity from int8 activations, ~5x faster decode than fp32;
    benchmarks/bench_decode.py) where it applies:
    the sparse FFN and a center's fingerprint check work on the fp32 weights."""
    return "fp32" if sparse or getattr(args, "center", None) else "int4"


def load(args):
    from cfm_runtime import load_model

    model = load_model(args.model, threads=args.threads, **runtime_options(args))
    fused = getattr(model.transformer, "fused", None)
    if fused is not None:  # the native decode kernel: compiled on the first run (cfm_runtime/kernels/native.py)
        from cfm_runtime.kernels import native

        native.load(notice=lambda: print("building the native decode kernel (first run only, about a minute)...",
                                         file=sys.stderr, flush=True))
    bricks_cli.apply_args(args, model)
    return model


def new_generator(args, model):
    """The generator for a run: local by default (features that change where layers run hook in here)."""
    if getattr(args, "center", None):
        return bricks_cli.wrap_generator(args, model, split_cli.new_generator(args, model))
    return bricks_cli.wrap_generator(args, model, model.new_generator())


def chat_messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CfmError("the prompt is empty; pass --prompt TEXT")
    model = load(args)
    request = chat_messages(prompt, args.system) if args.chat else prompt
    pieces, tokens, stats = [], 0, None
    for chunk in model.stream(request, generator=new_generator(args, model), **sampling_options(args)):
        stats = chunk.stats
        if chunk.text:
            pieces.append(chunk.text)
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    tokens = stats.generated_tokens
    if args.json:
        print(json.dumps({"text": "".join(pieces), "tokens": tokens, **stats.to_dict()}))
    else:
        sys.stdout.write("\n")
    if args.stats:
        print_stats(stats)
    return 0


def print_stats(stats) -> None:
    d = stats.to_dict()
    print(f"[prompt {d['prompt_tokens']} tok ({d['cached_tokens']} cached) at {d['prompt_tps']:.1f} tok/s | "
          f"generated {d['generated_tokens']} tok at {d['decode_tps']:.1f} tok/s | "
          f"peak RSS {d['peak_rss_mb']:.0f} MB | finish {d['finish_reason']}]", file=sys.stderr)
    if "split" in stats.extra:
        print(split_cli.format_report(stats.extra["split"]), file=sys.stderr)
    if "sparse" in stats.extra:
        print(profile_cli.format_report(stats.extra["sparse"]), file=sys.stderr)


def cmd_chat(args) -> int:
    model = load(args)
    generator = new_generator(args, model)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat with the model; /reset starts over, /exit or Ctrl-D quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": text})
        reply = []
        try:
            for chunk in model.stream(messages, generator=generator, **sampling_options(args)):
                stats = chunk.stats
                reply.append(chunk.text)
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        except CfmError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        messages.append({"role": "assistant", "content": "".join(reply)})
        if args.stats:
            print_stats(stats)
    return 0


def cmd_info(args) -> int:
    model = load(args)
    info = model.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    print(f"model        {info['name']}  ({info['format']}, {info['path']})")
    print(f"architecture {c['arch']}: {c['n_layers']} layers, d_model {c['d_model']}, FFN {c['d_ff']} "
          f"({c['activation']}), heads {c['n_heads']}/{c['n_kv_heads']} KV, head dim {c['head_dim']}")
    print(f"vocabulary   {c['vocab_size']} tokens; context {c['context_length']}; rope base {c['rope_base']:g} "
          f"({c['rope_style']}); tied embeddings: {c['tied_embeddings']}")
    print(f"parameters   {info['parameters'] / 1e6:.1f} M; file {info['file_mb']} MB; "
          f"fp32 weights in RAM {info['weights_fp32_mb']} MB")
    print(f"KV cache     {info['kv_cache_mb_per_1k_tokens']} MB per 1k tokens; "
          f"{info['kv_cache_mb_full_context']} MB at full context")
    print(f"chat template {'yes' if info['chat_template'] else 'no'}")
    return 0


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
