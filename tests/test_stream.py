"""Weights within a RAM budget on the native int4 path (`cfm_runtime.kernels.stream`): whatever the budget holds,
the kernel computes the bits of the model read from its mapped file; too small a budget is refused with its parts;
a plain run under a memory cgroup spends what the cap leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from cfm_runtime import CfmError, load_model
from cfm_runtime.cache import SpanCache
from cfm_runtime.kernels import native, stream
from cfm_runtime.loading import block_weights, load_checkpoint
from cfm_runtime.native_backend import NativeBackend

pytestmark = pytest.mark.skipif(native.load() is None, reason=f"no native kernel here: {native.failure()}")
CGROUP = Path("/sys/fs/cgroup/memory")
PROMPT = "Why is the sky blue? Answer in one sentence."


@pytest.fixture(scope="module")
def blocks(model_path):
    ckpt = load_checkpoint(model_path, tensors="none")
    return ckpt, block_weights(ckpt)


def trace(decoder, config, ids, steps=8, split=None, center=None):
    """Logits of a prompt's positions and of `steps` greedy steps: whole, as two spans (`split`), or as an edge
    whose layers [2, 28) run on another decoder (`center`), as in a split run."""
    backend = NativeBackend(decoder, config.n_layers)
    cache = SpanCache(config, 0, config.n_layers)

    def edge(tokens):  # the prompt too: the edge never runs the center's layers
        h = backend.span(backend.embed(tokens), 0, 2, [cache])
        h = NativeBackend(center, config.n_layers).span(h, 2, 28, [cache])
        return backend.span_head(h, 28, cache, all_logits=True)

    out = [backend.forward(ids, cache, all_logits=True) if center is None else edge(ids)]
    for _ in range(steps):
        token = int(out[-1][-1].argmax())
        if center is not None:
            out.append(edge([token]))
        elif split is None:
            out.append(backend.forward([token], cache))
        else:
            h = backend.span(backend.embed([token]), 0, split, [cache])
            out.append(backend.span_head(h, split, cache))
    return np.concatenate(out)


def test_every_budget_computes_the_mapped_models_bits(blocks):
    ckpt, w = blocks
    lib = native.load()
    ids = list(range(300, 340))
    mapped = native.NativeDecoder(w, 2, lib)
    want, want_split = trace(mapped, ckpt.config, ids), trace(mapped, ckpt.config, ids, split=11)
    want_edge = trace(mapped, ckpt.config, ids, center=mapped)
    everything = stream.weight_bytes(w) / 2**20
    seen = set()
    runs = [(everything + 1, True), (60.0, True), (20.0, True), (20.0, False), (9.0, True)]
    for budget, direct in runs:  # all held; head and 10 layers; 5 layers (also buffered reads); only slots
        held = stream.hold(w, budget, direct=direct)
        p = held.plan
        seen.add((p.head_held, p.held_layers))
        decoder = native.NativeDecoder(w, 2, lib, held)
        assert np.array_equal(trace(decoder, ckpt.config, ids), want), budget
        assert np.array_equal(trace(decoder, ckpt.config, ids, split=11), want_split), budget
        # an edge reads only its own streamed layers: the read-ahead learns that order (the file's would read
        # the center's layers into the slots first)
        assert np.array_equal(trace(decoder, ckpt.config, ids, center=mapped), want_edge), budget
        report = held.report()
        assert report["held_layers"] == p.held_layers and (report["direct_io"] or not direct)
        held_mb = sum(report["held_mb"].values())
        assert held_mb <= budget + 0.1, report  # the budget bounds what is held
        if p.streamed:
            assert report["read_mb"] > 0 and report["reads"] > 0
    assert (True, 30) in seen and (False, 0) in seen and any(h and 0 < n < 30 for h, n in seen)


def test_an_edge_holds_its_own_layers(blocks):
    """Layers are held from their first use: with room for four, a split run's edge holds the four it runs (0, 1,
    28, 29), never the center's, and after its first pass reads nothing more from the file."""
    ckpt, w = blocks
    lib = native.load()
    ids = list(range(300, 340))
    mapped = native.NativeDecoder(w, 2, lib)
    want = trace(mapped, ckpt.config, ids, center=mapped)
    full = stream.plan(w, 60.0)  # head and some layers
    layer = full.parts["layers"] // full.held_layers
    budget = (full.parts["tables"] + full.parts["staging"] + full.parts["head"] + 4 * layer) / 2**20 + 0.01
    held = stream.hold(w, budget)
    assert held.plan.head_held and held.plan.held_layers == 4 and held.report()["held_layers"] == 0
    decoder = native.NativeDecoder(w, 2, lib, held)
    assert np.array_equal(trace(decoder, ckpt.config, ids, center=mapped), want)
    assert held.pinned == {0, 1, 28, 29}
    read = held.stream.bytes_read
    assert np.array_equal(trace(decoder, ckpt.config, ids, center=mapped), want)
    assert held.stream.bytes_read == read  # nothing streamed: the edge's layers and the head are held
    report = held.report()
    assert report["held_layers"] == 4 and report["held_mb"]["layers"] == round(4 * layer / 2**20, 1)
    # the center gone, the edge runs everything: no room left, the rest is streamed, same bits
    assert np.array_equal(trace(decoder, ckpt.config, ids), trace(mapped, ckpt.config, ids))
    assert held.pinned == {0, 1, 28, 29} and held.stream.bytes_read > read


