"""The composition point: load options -> a `Model` with one execution backend; run options -> a generator.

The CLI, `cfm serve`, the center and Python callers all come through here, so a combination of
features behaves the same whoever asks for it, and one that does not work is refused here with one
`CfmError` naming the pair (`options.refusal`).
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path
from typing import Iterator

from typing import TYPE_CHECKING, Callable

import numpy as np

from . import speculative
from .cache import SpanCache
from .config import ModelConfig
from .errors import CfmError
from .generate import GenerationChunk, Generator
from .kernels import native, stream
from .kernels.blocks import BlockWeights
from .loading import Checkpoint, block_weights, load_checkpoint, resolve_model_path
from .memory import memory_room_mb, release_freed_memory
from .native_backend import NativeBackend
from .options import CenterOptions, LoadOptions, RunOptions, SparseOptions, refusal
from .runners import LocalRunner, Runner
from .sampling import SamplingParams
from .tokenizer import HFTokenizer, Tokenizer, gguf_tokenizer

if TYPE_CHECKING:  # torch and what needs it are imported only when a model needs its torch form
    from . import sparse as sparse_ffn
    from .backends import FusedBackend, ModuleBackend
    from .model import Transformer


def set_threads(threads: int | None) -> int:
    """Use `threads` intra-op threads (default: every core this process may run on); torch's too once loaded."""
    n = threads or len(os.sched_getaffinity(0))
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    return n


