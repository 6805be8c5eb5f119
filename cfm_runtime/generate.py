"""Prefill and decode loops over a runner (local spans, or spans composed with a center)."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Iterator, Protocol

import torch

from .errors import ContextOverflowError, CfmError
from .model import SpanCache, Transformer
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer


class Runner(Protocol):
    """Runs token ids through the whole model, keeping a KV cache of `n_past` positions."""

    n_past: int

    def forward(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        """Feed ids after the cached ones; logits [len(ids) or 1, vocab] in float32."""

    def truncate(self, n: int) -> None:
        """Forget cached positions from n on."""


@contextmanager
def torch_threads(n: int | None):
    """Torch's intra-op thread count set to n for the block (None: left as it is)."""
    if n is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class LocalRunner:
    """All layers on this machine, prompt fed in chunks of `chunk` tokens."""

    def __init__(self, model: Transformer, max_len: int | None = None, chunk: int = 512):
        self.model, self.chunk = model, chunk
        self.cache: SpanCache = model.new_cache(max_len=max_len)

    @property
    def n_past(self) -> int:
        return self.cache.offset

    @torch.inference_mode()
    def forward(self, ids: list[int], all_logits: bool = False) -> torch.Tensor:
        outs = []
        fused = getattr(self.model, "fused", None)  # set by load_model(weights="int4"|"int8"): cfm_runtime.quant
        for s in range(0, len(ids), self.chunk):
            part = ids[s:s + self.chunk]
            if fused is not None and fused.usable():
                logits = fused.forward(part, self.cache, all_logits)
                if all_logits or s + self.chunk >= len(ids):
                    outs.append(logits)
                continue
            h = self.model.embed(torch.tensor([part]))
            h = self.model.forward_span(h, 0, self.model.config.n_layers, [self.cache])
            if all_logits or s + self.chunk >= len(ids):
                outs.append(self.model.head(h if all_logits else h[:, -1:])[0])
        return torch.cat(outs)

    def truncate(self, n: int) -> None:
        self.cache.truncate(n)

    def torch_threads(self) -> int | None:
        """Torch threads for a generation: 1 while the fused onnxruntime graph does the work (its own workers
        compute; torch only samples and looks up embeddings, and its OpenMP workers, spinning after each of
        those small parallel ops, took the cores from onnxruntime's: 0.69x -> 0.76x llama.cpp decode, and
        0.85x with onnxruntime's workers spinning, measured), else None (unchanged)."""
        fused = getattr(self.model, "fused", None)
        return 1 if fused is not None and fused.usable() else None


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt positions reused from the previous turn's KV cache
    generated_tokens: int = 0
    prompt_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    finish_reason: str | None = None
    extra: dict = field(default_factory=dict)  # telemetry from runners (split, sparse, ...)

    @property
    def prompt_tps(self) -> float:
        n = self.prompt_tokens - self.cached_tokens
        return n / self.prompt_seconds if self.prompt_seconds > 0 else 0.0

    @property
    def decode_tps(self) -> float:
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        extra = d.pop("extra")
        d.update(prompt_tps=self.prompt_tps, decode_tps=self.decode_tps, peak_rss_mb=peak_rss_mb(), **extra)
        return d


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


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


class Generator:
    """Owns a runner and the ids in its cache; a new prompt reuses the longest cached prefix."""

    def __init__(self, runner: Runner, tokenizer: Tokenizer, context_length: int):
        self.runner, self.tokenizer, self.context_length = runner, tokenizer, context_length
        self.tokens: list[int] = []

    def _prefill(self, ids: list[int], stats: GenerationStats) -> torch.Tensor:
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

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        if not prompt_ids:
            raise CfmError("the prompt is empty; give some text to continue or a chat message")
        if len(prompt_ids) >= self.context_length:
            raise ContextOverflowError(
                f"the prompt has {len(prompt_ids)} tokens but the model's context holds {self.context_length}; "
                "shorten the prompt (or start a new chat)"
            )
        threads = getattr(self.runner, "torch_threads", None)
        with torch_threads(threads() if threads is not None else None):
            yield from self._stream(prompt_ids, params)

    def _stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        stats = GenerationStats(prompt_tokens=len(prompt_ids))
        sampler, streamer, stopper = Sampler(params), self.tokenizer.streamer(), StopMatcher(params.stop)
        logits = self._prefill(prompt_ids, stats)
        history = list(prompt_ids)
        while True:
            token = sampler(logits, history)
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
            t0 = time.perf_counter()
            logits = self.runner.forward([token])[-1]
            stats.decode_seconds += time.perf_counter() - t0
            stats.decode_steps += 1
            self.tokens.append(token)
        if not stopper.stopped:
            tail, _ = stopper.push(streamer.flush())
            tail += stopper.flush()
            if tail:
                yield GenerationChunk(tail, None, stats)
        yield GenerationChunk("", None, stats)  # the last chunk carries the final stats
