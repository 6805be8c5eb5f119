"""Speculative decoding: drafts verified several per step give the output of plain decoding (greedy: token for
token on the int4 backend, locally and across a split; sampling: the same distribution), and stop strings,
max_tokens, end-of-generation tokens, streamed text and statistics behave as without speculation."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from cfm_runtime import CenterOptions, RunOptions, SamplingParams, load_model
from cfm_runtime.errors import CfmError
from cfm_runtime.generate import Generator
from cfm_runtime.kernels import native
from cfm_runtime.sampling import Sampler
from cfm_runtime.speculative import (Acceptance, Draft, Estimate, LookupDrafter, Policy, Speculation, best_k,
                                     expected_tokens)
from cfm_runtime.split.planner import Measurements, choose

PARAGRAPH = ("The first bicycles, called draisines, had no pedals: riders pushed them along with their feet. "
             "Pedals were added in the 1860s, and the safety bicycle, with two wheels of the same size and a chain "
             "drive, appeared in the 1880s. Pneumatic tyres, patented by John Dunlop in 1888, made riding much "
             "more comfortable.")
REWRITE = [{"role": "user", "content": "Fix the spelling mistakes in this paragraph and change nothing else:\n\n"
            + PARAGRAPH.replace("bicycles", "bicylces").replace("riders", "ridres").replace("comfortable", "confortable")}]
CHAT = [{"role": "user", "content": "Give me three tips for sleeping better."}]


@pytest.fixture(scope="module")
def int4(model_path):
    m = load_model(model_path)  # the default: int4 on the native backend (no torch), a chunk equals single steps
    assert m.backend.name == "native", native.failure()
    return m


GENERATORS = {}  # (model, mode) -> a generator: a repeated prompt is then computed once (cached == cold: exact)


def run(model, messages, speculate, generator=None, **sampling):
    gen = generator or GENERATORS.setdefault((id(model), speculate),
                                             model.new_generator(RunOptions(speculate=speculate)))
    chunks = list(model.stream(messages, generator=gen, **({"temperature": 0, "max_tokens": 32} | sampling)))
    return chunks, chunks[-1].stats


@pytest.fixture(scope="module")
def plain(int4):
    """Plain greedy answers (no speculation) of the int4 model: {name: (chunks, stats)}."""
    return {"rewrite": run(int4, REWRITE, "off"), "chat": run(int4, CHAT, "off")}


def tokens(chunks):
    return [c.token for c in chunks if c.token is not None]


# ---------------------------------------------------------------- drafting and choosing k


def test_lookup_drafts_what_followed_the_latest_match():
    d = LookupDrafter(max_n=3, min_n=1)
    history = [5, 6, 7, 8, 1, 2, 5, 6, 7, 9, 4, 5, 6, 7]
    d.begin(history[:4])
    draft = d.draft(history, 4)
    assert draft.tokens == [9, 4, 5, 6] and draft.source == "lookup:3:self"  # the latest "5 6 7", not the first
    # (a match in the answer's own text, not in its prompt: its own acceptance statistics, a lower prior)
    p = LookupDrafter(max_n=3, min_n=1)
    p.begin([5, 6, 7, 8])
    assert p.draft([5, 6, 7, 8, 1, 5, 6, 7], 4) == Draft([8, 1, 5, 6], "lookup:3")  # copied from the prompt
    assert d.draft(history + [3], 4) is None  # "7 3", "3": never seen before
    assert d.draft([1, 2, 1], 5).tokens == [2, 1]  # a draft may run into the present


def test_k_grows_with_acceptance_and_shrinks_with_cost():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75) and expected_tokens(1.0, 3) == 4
    assert best_k(0.2, 0.45, 16) == 0  # drafts that miss are not verified
    assert 2 <= best_k(0.85, 0.45, 16) <= 4 < best_k(0.85, 0.05, 16)
    policy = Policy(0.45)  # "auto": no draft where it does not pay, but a one-token probe now and then
    policy.acceptance["lookup:1"] = Acceptance(0.3, accepted=0.0, rejected=50.0)
    ks = [policy.choose("lookup:1", 8) for _ in range(32)]
    assert ks.count(1) == 2 and set(ks) == {0, 1}
    assert Policy(0.45).choose("new", 8) == 1  # an unknown kind of draft: acceptance 1/2 until measured
    assert Policy(0.45).choose("lookup:4", 8) > Policy(0.45).choose("lookup:1", 8)  # long matches: right more often


# ---------------------------------------------------------------- greedy identity on int4


def test_greedy_output_is_identical_and_steps_verify_several_tokens(int4, plain):
    for name, messages, mode in (("rewrite", REWRITE, "lookup"), ("chat", CHAT, "auto")):
        (ref, ref_stats), (spec, stats) = plain[name], run(int4, messages, mode)
        assert [(c.text, c.token) for c in spec] == [(c.text, c.token) for c in ref], name
        assert (stats.generated_tokens, stats.finish_reason) == (ref_stats.generated_tokens, ref_stats.finish_reason)
        assert stats.decode_tokens == ref_stats.decode_tokens == ref_stats.decode_steps
        r = stats.extra["speculative"]
        assert r["mode"] == mode and r["steps"] == stats.decode_steps and r["drafted"] >= r["accepted"] >= 0
        if name == "rewrite":  # the answer copies the paragraph: several tokens per step
            assert r["accepted"] > 10 and r["tokens_per_step"] > 1.5 and stats.decode_steps < stats.decode_tokens


def test_stop_strings_max_tokens_and_cache_reuse_as_without_speculation(int4, plain):
    ref, _ = plain["rewrite"]
    text = "".join(c.text for c in ref)
    stop = text[20:26]  # inside the copied paragraph, where a step accepts several tokens
    for sampling in ({"stop": [stop]}, {"max_tokens": 7}):
        b, sb = run(int4, REWRITE, "lookup", **sampling)
        got = "".join(c.text for c in b)
        if "stop" in sampling:
            assert got == text[:text.index(stop)] and sb.finish_reason == "stop"
        else:
            assert [(c.text, c.token) for c in b][:7] == [(c.text, c.token) for c in ref][:7]
            assert sb.generated_tokens == 7 and sb.finish_reason == "length" and sb.decode_tokens == 6
    gen = int4.new_generator(RunOptions(speculate="lookup"))
    first, _ = run(int4, REWRITE, None, generator=gen, stop=[stop])  # stopped mid-step: the cache holds more
    turn = REWRITE + [{"role": "assistant", "content": "".join(c.text for c in first)},
                      {"role": "user", "content": "Now in one sentence."}]
    warm, stats = run(int4, turn, None, generator=gen, max_tokens=12)
    assert stats.cached_tokens > 60 and tokens(warm) == tokens(run(int4, turn, "off", max_tokens=12)[0])


@pytest.fixture(scope="module")
def center(model_path):
    """A real center (int4, a model of its own) serving 2:28 on 127.0.0.1, port 0."""
    from center.server import CenterServer

    server = CenterServer(load_model(model_path), span=(2, 28)).start()
    yield server
    server.stop()


def test_split_verifies_on_the_center_and_edge_drafts(int4, center, plain):
    """fp32 on the wire is exact: the split's greedy answer is the local one, with either drafter."""
    local = tokens(plain["rewrite"][0])
    for mode in ("lookup", "edge"):
        gen = int4.new_generator(RunOptions(center=CenterOptions(center.address, (2, 28)), speculate=mode))
        try:
            chunks, stats = run(int4, REWRITE, None, generator=gen)
        finally:
            gen.close()
        assert tokens(chunks) == local, mode
        split = stats.extra["split"]
        assert split["positions_local"] == 0 and split["fallbacks"] == []
        r = stats.extra["speculative"]
        assert r["drafter"] == mode and r["drafted"] > 0 and r["tokens_per_step"] >= 1.0
        assert r["tokens_per_round_trip"] == r["tokens_per_step"]
        assert split["positions_center"] == stats.prompt_tokens + stats.decode_steps + r["drafted"]
        if mode == "lookup":
            assert r["tokens_per_step"] > 1.5  # several tokens per round trip


