"""Quantized weights (cfm_runtime.kernels): kernels against dequantized references, quality against fp32
and llama.cpp, the fused backend against the module backend, and real LoRA bricks on quantized linears."""

import copy

import numpy as np
import pytest
import torch

from cfm_runtime import LocalRunner, load_model
from cfm_runtime.backends import FusedBackend, ModuleBackend, decoder_weights, quantize_model, weight_bytes_per_token
from cfm_runtime.bricks import LoRALinear, LoraPair
from cfm_runtime.errors import CfmError
from cfm_runtime.generate import Generator
from cfm_runtime.kernels import native
from cfm_runtime.kernels.packing import pack, unpack
from cfm_runtime.kernels.quant import QuantizedHead, QuantizedLinear
from cfm_runtime.reference import llama_cpp_logits
from cfm_runtime.sampling import SamplingParams


def quantized(model, accuracy=None):
    """The session model (fp32) with a quantized copy of its transformer: int4 blocks, 8-bit head."""
    m = copy.copy(model)
    m.transformer = quantize_model(copy.deepcopy(model.transformer), "int4", "int8", torch.get_num_threads(), accuracy)
    m.refresh_backend()
    return m


@pytest.fixture(scope="module")
def int4(model):
    return quantized(model)


@pytest.fixture(scope="module")
def int4_exact(model):
    """int4 with fp32 activations in the kernels: the fp32 model's logits to ~1e-4, so paths compare tightly."""
    return quantized(model, accuracy=0)


@pytest.fixture(scope="module")
def int4_logits(int4, eval_ids):
    return {k: int4.logits(v) for k, v in eval_ids.items()}


def perplexity(logits: dict, ids: dict) -> float:
    nll = n = 0.0
    for k, lg in logits.items():
        lp = torch.log_softmax(torch.from_numpy(lg[:-1]), -1)
        nll -= float(lp.gather(1, torch.tensor(ids[k][1:])[:, None]).sum())
        n += len(ids[k]) - 1
    return float(np.exp(nll / n))


def test_int4_repacks_q4_1_exactly_and_runs_like_the_dequantized_weight(model):
    w = model.transformer.layers[3].mlp.gate_proj.weight  # Q4_1 in the GGUF
    q = QuantizedLinear.from_linear(model.transformer.layers[3].mlp.gate_proj, "int4", accuracy=0)
    assert torch.equal(q.dequantize(), w)
    assert q.nbytes / w.numel() < 0.8  # vs 4 bytes in fp32
    x = torch.randn(2, 5, w.shape[1])
    torch.testing.assert_close(q(x), x @ w.T, rtol=1e-4, atol=1e-4)
    fast = QuantizedLinear.from_linear(model.transformer.layers[3].mlp.gate_proj, "int4")  # int8 activations
    err = (fast(x) - x @ w.T).abs().max() / (x @ w.T).abs().max()
    assert 0 < err < 0.02


def test_int8_and_head_packing(model):
    w = model.transformer.layers[0].self_attn.q_proj.weight
    q = QuantizedLinear.from_linear(model.transformer.layers[0].self_attn.q_proj, "int8", accuracy=0)
    step = (w.reshape(w.shape[0], -1, 32).amax(-1) - w.reshape(w.shape[0], -1, 32).amin(-1)) / 255
    err = (q.dequantize() - w).abs().reshape(w.shape[0], -1, 32).amax(-1)
    assert bool((err <= step * 0.51 + 1e-7).all())
    x = torch.randn(3, w.shape[1])
    torch.testing.assert_close(q(x), x @ q.dequantize().T, rtol=1e-4, atol=1e-4)
    emb = model.transformer.embed_tokens.weight  # Q8_0: symmetric 8-bit packing is exact
    head = QuantizedHead.from_weight(emb[:4096])
    assert torch.equal(head.dequantize(), emb[:4096])


def test_pack_rejects_bad_shapes():
    with pytest.raises(ValueError, match="multiple of the block"):
        pack(torch.randn(4, 40))
    with pytest.raises(ValueError, match="bits"):
        pack(torch.randn(4, 64), bits=3)
    w = torch.randn(8, 64)
    assert (unpack(pack(w, 4, 32, "min")) - w).abs().max() <= (w.max() - w.min()) / 15
    mid = pack(w, 4, 32, "mid")  # the same grid with the kernel's implicit zero point (none stored)
    assert mid.zero_points is None and torch.allclose(unpack(mid), unpack(pack(w, 4, 32, "min")), atol=1e-6)


def test_int4_quality_against_fp32_and_llama_cpp(model, eval_ids, int4_logits):
    """int4 (the default) against the fp32 model, with llama.cpp on the same Q4_1 file measured here as the
    yardstick: top-1 agreement with fp32 at least llama.cpp's (less one point), perplexity change at most
    llama.cpp's (plus one point)."""
    fp32 = {k: model.logits(v) for k, v in eval_ids.items()}
    cpp = {k: llama_cpp_logits(model.path, v) for k, v in eval_ids.items()}

    def top1(logits):
        return np.mean(np.concatenate([logits[k].argmax(-1) == fp32[k].argmax(-1) for k in eval_ids]))

    def delta(logits):
        return perplexity(logits, eval_ids) / perplexity(fp32, eval_ids) - 1

    assert top1(int4_logits) >= top1(cpp) - 0.01, (top1(int4_logits), top1(cpp))
    assert abs(delta(int4_logits)) <= abs(delta(cpp)) + 0.01, (delta(int4_logits), delta(cpp))


