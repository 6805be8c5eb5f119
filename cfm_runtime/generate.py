"""Prefill and decode loops over a runner (local, or split with a center), with per-answer statistics."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import numpy as np

from .errors import ContextOverflowError, CfmError
from .memory import peak_rss_mb, rss_parts_mb
from .runners import Runner
from .sampling import Sampler, SamplingParams
from .speculative import Speculation
from .tokenizer import Tokenizer


@contextmanager
def torch_threads(n: int | None):
    """Torch's intra-op thread count set to n for the block (None: left as it is, and torch not loaded)."""
    if n is None:
        yield
        return
    import torch  # only a torch backend asks for a count

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions reused from the previous turn's KV cache
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0  # runner steps while decoding (a speculative step verifies several positions)
    decode_tokens: int = 0  # tokens those steps produced (without speculation: one per step)
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)  # telemetry: the runner's report() (backend, split, sparse), bricks

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        rss = rss_parts_mb()
        d.update(prompt_tps=self.prompt_tps, decode_tps=self.decode_tps, peak_rss_mb=peak_rss_mb(),
                 rss_anon_mb=rss.get("anon"), rss_file_mb=rss.get("file"), **extra)
        return d


@dataclass
class GenerationChunk:
    text: str
    token: int | None
    stats: GenerationStats


class StopMatcher:
    """Holds back text that may be the start of a stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, text: str) -> tuple[str, bool]:
        """-> (text safe to emit, whether a stop string was hit)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out, True
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class BrickSelector(Protocol):
    """Puts the bricks an answer needs on the model before its prompt runs (`cfm_runtime.bricks.BrickSet`)."""

    def select(self, prompt_ids: list[int], requested: list[tuple[str, float]] | None) -> bool:
        """Apply the bricks for this prompt (`requested`: a caller's choice; None: the run's own rule);
        True if the model's bricks changed (the cached positions were computed with other weights)."""

    def report(self) -> dict:
        """Telemetry of the last selection, merged into `GenerationStats.extra`."""

    def close(self) -> None:
        """Take off the bricks the selector put on."""


class PlainSteps:
    """Decode steps without speculation: `step(token, history)` feeds the token, samples the next one."""

    def __init__(self, runner: Runner, sampler: Sampler, stats: GenerationStats, cached: list[int]):
        self.runner, self.sampler, self.stats, self.cached = runner, sampler, stats, cached

    def step(self, token: int, history: list[int]) -> int:
        t0 = time.perf_counter()
        logits = self.runner.forward([token])[-1]
        self.stats.decode_seconds += time.perf_counter() - t0
        self.stats.decode_steps += 1
        self.stats.decode_tokens += 1
        self.cached.append(token)
        return self.sampler(logits, history)


class Generator:
    """Owns a runner and the ids in its cache; a new prompt reuses the longest cached prefix. With `speculation`,
    decode steps verify drafted tokens (`cfm_runtime.speculative`)."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, context_length: int,
                 bricks: BrickSelector | None = None, speculation: Speculation | None = None):
        self.runner, self.tokenizer, self.context_length = runner, tokenizer, context_length
        self.bricks = bricks
        self.speculation = speculation
        self.tokens: list[int] = []

    def reset(self) -> None:
        """Forget the cached conversation (the next prompt is computed from its first token)."""
        self.runner.truncate(0)
        self.tokens = []

    def close(self) -> None:
        """Release the runner (a center session) and take off the bricks this generator put on."""
        self.runner.close()
        if self.bricks is not None:
            self.bricks.close()

    def _prefill(self, ids: list[int], stats: GenerationStats) -> np.ndarray:
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1, self.runner.n_past)  # the last id is always fed: we need its logits
        self.runner.truncate(common)
        self.tokens = ids[:common]
        stats.cached_tokens = common
        t0 = time.perf_counter()
        logits = self.runner.forward(ids[common:])[-1]
        stats.prompt_seconds = time.perf_counter() - t0
        self.tokens = list(ids)
        return logits

    def stream(self, prompt_ids: list[int], params: SamplingParams,
               bricks: list[tuple[str, float]] | None = None) -> Iterator[GenerationChunk]:
        """Yields GenerationChunk(text, token, stats); the last chunk has empty text and final stats.
        `bricks`: the bricks (name, weight) for this answer instead of the run's own choice."""
        if not prompt_ids:
            raise CfmError("the prompt is empty; give some text to continue or a chat message")
        if len(prompt_ids) >= self.context_length:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {self.context_length}; "
                "shorten the prompt (or start a new chat)"
            )
        if bricks is not None and self.bricks is None:
            raise CfmError("this generator was made without bricks; ask for them in its run options")
        if self.bricks is not None and self.bricks.select(prompt_ids, bricks):
            self.reset()  # the cached prefix was computed with other bricks
        self.runner.begin()
        with torch_threads(self.runner.torch_threads()):
            for chunk in self._stream(prompt_ids, params):
                chunk.stats.extra.update(self.runner.report())
                if self.bricks is not None:
                    chunk.stats.extra.update(self.bricks.report())
                if self.speculation is not None:
                    chunk.stats.extra["speculative"] = self.speculation.report()
                yield chunk

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        sampler, streamer, stopper = Sampler(params), self.tokenizer.streamer(), StopMatcher(params.stop)
        logits = self._prefill(prompt_ids, stats)
        history = list(prompt_ids)
        steps = self._steps(sampler, stats, params, prompt_ids)
        token = sampler(logits, history)
        while True:
            if token in self.tokenizer.eog_ids:
                stats.finish_reason = "stop"
                break
            history.append(token)
            stats.generated_tokens += 1
            text, hit = stopper.push(streamer.push(token))
            if hit:
                stats.finish_reason = "stop"
                if text:
                    yield GenerationChunk(text, token, stats)
                break
            if text:
                yield GenerationChunk(text, token, stats)
            if stats.generated_tokens >= params.max_tokens or len(history) >= self.context_length:
                stats.finish_reason = "length"
                break
            token = steps.step(token, history)
        if not stopper.stopped:
            tail, _ = stopper.push(streamer.flush())
            tail += stopper.flush()
            if tail:
                yield GenerationChunk(tail, None, stats)
        yield GenerationChunk("", None, stats)  # the last chunk carries the final stats

    def _steps(self, sampler: Sampler, stats: GenerationStats, params: SamplingParams, prompt_ids: list[int]):
        """The decode steps of this answer: plain, or speculative (drafts verified several at a time)."""
        if self.speculation is None:
            return PlainSteps(self.runner, sampler, stats, self.tokens)
        self.speculation.begin(prompt_ids)
        return self.speculation.steps(self.runner, sampler, stats, self.tokens, params.max_tokens, self.context_length)
