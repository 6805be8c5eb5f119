"""Sparse FFN and offload: pack refusal, exact offload, predictor quality, a hard memory cap."""

import json
import math
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from cfm_runtime import SparseOptions, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.sparse import PackError, open_pack
from cfm_runtime.sparse.profile import mean_loss

PROMPT = [{"role": "user", "content": "Give two reasons to learn to cook."}]
CGROUP = Path("/sys/fs/cgroup/memory")


def fp16_ffn_model(model_path):
    """A dense fp32 model of its own whose FFN weights are rounded to fp16 (the pack's format)."""
    m = load_model(model_path, weights="fp32")
    for layer in m.transformer.layers:
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin.weight.data = lin.weight.data.half().float()
    return m


@pytest.fixture(scope="module")
def fp16_reference(model_path):
    return fp16_ffn_model(model_path)


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
        load_sparse(model_path, ram_budget_mb=100, sparse=True, predictor="int4", pack=pack_root)


def test_a_budget_too_small_for_the_int4_predictor_warns_and_uses_low_rank(model_path, pack_root):
    with pytest.warns(UserWarning, match=r"does not fit half of --ram-budget 100 MB; using the low-rank one"):
        m = load_sparse(model_path, ram_budget_mb=100, sparse=True, pack=pack_root)
    try:
        assert m.sparse.budget["predictor"].startswith("lowrank")
    finally:
        m.close()


# ---------------------------------------------------------------- offload is exact at density 1.0


def test_offload_density_one_matches_dense_fp16(model_path, pack_root, fp16_reference, eval_ids):
    off = load_sparse(model_path, ram_budget_mb=48, pack=pack_root)
    ids = eval_ids["chat"]
    want_tokens, want_logits = greedy(fp16_reference), torch.from_numpy(fp16_reference.logits(ids))
    got_logits = torch.from_numpy(off.logits(ids))
    assert (got_logits - want_logits).abs().max().item() < 1e-2  # same weights, neurons summed in pack order
    chunks = list(off.stream(PROMPT, max_tokens=20, temperature=0))
    assert [c.token for c in chunks if c.token is not None] == want_tokens
    report = chunks[-1].stats.extra["sparse"]
    assert report["ffn_weights_mb"] <= 48
    assert report["neurons_computed_pct"] == 100.0
    assert report["flash_mb_per_token"] > 0  # the cold neurons really came from the pack
    off.close()


def test_sparse_decode_from_flash_matches_ram(model_path, pack_root, fp16_reference):
    """Predictor decode under a RAM budget (cold neurons from the pack) computes what the same selection
    computes over the same fp16 weights in RAM, whether the misses go through the LRU cache or a layer is
    read whole; telemetry says which path ran."""
    ram = fp16_ffn_model(model_path)
    ram.attach_sparse(open_pack(pack_root, verify=False), SparseOptions(sparse=True, density=0.6))
    want = greedy(ram, 24)
    del ram
    for full_read_at in (2.0, 0.0):  # never read a layer whole / whenever anything misses
        # 400 MB: the int4 predictor's sessions take ~220 MB of it (the default at small budgets is low rank)
        off = load_sparse(model_path, ram_budget_mb=400, sparse=True, pack=pack_root, predictor="int4")
        for m in off.sparse.modules:
            m.store.full_read_at = full_read_at
        chunks = list(off.stream(PROMPT, max_tokens=24, temperature=0))
        off.close()
        report = chunks[-1].stats.extra["sparse"]
        assert [c.token for c in chunks if c.token is not None] == want, (full_read_at, report)
        assert report["predictor"] == "int4" and report["neurons_computed_pct"] < 100
        assert report["flash_mb_per_token"] > 0
        if full_read_at > 1:
            assert report["whole_layer_reads_per_token"] == 0 and report["cache_hit_rate"] > 0
        else:
            assert report["whole_layer_reads_per_token"] > 20


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


# ---------------------------------------------------------------- a hard memory cap


def _cgroup_v1_writable() -> bool:
    return (CGROUP / "memory.limit_in_bytes").is_file() and os.access(CGROUP, os.W_OK)


@pytest.mark.slow
@pytest.mark.skipif(not _cgroup_v1_writable(),
                    reason=f"needs a writable cgroup v1 memory hierarchy at {CGROUP} (root, cgroup v1)")
def test_generate_under_memory_cgroup(model_path, pack_root, fp16_reference):
    """`cfm generate --ram-budget 48` inside a memory cgroup capped far below the dense peak RSS."""
    want = fp16_reference.tokenizer.decode(greedy(fp16_reference, 16))
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
