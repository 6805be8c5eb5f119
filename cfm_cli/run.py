"""`cfm generate`, `cfm chat`, `cfm info`: run the model here (or split with a center)."""

from __future__ import annotations

import json
import sys

from cfm_runtime.errors import CfmError

from .common import (add_center_args, add_model_args, add_sampling_args, load, print_stats, run_options,
                     sampling_options)


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(g)
    g.add_argument("--prompt", "-p", required=True, help="prompt text ('-' reads standard input)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user message in the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    add_sampling_args(g)
    g.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, speeds, memory)")
    g.add_argument("--stats", action="store_true", help="print speed and memory to standard error")
    add_center_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (KV cache kept between turns)")
    add_model_args(c)
    c.add_argument("--system", default=None, help="system message")
    add_sampling_args(c)
    c.add_argument("--stats", action="store_true", help="print speed after each answer")
    add_center_args(c)
    c.set_defaults(func=cmd_chat)

    i = sub.add_parser("info", help="model metadata, sizes and memory needed")
    add_model_args(i, bricks=False)
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)


def chat_messages(text: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def cmd_generate(args) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not prompt.strip():
        raise CfmError("the prompt is empty; pass --prompt TEXT")
    run = run_options(args)
    model = load(args)
    generator = model.new_generator(run)
    request = chat_messages(prompt, args.system) if args.chat else prompt
    pieces, stats = [], None
    try:
        for chunk in model.stream(request, generator=generator, **sampling_options(args)):
            stats = chunk.stats
            if chunk.text:
                pieces.append(chunk.text)
                if not args.json:
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
    finally:
        generator.close()
    if args.json:
        print(json.dumps({"text": "".join(pieces), "tokens": stats.generated_tokens, **stats.to_dict()}))
    else:
        sys.stdout.write("\n")
    if args.stats:
        print_stats(stats)
    return 0


def cmd_chat(args) -> int:
    run = run_options(args)
    model = load(args)
    generator = model.new_generator(run)
    try:
        return _chat_loop(args, model, generator)
    finally:
        generator.close()


def _chat_loop(args, model, generator) -> int:
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
    info = load(args).info()
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
    print(f"running as   {info['weights']} weights, {info['backend']} backend")
    return 0