class Model:
    """A loaded model: `.config`, `.tokenizer`, `.backend`, `.logits()`, `.generate()`, and `.transformer`, its
    torch form (built on first use when the model was loaded lean: see `load_model`)."""

    def __init__(self, tokenizer: Tokenizer, checkpoint: Checkpoint, options: LoadOptions, threads: int,
                 transformer: Transformer | None = None, backend: NativeBackend | None = None):
        self.tokenizer = tokenizer
        self.config: ModelConfig = checkpoint.config
        self.path: Path = checkpoint.path
        self.format = checkpoint.format
        self.metadata = checkpoint.metadata
        self.options = options  # resolved: the formats and features this model was loaded with
        self.threads = threads
        self.sparse: sparse_ffn.SparseEngine | None = None  # the sparse FFNs' engine, when loaded with them
        self._checkpoint = checkpoint  # reads the file's weights for fingerprints and blocks
        self._transformer = transformer
        self._fused: FusedBackend | None = None  # kept while bricks are on, reused when they come off
        self._fingerprints: dict[tuple[int, int], str] = {}
        self.backend: NativeBackend | ModuleBackend | FusedBackend = backend
        # the native kernel's sparse FFN, kept for the kernel of the torch form's backend too (bricks)
        self.native_sparse: native.SparseFFN | None = backend.decoder.sparse if backend is not None else None
        if backend is None:
            self.refresh_backend()

    @property
    def transformer(self) -> Transformer:
        """The torch modules (bricks wrap their linears, a sparse FFN replaces their FFNs). A model loaded lean
        builds them here, once, from the file (fp32 weights quantized as `options.weights` says): the memory
        of the torch path, taken only by a run that needs it."""
        if self._transformer is None:
            self._refuse_torch_form_within_budget("its torch form (bricks, brick training, analysis)")
            self._transformer = _build_transformer(load_checkpoint(self.path, progress=self.options.progress),
                                                   self.options, self.threads)
            release_freed_memory()
            self.refresh_backend()
        return self._transformer

    @transformer.setter
    def transformer(self, transformer: Transformer) -> None:
        """Replace the torch form (e.g. by a quantized copy) and re-choose the backend for it."""
        self._transformer = transformer
        self.refresh_backend()

    def has_torch_form(self) -> bool:
        return self._transformer is not None

    @property
    def weights_within_budget(self) -> bool:
        """Whether the weights are held within a RAM budget, the rest read from the file (`kernels.stream`)."""
        return isinstance(self.backend, NativeBackend) and self.backend.decoder.held is not None

    def _refuse_torch_form_within_budget(self, what: str) -> None:
        if self.weights_within_budget and self._transformer is None:
            raise CfmError(refusal(what, "a RAM budget on the int4 path (--ram-budget, or a memory limit the "
                                         "model does not fit)",
                                   "the torch form holds every weight in memory; load without a budget where the "
                                   "memory allows, or offload fp32 FFN weights (--weights fp32 --ram-budget MB)"))

    def brick_layers(self) -> set[int]:
        """Layers the bricks on the model touch (none while it has no torch form: bricks wrap its modules)."""
        if self._transformer is None:
            return set()
        from .bricks.lora import brick_layers

        return set(brick_layers(self._transformer))

    def new_cache(self, start: int = 0, end: int | None = None, max_len: int | None = None) -> SpanCache:
        """An empty KV cache for layers [start, end) (every backend reads and writes the same kind)."""
        return SpanCache(self.config, start, self.config.n_layers if end is None else end, max_len)

    def _blocks(self) -> BlockWeights:
        """The file's weights as the native kernel reads them (views of the mapped file where it can)."""
        return block_weights(self._checkpoint)

    def refresh_backend(self) -> None:
        """Choose the execution backend for the modules as they are now. Called by whatever changes the
        modules (bricks, sparse FFNs) right after the change."""
        from .backends import FusedBackend, choose_backend

        self.backend = choose_backend(self.transformer, self.threads, self._fused, self._blocks, self.native_sparse)
        if isinstance(self.backend, FusedBackend):
            self._fused = self.backend

    def attach_sparse(self, pack: sparse_ffn.NeuronPack, options: SparseOptions) -> sparse_ffn.SparseEngine:
        """Replace every FFN by a sparse/offloaded one over the opened neuron `pack` (the dense FFNs are dropped:
        load the model again to get them back); re-chooses the execution backend."""
        from . import sparse as sparse_ffn

        if self.sparse is not None:
            raise CfmError("this model already runs a sparse FFN; load it again to attach another")
        self.sparse = sparse_ffn.attach(self.transformer, pack, options.resolved())
        self.refresh_backend()
        return self.sparse

    # ------------------------------------------------------------ prompts and logits

    def encode_prompt(self, prompt, tools: list[dict] | None = None) -> list[int]:
        """A string is tokenized as is; a list of {"role", "content"} is rendered with the chat template (and
        `tools`, for a template that describes them: `cfm_runtime.tools`)."""
        if isinstance(prompt, str):
            if not prompt:
                raise CfmError("the prompt is empty; give some text to continue or a chat message")
            return self.tokenizer.encode(prompt)
        return self.tokenizer.encode(self.tokenizer.apply_chat_template(prompt, tools=tools))

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
        return LocalRunner(self, max_len=len(ids)).forward(ids, all_logits=True)

    # ------------------------------------------------------------ generation

    def new_generator(self, run: RunOptions | None = None) -> Generator:
        """A generator for a run (local, or split with a center; bricks fixed, routed or per request) that keeps
        its KV cache between calls (multi-turn chat). Close it when done (it may hold a center session)."""
        run = run or RunOptions()
        run.check()
        log = run.log or (lambda message: None)
        fixed = run.bricks if isinstance(run.bricks, tuple) else ()
        if fixed or run.bricks == "auto":
            self._refuse_torch_form_within_budget("bricks (--bricks)")

        def brick_set():
            from .bricks.selection import BrickSet
            from .bricks.store import BrickStore

            return BrickSet(self, BrickStore(run.brick_store), fixed, run.bricks == "auto", run.brick_threshold, log)

        bricks = brick_set() if fixed or run.bricks == "auto" else BricksOnRequest(self, brick_set)
        runner = (LocalRunner(self) if run.center is None
                  else self._split_runner(run.center, bricks.layers(), log, run.speculate))
        bricks.center_layers = runner.center_layers()
        try:
            spec = speculative.build(run.speculate, runner, self, log)
        except CfmError:
            runner.close()
            raise
        return Generator(runner, self.tokenizer, self.config.context_length, bricks, spec)

    def _split_runner(self, center: CenterOptions, brick_layers: set[int], log, speculate: str = "off") -> Runner:
        """The split runner for `center`, with the planner's split for "auto", and the center's layers kept
        clear of the layers bricks touch (bricks never leave this device)."""
        from .split.client import CenterClient, CenterFailure  # grpc: imported only by split runs
        from .split.planner import plan
        from .split.runner import SplitRunner

        split = center.split
        if split == "auto":
            client = CenterClient(center.address, center.token, center.tls_ca, center.tls, center.timeout)
            try:
                spec = speculative.estimate(speculate, self.backend.position_cost)
                p = plan(self, client, center.wire, center.min_edge_layers, spec=spec)
            except CenterFailure as e:
                log(f"[split: center {center.address} unreachable ({e}); running locally, will reconnect]")
                split = None
            else:
                log(f"[{p.describe()}]")
                if p.split is None:
                    return LocalRunner(self)
                split = p.split
            finally:
                client.close()
        runner = SplitRunner(self, center, None if split == "center" else split)
        a, b = runner.span
        clash = sorted(i for i in brick_layers if a <= i < b)
        if not clash:
            return runner
        runner.close()
        if isinstance(center.split, tuple):
            raise CfmError(refusal(f"split {a}:{b}", "these bricks",
                                   f"it puts layers {clash} on the center, but personal bricks touch them and bricks "
                                   f"never leave this device; choose a split whose center layers avoid "
                                   f"{sorted(brick_layers)}, or drop the bricks"))
        runs, s = [], a
        for i in range(a, b + 1):
            if i == b or i in brick_layers:
                if i > s:
                    runs.append((s, i))
                s = i + 1
        if not runs:
            log(f"[bricks: every center layer {a}:{b} holds a brick; running locally]")
            return LocalRunner(self)
        new = max(runs, key=lambda r: r[1] - r[0])
        log(f"[bricks: center span {a}:{b} -> {new[0]}:{new[1]} so layers with bricks stay on this device]")
        return SplitRunner(self, center, new)

    def stream(self, prompt, generator: Generator | None = None, bricks: list[tuple[str, float]] | None = None,
               **sampling) -> Iterator[GenerationChunk]:
        """Yields GenerationChunk(text, token, stats); the last chunk has empty text and final stats.
        `bricks`: (name, weight) bricks from the store for this answer (on top of the generator's own)."""
        params = SamplingParams(**sampling)
        ids = self.encode_prompt(prompt)
        return (generator or self.new_generator()).stream(ids, params, bricks)

    def generate(self, prompt, **sampling) -> Iterator[str]:
        """Yields text pieces. Options: max_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop."""
        return (c.text for c in self.stream(prompt, **sampling) if c.text)

    def close(self) -> None:
        """Stop the sparse FFN's background reads and close the neuron pack (if any)."""
        if self.sparse is not None:
            self.sparse.close()

    # ------------------------------------------------------------ identity

    def fingerprint(self, start: int = 0, end: int | None = None) -> str:
        """Hash of the config and the weights of layers [start, end) as the file stores them: equal spans of
        equal files match, whatever format the weights are held in here (fp32, int4, a neuron pack)."""
        end = self.config.n_layers if end is None else end
        key = (start, end)
        if key not in self._fingerprints:
            h = hashlib.blake2b(digest_size=16)
            c = self.config
            h.update(repr((c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_base, c.rope_style,
                           c.activation, c.rms_eps, start, end)).encode())
            for i in range(start, end):
                h.update(self._checkpoint.layer_digest(i))
            self._fingerprints[key] = h.hexdigest()
        return self._fingerprints[key]

    def weight_norm(self, module: str) -> float | None:
        """Frobenius norm of the file's weight of `module` ('layers.3.self_attn.q_proj'), read from the file
        (the torch form is not built for it); None if the file has no such weight."""
        return self._checkpoint.weight_norm(f"{module}.weight")

    def stored_type(self, name: str) -> str:
        """How the file stores weight `name` ('layers.3.mlp.gate_proj.weight'): its GGUF type, or "safetensors"."""
        return self._checkpoint.stored_type(name)

    def stored_blocks(self, name: str, kinds: tuple[str, ...]) -> tuple[str, np.ndarray]:
        """Weight `name` as the file's GGUF blocks if it stores them as one of `kinds`, else quantized to the last
        of them: (kind, blocks [rows, bytes])."""
        return self._checkpoint.stored_blocks(name, kinds)

    def info(self) -> dict:
        c = self.config
        n_params = self._checkpoint.n_params
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
            "weights": self.options.weights,
            "backend": self.backend.name,
        }


