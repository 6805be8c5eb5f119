"""A user-space link emulator: a TCP proxy that delays, jitters, paces and "loses" bytes.

This machine's kernel has no netem qdisc, so the emulator sits between edge and center on loopback:
each direction is a pipe that serialises bytes at the link rate, then delivers them one one-way
delay (plus jitter) later, in order. TCP cannot lose bytes without corrupting the stream, so a "lost"
segment is delivered after a retransmission timeout instead, which is what the application sees.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass

from cfm_runtime.errors import CfmError

SEGMENT = 16 * 1024  # bytes paced as one unit
MIN_RTO = 0.2  # seconds: Linux's minimum TCP retransmission timeout


@dataclass
class LinkSpec:
    delay_ms: float = 0.0  # one-way delay; RTT is twice this
    jitter_ms: float = 0.0  # uniform in [-jitter, +jitter], delivery order is kept
    rate_mbit: float | None = None  # None: unlimited
    loss: float = 0.0  # probability that a segment needs a retransmission
    seed: int | None = None

    def __post_init__(self):
        problems = []
        if self.delay_ms < 0 or self.jitter_ms < 0:
            problems.append("delay and jitter must be >= 0 ms")
        if self.jitter_ms > self.delay_ms:
            problems.append("jitter must not exceed the delay (a delivery cannot happen before it was sent)")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            problems.append("rate must be > 0 Mbit/s (omit it for an unlimited link)")
        if not 0 <= self.loss < 1:
            problems.append("loss must be in [0, 1)")
        if problems:
            raise CfmError("bad link settings: " + "; ".join(problems))

    @property
    def rto(self) -> float:
        return max(MIN_RTO, 4 * self.delay_ms / 1000)


class _Pipe:
    """One direction: pace at the link rate, deliver after the one-way delay, never reorder."""

    def __init__(self, spec: LinkSpec, rng: random.Random, writer: asyncio.StreamWriter, lateness: deque):
        self.spec, self.rng, self.writer, self.lateness = spec, rng, writer, lateness
        self.queue: asyncio.Queue = asyncio.Queue()
        self.link_free_at = 0.0
        self.last_delivery = 0.0
        self.queued = 0
        self.drained = asyncio.Event()
        self.drained.set()

    def schedule(self, data: bytes) -> None:
        now = time.monotonic()
        s = self.spec
        for i in range(0, len(data), SEGMENT):
            seg = data[i:i + SEGMENT]
            start = max(now, self.link_free_at)
            done = start + (len(seg) * 8 / (s.rate_mbit * 1e6) if s.rate_mbit else 0.0)
            self.link_free_at = done
            at = done + (s.delay_ms + self.rng.uniform(-s.jitter_ms, s.jitter_ms)) / 1000
            if s.loss and self.rng.random() < s.loss:
                at += s.rto
            at = max(at, self.last_delivery)
            self.last_delivery = at
            self.queued += len(seg)
            self.queue.put_nowait((at, seg))
        if self.queued > self.limit:
            self.drained.clear()

    @property
    def limit(self) -> int:
        """Bytes in flight before the reader stops reading (backpressure to the sender)."""
        bdp = (self.spec.rate_mbit or 1000) * 1e6 / 8 * (2 * self.spec.delay_ms / 1000 + 0.05)
        return max(4 * SEGMENT, int(2 * bdp))

    async def run(self) -> None:
        while True:
            at, seg = await self.queue.get()
            if seg is None:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self.lateness.append(time.monotonic() - at)
            self.writer.write(seg)
            await self.writer.drain()
            self.queued -= len(seg)
            if self.queued <= self.limit // 2:
                self.drained.set()
        self.writer.close()


class LinkEmulator:
    """Listens on `listen` and forwards every connection to `target` through the emulated link.

    Runs its own event loop in a background thread: `start()` returns the bound port.
    """

    def __init__(self, target: tuple[str, int], spec: LinkSpec, listen: tuple[str, int] = ("127.0.0.1", 0)):
        self.target, self.spec, self.listen = target, spec, listen
        self.rng = random.Random(spec.seed)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.port: int | None = None
        self._thread: threading.Thread | None = None
        self._server = None
        self.bytes_forwarded = [0, 0]  # client->target, target->client
        self.lateness: deque = deque(maxlen=100_000)  # seconds each segment left after its due time

    def start(self) -> int:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main():
            self.loop = asyncio.new_event_loop()
            try:
                self._server = self.loop.run_until_complete(
                    asyncio.start_server(self._handle, self.listen[0], self.listen[1]))
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as e:
                errors.append(e)
                ready.set()
                return
            ready.set()
            self.loop.run_forever()
            self.loop.close()

        self._thread = threading.Thread(target=main, name="link-emulator", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise CfmError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {errors[0]}")
        return self.port

    def stop(self) -> None:
        if self.loop and self.loop.is_running():
            async def shutdown():
                self._server.close()
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)  # let them finish before the loop closes
            asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def lateness_ms(self) -> dict:
        """How late segments were delivered (the host's scheduling, not the emulated link): median, p95."""
        late = sorted(self.lateness)
        if not late:
            return {"median": 0.0, "p95": 0.0, "segments": 0}
        return {"median": round(late[len(late) // 2] * 1000, 3), "p95": round(late[int(0.95 * len(late))] * 1000, 3),
                "segments": len(late)}

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    async def _handle(self, c_reader, c_writer):
        try:
            t_reader, t_writer = await asyncio.open_connection(*self.target)
        except OSError:
            c_writer.close()
            return
        up = _Pipe(self.spec, self.rng, t_writer, self.lateness)
        down = _Pipe(self.spec, self.rng, c_writer, self.lateness)
        tasks = [asyncio.ensure_future(x) for x in (
            self._pump(c_reader, up, 0), self._pump(t_reader, down, 1), up.run(), down.run())]
        try:
            await asyncio.gather(*tasks)
        except (ConnectionError, OSError, asyncio.CancelledError):  # peer gone, or emulator stopping
            pass
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for w in (c_writer, t_writer):
                w.close()

    async def _pump(self, reader: asyncio.StreamReader, pipe: _Pipe, direction: int) -> None:
        try:
            while True:
                await pipe.drained.wait()
                data = await reader.read(64 * 1024)
                if not data:
                    break
                self.bytes_forwarded[direction] += len(data)
                pipe.schedule(data)
        finally:
            pipe.queue.put_nowait((0.0, None))


# ---------------------------------------------------------------- self-check


def _echo_server() -> tuple[socket.socket, threading.Thread]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=_echo, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return srv, t


def _echo(conn: socket.socket) -> None:
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                return
            if data[:1] == b"B":  # bulk: count bytes, answer when all arrived
                want = int(data[1:17])
                got = len(data) - 17
                while got < want:
                    got += len(conn.recv(65536))
                conn.sendall(b"K")
            else:
                conn.sendall(data)


def measure(spec: LinkSpec, pings: int = 20, bulk_bytes: int | None = None) -> dict:
    """Measure the emulated link against an echo server: RTT (median) and one-way throughput."""
    import statistics

    srv, _ = _echo_server()
    try:
        with LinkEmulator(srv.getsockname(), spec) as link:
            with socket.create_connection(("127.0.0.1", link.port)) as s:
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                rtts = []
                for _ in range(pings):
                    t0 = time.perf_counter()
                    s.sendall(b"p")
                    s.recv(1)
                    rtts.append(time.perf_counter() - t0)
                result = {"rtt_ms": statistics.median(rtts) * 1000,
                          "rtt_ms_p95": sorted(rtts)[int(0.95 * len(rtts))] * 1000}
                if spec.rate_mbit:
                    n = bulk_bytes or int(spec.rate_mbit * 1e6 / 8 * 1.0)  # ~1 s of traffic
                    payload = b"B" + str(n).zfill(16).encode() + b"x" * n
                    t0 = time.perf_counter()
                    s.sendall(payload)
                    s.recv(1)
                    elapsed = time.perf_counter() - t0 - result["rtt_ms"] / 1000
                    result["throughput_mbit"] = (len(payload) * 8 / 1e6) / elapsed
                result["lateness_ms"] = link.lateness_ms()
        return result
    finally:
        srv.close()