def test_split_with_a_brick_on_gives_the_local_answer(model, model_path, center, tmp_path):
    """A brick on layer 0 (the edge's): int4 with the brick as a side term, split and speculative, against the
    same brick locally without speculation."""
    from cfm_runtime.bricks import Brick, BrickStore, base_info
    from cfm_runtime.bricks.lora import LoraPair

    g = torch.Generator().manual_seed(0)
    pairs = {}
    for kind in ("self_attn.q_proj", "mlp.down_proj"):
        lin = model.transformer.get_submodule(f"layers.0.{kind}")
        pairs[f"layers.0.{kind}"] = LoraPair(torch.randn(4, lin.in_features, generator=g) * 0.05,
                                             torch.randn(lin.out_features, 4, generator=g) * 0.05, 2.0)
    store = BrickStore(tmp_path)
    store.save(Brick("b0", pairs, base_info(model)))
    m = load_model(model_path)
    answers = {}
    for name, run_options in (
            ("local", RunOptions(bricks=(("b0", 1.0),), brick_store=tmp_path, speculate="off")),
            ("split", RunOptions(center=CenterOptions(center.address, (2, 28)), bricks=(("b0", 1.0),),
                                 brick_store=tmp_path, speculate="lookup"))):
        gen = m.new_generator(run_options)
        try:
            chunks, stats = run(m, REWRITE, None, generator=gen, max_tokens=24)
        finally:
            gen.close()
        assert stats.extra["backend"] == "fused", stats.extra  # the fast path under the brick
        answers[name] = tokens(chunks)
    assert stats.extra["speculative"]["accepted"] > 0 and stats.extra["split"]["positions_local"] == 0
    assert answers["split"] == answers["local"]


