"""Split inference: the edge runs layers [0, a) and [b, n) and the head; a center runs [a, b).

`SplitRunner` is a `LocalRunner` whose chunks send the middle span to a center. It keeps the hidden
states it sent to the center,
so when the center dies or times out it replays them through its own copy of layers [a, b) to
rebuild that span's KV cache and carries on locally; later it reconnects (resuming the center
session, or replaying into a new one). Text and token ids never leave the edge.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import CfmError
from ..options import CenterOptions
from ..protocol import wire
from ..protocol.errors import InvalidArgument
from ..protocol.proto import pb
from ..protocol.spans import default_span
from ..runners import LocalRunner
from .client import CenterClient, CenterFailure
from .planner import privacy_note


# The server went away (not a refusal, not a hang that would cost another timeout): reconnect at
# once, which behind a Ray Serve proxy lands on another replica (center/ray_serve.py).
FAILOVER_CODES = frozenset({"UNAVAILABLE", "INTERNAL", "UNKNOWN", "CANCELLED", "ABORTED"})


@dataclass
class Telemetry:
    segments: list = field(default_factory=list)  # [start, end, "center" | "local"] over positions
    fallbacks: list = field(default_factory=list)  # {"position", "reason"}
    reconnects: int = 0
    failed_reconnects: int = 0
    last_error: str = ""
    round_trips: int = 0
    round_trip_ms: float = 0.0
    center_ms: float = 0.0
    batch_sum: int = 0
    replays: int = 0  # KV caches of the span rebuilt from kept hidden states (new center session or local)
    replayed_positions: int = 0

    fresh: bool = False  # the next record opens a new segment (an answer started)

    def record(self, start: int, end: int, where: str) -> None:
        last = self.segments[-1] if self.segments else None
        if last and not self.fresh and last[2] == where and last[1] == start:
            last[1] = end
        else:
            self.segments.append([start, end, where])
        self.fresh = False

    def mark(self) -> int:
        """Start a new answer: -> index of its first segment."""
        self.fresh = True
        return len(self.segments)


class SplitRunner(LocalRunner):
    """Runner over layers [0, a) local, [a, b) on a center (or locally as fallback), [b, n) local + head.

    The cache holds all layers; those in [a, b) are valid only up to their own offset (the center's
    positions are rebuilt here from the kept hidden states when it fails)."""

    def __init__(self, model, center: CenterOptions, split: tuple[int, int] | None = None, chunk: int = 512):
        super().__init__(model, chunk=chunk)
        self.address, self.opts = center.address, center
        self.dtype = wire.parse_dtype(center.wire)
        self.n_layers, self.d = model.config.n_layers, model.config.d_model
        self.sent = np.empty((0, self.d), np.float32)  # hidden states entering layer a, as the center decoded them
        self.n = 0
        self.stream = None
        self.client: CenterClient | None = None
        self.session_id: str | None = None
        self.remote_valid = 0  # positions of the center session that still match self.sent
        self.log = Telemetry()
        self.answer_start: int | None = None  # the first position computed for the current answer
        self.first_segment = 0
        self.span = split
        self.last_attempt = 0.0
        info = self._connect_or_none("the center is unreachable at start")
        if self.span is None:
            self.span = (info.span_start, info.span_end) if info else default_span(self.n_layers)
        self._check_span(self.span, info)

    # ------------------------------------------------------------ Runner protocol

    @property
    def n_past(self) -> int:
        return self.n

    def _run(self, ids: list[int], all_logits: bool) -> np.ndarray:
        a, b = self.span
        backend = self.model.backend
        if self.answer_start is None:
            self.answer_start = self.n
        h = backend.span(backend.embed(ids), 0, a, [self.cache])
        h = self.middle(h[0], self.n)[None]
        self.n += len(ids)
        return backend.span_head(h, b, self.cache, all_logits)

    def truncate(self, n: int) -> None:
        self.n = min(self.n, n)
        self.cache.truncate(self.n)  # the center rewinds on the next step's position
        self.remote_valid = min(self.remote_valid, self.n)

    def begin(self) -> None:
        super().begin()
        self.first_segment = self.log.mark()
        self.answer_start = None

    def report(self) -> dict:
        return super().report() | {"split": self.split_report(self.answer_start or 0, self.first_segment)}

    # ------------------------------------------------------------ the middle span

    def middle(self, h: np.ndarray, pos: int) -> np.ndarray:
        """h [T, D] entering layer a at position pos -> [T, D] leaving layer b - 1."""
        x = wire.decode(wire.encode(h, self.dtype), hidden_size=self.d, dtype=self.dtype, max_rows=h.shape[0])
        self._remember(x, pos)
        if self.stream is None and time.monotonic() - self.last_attempt >= self.opts.reconnect_interval:
            self._reconnect(pos)
        for attempt in range(2):  # the second try fails over at once (e.g. to another Ray Serve replica)
            if self.stream is None:
                break
            try:
                out = self._remote(x, pos)
                self.log.record(pos, pos + len(x), "center")
                return out
            except CenterFailure as e:
                self._fall_back(pos, e)
                if attempt == 0 and e.code in FAILOVER_CODES:
                    self._reconnect(pos)
        out = self._local(pos, pos + len(x))
        self.log.record(pos, pos + len(x), "local")
        return out

    def _remember(self, x: np.ndarray, pos: int) -> None:
        end = pos + x.shape[0]
        if end > self.sent.shape[0]:
            grown = np.empty((max(end, 2 * self.sent.shape[0], 256), self.d), np.float32)
            grown[:pos] = self.sent[:pos]
            self.sent = grown
        self.sent[pos:end] = x

    def _remote(self, x: np.ndarray, pos: int) -> np.ndarray:
        outs = []
        for s in range(0, x.shape[0], self.max_step):
            t0 = time.perf_counter()
            r = self.stream.step(pos + s, x[s:s + self.max_step])
            self.log.round_trips += 1
            self.log.round_trip_ms += (time.perf_counter() - t0) * 1000
            self.log.center_ms += r.compute_ms
            self.log.batch_sum += r.batch_size
            outs.append(self._decode(r.hidden, min(self.max_step, x.shape[0] - s)))
            self.remote_valid = self.stream.n_past
        return np.concatenate(outs)

    def _decode(self, t: pb.Tensor, rows: int) -> np.ndarray:
        """The center's answer, validated like any input: a broken center means fallback, never garbage."""
        try:
            y = wire.decode(t, hidden_size=self.d, dtype=self.dtype, max_rows=rows)
        except InvalidArgument as e:
            raise CenterFailure("BAD_RESPONSE", f"the center sent unusable hidden states: {e}") from None
        if y.shape[0] != rows:
            raise CenterFailure("BAD_RESPONSE", f"the center answered {y.shape[0]} positions for {rows}")
        return y

    def _local(self, pos: int, stop: int) -> np.ndarray:
        """Layers [a, b) here: replay the sent states this cache has not seen, then the new [pos, stop)."""
        a, b = self.span
        assert self.cache[a].offset <= pos, "truncate() keeps every layer at or below n_past"
        outs = []
        if self.cache[a].offset < pos:
            self.log.replays += 1
            self.log.replayed_positions += pos - self.cache[a].offset
        for s in range(self.cache[a].offset, stop, self.chunk):
            e = min(s + self.chunk, stop)
            y = self.model.backend.span(self.sent[s:e][None], a, b, [self.cache])[0]
            if e > pos:
                outs.append(y[max(0, pos - s):])
        return np.concatenate(outs)

    # ------------------------------------------------------------ failure and reconnection

    def _fall_back(self, pos: int, e: CenterFailure) -> None:
        self.log.fallbacks.append({"position": pos, "reason": str(e)})
        self._drop_stream()

    def _drop_stream(self) -> None:
        if self.stream is not None:
            self.stream.abort()
        self.stream = None
        self.last_attempt = time.monotonic()

    def _connect_or_none(self, why: str):
        try:
            return self._connect()
        except CenterFailure as e:
            self.log.fallbacks.append({"position": 0, "reason": f"{why}: {e}"})
            self._drop_stream()
            return None

    def _connect(self) -> pb.InfoResponse:
        """Info, fingerprint check, open (or resume) a session. Raises CenterFailure or CfmError."""
        self.last_attempt = time.monotonic()
        client = CenterClient(self.address, self.opts.token, self.opts.tls_ca, self.opts.tls, self.opts.timeout)
        try:
            info = self._attach(client)
        except BaseException:
            client.close()
            raise
        if self.client is not None:
            self.client.close()
        self.client = client
        return info

    def _attach(self, client: CenterClient) -> pb.InfoResponse:
        info = client.info()
        self._check_span(self.span or (info.span_start, info.span_end), info)
        mine = self.model.fingerprint(info.span_start, info.span_end)
        if info.fingerprint != mine:
            raise CfmError(f"the center at {self.address} serves different weights for layers "
                           f"{info.span_start}:{info.span_end} (fingerprint {info.fingerprint}, this model's is {mine}); "
                           "run the same model file on both ends")
        if self.dtype not in info.dtypes:
            raise CfmError(f"the center does not accept {self.opts.wire} on the wire; use one of "
                           f"{', '.join(wire.dtype_name(d) for d in info.dtypes)}")
        fit = (info.limits.max_message_bytes - 4096) // wire.bytes_per_position(self.d, self.dtype)
        self.max_step = max(1, min(info.limits.max_step_positions, fit))
        a, b = self.span or (info.span_start, info.span_end)
        self.stream = self._open(client, a, b, min(self.model.config.context_length, info.limits.max_positions))
        return info

    def _open(self, client: CenterClient, a: int, b: int, max_positions: int):
        if self.session_id:
            try:
                stream = client.session(pb.OpenSession(resume_session_id=self.session_id))
                return stream
            except CenterFailure as e:
                if e.code not in ("NOT_FOUND", "PERMISSION_DENIED", "FAILED_PRECONDITION"):
                    raise
        stream = client.session(pb.OpenSession(span_start=a, span_end=b, dtype=self.dtype,
                                               max_positions=max_positions))
        self.session_id = stream.id
        return stream

    def _reconnect(self, pos: int) -> None:
        """Reattach to the center and bring its KV cache up to `pos` by replaying sent states."""
        try:
            self._connect()
            have = min(self.stream.n_past, self.remote_valid, pos)  # a resumed session may hold stale positions
            if have < pos:
                self._replay(have, pos)
            self.log.reconnects += 1
        except (CenterFailure, CfmError) as e:  # CfmError: e.g. the center now serves other weights
            self.log.failed_reconnects += 1
            self.log.last_error = str(e)
            self._drop_stream()

    def _replay(self, start: int, stop: int) -> None:
        self.log.replays += 1
        self.log.replayed_positions += stop - start
        for s in range(start, stop, self.max_step):
            self.stream.step(s, self.sent[s:min(s + self.max_step, stop)])
        self.remote_valid = stop

    # ------------------------------------------------------------ helpers

    def _check_span(self, span, info) -> None:
        a, b = span
        if not 0 < a < b <= self.n_layers:
            raise CfmError(f"split {a}:{b}: need 0 < A < B <= {self.n_layers}")
        if info is not None and not info.span_start <= a < b <= info.span_end:
            raise CfmError(f"split {a}:{b} is not inside the center's span {info.span_start}:{info.span_end}")

    def center_layers(self) -> frozenset[int]:
        return frozenset(range(*self.span))

    def close(self) -> None:
        """Close the center session (freeing its KV cache there) and the channel."""
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def split_report(self, since: int = 0, first_segment: int = 0) -> dict:
        """Where the positions computed since segment `first_segment` ran, fallbacks at positions >= since,
        and round-trip telemetry. Segments are [start, end, "center" | "local"] over positions."""
        a, b = self.span
        segs = [list(seg) for seg in self.log.segments[first_segment:]]
        n = max(1, self.log.round_trips)
        return {
            "center": self.address, "wire": self.opts.wire,
            "layers": {"edge": f"0:{a} + {b}:{self.n_layers}", "center": f"{a}:{b}"},
            "positions_center": sum(e - s for s, e, w in segs if w == "center"),
            "positions_local": sum(e - s for s, e, w in segs if w == "local"),
            "segments": segs,
            "fallbacks": [f for f in self.log.fallbacks if f["position"] >= since],
            "reconnects": self.log.reconnects,
            "failed_reconnects": self.log.failed_reconnects,
            "replays": self.log.replays, "replayed_positions": self.log.replayed_positions,
            "round_trip_ms": round(self.log.round_trip_ms / n, 2),
            "center_compute_ms": round(self.log.center_ms / n, 2),
            "center_batch_mean": round(self.log.batch_sum / n, 2),
            "privacy": privacy_note(self.span),  # what the center could recover in principle (docs/privacy.md)
        }
