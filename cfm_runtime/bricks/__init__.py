"""Personal bricks: LoRA adapters kept on the device, applied to the edge's layers.

    store = BrickStore()
    brick = import_adapter(model, "path/to/peft_folder", "style")   # PEFT folder or GGUF adapter
    store.save(brick)
    apply_brick(model, store.load("style"), weight=1.0)               # wraps, does not patch
    remove_brick(model, "style")

The names below are imported on first use: `cfm_runtime.bricks.config` (and the CLI's parser through it) must
not pay for torch.
"""

from .._lazy import lazy_names

_WHERE = {
    "apply_brick": "apply", "base_info": "apply", "check_base": "apply", "import_adapter": "apply",
    "remove_brick": "apply", "BrickError": "formats",
    "LoRALinear": "lora", "LoraPair": "lora", "attached": "lora", "brick_layers": "lora", "fuse_bricks": "lora",
    "set_weight": "lora", "Brick": "store", "BrickStore": "store",
}
__all__ = sorted(_WHERE)

__getattr__, __dir__ = lazy_names(__name__, _WHERE)