class BricksOnRequest:
    """The brick selector of a run with no bricks of its own: nothing of the brick machinery (nor torch) is
    loaded until a request asks for a brick (`cfm serve`'s `base+NAME`); then a `BrickSet` is made and kept."""

    def __init__(self, model: Model, make: Callable):
        self.model, self._make, self._set = model, make, None
        self.center_layers: frozenset[int] = frozenset()

    def _bricks(self):
        if self._set is None:
            self._set = self._make()
            self._set.center_layers = self.center_layers
        return self._set

    def layers(self) -> set[int]:
        return self._set.layers() if self._set is not None else self.model.brick_layers()

    def offered(self) -> list[str]:
        return self._bricks().offered()

    def select(self, prompt_ids: list[int], requested) -> bool:
        if requested is None and self._set is None:
            return False
        return self._bricks().select(prompt_ids, requested)

    def report(self) -> dict:
        return self._set.report() if self._set is not None else {}

    def close(self) -> None:
        if self._set is not None:
            self._set.close()


# ---------------------------------------------------------------- loading


def load_tokenizer(checkpoint: Checkpoint) -> Tokenizer:
    if checkpoint.format == "gguf":
        return gguf_tokenizer(checkpoint.path, checkpoint.metadata)
    return HFTokenizer(checkpoint.path)


