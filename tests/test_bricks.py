"""Personal bricks: training on the user's facts, routing, merging, the store and the CLI, bad input."""

import json
import math
from pathlib import Path

import pytest
import torch

from cfm_runtime.bricks import Brick, BrickError, BrickStore, apply_brick, base_info, remove_brick
from cfm_runtime.bricks.lora import LoraPair
from cfm_runtime.bricks.merge import merge_bricks
from cfm_runtime.bricks.routing import route, signature
from cfm_runtime.bricks.train import TrainConfig, load_examples, mean_loss, train_lora
from cfm_cli import main as cli

pytestmark = pytest.mark.slow

PERSONAL = json.loads((Path(__file__).parent / "data" / "personal_facts.json").read_text())
FACTS, HELD_OUT = PERSONAL["facts"], PERSONAL["held_out"]
# bounds at the training defaults, a little below what benchmarks/results/personalize.json measured (recall 3/5,
# top-1 agreement 0.94, KL 0.034, 5/8 unrelated answers equivalent); the old weak anchor gave 0.87 and KL 0.11.
# Not asserted because not met: the capital of France (a 0.08-logit near-tie between "The" and "L" in the base
# model) flips to "L'Étoile ..." with every brick trained on these facts.
RECALL_MIN, AGREE_MIN, KL_MAX, EQUIVALENT_MIN = 2, 0.92, 0.05, 4
GREEDY = dict(temperature=0, max_tokens=16)


def ask(model, question: str) -> str:
    return "".join(model.generate([{"role": "user", "content": question}], **GREEDY))


def answer_top1(model, forced) -> list:
    """Top-1 next tokens along each base answer (teacher-forced): equal to the base's everywhere means the
    greedy answer is unchanged."""
    return [model.logits(ids)[n - 1:-1].argmax(-1) for ids, n in forced]


@pytest.fixture(scope="module")
def personal(own_model, tmp_path_factory):
    """A brick trained on FACTS with the `cfm brick train` defaults, and the base model's answers before it."""
    folder = tmp_path_factory.mktemp("facts")
    (folder / "facts.txt").write_text(FACTS)
    (folder / "held.txt").write_text(HELD_OUT)
    examples = load_examples(folder / "facts.txt", own_model.tokenizer)
    held = load_examples(folder / "held.txt", own_model.tokenizer)
    before = {"held_loss": mean_loss(own_model, held), "answers": {q: ask(own_model, q) for q in PERSONAL["unrelated"]}}
    forced = []
    for q, answer in before["answers"].items():
        prompt = own_model.encode_prompt([{"role": "user", "content": q}])
        forced.append((prompt + own_model.tokenizer.encode(answer, add_special=False), len(prompt)))
    before["forced"], before["top1"] = forced, answer_top1(own_model, forced)
    result = train_lora(own_model, examples, TrainConfig(), progress=False)
    sig, layer = signature(own_model, [e.ids for e in examples])
    meta = base_info(own_model) | {"signature": sig, "signature_layer": layer, "description": "facts about me"}
    return Brick("me", result.pairs, meta), held, before, result


def test_brick_answers_the_users_facts_and_leaves_the_rest(own_model, personal, eval_ids):
    brick, held, before, result = personal
    assert result.losses[-1] < 0.5 * result.losses[0]
    texts = [eval_ids[k] for k in ("prose", "code", "math", "science")]
    base = [torch.from_numpy(own_model.logits(ids)) for ids in texts]
    apply_brick(own_model, brick)
    try:
        # the user's facts, asked as a user would (not as in the training text)
        recalled = [q for q, word in PERSONAL["questions"].items() if word.lower() in ask(own_model, q).lower()]
        assert len(recalled) >= RECALL_MIN, recalled
        held_loss = mean_loss(own_model, held)
        assert math.exp(held_loss) < 0.5 * math.exp(before["held_loss"])  # held-out perplexity drops
        # unrelated text: next-token predictions stay close to the base model's
        agree, kl = [], []
        for ids, b in zip(texts, base):
            lp, lb = torch.log_softmax(torch.from_numpy(own_model.logits(ids)), -1), torch.log_softmax(b, -1)
            agree.append(float((lp.argmax(-1) == lb.argmax(-1)).float().mean()))
            kl.append(float((lb.exp() * (lb - lp)).sum(-1).mean()))
        assert sum(agree) / len(agree) >= AGREE_MIN and sum(kl) / len(kl) <= KL_MAX, (agree, kl)
        # unrelated questions: the base model's greedy answers unchanged (checked token by token), or still
        # holding the base model's answer word
        same = [bool((a == b).all()) for a, b in zip(answer_top1(own_model, before["forced"]), before["top1"])]
        equivalent = []
        for (q, word), unchanged in zip(PERSONAL["unrelated"].items(), same):
            w, base_answer = word.lower(), before["answers"][q].lower()
            if unchanged or (w in base_answer and w in ask(own_model, q).lower()):
                equivalent.append(q)
        assert len(equivalent) >= EQUIVALENT_MIN, (equivalent, same)
    finally:
        remove_brick(own_model, "me")
    q = "How many days are in a week?"
    assert ask(own_model, q) == before["answers"][q]  # unapplied: the base model again


