"""The OpenAI-compatible edge API, driven by the official `openai` client against a real server."""

import json
import threading
import time

import httpx
import openai
import pytest

from cfm_runtime import CenterOptions, RunOptions
from edge.server import Engine, build_server, model_id

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(model):
    return Engine(model, model.new_generator(), model_id(model))


def start(engine, api_key=None):
    server, sock = build_server(engine, "127.0.0.1", 0, api_key)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.fixture(scope="module")
def api(engine):
    server, thread, url = start(engine)
    yield url
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_list(client, engine):
    ids = [m.id for m in client.models.list()]
    assert ids == engine.model_ids() and ids[0] == "smollm2-135m"


def test_chat_completion_equals_generate(client, engine, model):
    r = client.chat.completions.create(model=engine.model_id, messages=FRANCE, temperature=0, max_tokens=30)
    text = r.choices[0].message.content
    assert "Paris" in text
    assert text == "".join(model.generate(FRANCE, temperature=0, max_tokens=30))
    assert r.usage.prompt_tokens == len(model.encode_prompt(FRANCE)) and r.usage.completion_tokens > 0
    assert r.choices[0].finish_reason == "stop"


def test_stream_equals_non_streamed(client, engine):
    msgs = [{"role": "user", "content": "List three colours."}]
    full = client.chat.completions.create(model=engine.model_id, messages=msgs, temperature=0, max_tokens=40)
    stream = client.chat.completions.create(model=engine.model_id, messages=msgs, temperature=0, max_tokens=40,
                                            stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(pieces) == full.choices[0].message.content
    assert finish == full.choices[0].finish_reason and usage.completion_tokens == full.usage.completion_tokens


def test_completions_endpoint(client, engine, model):
    r = client.completions.create(model=engine.model_id, prompt="The capital of Italy is", temperature=0,
                                  max_tokens=8)
    assert r.choices[0].text == "".join(model.generate("The capital of Italy is", temperature=0, max_tokens=8))
    assert r.choices[0].finish_reason == "length"


def test_unknown_model(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert e.value.code == "model_not_found"


def test_too_many_tokens_for_the_context(client, engine):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=engine.model_id, messages=[{"role": "user", "content": "word " * 9000}])
    assert e.value.code == "context_length_exceeded"


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    (b'["a list"]', "JSON object"),
    (json.dumps({"model": "smollm2-135m", "messages": "hi"}).encode(), "messages"),
    (json.dumps({"model": "smollm2-135m", "messages": [], "temperature": 9}).encode(), "temperature"),
])
def test_bad_requests(api, body, needle):
    r = httpx.post(api + "/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error"


def test_api_key(engine):
    server, thread, url = start(engine, api_key="s3cret")
    try:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert [m.id for m in good.models.list()]
        assert httpx.get(url + "/health").json()["status"] == "ok"
    finally:
        server.should_exit = True
        thread.join(10)


def test_disconnect_stops_generation(api, engine, client):
    with httpx.stream("POST", api + "/v1/chat/completions", timeout=60, json={
            "model": engine.model_id, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "temperature": 0, "max_tokens": 400, "stream": True}) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
    assert any(x.startswith("data: ") for x in got)
    deadline = time.time() + 60
    while engine.busy and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.busy
    stats = engine.last_stats
    assert stats.finish_reason == "cancelled" and stats.generated_tokens < 400
    # the server still answers afterwards
    r = client.chat.completions.create(model=engine.model_id, messages=FRANCE, temperature=0, max_tokens=10)
    assert r.choices[0].message.content


def test_public_host_needs_api_key():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cfm_cli", "serve", "--host", "0.0.0.0"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and "--api-key" in r.stderr


def _toy_brick(model, name, layers, seed=0):
    import torch

    from cfm_runtime.bricks import Brick, base_info
    from cfm_runtime.bricks.lora import LoraPair

    g = torch.Generator().manual_seed(seed)
    pairs = {}
    for i in layers:
        for kind in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj"):
            lin = model.transformer.get_submodule(f"layers.{i}.{kind}")
            pairs[f"layers.{i}.{kind}"] = LoraPair(torch.randn(4, lin.in_features, generator=g) * 0.3,
                                                   torch.randn(lin.out_features, 4, generator=g) * 0.3, 2.0)
    return Brick(name, pairs, base_info(model))


def test_split_and_brick_streams_equal_generate(own_model, tmp_path):
    """Through a center (split 2:28) and with a brick on edge layers, the streamed answer equals the
    greedy answer `cfm generate --center ... [--bricks b]` computes."""
    model = own_model  # bricks go on and off it
    from center.server import CenterServer
    from cfm_runtime.bricks import BrickStore, apply_brick, remove_brick

    def split_generator(model, address, split):
        return model.new_generator(RunOptions(center=CenterOptions(address, split), brick_store=store.root))

    store = BrickStore(tmp_path / "bricks")
    store.save(_toy_brick(model, "edgebrick", [28, 29]))
    store.save(_toy_brick(model, "centerbrick", [10]))  # would need the center: not offered in split mode
    msgs = [{"role": "user", "content": "Name a large animal."}]
    center = CenterServer(model, span=(2, 28)).start()
    try:
        address = f"127.0.0.1:{center.port}"
        expected = "".join(c.text for c in model.stream(msgs, generator=split_generator(model, address, (2, 28)),
                                                        temperature=0, max_tokens=16))
        apply_brick(model, store.load("edgebrick"))
        try:
            expected_brick = "".join(c.text for c in model.stream(
                msgs, generator=split_generator(model, address, (2, 28)), temperature=0, max_tokens=16))
        finally:
            remove_brick(model, "edgebrick")
        assert expected_brick != expected

        gen = split_generator(model, address, (2, 28))
        engine = Engine(model, gen, model_id(model), gen.bricks.offered())
        assert engine.model_ids() == ["smollm2-135m", "smollm2-135m+edgebrick"]
        server, thread, url = start(engine)
        try:
            client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)

            def streamed(model_name):
                s = client.chat.completions.create(model=model_name, messages=msgs, temperature=0, max_tokens=16,
                                                   stream=True)
                return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

            assert streamed("smollm2-135m") == expected
            assert streamed("smollm2-135m+edgebrick") == expected_brick
            assert streamed("smollm2-135m") == expected  # the brick came off again
            split = engine.last_stats.extra["split"]
            assert "center" in json.dumps(split)
        finally:
            server.should_exit = True
            thread.join(10)
    finally:
        center.stop()