_SPARSE_KEYWORDS = {"ram_budget_mb": "ram_budget_mb", "sparse": "sparse", "density": "density",
                    "sparse_strategy": "strategy", "pack": "pack", "predictor": "predictor",
                    "density_plan": "density_plan"}
_LOAD_KEYWORDS = ("threads", "weights", "lm_head", "progress")


def options_from_keywords(**kwargs) -> LoadOptions:
    """LoadOptions from `load_model`'s keyword form: threads, weights, lm_head, progress, the sparse options
    (ram_budget_mb, sparse, density, sparse_strategy, pack, predictor, density_plan) and config overrides."""
    sparse = {_SPARSE_KEYWORDS[k]: kwargs.pop(k) for k in list(kwargs) if k in _SPARSE_KEYWORDS}
    load = {k: kwargs.pop(k) for k in list(kwargs) if k in _LOAD_KEYWORDS}
    return LoadOptions(sparse=SparseOptions(**sparse), overrides=kwargs, **load)


def load_model(path=None, options: LoadOptions | None = None, **keywords) -> Model:
    """Load a GGUF file or a Hugging Face folder (default: the embedded SmolLM2-135M-Instruct).

    Options (`LoadOptions`, or the same as keywords): `weights` "fp32" | "int8" | "int4" (default int4; int4
    re-packs a Q4_1 GGUF exactly), `lm_head`, `threads`, `sparse` (`SparseOptions`: FFN offload to a neuron
    pack and predictor-driven sparsity, see `cfm_runtime.sparse`), `overrides` (config fields replacing the
    file's, e.g. activation="relu" for a ReLU model whose GGUF does not say so).

    An int4 GGUF model with no sparse FFN and no overrides loads lean where the native kernel runs: the kernel
    reads the file's blocks in place, torch is not imported, and the torch form (`Model.transformer`) is built
    only if the run later needs it (bricks); the numbers are the same as the torch form's fused path.
    """
    if options is not None and keywords:
        raise CfmError(f"give load options either as LoadOptions or as keywords, not both ({', '.join(keywords)})")
    opts = (options or options_from_keywords(**keywords)).resolved()
    threads = set_threads(opts.threads)
    path = resolve_model_path(path)
    budget = opts.sparse.ram_budget_mb
    if _lean(path, opts):
        ckpt = load_checkpoint(path, progress=opts.progress, tensors="none")
        tokenizer = _checked_tokenizer(ckpt)  # first: a budget from the memory limit counts what it holds
        release_freed_memory()  # building the vocabulary leaves ~7 MB of freed heap
        blocks = block_weights(ckpt)
        if native.supported(blocks):
            sparse = _native_sparse(path, blocks, opts, threads)
            held = None
            if sparse is None:
                held = _held_weights(blocks, budget)
            else:
                _whole_model_notice(blocks)
            decoder = native.NativeDecoder(blocks, threads, native.load(), held, sparse)
            return Model(tokenizer, ckpt, opts, threads, backend=NativeBackend(decoder, ckpt.config.n_layers))
        del blocks  # a layout the kernel lacks: the torch form below
    if opts.weights == "int4" and (budget is not None or opts.sparse.ffn):
        why = native.failure() or ("the kernel lacks this model's layout or its overrides" if path.is_file()
                                   else "the model is a folder, not a GGUF file")
        what = "a RAM budget (--ram-budget)" if budget is not None else "the sparse FFN (--sparse)"
        raise CfmError(f"{what} on the int4 path needs the native kernel reading a GGUF file ({why}); load with "
                       f"--weights fp32 for the neuron pack's FFN instead")
    offload = budget is not None and path.is_file() and not opts.overrides
    pack = ensure_pack(path, opts.sparse.pack, threads=threads, progress=opts.progress is not False) \
        if opts.sparse.active else None
    ckpt = load_checkpoint(path, progress=opts.progress, tensors="no_ffn" if offload else "all", **opts.overrides)
    tokenizer = _checked_tokenizer(ckpt)
    model = Model(tokenizer, ckpt, opts, threads, _build_transformer(ckpt, opts, threads))
    if pack is not None:
        from . import sparse as sparse_ffn

        opened = sparse_ffn.open_pack(pack, source_digest=sparse_ffn.source_digest(path) if offload else None,
                                      fingerprint=None if offload else model.fingerprint())
        release_freed_memory()
        model.attach_sparse(opened, opts.sparse)
    release_freed_memory()
    return model


