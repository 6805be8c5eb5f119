"""The center as a Ray Serve application: many replicas of the same span behind Serve's gRPC proxy.

Each replica runs the single-process center's own `CenterServicer` (sessions, KV budget, idle
expiry, batched decode engine): the center logic exists once. Serve adds replicas, placement
across nodes, health checks, autoscaling and rolling upgrades.

Affinity. The installed Ray Serve (2.60; client- and bidirectional-streaming gRPC landed in
ray-project/ray #60767..#60771, split from #60490) proxies `stream_stream` methods: the proxy routes the
stream once, when it opens, and every later message of that stream is pulled by the same replica
(`gRPCInputStream`, one `receive_grpc_messages` actor call per message). So a `Session` stream
stays on one replica for its life and that is the session affinity; no per-step routing key is
needed. A stream that breaks is reopened by the edge through the proxy, may land on another
replica, gets NOT_FOUND on resume and replays its kept hidden states (edge/split.py).

Autoscaling. An open `Session` stream is one ongoing request of its replica for its whole life,
so Serve's `target_ongoing_requests` is "live sessions per replica", and `max_ongoing_requests`
(the most streams a replica accepts) is derived from the per-replica KV budget.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, field

import grpc

from cfm_runtime import LoadOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.gguf_file import read_gguf
from cfm_runtime.loading import gguf_config_values, resolve_model_path
from cfm_runtime.options import WEIGHT_FORMATS

from cfm_runtime.protocol.errors import status_for
from cfm_runtime.protocol.spans import parse_span

from .interceptor import Tokens, caller_id
from .server import CenterLimits, CenterServicer

log = logging.getLogger("cfm.center")

APP_NAME = "cfm-center"
DEPLOYMENT_NAME = "Center"
SERVICER_FUNCTION = "cfm_runtime.protocol._proto.cfm.v1.center_pb2_grpc.add_CenterServicer_to_server"
STATS_ACTOR, STATS_NAMESPACE = "cfm-center-stats", "cfm"
REPORT_PERIOD_S = 1.0


@dataclass
class ReplicaSpec:
    """What every replica loads and enforces (the `cfm center serve` options)."""

    model: str | None = None
    layers: str | None = None  # "a:b"; None: default_span
    threads: int = 1  # torch threads and Ray CPUs per replica
    max_sessions: int = 64
    max_kv_mb: float = 2048.0
    idle_timeout_s: float = 300.0
    max_batch: int = 32
    token_file: str | None = None
    weights: str = "int4"  # weight format of the served layers (fingerprints are the file's: edges of any format)


@dataclass
class ScalingSpec:
    """How many replicas: fixed (`replicas`) or autoscaled between `min_replicas` and `max_replicas`."""

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    session_positions: int = 2048  # typical context of one session, for the KV-derived session cap
    target_sessions: int | None = None  # live sessions per replica the autoscaler aims at
    extra: dict = field(default_factory=dict)  # raw Serve deployment options, applied last


def sessions_per_replica(spec: ReplicaSpec, kv_bytes_per_position: int, session_positions: int) -> int:
    """Most sessions one replica can hold at `session_positions` each within its KV budget (and max_sessions)."""
    by_kv = int(spec.max_kv_mb * 2**20) // max(1, kv_bytes_per_position * session_positions)
    return max(1, min(spec.max_sessions, by_kv))


class CenterReplica:
    """One Serve replica of the center: `CenterServicer` behind Serve's gRPC proxy."""

    def __init__(self, spec: dict):
        s = ReplicaSpec(**spec)
        model = load_model(s.model, LoadOptions(threads=s.threads, weights=s.weights))
        limits = CenterLimits(max_sessions=s.max_sessions, max_kv_mb=s.max_kv_mb,
                              idle_timeout_s=s.idle_timeout_s, max_batch=s.max_batch)
        self.servicer = CenterServicer(model, parse_span(s.layers, model.config.n_layers), limits,
                                       Tokens.load(s.token_file))
        self.name = _replica_name()
        self.metrics = ReplicaMetrics(self.name)
        self.stopped = threading.Event()
        threading.Thread(target=self._housekeeping, name="center-housekeeping", daemon=True).start()

    # ------------------------------------------------------------ the cfm.v1.Center methods

    async def Info(self, request, grpc_context):
        return await self._unary(self.servicer.Info, request, grpc_context)

    async def Ping(self, request, grpc_context):
        return await self._unary(self.servicer.Ping, request, grpc_context)

    async def Session(self, requests, grpc_context):
        """A session stream; it stays on this replica for its life (the servicer authenticates it)."""
        self.metrics.streams += 1
        try:
            async for response in self.servicer.Session(requests, grpc_context):
                if response.WhichOneof("kind") == "result":
                    self.metrics.step(response.result.batch_size, response.result.hidden.shape[0])
                yield response
        except Exception as e:
            _set_status(grpc_context, e)
            raise
        finally:
            self.metrics.streams -= 1

    async def _unary(self, method, request, grpc_context):
        try:
            caller_id(grpc_context, self.servicer.tokens)  # what the single-process interceptor checks
            return await method(request, grpc_context)
        except Exception as e:
            _set_status(grpc_context, e)
            raise

    # ------------------------------------------------------------ Serve hooks and observability

    def check_health(self) -> None:
        """Serve's periodic health check: the compute thread must be alive."""
        if not self.servicer.engine.thread.is_alive():
            raise RuntimeError("the center's compute thread died")

    def stats(self) -> dict:
        """This replica's sessions, KV bytes, steps/s and batch sizes."""
        t, lim = self.servicer.table, self.servicer.limits
        return {"replica": self.name, "node": _node_ip(), "pid": _pid(), "time": time.time(),
                "sessions": len(t.sessions), "attached": sum(s.attached for s in list(t.sessions.values())),
                "streams": self.metrics.streams, "max_sessions": lim.max_sessions,
                "kv_bytes": t.used_kv_bytes, "max_kv_bytes": t.max_kv_bytes,
                **self.metrics.snapshot()}

    def _housekeeping(self) -> None:
        """Idle expiry (as CenterServer does) and a stats report every REPORT_PERIOD_S."""
        registry = None
        while not self.stopped.wait(REPORT_PERIOD_S):
            if n := self.servicer.table.expire():
                log.info("closed %d idle sessions", n)
            registry = registry or _stats_registry()
            stats = self.stats()
            self.metrics.export(stats)
            if registry is not None:
                registry.put.remote(self.name, stats)

    def __del__(self):
        self.stopped.set()
        self.servicer.engine.stop()


