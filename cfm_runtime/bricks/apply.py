"""Putting bricks on a model and taking them off: the model's fingerprint must match, the model
re-chooses its execution backend after every change."""

from __future__ import annotations

from pathlib import Path

from .formats import BrickError, check_update_sizes, read_adapter, to_model_layout, validate
from .lora import attach, detach
from .store import Brick, check_name


def base_info(model) -> dict:
    """What a brick records about its base model."""
    return {"base_fingerprint": model.fingerprint(), "base_model": model.config.name, "arch": model.config.arch,
            "n_layers": model.config.n_layers, "d_model": model.config.d_model}


def check_base(model, brick: Brick) -> None:
    """Refuse a brick made for another base model (its recorded fingerprint differs), or whose updates are
    not finite or absurdly large for this model's weights."""
    want = brick.meta.get("base_fingerprint")
    if want != model.fingerprint():
        raise BrickError(
            f"brick {brick.name!r} was made for another base model ({brick.meta.get('base_model') or 'unknown'}, "
            f"fingerprint {str(want)[:12]}) but the loaded model is {model.config.name} "
            f"(fingerprint {model.fingerprint()[:12]}); load the model it was made for"
        )
    check_update_sizes(brick.pairs, model.weight_norm, f"brick {brick.name!r}")


def import_adapter(model, path, name: str, description: str = "") -> Brick:
    """Read and validate a PEFT folder or GGUF LoRA adapter against `model` -> a Brick for the store."""
    check_name(name)
    pairs, info = read_adapter(Path(path), model.config)
    check_update_sizes(pairs, model.weight_norm, str(path))
    meta = base_info(model) | {"description": description, "source": info["format"],
                               "source_path": str(Path(path).resolve()), "adapter_base_model": info["base_model"]}
    return Brick(name, pairs, meta)


def apply_brick(model, brick: Brick, weight: float = 1.0) -> None:
    """Put a brick on the model's layers (base weights untouched); replaces a brick of the same name.
    The model re-chooses its execution backend (`Model.refresh_backend`)."""
    check_base(model, brick)
    validate(brick.pairs, model.config, f"brick {brick.name!r}")
    pairs = to_model_layout(brick.pairs, model.config)
    detach(model.transformer, brick.name)
    try:
        attach(model.transformer, brick.name, pairs, weight)
    finally:
        model.refresh_backend()


def remove_brick(model, name: str) -> None:
    """Take a brick off the model (no reload needed); the model re-chooses its execution backend."""
    detach(model.transformer, name)
    model.refresh_backend()
