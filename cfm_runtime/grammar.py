"""Constrained decoding: the answer's text held to a JSON schema, any JSON object, or a Lark grammar.

The engine is llguidance (Microsoft's, the one behind OpenAI's structured outputs, llama.cpp's
`LLAMA_LLGUIDANCE` and vLLM): it takes llama.cpp's own vocabulary, so the tokens it allows are the ones this
runtime's tokenizer makes; it computes a mask over the 49k-token vocabulary in microseconds (measured
against xgrammar and outlines-core in `benchmarks/bench_grammar.py`), needs no torch, and rolls back. A
`Grammar` is a description; `Tokenizer.grammar_tokenizer()` binds it to a vocabulary and `GrammarMatcher`
follows one answer: the sampler masks every drawn token's logits with it (local, split, bricks, speculative
verification alike, since they all draw through `Sampler`).

JSON is written without free whitespace (`", "` and `": "` as separators, as Python's `json.dumps` writes
it): a small model offered free whitespace can spend its whole answer on spaces and newlines.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import CfmError

JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
ANY_OBJECT = {"type": "object"}  # OpenAI's JSON mode: any JSON object


@dataclass(frozen=True)
class Grammar:
    """A constraint on an answer's text, as llguidance grammar text (`source`); `what` names it in errors."""

    source: str
    what: str

    @classmethod
    def json_schema(cls, schema: dict, strict: bool = True, name: str = "json_schema") -> "Grammar":
        """Text that parses as JSON and validates against `schema`. strict: a keyword the engine cannot enforce
        is an error (OpenAI's `strict: true`); otherwise such keywords are ignored."""
        import llguidance

        if not isinstance(schema, dict):
            raise CfmError(f"the JSON schema of {name} must be an object, got {type(schema).__name__}")
        options = dict(JSON_FORMAT, lenient=not strict)
        try:
            source = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)
        except ValueError as e:
            raise CfmError(f"the JSON schema of {name} is not valid: {e}") from None
        return cls._checked(source, f"the JSON schema {name}")

    @classmethod
    def json_object(cls) -> "Grammar":
        """Any JSON object (OpenAI's `response_format: {"type": "json_object"}`)."""
        return cls.json_schema(ANY_OBJECT, name="json_object")

    @classmethod
    def lark(cls, text: str, what: str = "the grammar") -> "Grammar":
        """llguidance's Lark dialect (`%json {...}` inlines a schema; docs/openai-api.md#structured-output)."""
        import llguidance

        return cls._checked(llguidance.LLMatcher.grammar_from_lark(text), what)

    @classmethod
    def text(cls, text: str, what: str = "the grammar") -> "Grammar":
        """A grammar as llama.cpp takes one: GBNF (`root ::= ...`, llama.cpp's own format), or Lark."""
        import llguidance

        if not isinstance(text, str) or not text.strip():
            raise CfmError(f"{what} is empty; give a GBNF grammar (root ::= ...) or a Lark one (start: ...)")
        try:
            lark = llguidance.grammar_from("grammar", text)
        except ValueError as e:
            raise CfmError(f"{what} is neither GBNF nor Lark that can be read: {e}") from None
        return cls._checked(lark, what)

    @classmethod
    def _checked(cls, source: str, what: str) -> "Grammar":
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(source)
        if error and not error.startswith("WARNING"):
            raise CfmError(f"{what} cannot be used to constrain the answer: {error}")
        return cls(source, what)


class GrammarMatcher:
    """Follows one answer through a grammar: `allowed()` is the mask for the next token, `consume(token)` takes
    the token drawn. After an end-of-generation token the answer is over and the matcher passes everything
    (a speculative step may still draw from the positions after it; their tokens are never used)."""

    def __init__(self, grammar: Grammar, lltokenizer, vocab_size: int, eog_ids: frozenset[int]):
        import llguidance

        self.grammar, self.vocab_size, self.eog_ids = grammar, vocab_size, eog_ids
        self.matcher = llguidance.LLMatcher(lltokenizer, grammar.source, log_level=0)
        if self.matcher.is_error():
            raise CfmError(f"{grammar.what} cannot be used to constrain the answer: {self.matcher.get_error()}")
        words = (lltokenizer.vocab_size + 31) // 32
        self._bits = np.zeros(words, dtype=np.int32)
        self.done = False

    def allowed(self) -> np.ndarray:
        """Booleans [vocab_size]: which tokens may come next."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        if self.matcher.is_error():
            raise CfmError(f"constrained decoding failed: {self.matcher.get_error()}")
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        return bits[:self.vocab_size].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar does not allow next at -inf."""
        if self.done:
            return logits
        allowed = self.allowed()
        if not allowed.any():
            raise CfmError(f"{self.grammar.what} allows no token here; the grammar cannot be completed")
        return np.where(allowed, logits, np.float32(-np.inf)).astype(np.float32, copy=False)

    def consume(self, token: int) -> None:
        if self.done:
            return
        if token in self.eog_ids:
            self.done = True
            return
        if not self.matcher.consume_token(int(token)):
            raise CfmError(f"constrained decoding failed at token {token}: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """The tokens the grammar forces from here, whatever the model says (a key, a closing quote)."""
        return [] if self.done else list(self.matcher.compute_ff_tokens())

    def valid_prefix(self, tokens: list[int]) -> int:
        """How many of `tokens`, in order, the grammar allows from here (the state does not move)."""
        return len(tokens) if self.done else self.matcher.validate_tokens(list(tokens))