class ReplicaMetrics:
    """Counters of one replica, exported as Ray metrics (Prometheus, the Ray dashboard)."""

    def __init__(self, replica: str):
        from ray.util import metrics

        self.streams = 0
        self.steps = self.positions = self.batch_sum = 0
        self.last = (time.monotonic(), 0, 0)  # (time, steps, positions) at the last snapshot
        self.rates = (0.0, 0.0)
        tags = {"replica": replica}
        self.g_sessions = metrics.Gauge("cfm_center_sessions", "live sessions of a replica", tag_keys=("replica",))
        self.g_kv = metrics.Gauge("cfm_center_kv_bytes", "KV cache bytes held by a replica", tag_keys=("replica",))
        self.g_steps = metrics.Gauge("cfm_center_steps_per_s", "steps answered per second", tag_keys=("replica",))
        self.h_batch = metrics.Histogram("cfm_center_batch_size", "sessions computed together, per step",
                                         boundaries=[1, 2, 4, 8, 16, 32, 64], tag_keys=("replica",))
        for m in (self.g_sessions, self.g_kv, self.g_steps, self.h_batch):
            m.set_default_tags(tags)

    def step(self, batch_size: int, positions: int) -> None:
        self.steps += 1
        self.positions += positions
        self.batch_sum += batch_size
        self.h_batch.observe(batch_size)

    def snapshot(self) -> dict:
        now = time.monotonic()
        t0, s0, p0 = self.last
        if now - t0 >= 0.5:
            self.rates = ((self.steps - s0) / (now - t0), (self.positions - p0) / (now - t0))
            self.last = (now, self.steps, self.positions)
        return {"steps": self.steps, "positions": self.positions, "steps_per_s": round(self.rates[0], 2),
                "positions_per_s": round(self.rates[1], 2),
                "batch_mean": round(self.batch_sum / self.steps, 2) if self.steps else 0.0}

    def export(self, stats: dict) -> None:
        self.g_sessions.set(stats["sessions"])
        self.g_kv.set(stats["kv_bytes"])
        self.g_steps.set(stats["steps_per_s"])


