"""Next-token sampling: greedy, temperature, top-k, top-p; repetition, presence and frequency penalties, logit
bias; a grammar's mask; log-probabilities of the tokens drawn; seeded.

The order, for every token drawn: the model's logits; the repetition penalty (llama.cpp's, over the last
`repeat_last_n` tokens of the context); presence and frequency penalties (OpenAI's, over the tokens this
answer drew); `logit_bias`. Log-probabilities are the log-softmax of these logits, the distribution before
temperature, top-k/top-p and the grammar. Then the grammar's mask, then greedy choice or a draw."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .errors import CfmError, NonFiniteError

if TYPE_CHECKING:
    from .grammar import Grammar, GrammarMatcher


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
    presence_penalty: float = 0.0  # OpenAI's: subtracted once from a token this answer already drew
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per time this answer drew the token
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (-100..100)
    logprobs: int | None = None  # None: none; n >= 0: each drawn token's log-probability and the n likeliest
    prompt_logprobs: bool = False  # the prompt's tokens' log-probabilities too (`echo`); then max_tokens may be 0
    grammar: Grammar | None = None  # the answer's text must be a sentence of it (cfm_runtime.grammar)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in (self.stop or []) if s]
        problems = []
        least = 0 if self.prompt_logprobs else 1  # scoring a prompt alone generates nothing
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < least:
            problems.append(f"max_tokens must be an integer >= {least}, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            problems.append(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            problems.append(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            problems.append(f"repetition_penalty must be > 0 (1 disables it), got {self.repetition_penalty!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                problems.append(f"{name} must be between -2 and 2, got {getattr(self, name)!r}")
        self.logit_bias = dict(self.logit_bias or {})
        off = {k: v for k, v in self.logit_bias.items() if not -100 <= v <= 100}
        if off:
            problems.append(f"logit_bias values must be between -100 and 100, got {off}")
        if self.logprobs is not None and not (isinstance(self.logprobs, int) and 0 <= self.logprobs <= 20):
            problems.append(f"logprobs must be an integer from 0 to 20 (alternatives per token), got {self.logprobs!r}")
        if problems:
            raise CfmError("; ".join(problems))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids in logit_bias must be in the vocabulary."""
        bad = [k for k in self.logit_bias if not (isinstance(k, int) and 0 <= k < vocab_size)]
        if bad:
            raise CfmError(f"logit_bias names token ids {bad[:5]} outside the vocabulary (0..{vocab_size - 1})")


@dataclass
class TokenLogprob:
    """A token's log-probability and the `top` likeliest tokens at its position, as (token id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of float32 logits [..., vocab]."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def token_logprob(logprobs: np.ndarray, token: int, top: int) -> TokenLogprob:
    """The entry of `token` in one position's log-probabilities [vocab], with the `top` likeliest tokens."""
    best = []
    if top:
        idx = np.argpartition(-logprobs, top - 1)[:top]
        idx = idx[np.argsort(-logprobs[idx], kind="stable")]
        best = [(int(i), float(logprobs[i])) for i in idx]
    return TokenLogprob(int(token), float(logprobs[token]), best)


def check_finite(logits: np.ndarray, position: int) -> None:
    """NaN or +inf anywhere, or no finite logit at all; -inf alone masks a token out and is allowed. One
    reduction decides: the maximum is NaN with any NaN, +inf with any +inf, -inf when every logit is -inf."""
    if not np.isfinite(np.max(logits)):
        raise NonFiniteError(f"the model computed NaN or infinite logits at position {position}, so no token can be "
                             "chosen; a brick or weights with values too large for the model cause this: remove "
                             "the brick (cfm brick list) or check the model file")


class Sampler:
    """Picks tokens from logits as `params` say; numpy's PCG64 generator, seeded (`seed`) or from the OS.

    One sampler serves one answer, and every token it draws is taken, in order (speculative verification
    included: a rejected draft's position is drawn once, and that token is taken); so it counts the answer's
    tokens for the presence and frequency penalties itself, and `drawn` lists their log-probabilities when
    `params.logprobs` asks for them. `grammar`: the answer's matcher (`cfm_runtime.grammar`)."""

    def __init__(self, params: SamplingParams, grammar: GrammarMatcher | None = None):
        self.p = params
        seed = params.seed if params.seed is not None else random.SystemRandom().randrange(2**63)
        self.rng = np.random.Generator(np.random.PCG64(seed))
        self.grammar = grammar
        self.counts: dict[int, int] = {}  # token -> times drawn in this answer
        self.drawn: list[TokenLogprob] = []  # with params.logprobs: one entry per token drawn, in order
        bias = params.logit_bias
        self._bias = (np.fromiter(bias, dtype=np.int64, count=len(bias)),
                      np.fromiter(bias.values(), dtype=np.float32, count=len(bias))) if bias else None

    @property
    def greedy(self) -> bool:
        return self.p.temperature == 0 or self.p.top_k == 1

    def __call__(self, logits: np.ndarray, history: list[int]) -> int:
        """logits [vocab] -> a token id; `history` is the context so far (for the penalty). NaN or +inf logits
        are refused (`NonFiniteError`): a token drawn from them would end the answer as a silent "stop"."""
        check_finite(logits, len(history))
        logits = self._penalised(logits, history)
        masked = logits if self.grammar is None else self.grammar.mask(logits)
        if self.greedy:
            token = int(np.argmax(masked))
        else:
            idx, probs = self._candidates(masked)
            token = int(idx[self.rng.choice(len(probs), p=probs)])
        if self.grammar is not None:
            self.grammar.consume(token)
        if self.p.logprobs is not None:
            self.drawn.append(token_logprob(log_softmax(logits), token, self.p.logprobs))
        self.counts[token] = self.counts.get(token, 0) + 1
        return token

    def verify(self, logits: np.ndarray, history: list[int], draft: int) -> tuple[bool, int]:
        """Speculative sampling against a drafted token (a point mass on `draft`): -> (accepted, token).
        The token is drawn as `__call__` draws it (one draw of the generator) and the draft is accepted iff they
        are equal: accepted with probability p(draft), else a token from p without the draft, renormalised,
        which is the speculative-sampling rule for a point-mass draft. Every generated token takes one draw
        whether it was drafted or not, so a seed gives the same text with and without speculation."""
        token = self(logits, history)
        return token == draft, token

    def _penalised(self, logits: np.ndarray, history: list[int]) -> np.ndarray:
        """The logits after the penalties and the bias (a copy when any applies: the runner's array is kept)."""
        p = self.p
        logits = np.asarray(logits, dtype=np.float32)
        repeat = p.repetition_penalty != 1.0 and history
        counted = (p.presence_penalty or p.frequency_penalty) and self.counts
        if not (repeat or counted or self._bias is not None):
            return logits
        logits = logits.copy()
        if repeat:
            recent = np.asarray(sorted(set(history[-p.repeat_last_n:])), dtype=np.int64)
            picked = logits[recent]
            logits[recent] = np.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        if counted:
            ids = np.fromiter(self.counts, dtype=np.int64, count=len(self.counts))
            n = np.fromiter(self.counts.values(), dtype=np.float32, count=len(self.counts))
            logits[ids] -= np.float32(p.frequency_penalty) * n + np.float32(p.presence_penalty)
        if self._bias is not None:
            logits[self._bias[0]] += self._bias[1]
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
