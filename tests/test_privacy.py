"""What a center can recover from a split run's hidden states (cfm_bench.privacy, docs/privacy.md), on the real
model: the exact-search attack at split 2:28 without a defence and with the chosen one; the planner's floor."""

import pytest

from cfm_bench import privacy
from cfm_runtime import CenterOptions
from cfm_runtime.bricks import attached
from cfm_runtime.errors import CfmError
from cfm_runtime.split.planner import PRIVACY, Measurements, choose, privacy_note

MESSAGE = "My dog Biscuit and I live at 14 Harbour Lane in Quillbury."
SPLIT = (2, 28)
# The chosen defence at 2:28: the best measured within +3% perplexity there (docs/privacy.md), and the share of
# prompt tokens its exact search recovered in the benchmark (benchmarks/results/privacy.json, 765 positions).
CHOSEN = privacy.Defence("random brick 0.2", brick="random", brick_scale=0.2)
CHOSEN_MEASURED = 1.0
TOLERANCE = 0.15  # one short text: ~15 positions


@pytest.fixture(scope="module")
def inverter(model):
    """The center's learned inverter at layer 2, trained on a little public text: it proposes the candidates."""
    states, targets = privacy.public_states(model, privacy.public_corpus(model, tokens=3000), (SPLIT[0],))
    return privacy.train_inverter(model, states[SPLIT[0]], targets)


def attack(model, inverter, defence: privacy.Defence, pairs=None):
    sample = privacy.chat_sample(model, "personal", MESSAGE)
    sent = privacy.Edge(model, SPLIT, defence, pairs).trace(sample.ids).sent
    pos = list(range(*sample.content))
    return sample, sent, privacy.exact_search(model, sample.ids, sent, SPLIT[0], pos, inverter.top(sent[pos], 64))


def test_exact_search_recovers_the_prompt_and_the_chosen_defence_stays_at_its_measured_rate(model, inverter):
    sample, sent, r = attack(model, inverter, privacy.Defence())
    n = len(r.positions)
    assert n >= 12  # the user's message only: the chat template is public
    # undefended: the true token's state is the sent state at every position (certified: nothing else is nearer)
    assert sum(e and t for e, t in zip(r.exact, r.true_nearest)) / n >= 0.95
    assert sum(g == sample.ids[p] for g, p in zip(r.guess, r.positions)) / n >= 0.9, model.tokenizer.decode(r.guess)

    pairs = privacy.random_brick(model.transformer, privacy.edge_layers(SPLIT, 30, CHOSEN), CHOSEN.brick_rank,
                                 CHOSEN.brick_scale, CHOSEN.seed)
    _, _, d = attack(model, inverter, CHOSEN, pairs)
    assert not any(d.exact)  # the brick moved the sent states: no certified match left
    recovered = sum(d.true_nearest) / n  # upper bound on a search over the whole vocabulary
    assert recovered <= CHOSEN_MEASURED + TOLERANCE
    # docs/privacy.md says this defence does not keep the prompt from the center; if this fails, measure again
    assert recovered >= CHOSEN_MEASURED - TOLERANCE
    assert not attached(model.transformer)  # the brick came off: the session's model is unchanged


@pytest.mark.slow
def test_a_search_over_the_whole_vocabulary_finds_the_token(model, inverter):
    """The bound's premise: 49,152 candidates in batched chunks, the nearest is the true token (~30 s)."""
    sample, sent, r = attack(model, inverter, privacy.Defence())
    p = r.positions[len(r.positions) // 2]
    assert privacy.full_search(model, sample.ids, sent, SPLIT[0], p) == sample.ids[p]


def test_the_planner_keeps_the_privacy_floor_and_says_what_the_center_could_recover():
    m = Measurements(rtt_ms=1.0, up_mbps=10.0, down_mbps=10.0, local_layer_ms=2.0, local_head_ms=5.0,
                     center_layer_ms=0.2, span=(2, 28), n_layers=30, bytes_per_position=2304)
    assert choose(m).split == (2, 28)
    floored = choose(m, min_edge_layers=8)
    assert floored.split == (8, 28) and "at least 8 edge layers" in floored.describe()
    assert choose(m, min_edge_layers=28).split is None  # nothing left inside the center's span: local-only
    text = floored.describe()
    assert f"{PRIVACY[8]['prompt_exact_search']:.0%} of the prompt" in text and "run local-only" in text
    assert floored.to_dict()["privacy"] == privacy_note((8, 28))
    assert "no hidden state leaves" in privacy_note(None)
    with pytest.raises(CfmError, match="min-edge-layers"):
        choose(m, min_edge_layers=0)
    with pytest.raises(CfmError, match="under the privacy floor"):
        CenterOptions("h:1", (2, 28), min_edge_layers=4).check()
    CenterOptions("h:1", "auto", min_edge_layers=4).check()