def _lean(path: Path, opts: LoadOptions) -> bool:
    """Whether the model can load without its torch form: int4 linears and the 8-bit head from a GGUF file (a
    RAM budget or the kernel's sparse FFN with them), no config overrides, and the native kernel available here."""
    return (path.is_file() and opts.weights == "int4" and opts.lm_head == "int8" and not opts.overrides
            and native.load() is not None)


def _native_sparse(path: Path, blocks: BlockWeights, opts: LoadOptions, threads: int) -> native.SparseFFN | None:
    """The native kernel's sparse FFN the options ask for (None: dense): per-layer densities from the neuron pack's
    plan (the pack is built once per model if missing) or uniform, and each sparse layer's down columns."""
    s = opts.sparse
    if not s.ffn or s.strategy == "dense" or s.density >= 1.0:
        return None
    dens = [s.density] * len(blocks.layers)
    if s.density_plan != "uniform":
        from .sparse import pack as packfmt
        from .sparse.plan import plan_densities

        root = ensure_pack(path, s.pack, threads=threads, progress=opts.progress is not False)
        manifest = packfmt.read_manifest(root)
        if s.pack is not None:
            packfmt.check_identity(root, manifest, packfmt.source_digest(path), None)
        dens = plan_densities(manifest, s.density, s.density_plan)
    return native.SparseFFN.build(blocks, dens)


def _whole_model_notice(blocks: BlockWeights) -> None:
    """The kernel's sparse FFN holds the whole model (no budget); say so when the memory limit will not hold it."""
    short = _weights_short(blocks)
    if short is not None:
        need, _, why = short
        print(f"cfm: the sparse FFN runs on the whole model ({need:.0f} MB of weights), more than the memory limit "
              f"leaves ({why}); its pages are re-read from the file as memory runs short (slow); drop --sparse to "
              f"let a RAM budget fit the limit", file=sys.stderr)


# Memory a run takes beside its weights, kept out of an automatic budget: buffers, the answer's state and the KV
# cache of this many positions (it grows with the context; a longer one takes more).
AUTO_RESERVE_MB, AUTO_RESERVE_POSITIONS = 8.0, 256


