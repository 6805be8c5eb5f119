"""Sparse FFN and offload: pack refusal, exact offload, predictor quality, a hard memory cap."""

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import cfm_runtime
from cfm_runtime import SparseOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.gguf_file import read_gguf
from cfm_runtime.kernels import native
from cfm_runtime.loading import dequantize
from cfm_runtime.runners import LocalRunner
from cfm_runtime.sparse import PackError, open_pack
from cfm_runtime.sparse.profile import mean_loss

PROMPT = [{"role": "user", "content": "Give two reasons to learn to cook."}]
CGROUP = Path("/sys/fs/cgroup/memory")


def load_sparse(model_path, **options):
    return load_model(model_path, **options)


def greedy(model, n=20) -> list[int]:
    return [c.token for c in model.stream(PROMPT, max_tokens=n, temperature=0) if c.token is not None]


def copy_pack(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst)
    return dst


# ---------------------------------------------------------------- the pack refuses what it must


def test_pack_refuses_another_model(pack_root):
    with pytest.raises(PackError, match="belongs to another model"):
        open_pack(pack_root, source_digest="0" * 32, verify=False)
    with pytest.raises(PackError, match="belongs to another model"):
        open_pack(pack_root, fingerprint="f" * 32, verify=False)


def test_pack_refuses_truncated_corrupt_and_incomplete(pack_root, tmp_path):
    bad = copy_pack(pack_root, tmp_path / "truncated")
    with open(bad / "neurons.bin", "r+b") as f:
        f.truncate(f.seek(0, 2) - 4096)
    with pytest.raises(PackError, match="truncated"):
        open_pack(bad)
    bad = copy_pack(pack_root, tmp_path / "corrupt")
    with open(bad / "neurons.bin", "r+b") as f:
        f.seek(12345)
        byte = f.read(1)
        f.seek(12345)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(PackError, match="checksum"):
        open_pack(bad)
    (bad / "manifest.json").unlink()
    with pytest.raises(PackError, match="not a neuron pack"):
        open_pack(bad)


def test_bad_options_are_user_errors(model_path, pack_root):
    with pytest.raises(CfmError, match="--density"):
        load_sparse(model_path, sparse=True, density=1.5, pack=pack_root)
    with pytest.raises(CfmError, match=r"does not hold this model's fixed parts \(staging .*; raise it$"):
        load_sparse(model_path, ram_budget_mb=4, pack=pack_root)
    with pytest.raises(CfmError, match=r"predictor .* raise it or drop --sparse"):
        load_sparse(model_path, ram_budget_mb=60, sparse=True, predictor="int4", pack=pack_root)
    with pytest.raises(CfmError, match=r"sparse FFN .* does not combine with a RAM budget on int4 weights"):
        load_sparse(model_path, weights="int4", sparse=True, ram_budget_mb=80, pack=pack_root)
    with pytest.raises(CfmError, match=r"low-rank predictor .* does not combine with int4 weights"):
        load_sparse(model_path, sparse=True, weights="int4", predictor="lowrank", pack=pack_root)
    m = load_sparse(model_path, weights="fp32", sparse=True, sparse_strategy="dense", pack=pack_root)
    with pytest.raises(CfmError, match="attached without a predictor"):
        m.sparse.configure(strategy="predictor", density=0.6)
    m.close()


def test_a_budget_too_small_for_the_int4_predictor_warns_and_uses_low_rank(model_path, pack_root):
    with pytest.warns(UserWarning, match=r"does not fit half of --ram-budget 60 MB; using the low-rank one"):
        m = load_sparse(model_path, ram_budget_mb=60, sparse=True, pack=pack_root)
    try:
        assert m.sparse.budget["predictor"].startswith("lowrank")
    finally:
        m.close()


# ---------------------------------------------------------------- the pack holds the file's weights


def test_pack_bundles_are_the_files_weights(pack_root, model_path, monkeypatch):
    """Bundles hold the file's own Q4_1 gate/up blocks and down codes (with its scales in a per-layer table): decoded,
    every layer's FFN equals the GGUF's dequantized tensors bit for bit, at 1,008 bytes a neuron (fp16: 3,456); the
    kernel's decoder and the numpy one give the same bits."""
    pack = open_pack(pack_root, verify=False)
    tensors = {t.name: t for t in read_gguf(model_path)[1]}
    assert pack.bundle_bytes == 1008 and pack.manifest["bundle"] == {"gate_up": "q4_1", "down": "q4_1_file",
                                                                     "bytes": 1008}
    for i in range(pack.n_layers):
        for got, name in zip(pack.weights(i), ("gate", "up", "down")):
            assert np.array_equal(got, dequantize(tensors[f"blk.{i}.ffn_{name}.weight"])), (i, name)
    codec, positions = pack.codec, np.arange(0, pack.manifest["model"]["d_ff"], 7)
    src, order = pack.bundles(3)[positions], pack.order(3)[positions]
    kernel = codec.decode(src, np.empty((len(src), 3, codec.d), np.float32), order, pack.shared(3))
    assert native.load() is not None  # the comparison below is kernel against numpy
    monkeypatch.setattr(native, "load", lambda notice=None: None)
    fallback = codec.decode(src, np.empty((len(src), 3, codec.d), np.float32), order, pack.shared(3))
    assert np.array_equal(kernel.view(np.uint32), fallback.view(np.uint32))


