"""What a center can recover from a split run's hidden states (cfm_bench.privacy, docs/privacy.md), on the real
model: the exact-search attack at split 2:28 without a defence and with the chosen one; the planner's floor and
the measured table it quotes."""

import itertools
import json
from pathlib import Path

import pytest

from cfm_bench import privacy
from cfm_runtime import CenterOptions
from cfm_runtime.bricks import attached
from cfm_runtime.errors import CfmError
from cfm_runtime.split.planner import Measurements, choose, privacy_note, privacy_table

MESSAGE = "My dog Biscuit and I live at 14 Harbour Lane in Quillbury."
SPLIT = (2, 28)
RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "privacy.json"
TOLERANCE = 0.15  # one short text (~15 positions) against a rate measured on ~180


def chosen_defence() -> tuple[privacy.Defence, float]:
    """The defence the docs choose at 2:28: the most private measured one within +3% perplexity that needs no
    training (a trained brick takes minutes), and the share of prompt tokens its exact search recovered in the
    benchmark (benchmarks/results/privacy.json)."""
    rows = json.loads(RESULTS.read_text())["rows"]
    budget = privacy.TARGET["perplexity_change"]
    ok = [r for r in rows if r["split"] == list(SPLIT) and r["defence"]["brick"] != "trained"
          and r["defence"]["name"] != "none" and r["utility"]["perplexity_change"] <= budget]
    best = min(ok, key=privacy.rank)
    return privacy.Defence(**best["defence"]), best["prompt"]["exact_search"]


@pytest.fixture(scope="module")
def inverter(model):
    """The center's learned inverter at layer 2, trained on a little public text: it proposes the candidates."""
    states, targets = privacy.public_states(model, privacy.public_corpus(model, tokens=2000), (SPLIT[0],))
    return privacy.train_inverter(model, states[SPLIT[0]], targets)


def attack(model, inverter, defence: privacy.Defence, pairs=None):
    sample = privacy.chat_sample(model, "personal", MESSAGE)
    sent = privacy.Edge(model, SPLIT, defence, pairs).trace(sample.ids).sent
    pos = list(range(*sample.content))
    return sample, privacy.exact_search(model, sample.ids, sent, SPLIT[0], pos, inverter.top(sent[pos], 32))


def test_exact_search_recovers_the_prompt_and_the_chosen_defence_stays_under_its_measured_bound(model, inverter):
    sample, r = attack(model, inverter, privacy.Defence())
    n = len(r.positions)
    assert n >= 12  # the user's message only: the chat template is public
    # undefended: the true token's state is the sent state at every position (certified: nothing else is nearer)
    undefended = sum(e and t for e, t in zip(r.exact, r.true_nearest)) / n
    assert undefended >= 0.95
    # the attack itself, restricted to the top 32 of an inverter trained on 2,000 public tokens (the benchmark's,
    # on 8,000 tokens: 98.8% at this split)
    assert sum(g == sample.ids[p] for g, p in zip(r.guess, r.positions)) / n >= 0.85, model.tokenizer.decode(r.guess)

    defence, measured = chosen_defence()
    pairs = (privacy.random_brick(model.transformer, privacy.edge_layers(SPLIT, model.config.n_layers, defence),
                                  defence.brick_rank, defence.brick_scale, defence.seed) if defence.brick else None)
    _, d = attack(model, inverter, defence, pairs)
    assert not any(d.exact)  # the defence moved the sent states: no certified match left
    recovered = sum(d.true_nearest) / n  # upper bound on a search over the whole vocabulary
    assert recovered <= min(undefended, measured + TOLERANCE), (defence.name, recovered, measured)
    assert not attached(model.transformer)  # the brick came off: the session's model is unchanged


@pytest.mark.slow
def test_a_search_over_the_whole_vocabulary_finds_the_token(model, inverter):
    """The bound's premise: 49,152 candidates in batched chunks, the nearest is the true token (~30 s)."""
    sample = privacy.chat_sample(model, "personal", MESSAGE)
    sent = privacy.Edge(model, SPLIT).trace(sample.ids).sent
    p = (sample.content[0] + sample.content[1]) // 2
    assert privacy.full_search(model, sample.ids, sent, SPLIT[0], p) == sample.ids[p]


def test_the_planner_never_goes_under_the_privacy_floor():
    for rtt, center_ms, floor in itertools.product((0.1, 5.0, 80.0), (0.01, 0.2, 3.0), (1, 2, 4, 8, 16, 28, 29)):
        m = Measurements(rtt_ms=rtt, up_mbps=10.0, down_mbps=10.0, local_layer_ms=2.0, local_head_ms=5.0,
                         center_layer_ms=center_ms, span=(1, 29), n_layers=30, bytes_per_position=2304)
        p = choose(m, min_edge_layers=floor)
        assert p.split is None or p.split[0] >= floor, (rtt, center_ms, floor, p.split)
    m = Measurements(rtt_ms=1.0, up_mbps=10.0, down_mbps=10.0, local_layer_ms=2.0, local_head_ms=5.0,
                     center_layer_ms=0.2, span=(2, 28), n_layers=30, bytes_per_position=2304)
    assert choose(m).split == (2, 28)
    assert choose(m, min_edge_layers=8).split == (8, 28)
    assert choose(m, min_edge_layers=28).split is None  # nothing left inside the center's span: local-only
    with pytest.raises(CfmError, match="min-edge-layers"):
        choose(m, min_edge_layers=0)


def test_options_refuse_a_split_under_the_floor():
    with pytest.raises(CfmError, match=r"split \(--split\) 2:28 .* under the privacy floor \(--min-edge-layers\) 4"):
        CenterOptions("h:1", (2, 28), min_edge_layers=4).check()
    with pytest.raises(CfmError, match="must be an integer >= 1"):
        CenterOptions("h:1", "auto", min_edge_layers=0).check()
    CenterOptions("h:1", (4, 26), min_edge_layers=4).check()
    CenterOptions("h:1", "auto", min_edge_layers=4).check()


def test_the_plan_quotes_the_measured_table_and_survives_a_missing_entry():
    table = privacy_table()
    rows = table["by_edge_layers"]
    assert {"1", "2", "4", "8"} <= set(rows)  # the package data the benchmark wrote
    m = Measurements(rtt_ms=1.0, up_mbps=10.0, down_mbps=10.0, local_layer_ms=2.0, local_head_ms=5.0,
                     center_layer_ms=0.2, span=(2, 28), n_layers=30, bytes_per_position=2304)
    floored = choose(m, min_edge_layers=8)
    text = floored.describe()
    assert "at least 8 edge layers" in text
    assert f"about {rows['8']['prompt_exact_search']:.0%} of the prompt's tokens" in text
    assert floored.to_dict()["privacy"] == privacy_note((8, 28))
    assert "no hidden state leaves" in privacy_note(None)
    assert "measured with 4 edge layers" in privacy_note((6, 24))  # between measured splits: the fewer layers
    assert "no measurement for this split" in privacy_note((2, 28), {})
    partial = {"by_edge_layers": {"8": {"prompt_exact_search": 0.5}}}
    assert "no measurement" in privacy_note((2, 28), partial) and "?" in privacy_note((8, 22), partial)