def zero_lora(base, rank: int = 4) -> LoRALinear:
    """The real brick wrapper around `base` with one adapter whose update is zero (B = 0)."""
    wrapped = LoRALinear.from_base(base)
    wrapped.add("zero", LoraPair(torch.randn(rank, base.in_features), torch.zeros(base.out_features, rank), 1.0))
    return wrapped


def test_fused_decode_matches_prefill_and_module_path(model, int4_exact, eval_ids):
    """Chunked prefill and token-by-token decode on the fused backend (its graphs: fp32 activations), then on the
    module backend continuing the same KV cache, reproduce the fp32 model's logits; a brick put on keeps the
    fused backend (a side term) and taking it off gives the very same backend back."""
    m, ids = int4_exact, eval_ids["math"][:48]
    t = m.transformer
    full = model.logits(ids)
    runner = LocalRunner(m, chunk=16)
    fused = m.backend
    assert fused.name == "fused"
    prefix = runner.forward(ids[:30], all_logits=True)
    fused_steps = [runner.forward([i])[-1] for i in ids[30:40]]
    kv_fused = torch.from_numpy(runner.cache[7].k[:, :40].copy())
    modules = copy.copy(m)  # the same transformer through its torch modules
    modules.backend = ModuleBackend(t)
    on_modules = LocalRunner(modules)
    on_modules.cache = runner.cache
    module_steps = [on_modules.forward([i])[-1] for i in ids[40:48]]
    check = LocalRunner(modules)
    check.forward(ids[:40])
    kv_module = torch.from_numpy(check.cache[7].k[:, :40])
    proj = t.layers[5].mlp.up_proj
    t.layers[5].mlp.up_proj = zero_lora(proj)
    m.refresh_backend()
    try:
        assert m.backend is fused and (5, "up") in fused.sides
    finally:
        t.layers[5].mlp.up_proj = proj
        m.refresh_backend()
    assert m.backend is fused and fused.sides == {}
    np.testing.assert_allclose(prefix, full[:30], atol=2e-3)
    np.testing.assert_allclose(np.stack(fused_steps + module_steps), full[30:], atol=2e-3)
    torch.testing.assert_close(kv_fused, kv_module, atol=1e-4, rtol=1e-4)


def test_native_decode_step_matches_fp32_and_the_graph(model, int4, eval_ids):
    """Single-token steps through the compiled kernel (kernels/native.py) after a prefill on the graph:
    the fp32 model's next tokens and perplexity, the graph's keys and values, and a graph step after it."""
    ids = eval_ids["prose"][:96]
    assert int4.backend.native() is not None, native.failure()
    graph_only = copy.copy(int4)  # the same weights on a fused backend that never uses the native step
    graph_only.backend = FusedBackend(int4.transformer, decoder_weights(int4.transformer), torch.get_num_threads())
    full = model.logits(ids)
    runner, graph = LocalRunner(int4), LocalRunner(graph_only)
    runner.forward(ids[:32])
    graph.forward(ids[:32])
    steps = np.stack([runner.forward([i])[-1] for i in ids[32:]])
    graph_steps = np.stack([graph.forward([i])[-1] for i in ids[32:]])
    assert "native" in int4.backend.report()["decode_path"] and "graph" in graph_only.backend.report()["decode_path"]
    ref, nxt = full[32:], torch.tensor(ids[33:])
    assert np.mean(steps.argmax(-1) == ref.argmax(-1)) >= 0.9
    nll = [float(-torch.log_softmax(torch.from_numpy(x[:-1]), -1).gather(1, nxt[:, None]).mean()) for x in (steps, ref)]
    assert abs(nll[0] - nll[1]) < 0.03, nll  # perplexity within ~3% of fp32 on this window
    assert np.abs(steps - graph_steps).max() < 2.0 and np.mean(steps.argmax(-1) == graph_steps.argmax(-1)) >= 0.9
    k, k_graph = runner.cache[7].k[:, :len(ids)], graph.cache[7].k[:, :len(ids)]
    assert np.abs(k - k_graph).max() < 0.05 * np.abs(k_graph).max()
    chunk = LocalRunner(int4)  # a prompt chunk through the kernel is computed exactly as single steps are
    chunk.forward(ids[:32])
    assert np.array_equal(chunk.forward(ids[32:], all_logits=True), steps)