# ---------------------------------------------------------------- sampling keeps the distribution


def test_verify_rule_samples_the_target_distribution_exactly():
    """Accept a drafted x with probability p(x), else sample p without x: the result is distributed as p."""
    logits = np.array([2.0, 1.5, 1.0, 0.7, 0.2, -1.0], np.float32)
    params = SamplingParams(temperature=0.9, top_k=5, top_p=0.97, repetition_penalty=1.3, seed=0)
    history = [1, 4]
    sampler = Sampler(params)
    idx, probs = sampler._candidates(sampler._penalised(logits, history))
    p = np.zeros(6)
    p[idx] = probs
    n = 12000
    for draft in (0, 3, 5):  # the most likely token, a likely one, one outside top-k
        counts = Counter(sampler.verify(logits, history, draft)[1] for _ in range(n))
        chi2 = sum((counts[t] - n * float(p[t])) ** 2 / (n * float(p[t])) for t in range(6) if p[t] > 0)
        assert chi2 < 20.5 and sum(counts[t] for t in range(6) if p[t] == 0) == 0, (draft, chi2, counts)


class MarkovRunner:
    """A real Runner over a bigram model of four tokens ('a'..'d', ids 81-84): a position's logits depend on its
    token only, so the exact distribution of a generated sequence is a product of the table's rows."""

    IDS = (81, 82, 83, 84)

    def __init__(self, table: np.ndarray):
        self.table, self.ids = table, []
        self.fed = 0

    @property
    def n_past(self) -> int:
        return len(self.ids)

    def forward(self, ids, all_logits=False):
        self.ids += ids
        self.fed += len(ids)
        rows = np.full((len(ids), 85), -np.inf, np.float32)
        for j, t in enumerate(ids):
            rows[j, list(self.IDS)] = self.table[self.IDS.index(t)]
        return rows if all_logits else rows[-1:]

    def truncate(self, n):
        self.ids = self.ids[:n]

    def begin(self):
        pass

    def report(self):
        return {}

    def torch_threads(self):
        return None

    def close(self):
        pass