def test_side_terms_on_streamed_layers(blocks):
    """Bricks reach the kernel as side terms; re-pointing a streamed layer at its slot keeps them."""
    ckpt, w = blocks
    lib = native.load()
    rng = np.random.default_rng(0)
    sides = {(25, "down"): (rng.normal(0, 0.05, (4, w.d_ff)), rng.normal(0, 0.05, (w.d_model, 4))),
             (2, "q"): (rng.normal(0, 0.05, (4, w.d_model)), rng.normal(0, 0.05, (w.d_model, 4)))}
    ids = list(range(500, 520))
    mapped = native.NativeDecoder(w, 2, lib)
    plain = trace(mapped, ckpt.config, ids, steps=3)
    mapped.set_sides(sides)
    want = trace(mapped, ckpt.config, ids, steps=3)
    assert not np.array_equal(want, plain)  # the side terms change the answer
    decoder = native.NativeDecoder(w, 2, lib, stream.hold(w, 20.0))
    decoder.set_sides(sides)
    assert np.array_equal(trace(decoder, ckpt.config, ids, steps=3), want)


def test_budget_options_and_refusals(model_path):
    with pytest.raises(CfmError, match=r"--ram-budget 5 MB does not hold this model's fixed parts \(norms and "
                                       r"rotary tables .* staging slots .*; give at least \d+ MB"):
        load_model(model_path, ram_budget_mb=5)
    with pytest.raises(CfmError, match="--ram-budget auto does not combine with fp32 weights"):
        load_model(model_path, ram_budget_mb="auto", weights="fp32")
    with pytest.raises(CfmError, match="a RAM budget .--ram-budget. does not combine with int8 weights"):
        load_model(model_path, ram_budget_mb=40, weights="int8")
    with pytest.raises(CfmError, match="must be a positive number of MB or 'auto', got 'lots'"):
        load_model(model_path, ram_budget_mb="lots")
    bad = subprocess.run([sys.executable, "-m", "cfm_cli", "generate", "--ram-budget", "lots", "--prompt", "x"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "give a number of MB or 'auto', not 'lots'" in bad.stderr


def test_cli_budget_answers_as_the_plain_run(model_path):
    def run(*extra):
        out = subprocess.run([sys.executable, "-m", "cfm_cli", "generate", "--model", str(model_path), "--chat",
                              "--prompt", PROMPT, "--temperature", "0", "--max-tokens", "16", "--json", *extra],
                             capture_output=True, text=True, check=True)
        return json.loads(out.stdout)

    plain, budget = run(), run("--ram-budget", "24")
    assert budget["text"] == plain["text"]
    r = budget["ram_budget"]
    assert r["ram_budget_mb"] == 24 and not r["head_held"] and r["streamed_mb_per_pass"] > 50
    assert "ram_budget" not in plain  # nothing limits this machine's test process


def _cgroup_v1_writable() -> bool:
    return (CGROUP / "memory.limit_in_bytes").is_file() and os.access(CGROUP, os.W_OK)


@pytest.mark.skipif(not _cgroup_v1_writable(),
                    reason=f"needs a writable cgroup v1 memory hierarchy at {CGROUP} (root, cgroup v1)")
def test_plain_run_under_a_cap_streams_and_answers_the_same(model_path):
    """A plain `cfm generate` in a 110 MB cgroup (the model's weights alone take 94 MB): it reads the limit,
    streams what does not fit, is not OOM-killed, and answers what it answers without a cap."""
    cmd = [sys.executable, "-m", "cfm_cli", "generate", "--model", str(model_path), "--chat", "--prompt", PROMPT,
           "--temperature", "0", "--max-tokens", "16", "--json"]
    plain = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    group = CGROUP / f"cfm-test-{uuid.uuid4().hex[:8]}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(110 << 20))
        proc = subprocess.run(["/bin/sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *cmd],
                              capture_output=True, text=True, timeout=300)
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text()
    finally:
        group.rmdir()
    assert proc.returncode == 0 and not oom, proc.stderr[-2000:]
    assert "do not fit the memory limit (cgroup v1 memory limit 110 MB" in proc.stderr
    capped = json.loads(proc.stdout)
    assert capped["text"] == plain["text"]
    assert 0 < capped["ram_budget"]["ram_budget_mb"] < 110 and capped["ram_budget"]["read_mb"] > 0


def test_cgroup_limits_are_read_from_v1_and_v2_trees(tmp_path):
    """The limit and the unreclaimable use, from a cgroup v1 memory hierarchy and from a cgroup v2 tree (the
    lowest memory.max on the way up), with the membership path as a container sees it."""
    from cfm_runtime.memory import cgroup_memory

    v1 = tmp_path / "v1"
    (v1 / "memory" / "job").mkdir(parents=True)
    (v1 / "memory" / "job" / "memory.stat").write_text(
        f"cache 500\nrss 1\nhierarchical_memory_limit {120 << 20}\ntotal_cache {90 << 20}\n"
        f"total_rss {30 << 20}\ntotal_shmem {2 << 20}\n")
    member = tmp_path / "cgroup"
    member.write_text("9:name=systemd:/\n4:memory:/host/slice/job\n0::/\n")  # a prefix this namespace lacks
    assert cgroup_memory(member, v1) == (120.0, 32.0, "cgroup v1 memory limit")
    (v1 / "memory" / "job" / "memory.stat").write_text(f"hierarchical_memory_limit {2**63 - 4096}\n")
    assert cgroup_memory(member, v1) is None  # no limit

    v2 = tmp_path / "v2"
    (v2 / "user" / "app").mkdir(parents=True)
    (v2 / "user" / "memory.max").write_text(f"{200 << 20}\n")
    (v2 / "user" / "app" / "memory.max").write_text("max\n")
    (v2 / "user" / "app" / "memory.stat").write_text(f"anon {40 << 20}\nfile {70 << 20}\nshmem {1 << 20}\n")
    member.write_text("0::/user/app\n")
    assert cgroup_memory(member, v2) == (200.0, 41.0, "cgroup v2 memory.max")
    (v2 / "user" / "memory.max").write_text("max\n")
    assert cgroup_memory(member, v2) is None
