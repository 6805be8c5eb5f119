"""Split planner: measure the link and both sides' speed, predict per-token latency of each split.

Per decode token: local layers x local layer time + embeddings/head, plus for a split one round
trip (RTT + hidden states up and down at the measured bandwidth) and the center's layers at the
center's measured layer time. With speculative decoding (`cfm_runtime.speculative.Estimate`) a step
feeds several positions (compute and bytes grow with them, the round trip does not) and yields several
tokens, so the per-token cost of a step is divided by its tokens. The plan is the split (or local-only) with
the lowest prediction, keeping at least `min_edge_layers` layers on the edge before the center (a privacy
floor). Every plan says what a center could recover from the hidden states at its split, from the measured
table in cfm_runtime/data/privacy.json (docs/privacy.md).
"""

from __future__ import annotations

import functools
import json
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import resources

from ..errors import CfmError
from ..protocol import wire
from ..speculative import Estimate

from .client import CenterClient


@dataclass
class Measurements:
    rtt_ms: float
    up_mbps: float  # megabytes per second
    down_mbps: float
    local_layer_ms: float
    local_head_ms: float
    center_layer_ms: float
    span: tuple[int, int]
    n_layers: int
    bytes_per_position: int


PRIVACY_DATA = "privacy.json"  # in cfm_runtime/data: written by `python benchmarks/bench_privacy.py --budget`


@functools.cache
def privacy_table() -> dict:
    """The measured summary (docs/privacy.md): `by_edge_layers` maps edge layers before the center (the same
    number after it) to the undefended recovery rates of the user's prompt tokens and the answer's; `target_met`
    and `best_within_perplexity_budget` the defences' verdict. Empty if the file is missing."""
    try:
        text = resources.files("cfm_runtime").joinpath("data", PRIVACY_DATA).read_text()
    except FileNotFoundError:
        return {}
    return json.loads(text)


def privacy_note(split: tuple[int, int] | None, table: dict | None = None) -> str:
    """What a center that knows the public weights could recover at `split` in principle, from the measured
    table (the nearest measured split with no more edge layers: an over-estimate where between)."""
    if split is None:
        return "privacy: local-only, no hidden state leaves this device"
    table = privacy_table() if table is None else table
    a = split[0]
    rows = {int(k): v for k, v in table.get("by_edge_layers", {}).items()}
    k = max((k for k in rows if k <= a), default=None)
    layers = f"{a} edge layer{'s' if a != 1 else ''} before the center"
    if k is None:
        return (f"privacy: with {layers}, the hidden states sent to the center reveal text; no measurement for this "
                f"split (docs/privacy.md, python benchmarks/bench_privacy.py --budget)")
    r = rows[k]
    note = (f"privacy: with {layers}, a center that knows the public weights could recover about "
            f"{_pct(r.get('prompt_exact_search'))} of the prompt's tokens (exact search; a learned inverter "
            f"{_pct(r.get('prompt_inverter'))}) and {_pct(r.get('answer_logit_lens'))} of the answer's (logit lens), "
            f"measured with {k} edge layers at each end on {table.get('model', 'the embedded model')} (docs/privacy.md)")
    best = table.get("best_within_perplexity_budget")
    if table.get("target_met") is False and best:
        note += (f"; no measured configuration (more edge layers, noise, private bricks) keeps both under 10% within "
                 f"+3% perplexity (best trade-off: {best['name']}, worst attack {_pct(best['worst_recovery'])} at "
                 f"{best['perplexity_change']:+.1%} perplexity): for privacy from the center, run local-only")
    return note


def _pct(x) -> str:
    return "?" if x is None else f"{x:.0%}"


@dataclass
class Plan:
    split: tuple[int, int] | None  # None: local-only
    predicted_ms: float
    local_only_ms: float
    measurements: Measurements
    min_edge_layers: int = 1  # the privacy floor the plan kept
    speculation: Estimate | None = None  # what the prediction assumed about speculative decoding

    def to_dict(self) -> dict:
        return {"split": list(self.split) if self.split else None, "predicted_ms_per_token": round(self.predicted_ms, 2),
                "local_only_ms_per_token": round(self.local_only_ms, 2), "min_edge_layers": self.min_edge_layers,
                "speculation": asdict(self.speculation) if self.speculation else None,
                "privacy": privacy_note(self.split), **asdict(self.measurements)}

    def describe(self) -> str:
        m = self.measurements
        link = (f"RTT {m.rtt_ms:.2f} ms, up {m.up_mbps:.0f} MB/s, down {m.down_mbps:.0f} MB/s; "
                f"layer {m.local_layer_ms:.2f} ms here, {m.center_layer_ms:.2f} ms on the center")
        if self.speculation is not None:
            link += f"; speculative, {self.speculation.tokens_per_step:g} tokens per step"
        floor = f", at least {self.min_edge_layers} edge layers before the center" if self.min_edge_layers > 1 else ""
        if self.split is None:
            head = f"plan: local-only, {self.local_only_ms:.1f} ms/token predicted ({link}{floor})"
        else:
            a, b = self.split
            head = (f"plan: edge 0:{a} + {b}:{m.n_layers}, center {a}:{b}: {self.predicted_ms:.1f} ms/token predicted "
                    f"vs {self.local_only_ms:.1f} local-only ({link}{floor})")
        return f"{head}\n{privacy_note(self.split)}"


