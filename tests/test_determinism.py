"""At temperature 0 an answer is a function of the request alone: the same tokens whatever the KV cache held,
whichever requests ran before, streaming or not, through the library and through `cfm serve`."""

import threading
import time

import openai
import pytest

from cfm_runtime import load_model
from cfm_runtime.kernels import native
from edge.server import Engine, build_server, model_id

GREEDY = dict(temperature=0, max_tokens=24)
COLOUR = [{"role": "user", "content": "Name a primary colour."}]
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def int4(model_path):
    m = load_model(model_path)  # the default: int4, every position through the native kernel
    assert m.backend.name == "native", native.failure()  # prompts and steps share the kernel's arithmetic
    return m


def answer(model, messages, generator=None) -> list[int]:
    return [c.token for c in model.stream(messages, generator=generator, **GREEDY) if c.token is not None]


def test_cold_warm_and_after_other_requests_give_one_answer(int4):
    cold = answer(int4, COLOUR)
    gen = int4.new_generator()
    seen = [answer(int4, COLOUR, gen), answer(int4, COLOUR, gen)]  # warm: all but the last prompt token cached
    answer(int4, HELLO, gen)
    seen.append(answer(int4, COLOUR, gen))  # after another request
    assert all(s == cold for s in seen), seen


def test_a_turn_computed_from_the_cache_equals_it_computed_cold(int4):
    """The second turn's prompt holds the first answer: cached (computed token by token) or recomputed at once."""
    gen = int4.new_generator()
    first = int4.tokenizer.decode(answer(int4, COLOUR, gen))
    turn = COLOUR + [{"role": "assistant", "content": first}, {"role": "user", "content": "And another one?"}]
    warm = answer(int4, turn, gen)
    assert warm == answer(int4, turn)  # a fresh generator: nothing cached


def test_serve_answers_the_same_whatever_ran_before(int4):
    engine = Engine(int4, int4.new_generator(), model_id(int4))
    server, sock = build_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{sock.getsockname()[1]}/v1", api_key="unused",
                               max_retries=0, timeout=120)
        name = model_id(int4)

        def ask(messages, stream=False):
            if stream:
                chunks = client.chat.completions.create(model=name, messages=messages, stream=True, **GREEDY)
                return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            return client.chat.completions.create(model=name, messages=messages, **GREEDY).choices[0].message.content

        texts = [ask(COLOUR), ask(COLOUR), ask(COLOUR, stream=True)]
        ask(HELLO)
        texts += [ask(COLOUR, stream=True), ask(COLOUR)]
        assert len(set(texts)) == 1, texts
        assert texts[0] == "".join(int4.generate(COLOUR, **GREEDY))  # and what `cfm generate` answers
    finally:
        server.should_exit = True
        thread.join(10)
