"""Speculative decoding: drafters propose tokens, one runner step verifies them all, the longest correct prefix stays.

One verification step feeds the last sampled token and k drafted tokens (`runner.forward(ids, all_logits=True)`),
gets k + 1 rows of logits, and walks them: row i is sampled (or compared, when greedy) against draft token i with
the speculative-sampling rule (`Sampler.verify`: one draw per token, accepted iff it is the draft), so the
output has exactly the distribution of plain decoding, and a seed gives the text of plain decoding;
the first rejected row gives the corrected token, and a fully accepted draft gets a bonus token from the last row.
The runner then forgets the rejected positions (`truncate`; a split runner's next step rewinds the center).

On the int4 backends (the native kernel) a chunk of positions gives the same bits as the same tokens fed one at a time, so greedy
output is identical to plain greedy decoding, token for token. The fp32 `modules` backend computes a chunk with
matrix-matrix products and a step with matrix-vector ones: greedy output there can differ where two tokens are
within rounding of each other (docs/speculative.md has the measurement).

Under a grammar (`cfm_runtime.grammar`), the tokens it forces (a JSON key, a call's fixed text) are the draft,
and a drafter's proposal is cut before the first token the grammar forbids.

Drafters cost nothing on the center:
- `LookupDrafter`: prompt lookup, the tokens that followed the latest earlier occurrence of the last n tokens in
  the prompt or the text generated so far (llama.cpp's lookup decoding, transformers' prompt_lookup_num_tokens).
- `EdgeDrafter` (split runs): the layers this device holds, skipping the center's span, greedy.

`Policy` picks k for each step: the k that maximises expected tokens per unit of step time, from the measured
acceptance of each kind of draft (a geometric model) and the measured cost of a step by the positions it feeds.
With "auto", k may be 0 (no draft) where drafting is not expected to pay; a draft of one token is then tried
every `probe_every` steps so the acceptance estimate can recover.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from .errors import CfmError
from .options import refusal
from .runners import Runner
from .sampling import Sampler


@dataclass
class Draft:
    tokens: list[int]
    source: str  # what proposed it, the key of its acceptance statistics ("lookup:3", "edge")


class Drafter(Protocol):
    name: str
    source: str | None  # the statistics key of every draft, when known before drafting (costly drafters)

    def begin(self, history: list[int]) -> None:
        """An answer starts with this context (prompt ids)."""

    def draft(self, history: list[int], k: int) -> Draft | None:
        """Up to k tokens likely to follow `history` (whose last token is not in the runner's cache yet)."""


class LookupDrafter:
    """N-gram matches in the context: after the last n tokens (n from `max_n` down to `min_n`), propose what followed
    their latest earlier occurrence. Each n-gram size keeps an index {n-gram: position of the token after it},
    extended as the context grows, so a draft costs a few dictionary look-ups."""

    name = "lookup"
    source = None  # "lookup:n", n the size of the match found; "lookup:n:self" when it is in the answer itself

    def __init__(self, max_n: int = 4, min_n: int = 1):
        self.sizes = tuple(range(max_n, min_n - 1, -1))
        self.index: dict[int, dict[tuple, int]] = {n: {} for n in self.sizes}
        self.seen: list[int] = []
        self.prompt_len = 0

    def begin(self, history: list[int]) -> None:
        self.index = {n: {} for n in self.sizes}
        self.seen = []
        self.prompt_len = len(history)
        self._extend(history)

    def _extend(self, history: list[int]) -> None:
        """Index the positions of `history` not indexed yet (it extends what was seen in this answer)."""
        start = len(self.seen)
        self.seen.extend(history[start:])
        for i in range(max(start, 1), len(history)):
            for n in self.sizes:
                if i >= n:
                    self.index[n][tuple(history[i - n:i])] = i

    def draft(self, history: list[int], k: int) -> Draft | None:
        if len(history) < len(self.seen):  # not the context this answer began with
            self.begin(history)
        self._extend(history)
        for n in self.sizes:
            at = self.index[n].get(tuple(history[-n:])) if len(history) > n else None
            if at is not None:  # the suffix itself is indexed only once a token follows it: `at` is earlier
                return Draft(history[at:at + k], f"lookup:{n}" + (":self" if at > self.prompt_len else ""))
        return None


class EdgeDrafter:
    """Greedy drafts from the layers a split run keeps on this device: layers [0, a) then [b, n) and the head,
    skipping the center's span [a, b). It uses the split runner's own cache (the positions it writes there are
    forgotten before the verification step), so the accepted positions' edge layers need no second copy."""

    name = "edge"
    source = "edge"

    def __init__(self, model, cache, span: tuple[int, int]):
        self.model, self.cache, self.span = model, cache, span

    def begin(self, history: list[int]) -> None:
        pass

    def draft(self, history: list[int], k: int) -> Draft | None:
        if k < 1:
            return None
        a, b = self.span
        backend = self.model.backend
        start = self.cache.offset  # the runner's n_past: every token of history but the last
        token, tokens = history[-1], []
        try:
            for _ in range(k):
                h = backend.span(backend.embed([token]), 0, a, [self.cache])
                token = int(np.argmax(backend.span_head(h, b, self.cache)[-1]))
                tokens.append(token)
        finally:
            self.cache.truncate(start)
        return Draft(tokens, "edge")


# ---------------------------------------------------------------- choosing k


# Per-token acceptance of each kind of draft before any was verified, measured on the shipped tasks
# (benchmarks/results/speculative.json): longer n-gram matches are right more often; edge-only drafts (26 of 30
# layers skipped) almost never are.
PRIOR_ACCEPTANCE = {"lookup:1": 0.3, "lookup:2": 0.6, "lookup:3": 0.7, "lookup:4": 0.85, "edge": 0.05,
                    "grammar": 0.95,
                    # matches in the answer's own text: an open chat repeats its phrases far less often than an
                    # edit copies its prompt (measured: 3 of 18 such drafts accepted on a chat answer)
                    "lookup:1:self": 0.1, "lookup:2:self": 0.25, "lookup:3:self": 0.35, "lookup:4:self": 0.45}


@dataclass
class Acceptance:
    """Per-token acceptance of one kind of draft, geometric model: each accepted token is a success, a rejection a
    failure (a fully accepted draft has none); counts decay so the estimate follows the text, starting from
    `prior` worth `weight` tokens."""

    prior: float = 0.5
    accepted: float = 0.0
    rejected: float = 0.0
    weight: float = 2.0
    decay: float = 0.9

    @property
    def rate(self) -> float:
        return (self.accepted + self.prior * self.weight) / (self.accepted + self.rejected + self.weight)

    def update(self, drafted: int, accepted: int) -> None:
        self.accepted = self.accepted * self.decay + accepted
        self.rejected = self.rejected * self.decay + (accepted < drafted)


class StepCost:
    """Seconds of a verification step as a + b * positions fed, fitted to the medians of the latest steps of each
    size (medians: other processes on the machine make single steps slow at random). `ratio()` is b / (a + b), the
    cost of one more drafted position relative to a one-position step: the prior until at least two sizes have
    `support` steps each, then blended with the fit as steps accumulate (timings on a shared machine are noisy)."""

    def __init__(self, prior: float, window: int = 32, support: int = 8):
        self.prior, self.window, self.support = prior, window, support
        self.recent: dict[int, deque] = {}

    def update(self, rows: int, seconds: float) -> None:
        self.recent.setdefault(rows, deque(maxlen=self.window)).append(seconds)

    def ratio(self) -> float:
        points = [(r, statistics.median(d), len(d)) for r, d in self.recent.items() if len(d) >= self.support]
        fit = _fit_ratio(points) if len(points) >= 2 else None
        if fit is None:
            return self.prior
        n = sum(w for _, _, w in points)
        trust = n / (n + 4 * self.window)
        return min(max(trust * fit + (1 - trust) * self.prior, 0.02), 2.0)


def _fit_ratio(points: list[tuple[int, float, int]]) -> float | None:
    """Weighted least squares of seconds on positions -> slope / (value at one position), or None."""
    sw = sum(w for _, _, w in points)
    mx = sum(w * x for x, _, w in points) / sw
    my = sum(w * y for _, y, w in points) / sw
    var = sum(w * (x - mx) ** 2 for x, _, w in points)
    if var <= 0:
        return None
    slope = sum(w * (x - mx) * (y - my) for x, y, w in points) / var
    one = my + slope * (1 - mx)
    return slope / one if one > 0 else None


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens a step yields with k drafted tokens each accepted with probability alpha: 1 + alpha + ... + alpha^k."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_k(alpha: float, ratio: float, limit: int) -> int:
    """The k in [0, limit] with the most expected tokens per unit of step time (cost 1 + ratio * k)."""
    return max(range(limit + 1), key=lambda k: (expected_tokens(alpha, k) / (1.0 + ratio * k), -k))


class Policy:
    """How many drafted tokens each step verifies: none where drafting is not expected to pay (a draft that keeps
    missing then costs nothing), with a one-token probe every `probe_every` steps that had a draft, so the
    acceptance estimate can recover."""

    def __init__(self, cost_prior: float, k_max: int = 16, probe_every: int = 16):
        self.k_max, self.probe_every = k_max, probe_every
        self.acceptance: dict[str, Acceptance] = {}
        self.cost = StepCost(cost_prior)
        self.skipped = 0  # steps with a draft not used since the last probe

    def begin(self) -> None:
        """A new answer: acceptance starts again from the priors (another prompt may copy more or less); the
        measured step cost carries over."""
        self.acceptance, self.skipped = {}, 0

    def _acceptance(self, source: str) -> Acceptance:
        return self.acceptance.setdefault(source, Acceptance(PRIOR_ACCEPTANCE.get(source, 0.5)))

    def choose(self, source: str, available: int) -> int:
        alpha = self._acceptance(source).rate
        k = best_k(alpha, self.cost.ratio(), min(self.k_max, available))
        if k == 0 and available > 0:
            self.skipped += 1
            if self.skipped >= self.probe_every:
                self.skipped, k = 0, 1
        return k

    def record(self, draft: Draft, accepted: int, rows: int, seconds: float) -> None:
        if draft.tokens:
            self._acceptance(draft.source).update(len(draft.tokens), accepted)
        self.cost.update(rows, seconds)

    def state(self) -> dict:
        return {"cost_per_drafted_position": round(self.cost.ratio(), 3),
                "acceptance_by_source": {s: round(a.rate, 3) for s, a in sorted(self.acceptance.items())}}


# ---------------------------------------------------------------- a generator's speculation


@dataclass
class Counters:
    steps: int = 0
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens the decode steps produced (taken by the generator)
    by_source: dict = field(default_factory=dict)  # source -> [drafted, accepted]


class Speculation:
    """A generator's speculative decoding: its drafter and policy (what was measured about the cost of a step carries
    over from answer to answer), and this answer's counters."""

    def __init__(self, mode: str, drafter: Drafter, policy: Policy, note: str = "", split: bool = False):
        self.mode, self.drafter, self.policy, self.note, self.split = mode, drafter, policy, note, split
        self.counters = Counters()

    def begin(self, prompt_ids: list[int]) -> None:
        self.drafter.begin(prompt_ids)
        self.policy.begin()
        self.counters = Counters()

    def steps(self, runner: Runner, sampler: Sampler, stats, cached: list[int], max_tokens: int,
              context_length: int) -> "SpeculativeSteps":
        return SpeculativeSteps(self, runner, sampler, stats, cached, max_tokens, context_length)

    def report(self) -> dict:
        c = self.counters
        out = {"mode": self.mode, "drafter": self.drafter.name, "steps": c.steps, "drafted": c.drafted,
               "accepted": c.accepted, "acceptance_rate": round(c.accepted / c.drafted, 3) if c.drafted else None,
               "tokens_per_step": round(c.tokens / c.steps, 3) if c.steps else None,
               "by_source": {s: {"drafted": d, "accepted": a} for s, (d, a) in sorted(c.by_source.items())},
               **self.policy.state()}
        if self.split:  # a decode step is one round trip while the center serves (see split.positions_local)
            out["tokens_per_round_trip"] = out["tokens_per_step"]
        if self.note:
            out["note"] = self.note
        return out


class SpeculativeSteps:
    """The generator's decode steps with speculation: `step(token, history)` -> the next token. A verification step
    yields several tokens; the ones after the first are handed out by the next calls without running the model
    (their positions are already in the cache)."""

    def __init__(self, spec: Speculation, runner: Runner, sampler: Sampler, stats, cached: list[int],
                 max_tokens: int, context_length: int):
        self.spec, self.runner, self.sampler, self.stats, self.cached = spec, runner, sampler, stats, cached
        self.max_tokens, self.context_length = max_tokens, context_length
        self.ready: list[int] = []  # verified tokens not handed out yet

    def step(self, token: int, history: list[int]) -> int:
        """`token`: the last token taken (already in `history`, not yet in the runner's cache)."""
        c = self.spec.counters
        if self.ready:
            c.tokens += 1
            self.stats.decode_tokens += 1
            return self.ready.pop(0)
        t0 = time.perf_counter()
        draft = self._draft(history)
        start = self.runner.n_past
        ids = [token] + draft.tokens
        rows = self.runner.forward(ids, all_logits=True)
        accepted, nxt = self._verify(rows, draft.tokens, history)
        self.runner.truncate(start + 1 + accepted)
        seconds = time.perf_counter() - t0
        self.cached.extend(ids[:1 + accepted])
        self.spec.policy.record(draft, accepted, len(ids), seconds)
        self._count(draft, accepted, seconds)
        self.ready = draft.tokens[:accepted] + [nxt]
        c.tokens += 1
        self.stats.decode_tokens += 1
        return self.ready.pop(0)

    def _draft(self, history: list[int]) -> Draft:
        """A draft no longer than the answer may still grow (max_tokens, the context) and the policy wants."""
        room = min(self.max_tokens - self.stats.generated_tokens, self.context_length - len(history)) - 1
        if room < 1:
            return Draft([], "none")
        policy, drafter, grammar = self.spec.policy, self.spec.drafter, self.sampler.grammar
        limit = min(room, policy.k_max)
        if grammar is not None:  # tokens the grammar forces: the masked rows allow nothing else
            forced = grammar.forced()[:limit]
            if forced:
                return Draft(forced[:policy.choose("grammar", len(forced))], "grammar")
        if drafter.source is not None:  # a costly drafter: decide k first, then draft only that many
            limit = policy.choose(drafter.source, limit)
        proposal = drafter.draft(history, limit) if limit > 0 else None
        if proposal is None:
            return Draft([], "none")
        tokens = proposal.tokens
        if grammar is not None:  # a token the grammar forbids is never accepted: verifying it is waste
            tokens = tokens[:grammar.valid_prefix(tokens)]
        k = policy.choose(proposal.source, len(tokens)) if drafter.source is None else len(tokens)
        return Draft(tokens[:k], proposal.source)

    def _verify(self, rows: np.ndarray, draft: list[int], history: list[int]) -> tuple[int, int]:
        """rows [len(draft) + 1, vocab] -> (drafted tokens accepted, the token after them)."""
        context = list(history)
        for i, x in enumerate(draft):
            ok, token = self.sampler.verify(rows[i], context, x)
            if not ok:
                return i, token
            context.append(x)
        return len(draft), self.sampler(rows[len(draft)], context)

    def _count(self, draft: Draft, accepted: int, seconds: float) -> None:
        c = self.spec.counters
        c.steps += 1
        self.stats.decode_steps += 1
        self.stats.decode_seconds += seconds
        if draft.tokens:
            c.drafted += len(draft.tokens)
            c.accepted += accepted
            d, a = c.by_source.get(draft.source, (0, 0))
            c.by_source[draft.source] = (d + len(draft.tokens), a + accepted)


@dataclass(frozen=True)
class Estimate:
    """What a planner assumes about speculative decoding: tokens a verification step yields, positions it feeds,
    and the extra compute of one more position relative to a one-position step."""

    tokens_per_step: float
    positions_per_step: float
    cost_per_position: float


# Tokens and positions per step, measured by benchmarks/bench_speculative.py (benchmarks/results/speculative.json,
# "planner_prior"): prompt lookup over the tasks run, drafting-friendly and open chat together, in split runs at
# 50 ms RTT.
PLANNER_PRIOR = {"lookup": (1.65, 2.35), "auto": (1.65, 2.35)}


def estimate(mode: str, position_cost: float) -> Estimate | None:
    """The planner's assumption for a run with `mode` (None: one token per step), with `position_cost` the extra
    compute of one more position (the backend's `position_cost`). "edge" is not planned for: its acceptance
    depends on the split the planner is choosing."""
    prior = PLANNER_PRIOR.get(mode)
    return Estimate(*prior, position_cost) if prior else None


# Extra cost of one more position in a split run's verification step, relative to a one-position step, before any
# step was timed: the round trip and the center's share of the compute dominate it. A local run takes its
# backend's `position_cost` (the native kernel's by its path, `kernels.native.POSITION_COST`).
SPLIT_POSITION_COST = 0.1

# Backends whose chunk of positions computes exactly as the same positions fed one at a time (the native kernel).
EXACT_CHUNKS = ("native", "fused")


def center_span(runner: Runner) -> tuple[int, int] | None:
    """The layers [a, b) a split runner sends to a center, or None (every layer here)."""
    layers = runner.center_layers()
    return (min(layers), max(layers) + 1) if layers else None


def build(mode: str, runner: Runner, model, log=None) -> Speculation | None:
    """The speculation for `mode` over this runner (None: plain decoding).

    "auto" is prompt lookup on the int4 backends (`native`, `fused`), where a chunk of positions computes exactly as
    single steps (greedy output unchanged); it is off on the fp32 `modules` backend, whose chunks round differently.
    "edge" drafts with the layers a split runner keeps on this device; when the planner chose local-only it falls
    back to prompt lookup, saying so. A sparse FFN or offload would compute every neuron for several positions at
    once, which is what it exists to avoid: "auto" is off there and the explicit modes are refused."""
    say = log or (lambda message: None)
    if mode == "off":
        return None
    if model.sparse is not None:
        if mode == "auto":
            return None
        raise CfmError(refusal(f"speculate={mode!r} (--speculate)", "a sparse FFN or offload",
                               "verifying several positions at once computes every FFN neuron (reading the cold ones "
                               "from flash); use --speculate off or auto"))
    if mode == "auto" and model.backend.name not in EXACT_CHUNKS:
        return None
    span = center_span(runner)
    prior = SPLIT_POSITION_COST if span is not None else model.backend.position_cost
    if mode == "edge":
        if span is not None:
            return Speculation(mode, EdgeDrafter(model, runner.cache, span), Policy(prior), split=True)
        say("[speculate edge: the plan runs every layer here, so there are no edge-only layers to draft with; "
            "using prompt lookup]")
        return Speculation(mode, LookupDrafter(), Policy(prior), note="no split: prompt lookup instead")
    return Speculation(mode, LookupDrafter(), Policy(prior), split=span is not None)
