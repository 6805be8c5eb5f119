"""Next-token sampling: greedy, temperature, top-k, top-p, repetition penalty, seeded."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from .errors import CfmError, NonFiniteError


@dataclass
class SamplingParams:
    """Defaults follow llama.cpp's CLI; temperature 0 means greedy."""

    max_tokens: int = 256
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    repetition_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None
    stop: list[str] = field(default_factory=list)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        problems = []
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            problems.append(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        if problems:
            raise CfmError("; ".join(problems))


def check_finite(logits: np.ndarray, position: int) -> None:
    """NaN or +inf anywhere, or no finite logit at all; -inf alone masks a token out and is allowed. One
    reduction decides: the maximum is NaN with any NaN, +inf with any +inf, -inf when every logit is -inf."""
    if not np.isfinite(np.max(logits)):
        raise NonFiniteError(f"the model computed NaN or infinite logits at position {position}, so no token can be "
                             "chosen; a brick or weights with values too large for the model cause this: remove "
                             "the brick (cfm brick list) or check the model file")


class Sampler:
    """Picks tokens from logits as `params` say; numpy's PCG64 generator, seeded (`seed`) or from the OS."""

    def __init__(self, params: SamplingParams):
        self.p = params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.rng = np.random.Generator(np.random.PCG64(seed))

    @property
    def greedy(self) -> bool:
        return self.p.temperature == 0 or self.p.top_k == 1

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """logits [vocab] -> a token id; `history` is the context so far (for the penalty). NaN or +inf logits
        are refused (`NonFiniteError`): a token drawn from them would end the answer as a silent "stop"."""
        check_finite(logits, len(history))
        logits = self._penalised(logits, history)
        if self.greedy:
            return int(np.argmax(logits))
        idx, probs = self._candidates(logits)
        return int(idx[self.rng.choice(len(probs), p=probs)])

    def verify(self, logits: np.ndarray, history: list[int], draft: int) -> tuple[bool, int]:
        """Speculative sampling against a drafted token (a point mass on `draft`): -> (accepted, token).
        The token is drawn as `__call__` draws it (one draw of the generator) and the draft is accepted iff they
        are equal: accepted with probability p(draft), else a token from p without the draft, renormalised,
        which is the speculative-sampling rule for a point-mass draft. Every generated token takes one draw
        whether it was drafted or not, so a seed gives the same text with and without speculation."""
        token = self(logits, history)
        return token == draft, token

    def _penalised(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)
        if p.repetition_penalty != 1.0 and history:
            recent = np.asarray(sorted(set(history[-p.repeat_last_n:])), dtype=np.int64)
            picked = logits[recent]
            logits = logits.copy()
            logits[recent] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        return logits

    def _candidates(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """-> (token ids [n], probabilities [n] in float64, summing to 1) after temperature, top-k and top-p."""
        p = self.p
        if p.top_k:
            k = min(p.top_k, logits.shape[-1])
            idx = np.argpartition(-logits, k - 1)[:k]
            idx = idx[np.argsort(-logits[idx], kind="stable")]
        else:
            idx = np.argsort(-logits, kind="stable")
        z = logits[idx].astype(np.float64) / p.temperature
        probs = np.exp(z - z.max())
        probs /= probs.sum()
        if p.top_p < 1.0:
            keep = np.cumsum(probs) - probs < p.top_p  # smallest prefix reaching top_p
            probs = probs * keep
            probs /= probs.sum()
        return idx, probs
