"""The emergent-brick analysis on a small subset of the labelled set (3 prompts per function)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score

from cfm_runtime.analysis import (FUNCTIONS, Analysis, AnalysisOptions, CollectOptions, MaskedMLP, load_prompts,
                                  masked)
from cfm_runtime.analysis.prefetch import probe_features, train_classifier
from cfm_runtime.analysis.prompts import stored_responses
from cfm_runtime.analysis.scores import average_precision_columns, partition_similarity, top_sets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def analysis(model, tmp_path_factory):
    opts = AnalysisOptions(per_function=3, responses="stored", mask_levels=(0.0, 0.3, 0.9), mask_texts=1,
                           perturb_texts=1, hot_fractions=(0.2,), progress=False,
                           collect=CollectOptions(max_len=64))
    an = Analysis(model, tmp_path_factory.mktemp("analysis"), opts)
    an.run("all")
    return an


def read(an, name: str) -> dict:
    return json.loads((an.out / f"{name}.json").read_text())


def test_prompt_set_is_large_varied_and_labelled():
    prompts = load_prompts()
    assert list(prompts) == list(FUNCTIONS)
    everything = [p.strip().lower() for ps in prompts.values() for p in ps]
    assert len(everything) == len(set(everything)), "duplicate prompts"
    for f, ps in prompts.items():
        assert len(ps) >= 40, f
    stored = stored_responses()
    for f, ps in prompts.items():
        answers = stored["responses"][f]
        assert len(answers) == len(ps) and all(a.strip() for a in answers), f


def test_every_analysis_writes_json_and_png(analysis):
    for name in ("sparsity", "functions", "partition", "perturb", "prefetch"):
        json.loads((analysis.out / f"{name}.json").read_text())
    pngs = sorted(p.name for p in analysis.out.glob("*.png"))
    assert pngs == ["functions_layers.png", "partition.png", "perturb.png", "prefetch.png",
                    "sparsity_cdf.png", "sparsity_masking.png"]
    for p in analysis.out.glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size < 200_000


def test_sparsity_cdf_and_masking_curves(analysis):
    c = analysis.collection
    n_layers, d_ff = analysis.model.config.n_layers, analysis.model.config.d_ff
    assert c.mean_act.shape == (21, n_layers, d_ff) and (c.mean_act >= 0).all()
    cdf = np.cumsum(c.cdf_hist, 1) / c.cdf_hist.sum(1, keepdims=True)
    assert (np.diff(cdf, axis=1) >= 0).all() and np.allclose(cdf[:, -1], 1.0)
    s = read(analysis, "sparsity")
    below = list(s["fraction_below_fraction_of_max"].values())
    assert below == sorted(below) and 0 < below[0] < 1
    for by in ("act", "output"):
        change = s["masking"][by]["loss_change"]
        assert change[0] == 0.0, "masking 0% must leave the model unchanged"
        assert change[-1] > max(change[1], 0.1), "masking 90% must hurt, and more than 30%"
    assert 0 < s["neurons_for_90pct_l1_mass_mean"] < 1


def test_functionality_scores_are_average_precisions(analysis):
    ap = analysis.ap
    assert ap.shape == (7, analysis.model.config.n_layers, analysis.model.config.d_ff)
    assert np.isfinite(ap).all() and ap.min() >= 0 and ap.max() <= 1
    f = read(analysis, "functions")
    assert f["max_abs_diff_vs_sklearn"] < 1e-6
    assert len(f["best_per_layer"]) == analysis.model.config.n_layers
    # with 2 positives among 14, some neuron separates each function perfectly; shuffled labels less so
    assert min(f["best_per_function"].values()) > max(f["random_top5_per_layer"])


def test_vectorised_ap_matches_sklearn_with_ties():
    rng = np.random.default_rng(1)
    y = np.array([1, 0, 0, 1, 0, 1, 0, 0, 0, 1])
    scores = np.round(rng.random((10, 40)) * 3)  # many tied scores
    ref = [average_precision_score(y, scores[:, j]) for j in range(40)]
    assert np.allclose(average_precision_columns(y, scores), ref, atol=1e-12)


def test_partition_and_perturbation_matrices(analysis):
    p = read(analysis, "partition")
    overlap = np.array(p["overlap"])
    assert overlap.shape == (7, 7) and np.allclose(np.diag(overlap), 1.0)
    assert ((overlap >= 0) & (overlap <= 1)).all() and np.allclose(overlap, overlap.T)
    m = np.array(read(analysis, "perturb")["increase_pct"])
    assert m.shape == (7, 7) and np.isfinite(m).all()
    assert analysis.top.sum(-1).min() == round(0.05 * analysis.model.config.d_ff)


def test_partition_similarity_of_random_sets_is_near_the_set_fraction():
    ap = np.random.default_rng(0).random((7, 30, 1536))
    sim = partition_similarity(top_sets(ap, 0.05))["overlap"]
    off = sim[~np.eye(7, dtype=bool)]
    assert abs(off.mean() - 0.05) < 0.01


def test_masked_mlp_keeps_or_drops_neurons(model):
    t = model.transformer
    x = torch.randn(1, 3, model.config.d_model)
    mlp = t.layers[5].mlp
    dense = mlp(x)
    assert torch.equal(MaskedMLP(mlp)(x), dense)
    keep = torch.ones(model.config.d_ff, dtype=torch.bool)
    keep[:100] = False
    manual = mlp.down_proj((mlp.act(mlp.gate_proj(x)) * mlp.up_proj(x)) * keep)
    assert torch.allclose(MaskedMLP(mlp, keep=keep)(x), manual)
    with masked(t, lambda i, m: MaskedMLP(m) if i == 5 else None):
        assert isinstance(t.layers[5].mlp, MaskedMLP) and not isinstance(t.layers[4].mlp, MaskedMLP)
    assert t.layers[5].mlp is mlp


def test_function_classifier_beats_chance_on_held_out_prompts(model):
    prompts = load_prompts()
    train, test = [], []
    for label, f in enumerate(FUNCTIONS):
        train += [(p, label) for p in prompts[f][:12]]
        test += [(p, label) for p in prompts[f][30:36]]
    x_train = probe_features(model, [p for p, _ in train], layer=3)
    x_test = probe_features(model, [p for p, _ in test], layer=3)
    clf = train_classifier(x_train, np.array([y for _, y in train]))
    accuracy = (clf.predict(x_test) == np.array([y for _, y in test])).mean()
    assert accuracy > 0.5, f"held-out accuracy {accuracy:.2f} (chance 0.14)"


def test_prefetch_report_is_sane(analysis):
    p = read(analysis, "prefetch")
    per_fn = p["sizes"]["0.2"]["per_function"]
    assert set(per_fn) == set(FUNCTIONS)
    for d in per_fn.values():
        for k in ("static", "function_top_ap", "function_freq", "function_freq_oracle"):
            assert 0 <= d[k] <= 1
        assert d["flash_mb_per_token_static"] > 0


def test_cli_rejects_bad_options(tmp_path, capsys):
    from cfm_cli.main import main

    assert main(["analyze", "sparsity", "--top", "2", "--out", str(tmp_path)]) == 2
    assert "--top" in capsys.readouterr().err
    assert not Path(tmp_path / "sparsity.json").exists()


# ---------------------------------------------------------------- prefetch on the real sparse runtime


@pytest.fixture(scope="module")
def flash_model(model_path, pack_root):
    """The embedded model under a 60 MB RAM budget (cache: 15 MB) over the session's pack, oracle selection."""
    from cfm_runtime import load_model
    from cfm_runtime.analysis.preload import use_oracle

    sparse = load_model(model_path, ram_budget_mb=60, sparse_strategy="predictor", density=0.6, pack=pack_root,
                        predictor="lowrank", density_plan="uniform", progress=False)
    use_oracle(sparse)
    yield sparse
    sparse.close()