class StatsRegistry:
    """A tiny named actor holding the last report of every replica, read by `cfm center status`."""

    def __init__(self):
        self.reports: dict[str, dict] = {}

    def put(self, replica: str, stats: dict) -> None:
        self.reports[replica] = stats

    def get(self, max_age_s: float = 30.0) -> list[dict]:
        """Reports younger than max_age_s (older ones are replicas that died or were removed)."""
        now = time.time()
        self.reports = {k: v for k, v in self.reports.items() if now - v["time"] <= max_age_s}
        return sorted(self.reports.values(), key=lambda r: r["replica"])


def _stats_registry():
    import ray

    try:
        return ray.remote(StatsRegistry).options(
            name=STATS_ACTOR, namespace=STATS_NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0).remote()
    except Exception as e:  # the stats are a convenience; serving must not depend on them
        log.warning("cannot reach the stats registry: %s", e)
        return None


def _set_status(grpc_context, e: Exception) -> None:
    """The status the single-process interceptor would give; Serve's proxy honours a code set before raising."""
    code, message = status_for(e)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("center request failed")
    grpc_context.set_code(code)
    grpc_context.set_details(message)


def _replica_name() -> str:
    from ray import serve

    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # constructed outside Serve (e.g. a direct test)
        return f"pid-{_pid()}"


def _pid() -> int:
    import os

    return os.getpid()


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()


# ---------------------------------------------------------------- the application


def deployment_options(replica: ReplicaSpec, scaling: ScalingSpec, kv_bytes_per_position: int) -> dict:
    """Serve deployment options: replica count or autoscaling on live sessions, and the session cap."""
    cap = sessions_per_replica(replica, kv_bytes_per_position, scaling.session_positions)
    opts = {
        "name": DEPLOYMENT_NAME,
        "max_ongoing_requests": cap,  # open Session streams (+ in-flight Info/Ping) one replica accepts
        "ray_actor_options": {"num_cpus": replica.threads},
        "health_check_period_s": 5.0,
        "graceful_shutdown_timeout_s": 10.0,
    }
    if scaling.min_replicas is not None:
        target = scaling.target_sessions or max(1, math.floor(0.75 * cap))
        opts["autoscaling_config"] = {
            "min_replicas": scaling.min_replicas, "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": target, "upscale_delay_s": 5.0, "downscale_delay_s": 120.0,
        }
    else:
        opts["num_replicas"] = scaling.replicas
    opts.update(scaling.extra)
    return opts


def kv_bytes_per_position(replica: ReplicaSpec) -> int:
    """KV bytes one position costs over the served span (fp32 K and V), read from the model's metadata."""
    n_layers, n_kv_heads, head_dim = _kv_shape(replica.model)
    a, b = parse_span(replica.layers, n_layers)
    return 2 * n_kv_heads * head_dim * 4 * (b - a)


