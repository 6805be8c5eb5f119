"""Tiny random Llama-family GGUF files, written with the `gguf` package, for architecture tests.

They borrow the embedded model's tokenizer so llama.cpp can load them as real models.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cfm_runtime.gguf_file import read_gguf


def write_tiny_gguf(path: Path, source: Path, arch: str = "qwen2", *, n_layers: int = 2, d_model: int = 64,
                    d_ff: int = 128, n_heads: int = 4, n_kv_heads: int = 2, tied: bool = True,
                    dtype: str = "F32", seed: int = 0) -> Path:
    import gguf

    meta, _ = read_gguf(source, max_array=None)
    vocab = len(meta["tokenizer.ggml.tokens"])
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny-{arch}")
    w.add_block_count(n_layers)
    w.add_context_length(512)
    w.add_embedding_length(d_model)
    w.add_feed_forward_length(d_ff)
    w.add_head_count(n_heads)
    w.add_head_count_kv(n_kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(d_model // n_heads)
    w.add_tokenizer_model(meta["tokenizer.ggml.model"])
    w.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    w.add_token_list(meta["tokenizer.ggml.tokens"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_token_merges(meta["tokenizer.ggml.merges"])
    w.add_bos_token_id(meta["tokenizer.ggml.bos_token_id"])
    w.add_eos_token_id(meta["tokenizer.ggml.eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(meta["tokenizer.chat_template"])

    def add(name, *shape, scale=0.05, ones=False):
        a = np.ones(shape, np.float32) if ones else (rng.standard_normal(shape) * scale).astype(np.float32)
        if dtype == "F16" and len(shape) == 2:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, a)

    hd = d_model // n_heads
    add("token_embd.weight", vocab, d_model, scale=0.5)
    for i in range(n_layers):
        p = f"blk.{i}."
        add(p + "attn_norm.weight", d_model, ones=True)
        add(p + "attn_q.weight", n_heads * hd, d_model)
        add(p + "attn_k.weight", n_kv_heads * hd, d_model)
        add(p + "attn_v.weight", n_kv_heads * hd, d_model)
        if arch == "qwen2":
            add(p + "attn_q.bias", n_heads * hd, scale=0.5)
            add(p + "attn_k.bias", n_kv_heads * hd, scale=0.5)
            add(p + "attn_v.bias", n_kv_heads * hd, scale=0.5)
        add(p + "attn_output.weight", d_model, n_heads * hd)
        add(p + "ffn_norm.weight", d_model, ones=True)
        add(p + "ffn_gate.weight", d_ff, d_model)
        add(p + "ffn_up.weight", d_ff, d_model)
        add(p + "ffn_down.weight", d_model, d_ff)
    add("output_norm.weight", d_model, ones=True)
    if not tied:
        add("output.weight", vocab, d_model, scale=0.5)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
