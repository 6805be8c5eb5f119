"""`cfm center deploy` and `cfm center status`: the center as a Ray Serve application (center/ray_serve.py)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import time

from cfm_runtime.errors import CfmError


def add_parsers(csub) -> None:
    """Adds `deploy` and `status` to the `cfm center` group."""
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
    d.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray started without --address")
    d.add_argument("--token-file", default=None,
                   help="require bearer tokens listed in this file (the path must exist on every node)")
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
           "target_sessions": args.target_sessions}
    if args.autoscale:
        out["autoscale"] = args.autoscale
    else:
        out["replicas"] = args.replicas or 1
    return out


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_deploy(args) -> int:
    from .ray_serve import deploy, parse_args

    parse_args(app_args(args))  # user errors before Ray starts
    if not 1 <= args.grpc_port <= 65535:
        raise CfmError("--grpc-port must be 1..65535")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    t0 = time.perf_counter()
    proxies = deploy(app_args(args), address=args.address, grpc_port=args.grpc_port, num_cpus=args.num_cpus)
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
        from .ray_serve import shutdown

        shutdown()
    return 0


def cmd_status(args) -> int:
    from .ray_serve import status

    st = status(args.address)
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
    import ray

    from .ray_serve import shutdown

    try:
        ray.init(address=args.address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as e:
        raise CfmError(f"no Ray cluster at {args.address!r} ({e}); give --address HOST:6379 of the head node") from None
    shutdown()
    print("center application removed", file=sys.stderr)
    return 0