def local_speed(model, repeats: int = 3) -> tuple[float, float]:
    """(ms per decode position per layer, ms for embedding + head) on this machine, on the model's backend."""
    n, backend = model.config.n_layers, model.backend
    cache = model.new_cache(max_len=2 * repeats + 2)
    h = backend.embed([1])
    backend.span(h, 0, n, [cache])
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.span(h, 0, n, [cache])
    layer = (time.perf_counter() - t0) * 1000 / repeats / n
    t0 = time.perf_counter()
    for _ in range(repeats):
        backend.span_head(backend.embed([1]), n, cache)
    return layer, (time.perf_counter() - t0) * 1000 / repeats


def measure(model, client: CenterClient, dtype: int, probes: int = 5, probe_bytes: int = 2**20) -> Measurements:
    info = client.info()
    client.ping()  # warm the channel
    rtt = statistics.median(client.ping() for _ in range(probes))
    up = statistics.median(client.ping(payload=probe_bytes) for _ in range(3))
    down = statistics.median(client.ping(reply=probe_bytes) for _ in range(3))
    layer_ms, head_ms = local_speed(model)
    return Measurements(
        rtt_ms=rtt * 1000, up_mbps=probe_bytes / max(up - rtt, 1e-6) / 1e6,
        down_mbps=probe_bytes / max(down - rtt, 1e-6) / 1e6, local_layer_ms=layer_ms, local_head_ms=head_ms,
        center_layer_ms=info.layer_decode_ms, span=(info.span_start, info.span_end), n_layers=info.n_layers,
        bytes_per_position=wire.bytes_per_position(info.hidden_size, dtype))


def predict(m: Measurements, split: tuple[int, int] | None, spec: Estimate | None = None) -> float:
    """Predicted milliseconds per decode token (with `spec`: per token of a speculative step)."""
    positions = spec.positions_per_step if spec else 1.0
    compute = 1.0 + (spec.cost_per_position * (positions - 1) if spec else 0.0)  # a step of several positions
    tokens = spec.tokens_per_step if spec else 1.0
    if split is None:
        return (m.local_layer_ms * m.n_layers + m.local_head_ms) * compute / tokens
    a, b = split
    transfer = m.bytes_per_position / 1e3 * (1 / m.up_mbps + 1 / m.down_mbps)  # MB/s -> bytes per ms
    return ((m.local_layer_ms * (a + m.n_layers - b) + m.local_head_ms + m.center_layer_ms * (b - a)) * compute
            + m.rtt_ms + transfer * positions) / tokens


def choose(m: Measurements, min_edge_layers: int = 1, spec: Estimate | None = None) -> Plan:
    """The split inside the center's span (or local-only) with the lowest predicted latency, keeping at least
    `min_edge_layers` layers on the edge before the center (none left inside the span: local-only)."""
    check_floor(min_edge_layers)
    s0, s1 = m.span
    candidates = [(a, b) for a in range(max(s0, min_edge_layers), s1) for b in range(a + 1, s1 + 1)]
    local = predict(m, None, spec)
    best = min(candidates, key=lambda c: predict(m, c, spec), default=None)
    if best is None or predict(m, best, spec) >= local:
        return Plan(None, local, local, m, min_edge_layers, spec)
    return Plan(best, predict(m, best, spec), local, m, min_edge_layers, spec)


def check_floor(min_edge_layers: int) -> None:
    if not isinstance(min_edge_layers, int) or isinstance(min_edge_layers, bool) or min_edge_layers < 1:
        raise CfmError(f"the privacy floor (--min-edge-layers) must be an integer >= 1, got {min_edge_layers!r}")


def plan(model, client: CenterClient, wire_dtype: str = "fp32", min_edge_layers: int = 1,
         spec: Estimate | None = None) -> Plan:
    """Measure the link and both sides, and choose a split (or local-only) with the privacy floor kept;
    `spec`: what to assume about speculative decoding."""
    return choose(measure(model, client, wire.parse_dtype(wire_dtype)), min_edge_layers, spec)
