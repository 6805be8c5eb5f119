"""Sessions: one KV cache per edge conversation, owned by a caller, bounded in number and bytes.

The KV budget counts the bytes the caches have allocated, not the positions they hold: a cache grows in
blocks of `KVCache.step` positions, so a session of 16 positions holds a whole block. A step is charged
before it runs (growth past a budget is refused with nothing allocated), and a rewind gives the blocks
past the new end back to the allocator and to the budget. Each caller (a token) has its own share of
sessions and bytes, so one token cannot take every slot or byte from the others.
"""

from __future__ import annotations

import secrets
import threading
import time
from dataclasses import dataclass, field

from cfm_runtime.cache import SpanCache

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
    charged: int = 0  # bytes of KV blocks counted against the budgets (the cache's allocated size)
    grace: float | None = None  # seconds it stays resumable after its stream failed (None: the idle timeout)
    closed: bool = False

    @property
    def n_past(self) -> int:
        return self.cache.offset


@dataclass
class Usage:
    """What one owner holds."""

    sessions: int = 0
    kv_bytes: int = 0


@dataclass
class TableLimits:
    max_sessions: int
    max_kv_bytes: int
    idle_timeout: float
    error_grace: float = 30.0  # a session whose stream failed is resumable this long, then freed
    owner_sessions: int = 0  # sessions of one owner at most (0: max_sessions)
    owner_kv_bytes: int = 0  # KV bytes of one owner at most (0: max_kv_bytes)

    def __post_init__(self):
        self.owner_sessions = min(self.owner_sessions or self.max_sessions, self.max_sessions)
        self.owner_kv_bytes = min(self.owner_kv_bytes or self.max_kv_bytes, self.max_kv_bytes)


class SessionTable:
    """All live sessions, their KV bytes in total and per owner."""

    def __init__(self, limits: TableLimits, kv_bytes_per_position_layer: int):
        self.limits, self.cost = limits, kv_bytes_per_position_layer
        self.sessions: dict[str, Session] = {}
        self.owners: dict[str, Usage] = {}
        self.used_kv_bytes = 0
        self.lock = threading.Lock()

    @property
    def max_sessions(self) -> int:
        return self.limits.max_sessions

    @property
    def max_kv_bytes(self) -> int:
        return self.limits.max_kv_bytes

    @property
    def idle_timeout(self) -> float:
        return self.limits.idle_timeout

    def open(self, owner: str, new_cache, start: int, end: int, dtype: int, max_positions: int) -> Session:
        self.expire()
        with self.lock:
            if len(self.sessions) >= self.max_sessions:
                raise ResourceExhausted(f"the center holds its maximum of {self.max_sessions} sessions; "
                                        "retry later or run this span locally")
            usage = self.owners.setdefault(owner, Usage())
            if usage.sessions >= self.limits.owner_sessions:
                raise ResourceExhausted(f"this token holds its maximum of {self.limits.owner_sessions} sessions on "
                                        "this center; close sessions it no longer uses (generator.close()) or "
                                        "wait for idle ones to expire")
            s = Session(secrets.token_urlsafe(16), owner, start, end, dtype, max_positions,
                        new_cache(start, end, max_positions))
            self.sessions[s.id] = s
            usage.sessions += 1
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
            s.attached, s.last_used, s.grace = True, time.monotonic(), None
            return s

    def check(self, s: Session) -> None:
        if s.closed:
            raise NotFound(f"session {s.id!r} was closed (idle for more than {self.idle_timeout:g} s); "
                           "open a new one and replay the positions")

    def prepare_step(self, s: Session, position: int, n: int) -> None:
        """Before a step of `n` positions at `position`: rewind the cache to `position`, give back the blocks
        the session no longer needs, and charge the ones it will allocate; refused past a bound."""
        end = position + n
        if end > s.max_positions:
            raise OutOfRange(f"the session would hold {end} positions but was granted {s.max_positions}; "
                             "open the session with a larger max_positions or start a new conversation")
        need = s.cache.nbytes_for(end)
        with self.lock:
            self._charge(s, need - s.charged)
        s.cache.shrink(position)  # positions from `position` on are replaced by this step

    def _charge(self, s: Session, delta: int) -> None:
        usage = self.owners[s.owner]
        if delta > 0 and self.used_kv_bytes + delta > self.max_kv_bytes:
            raise ResourceExhausted(
                f"KV cache budget exhausted: {self.used_kv_bytes / 2**20:.1f} of {self.max_kv_bytes / 2**20:.1f} MiB "
                f"allocated and this step needs {delta / 2**20:.2f} MiB more; retry later or run locally")
        if delta > 0 and usage.kv_bytes + delta > self.limits.owner_kv_bytes:
            raise ResourceExhausted(
                f"this token's KV cache share is exhausted: {usage.kv_bytes / 2**20:.1f} of "
                f"{self.limits.owner_kv_bytes / 2**20:.1f} MiB allocated and this step needs {delta / 2**20:.2f} MiB "
                "more; close sessions it no longer uses or run locally")
        self.used_kv_bytes += delta
        usage.kv_bytes += delta
        s.charged += delta

    def detach(self, s: Session, failed: bool = False) -> None:
        """The session's stream ended: resumable until the idle timeout, or the short grace if it `failed`."""
        s.attached, s.last_used = False, time.monotonic()
        s.grace = self.limits.error_grace if failed else None

    def close(self, s: Session) -> None:
        with self.lock:
            if self.sessions.pop(s.id, None) is not None:
                self.used_kv_bytes -= s.charged
                usage = self.owners[s.owner]
                usage.sessions -= 1
                usage.kv_bytes -= s.charged
                if usage.sessions == 0:
                    del self.owners[s.owner]
            s.closed = True

    def expire(self) -> int:
        """Close sessions idle for longer than their limit (idle timeout, or grace after a failure)."""
        now = time.monotonic()
        idle = [s for s in list(self.sessions.values())
                if now - s.last_used > (self.idle_timeout if s.grace is None else s.grace)]
        for s in idle:
            self.close(s)
        return len(idle)
