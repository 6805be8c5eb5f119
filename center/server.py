"""The center: a gRPC server (grpc.aio) running a span of layers for many edge sessions."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

import grpc
import numpy as np
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cfm_runtime.errors import CfmError

from cfm_runtime.protocol import wire
from cfm_runtime.protocol.errors import FailedPrecondition, InvalidArgument, OutOfRange
from cfm_runtime.protocol.proto import SERVICE_NAME, pb, pb_grpc
from cfm_runtime.protocol.spans import default_span

from .engine import Engine
from .interceptor import StatusInterceptor, Tokens, caller_id
from .sessions import Session, SessionTable

log = logging.getLogger("cfm.center")
VERSION = "0.1.0"


@dataclass
class CenterLimits:
    max_sessions: int = 64
    max_kv_mb: float = 2048.0
    max_positions: int = 0  # 0: the model's context length
    max_step_positions: int = 512  # 512 x 576 x 4 B = 1.2 MB per message at fp32
    max_message_bytes: int = 4 * 2**20
    idle_timeout_s: float = 300.0
    max_batch: int = 32


class CenterServicer(pb_grpc.CenterServicer):
    def __init__(self, model, span: tuple[int, int], limits: CenterLimits, tokens: Tokens | None):
        c = model.config
        self.model, self.span, self.limits, self.tokens = model, span, limits, tokens
        self.hidden = c.d_model
        self.max_positions = min(limits.max_positions or c.context_length, c.context_length)
        self.table = SessionTable(max_sessions=limits.max_sessions, max_kv_bytes=int(limits.max_kv_mb * 2**20),
                                  idle_timeout=limits.idle_timeout_s,
                                  kv_bytes_per_position_layer=2 * c.n_kv_heads * c.head_dim * 4)
        # the largest step whose request and reply both fit in a message, at fp32
        fit = (limits.max_message_bytes - 4096) // wire.bytes_per_position(self.hidden, pb.DTYPE_FLOAT32)
        self.max_step = max(1, min(limits.max_step_positions, fit))
        self.fingerprint = model.fingerprint(*span)
        self.engine = Engine(model, limits.max_batch)
        self.layer_ms = self._calibrate()

    def _calibrate(self, steps: int = 4) -> float:
        """Milliseconds of one decode position through one served layer."""
        a, b = self.span
        cache = self.model.new_cache(a, b, steps + 1)
        h = np.zeros((1, 1, self.hidden), np.float32)
        self.model.backend.span(h, a, b, [cache])
        t0 = time.perf_counter()
        for _ in range(steps):
            self.model.backend.span(h, a, b, [cache])
        return (time.perf_counter() - t0) * 1000 / steps / (b - a)

    def info(self) -> pb.InfoResponse:
        c, lim, t = self.model.config, self.limits, self.table
        return pb.InfoResponse(
            model_name=c.name or "", fingerprint=self.fingerprint, span_start=self.span[0], span_end=self.span[1],
            n_layers=c.n_layers, hidden_size=self.hidden, dtypes=list(wire.ITEMSIZE),
            layer_decode_ms=self.layer_ms, server_version=VERSION,
            limits=pb.Limits(max_sessions=lim.max_sessions, active_sessions=len(t.sessions),
                             max_kv_bytes=t.max_kv_bytes, used_kv_bytes=t.used_kv_bytes,
                             kv_bytes_per_position_layer=t.cost, max_positions=self.max_positions,
                             max_step_positions=self.max_step, max_message_bytes=lim.max_message_bytes,
                             idle_timeout_s=lim.idle_timeout_s))

    async def Info(self, request, context):
        return self.info()

    async def Ping(self, request, context):
        if request.reply_bytes > self.limits.max_message_bytes - 1024:
            raise InvalidArgument(f"reply_bytes {request.reply_bytes} exceeds the message limit "
                                  f"{self.limits.max_message_bytes - 1024}")
        return pb.PingResponse(payload=bytes(request.reply_bytes))

    async def Session(self, requests, context):
        owner = caller_id(context, self.tokens)
        session = None
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind is None:
                    raise InvalidArgument("empty SessionRequest: set one of open, step or close")
                if kind == "open":
                    if session is not None:
                        raise FailedPrecondition("this stream already has a session; send open once per stream")
                    session = self._open(owner, request.open)
                    yield pb.SessionResponse(opened=self._opened(session))
                elif session is None:
                    raise FailedPrecondition(f"got {kind} before open; the first message of a stream must be open")
                elif kind == "step":
                    yield pb.SessionResponse(result=await self._step(session, request.step))
                else:
                    n_past = session.n_past
                    self.table.close(session)
                    yield pb.SessionResponse(closed=pb.SessionClosed(n_past=n_past))
                    return
        finally:
            if session is not None:
                self.table.detach(session)

    def _open(self, owner: str, req) -> Session:
        if req.resume_session_id:
            return self.table.resume(owner, req.resume_session_id)
        a, b = (req.span_start, req.span_end) if (req.span_start, req.span_end) != (0, 0) else self.span
        if not self.span[0] <= a < b <= self.span[1]:
            raise OutOfRange(f"span {a}:{b} is not inside the served span {self.span[0]}:{self.span[1]}")
        if req.dtype not in wire.ITEMSIZE:
            raise InvalidArgument(f"dtype {req.dtype} is not supported; use DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16")
        if req.max_positions > self.max_positions:
            raise OutOfRange(f"max_positions {req.max_positions} exceeds this center's {self.max_positions}")
        return self.table.open(owner, self.model.new_cache, a, b, req.dtype,
                               req.max_positions or self.max_positions)

    @staticmethod
    def _opened(s: Session) -> pb.SessionOpened:
        return pb.SessionOpened(session_id=s.id, span_start=s.start, span_end=s.end, n_past=s.n_past,
                                max_positions=s.max_positions, dtype=s.dtype)

    async def _step(self, s: Session, step) -> pb.StepResult:
        self.table.check(s)
        h = wire.decode(step.hidden, hidden_size=self.hidden, dtype=s.dtype, max_rows=self.max_step)
        pos, n = step.position, h.shape[0]
        if pos > s.n_past:
            raise FailedPrecondition(f"step starts at position {pos} but the session holds {s.n_past} positions; "
                                     "send the missing positions first")
        self.table.charge(s, pos + n)
        s.cache.truncate(pos)
        out, ms, batch = await asyncio.wrap_future(self.engine.submit(s, h))
        if n == 1 and batch == 1:  # keep Info's figure current: the start-up calibration runs cold
            self.layer_ms = 0.7 * self.layer_ms + 0.3 * ms / (s.end - s.start)
        s.last_used = time.monotonic()
        return pb.StepResult(position=pos, hidden=wire.encode(out, s.dtype), compute_ms=ms, batch_size=batch)


class CenterServer:
    """A center on its own event loop thread: `start()` binds and returns; `.port`; `stop()`."""

    def __init__(self, model, span: tuple[int, int] | None = None, host: str = "127.0.0.1", port: int = 0,
                 limits: CenterLimits | None = None, tokens: Tokens | None = None,
                 tls: tuple[bytes, bytes] | None = None):
        self.servicer = CenterServicer(model, span or default_span(model.config.n_layers),
                                       limits or CenterLimits(), tokens)
        self.host, self.port, self.tls = host, port, tls
        self.loop = asyncio.new_event_loop()
        self.server: grpc.aio.Server | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name="center-loop", daemon=True)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> "CenterServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=30)
        return self

    async def _start(self) -> None:
        n = self.servicer.limits.max_message_bytes
        self.server = grpc.aio.server(interceptors=[StatusInterceptor(self.servicer.tokens)],
                                      options=[("grpc.max_receive_message_length", n),
                                               ("grpc.max_send_message_length", n)])
        pb_grpc.add_CenterServicer_to_server(self.servicer, self.server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, self.server)
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        reflection.enable_server_reflection(
            [SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            self.server)
        target = f"{self.host}:{self.port}"
        if self.tls:
            self.port = self.server.add_secure_port(target, grpc.ssl_server_credentials([self.tls]))
        else:
            self.port = self.server.add_insecure_port(target)
        if not self.port:
            raise CfmError(f"cannot listen on {target}; is the port in use?")
        await self.server.start()
        self.loop.create_task(self._expire_idle())

    async def _expire_idle(self) -> None:
        period = max(0.5, min(10.0, self.servicer.limits.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            if n := self.servicer.table.expire():
                log.info("closed %d idle sessions", n)

    def stop(self, grace: float | None = None) -> None:
        if self.server is not None:
            asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(timeout=30)
        self.servicer.engine.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    def wait(self) -> None:
        """Block until the server terminates (or KeyboardInterrupt)."""
        asyncio.run_coroutine_threadsafe(self.server.wait_for_termination(), self.loop).result()
