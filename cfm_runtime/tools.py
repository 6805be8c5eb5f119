"""Tool calls for chat models, in OpenAI's shape: the prompt that offers the tools, the grammar that makes every
call parse and validate, and the reader that turns the answer back into calls (whole, or streamed as deltas).

The convention is the one Hermes- and Qwen-style chat models are trained on, in text: a call is
`<tool_call>\\n{"name": NAME, "arguments": {...}}\\n</tool_call>`, several calls follow one another separated by
a newline, and a tool's result comes back in a user turn as `<tool_response>\\n...\\n</tool_response>`. A chat
template that knows tools itself (it reads a `tools` variable) is given them; otherwise the tools are described
in the system message (`tools_prompt`). The answer is decoded under a grammar (`call_grammar`): with
`tool_choice` "required" or a named function it must be calls; with "auto" it is either calls or text that
does not start like one; each call's arguments are held to its function's JSON schema. See docs/openai-api.md
(Tool calls).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CfmError
from .grammar import JSON_FORMAT, Grammar

if TYPE_CHECKING:
    from .generate import GenerationStats

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
HEAD = OPEN + '{"name": "'  # every call starts with these characters (the grammar writes them)
NAME_END = '", "arguments": '
END = "}" + CLOSE  # after the arguments' object: the call's own closing brace, then the tag
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict
    strict: bool

    def spec(self) -> dict:
        """The tool as the prompt shows it (OpenAI's function object)."""
        d = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": {k: v for k, v in d.items() if v}}


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(tools) -> list[Tool]:
    """OpenAI's `tools` list -> Tools; a CfmError names the first entry that is not a valid function tool."""
    if not isinstance(tools, list) or not tools:
        raise CfmError("tools must be a non-empty list of {\"type\": \"function\", \"function\": {...}}")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function" or not isinstance(t.get("function"), dict):
            raise CfmError(f"{where} must be {{\"type\": \"function\", \"function\": {{...}}}}; only function tools "
                           "are supported")
        extra = set(t) - {"type", "function"}
        f = t["function"]
        extra |= {f"function.{k}" for k in set(f) - {"name", "description", "parameters", "strict"}}
        if extra:
            raise CfmError(f"{where} has fields this server does not know: {', '.join(sorted(extra))}")
        name = f.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise CfmError(f"{where}.function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in seen:
            raise CfmError(f"{where}: two tools are named {name!r}")
        seen.add(name)
        description = f.get("description") or ""
        if not isinstance(description, str):
            raise CfmError(f"{where}.function.description must be a string")
        params = f.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}, "additionalProperties": False}
        if not isinstance(params, dict):
            raise CfmError(f"{where}.function.parameters must be a JSON schema object")
        strict = f.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise CfmError(f"{where}.function.strict must be true or false")
        out.append(Tool(name, description, params, bool(strict)))
    return out


def parse_choice(choice, tools: list[Tool]) -> tuple[str, str | None]:
    """OpenAI's `tool_choice` -> (mode, function name): mode is "auto", "none", "required" or "function"."""
    if choice is None:
        return "auto", None
    if choice in ("auto", "none", "required"):
        return choice, None
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if name not in {t.name for t in tools}:
            raise CfmError(f"tool_choice names the function {name!r}, which is not in tools")
        return "function", name
    raise CfmError('tool_choice must be "auto", "none", "required" or {"type": "function", "function": {"name": ...}}')


def tools_prompt(tools: list[Tool]) -> str:
    """The system message's description of the tools and of how to call them."""
    lines = "\n".join(json.dumps(t.spec(), ensure_ascii=False) for t in tools)
    return ("You can call functions to answer. Each one is described by a JSON object on its own line between "
            f"<tools> and </tools>:\n<tools>\n{lines}\n</tools>\n\n"
            "To call a function, answer with a JSON object naming it and giving its arguments, inside "
            "<tool_call></tool_call> tags:\n"
            '<tool_call>\n{"name": "the function\'s name", "arguments": {"an argument": "its value"}}\n</tool_call>\n'
            "Write one such block per call. The results come back inside <tool_response></tool_response> tags.")


def call_text(name: str, arguments: str) -> str:
    """A call as the model writes it (the arguments' JSON re-written in the grammar's spacing)."""
    try:
        args = json.loads(arguments) if arguments else {}
    except ValueError:
        raise CfmError(f"the arguments of the earlier call to {name!r} are not JSON: {arguments[:80]!r}") from None
    return HEAD + name + NAME_END + _dumps(args) + END


def _dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(JSON_FORMAT["item_separator"],
                                                             JSON_FORMAT["key_separator"]))


