"""Adapter files: Hugging Face PEFT LoRA folders and llama.cpp GGUF LoRA adapters.

Bricks are held in Hugging Face layout: module names as `layers.{i}.self_attn.q_proj`, and q/k
rows in HF order (each head's rotary halves). A model loaded from a GGUF `llama` file has its
q/k rows permuted by llama.cpp's converter (adjacent rotary pairs, `rope_style == "normal"`),
so lora_b rows of q_proj/k_proj are permuted the same way when a brick is put on such a model
(`to_model_layout`), and back when one is read from it (`from_model_layout`). llama.cpp's own
GGUF adapters for `llama` carry that permutation already and are un-permuted on reading.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import BrickError, CfmError
from .lora import TARGET_KINDS, LoraPair

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"

_PEFT_KEY = re.compile(r"^(?:base_model\.model\.)?(?:model\.)?(layers\.\d+\.\w+\.\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")
_GGUF_KEY = re.compile(r"^blk\.(\d+)\.(\w+)\.weight\.lora_([ab])$")
_GGUF_KIND = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj"}
_KIND_GGUF = {v: k for k, v in _GGUF_KIND.items()}


def raise_problems(what: str, problems: list[str]) -> None:
    if problems:
        shown = problems[:40] + ([f"... and {len(problems) - 40} more"] if len(problems) > 40 else [])
        raise BrickError(f"{what}: {len(problems)} problem(s):\n  " + "\n  ".join(shown))


# ------------------------------------------------------------------ shapes and layouts


def module_shape(config: ModelConfig, kind: str) -> tuple[int, int]:
    """(out, in) of a block's linear module."""
    q, kv, d, ff = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim, config.d_model, config.d_ff
    return {"self_attn.q_proj": (q, d), "self_attn.k_proj": (kv, d), "self_attn.v_proj": (kv, d),
            "self_attn.o_proj": (d, q), "mlp.gate_proj": (ff, d), "mlp.up_proj": (ff, d),
            "mlp.down_proj": (d, ff)}[kind]


def split_name(name: str) -> tuple[int, str]:
    """'layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    _, layer, kind = name.split(".", 2)
    return int(layer), kind


def validate(pairs: dict[str, LoraPair], config: ModelConfig, source: str) -> None:
    """Check every pair's name and shapes against the base model; one error lists all problems."""
    # names first: a module the base model lacks says more than a wrong shape, and long lists are cut
    names, problems = [], []
    if not pairs:
        names.append("no LoRA tensors found")
    for name, p in sorted(pairs.items()):
        m = re.fullmatch(r"layers\.(\d+)\.(\w+\.\w+)", name)
        if not m or m.group(2) not in TARGET_KINDS:
            names.append(f"{name}: not a linear module of a block (supported: {', '.join(TARGET_KINDS)})")
            continue
        layer, kind = int(m.group(1)), m.group(2)
        if layer >= config.n_layers:
            names.append(f"{name}: layer {layer} does not exist (the base model has {config.n_layers} layers)")
            continue
        out, inp = module_shape(config, kind)
        if p.a.ndim != 2 or p.b.ndim != 2:
            problems.append(f"{name}: lora_A {tuple(p.a.shape)} and lora_B {tuple(p.b.shape)} must be matrices")
            continue
        if p.a.shape[1] != inp:
            problems.append(f"{name}: lora_A is {tuple(p.a.shape)}, expected [rank, {inp}]")
        if p.b.shape[0] != out:
            problems.append(f"{name}: lora_B is {tuple(p.b.shape)}, expected [{out}, rank]")
        if p.a.shape[0] != p.b.shape[1]:
            problems.append(f"{name}: ranks differ: lora_A has {p.a.shape[0]} rows, lora_B {p.b.shape[1]} columns")
        if not (torch.isfinite(p.a).all() and torch.isfinite(p.b).all()):
            problems.append(f"{name}: contains NaN or infinite values")
        if not math.isfinite(p.scale):
            problems.append(f"{name}: scale {p.scale} is not finite")
    raise_problems(f"{source} does not fit the base model", names + problems)


def _rotary_heads(config: ModelConfig, kind: str) -> int:
    return {"self_attn.q_proj": config.n_heads, "self_attn.k_proj": config.n_kv_heads}.get(kind, 0)


def permute_rows(b: torch.Tensor, n_heads: int, inverse: bool = False) -> torch.Tensor:
    """HF -> llama.cpp row order of q/k outputs (convert_hf_to_gguf `permute`); inverse=True undoes it.

    Per head, HF rows are [rotary first halves | second halves]; llama.cpp interleaves them into
    adjacent pairs: gguf[h, i, s] = hf[h, s, i] with s in {0, 1}, i < head_dim / 2.
    """
    out, r = b.shape
    half = out // n_heads // 2
    if inverse:
        return b.reshape(n_heads, half, 2, r).transpose(1, 2).reshape(out, r).contiguous()
    return b.reshape(n_heads, 2, half, r).transpose(1, 2).reshape(out, r).contiguous()


