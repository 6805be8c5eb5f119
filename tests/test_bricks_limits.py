"""Bricks whose numbers are absurd: refused when added and when loaded, and a model whose logits are not
finite stops with an error instead of an empty answer ending with "stop"."""

import pytest
import torch

from cfm_runtime import RunOptions, load_model
from cfm_runtime.bricks import Brick, BrickError, BrickStore, apply_brick, base_info, import_adapter
from cfm_runtime.bricks.formats import MAX_UPDATE_RATIO, write_peft
from cfm_runtime.bricks.lora import LoraPair, attach, detach
from cfm_runtime.errors import NonFiniteError

HI = [{"role": "user", "content": "Hi"}]
MODULE = "layers.29.self_attn.v_proj"


@pytest.fixture(scope="module")
def lean_model(model_path):
    """The default int4 model, loaded without its torch form (what `cfm serve` runs)."""
    return load_model(model_path)


def pairs(model, b_value: float | None = None, amplitude: float = 0.05) -> dict[str, LoraPair]:
    """One rank-4 pair on MODULE (v_proj: d_model -> kv heads x head dim): random (a normal fine-tune's
    size), or with every lora_B value `b_value`."""
    c = model.config
    g = torch.Generator().manual_seed(0)
    n_in, n_out = c.d_model, c.n_kv_heads * c.head_dim
    a = torch.randn(4, n_in, generator=g) * amplitude
    b = torch.randn(n_out, 4, generator=g) * amplitude if b_value is None else torch.full((n_out, 4), b_value)
    return {MODULE: LoraPair(a, b, 2.0)}


def test_base_weight_norms_come_from_the_file(lean_model, model):
    """The norm the size check compares with is the file's weight, read without building the torch form."""
    norm = lean_model.weight_norm(MODULE)
    assert not lean_model.has_torch_form()
    weight = model.transformer.get_submodule(MODULE).weight  # the fp32 form: the same dequantized values
    assert norm == pytest.approx(float(torch.linalg.vector_norm(weight.double())), rel=1e-6)
    assert lean_model.weight_norm("layers.99.self_attn.v_proj") is None


def test_an_adapter_with_huge_weights_is_refused_when_added(lean_model, tmp_path):
    write_peft(tmp_path / "huge", pairs(lean_model, b_value=1e30))
    with pytest.raises(BrickError, match=rf"{MODULE}: the update's norm .* times the base weight's"):
        import_adapter(lean_model, tmp_path / "huge", "huge")
    write_peft(tmp_path / "fine", pairs(lean_model))
    assert import_adapter(lean_model, tmp_path / "fine", "fine").pairs  # a normal adapter passes
    assert not lean_model.has_torch_form()  # `cfm brick add` checks sizes without the torch form


def test_a_stored_brick_with_huge_weights_is_refused_when_loaded(lean_model, tmp_path):
    store = BrickStore(tmp_path / "bricks")
    store.save(Brick("huge", pairs(lean_model, b_value=1e30), base_info(lean_model)))  # bypasses `brick add`
    store.save(Brick("fine", pairs(lean_model), base_info(lean_model)))
    notices = []
    gen = lean_model.new_generator(RunOptions(brick_store=store.root, log=notices.append))
    assert gen.bricks.offered() == ["fine"]  # not offered (cfm serve lists no model id for it)
    assert any("huge not offered" in n and "overwhelm" in n for n in notices), notices
    assert not lean_model.has_torch_form()  # listing the bricks builds no torch form
    with pytest.raises(BrickError, match=f"at most {MAX_UPDATE_RATIO:g} times"):
        apply_brick(lean_model, store.load("huge"))


def test_non_finite_logits_stop_generation_with_an_error(lean_model):
    """On the default int4 path (native kernel, the brick as a side term) an infinite update makes NaN logits,
    which stop the answer with an error (the kernel does not round them to zeros, an empty "stop")."""
    # the low-level API checks nothing (with 1e30 instead of inf the norms flatten the overflow to zeros:
    # finite logits, and the add/load checks above refuse that brick)
    attach(lean_model.transformer, "huge", pairs(lean_model, b_value=float("inf")))
    lean_model.refresh_backend()
    try:
        assert lean_model.backend.name == "fused"
        with pytest.raises(NonFiniteError, match="NaN or infinite logits"):
            list(lean_model.generate(HI, temperature=0, max_tokens=4))
        assert lean_model.backend.report()["decode_path"] == "native"
    finally:
        detach(lean_model.transformer, "huge")
        lean_model.refresh_backend()
    assert "".join(lean_model.generate(HI, temperature=0, max_tokens=4))  # the model answers again