def test_speculative_sampling_keeps_the_distribution_of_whole_sequences(model):
    """Thousands of seeded answers of a bigram model through the real generator with lookup drafts (accepted and
    rejected), against the exact distribution of their first three tokens: a chi-square test."""
    table = np.array([[0.2, 2.0, 0.1, 0.5], [0.3, 0.1, 2.2, 0.4], [0.5, 0.4, 0.1, 1.9], [1.8, 0.6, 0.3, 0.1]])
    probs = np.exp(table) / np.exp(table).sum(-1, keepdims=True)
    prompt = [81, 82, 83, 84, 81, 82, 83, 84, 81]  # 'abcdabcda': lookup drafts the cycle
    runner = MarkovRunner(table)
    spec = Speculation("lookup", LookupDrafter(), Policy(0.45))
    gen = Generator(runner, model.tokenizer, 512, speculation=spec)
    n, seen, drafted, accepted = 3000, Counter(), 0, 0
    for seed in range(n):
        params = SamplingParams(temperature=1.0, top_k=4, top_p=1.0, max_tokens=6, seed=seed)
        chunks = list(gen.stream(prompt, params))
        seen[tuple(c.token for c in chunks if c.token is not None)[:3]] += 1
        drafted += chunks[-1].stats.extra["speculative"]["drafted"]
        accepted += chunks[-1].stats.extra["speculative"]["accepted"]
    assert drafted > accepted > n / 2  # drafts were verified, many accepted, some rejected
    assert runner.fed > n * 3  # and several positions fed per step
    expected = {}
    for seq in ((a, b, c) for a in range(4) for b in range(4) for c in range(4)):
        prev, p = 0, 1.0  # the prompt ends with 'a'
        for t in seq:
            p, prev = p * float(probs[prev, t]), t
        expected[tuple(MarkovRunner.IDS[t] for t in seq)] = n * p
    big = [s for s, e in expected.items() if e >= 5]
    small_seen = sum(v for s, v in seen.items() if s not in big)
    small_expected = sum(e for s, e in expected.items() if s not in big)
    chi2 = sum((seen[s] - expected[s]) ** 2 / expected[s] for s in big)
    chi2 += (small_seen - small_expected) ** 2 / small_expected
    dof = len(big)  # bins - 1, with the small ones merged into one bin
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)  # ~ p > 0.001


def test_seeded_sampling_gives_the_same_text_with_and_without_speculation(int4):
    """One draw per generated token, drafted or not: a seed gives one text whatever k each step chose."""
    opts = dict(temperature=0.8, top_k=40, top_p=0.95, seed=7, max_tokens=24)
    chunks, stats = run(int4, REWRITE, "lookup", **opts)
    assert stats.extra["speculative"]["accepted"] > 0
    assert tokens(chunks) == tokens(run(int4, REWRITE, "off", **opts)[0]) == tokens(run(int4, REWRITE, "lookup", **opts)[0])


# ---------------------------------------------------------------- options, CLI, planner


def test_options_are_checked_with_the_fix_and_the_cli_flag_maps_to_them():
    from cfm_cli.common import run_options
    from cfm_cli.main import build_parser

    with pytest.raises(CfmError, match="choose one of off, lookup, edge, auto"):
        RunOptions(speculate="always").check()
    with pytest.raises(CfmError, match="give a center"):
        RunOptions(speculate="edge").check()
    assert run_options(build_parser().parse_args(["generate", "-p", "x", "--speculate", "lookup"])).speculate == "lookup"
    assert run_options(build_parser().parse_args(["serve"])).speculate == "auto" == RunOptions().speculate
    assert run_options(build_parser().parse_args(["chat", "--speculate", "off"])).speculate == "off"
    assert run_options(build_parser().parse_args(["serve", "--speculate", "edge"])).speculate == "edge"


def test_auto_is_off_where_chunks_round_differently(model):
    gen = model.new_generator()  # the fp32 session model: the modules backend
    assert gen.speculation is None
    assert model.new_generator(RunOptions(speculate="lookup")).speculation is not None


def test_planner_splits_over_a_slow_link_when_a_step_yields_several_tokens():
    m = Measurements(rtt_ms=50.0, up_mbps=10.0, down_mbps=10.0, local_layer_ms=1.5, local_head_ms=4.0,
                     center_layer_ms=0.5, span=(2, 28), n_layers=30, bytes_per_position=2304)
    assert choose(m).split is None  # 49 ms per token here vs 23 + 50 ms of round trip split
    plan = choose(m, spec=Estimate(tokens_per_step=3.0, positions_per_step=6.0, cost_per_position=0.45))
    assert plan.split == (2, 28) and plan.predicted_ms < plan.local_only_ms
    assert plan.to_dict()["speculation"]["tokens_per_step"] == 3.0