def _relayout(pairs: dict[str, LoraPair], config: ModelConfig, inverse: bool) -> dict[str, LoraPair]:
    if config.rope_style != "normal":  # HF checkpoints and GGUF qwen2 keep HF row order
        return dict(pairs)
    out = {}
    for name, p in pairs.items():
        heads = _rotary_heads(config, split_name(name)[1])
        out[name] = LoraPair(p.a, permute_rows(p.b, heads, inverse), p.scale) if heads else p
    return out


def to_model_layout(pairs: dict[str, LoraPair], config: ModelConfig) -> dict[str, LoraPair]:
    """HF-layout pairs -> the row layout of this loaded model."""
    return _relayout(pairs, config, inverse=False)


def from_model_layout(pairs: dict[str, LoraPair], config: ModelConfig) -> dict[str, LoraPair]:
    """Pairs in this loaded model's row layout -> HF layout."""
    return _relayout(pairs, config, inverse=True)


# ------------------------------------------------------------------ PEFT folders


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _read_peft_config(folder: Path) -> dict:
    path = folder / PEFT_CONFIG
    if not path.is_file():
        raise BrickError(f"{folder} has no {PEFT_CONFIG}; a PEFT LoRA adapter folder has {PEFT_CONFIG} "
                         f"and {PEFT_WEIGHTS}")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BrickError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(cfg, dict):
        raise BrickError(f"{path} must hold a JSON object")
    problems = []
    if cfg.get("peft_type", "LORA") != "LORA":
        problems.append(f"peft_type is {cfg.get('peft_type')!r}; only LORA adapters are supported")
    for key, bad in (("use_dora", True), ("fan_in_fan_out", True)):
        if cfg.get(key) == bad:
            problems.append(f"{key}={bad} is not supported")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (fully trained modules) is not supported")
    if cfg.get("bias", "none") != "none":
        problems.append(f"bias={cfg['bias']!r} is not supported (train with bias='none')")
    if not isinstance(cfg.get("lora_alpha", 8), (int, float)):
        problems.append(f"lora_alpha {cfg.get('lora_alpha')!r} is not a number")
    raise_problems(str(path), problems)
    return cfg


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise BrickError(f"{path} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BrickError(f"{path} is corrupt or not a safetensors file: {e}") from e


def read_peft(folder: Path) -> tuple[dict[str, LoraPair], dict]:
    """A PEFT LoRA folder -> (pairs in HF layout with lora_alpha / r / rslora applied, adapter config)."""
    folder = Path(folder)
    cfg = _read_peft_config(folder)
    tensors = _load_safetensors(folder / PEFT_WEIGHTS)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, t in tensors.items():
        m = _PEFT_KEY.match(key)
        if not m:
            problems.append(f"{key}: not a LoRA weight of a block's linear module")
            continue
        halves.setdefault(m.group(1), {})[m.group(2)] = t.float()
    pairs = {}
    for name, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            problems.append(f"{name}: lora_{'B' if 'A' in ab else 'A'} is missing")
            continue
        r = ab["A"].shape[0] if ab["A"].ndim == 2 else 0
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), "model." + name, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / max(r, 1)
        pairs[name] = LoraPair(ab["A"].contiguous(), ab["B"].contiguous(), scale)
    raise_problems(f"{folder / PEFT_WEIGHTS}", problems)
    return pairs, cfg


