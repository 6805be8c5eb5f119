"""Model configuration for the Llama family, read from a checkpoint's own metadata."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from .errors import ModelFileError

# GGUF architectures with the Llama block shape (pre-norm, GQA attention, gated FFN).
# qwen2 differs only by q/k/v biases and the NEOX rotary layout.
GGUF_ARCHITECTURES = ("llama", "qwen2")
HF_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    arch: str
    n_layers: int
    d_model: int
    d_ff: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    context_length: int = 4096
    head_dim: int = 0
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    # "normal": rotate adjacent pairs (llama.cpp's layout for GGUF llama, whose converter
    # permutes q/k rows); "neox": rotate the two halves (HF checkpoints, GGUF qwen2).
    rope_style: str = "normal"
    rope_freq_factors: list[float] | None = field(default=None, repr=False)
    activation: str = "silu"  # "silu" (SwiGLU) or "relu" (ReLU-gated, e.g. ProSparse / ReluLLaMA)
    attn_bias: bool = False
    tied_embeddings: bool = False
    name: str = ""

    def __post_init__(self):
        if not self.head_dim:
            self.head_dim = self.d_model // self.n_heads
        problems = []
        if self.n_heads % self.n_kv_heads:
            problems.append(f"head count {self.n_heads} is not a multiple of KV head count {self.n_kv_heads}")
        if self.head_dim % 2:
            problems.append(f"head dim {self.head_dim} is odd; rotary embeddings need an even head dim")
        if self.rope_style not in ("normal", "neox"):
            problems.append(f"unknown rotary layout {self.rope_style!r}")
        if self.activation not in ("silu", "relu"):
            problems.append(f"unknown FFN activation {self.activation!r} (supported: silu, relu)")
        if problems:
            raise ModelFileError("invalid model configuration: " + "; ".join(problems))

    @classmethod
    def from_dict(cls, values: dict) -> "ModelConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def kv_bytes_per_token(self) -> int:
        """fp32 K and V for every layer, per cached position."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4