def test_preload_reads_neurons_into_the_real_cache(flash_model):
    from cfm_runtime.analysis.preload import reset_caches
    from cfm_runtime.errors import CfmError

    reset_caches(flash_model)
    engine = flash_model.sparse
    store = engine.modules[7].store
    cap, n_hot, n = store.cache.capacity, store.n_hot, store.n
    assert 0 < cap < n - n_hot, "the test needs a cache smaller than the cold region"
    want = np.arange(n - 1, n_hot - 1, -3)[:cap]  # cold positions, every third one (not one run)
    before = engine.counters()
    nbytes = engine.preload(7, np.concatenate(([0], want, want[:5])))  # a hot one and repeats are skipped
    assert nbytes >= len(want) * store.file.bundle  # one bundle per neuron at least
    assert engine.counters()["prefill_bytes"] - before["prefill_bytes"] == nbytes, "not in the telemetry"
    slots = store.cache.slot_of[want - n_hot]
    assert (slots >= 0).all(), "preloaded neurons must be resident"
    full = store.full().clone()  # [3, n, D] fp32, read through the store
    rows = store.decoder((store.cache.rows[slots], want))
    assert torch.equal(rows, full[:, torch.from_numpy(want)]), "the cache holds the neurons' weights"
    assert engine.modules[6].store.cache.slot_of.max() < 0, "other layers untouched"
    with pytest.raises(CfmError, match="0..1535"):
        engine.preload(7, [n])


def test_function_preload_goes_through_the_cache_and_keeps_the_selection(flash_model):
    from cfm_runtime.analysis.collect import encode, template_prefix_len
    from cfm_runtime.analysis.preload import FunctionPrefetch, rankings, run_prompt, selection_counts

    from cfm_runtime.analysis.prompts import Instance

    prompts = load_prompts()["coding"]
    answer = stored_responses()["responses"]["coding"][0]
    prefix = template_prefix_len(flash_model)
    e = encode(flash_model, Instance("coding", prompts[0], answer), prefix, max_len=96)
    counts = selection_counts(flash_model, [e], np.array([0]))
    assert counts[0].sum() > 0 and counts[1:].sum() == 0
    pf = FunctionPrefetch(classifier=None, ranked=rankings(counts), probe_layer=3, prefix=prefix)
    ids = flash_model.encode_prompt([{"role": "user", "content": prompts[0]}])
    plain = run_prompt(flash_model, ids, None, None, max_tokens=8, cold=True)
    pre = run_prompt(flash_model, ids, pf, lambda h: 0, max_tokens=8, cold=True)
    assert pre["predicted"] == 0 and pre["preload_bytes"] > 0
    assert pre["hits"] + pre["misses"] == plain["hits"] + plain["misses"], "the same neurons are looked up"
    # Whether the preloaded neurons turn into more hits is the measurement, not a property: the LRU cache turns
    # over within a token, so the hit rate moves by at most ~0.1 point, either way by machine (+0.07 points on an
    # AMD EPYC, -0.01 on a Xeon whose fp32 arithmetic selects slightly other neurons; docs/analysis.md).