def write_peft(folder: Path, pairs: dict[str, LoraPair], base_model: str = "") -> None:
    """Write HF-layout pairs as a PEFT LoRA folder (readable by peft's PeftModel.from_pretrained)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ranks = [p.rank for p in pairs.values()]
    r = max(set(ranks), key=ranks.count)
    alpha_default = None
    rank_pattern, alpha_pattern = {}, {}
    for name, p in pairs.items():
        alpha = p.scale * p.rank  # alpha / r == scale
        full = "model." + name
        if p.rank != r:
            rank_pattern[full] = p.rank
        if alpha_default is None and p.rank == r:
            alpha_default = alpha
        if alpha != alpha_default:
            alpha_pattern[full] = alpha
    cfg = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": alpha_default if alpha_default is not None else float(r),
        "target_modules": sorted("model." + n for n in pairs), "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern, "use_rslora": False, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
    }
    tensors = {}
    for name, p in pairs.items():
        prefix = f"base_model.model.model.{name}"
        # copies: two modules may share one tensor (e.g. after a merge), which safetensors refuses
        tensors[f"{prefix}.lora_A.weight"] = p.a.detach().to(torch.float32, copy=True).contiguous()
        tensors[f"{prefix}.lora_B.weight"] = p.b.detach().to(torch.float32, copy=True).contiguous()
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    (folder / PEFT_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")


# ------------------------------------------------------------------ llama.cpp GGUF adapters


def _gguf_values(t) -> torch.Tensor:
    from ..loading import dequantize
    from ..errors import ModelFileError

    try:
        return torch.from_numpy(np.ascontiguousarray(dequantize(t), dtype=np.float32))
    except ModelFileError as e:
        raise BrickError(str(e)) from e


def read_gguf_adapter(path: Path, config: ModelConfig) -> tuple[dict[str, LoraPair], dict]:
    """A llama.cpp LoRA GGUF for `config`'s model -> (validated pairs in HF layout, metadata).

    Layout (llama.cpp llama-adapter.cpp): lora_a ne = [in, r], lora_b ne = [r, out], i.e. numpy
    [r, in] and [out, r]; scale = alpha / r, or 1 when alpha is 0 or absent.
    """
    from ..errors import ModelFileError
    from ..gguf_file import read_gguf

    path = Path(path)
    try:
        meta, tensors = read_gguf(path)
    except ModelFileError as e:
        raise BrickError(f"cannot read the adapter: {e}") from e
    problems = []
    if meta.get("general.type") != "adapter":
        problems.append(f"general.type is {meta.get('general.type')!r}, expected 'adapter' (is this a model file?)")
    if meta.get("adapter.type", "lora") != "lora":
        problems.append(f"adapter.type is {meta.get('adapter.type')!r}; only 'lora' is supported")
    arch = meta.get("general.architecture")
    if arch != config.arch:
        problems.append(f"the adapter is for architecture {arch!r} but the base model is {config.arch!r}")
    raise_problems(str(path), problems)
    alpha = float(meta.get("adapter.lora.alpha", 0.0) or 0.0)
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for t in tensors:
        if t.name.endswith("_norm.weight"):
            continue  # llama.cpp skips norm vectors in adapters too
        m = _GGUF_KEY.match(t.name)
        if not m or m.group(2) not in _GGUF_KIND:
            problems.append(f"{t.name}: not a LoRA tensor of a block's linear module (blk.N.<name>.weight.lora_a/b)")
            continue
        halves.setdefault(f"layers.{m.group(1)}.{_GGUF_KIND[m.group(2)]}", {})[m.group(3)] = _gguf_values(t)
    pairs = {}
    for name, ab in sorted(halves.items()):
        if set(ab) != {"a", "b"}:
            problems.append(f"{name}: lora_{'b' if 'a' in ab else 'a'} is missing")
            continue
        r = ab["a"].shape[0] if ab["a"].ndim == 2 else 0
        pairs[name] = LoraPair(ab["a"], ab["b"], alpha / r if alpha and r else 1.0)
    raise_problems(str(path), problems)
    validate(pairs, config, str(path))
    # llama.cpp's converter permuted q/k lora_b rows like the base weights of a `llama` GGUF
    return (from_gguf_layout(pairs, config) if arch == "llama" else pairs), meta


def from_gguf_layout(pairs: dict[str, LoraPair], config: ModelConfig) -> dict[str, LoraPair]:
    out = {}
    for name, p in pairs.items():
        heads = _rotary_heads(config, split_name(name)[1])
        out[name] = LoraPair(p.a, permute_rows(p.b, heads, inverse=True), p.scale) if heads else p
    return out


def write_gguf_adapter(path: Path, pairs: dict[str, LoraPair], config: ModelConfig) -> None:
    """Write HF-layout pairs as a llama.cpp LoRA GGUF for `config`'s architecture (scale folded into b)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch=config.arch)
    writer.add_type("adapter")
    writer.add_string("adapter.type", "lora")
    writer.add_float32("adapter.lora.alpha", 0.0)  # 0: llama.cpp applies scale 1; the scale is in b
    for name, p in sorted(pairs.items()):
        layer, kind = split_name(name)
        heads = _rotary_heads(config, kind) if config.arch == "llama" else 0
        b = p.scale * p.b
        b = permute_rows(b, heads) if heads else b
        base = f"blk.{layer}.{_KIND_GGUF[kind]}.weight"
        writer.add_tensor(f"{base}.lora_a", p.a.float().numpy())
        writer.add_tensor(f"{base}.lora_b", b.float().contiguous().numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_adapter(path: Path, config: ModelConfig) -> tuple[dict[str, LoraPair], dict]:
    """A PEFT folder (or its safetensors file) or a GGUF adapter -> (validated HF-layout pairs, info)."""
    path = Path(path)
    if not path.exists():
        raise BrickError(f"{path} does not exist; give a PEFT adapter folder or a GGUF LoRA file")
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if path.is_dir():
        pairs, cfg = read_peft(path)
        validate(pairs, config, str(path))
        return pairs, {"format": "peft", "base_model": cfg.get("base_model_name_or_path") or ""}
    pairs, meta = read_gguf_adapter(path, config)
    return pairs, {"format": "gguf", "base_model": str(meta.get("general.name", ""))}
