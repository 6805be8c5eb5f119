"""Bricks whose numbers are absurd: refused when added and when loaded, and a model whose logits are not
finite stops with an error instead of an empty answer ending with "stop"."""

import pytest
import torch

from cfm_runtime import RunOptions
from cfm_runtime.bricks import Brick, BrickError, BrickStore, apply_brick, base_info, import_adapter
from cfm_runtime.bricks.formats import MAX_UPDATE_RATIO, write_peft
from cfm_runtime.bricks.lora import LoraPair, attach, detach
from cfm_runtime.errors import NonFiniteError

HI = [{"role": "user", "content": "Hi"}]
MODULE = "layers.29.self_attn.v_proj"


def pairs(model, b_value: float | None = None, amplitude: float = 0.05) -> dict[str, LoraPair]:
    """One rank-4 pair on MODULE: random (a normal fine-tune's size), or with every lora_B value `b_value`."""
    g = torch.Generator().manual_seed(0)
    lin = model.transformer.get_submodule(MODULE)
    a = torch.randn(4, lin.in_features, generator=g) * amplitude
    b = torch.randn(lin.out_features, 4, generator=g) * amplitude if b_value is None else \
        torch.full((lin.out_features, 4), b_value)
    return {MODULE: LoraPair(a, b, 2.0)}


def test_an_adapter_with_huge_weights_is_refused_when_added(own_model, tmp_path):
    write_peft(tmp_path / "huge", pairs(own_model, b_value=1e30))
    with pytest.raises(BrickError, match=rf"{MODULE}: the update's norm .* times the base weight's"):
        import_adapter(own_model, tmp_path / "huge", "huge")
    write_peft(tmp_path / "fine", pairs(own_model))
    assert import_adapter(own_model, tmp_path / "fine", "fine").pairs  # a normal adapter passes


def test_a_stored_brick_with_huge_weights_is_refused_when_loaded(own_model, tmp_path):
    store = BrickStore(tmp_path / "bricks")
    store.save(Brick("huge", pairs(own_model, b_value=1e30), base_info(own_model)))  # bypasses `brick add`
    store.save(Brick("fine", pairs(own_model), base_info(own_model)))
    with pytest.raises(BrickError, match=f"at most {MAX_UPDATE_RATIO:g} times"):
        apply_brick(own_model, store.load("huge"))
    notices = []
    gen = own_model.new_generator(RunOptions(brick_store=store.root, log=notices.append))
    assert gen.bricks.offered() == ["fine"]  # not offered (cfm serve lists no model id for it)
    assert any("huge not offered" in n and "overwhelm" in n for n in notices), notices


def test_non_finite_logits_stop_generation_with_an_error(own_model):
    # the low-level API checks nothing: an infinite update makes the logits NaN (with 1e30 the final norm
    # flattens the overflow to zeros instead: finite logits, and the add/load checks above refuse that brick)
    attach(own_model.transformer, "huge", pairs(own_model, b_value=float("inf")))
    own_model.refresh_backend()
    try:
        with pytest.raises(NonFiniteError, match="NaN or infinite logits"):
            list(own_model.generate(HI, temperature=0, max_tokens=4))
    finally:
        detach(own_model.transformer, "huge")
        own_model.refresh_backend()
    assert "".join(own_model.generate(HI, temperature=0, max_tokens=4))  # the model answers again
