"""The public model object: `load_model(path)` -> Model with tokenizer, logits and generation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .config import ModelConfig
from .errors import CfmError
from .generate import GenerationChunk, Generator, LocalRunner, Runner
from .loading import Checkpoint, load_checkpoint
from .model import Transformer
from .sampling import SamplingParams
from .tokenizer import GGUFTokenizer, HFTokenizer, Tokenizer


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (default: every core this process may run on)."""
    n = threads or len(os.sched_getaffinity(0))
    if n < 1:
        raise CfmError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(n)
    return n


class Model:
    """A loaded model: `.config`, `.tokenizer`, `.transformer`, `.logits()`, `.generate()`."""

    def __init__(self, transformer: Transformer, tokenizer: Tokenizer, checkpoint: Checkpoint):
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.config: ModelConfig = transformer.config
        self.path: Path = checkpoint.path
        self.format = checkpoint.format
        self.metadata = checkpoint.metadata
        self._fingerprints: dict[tuple[int, int], str] = {}
        self._layer_digests: dict[int, bytes] = {}

    # ------------------------------------------------------------ prompts and logits

    def encode_prompt(self, prompt) -> list[int]:
        """A string is tokenized as is; a list of {"role", "content"} is rendered with the chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise CfmError("the prompt is empty; give some text to continue or a chat message")
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt))

    def check_ids(self, ids) -> list[int]:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.config.vocab_size]
        if bad:
            raise CfmError(f"token ids {bad[:5]} are outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids

    def logits(self, token_ids) -> np.ndarray:
        """Logits for every position: float32 array [len(token_ids), vocab]."""
        ids = self.check_ids(token_ids)
        if not ids:
            raise CfmError("logits() needs at least one token id")
        if len(ids) > self.config.context_length:
            raise CfmError(f"{len(ids)} ids exceed the model's context of {self.config.context_length}")
        runner = LocalRunner(self.transformer, max_len=len(ids))
        return runner.forward(ids, all_logits=True).numpy()

    # ------------------------------------------------------------ generation

    def new_runner(self) -> Runner:
        return LocalRunner(self.transformer)

    def new_generator(self, runner: Runner | None = None) -> Generator:
        """A generator that keeps its KV cache between calls (multi-turn chat)."""
        sparse = getattr(self.transformer, "sparse", None)  # cfm_runtime.sparse: telemetry in stats.extra
        if sparse is not None:
            return sparse.generator(runner or self.new_runner(), self.tokenizer, self.config.context_length)
        return Generator(runner or self.new_runner(), self.tokenizer, self.config.context_length)

    def stream(self, prompt, generator: Generator | None = None, **sampling) -> Iterator[GenerationChunk]:
        """Yields GenerationChunk(text, token, stats); the last chunk has empty text and final stats."""
        params = SamplingParams(**sampling)
        ids = self.encode_prompt(prompt)
        return (generator or self.new_generator()).stream(ids, params)

    def generate(self, prompt, **sampling) -> Iterator[str]:
        """Yields text pieces. Options: max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop."""
        return (c.text for c in self.stream(prompt, **sampling) if c.text)

    # ------------------------------------------------------------ identity

    def fingerprint(self, start: int = 0, end: int | None = None) -> str:
        """Hash of the config and the weights of layers [start, end): equal spans of equal models match,
        whatever format the weights are held in here (digests are taken from the file's weights)."""
        end = self.config.n_layers if end is None else end
        key = (start, end)
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=16)
            c = self.config
            h.update(repr((c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_base, c.rope_style,
                           c.activation, c.rms_eps, start, end)).encode())
            for i in range(start, end):
                h.update(self.layer_digest(i))
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]

    def layer_digest(self, i: int) -> bytes:
        """Digest of layer i's weights as loaded (taken before any re-packing into another format)."""
        if i not in self._layer_digests:
            h = hashlib.blake2b(digest_size=16)
            for name, t in sorted(self.transformer.layers[i].state_dict().items()):
                h.update(name.encode())
                h.update(t.contiguous().numpy().tobytes())
            self._layer_digests[i] = h.digest()
        return self._layer_digests[i]

    def info(self) -> dict:
        c = self.config
        n_params = sum(t.numel() for t in self.transformer.state_dict().values())
        return {
            "path": str(self.path),
            "format": self.format,
            "name": c.name,
            "config": c.to_dict() | {"rope_freq_factors": bool(c.rope_freq_factors)},
            "file_mb": round(self.path.stat().st_size / 2**20, 1) if self.path.is_file() else None,
            "parameters": n_params,
            "weights_fp32_mb": round(n_params * 4 / 2**20, 1),
            "kv_cache_mb_per_1k_tokens": round(c.kv_bytes_per_token * 1024 / 2**20, 2),
            "kv_cache_mb_full_context": round(c.kv_bytes_per_token * c.context_length / 2**20, 1),
            "chat_template": bool(self.tokenizer.chat_template),
            "quantization": self.metadata.get("general.file_type") if self.format == "gguf" else None,
        }


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    if checkpoint.format == "gguf":
        return GGUFTokenizer(checkpoint.path, checkpoint.metadata)
    return HFTokenizer(checkpoint.path)