def test_a_pack_of_an_fp16_file_quantizes_to_q8_0(model_path, tmp_path):
    """A file whose FFN is not Q4_1 (a tiny fp16 llama): gate/up rows and down columns become Q8_0 blocks, within
    Q8_0's rounding of the file's weights, and offload still computes the bits of the same bundles in RAM."""
    from cfm_runtime.sparse.pack import source_digest
    from cfm_runtime.sparse.profile import build_pack
    from tiny_models import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf", model_path, "llama", dtype="F16")
    dense = load_model(path, weights="fp32")
    root = build_pack(dense, tmp_path / "pack", source_digest=source_digest(path), chat_answers=0, max_tokens=200,
                      sens_tokens=16, levels=(0.5,), progress=False)
    pack = open_pack(root)
    assert pack.manifest["bundle"] == {"gate_up": "q8_0", "down": "q8_0", "bytes": 3 * 2 * 34}
    for i, layer in enumerate(dense.transformer.layers):
        for got, lin in zip(pack.weights(i), (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)):
            want = lin.weight.detach().numpy()
            assert 0 < np.abs(got - want).max() <= np.abs(want).max() / 127  # Q8_0: half a step of the block's max
    off = load_model(path, weights="fp32", ram_budget_mb=0.15, pack=root)
    ram = load_model(path, weights="fp32", sparse=True, sparse_strategy="dense", pack=root)
    ids = list(range(100, 140))
    assert torch.equal(torch.from_numpy(off.logits(ids)), torch.from_numpy(ram.logits(ids)))
    assert 0 < off.sparse.budget["hot_neurons_pct"] < 100
    off.close()
    ram.close()


# ---------------------------------------------------------------- offload is exact at density 1.0


def test_offload_density_one_matches_ram_and_the_file(model_path, model, pack_root, eval_ids):
    """Offload at density 1.0 (cold neurons read from the pack each step) computes bit for bit what the same
    bundles held in RAM compute; both are the file's own weights, so they match the dense fp32 model up to the
    order of the down projection's sum (pack order)."""
    off = load_sparse(model_path, ram_budget_mb=40, pack=pack_root)
    ram = load_sparse(model_path, weights="fp32", sparse=True, sparse_strategy="dense", pack=pack_root)
    ids = eval_ids["chat"]
    got = torch.from_numpy(off.logits(ids))
    assert torch.equal(got, torch.from_numpy(ram.logits(ids)))
    assert (got - torch.from_numpy(model.logits(ids))).abs().max().item() < 1e-3
    ram.close()
    chunks = list(off.stream(PROMPT, max_tokens=12, temperature=0))
    assert [c.token for c in chunks if c.token is not None] == greedy(model, 12)
    report = chunks[-1].stats.extra["sparse"]
    assert report["ffn_weights_mb"] <= 40
    assert report["neurons_computed_pct"] == 100.0
    assert 0 < report["hot_neurons_pct"] < 100 and report["down_tables_mb"] > 0
    assert report["flash_mb_per_token"] > 0  # the cold neurons really came from the pack
    off.close()


def test_sparse_decode_from_flash_matches_ram(model_path, pack_root):
    """Predictor decode under a RAM budget (cold neurons from the pack) computes what the same selection
    computes over the same bundles in RAM, whether the misses go through the LRU cache or a layer is
    read whole; telemetry says which path ran."""
    ram = load_sparse(model_path, weights="fp32", sparse=True, density=0.6, predictor="int4", pack=pack_root)
    want = greedy(ram, 12)
    ram.close()
    for full_read_at in (2.0, 0.0):  # never read a layer whole / whenever anything misses
        # the int4 predictor (the pack's gate/up rows in the native kernel) takes 32 MB, the fixed parts 16 MB, the
        # neuron cache 12 MB: ~20 MB of hot neurons, 43% of the FFN's 46 MB
        options = SparseOptions(ram_budget_mb=80, sparse=True, pack=pack_root, predictor="int4", cache_fraction=0.15)
        off = load_model(model_path, cfm_runtime.LoadOptions(weights="fp32", sparse=options))
        for m in off.sparse.modules:
            m.store.full_read_at = full_read_at
        chunks = list(off.stream(PROMPT, max_tokens=12, temperature=0))
        off.close()
        report = chunks[-1].stats.extra["sparse"]
        assert [c.token for c in chunks if c.token is not None] == want, (full_read_at, report)
        assert report["predictor"] == "int4" and report["neurons_computed_pct"] < 100
        assert report["flash_mb_per_token"] > 0
        if full_read_at > 1:
            assert report["whole_layer_reads_per_token"] == 0 and report["cache_hit_rate"] > 0
        else:
            assert report["whole_layer_reads_per_token"] > 20