def chat_messages(messages: list[dict], tools: list[Tool] | None, describe: bool) -> list[dict]:
    """OpenAI chat messages -> {"role", "content"} messages for a chat template: "developer" becomes "system",
    an assistant's `tool_calls` become call blocks after its text, and consecutive "tool" messages one user
    turn of <tool_response> blocks. `describe`: put the tools' description in the system message (when the
    template does not take `tools` itself)."""
    out: list[dict] = []
    responses: list[str] = []

    def flush():
        if responses:
            out.append({"role": "user", "content": "\n".join(responses)})
            responses.clear()

    for m in messages:
        role, content = m["role"], m.get("content") or ""
        if role == "tool":
            responses.append(f"<tool_response>\n{content}\n</tool_response>")
            continue
        flush()
        if role == "assistant" and m.get("tool_calls"):
            calls = [call_text(c["function"]["name"], c["function"].get("arguments", "")) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": "system" if role == "developer" else role, "content": content})
    flush()
    if tools and describe:
        block = tools_prompt(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _not_starting_with(prefix: str) -> str:
    """A Lark terminal: any text that does not start with `prefix`."""
    return f"/(?s:.*)/ & ~/{re.escape(prefix)}(?s:.*)/"


def call_grammar(tools: list[Tool], mode: str, name: str | None = None, parallel: bool = True,
                 answer_schema: dict | None = None) -> Grammar:
    """The grammar of an answer under `tool_choice` `mode` ("auto", "required" or "function": calls to `name`
    only). `parallel`: several calls may follow one another. With "auto" the answer is calls or text that does
    not start like a call; `answer_schema`, if given, holds that text to a JSON schema (`response_format`)."""
    chosen = [t for t in tools if mode != "function" or t.name == name]
    rules = []
    for i, t in enumerate(chosen):
        schema = {"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"], "additionalProperties": False,
                  "x-guidance": dict(JSON_FORMAT, lenient=not t.strict)}
        rules.append(f"fn{i}: %json {json.dumps(schema)}")
    fns = " | ".join(f"fn{i}" for i in range(len(chosen)))
    calls = 'call ("\\n" call)*' if parallel else "call"
    lines = [f"calls: {calls}", f'call: {json.dumps(OPEN)} ({fns}) {json.dumps(CLOSE)}', *rules]
    if mode == "auto":
        if answer_schema is not None:
            answer_rule = "answer: %json " + json.dumps(dict(answer_schema, **{"x-guidance": JSON_FORMAT}))
        else:
            answer_rule = f"answer: TEXT\nTEXT: {_not_starting_with(OPEN.rstrip())}"
        lines = ["start: answer | calls", answer_rule, *lines]
    else:
        lines = ["start: calls", *lines]
    return Grammar.lark("\n".join(lines), "the tools' grammar")


class ToolsError(CfmError):
    """A request's tools, tool choice or messages cannot be used; `field` names which."""

    def __init__(self, message: str, field: str):
        super().__init__(message)
        self.field = field


@dataclass
class ToolPrompt:
    """A chat with tools in the model's terms: `messages` for the chat template, `template_tools` for a template
    that describes tools itself (else None), and the `grammar` the answer is decoded under (None when no tool
    may be called: then the answer is text)."""

    messages: list[dict]
    template_tools: list[dict] | None
    grammar: Grammar | None


def tool_prompt(tokenizer, messages: list[dict], tools: list | None, tool_choice=None, parallel: bool = True,
                answer_schema: dict | None = None) -> ToolPrompt:
    """OpenAI's messages, `tools`, `tool_choice` and `parallel_tool_calls` -> the prompt and grammar of the
    answer (`answer_schema`: the text alternative's JSON schema under "auto"). A ToolsError names the field
    at fault."""
    specs, mode, name = None, "none", None
    if tools is not None:
        specs = _field(parse_tools, "tools", tools)
        mode, name = _field(parse_choice, "tool_choice", tool_choice, specs)
    elif tool_choice not in (None, "none"):
        raise ToolsError("tool_choice needs tools", "tool_choice")
    active = specs is not None and mode != "none"
    describe = active and not tokenizer.template_takes_tools
    chat = _field(chat_messages, "messages", messages, specs, describe)
    grammar = _field(call_grammar, "tools", specs, mode, name, parallel, answer_schema) if active else None
    return ToolPrompt(chat, [t.spec() for t in specs] if active and not describe else None, grammar)


def _field(fn, field: str, *args):
    try:
        return fn(*args)
    except CfmError as e:
        raise ToolsError(str(e), field) from None


def chat(model, messages: list[dict], tools: list, tool_choice=None, parallel: bool = True, generator=None,
         **sampling) -> tuple[str | None, list[ToolCall], "GenerationStats"]:
    """One answer of `model` to a chat with tools, in Python: -> (text, or None when the answer is calls; the
    calls; the answer's stats). Sampling options as `Model.stream`'s; `generator`: one that keeps its cache."""
    from .sampling import SamplingParams

    p = tool_prompt(model.tokenizer, messages, tools, tool_choice, parallel)
    ids = model.encode_prompt(p.messages, p.template_tools)
    reader = CallStream() if p.grammar is not None else None
    chunks = (generator or model.new_generator()).stream(ids, SamplingParams(grammar=p.grammar, **sampling))
    text, stats = [], None
    for chunk in chunks:
        text.append(chunk.text)
        stats = chunk.stats
        if reader is not None and chunk.text:
            reader.push(chunk.text)
            if reader.repeated:  # the same call again: the answer ends before it
                chunks.close()
                break
    if reader is not None:
        reader.finish()
        if reader.complete:
            return None, reader.tool_calls(), stats
    return "".join(text), [], stats


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


class CallStream:
    """Reads an answer as it streams: `push(text)` -> events ("content", text) | ("call", index, id, name) |
    ("arguments", index, text); the arguments' pieces of a call join to its JSON. Text is held back while it
    may still be the start of a call, so a call is never streamed as content.

    A call identical to an earlier one of the same answer ends the answer (`repeated`; small models, once they
    have called, tend to call the same again until max_tokens): it is dropped, and the caller stops generating.
    While a call reads the same as an earlier one so far, its events are held back."""

    def __init__(self):
        self.text = ""
        self.mode: str | None = None  # "content" or "calls" once known
        self.calls: list[dict] = []  # {"id", "name", "arguments" (read), "sent", "at", "done"}
        self.pos = 0  # where the text after the last finished call starts
        self.sent = 0  # content characters sent
        self.repeated = False  # the answer repeated a call: stop generating
        self.complete = False  # set by finish(): the answer was calls, each read to its closing tag

    def push(self, piece: str) -> list[tuple]:
        if self.repeated:
            return []
        self.text += piece
        if self.mode is None:
            if self.text.startswith(OPEN.rstrip()):
                self.mode = "calls"
            elif not OPEN.startswith(self.text):
                self.mode = "content"
        if self.mode == "content":
            out, self.sent = self.text[self.sent:], len(self.text)
            return [("content", out)] if out else []
        return self._calls() if self.mode == "calls" else []

    def finish(self) -> list[tuple]:
        """The end of the answer: text held back is content after all; `complete` says whether the answer was
        calls read to their closing tags (not cut by max_tokens)."""
        if self.mode is None and self.text:
            self.mode, self.sent = "content", len(self.text)
            return [("content", self.text)]
        done = bool(self.calls) and self.calls[-1]["done"]
        self.complete = done and (self.repeated or self.pos == len(self.text))
        return []

    def tool_calls(self) -> list[ToolCall]:
        return [ToolCall(c["id"], c["name"], c["arguments"]) for c in self.calls if c["done"]]

    def _calls(self) -> list[tuple]:
        events = []
        while True:
            t = self.text
            if not self.calls or self.calls[-1]["done"]:
                start = self.pos + (1 if self.calls else 0)  # the newline between calls
                name_at = start + len(HEAD)
                stop = t.find(NAME_END, name_at) if t.startswith(HEAD, start) else -1
                if stop < 0:
                    return events
                self.calls.append({"id": new_call_id(), "name": t[name_at:stop], "arguments": "", "sent": None,
                                   "at": stop + len(NAME_END), "done": False})
            call = self.calls[-1]
            body = t[call["at"]:]
            end = body.find(END)  # JSON text has no raw newline, so the first "}\n</tool_call>" ends the call
            if end < 0:
                hold = max((k for k in range(1, len(END)) if body.endswith(END[:k])), default=0)
                call["arguments"] = body[:len(body) - hold]
            else:
                call["arguments"], call["done"] = body[:end], True
                self.pos = call["at"] + end + len(END)
            key = (call["name"], call["arguments"])
            earlier = [(c["name"], c["arguments"]) for c in self.calls[:-1]]
            if call["done"] and key in earlier:
                self.calls.pop()
                self.repeated = True
                return events
            if not any(n == key[0] and a.startswith(key[1]) for n, a in earlier):
                events += self._send(len(self.calls) - 1, call)
            if not call["done"]:
                return events

    @staticmethod
    def _send(index: int, call: dict) -> list[tuple]:
        events = []
        if call["sent"] is None:
            events.append(("call", index, call["id"], call["name"]))
            call["sent"] = ""
        piece = call["arguments"][len(call["sent"]):]
        if piece:
            events.append(("arguments", index, piece))
            call["sent"] = call["arguments"]
        return events