def test_lora_wrapping_a_quantized_linear_trains(int4):
    base = int4.transformer.layers[2].self_attn.q_proj
    brick = zero_lora(base)
    x = torch.randn(1, 3, base.in_features, requires_grad=True)
    torch.testing.assert_close(brick(x), base(x))
    pair = brick.adapters["zero"]
    pair.a.requires_grad_(True)
    pair.b.normal_(std=0.1).requires_grad_(True)
    brick(x).pow(2).sum().backward()
    assert pair.a.grad is not None and pair.a.grad.abs().sum() > 0
    # the gradient through the quantized base is the dequantized weight's
    y = base(x)
    g = torch.autograd.grad(y.sum(), x)[0]
    torch.testing.assert_close(g, torch.ones(1, 3, base.out_features) @ base.dequantize(), rtol=1e-4, atol=1e-4)


def test_spans_compose_with_quantized_modules(int4, eval_ids):
    ids = torch.tensor([eval_ids["prose"][:24]])
    int4 = int4.transformer
    n = int4.config.n_layers
    with torch.inference_mode():
        whole = int4.head(int4.forward_span(int4.embed(ids), 0, n, [int4.new_cache()]))
        h = int4.embed(ids)
        for a, b in ((0, 2), (2, 17), (17, n)):
            h = int4.forward_span(h, a, b, [int4.new_cache(a, b)])
    torch.testing.assert_close(int4.head(h), whole)


def test_bytes_per_token_and_bad_options(model, int4):
    fp32, q = weight_bytes_per_token(model.transformer), weight_bytes_per_token(int4.transformer)
    assert fp32 > 500e6 and q < 0.25 * fp32
    with pytest.raises(CfmError, match=r"weights \(--weights\) must be one of"):
        load_model(weights="int3")
    with pytest.raises(CfmError, match="lm_head"):
        load_model(weights="int4", lm_head="int2")


def test_generation_on_the_fused_graph_runs_torch_single_threaded(model, int4):
    """While the fused backend decodes, torch (sampling, embedding lookups) runs on one thread, so its OpenMP
    workers do not spin on the cores the kernels' workers need; the count is restored afterwards; a brick keeps
    the fused backend, and the module backend (fp32) leaves the count alone."""
    runner = LocalRunner(int4)
    gen = Generator(runner, model.tokenizer, model.config.context_length)
    before = torch.get_num_threads()
    seen = [torch.get_num_threads() for _ in gen.stream(model.encode_prompt([{"role": "user", "content": "Hi"}]),
                                                        SamplingParams(max_tokens=4, temperature=0))]
    assert runner.torch_threads() == 1 and set(seen) == {1} and torch.get_num_threads() == before
    layer = int4.transformer.layers[0].self_attn
    original = layer.q_proj
    layer.q_proj = zero_lora(original)
    int4.refresh_backend()
    try:
        assert runner.torch_threads() == 1  # a brick is a side term of the fused backend
    finally:
        layer.q_proj = original
        int4.refresh_backend()
    assert LocalRunner(model).torch_threads() is None


def test_native_kernel_paths_agree_with_each_other_and_fp32(model, model_path, eval_ids):
    """The kernel's two paths over the file's blocks (rows in groups of 16 with AVX-512 VNNI; a row at a time with
    AVX2) compute the same integer dot products and round their float sums in another order. One layer, and the
    head on the same input, agree to float rounding (and a rare flipped int8 rounding); through 30 layers the int8
    rounding of activations amplifies that (as it does fp32's differences), so each path is held to fp32 as the
    existing decode test holds the kernel: next tokens and perplexity."""
    lean = load_model(model_path)  # every position through the kernel
    decoder, n = lean.backend.decoder, lean.config.n_layers
    if not decoder.set_groups(True):
        pytest.skip("this CPU has no AVX-512 VNNI: the kernel has only its row path here")
    ids = eval_ids["prose"][:64]
    x = decoder.embed(ids)
    fp32 = model.logits(ids)
    nxt = torch.tensor(ids[1:])
    hidden = model.transformer.forward_span(torch.from_numpy(x)[None], 0, n, [model.new_cache()])[0].numpy()
    out = {}
    try:
        for groups in (True, False):
            assert decoder.set_groups(groups) == groups
            layer0 = decoder.chunk(x, [lean.new_cache()[0]], 0, 1)
            head = decoder.chunk(hidden, [], n, n, head=len(ids))  # the same input for both paths
            out[groups] = layer0, head, lean.logits(ids)
    finally:
        decoder.set_groups(True)
    for a, b in zip(out[True][:2], out[False][:2]):  # a wrong row or block would be off by the values' scale
        diff, scale = np.abs(a - b), np.abs(b).max()
        # the rare element whose int8 rounding (of the attention or FFN activation) flips moves a little more
        assert np.quantile(diff, 0.99) <= 1e-4 * scale and diff.max() <= 1e-3 * scale, (diff.max(), scale)
    ref_nll = float(-torch.log_softmax(torch.from_numpy(fp32[:-1]), -1).gather(1, nxt[:, None]).mean())
    for groups, (_, _, logits) in out.items():
        assert np.mean(logits.argmax(-1) == fp32.argmax(-1)) >= 0.9, groups
        nll = float(-torch.log_softmax(torch.from_numpy(logits[:-1]), -1).gather(1, nxt[:, None]).mean())
        assert abs(nll - ref_nll) < 0.03, (groups, nll, ref_nll)