def test_resume_equals_an_uninterrupted_run(own_model, tmp_path):
    (tmp_path / "d.txt").write_text(FACTS)
    examples = load_examples(tmp_path / "d.txt", own_model.tokenizer)[:3]
    cfg = TrainConfig(steps=4, top_layers=1, rank=2, targets=("self_attn.v_proj", "mlp.down_proj"), checkpoint_every=2,
                      anchors=5)
    ck = tmp_path / "ck.pt"
    first = train_lora(own_model, examples, cfg, checkpoint=ck, progress=False, stop_after=2)
    assert ck.is_file() and len(first.losses) == 2
    resumed = train_lora(own_model, examples, cfg, checkpoint=ck, resume=True, progress=False)
    straight = train_lora(own_model, examples, cfg, progress=False)
    assert resumed.resumed_from == 2 and resumed.losses == pytest.approx(straight.losses, rel=1e-5)
    for name, p in straight.pairs.items():
        torch.testing.assert_close(resumed.pairs[name].b, p.b, rtol=1e-5, atol=1e-7)
    other = TrainConfig(steps=4, top_layers=1, rank=4, checkpoint_every=2, anchors=5)
    with pytest.raises(Exception, match="other data or options"):
        train_lora(own_model, examples, other, checkpoint=ck, resume=True, progress=False)


def _toy_brick(own_model, name, layers, kinds, rank, seed, fingerprint=None):
    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in layers:
        for kind in kinds:
            lin = own_model.transformer.get_submodule(f"layers.{i}.{kind}")
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.randn(rank, lin.in_features, generator=g) * 0.01,
                                                   torch.randn(lin.out_features, rank, generator=g) * 0.01, 2.0)
    meta = base_info(own_model)
    if fingerprint:
        meta["base_fingerprint"] = fingerprint
    return Brick(name, pairs, meta)


def test_merge_is_the_weighted_sum_of_updates(own_model):
    a = _toy_brick(own_model, "a", [28, 29], ["self_attn.q_proj", "mlp.up_proj"], 4, 1)
    b = _toy_brick(own_model, "b", [29], ["self_attn.q_proj", "mlp.down_proj"], 2, 2)
    m = merge_bricks([a, b], [0.5, 0.25], "ab")
    q = "layers.29.self_attn.q_proj"
    torch.testing.assert_close(m.pairs[q].delta(), 0.5 * a.pairs[q].delta() + 0.25 * b.pairs[q].delta())
    torch.testing.assert_close(m.pairs["layers.28.mlp.up_proj"].delta(), 0.5 * a.pairs["layers.28.mlp.up_proj"].delta())
    assert set(m.pairs) == set(a.pairs) | set(b.pairs) and m.pairs[q].rank == 6
    other = _toy_brick(own_model, "c", [29], ["self_attn.q_proj"], 2, 3, fingerprint="0" * 32)
    with pytest.raises(BrickError, match="different base models"):
        merge_bricks([a, other], [0.5, 0.5], "bad")


def test_routing_picks_the_matching_brick_or_none(own_model, personal):
    me = personal[0]
    # a coding brick is trained on coding chats (JSONL): its signature comes from those
    code_chats = [
        [{"role": "user", "content": "Write a Python function that parses a CSV file."},
         {"role": "assistant", "content": "def parse(path):\n    with open(path) as f:\n"
                                          "        return [line.split(',') for line in f]\n"}],
        [{"role": "user", "content": "How do I fill a numpy array row by row in Python?"},
         {"role": "assistant", "content": "import numpy as np\nx = np.zeros((3, 4))\nfor i in range(3):\n"
                                          "    x[i] = i\n"}]]
    sig, layer = signature(own_model, [own_model.encode_prompt(c) for c in code_chats])
    metas = [me.meta | {"name": "me"}, {"name": "code", "signature": sig, "signature_layer": layer}]

    def pick(text):
        return route(own_model, own_model.encode_prompt([{"role": "user", "content": text}]), metas)[0]

    assert pick("What is the name of my dog Biscuit?") == "me"
    assert pick("Tell me about my hometown Quillbury and my violins.") == "me"
    assert pick("Write a Python function that reads a CSV file with open() and returns a list.") == "code"
    assert pick("How do volcanoes form?") is None
    # with `--bricks auto` the general questions whose answers a forced-on brick changes get the base model
    # (measured scores 0.16-0.30 against the 0.35 threshold; benchmarks/results/personalize.json)
    assert [q for q in PERSONAL["unrelated"] if pick(q) is not None] == []