def test_the_predictor_sees_a_bricks_gate_and_up(model, model_path, pack_root):
    """With a brick on gate and up, the predictor adds the brick's low-rank terms to its estimates, so it selects
    what the true activations of the bricked layer select; the base weights' scores alone miss what it moved."""
    from cfm_runtime.bricks import Brick, apply_brick, base_info
    from cfm_runtime.bricks.lora import random_pairs

    pairs = random_pairs(model.transformer, (12,), kinds=("mlp.gate_proj", "mlp.up_proj"), std=0.1, scale=4.0)
    m = load_sparse(model_path, weights="fp32", sparse=True, predictor="int4", pack=pack_root)
    apply_brick(m, Brick("moved", pairs, base_info(model)))
    ffn = m.sparse.modules[12]
    x = torch.randn(64, model.config.d_model, generator=torch.Generator().manual_seed(0))
    w = ffn.store.full()
    g = F.linear(x, w[0]) + ffn.sides.rows("gate", x, None)
    u = F.linear(x, w[1]) + ffn.sides.rows("up", x, None)
    k = ffn.n // 2

    def overlap(scores) -> float:
        want, got = (ffn.act(g) * u).abs().topk(k).indices, scores.topk(k).indices
        return sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(want, got)) / want.numel()

    with_brick, base_only = overlap(ffn.scores(x)), overlap(ffn.predictor(x))
    print(f"top-half overlap with the bricked layer's true activations: {with_brick:.3f}, base scores {base_only:.3f}")
    m.close()
    assert with_brick >= 0.97, (with_brick, base_only)
    assert base_only < with_brick - 0.1, (with_brick, base_only)  # the brick really moved the selection


# ---------------------------------------------------------------- predictor quality on held-out text


def held_out(eval_ids) -> list[list[int]]:
    return [eval_ids[k] for k in ("prose", "code", "math", "science", "chat")]


def test_predictor_quality_close_to_oracle(model, model_path, pack_root, eval_ids):
    """The issue's target on held-out text: predictor within +5% perplexity at the density where oracle is within +3%.

    The density is the lower of 0.5 / 0.6 (uniform over layers) at which the oracle (true top-k) stays
    within +3% (on these texts the oracle is +3.7% at 0.5, so 0.6). The default predictor (int4 copy of
    gate and up) must then stay within +5%. The low-rank predictor does not meet the target; its bound
    is the measured value with margin (a regression guard, not the target).
    """
    texts = held_out(eval_ids)
    base = math.exp(mean_loss(model, texts))
    pack = open_pack(pack_root, verify=False)
    n = pack.n_layers
    measured = {}

    def sparse_model(predictor):
        m = load_model(model_path, weights="fp32")
        m.attach_sparse(pack, SparseOptions(sparse=True, predictor=predictor))
        return m

    def ppl_change(m, strategy):
        m.sparse.configure(strategy=strategy, densities=[d] * n, measure=True)
        return math.exp(mean_loss(m, texts)) / base - 1

    m = sparse_model("int4")
    for d in (0.5, 0.6):
        measured["oracle"] = ppl_change(m, "oracle")
        if measured["oracle"] <= 0.03:
            break
    measured["int4"] = ppl_change(m, "predictor")
    del m
    measured["lowrank"] = ppl_change(sparse_model("lowrank"), "predictor")
    print(f"held-out ppl {base:.2f}, density {d}: " + ", ".join(f"{k} +{100 * v:.1f}%" for k, v in measured.items()))
    assert measured["oracle"] <= 0.03, measured  # the oracle condition holds at the density tested
    assert measured["int4"] <= 0.05, measured  # the target
    assert measured["int4"] >= measured["oracle"] - 0.01, measured  # no predictor beats the true top-k by much
    assert measured["lowrank"] > measured["int4"], measured  # why low rank is not the default (docs/sparse.md)


# ---------------------------------------------------------------- the native kernel's sparse FFN (int4)


