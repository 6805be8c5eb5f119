"""Brick formats against the real ecosystem: peft on transformers' Llama, llama.cpp's own LoRA support."""

import copy

import gguf
import numpy as np
import pytest
import torch

from cfm_runtime.bricks import BrickError, apply_brick, import_adapter, remove_brick
from cfm_runtime.bricks.formats import read_adapter, to_model_layout, write_peft
from cfm_runtime.bricks.lora import LoraPair, attach, detach
from cfm_runtime.tokenizer import quiet_stderr

TEXT = ("My cat Tom lives in Paris with me. The quick brown fox jumps over the lazy dog; "
        "def f(x):\n    return x * 2\nIn 1990 the population of the town was")
KINDS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def peft_dir(hf_reference, tmp_path_factory):
    """A random PEFT LoRA (nonzero lora_B, rsLoRA scaling) saved by peft itself, and peft's logits."""
    from peft import LoraConfig, get_peft_model

    hf, tok = hf_reference
    torch.manual_seed(0)
    cfg = LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=KINDS, layers_to_transform=[0, 7, 29],
                     init_lora_weights=False)
    peft_model = get_peft_model(copy.deepcopy(hf), cfg).eval()  # a copy: the session fixture stays clean
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.1)
    folder = tmp_path_factory.mktemp("peft")
    peft_model.save_pretrained(str(folder))
    return folder, peft_model


def test_peft_adapter_logits_match_peft(own_model, peft_dir, hf_reference):
    folder, peft_model = peft_dir
    hf, _ = hf_reference
    ids = own_model.tokenizer.encode(TEXT)
    with torch.no_grad():
        ref = peft_model(torch.tensor([ids])).logits[0].numpy()
        base = hf(torch.tensor([ids])).logits[0].numpy()
    brick = import_adapter(own_model, folder, "peft-random")
    apply_brick(own_model, brick)
    try:
        ours = own_model.logits(ids)
    finally:
        remove_brick(own_model, "peft-random")
    assert np.abs(ref - base).max() > 1.0, "the adapter must change the logits for the test to mean anything"
    assert np.abs(ours - ref).max() < 1e-2
    np.testing.assert_allclose(own_model.logits(ids), base, atol=1e-2)  # removed: back to the base own_model
    # the q/k row permutation is what makes it match: without it the logits are far off
    attach(own_model.transformer, "raw", brick.pairs)
    try:
        assert np.abs(own_model.logits(ids) - ref).max() > 0.1
    finally:
        detach(own_model.transformer, "raw")


def test_brick_saved_as_peft_loads_in_peft(own_model, peft_dir, hf_reference, tmp_path):
    """Round trip: our PEFT writer's folder gives peft the same model as the original adapter."""
    from peft import PeftModel

    folder, peft_model = peft_dir
    pairs, _ = read_adapter(folder, own_model.config)
    write_peft(tmp_path, pairs)
    hf, _ = hf_reference
    reloaded = PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path)).eval()
    ids = own_model.tokenizer.encode(TEXT)[:24]
    with torch.no_grad():
        a = reloaded(torch.tensor([ids])).logits[0].numpy()
        b = peft_model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(a - b).max() < 1e-3


GGUF_SHAPES = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
               "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}


def write_gguf_lora(path, layers=(1, 15, 28), rank=8, alpha=16.0, seed=0, arch="llama", shapes=GGUF_SHAPES):
    """A llama.cpp LoRA adapter: lora_a numpy [r, in] (ne [in, r]), lora_b [out, r] (ne [r, out])."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch=arch)
    w.add_type("adapter")
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", alpha)
    for layer in layers:
        for kind, (out, inp) in shapes.items():
            w.add_tensor(f"blk.{layer}.{kind}.weight.lora_a", (rng.standard_normal((rank, inp)) / np.sqrt(inp)).astype(np.float32))
            w.add_tensor(f"blk.{layer}.{kind}.weight.lora_b", (rng.standard_normal((out, rank)) * 0.1).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def llama_logits(model_path, ids, lora=None):
    from cfm_runtime.reference import open_llama

    with quiet_stderr():
        llm = open_llama(model_path, n_ctx=256, logits_all=True, n_threads=2, verbose=False,
                         **({"lora_path": str(lora)} if lora else {}))
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    llm.close()
    return out


def test_gguf_adapter_matches_llama_cpp(own_model, model_path, tmp_path):
    path = write_gguf_lora(tmp_path / "lora.gguf")
    ids = own_model.tokenizer.encode(TEXT)
    base_ref, lora_ref = llama_logits(model_path, ids), llama_logits(model_path, ids, path)
    base = own_model.logits(ids)
    brick = import_adapter(own_model, path, "gguf-random")
    apply_brick(own_model, brick)
    try:
        ours = own_model.logits(ids)
    finally:
        remove_brick(own_model, "gguf-random")
    ref_delta, our_delta = lora_ref - base_ref, ours - base
    assert np.abs(ref_delta).max() > 3.0  # llama.cpp applied it, strongly
    corr = np.corrcoef(ref_delta.ravel(), our_delta.ravel())[0, 1]
    # llama.cpp quantizes activations to 8 bits: its base logits differ from ours by ~1.6 at worst
    noise = np.abs(base - base_ref).max()
    assert corr > 0.93 and np.abs(ours - lora_ref).max() < noise + 1.0
    assert (ours.argmax(-1) == lora_ref.argmax(-1)).mean() >= 0.9
    # q/k rows read without undoing llama.cpp's permutation agree markedly worse
    wrong = to_model_layout(to_model_layout(brick.pairs, own_model.config), own_model.config)
    attach(own_model.transformer, "wrong", wrong)
    try:
        wrong_delta = own_model.logits(ids) - base
    finally:
        detach(own_model.transformer, "wrong")
    assert np.corrcoef(ref_delta.ravel(), wrong_delta.ravel())[0, 1] < corr - 0.05


def test_all_mismatches_reported_at_once(own_model, tmp_path):
    shapes = dict(GGUF_SHAPES, attn_k=(576, 576), ffn_down=(576, 1000))
    path = write_gguf_lora(tmp_path / "bad.gguf", layers=(1, 40), shapes=shapes)
    with pytest.raises(BrickError) as e:
        import_adapter(own_model, path, "bad")
    msg = str(e.value)
    assert "layers.1.self_attn.k_proj: lora_B is (576, 8), expected [192, rank]" in msg
    assert "layers.1.mlp.down_proj: lora_A is (8, 1000), expected [rank, 1536]" in msg
    assert "layer 40 does not exist" in msg
    assert "problem(s)" in msg and msg.count("\n") >= 3


def test_gguf_adapter_for_another_architecture_is_refused(own_model, tmp_path):
    path = write_gguf_lora(tmp_path / "q.gguf", layers=(0,), arch="qwen2")
    with pytest.raises(BrickError, match="architecture 'qwen2'"):
        import_adapter(own_model, path, "q")


def test_peft_bad_files(own_model, peft_dir, tmp_path):
    import shutil
    import json

    folder, _ = peft_dir
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    weights = broken / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(BrickError, match="corrupt or not a safetensors"):
        import_adapter(own_model, broken, "x")
    dora = tmp_path / "dora"
    shutil.copytree(folder, dora)
    cfg = json.loads((dora / "adapter_config.json").read_text()) | {"use_dora": True, "modules_to_save": ["lm_head"]}
    (dora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(BrickError, match="use_dora=True is not supported(.|\n)*modules_to_save"):
        import_adapter(own_model, dora, "x")
    with pytest.raises(BrickError, match="does not exist"):
        import_adapter(own_model, tmp_path / "nothing", "x")


def test_several_bricks_with_weights_sum_their_updates(own_model):
    """Two bricks on one layer at weights 0.5 and 2 equal one brick holding 0.5 d1 + 2 d2."""
    g = torch.Generator().manual_seed(1)
    q = "layers.3.self_attn.q_proj"

    def rand_pair():
        return LoraPair(torch.randn(4, 576, generator=g) * 0.05, torch.randn(576, 4, generator=g) * 0.05, 2.0)

    p1, p2 = rand_pair(), rand_pair()
    ids = own_model.tokenizer.encode(TEXT)[:20]
    attach(own_model.transformer, "one", {q: p1}, 0.5)
    attach(own_model.transformer, "two", {q: p2}, 2.0)
    try:
        both = own_model.logits(ids)
    finally:
        detach(own_model.transformer, "one")
        detach(own_model.transformer, "two")
    merged = LoraPair(torch.cat([p1.a, p2.a]), torch.cat([0.5 * 2.0 * p1.b, 2.0 * 2.0 * p2.b], 1), 1.0)
    attach(own_model.transformer, "merged", {q: merged})
    try:
        one = own_model.logits(ids)
    finally:
        detach(own_model.transformer, "merged")
    assert np.abs(both - one).max() < 1e-3
    assert type(own_model.transformer.layers[3].self_attn.q_proj) is torch.nn.Linear  # unwrapped again
