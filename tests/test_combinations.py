"""Which features combine: combinations of {int4, bricks, split, sparse, offload} through the library's one
composition point (load_model + new_generator), each checked against a reference computed here, or refused with
one CfmError naming the pair.

Reference: the same features on fp32 weights, every layer local, the FFN dense (a brick stays on). Where the
arithmetic is exact (fp32 with bricks and/or a split, fp32 on the wire) the logits must match it; where it is
approximate (int4, a sparse or offloaded FFN) the top-1 agreement with it must be at least what the
approximation reaches alone against plain fp32, less two standard errors of that measurement. With a brick, the
configuration must also agree with the reference better than with the brick-less model (the brick is really
applied).

The README's table is rendered from `HOW` and `REFUSED` (`python tests/test_combinations.py` rewrites it).
"""

import itertools
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from cfm_runtime import CenterOptions, LoadOptions, RunOptions, SparseOptions, load_model
from cfm_runtime.bricks import Brick, BrickStore, apply_brick, base_info
from cfm_runtime.bricks.lora import random_pairs
from cfm_runtime.errors import CfmError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("int4", "bricks", "split", "sparse", "offload")
REFUSED = {frozenset({"int4", "sparse", "offload"}): "does not combine with a RAM budget on int4 weights",
           frozenset({"int4", "bricks", "offload"}): "does not combine with a RAM budget on the int4 path"}
HOW = {  # pair -> how it runs (or why it is refused), for the README
    ("int4", "bricks"): "fused int4 kernels; each brick an unfused low-rank side term (prompt graph and native step)",
    ("int4", "split"): "fused int4 kernels on the edge's spans and on the center's (batched native decode)",
    ("int4", "sparse"): "the native kernel's sparse FFN: per position the neurons of largest activation (exact, from "
                        "the layer's own int4 gate and up), their down columns only; with a RAM budget on top it is "
                        "refused (it holds the model in RAM)",
    ("int4", "offload"): "the native kernel holds the budget's share of the weights and reads the rest from the "
                         "model file at each use (the in-RAM int4 bits); bricks on top are refused (they need the "
                         "torch form)",
    ("bricks", "split"): "the layers bricks touch stay on the edge (a fixed split over them is refused)",
    ("bricks", "sparse"): "side terms on the neurons computed; the predictor adds the gate/up terms to its estimates",
    ("bricks", "offload"): "side terms on the neurons computed",
    ("split", "sparse"): "the edge's layers sparse, the center's dense",
    ("split", "offload"): "the edge's layers offloaded, the center's in RAM",
    ("sparse", "offload"): "predicted neurons read from the pack",
}
PAIRS = list(itertools.combinations(FEATURES, 2))
COMBOS = [set(p) for p in PAIRS] + [{"int4", "bricks", "split"}, {"bricks", "split", "sparse"},
                                    {"bricks", "split", "offload"}, {"bricks", "sparse", "offload"},
                                    {"int4", "split", "offload"}, {"int4", "bricks", "offload"},
                                    {"int4", "bricks", "sparse"}, {"int4", "split", "sparse"},
                                    {"int4", "sparse", "offload"}]
BRICK_LAYERS = (0, 1, 28, 29)  # edge layers of the split 2:28
PREFILL, STEPS = 24, 28


def refusal(features: set) -> str | None:
    return next((why for pair, why in REFUSED.items() if pair <= features), None)


def test_every_pair_is_described():
    assert sorted(HOW) == sorted(PAIRS)


@pytest.fixture(scope="module")
def store(model, tmp_path_factory):
    """A brick store with one brick on all seven linears of the layers the edge keeps in a 2:28 split."""
    s = BrickStore(tmp_path_factory.mktemp("bricks"))
    s.save(Brick("all7", random_pairs(model.transformer, BRICK_LAYERS), base_info(model)))
    return s


@pytest.fixture(scope="module")
def centers(model, model_path):
    """A center per weight format, serving 2:28 (the int4 one on a model of its own)."""
    from center.server import CenterServer

    servers = {"fp32": CenterServer(model, span=(2, 28)).start(),
               "int4": CenterServer(load_model(model_path, weights="int4"), span=(2, 28)).start()}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture(scope="module")
def window(eval_ids) -> list[int]:
    return eval_ids["chat"][:PREFILL + STEPS]


def predictions(model, run: RunOptions, ids: list[int]) -> tuple[np.ndarray, dict]:
    """Logits [STEPS + 1, vocab] of the window, teacher-forced: a prefill, then one token per step."""
    gen = model.new_generator(run)
    runner = gen.runner
    try:
        runner.begin()
        out = [runner.forward(ids[:PREFILL])[-1]]
        out += [runner.forward([t])[-1] for t in ids[PREFILL:PREFILL + STEPS - 1]]
        return np.stack(out), runner.report()
    finally:
        gen.close()