@pytest.mark.skipif(native.load() is None, reason=f"no native kernel here: {native.failure()}")
def test_native_sparse_ffn_is_the_exact_top_k_of_the_int4_model(model, model_path, pack_root, eval_ids):
    """--sparse on int4 weights runs in the native kernel, lean (no torch form): at every position each layer's down
    projection reads only the columns of its neurons of largest |activation|. Reference computed here: the fp32
    model of the same file with the exact top-k mask (oracle, every position) at the same densities.
    - At density 0.9 (few selection ties) the kernel is as close to it as dense int4 is to dense fp32: the
      arithmetic is right, the int8 activations' rounding is all that differs.
    - At 0.5 it is closer to it than to dense int4 (it really skips neurons, the right ones), and agrees with it on
      the next token at least as well as the reference agrees with the dense model (the int8 rounding moves
      which neurons sit at the boundary, and that compounds over 30 layers).
    - Single steps give the bits of a chunk; the torch form's backend (what bricks wrap) keeps the sparse FFN."""
    ids = eval_ids["prose"][:96]
    dense_int4, dense_fp32 = load_model(model_path).logits(ids), model.logits(ids)
    oracle = load_sparse(model_path, weights="fp32", sparse=True, sparse_strategy="oracle", density_plan="uniform",
                         pack=pack_root)

    def gap(a, b):
        return float(np.abs(a - b).mean())

    def agree(a, b):
        return float(np.mean(a.argmax(-1) == b.argmax(-1)))

    got, want = {}, {}
    for density in (0.9, 0.5):
        sparse = load_sparse(model_path, sparse=True, density=density, density_plan="uniform", pack=pack_root)
        oracle.sparse.configure(densities=[density] * 30, measure=True)  # the mask on every position, as the kernel
        got[density], want[density] = sparse.logits(ids), oracle.logits(ids)
    oracle.close()
    quant = gap(dense_int4, dense_fp32)
    print(f"mean |logit gap| vs the fp32 oracle: {gap(got[0.9], want[0.9]):.3f} at 0.9, {gap(got[0.5], want[0.5]):.3f} "
          f"at 0.5 (dense int4 vs fp32 {quant:.3f}; at 0.5 vs dense int4 {gap(got[0.5], dense_int4):.3f}); top-1 at "
          f"0.5 {agree(got[0.5], want[0.5]):.3f}, oracle vs dense {agree(want[0.5], dense_fp32):.3f}")
    assert gap(got[0.9], want[0.9]) <= 1.5 * quant
    assert gap(got[0.5], want[0.5]) < gap(got[0.5], dense_int4)
    assert agree(got[0.5], want[0.5]) >= agree(want[0.5], dense_fp32) - 0.03
    assert sparse.backend.name == "native" and not sparse.has_torch_form()
    assert sparse.backend.report()["sparse_ffn"] == {"density": 0.5, "layers_sparse": 30, "min_density": 0.5,
                                                     "max_density": 0.5, "down_columns_mb": 15.8}

    runner = LocalRunner(sparse)
    steps = [runner.forward(ids[:48])[-1]] + [runner.forward([t])[-1] for t in ids[48:64]]
    np.testing.assert_array_equal(np.stack(steps), got[0.5][47:64])
    sparse.transformer  # the torch form (what bricks wrap): its fused backend runs the same kernel, sparse
    assert sparse.backend.name == "fused" and "sparse_ffn" in sparse.backend.report()
    np.testing.assert_array_equal(sparse.logits(ids), got[0.5])


# ---------------------------------------------------------------- a hard memory cap


def _cgroup_v1_writable() -> bool:
    return (CGROUP / "memory.limit_in_bytes").is_file() and os.access(CGROUP, os.W_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _cgroup_v1_writable(),
                    reason=f"needs a writable cgroup v1 memory hierarchy at {CGROUP} (root, cgroup v1)")
def test_generate_under_memory_cgroup(model, pack_root):
    """`cfm generate --ram-budget 48` (the fp32 path: --pack) inside a memory cgroup capped far below the dense
    peak RSS."""
    want = model.tokenizer.decode(greedy(model, 16))
    cap_mb = 700  # dense in-RAM peak RSS is ~1,230 MB; this run measures ~650 MB
    group = CGROUP / f"cfm-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(cap_mb << 20))
        cmd = [sys.executable, "-m", "cfm_cli", "generate", "--ram-budget", "48", "--pack", str(pack_root),
               "--chat", "--prompt", PROMPT[0]["content"], "--temperature", "0", "--max-tokens", "16", "--json"]
        proc = subprocess.Popen(["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=os.environ | {"OMP_NUM_THREADS": "2"})
        out, err = proc.communicate(timeout=600)
        peak = int((group / "memory.max_usage_in_bytes").read_text()) / 2**20
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text()
    finally:
        group.rmdir()
    assert proc.returncode == 0 and not oom, err[-2000:]
    result = json.loads(out)
    print(f"cgroup cap {cap_mb} MB, cgroup peak {peak:.0f} MB, sparse report {result['sparse']}")
    assert result["sparse"]["rss_hwm_mb"] < cap_mb  # VmHWM: the whole run, loading included
    assert result["text"] == want
