"""`cfm center serve|deploy|status|undeploy`: a center in one process, or as a Ray Serve application."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from pathlib import Path

from cfm_runtime import LoadOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.protocol.net import is_loopback
from cfm_runtime.protocol.spans import parse_span


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
    s.add_argument("--insecure", action="store_true",
                   help="allow listening beyond loopback without tokens (anyone who reaches the port may use it)")
    s.add_argument("--max-sessions", type=int, default=64, help="sessions alive at once (default 64)")
    s.add_argument("--max-kv-mb", type=float, default=2048,
                   help="KV cache memory all sessions may allocate, MiB (default 2048)")
    s.add_argument("--max-sessions-per-token", type=int, default=0,
                   help="sessions one token may hold (default: --max-sessions / the number of tokens)")
    s.add_argument("--max-kv-mb-per-token", type=float, default=0,
                   help="KV cache MiB one token's sessions may allocate (default: --max-kv-mb / the number of tokens)")
    s.add_argument("--idle-timeout", type=float, default=300, help="seconds before an idle session is freed (default 300)")
    s.add_argument("--error-grace", type=float, default=30,
                   help="seconds a session whose stream failed stays resumable before it is freed (default 30)")
    s.add_argument("--max-batch", type=int, default=32, help="decode steps computed together at most (default 32)")
    s.add_argument("--weights", choices=("fp32", "int8", "int4"), default="int4",
                   help="weight format of the served layers (default int4: batched native decode steps); edges of "
                        "any format match it (the same format on both ends keeps answers identical on fallback)")
    s.set_defaults(func=cmd_serve)
    add_ray_parsers(csub)


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


def _check_limits(args) -> None:
    problems = [f"--{name.replace('_', '-')} must be >= 1" for name in ("max_sessions", "max_batch")
                if getattr(args, name) < 1]
    problems += [f"--{name.replace('_', '-')} must be > 0" for name in ("max_kv_mb", "idle_timeout", "error_grace")
                 if not getattr(args, name) > 0]
    problems += [f"--{name.replace('_', '-')} must be >= 0 (0: an equal share per token)"
                 for name in ("max_sessions_per_token", "max_kv_mb_per_token") if getattr(args, name) < 0]
    if problems:
        raise CfmError("; ".join(problems))


def cmd_serve(args) -> int:
    from center.interceptor import Tokens  # the server (grpc.aio, health, reflection): imported when it runs
    from center.server import CenterLimits, CenterServer, check_exposure, map_large_buffers

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    tokens, tls = Tokens.load(args.token_file), _tls(args)
    _check_limits(args)
    check_exposure(args.host, tokens, args.insecure)  # before the model loads: a refusal is immediate
    map_large_buffers()  # KV blocks and step messages go back to the system when freed
    model = load_model(args.model, LoadOptions(threads=args.threads, weights=args.weights))
    span = parse_span(args.layers, model.config.n_layers)
    limits = CenterLimits(max_sessions=args.max_sessions, max_kv_mb=args.max_kv_mb,
                          idle_timeout_s=args.idle_timeout, max_batch=args.max_batch, error_grace_s=args.error_grace,
                          max_sessions_per_token=args.max_sessions_per_token,
                          max_kv_mb_per_token=args.max_kv_mb_per_token)
    server = CenterServer(model, span, args.host, args.port, limits, tokens, tls, insecure=args.insecure).start()
    print(f"center serving layers {span[0]}:{span[1]} of {model.config.name} on {server.address} "
          f"({'TLS' if tls else 'plaintext'}, {'token auth' if tokens else 'no auth'}); Ctrl-C stops",
          file=sys.stderr, flush=True)
    if tokens and not tls and not is_loopback(args.host):
        print("warning: tokens travel in the clear without TLS; give --tls-cert/--tls-key", file=sys.stderr,
              flush=True)
    print(f"listening {server.address}", flush=True)  # machine-readable line (port 0 -> the real port)
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.wait()
    except KeyboardInterrupt:
        server.stop(grace=2)
    print(f"center stopped: {server.servicer.engine.report()}", file=sys.stderr)
    return 0


def add_ray_parsers(csub) -> None:
    """Adds `deploy`, `status` and `undeploy` to the `cfm center` group."""
    d = csub.add_parser("deploy", help="run the center as a Ray Serve application (replicas, autoscaling, failover)")
    d.add_argument("--model", "-m", default=None, help="GGUF file or Hugging Face folder, same path on every node "
                   "(default: the embedded model)")
    d.add_argument("--layers", default=None, help="span START:END of layers to serve (default: all but 2 at each end)")
    n = d.add_mutually_exclusive_group()
    n.add_argument("--replicas", type=int, default=None, help="fixed number of replicas (default 1)")
    n.add_argument("--autoscale", default=None, metavar="MIN:MAX",
                   help="autoscale between MIN and MAX replicas on live sessions per replica")
    d.add_argument("--address", default=None, metavar="RAY_ADDRESS",
                   help="deploy onto this Ray cluster ('auto', HOST:6379, ray://HOST:10001) and return; "
                        "default: start a local Ray and serve until Ctrl-C")
    d.add_argument("--grpc-port", type=int, default=9000, help="port of Serve's gRPC proxy on every node (default 9000)")
    d.add_argument("--threads", "-t", type=int, default=1, help="CPU threads (and Ray CPUs) per replica (default 1)")
    d.add_argument("--weights", choices=("fp32", "int8", "int4"), default="int4",
                   help="weight format of the served layers (default int4)")
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started without --address")
    d.add_argument("--token-file", default=None,
                   help="require bearer tokens listed in this file (the path must exist on every node)")
    d.add_argument("--insecure", action="store_true",
                   help="deploy without --token-file although Serve's gRPC proxy listens on every interface")
    d.add_argument("--max-sessions", type=int, default=64, help="sessions one replica holds at once (default 64)")
    d.add_argument("--max-kv-mb", type=float, default=2048, help="KV cache budget per replica, MiB (default 2048)")
    d.add_argument("--session-positions", type=int, default=2048,
                   help="typical positions of one session: the KV budget / this = streams a replica accepts "
                        "(default 2048)")
    d.add_argument("--target-sessions", type=int, default=None,
                   help="live sessions per replica the autoscaler aims at (default 3/4 of the session cap)")
    d.add_argument("--idle-timeout", type=float, default=300, help="seconds before an idle session is freed (default 300)")
    d.add_argument("--max-batch", type=int, default=32, help="decode steps computed together at most (default 32)")
    d.set_defaults(func=cmd_deploy)
    s = csub.add_parser("status", help="per-replica sessions, KV bytes, steps/s and batch sizes of a deployed center")
    s.add_argument("--address", default="auto", metavar="RAY_ADDRESS", help="the Ray cluster (default: auto)")
    s.add_argument("--json", action="store_true", help="print JSON")
    s.set_defaults(func=cmd_status)
    u = csub.add_parser("undeploy", help="remove the center application, Serve and its stats actor from a Ray cluster")
    u.add_argument("--address", default="auto", metavar="RAY_ADDRESS", help="the Ray cluster (default: auto)")
    u.set_defaults(func=cmd_undeploy)


def app_args(args) -> dict:
    """CLI options -> the application args of center.ray_serve.build_app (the same keys as serve_config.yaml)."""
    out = {"model": args.model, "layers": args.layers, "threads": args.threads, "max_sessions": args.max_sessions,
           "max_kv_mb": args.max_kv_mb, "idle_timeout_s": args.idle_timeout, "max_batch": args.max_batch,
           "token_file": args.token_file, "session_positions": args.session_positions,
           "target_sessions": args.target_sessions, "weights": args.weights}
    if args.autoscale:
        out["autoscale"] = args.autoscale
    else:
        out["replicas"] = args.replicas or 1
    return out


def cmd_deploy(args) -> int:
    from center import ray_serve  # Ray (the optional extra `ray`) only for these commands

    ray_serve.parse_args(app_args(args))  # user errors before Ray starts
    if not 1 <= args.grpc_port <= 65535:
        raise CfmError("--grpc-port must be 1..65535")
    if not args.token_file and not args.insecure:  # the rule of `cfm center serve` beyond loopback
        raise CfmError(f"Serve's gRPC proxy listens on every interface of every node ([::]:{args.grpc_port}), so "
                       "without tokens anyone who reaches the port can use the center; pass --token-file FILE, "
                       "or --insecure to deploy without authentication")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    proxies = ray_serve.deploy(app_args(args), address=args.address, grpc_port=args.grpc_port, num_cpus=args.num_cpus)
    print(f"center deployed on Ray Serve in {time.perf_counter() - t0:.0f} s; edges connect with "
          f"--center HOST:{args.grpc_port} (Serve's gRPC proxy on {', '.join(proxies)})", file=sys.stderr, flush=True)
    print(f"listening {proxies[0]}:{args.grpc_port}", flush=True)  # machine-readable line
    if args.address:
        return 0  # the application lives on the cluster; `serve shutdown` removes it
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        ray_serve.shutdown()
    return 0


def cmd_status(args) -> int:
    from center import ray_serve  # Ray (the optional extra `ray`) only for these commands

    st = ray_serve.status(args.address)
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"application {st['application']}: {st['status']}  replicas {st['replica_states']}")
    cols = ("replica", "node", "pid", "sessions", "attached", "kv MiB", "steps/s", "pos/s", "batch", "age s")
    print("  ".join(f"{c:>10}" for c in cols))
    for r in st["replicas"]:
        row = (r["replica"], r["node"], r["pid"], r["sessions"], r["attached"], f"{r['kv_bytes'] / 2**20:.1f}",
               r["steps_per_s"], r["positions_per_s"], r["batch_mean"], f"{r['age_s']:.1f}")
        print("  ".join(f"{v!s:>10}" for v in row))
    return 0


def cmd_undeploy(args) -> int:
    import ray  # the optional extra `ray`, only for these commands

    from center import ray_serve

    try:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise CfmError(f"no Ray cluster at {args.address!r} ({e}); give --address HOST:6379 of the head node") from None
    ray_serve.shutdown()
    print("center application removed", file=sys.stderr)
    return 0
