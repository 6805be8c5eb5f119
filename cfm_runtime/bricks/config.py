"""Brick settings that need no torch: what a brick may target and how one is trained (read by the CLI's
parser before anything heavy is imported)."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CfmError

# Linear modules of a Llama block that bricks may target, by their HF names inside a layer.
TARGET_KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


@dataclass
class TrainConfig:
    rank: int = 8
    alpha: float = 16.0
    top_layers: int = 8  # LoRA on the last `top_layers` layers
    targets: tuple[str, ...] = TARGET_KINDS
    steps: int = 50
    lr: float = 1e-3
    weight_decay: float = 0.0
    seq_len: int = 256  # longer texts are cut into windows of this many tokens
    seed: int = 0
    checkpoint_every: int = 20
    anchor_weight: float = 10.0  # KL to the base model on general chats, so unrelated answers stay put (sweep: 1-30)
    anchors: int = 48  # general sequences in the anchor set (shipped prompts with the base's answers, calib text)
    anchor_batch: int = 2  # anchor sequences in the KL term of every step
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    anchor_on: str = "answers"  # KL on the answer tokens of anchor chats (and all of plain texts), or "all" tokens

    def __post_init__(self):
        problems = []
        if self.rank < 1:
            problems.append(f"rank must be >= 1, got {self.rank}")
        if self.steps < 1:
            problems.append(f"steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            problems.append(f"learning rate must be > 0, got {self.lr}")
        if self.anchor_weight < 0 or self.anchors < 0 or self.anchor_batch < 0:
            problems.append("anchor weight, anchors and anchor batch must be >= 0")
        if self.anchor_on not in ("answers", "all"):
            problems.append(f"anchor_on must be 'answers' or 'all', got {self.anchor_on!r}")
        if self.seq_len < 8:
            problems.append(f"seq_len must be >= 8, got {self.seq_len}")
        bad = [t for t in self.targets if t not in TARGET_KINDS]
        if bad:
            problems.append(f"unknown target modules {bad} (choose from {', '.join(TARGET_KINDS)})")
        if problems:
            raise CfmError("bad training options: " + "; ".join(problems))