def _held_weights(blocks, budget: float | str | None) -> "stream.Held | None":
    """The weights within a RAM budget (`kernels.stream`), or None to run from the mapped file as it is.

    A number is held or refused; "auto", and a plain run (None), spend what this process's memory limit leaves
    (`memory.memory_room_mb`, less a reserve for the KV cache and buffers): the mapped file when the model fits
    in it, else the largest budget that does, else the mapped file again (slow, but the kernel's pages stay
    reclaimable), saying so on standard error."""
    if budget not in (None, "auto"):
        try:
            return stream.hold(blocks, float(budget))
        except stream.BudgetError as e:
            raise CfmError(str(e)) from None
    short = _weights_short(blocks)
    if short is None:
        return None
    need, spend, why = short
    try:
        held = stream.hold(blocks, spend)
    except stream.BudgetError:
        print(f"cfm: the memory limit ({why}) leaves no room for this model's fixed parts; running from the "
              f"mapped model file, re-read from disk as memory runs short (slow)", file=sys.stderr)
        return None
    print(f"cfm: the model's {need:.0f} MB of weights do not fit the memory limit ({why}): holding "
          f"{spend:.0f} MB of them and reading the rest from the file each token ({held.plan.streamed / 2**20:.0f} "
          f"MB; --ram-budget MB sets the budget)", file=sys.stderr)
    return held


def _weights_short(blocks) -> tuple[float, float, str] | None:
    """(MB of weights, MB the memory limit leaves for them, the limit's description) when the model's weights do
    not fit what this process's memory limit leaves (`memory.memory_room_mb`, less a reserve for the KV cache and
    buffers); None when they fit, with no limit, or for weights converted when loaded (not the file's blocks)."""
    try:
        need = stream.weight_bytes(blocks) / 2**20
    except stream.BudgetError:
        return None
    room, why = memory_room_mb()
    kv = 2 * len(blocks.layers) * blocks.n_kv_heads * blocks.head_dim * 4 * AUTO_RESERVE_POSITIONS / 2**20
    if room is None or room - AUTO_RESERVE_MB - kv >= need:
        return None
    return need, room - AUTO_RESERVE_MB - kv, why


def _checked_tokenizer(ckpt: Checkpoint) -> Tokenizer:
    tokenizer = load_tokenizer(ckpt)
    if tokenizer.vocab_size > ckpt.config.vocab_size:
        raise CfmError(
            f"{ckpt.path}: the tokenizer has {tokenizer.vocab_size} tokens but the embedding only "
            f"{ckpt.config.vocab_size} rows; the tokenizer belongs to another model"
        )
    return tokenizer


def _build_transformer(ckpt: Checkpoint, opts: LoadOptions, threads: int) -> Transformer:
    """The torch modules from a checkpoint's fp32 weights (which are dropped), quantized as `opts` says."""
    import torch

    from .backends import quantize_model
    from .model import Transformer

    torch.set_num_threads(threads)
    transformer = Transformer.from_weights(ckpt.config, ckpt.weights)
    ckpt.weights = {}
    if opts.weights != "fp32":
        quantize_model(transformer, opts.weights, opts.lm_head, threads=threads)
    return transformer


def ensure_pack(path, pack=None, *, threads: int | None = None, progress: bool = True, log=None, **build) -> Path:
    """The neuron pack folder for the model at `path`: `pack` if given, else the per-model cache entry, which
    is built (profiling the dense model on calibration text, once per model) if missing or stale."""
    from .sparse import pack as packfmt  # no torch unless the pack is built

    path = resolve_model_path(path)
    if pack:
        return Path(pack)
    digest = packfmt.source_digest(path)
    root = packfmt.pack_dir(path, digest)
    if not packfmt.is_current(root):
        from . import sparse as sparse_ffn

        why = "stale or incomplete, rebuilding" if root.exists() else "once per model"
        message = f"building the neuron pack for {path.name} in {root} ({why})"
        (log or (lambda m: print(m, file=sys.stderr)))(message)
        model = load_model(path, LoadOptions(threads=threads, weights="fp32"))
        sparse_ffn.build_pack(model, root, source_digest=digest, progress=progress, **build)
        del model
        release_freed_memory()
    return root


__all__ = ["BricksOnRequest", "Model", "ensure_pack", "load_model", "load_tokenizer", "options_from_keywords", "set_threads"]
