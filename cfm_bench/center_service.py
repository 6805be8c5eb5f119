"""The split benchmark's center process: a real cfm center, plus a center-only baseline.

The center runs in its own process so that its compute does not share the edge's GIL or threads.
Next to the gRPC center it serves the *center-only baseline*: the whole model on the server, the
edge sending token ids in the clear over plain TCP. That is exactly what split inference exists to
avoid (the server sees the text), so it lives here, for comparison in benchmarks only, and no
product path can reach it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import struct
import threading
import time

import numpy as np
import torch

from center.server import CenterServer
from cfm_runtime import LoadOptions, LocalRunner, load_model
from cfm_runtime.errors import CfmError

REQUEST = struct.Struct("<II")  # position of the first id, number of ids; then n x int32 ids
REPLY = struct.Struct("<if")  # greedy next token id, compute milliseconds
MAX_IDS = 4096


def _recv_exact(conn: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        part = conn.recv(n - len(buf))
        if not part:
            return None
        buf += part
    return bytes(buf)


class TokenService:
    """Center-only baseline over TCP: one KV cache per connection; a bad request drops the connection."""

    def __init__(self, model, host: str = "127.0.0.1"):
        self.model = model
        self.sock = socket.create_server((host, 0))
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()  # one forward at a time: the compute is the thing measured
        threading.Thread(target=self._accept, name="token-service", daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        runner = LocalRunner(self.model)
        with conn:
            while (ids_at := self._read_request(conn, runner.n_past)) is not None:
                pos, ids = ids_at
                with self.lock:
                    t0 = time.perf_counter()
                    runner.truncate(pos)
                    token = int(runner.forward(ids)[-1].argmax())
                    ms = (time.perf_counter() - t0) * 1000
                try:
                    conn.sendall(REPLY.pack(token, ms))
                except OSError:
                    return

    def _read_request(self, conn: socket.socket, n_past: int) -> tuple[int, list[int]] | None:
        """(position, ids) or None on end of stream or any invalid request."""
        try:
            head = _recv_exact(conn, REQUEST.size)
            if head is None:
                return None
            pos, n = REQUEST.unpack(head)
            if not 1 <= n <= MAX_IDS or pos > n_past or pos + n > self.model.config.context_length:
                return None
            raw = _recv_exact(conn, 4 * n)
        except OSError:
            return None
        if raw is None:
            return None
        ids = np.frombuffer(raw, dtype="<i4")
        if ids.min() < 0 or ids.max() >= self.model.config.vocab_size:
            return None
        return pos, ids.tolist()

    def close(self) -> None:
        self.sock.close()


class TokenClient:
    """Edge side of the baseline: `step(position, ids) -> (next token, center compute ms)`."""

    def __init__(self, host: str, port: int, timeout: float = 60.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def step(self, position: int, ids: list[int]) -> tuple[int, float]:
        self.sock.sendall(REQUEST.pack(position, len(ids)) + np.asarray(ids, dtype="<i4").tobytes())
        reply = _recv_exact(self.sock, REPLY.size)
        if reply is None:
            raise CfmError("the center-only baseline closed the connection (bad request or the process died)")
        return REPLY.unpack(reply)

    def close(self) -> None:
        self.sock.close()


def _center_main(conn, model_path, threads: int, span, weights: str) -> None:
    """Child process: load the model, serve gRPC and the baseline, report ports, wait for 'stop'."""
    model = load_model(model_path, LoadOptions(threads=threads, weights=weights, progress=False))
    center = CenterServer(model, span).start()
    tokens = TokenService(model)
    conn.send({"grpc_port": center.port, "token_port": tokens.port, "span": list(center.servicer.span),
               "layer_decode_ms": center.servicer.layer_ms, "threads": torch.get_num_threads(), "pid": os.getpid(),
               "backend": model.backend.report()["backend"]})
    try:
        conn.recv()
    except EOFError:  # the parent died
        pass
    tokens.close()
    center.stop(grace=0)


class CenterProcess:
    """Starts the center process (spawned: a fresh interpreter, its own torch threads)."""

    def __init__(self, model_path, threads: int, span: tuple[int, int] | None = None, weights: str = "fp32"):
        self.model_path, self.threads, self.span, self.weights = model_path, threads, span, weights
        self.info: dict = {}
        self.proc = None

    def start(self, timeout: float = 300.0) -> dict:
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_center_main, args=(child, self.model_path, self.threads, self.span,
                                                           self.weights),
                                name="cfm-bench-center", daemon=True)
        self.proc.start()
        child.close()
        if not self.conn.poll(timeout):
            self.stop()
            raise CfmError(f"the benchmark's center process did not start within {timeout:g} s")
        try:
            self.info = self.conn.recv()
        except EOFError:
            raise CfmError("the benchmark's center process died while loading the model (its error is above)") from None
        return self.info

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.conn.send("stop")
        except OSError:
            pass
        self.proc.join(15)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)
        self.proc = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()
