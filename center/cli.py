"""`cfm center serve`: run a center from the command line."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from cfm_runtime.errors import CfmError


def add_parser(sub) -> None:
    c = sub.add_parser("center", help="run a center server (the shared middle layers over gRPC)")
    csub = c.add_subparsers(dest="center_command", required=True, metavar="ACTION")
    s = csub.add_parser("serve", help="serve a span of layers to edges")
    s.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder (default: the embedded model)")
    s.add_argument("--threads", "-t", type=int, default=None, help="CPU threads (default: all cores available)")
    s.add_argument("--layers", default=None, help="span START:END of layers to serve (default: all but 2 at each end)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=50051, help="port (default 50051; 0 picks a free one)")
    s.add_argument("--token-file", default=None,
                   help="require bearer tokens listed in this file (one per line); env CFM_CENTER_TOKENS also works")
    s.add_argument("--tls-cert", default=None, help="PEM certificate chain: serve TLS (with --tls-key)")
    s.add_argument("--tls-key", default=None, help="PEM private key for --tls-cert")
    s.add_argument("--max-sessions", type=int, default=64, help="sessions alive at once (default 64)")
    s.add_argument("--max-kv-mb", type=float, default=2048, help="KV cache budget of all sessions, MiB (default 2048)")
    s.add_argument("--idle-timeout", type=float, default=300, help="seconds before an idle session is freed (default 300)")
    s.add_argument("--max-batch", type=int, default=32, help="decode steps computed together at most (default 32)")
    s.set_defaults(func=cmd_serve)
    from .deploy_cli import add_parsers  # deploy, status: the center on Ray Serve (center/ray_serve.py)

    add_parsers(csub)


def _tls(args) -> tuple[bytes, bytes] | None:
    if not args.tls_cert and not args.tls_key:
        return None
    if not (args.tls_cert and args.tls_key):
        raise CfmError("TLS needs both --tls-cert and --tls-key")
    for p in (args.tls_cert, args.tls_key):
        if not Path(p).is_file():
            raise CfmError(f"{p} does not exist")
    return Path(args.tls_key).read_bytes(), Path(args.tls_cert).read_bytes()


def _interrupt(signum, frame):
    raise KeyboardInterrupt  # SIGTERM stops the server like Ctrl-C


def cmd_serve(args) -> int:
    from cfm_runtime import load_model

    from .interceptor import Tokens
    from .server import CenterLimits, CenterServer, parse_span

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tokens, tls = Tokens.load(args.token_file), _tls(args)
    for name in ("max_sessions", "max_batch"):
        if getattr(args, name) < 1:
            raise CfmError(f"--{name.replace('_', '-')} must be >= 1")
    model = load_model(args.model, threads=args.threads)
    span = parse_span(args.layers, model.config.n_layers)
    limits = CenterLimits(max_sessions=args.max_sessions, max_kv_mb=args.max_kv_mb,
                          idle_timeout_s=args.idle_timeout, max_batch=args.max_batch)
    server = CenterServer(model, span, args.host, args.port, limits, tokens, tls).start()
    print(f"center serving layers {span[0]}:{span[1]} of {model.config.name} on {server.address} "
          f"({'TLS' if tls else 'plaintext'}, {'token auth' if tokens else 'no auth'}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    print(f"listening {server.address}", flush=True)  # machine-readable line (port 0 -> the real port)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(grace=2)
    return 0
