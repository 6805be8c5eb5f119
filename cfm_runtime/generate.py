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
from .grammar import GrammarMatcher
from .sampling import Sampler, SamplingParams, TokenLogprob, log_softmax, token_logprob
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
    logprobs: list[TokenLogprob] = field(default_factory=list)  # the tokens of this chunk (params.logprobs)
    prompt_logprobs: list[TokenLogprob] | None = None  # on the first chunk: the prompt's tokens from the second on


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


SCORE_CHUNK = 64  # prompt positions per forward when their log-probabilities are asked for (64 x vocab floats)


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

    def _prefill(self, ids: list[int], stats: GenerationStats, scores: list[TokenLogprob] | None = None,
                 top: int = 0) -> np.ndarray:
        """Runs the prompt (its longest cached prefix reused) -> the last position's logits. `scores`: a list to
        fill with the log-probabilities of ids[1:] (with `top` alternatives each); then the whole prompt runs,
        a chunk of positions at a time, since no cached position has its logits."""
        common = 0
        for a, b in zip(self.tokens, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1, self.runner.n_past)  # the last id is always fed: we need its logits
        if scores is not None:
            common = 0
        self.runner.truncate(common)
        self.tokens = ids[:common]
        stats.cached_tokens = common
        t0 = time.perf_counter()
        if scores is None:
            logits = self.runner.forward(ids[common:])[-1]
        else:
            for a in range(0, len(ids), SCORE_CHUNK):
                rows = self.runner.forward(ids[a:a + SCORE_CHUNK], all_logits=True)
                for i, row in enumerate(log_softmax(rows)[:len(ids) - 1 - a], start=a + 1):
                    scores.append(token_logprob(row, ids[i], top))
                logits = rows[-1]
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
        params.check_vocab(self.tokenizer.vocab_size)
        if bricks is not None and self.bricks is None:
            raise CfmError("this generator was made without bricks; ask for them in its run options")
        if self.bricks is not None and self.bricks.select(prompt_ids, bricks):
            self.reset()  # the cached prefix was computed with other bricks
        self.runner.begin()
        with torch_threads(self.runner.torch_threads()):
            for chunk in self._stream(prompt_ids, params):
                if chunk.stats.finish_reason is not None:  # the answer's telemetry, once it is complete (every
                    # chunk shares the one stats object; building the reports per token cost ~2% of a step)
                    chunk.stats.extra.update(self.runner.report())
                    if self.bricks is not None:
                        chunk.stats.extra.update(self.bricks.report())
                    if self.speculation is not None:
                        chunk.stats.extra["speculative"] = self.speculation.report()
                yield chunk

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        sampler = Sampler(params, self._matcher(params))
        streamer, stopper = self.tokenizer.streamer(), StopMatcher(params.stop)
        scores = [] if params.prompt_logprobs else None
        logits = self._prefill(prompt_ids, stats, scores, params.logprobs or 0)
        first = dict(prompt_logprobs=scores)  # goes with the first chunk
        history = list(prompt_ids)
        pending: list[TokenLogprob] = []  # log-probabilities of tokens whose text is not out yet
        if params.max_tokens == 0:  # scoring the prompt only
            stats.finish_reason = "length"
            yield GenerationChunk("", None, stats, **first)
            return
        steps = self._steps(sampler, stats, params, prompt_ids)
        token = sampler(logits, history)
        while True:
            if token in self.tokenizer.eog_ids:
                stats.finish_reason = "stop"
                break
            history.append(token)
            stats.generated_tokens += 1
            if sampler.drawn:  # the k-th token taken is the k-th drawn
                pending.append(sampler.drawn[stats.generated_tokens - 1])
            text, hit = stopper.push(streamer.push(token))
            if text:
                yield GenerationChunk(text, token, stats, pending, **first)
                pending, first = [], {}
            if hit:
                stats.finish_reason = "stop"
                break
            if stats.generated_tokens >= params.max_tokens or len(history) >= self.context_length:
                stats.finish_reason = "length"
                break
            token = steps.step(token, history)
        if not stopper.stopped:
            tail, _ = stopper.push(streamer.flush())
            tail += stopper.flush()
            if tail:
                yield GenerationChunk(tail, None, stats, pending, **first)
                pending, first = [], {}
        yield GenerationChunk("", None, stats, pending, **first)  # the last chunk carries the final stats

    def _matcher(self, params: SamplingParams) -> GrammarMatcher | None:
        if params.grammar is None:
            return None
        tok = self.tokenizer
        return GrammarMatcher(params.grammar, tok.grammar_tokenizer(), tok.vocab_size, tok.eog_ids)

    def _steps(self, sampler: Sampler, stats: GenerationStats, params: SamplingParams, prompt_ids: list[int]):
        """The decode steps of this answer: plain, or speculative (drafts verified several at a time)."""
        if self.speculation is None:
            return PlainSteps(self.runner, sampler, stats, self.tokens)
        self.speculation.begin(prompt_ids)
        return self.speculation.steps(self.runner, sampler, stats, self.tokens, params.max_tokens, self.context_length)
