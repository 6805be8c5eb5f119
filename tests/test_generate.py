"""Generation: chat template, sampling options, stop strings, multi-turn cache reuse, bad input."""

import pytest

from cfm_runtime import CfmError, ContextOverflowError, SamplingParams
from cfm_runtime.generate import StopMatcher

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_greedy_chat_answers_paris(model):
    text = "".join(model.generate(FRANCE, temperature=0, max_tokens=30))
    assert "Paris" in text


def test_chat_template_is_chatml(model):
    rendered = model.tokenizer.apply_chat_template(FRANCE)
    assert rendered.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    ids = model.encode_prompt(FRANCE)
    assert ids.count(1) == 3 and ids.count(2) == 2  # system, user, assistant turns; special tokens are single ids


def test_seeded_sampling_is_reproducible(model):
    opts = dict(temperature=1.0, top_k=50, top_p=0.9, seed=1234, max_tokens=20)
    a = "".join(model.generate("Once upon a time", **opts))
    b = "".join(model.generate("Once upon a time", **opts))
    c = "".join(model.generate("Once upon a time", **(opts | {"seed": 99})))
    assert a == b and a != c


def test_max_tokens_and_stats(model):
    chunks = list(model.stream("The numbers one, two, three,", temperature=0, max_tokens=5))
    stats = chunks[-1].stats
    assert stats.generated_tokens == 5 and stats.finish_reason == "length"
    assert stats.decode_tps > 0 and stats.prompt_tps > 0 and stats.to_dict()["peak_rss_mb"] > 0


def test_stop_string_cuts_output(model):
    full = "".join(model.generate("1, 2, 3, 4, 5,", temperature=0, max_tokens=20))
    assert " 7" in full
    cut = "".join(model.generate("1, 2, 3, 4, 5,", temperature=0, max_tokens=20, stop=[" 7"]))
    assert cut == full[: full.index(" 7")]


def test_stop_matcher_holds_back_partial_matches():
    m = StopMatcher(["END"])
    assert m.push("abc E") == ("abc ", False)
    assert m.push("N") == ("", False)
    assert m.push("Dxyz") == ("", True)
    m = StopMatcher(["END"])
    assert m.push("E") == ("", False) and m.push("x") == ("Ex", False)


def test_repetition_penalty_changes_greedy_output(model):
    prompt = "apple apple apple apple apple"
    plain = "".join(model.generate(prompt, temperature=0, max_tokens=8))
    penalised = "".join(model.generate(prompt, temperature=0, max_tokens=8, repetition_penalty=1.8))
    assert plain != penalised


def test_multi_turn_reuses_cache_and_matches_fresh(model):
    gen = model.new_generator()
    first = "".join(c.text for c in model.stream(FRANCE, generator=gen, temperature=0, max_tokens=20))
    turn2 = FRANCE + [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Italy?"}]
    chunks = list(model.stream(turn2, generator=gen, temperature=0, max_tokens=20))
    reused = "".join(c.text for c in chunks)
    assert chunks[-1].stats.cached_tokens > 30
    fresh = "".join(model.generate(turn2, temperature=0, max_tokens=20))
    assert reused == fresh and "Rome" in reused


def test_streaming_keeps_utf8_intact(model):
    text = "".join(model.generate([{"role": "user", "content": "Write the word café three times."}],
                                  temperature=0, max_tokens=30))
    assert "\ufffd" not in text


def test_empty_prompt(model):
    with pytest.raises(CfmError, match="empty"):
        list(model.generate(""))


def test_prompt_longer_than_context(model):
    with pytest.raises(ContextOverflowError, match="context holds 8192"):
        list(model.generate("word " * 9000))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-3),
                                 dict(repetition_penalty=0)])
def test_bad_sampling_options(bad):
    with pytest.raises(CfmError):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad", [[], [{"role": "user"}], "not", [{"role": "user", "content": 3}]])
def test_bad_messages(model, bad):
    with pytest.raises(CfmError):
        model.encode_prompt(bad) if bad != "not" else model.tokenizer.apply_chat_template(bad)


def test_logits_rejects_bad_ids(model):
    with pytest.raises(CfmError, match="outside the vocabulary"):
        model.logits([1, 2, 10**6])