# ------------------------------------------------------------------ store and CLI


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("CFM_HOME", str(tmp_path / "home"))
    return tmp_path / "home" / "bricks"


def snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_store_round_trip_and_bad_input_through_the_cli(own_model, personal, home, tmp_path, capsys):
    from cfm_runtime.bricks.formats import write_peft

    store = BrickStore()
    assert store.root == home
    write_peft(tmp_path / "peft", personal[0].pairs)
    code, _, err = run(capsys, "brick", "add", str(tmp_path / "peft"), "--name", "me",
                       "--signature-data", str(tmp_path / "missing.txt"))
    assert code == 2 and "missing.txt" in err and store.names() == []
    (tmp_path / "facts.txt").write_text(FACTS)
    code, out, err = run(capsys, "brick", "add", str(tmp_path / "peft"), "--name", "me", "--description", "my facts",
                         "--signature-data", str(tmp_path / "facts.txt"))
    assert code == 0, err
    code, out, _ = run(capsys, "brick", "list", "--json")
    (info,) = json.loads(out)
    assert info["name"] == "me" and info["layers"] == list(range(22, 30)) and info["rank"] == 8
    assert info["base_fingerprint"] == own_model.fingerprint() and len(info["checksum"]) == 64 and info["size_bytes"] > 0
    before = snapshot(home)

    # bad input: corrupt file, wrong shapes, existing name; each a clear error and the store unchanged
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tmp_path / "peft" / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x00" * 100)
    code, _, err = run(capsys, "brick", "add", str(bad), "--name", "bad")
    assert code == 2 and "corrupt" in err and "Traceback" not in err
    wrong = {n: LoraPair(p.a[:, :100], p.b, p.scale) for n, p in personal[0].pairs.items()}
    wrong["layers.40.mlp.up_proj"] = personal[0].pairs["layers.29.mlp.up_proj"]
    write_peft(tmp_path / "wrong", wrong)
    code, _, err = run(capsys, "brick", "add", str(tmp_path / "wrong"), "--name", "wrong")
    assert code == 2 and "57 problem(s)" in err and "expected [rank, 576]" in err and "layer 40 does not exist" in err
    code, _, err = run(capsys, "brick", "add", str(tmp_path / "peft"), "--name", "me")
    assert code == 2 and "exists already" in err
    assert snapshot(home) == before

    # a brick for another model is refused when applied; an incompatible merge is refused
    store.save(_toy_brick(own_model, "alien", [29], ["self_attn.q_proj"], 2, 3, fingerprint="f" * 32))
    before = snapshot(home)
    code, _, err = run(capsys, "generate", "--prompt", "Hi", "--max-tokens", "2", "--bricks", "alien")
    assert code == 2 and "made for another base model" in err
    code, _, err = run(capsys, "brick", "merge", "me:0.5", "alien:0.5", "--name", "mix")
    assert code == 2 and "different base models" in err
    assert snapshot(home) == before

    # a merge of compatible bricks, then generation with the brick on, and routing
    store.save(_toy_brick(own_model, "tiny", [29], ["self_attn.q_proj"], 2, 4))
    code, out, err = run(capsys, "brick", "merge", "me:0.5", "tiny:0.5", "--name", "mix")
    assert code == 0, err
    assert store.info("mix")["ranks"] == [8, 10] and store.info("mix")["signature"] is not None
    code, out, err = run(capsys, "generate", "--chat", "--prompt", "What is the name of my dog?", "--temperature", "0",
                         "--max-tokens", "8", "--bricks", "me", "--json")
    assert code == 0 and "Biscuit" in json.loads(out)["text"]
    code, out, err = run(capsys, "generate", "--chat", "--prompt", "What is the name of my dog Biscuit?",
                         "--temperature", "0", "--max-tokens", "8", "--bricks", "auto", "--json")
    assert code == 0 and "[bricks: auto -> " in err and json.loads(out)["brick"] in ("me", "mix")

    # a corrupted stored brick is detected by its checksum; remove still works
    weights = home / "me" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x01" * 8)
    code, _, err = run(capsys, "generate", "--prompt", "Hi", "--max-tokens", "2", "--bricks", "me")
    assert code == 2 and "checksum" in err
    for name in ("me", "mix", "tiny", "alien"):
        assert run(capsys, "brick", "remove", name)[0] == 0
    assert store.names() == [] and [p for p in home.iterdir()] == []
