"""What agents use of the OpenAI API, against a real `cfm serve` on the default lean model: structured output,
tool calls (official client and LangChain), log-probabilities, penalties and logit bias, and a 400 for every
field the server does not implement."""

import json
import threading
import time

from pathlib import Path

import httpx
import jsonschema
import numpy as np
import openai
import pytest

import cfm_bench
from cfm_runtime import CenterOptions, RunOptions, load_model
from cfm_runtime.grammar import Grammar, GrammarMatcher
from cfm_runtime.sampling import Sampler, SamplingParams, log_softmax
from edge.server import Engine, build_server, model_id

PERSON_DATA = json.loads((Path(cfm_bench.__file__).parent / "data" / "person_schema.json").read_text())
PERSON, PERSON_PROMPTS = PERSON_DATA["schema"], PERSON_DATA["prompts"]
JSON_PROMPTS = ["Give me a JSON object describing a book: its title, author and year.",
                "Return a JSON object with the keys city and country for Paris.",
                "Describe a dog as a JSON object with name, breed and age.",
                "Answer in JSON: what is 2+2?"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {
    "name": "add", "description": "Add two integers",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"], "additionalProperties": False}}}
ASK_WEATHER = [{"role": "user", "content": "What is the weather like in Paris today?"}]


@pytest.fixture(scope="module")
def lean(model_path):
    return load_model(model_path)  # what `cfm serve` runs: int4 on the native kernel, speculation on


@pytest.fixture(scope="module")
def engine(lean):
    return Engine(lean, lean.new_generator(), model_id(lean))


@pytest.fixture(scope="module")
def api(engine):
    server, sock = build_server(engine, "127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def client(api):
    return openai.OpenAI(base_url=api + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, engine, messages, **kw):
    return client.chat.completions.create(model=engine.model_id, messages=messages,
                                          **({"temperature": 0, "max_tokens": 200} | kw))


# ---------------------------------------------------------------- structured output


def test_json_schema_answers_parse_and_validate(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for prompt in PERSON_PROMPTS:
        r = chat(client, engine, [{"role": "user", "content": prompt}], response_format=fmt, max_tokens=300)
        assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    # sampled answers too: the grammar holds whatever the draw
    for seed in range(3):
        r = chat(client, engine, [{"role": "user", "content": PERSON_PROMPTS[1]}], response_format=fmt,
                 max_tokens=300, temperature=1.0, seed=seed)
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_mode_answers_are_objects(client, engine, lean):
    """Every answer is a JSON object, or, where the model runs on until max_tokens (an unbounded array of a
    135M model's repetitions: "length"), the start of one that the grammar still accepts."""
    tok, finished = lean.tokenizer, 0
    for prompt in JSON_PROMPTS:
        r = chat(client, engine, [{"role": "user", "content": prompt}], response_format={"type": "json_object"})
        text = r.choices[0].message.content
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(text), dict)
            finished += 1
        else:
            assert r.choices[0].finish_reason == "length" and text.startswith("{")
            matcher = GrammarMatcher(Grammar.json_object(), tok.grammar_tokenizer(), tok.vocab_size, tok.eog_ids)
            ids = tok.encode(text, add_special=False)
            assert matcher.valid_prefix(ids) == len(ids), text
    assert finished >= len(JSON_PROMPTS) - 1
    free = chat(client, engine, [{"role": "user", "content": JSON_PROMPTS[0]}]).choices[0].message.content
    with pytest.raises(ValueError):  # the same prompt unconstrained: prose, so the constraint did the work
        json.loads(free)


def test_streamed_json_equals_the_whole_answer(client, engine):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    msgs = [{"role": "user", "content": PERSON_PROMPTS[0]}]
    whole = chat(client, engine, msgs, response_format=fmt, max_tokens=300).choices[0].message.content
    parts = chat(client, engine, msgs, response_format=fmt, max_tokens=300, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole


def test_llama_cpp_grammar_field_gbnf_and_lark(client, engine):
    """llama.cpp's `grammar` extension: a GBNF grammar (its own format) or a Lark one, on chat and completions."""
    yes_no = 'root ::= answer "."\nanswer ::= "yes" | "no"'
    for prompt in ("Is the sky blue?", "Is fire cold?", "Can fish swim?"):
        r = chat(client, engine, [{"role": "user", "content": prompt}], extra_body={"grammar": yes_no})
        assert r.choices[0].message.content in ("yes.", "no.")
    r = client.completions.create(model=engine.model_id, prompt="The colour of grass is", max_tokens=10,
                                  temperature=0, extra_body={"grammar": 'start: " " COLOUR\nCOLOUR: "green" | "blue"'})
    assert r.choices[0].text in (" green", " blue")


def test_grammar_holds_on_every_path(lean, model, model_path, tmp_path):
    """Local with and without speculation, with a brick, and split with a real center: the same constrained
    answer, greedy or seeded (the brick's answer valid too); with speculation the grammar's forced tokens are
    drafted, and all of them are accepted."""
    from center.server import CenterServer
    from cfm_runtime.bricks import Brick, BrickStore, base_info
    from cfm_runtime.bricks.lora import random_pairs

    grammar = Grammar.json_schema(PERSON)
    msgs = [{"role": "user", "content": PERSON_PROMPTS[2]}]

    def answer(run, **sampling):
        gen = lean.new_generator(run)
        try:
            chunks = list(lean.stream(msgs, generator=gen, grammar=grammar,
                                      **({"temperature": 0, "max_tokens": 300} | sampling)))
        finally:
            gen.close()
        return "".join(c.text for c in chunks), chunks[-1].stats

    plain, _ = answer(RunOptions(speculate="off"))
    jsonschema.validate(json.loads(plain), PERSON)
    text, stats = answer(RunOptions(speculate="lookup"))
    assert text == plain
    forced = stats.extra["speculative"]["by_source"]["grammar"]
    assert forced["drafted"] >= 10 and forced["accepted"] == forced["drafted"]
    seeded = answer(RunOptions(speculate="off"), temperature=1.0, seed=7)[0]
    assert answer(RunOptions(speculate="lookup"), temperature=1.0, seed=7)[0] == seeded
    store = BrickStore(tmp_path / "bricks")
    store.save(Brick("b", random_pairs(model.transformer, [26, 27], std=0.2), base_info(model)))
    with_brick = [answer(RunOptions(speculate=mode, bricks=(("b", 1.0),), brick_store=store.root))[0]
                  for mode in ("off", "lookup")]
    jsonschema.validate(json.loads(with_brick[0]), PERSON)
    assert with_brick[1] == with_brick[0] != plain  # the brick is on (a strong one: its text is odd, its JSON valid)
    center = CenterServer(load_model(model_path), span=(2, 28)).start()
    try:
        for mode in ("off", "lookup"):
            assert answer(RunOptions(center=CenterOptions(center.address, (2, 28)), speculate=mode))[0] == plain
    finally:
        center.stop()


# ---------------------------------------------------------------- tool calls


def calls_of(message) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]


def test_required_tool_call_parses_validates_and_streams_the_same(client, engine):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, ADD)}
    r = chat(client, engine, ASK_WEATHER, tools=[WEATHER, ADD], tool_choice="required")
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = calls_of(choice.message)
    assert calls and all(c.id.startswith("call_") for c in choice.message.tool_calls)
    for name, args in calls:
        jsonschema.validate(args, schemas[name])
    stream = chat(client, engine, ASK_WEATHER, tools=[WEATHER, ADD], tool_choice="required", stream=True)
    parts: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for d in c.delta.tool_calls or []:
                p = parts.setdefault(d.index, {"id": None, "name": None, "arguments": ""})
                p["id"] = p["id"] or d.id
                p["name"] = p["name"] or (d.function.name if d.function else None)
                p["arguments"] += (d.function.arguments or "") if d.function else ""
    assert finish == "tool_calls"
    assert [(p["name"], json.loads(p["arguments"])) for _, p in sorted(parts.items())] == calls
    assert all(p["id"].startswith("call_") for p in parts.values())


def test_python_tool_chat_equals_the_api(client, engine, lean):
    """`cfm_runtime.tools.chat` composes the same prompt and grammar as the server: the same calls."""
    from cfm_runtime import tools as toolkit

    api = calls_of(chat(client, engine, ASK_WEATHER, tools=[WEATHER, ADD], tool_choice="required").choices[0].message)
    text, calls, stats = toolkit.chat(lean, ASK_WEATHER, [WEATHER, ADD], "required", temperature=0, max_tokens=200)
    assert text is None and [(c.name, json.loads(c.arguments)) for c in calls] == api
    text, calls, _ = toolkit.chat(lean, ASK_WEATHER, [WEATHER], "none", temperature=0, max_tokens=20)
    assert text and calls == []
    with pytest.raises(toolkit.ToolsError) as e:
        toolkit.chat(lean, ASK_WEATHER, [{"type": "function", "function": {"name": "bad name!"}}])
    assert e.value.field == "tools"


def test_tool_choice_named_none_and_single_call(client, engine):
    r = chat(client, engine, ASK_WEATHER, tools=[WEATHER, ADD],
             tool_choice={"type": "function", "function": {"name": "add"}}, parallel_tool_calls=False)
    calls = calls_of(r.choices[0].message)
    assert len(calls) == 1 and calls[0][0] == "add" and set(calls[0][1]) == {"a", "b"}
    r = chat(client, engine, ASK_WEATHER, tools=[WEATHER, ADD], tool_choice="none", max_tokens=30)
    assert r.choices[0].message.tool_calls is None and r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


def test_tool_results_are_fed_back(client, engine):
    """call -> the tool's result -> an answer in text; the call and the result reach the model in the convention's
    text (a <tool_call> block in the assistant turn, a <tool_response> block in a user turn)."""
    from cfm_runtime import tools as toolkit

    first = chat(client, engine, ASK_WEATHER, tools=[WEATHER], tool_choice="required").choices[0].message
    call = first.tool_calls[0]
    history = ASK_WEATHER + [first.model_dump(exclude_none=True),  # the message as the client got it
                             {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    final = chat(client, engine, history, tools=[WEATHER], max_tokens=40).choices[0]
    assert final.message.content and not final.message.tool_calls
    rendered = toolkit.chat_messages(history, None, False)
    blocks = [toolkit.call_text(c.function.name, c.function.arguments) for c in first.tool_calls]
    assert rendered[1] == {"role": "assistant", "content": "\n".join(blocks)}
    assert rendered[1]["content"].startswith('<tool_call>\n{"name": "get_weather", "arguments": {')
    assert rendered[2] == {"role": "user", "content": "<tool_response>\n18 degrees and sunny\n</tool_response>"}


def test_langchain_bind_tools_conversation_and_structured_output(api, engine):
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    @tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        return f"18 degrees and sunny in {city}"

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        return a + b

    llm = ChatOpenAI(base_url=api + "/v1", api_key="unused", model=engine.model_id, temperature=0, max_tokens=120,
                     max_retries=0)
    tools = {"get_weather": get_weather, "add": add}
    messages = [HumanMessage("What is the weather like in Paris today?")]
    ai = llm.bind_tools([get_weather, add], tool_choice="any").invoke(messages)
    assert ai.tool_calls and not ai.invalid_tool_calls
    messages.append(ai)
    for call in ai.tool_calls:
        assert set(call["args"]) == set(tools[call["name"]].args)
        messages.append(ToolMessage(str(tools[call["name"]].invoke(call["args"])), tool_call_id=call["id"]))
    final = llm.bind_tools([get_weather, add]).invoke(messages)
    assert isinstance(final.content, str) and final.content and not final.tool_calls

    class Person(BaseModel):
        name: str = Field(max_length=30)
        age: int = Field(ge=0, le=120)

    for method in ("json_schema", "function_calling"):
        person = llm.with_structured_output(Person, method=method).invoke("Anna is 31 years old.")
        assert isinstance(person, Person), method


# ---------------------------------------------------------------- probabilities, penalties, bias


def test_chat_logprobs_are_the_log_softmax_of_the_models_logits(client, engine, lean):
    msgs = [{"role": "user", "content": "Name a colour."}]
    r = chat(client, engine, msgs, max_tokens=8, logprobs=True, top_logprobs=3)
    entries = r.choices[0].logprobs.content
    assert b"".join(bytes(e.bytes) for e in entries).decode() == r.choices[0].message.content
    local = [c for c in lean.stream(msgs, generator=lean.new_generator(RunOptions(speculate="off")), temperature=0,
                                    max_tokens=8) if c.token is not None]
    ids = lean.encode_prompt(msgs)
    gen_ids = [c.token for c in local]
    assert len(entries) == len(gen_ids)
    ref = log_softmax(lean.logits(ids + gen_ids))[len(ids) - 1:-1]
    for e, row, t in zip(entries, ref, gen_ids):
        assert e.logprob == pytest.approx(row[t], abs=2e-3)
        best = np.argsort(-row)[:3]
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(list(row[best]), abs=2e-3)
        assert e.top_logprobs[0].token == e.token  # greedy: the token drawn is the likeliest


def test_completions_echo_scores_the_prompt(client, engine, lean):
    prompt = "The capital of France is Paris. The capital of Italy is"
    ids = lean.encode_prompt(prompt)
    ref = log_softmax(lean.logits(ids))
    for prompt_arg in (prompt, ids):
        r = client.completions.create(model=engine.model_id, prompt=prompt_arg, max_tokens=0, echo=True, logprobs=2,
                                      temperature=0)
        lp = r.choices[0].logprobs
        assert r.choices[0].text == prompt and "".join(lp.tokens) == prompt
        assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids)
        assert lp.token_logprobs[1:] == pytest.approx([ref[i - 1][ids[i]] for i in range(1, len(ids))], abs=2e-3)
        assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(ids))]
    r = client.completions.create(model=engine.model_id, prompt=prompt, max_tokens=1, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and r.choices[0].text == prompt + lp.tokens[-1]
    assert lp.token_logprobs[-1] == pytest.approx(float(ref[-1].max()), abs=2e-3)


def test_logit_bias_bans_and_forces_tokens(client, engine, lean):
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    first = [c.token for c in lean.stream(msgs, temperature=0, max_tokens=6) if c.token is not None]
    plain = chat(client, engine, msgs, max_tokens=6).choices[0].message.content
    banned = chat(client, engine, msgs, max_tokens=6, logit_bias={str(first[0]): -100}).choices[0].message.content
    expected = [c for c in lean.stream(msgs, temperature=0, max_tokens=6, logit_bias={first[0]: -100})]
    assert banned != plain and first[0] not in [c.token for c in expected]
    assert banned == "".join(c.text for c in expected)
    forced = chat(client, engine, msgs, max_tokens=3, logit_bias={"19556": 100}).choices[0].message.content
    assert forced == lean.tokenizer.decode([19556] * 3)


def test_presence_and_frequency_penalties():
    """OpenAI's rule: logit - frequency x count - presence x (count > 0), over the tokens this answer drew."""
    logits = np.array([3.0, 2.9, 2.0, 0.0], dtype=np.float32)
    drawn = []
    s = Sampler(SamplingParams(temperature=0, frequency_penalty=0.3, presence_penalty=0.0, logprobs=0))
    for _ in range(4):
        drawn.append(s(logits, drawn))
    assert drawn == [0, 1, 0, 1]  # 3.0; then 2.9 beats 2.7; 2.7 beats 2.6; 2.6 beats 2.4
    assert s.drawn[2].logprob == pytest.approx(float(log_softmax(logits - np.array([0.3, 0.3, 0, 0]))[0]), abs=1e-6)
    s = Sampler(SamplingParams(temperature=0, presence_penalty=1.5))
    drawn = []
    for _ in range(3):
        drawn.append(s(logits, drawn))
    assert drawn == [0, 1, 2]  # once drawn, 3.0 - 1.5 and 2.9 - 1.5 fall below 2.0


def test_penalties_reach_the_sampler_through_the_api(client, engine, lean):
    msgs = [{"role": "user", "content": "Repeat the word 'yes' ten times."}]
    kw = dict(max_tokens=24, frequency_penalty=1.5, presence_penalty=0.5)
    api_text = chat(client, engine, msgs, **kw).choices[0].message.content
    assert api_text == "".join(lean.generate(msgs, temperature=0, **kw))
    assert api_text != chat(client, engine, msgs, max_tokens=24).choices[0].message.content


# ---------------------------------------------------------------- strictness


def post(api, path, body):
    return httpx.post(api + path, json=body, timeout=60)


@pytest.mark.parametrize("extra, param", [
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"function_call": "auto"}, "function_call"),
    ({"audio": {"voice": "alloy"}}, "audio"),
    ({"modalities": ["text", "audio"]}, "modalities"),
    ({"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"store": True}, "store"),
    ({"web_search_options": {}}, "web_search_options"),
    ({"frobnicate": 1}, "frobnicate"),
    ({"stream": "yes"}, "stream"),
    ({"max_tokens": True}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"top_logprobs": 3}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "code_interpreter"}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format"),
    ({"logit_bias": {"abc": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 200}}, None),
    ({"logit_bias": {"99999999": 1}}, None),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"grammar": "root ::= missing"}, "grammar"),
    ({"grammar": 'root ::= "a"', "response_format": {"type": "json_object"}}, "grammar"),
    ({"messages": [{"role": "function", "content": "x", "name": "f"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": "x", "colour": "red"}]}, "messages.0.colour"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])
def test_chat_fields_not_implemented_or_malformed_get_400(api, engine, extra, param):
    body = {"model": engine.model_id, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | extra
    r = post(api, "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    if param is not None:
        assert err["param"] is not None and err["param"].startswith(param), err


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 2}, "best_of"),
    ({"suffix": "and so on"}, "suffix"),
    ({"logprobs": 6}, "logprobs"),
    ({"echo": "yes"}, "echo"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": [1, 2, 99999999]}, "prompt"),
])
def test_completion_fields_not_implemented_or_malformed_get_400(api, engine, extra, param):
    body = {"model": engine.model_id, "prompt": "Hello", "max_tokens": 2} | extra
    r = post(api, "/v1/completions", body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param)


def test_fields_clients_send_as_defaults_are_accepted(api, engine):
    """null or false for an unsupported field is its default, and `user` is an identifier with no effect."""
    body = {"model": engine.model_id, "messages": [{"role": "developer", "content": "Be brief."},
                                                   {"role": "user", "content": "hi"}],
            "max_tokens": 2, "store": False, "functions": None, "user": "someone", "suffix": None,
            "response_format": {"type": "text"}}
    assert post(api, "/v1/chat/completions", body).status_code == 200


# ---------------------------------------------------------------- the same controls from the command line


def test_cli_structured_output_and_sampling_flags(model_path, tmp_path, capsys):
    from cfm_cli.main import main

    schema = tmp_path / "city.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                                   "country": {"type": "string", "maxLength": 30}},
                                  "required": ["city", "country"], "additionalProperties": False}))
    base = ["generate", "--model", str(model_path), "--chat", "--prompt", "Where is the Eiffel tower?",
            "--temperature", "0", "--max-tokens", "60"]
    assert main(base + ["--json-schema", str(schema)]) == 0
    out = capsys.readouterr().out.strip()
    jsonschema.validate(json.loads(out), json.loads(schema.read_text()))
    assert main(base + ["--json-object", "--frequency-penalty", "0.5", "--logit-bias", "90=-100"]) == 0
    assert isinstance(json.loads(capsys.readouterr().out.strip()), dict)
    bad_flags = [(["--logit-bias", "x"], "ID=BIAS"), (["--json-schema", str(tmp_path / "none.json")], "cannot read"),
                 (["--presence-penalty", "5"], "presence_penalty"), (["--json-schema", '{"type": "objekt"}'], "objekt")]
    for bad, needle in bad_flags:
        assert main(base + bad) == 2
        assert needle in capsys.readouterr().err
