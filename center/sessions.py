"""Sessions: one KV cache per edge conversation, owned by a caller, bounded in number and bytes."""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from cfm_runtime.model import SpanCache

from cfm_runtime.protocol.errors import FailedPrecondition, NotFound, OutOfRange, PermissionDenied, ResourceExhausted


@dataclass
class Session:
    id: str
    owner: str
    start: int
    end: int
    dtype: int
    max_positions: int
    cache: SpanCache
    last_used: float = field(default_factory=time.monotonic)
    attached: bool = True
    charged: int = 0  # positions counted against the KV budget
    closed: bool = False

    @property
    def n_past(self) -> int:
        return self.cache.offset


class SessionTable:
    """All live sessions; the KV budget is counted in positions x layers held, not allocator capacity."""

    def __init__(self, *, max_sessions: int, max_kv_bytes: int, idle_timeout: float, kv_bytes_per_position_layer: int):
        self.max_sessions, self.max_kv_bytes = max_sessions, max_kv_bytes
        self.idle_timeout, self.cost = idle_timeout, kv_bytes_per_position_layer
        self.sessions: dict[str, Session] = {}
        self.used_kv_bytes = 0
        self.lock = threading.Lock()

    def open(self, owner: str, new_cache, start: int, end: int, dtype: int, max_positions: int) -> Session:
        self.expire()
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise ResourceExhausted(f"the center holds its maximum of {self.max_sessions} sessions; "
                                        "retry later or run this span locally")
            s = Session(secrets.token_urlsafe(16), owner, start, end, dtype, max_positions,
                        new_cache(start, end, max_positions))
            self.sessions[s.id] = s
            return s

    def resume(self, owner: str, session_id: str) -> Session:
        self.expire()
        with self.lock:
            s = self.sessions.get(session_id)
            if s is None:
                raise NotFound(f"no session {session_id!r} (unknown, closed or expired after "
                               f"{self.idle_timeout:g} s idle); open a new one and replay the positions")
            if not secrets.compare_digest(s.owner, owner):
                raise PermissionDenied("session belongs to another caller")
            if s.attached:
                raise FailedPrecondition(f"session {session_id!r} is attached to another stream; close that one first")
            s.attached, s.last_used = True, time.monotonic()
            return s

    def check(self, s: Session) -> None:
        if s.closed:
            raise NotFound(f"session {s.id!r} was closed (idle for more than {self.idle_timeout:g} s); "
                           "open a new one and replay the positions")

    def charge(self, s: Session, positions: int) -> None:
        """Account for the session holding `positions` positions, or raise if past a bound."""
        if positions > s.max_positions:
            raise OutOfRange(f"the session would hold {positions} positions but was granted {s.max_positions}; "
                             "open the session with a larger max_positions or start a new conversation")
        with self.lock:
            delta = (positions - s.charged) * (s.end - s.start) * self.cost
            if delta > 0 and self.used_kv_bytes + delta > self.max_kv_bytes:
                raise ResourceExhausted(
                    f"KV cache budget exhausted: {self.used_kv_bytes / 2**20:.1f} of {self.max_kv_bytes / 2**20:.1f} MiB "
                    f"in use and this step needs {delta / 2**20:.2f} MiB more; retry later or run locally")
            self.used_kv_bytes += delta
            s.charged = positions

    def detach(self, s: Session) -> None:
        s.attached, s.last_used = False, time.monotonic()

    def close(self, s: Session) -> None:
        with self.lock:
            if self.sessions.pop(s.id, None) is not None:
                self.used_kv_bytes -= s.charged * (s.end - s.start) * self.cost
            s.closed = True

    def expire(self) -> int:
        """Close sessions idle for longer than the timeout; returns how many."""
        now = time.monotonic()
        idle = [s for s in list(self.sessions.values()) if now - s.last_used > self.idle_timeout]
        for s in idle:
            self.close(s)
        return len(idle)