def options(features: set, pack_root, store, centers) -> tuple[LoadOptions, RunOptions]:
    # with a sparse FFN the budget holds the int4 predictor (32 MB; the low-rank one that a smaller budget gets
    # by default selects neurons too poorly, 40% top-1 here, for any brick to show through), a 12 MB neuron cache
    # and ~20 MB of hot neurons (43% of the FFN's bundles)
    # int4 offload is the native kernel's budget over the whole model (30 MB: the head and the last layers are
    # read from the file); fp32 offload keeps 30 MB of FFN weights in RAM (with its 16 MB of fixed parts: ~14 MB of
    # hot neurons, 30%) and reads the rest from the neuron pack
    streamed = {"int4", "offload"} <= features
    budget = (80 if "sparse" in features else 30) if "offload" in features else None
    sparse = SparseOptions(sparse="sparse" in features, ram_budget_mb=budget, cache_fraction=0.15,
                           predictor="int4" if "sparse" in features else None,
                           pack=pack_root if {"sparse", "offload"} & features and not streamed else None)
    load = LoadOptions(weights="int4" if "int4" in features else "fp32", sparse=sparse, progress=False)
    center = centers["int4" if "int4" in features else "fp32"]
    run = RunOptions(center=CenterOptions(center.address, (2, 28)) if "split" in features else None,
                     bricks=(("all7", 1.0),) if "bricks" in features else None, brick_store=store.root)
    return load, run


@pytest.fixture(scope="module")
def models(model_path):
    """One model per load configuration, shared by the combinations (a generator takes its bricks off when
    closed, so each combination finds the model as loaded)."""
    loaded: dict[str, object] = {}

    def get(load: LoadOptions):
        if repr(load) not in loaded:
            loaded[repr(load)] = load_model(model_path, load)
        return loaded[repr(load)]

    yield get
    for m in loaded.values():
        m.close()


@pytest.fixture(scope="module")
def references(model_path, store, window) -> dict[bool, np.ndarray]:
    """fp32, all local, dense: without and with the brick."""
    m = load_model(model_path, weights="fp32")
    out = {False: predictions(m, RunOptions(), window)[0]}
    apply_brick(m, store.load("all7"))
    out[True] = predictions(m, RunOptions(), window)[0]
    return out


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(a.argmax(-1) == b.argmax(-1)))


def test_the_brick_changes_the_reference(references):
    assert agreement(references[True], references[False]) < 0.9  # else the brick checks below prove nothing


_alone: dict = {}


def alone(features: set, models, pack_root, store, centers, window, references) -> float:
    """Top-1 agreement with plain fp32 of the approximation in `features` alone (int4, sparse, offload)."""
    key = frozenset(features & {"int4", "sparse", "offload"})
    if key not in _alone:
        load, run = options(set(key), pack_root, store, centers)
        _alone[key] = agreement(predictions(models(load), run, window)[0], references[False])
    return _alone[key]


@pytest.mark.parametrize("features", COMBOS, ids=["+".join(sorted(c, key=FEATURES.index)) for c in COMBOS])
def test_combination_runs_and_matches_its_reference_or_is_refused(features, model_path, models, pack_root, store,
                                                                  centers, window, references):
    load, run = options(features, pack_root, store, centers)
    why = refusal(features)
    if why is not None:
        with pytest.raises(CfmError, match=re.escape(why)):
            load_model(model_path, load).new_generator(run).close()
        return
    got, report = predictions(models(load), run, window)
    ref = references["bricks" in features]
    if features <= {"bricks", "split"}:  # fp32 everywhere, fp32 on the wire: the same arithmetic
        assert np.abs(got - ref).max() < 2e-3 and agreement(got, ref) == 1.0
    else:
        floor = alone(features, models, pack_root, store, centers, window, references)
        # two standard errors of an agreement measured over STEPS positions (0.19 at 0.6, 0.08 at 0.95): the
        # brick moves which neurons a sparse FFN selects, and with them single tokens
        margin = 2 * np.sqrt(floor * (1 - floor) / STEPS)
        assert agreement(got, ref) >= floor - margin, (agreement(got, ref), floor, margin)
    if "bricks" in features:
        assert agreement(got, ref) > agreement(got, references[False])
    if "split" in features:
        assert report["split"]["positions_center"] > 0 and not report["split"]["fallbacks"], report["split"]
    if "int4" in features:  # the native kernel: lean within a budget, under bricks the torch form's fused backend
        want = {"native"} if "offload" in features else {"fused"} if "bricks" in features else {"native", "fused"}
        assert report["decode_path"] == "native" and report["backend"] in want, report
    if {"int4", "offload"} <= features:
        assert report["ram_budget"]["read_mb"] > 0 and not report["ram_budget"]["head_held"], report
    elif {"int4", "sparse"} <= features:
        assert report["sparse_ffn"]["layers_sparse"] > 0 and report["sparse_ffn"]["density"] < 1, report
    elif {"sparse", "offload"} & features:
        assert "sparse" in report


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
            pair = (a, b) if (a, b) in HOW else (b, a)
            note = ("refused: " if refusal(set(pair)) else "yes: ") + HOW[pair]
            if note not in notes:
                notes.append(note)
            cells.append(f"{'refused' if refusal(set(pair)) else 'yes'} [{notes.index(note) + 1}]")
        rows.append(f"| **{a}** | " + " | ".join(cells) + " |")
    legend = "\n".join(f"{i + 1}. {n}" for i, n in enumerate(notes))
    def name(c):
        return "+".join(sorted(c, key=FEATURES.index))

    tested = ", ".join(name(c) for c in COMBOS if len(c) > 2 and not refusal(c))
    refused = "; ".join(f"{name(c)} is refused ({refusal(c)})" for c in COMBOS if len(c) > 2 and refusal(c)
                        and not any(len(p) == 2 and p <= c for p in REFUSED))
    return head + "\n".join(rows) + "\n\n" + legend + f"\n\nAlso tested together: {tested}; {refused}.\n"


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
