"""Personal bricks: LoRA adapters kept on the device, applied to the edge's layers.

    store = BrickStore()
    brick = import_adapter(model, "path/to/peft_folder", "style")   # PEFT folder or GGUF adapter
    store.save(brick)
    apply_brick(model, store.load("style"), weight=1.0)               # wraps, does not patch
    remove_brick(model, "style")
"""

from __future__ import annotations

from .apply import apply_brick, base_info, check_base, import_adapter, remove_brick
from .formats import BrickError
from .lora import LoRALinear, LoraPair, attached, brick_layers, fuse_bricks, set_weight
from .store import Brick, BrickStore

__all__ = [
    "Brick", "BrickError", "BrickStore", "LoRALinear", "LoraPair", "apply_brick", "attached", "base_info",
    "brick_layers", "check_base", "fuse_bricks", "import_adapter", "remove_brick", "set_weight",
]
