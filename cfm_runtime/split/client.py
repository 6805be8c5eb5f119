"""Client side of cfm.v1.Center: Info, Ping and Session streams with per-step timeouts."""

from __future__ import annotations

import queue
import threading
import time

import grpc
import numpy as np

from ..errors import CfmError
from ..protocol import wire
from ..protocol.proto import pb, pb_grpc

_END = object()


class CenterFailure(Exception):
    """The center failed, refused or did not answer in time; the edge falls back to local layers."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code, self.message = code, message

    @classmethod
    def from_rpc(cls, e: grpc.RpcError) -> "CenterFailure":
        code = e.code() if hasattr(e, "code") else None
        return cls(code.name if code else "UNKNOWN", e.details() if hasattr(e, "details") else str(e))


def parse_address(address: str) -> str:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise CfmError(f"--center {address!r}: write the center's address as HOST:PORT, e.g. 127.0.0.1:50051")
    return address


class CenterClient:
    """A connection to one center; cheap to recreate (a new channel skips gRPC's reconnect backoff)."""

    def __init__(self, address: str, token: str | None = None, tls_ca: bytes | None = None, tls: bool = False,
                 timeout: float = 10.0):
        self.address, self.timeout = parse_address(address), timeout
        self.metadata = [("authorization", f"Bearer {token}")] if token else []
        options = [("grpc.max_receive_message_length", 4 * 2**20), ("grpc.max_send_message_length", 4 * 2**20)]
        if tls or tls_ca:
            self.channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(tls_ca), options)
        else:
            self.channel = grpc.insecure_channel(address, options)
        self.stub = pb_grpc.CenterStub(self.channel)

    def info(self, timeout: float | None = None) -> pb.InfoResponse:
        try:
            return self.stub.Info(pb.InfoRequest(), timeout=timeout or self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise CenterFailure.from_rpc(e) from None

    def ping(self, payload: int = 0, reply: int = 0) -> float:
        """Seconds for one Ping carrying `payload` bytes up and `reply` bytes down."""
        t0 = time.perf_counter()
        try:
            self.stub.Ping(pb.PingRequest(payload=bytes(payload), reply_bytes=reply),
                           timeout=self.timeout, metadata=self.metadata)
        except grpc.RpcError as e:
            raise CenterFailure.from_rpc(e) from None
        return time.perf_counter() - t0

    def session(self, open_request: pb.OpenSession, timeout: float | None = None) -> "SessionStream":
        return SessionStream(self, open_request, timeout or self.timeout)

    def close(self) -> None:
        self.channel.close()


class SessionStream:
    """One Session stream: `step()` sends hidden states and waits (bounded) for the answer."""

    def __init__(self, client: CenterClient, open_request: pb.OpenSession, timeout: float):
        self.timeout = timeout
        self.requests: queue.SimpleQueue = queue.SimpleQueue()
        self.responses: queue.SimpleQueue = queue.SimpleQueue()
        self.requests.put(pb.SessionRequest(open=open_request))
        self.call = client.stub.Session(iter(self.requests.get, _END), metadata=client.metadata)
        threading.Thread(target=self._read, name="center-session-reader", daemon=True).start()
        opened = self._next(timeout).opened
        self.id, self.n_past, self.dtype = opened.session_id, opened.n_past, opened.dtype
        self.span = (opened.span_start, opened.span_end)
        self.max_positions = opened.max_positions

    def _read(self) -> None:
        try:
            for r in self.call:
                self.responses.put(r)
            self.responses.put(CenterFailure("UNAVAILABLE", "the center ended the session stream"))
        except grpc.RpcError as e:
            self.responses.put(CenterFailure.from_rpc(e))

    def _next(self, timeout: float):
        try:
            r = self.responses.get(timeout=timeout)
        except queue.Empty:
            self.abort()
            raise CenterFailure("DEADLINE_EXCEEDED", f"no answer from the center within {timeout:g} s") from None
        if isinstance(r, CenterFailure):
            self.abort()
            raise r
        return r

    def step(self, position: int, h: np.ndarray) -> pb.StepResult:
        """h [n, D] float32 at `position` -> the StepResult (decode `hidden` with center.wire)."""
        self.requests.put(pb.SessionRequest(step=pb.Step(position=position, hidden=wire.encode(h, self.dtype))))
        r = self._next(self.timeout + 0.02 * h.shape[0])
        if r.WhichOneof("kind") != "result" or r.result.position != position:
            self.abort()
            raise CenterFailure("INTERNAL", f"the center answered {r.WhichOneof('kind')} out of order")
        self.n_past = position + h.shape[0]
        return r.result

    def close(self) -> None:
        """Free the session on the center (best effort)."""
        self.requests.put(pb.SessionRequest(close=pb.CloseSession()))
        try:
            self._next(2.0)
        except CenterFailure:
            pass
        self.abort()

    def abort(self) -> None:
        self.requests.put(_END)
        self.call.cancel()
