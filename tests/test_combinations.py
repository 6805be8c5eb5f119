"""Which features combine: every pair of {int4, bricks, split, sparse, offload} through the library's one
composition point (load_model + new_generator) either runs or is refused with one CfmError naming the pair.

The README's table is rendered from STATUS (`python tests/test_combinations.py` rewrites it; a test checks it).
"""

import itertools
import re
import sys
from pathlib import Path

import pytest
import torch

from cfm_runtime import CenterOptions, LoadOptions, RunOptions, SparseOptions, load_model
from cfm_runtime.bricks import Brick, BrickStore, base_info
from cfm_runtime.bricks.lora import TARGET_KINDS, LoraPair
from cfm_runtime.errors import CfmError

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("int4", "bricks", "split", "sparse", "offload")
FFN_REFUSAL = "bricks on FFN linears do not combine with it"
# pair -> (status, how it runs or why it is refused, for the README; for a refusal, words of the error)
STATUS = {
    ("int4", "bricks"): ("yes", "on the module path (one onnxruntime session per linear), not the fused kernels", ""),
    ("int4", "split"): ("yes", "the edge's spans on the module path, not the fused kernels", ""),
    ("int4", "sparse"): ("refused", "the sparse FFN runs on fp32 weights", "does not combine with int4 weights"),
    ("int4", "offload"): ("refused", "the sparse FFN runs on fp32 weights", "does not combine with int4 weights"),
    ("bricks", "split"): ("yes", "the layers bricks touch stay on the edge (a split over them is refused)", ""),
    ("bricks", "sparse"): ("refused", "a brick on an FFN linear needs the dense FFN (attention-only bricks run)",
                           FFN_REFUSAL),
    ("bricks", "offload"): ("refused", "a brick on an FFN linear needs the dense FFN (attention-only bricks run)",
                            FFN_REFUSAL),
    ("split", "sparse"): ("yes", "fp32 weights on the edge", ""),
    ("split", "offload"): ("yes", "fp32 weights on the edge", ""),
    ("sparse", "offload"): ("yes", "fp32 weights", ""),
}
PAIRS = list(itertools.combinations(FEATURES, 2))
PROMPT = [{"role": "user", "content": "Name a large animal."}]


def test_every_pair_has_a_status():
    assert sorted(STATUS) == sorted(PAIRS)


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """A brick store with one brick on all seven linears of the last two layers (they stay on the edge)."""
    g = torch.Generator().manual_seed(0)
    pairs = {}
    for i in (28, 29):
        for kind in TARGET_KINDS:
            lin = model.transformer.get_submodule(f"layers.{i}.{kind}")
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.randn(8, lin.in_features, generator=g) * 0.05,
                                                   torch.randn(lin.out_features, 8, generator=g) * 0.05, 2.0)
    s = BrickStore(tmp_path_factory.mktemp("bricks"))
    s.save(Brick("all7", pairs, base_info(model)))
    return s


@pytest.fixture(scope="module")
def center(model):
    from center.server import CenterServer

    s = CenterServer(model, span=(2, 28)).start()
    yield s
    s.stop()


def options(pair, pack_root, store, center) -> tuple[LoadOptions, RunOptions]:
    sparse = SparseOptions(sparse="sparse" in pair, ram_budget_mb=100 if "offload" in pair else None,
                           pack=pack_root if {"sparse", "offload"} & set(pair) else None)
    load = LoadOptions(weights="int4" if "int4" in pair else "fp32", sparse=sparse, progress=False)
    run = RunOptions(center=CenterOptions(center.address, (2, 28)) if "split" in pair else None,
                     bricks=(("all7", 1.0),) if "bricks" in pair else None, brick_store=store.root)
    return load, run


@pytest.mark.parametrize("pair", PAIRS, ids=["+".join(p) for p in PAIRS])
def test_pair_runs_or_is_refused_by_the_library(pair, model_path, pack_root, store, center):
    status, _, words = STATUS[pair]
    load, run = options(pair, pack_root, store, center)
    if status == "refused":
        with pytest.raises(CfmError, match=re.escape(words)):
            m = load_model(model_path, load)
            m.new_generator(run).close()
        return
    m = load_model(model_path, load)
    gen = m.new_generator(run)
    try:
        chunks = list(m.stream(PROMPT, generator=gen, max_tokens=4, temperature=0))
    finally:
        gen.close()
        m.close()
    stats = chunks[-1].stats
    assert stats.generated_tokens > 0
    if "split" in pair:
        assert stats.extra["split"]["positions_center"] > 0 and not stats.extra["split"]["fallbacks"]
    if {"sparse", "offload"} & set(pair):
        assert "sparse" in stats.extra


def render() -> str:
    """The README's table: one row and column per feature; footnotes say how a pair runs or why it is refused."""
    notes: list[str] = []
    head = "| | " + " | ".join(FEATURES) + " |\n|---|" + "---|" * len(FEATURES) + "\n"
    rows = []
    for a in FEATURES:
        cells = []
        for b in FEATURES:
            if a == b:
                cells.append("")
                continue
            status, how, _ = STATUS[(a, b) if (a, b) in STATUS else (b, a)]
            note = f"{status}: {how}"
            if note not in notes:
                notes.append(note)
            cells.append(f"{status} [{notes.index(note) + 1}]")
        rows.append(f"| **{a}** | " + " | ".join(cells) + " |")
    legend = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(notes))
    return head + "\n".join(rows) + "\n\n" + legend + "\n"


def readme_block() -> tuple[str, str, str]:
    text = (ROOT / "README.md").read_text()
    start, end = "<!-- combinations:begin -->\n", "<!-- combinations:end -->"
    a, b = text.index(start) + len(start), text.index(end)
    return text[:a], text[a:b], text[b:]


def test_readme_table_is_the_tested_one():
    assert readme_block()[1] == render(), "run `python tests/test_combinations.py` to rewrite the README's table"


if __name__ == "__main__":
    before, _, after = readme_block()
    (ROOT / "README.md").write_text(before + render() + after)
    print(render(), file=sys.stderr)