def _kv_shape(model: str | None) -> tuple[int, int, int]:
    """(n_layers, n_kv_heads, head_dim) from the checkpoint's metadata, without reading weights."""
    p = resolve_model_path(model)
    if p.is_dir():
        c = json.loads((p / "config.json").read_text())
        heads = c["num_attention_heads"]
        return (c["num_hidden_layers"], c.get("num_key_value_heads", heads),
                c.get("head_dim") or c["hidden_size"] // heads)
    v = gguf_config_values(read_gguf(p)[0], p)
    return v["n_layers"], v["n_kv_heads"], v["head_dim"]


def build_app(args: dict | None = None):
    """Serve application builder (`import_path: center.ray_serve:build_app` in a Serve config).

    `args` holds ReplicaSpec fields, plus `replicas` or `autoscale` ("MIN:MAX"), `session_positions`,
    `target_sessions`; unknown keys are an error that lists the known ones.
    """
    from ray import serve

    replica, scaling = parse_args(dict(args or {}))
    opts = deployment_options(replica, scaling, kv_bytes_per_position(replica))
    return serve.deployment(CenterReplica).options(**opts).bind(asdict(replica))


def parse_args(args: dict) -> tuple[ReplicaSpec, ScalingSpec]:
    """Application args -> (ReplicaSpec, ScalingSpec), validated."""
    replica_keys = set(ReplicaSpec.__dataclass_fields__)
    scaling_keys = {"replicas", "autoscale", "session_positions", "target_sessions", "deployment_options"}
    unknown = set(args) - replica_keys - scaling_keys
    if unknown:
        raise CfmError(f"unknown center app args {sorted(unknown)}; known: {sorted(replica_keys | scaling_keys)}")
    replica = ReplicaSpec(**{k: v for k, v in args.items() if k in replica_keys})
    scaling = ScalingSpec(replicas=int(args.get("replicas", 1)),
                          session_positions=int(args.get("session_positions", 2048)),
                          target_sessions=args.get("target_sessions"), extra=dict(args.get("deployment_options", {})))
    if args.get("autoscale"):
        scaling.min_replicas, scaling.max_replicas = parse_autoscale(str(args["autoscale"]))
    _validate(replica, scaling)
    return replica, scaling


def parse_autoscale(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(":"))
    except ValueError:
        raise CfmError(f"--autoscale {text!r}: write MIN:MAX replicas, e.g. 1:4") from None
    if not 0 <= lo <= hi or hi < 1:
        raise CfmError(f"--autoscale {text}: need 0 <= MIN <= MAX and MAX >= 1")
    return lo, hi


def _validate(replica: ReplicaSpec, scaling: ScalingSpec) -> None:
    for name in ("threads", "max_sessions", "max_batch"):
        if getattr(replica, name) < 1:
            raise CfmError(f"{name.replace('_', '-')} must be >= 1")
    if replica.max_kv_mb <= 0:
        raise CfmError("max-kv-mb must be > 0")
    if replica.weights not in WEIGHT_FORMATS:
        raise CfmError(f"weights {replica.weights!r}: choose one of {', '.join(WEIGHT_FORMATS)}")
    if scaling.min_replicas is None and scaling.replicas < 1:
        raise CfmError("--replicas must be >= 1")
    if scaling.session_positions < 1:
        raise CfmError("--session-positions must be >= 1")


# ---------------------------------------------------------------- deploy, status, shutdown


def deploy(args: dict, address: str | None = None, grpc_port: int = 9000, num_cpus: int | None = None,
           name: str = APP_NAME) -> list[str]:
    """Deploys the center app behind Serve's gRPC proxy; returns the node addresses edges can connect to.

    Connects to the Ray cluster at `address`, or to the one this process already joined, or starts a
    local one (`num_cpus`). The gRPC port is fixed when Serve first starts on a cluster."""
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    app = build_app(args)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[SERVICER_FUNCTION]),
                http_options={"host": "127.0.0.1", "port": 0})
    serve.run(app, name=name)
    return sorted({n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"]})


def status(address: str | None = "auto", name: str = APP_NAME) -> dict:
    """The application's Serve status and the last report of each live replica."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as e:
            raise CfmError(f"no Ray cluster at {address!r} ({e}); give --address HOST:6379 of the head node") from None
    app = serve.status().applications.get(name)
    if app is None:
        raise CfmError(f"no application {name!r} on this Ray cluster; deploy it with `cfm center deploy`")
    dep = app.deployments.get(DEPLOYMENT_NAME)
    try:
        reports = ray.get(ray.get_actor(STATS_ACTOR, namespace=STATS_NAMESPACE).get.remote(), timeout=10)
    except ValueError:  # no registry yet: no replica has reported
        reports = []
    now = time.time()
    return {"application": name, "status": str(app.status.value if hasattr(app.status, "value") else app.status),
            "replica_states": {str(getattr(k, "value", k)): v for k, v in (dep.replica_states if dep else {}).items()},
            "replicas": [{**r, "age_s": round(now - r["time"], 1)} for r in reports]}


def shutdown(name: str = APP_NAME) -> None:
    """Removes the app, Serve and the stats registry, then leaves Ray (a local Ray stops with it)."""
    import ray
    from ray import serve

    if name in serve.status().applications:
        serve.delete(name)
    serve.shutdown()
    try:
        ray.kill(ray.get_actor(STATS_ACTOR, namespace=STATS_NAMESPACE))
    except ValueError:
        pass
    ray.shutdown()