def load_model(path=None, *, threads: int | None = None, progress: bool | None = None, weights: str = "fp32",
               lm_head: str | None = None, ram_budget_mb: float | None = None, sparse: bool = False,
               density: float | None = None, sparse_strategy: str | None = None, pack=None,
               predictor: str | None = None, density_plan: str | None = None, **overrides) -> Model:
    """Load a GGUF file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct).

    `weights` "fp32" | "int8" | "int4" picks the format of the block linears (`cfm_runtime.quant`;
    int4 re-packs a Q4_1 GGUF exactly); `lm_head` "fp32" | "int8" (default: int8 with quantized weights).
    `overrides` replace config fields read from the file, e.g. activation="relu" for a ReLU model
    whose GGUF does not say so.
    `ram_budget_mb`, `sparse`, `density`, `sparse_strategy`, `pack`, `predictor`, `density_plan`: FFN offload
    to a neuron pack and predictor-driven sparsity (`cfm_runtime.sparse`).
    """
    if ram_budget_mb is not None or sparse or sparse_strategy:
        if weights != "fp32":
            raise CfmError("FFN offload and sparsity (--ram-budget, --sparse) run on fp32 weights; drop the weight format")
        from .sparse import load_sparse

        return load_sparse(path, threads=threads, progress=progress, ram_budget_mb=ram_budget_mb, sparse=sparse,
                           density=density, sparse_strategy=sparse_strategy, pack=pack, predictor=predictor,
                           density_plan=density_plan, **overrides)
    if predictor is not None or density_plan is not None:
        raise CfmError("--predictor and --density-plan go with --sparse (or --ram-budget); add it or drop them")
    from .quant import check_formats

    lm_head = lm_head or ("fp32" if weights == "fp32" else "int8")
    check_formats(weights, lm_head)
    n_threads = set_threads(threads)
    ckpt = load_checkpoint(path, progress=progress, **overrides)
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CfmError(
            f"{ckpt.path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{ckpt.config.vocab_size} rows; the tokenizer belongs to another model"
        )
    transformer = Transformer.from_weights(ckpt.config, ckpt.weights)
    ckpt.weights = {}
    model = Model(transformer, tokenizer, ckpt)
    if weights != "fp32":
        from .kernels.fused import FusedRunner
        from .quant import quantize_model

        for i in range(ckpt.config.n_layers):  # fingerprints name the file's weights, not our packing
            model.layer_digest(i)
        quantize_model(transformer, weights, lm_head, threads=n_threads)
        transformer.fused = FusedRunner(transformer, n_threads)  # LocalRunner's fast path
    release_freed_memory()
    return model


def release_freed_memory() -> None:
    """Hand memory freed by dequantization temporaries back to the OS (glibc keeps it otherwise:
    ~450 MB of RSS on the embedded model)."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass
