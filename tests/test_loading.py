"""Loading GGUF files and Hugging Face folders, and refusing damaged or foreign ones."""


import numpy as np
import pytest
import torch

import cfm_runtime
from cfm_runtime import ModelFileError
from cfm_runtime.gguf_file import read_gguf
from cfm_runtime.loading import dequantize
from cfm_runtime.reference import llama_cpp_logits
from tiny_models import write_tiny_gguf


def test_config_from_metadata(model):
    c = model.config
    assert (c.arch, c.n_layers, c.d_model, c.d_ff, c.n_heads, c.n_kv_heads, c.head_dim) == ("llama", 30, 576, 1536, 9, 3, 64)
    assert (c.vocab_size, c.context_length, c.rope_base, c.rope_style) == (49152, 8192, 100000.0, "normal")
    assert c.tied_embeddings and c.activation == "silu"


def test_fast_dequantize_equals_gguf_package(model_path):
    import gguf

    _, tensors = read_gguf(model_path)
    seen = set()
    for t in tensors:
        if t.qtype.name in seen:
            continue
        seen.add(t.qtype.name)
        expected = gguf.quants.dequantize(t.data, t.qtype).reshape(t.shape)
        np.testing.assert_array_equal(dequantize(t), expected)
    assert {"Q8_0", "Q4_1", "F32"} <= seen


@pytest.mark.parametrize("arch,tied,dtype", [("qwen2", True, "F32"), ("llama", False, "F16")])
def test_other_architectures_match_llama_cpp(tmp_path, model_path, arch, tied, dtype):
    """qwen2 (q/k/v biases, NEOX rotary) and an untied fp16 llama, checked against llama.cpp."""
    path = write_tiny_gguf(tmp_path / f"tiny-{arch}.gguf", model_path, arch, tied=tied, dtype=dtype)
    m = cfm_runtime.load_model(path, weights="fp32")
    assert m.config.arch == arch and m.config.tied_embeddings == tied
    ids = m.tokenizer.encode("A tiny model reads a short sentence, twice. " * 4)
    ours, ref = m.logits(ids), llama_cpp_logits(path, ids)
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() == 1.0
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()


def test_hugging_face_folder(tmp_path, model, eval_ids, hf_reference):
    import json

    from safetensors.torch import save_file

    hf, tok = hf_reference
    # save_pretrained refuses models loaded from GGUF; write the same files a HF checkpoint has
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if cfg.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    save_file(state, str(tmp_path / "model.safetensors"))
    tok.save_pretrained(tmp_path)
    m = cfm_runtime.load_model(tmp_path, weights="fp32")
    assert m.format == "hf" and m.config.rope_style == "neox"
    ids = eval_ids["chat"]
    assert m.encode_prompt([{"role": "user", "content": "Hi there!"}]) == model.encode_prompt(
        [{"role": "user", "content": "Hi there!"}])
    assert m.tokenizer.decode(ids) == model.tokenizer.decode(ids)
    diff = np.abs(m.logits(ids) - model.logits(ids)).max()
    assert diff < 1e-2, diff
    text = "".join(m.generate([{"role": "user", "content": "What is the capital of France?"}], temperature=0, max_tokens=12))
    assert "Paris" in text


def test_missing_path():
    with pytest.raises(ModelFileError, match="does not exist"):
        cfm_runtime.load_model("/no/such/model.gguf")


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip file" * 10)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        cfm_runtime.load_model(p)


@pytest.mark.parametrize("keep", [0.5, 0.999, 1000])
def test_truncated_gguf(tmp_path, model_path, keep):
    size = model_path.stat().st_size
    n = int(size * keep) if keep < 1 else keep
    p = tmp_path / "cut.gguf"
    with open(model_path, "rb") as f:
        p.write_bytes(f.read(n))
    with pytest.raises(ModelFileError, match="truncated"):
        cfm_runtime.load_model(p)


def test_other_architecture_refused(tmp_path, model_path):
    """A GGUF whose architecture is not of the Llama shape names it and what is supported."""
    import gguf

    p = tmp_path / "gpt2.gguf"
    w = gguf.GGUFWriter(str(p), "gpt2")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ModelFileError, match="architecture 'gpt2'.*supported"):
        cfm_runtime.load_model(p)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelFileError, match="config.json"):
        cfm_runtime.load_model(tmp_path)


def test_corrupt_safetensors(tmp_path, model_path):
    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,'
        ' "num_attention_heads": 4, "vocab_size": 100}')
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        cfm_runtime.load_model(tmp_path)


def test_wrong_tensor_shapes_listed_together(tmp_path, model_path):
    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(
        '{"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,'
        ' "num_attention_heads": 4, "vocab_size": 100}')
    save_file({"model.embed_tokens.weight": torch.zeros(100, 32), "model.norm.weight": torch.zeros(64)},
              str(tmp_path / "model.safetensors"))
    with pytest.raises(ModelFileError) as e:
        cfm_runtime.load_model(tmp_path)
    msg = str(e.value)
    assert "embed_tokens.weight has shape (100, 32), expected (100, 64)" in msg and "missing layers.0" in msg
