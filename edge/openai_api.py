"""OpenAI's chat and completions API in this runtime's terms: strict request models, their translation into a
prompt and `SamplingParams` (grammar, penalties, bias, log-probabilities), and the response bodies.

Every field of a request is either implemented or refused with a 400 that names it; wrong types are refused
(no `"stream": "yes"`, no `"max_tokens": true`). Structured output (`response_format`) and tool calls
(`tools`, `tool_choice`) are decoded under a grammar (`cfm_runtime.grammar`, `cfm_runtime.tools`), so a JSON
answer parses and a call's arguments match its function's schema. `user` is accepted and has no effect.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cfm_runtime import tools as toolkit
from cfm_runtime.errors import CfmError
from cfm_runtime.grammar import ANY_OBJECT, Grammar
from cfm_runtime.sampling import SamplingParams, TokenLogprob

MAX_SEED = 2**63 - 1
# fields of OpenAI's API this server does not implement, and what to do instead
UNSUPPORTED = {
    "functions": "use tools", "function_call": "use tool_choice", "audio": "answers are text",
    "modalities": "answers are text", "prediction": "speculation is on by default (cfm serve --speculate)",
    "reasoning_effort": "the model does not reason in a separate channel", "web_search_options": "no web search",
    "service_tier": "there is one tier", "store": "nothing is stored", "metadata": "nothing is stored",
    "verbosity": "ask in the prompt", "suffix": "no insertion (fill-in-the-middle) mode",
}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Request(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    # left out, the sampling fields take llama.cpp's defaults, as its server and `cfm generate` do (OpenAI's 1.0 and
    # no top-k let a small model wander off into random tokens); top_k: not OpenAI's, llama.cpp's server takes it
    temperature: float = Field(default=0.8, ge=0, le=2)
    top_p: float = Field(default=0.95, gt=0, le=1)
    top_k: int = Field(default=40, ge=0)
    repetition_penalty: float = Field(default=1.0, gt=0)  # llama.cpp's (not OpenAI's)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    user: str | None = None
    grammar: str | None = None  # llama.cpp's server extension: GBNF (or Lark) the answer must follow


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str = ""


class CallIn(_Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[CallIn] | None = None
    tool_call_id: str | None = None
    # what clients send back when they append a response's message as is; only empty values are taken
    refusal: None = None
    audio: None = None
    function_call: None = None
    annotations: list[Any] | None = Field(default=None, max_length=0)


class JsonSchemaFormat(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 with echo scores the prompt
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    best_of: int = Field(default=1, ge=1)


def parse_request(body: dict, cls: type[_Request]) -> _Request:
    """The request, or an ApiError naming the first field that is unknown, unsupported or of the wrong type."""
    for name, instead in UNSUPPORTED.items():
        if name in body and body[name] not in (None, False) and not (name == "suffix" and body[name] == ""):
            raise ApiError(400, f"'{name}' is not supported by this server ({instead}); remove it", param=name,
                           code="unsupported_parameter")
        body.pop(name, None)  # null or false: the default, nothing to do
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        if first["type"] == "extra_forbidden":
            raise ApiError(400, f"'{where}' is not a field this server knows; remove it", param=where,
                           code="unknown_parameter") from None
        raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None


class Prepared:
    """A request in the runtime's terms: the prompt (messages or text or ids), the tools, the sampling."""

    def __init__(self, prompt, tools: list[dict] | None, params: SamplingParams, calls: bool):
        self.prompt, self.tools, self.params = prompt, tools, params
        self.calls = calls  # the answer may be tool calls (read it with a CallStream)


def prepare_chat(req: ChatRequest, model) -> Prepared:
    if req.top_logprobs is not None and not req.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    fmt = req.response_format
    schema = None
    if fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        schema = fmt.json_schema.schema_
    elif fmt is not None and fmt.type == "json_object":
        schema = ANY_OBJECT
    try:  # with tool_choice "required" or a named function the answer is calls only: the format does not apply
        tp = toolkit.tool_prompt(model.tokenizer, [_plain(m) for m in req.messages], req.tools, req.tool_choice,
                                 req.parallel_tool_calls, schema)
    except toolkit.ToolsError as e:
        raise ApiError(400, str(e), param=e.field) from None
    if req.grammar is not None and (schema is not None or tp.grammar is not None):
        raise ApiError(400, "grammar cannot be combined with response_format or tools; use one of them",
                       param="grammar")
    if req.grammar is not None:
        grammar = _checked(Grammar.text, req.grammar, "grammar", param="grammar")
    elif tp.grammar is not None:
        grammar = tp.grammar
    elif fmt is not None and fmt.type == "json_schema":
        js = fmt.json_schema
        grammar = _checked(Grammar.json_schema, schema, js.strict is not False, js.name, param="response_format")
    elif schema is not None:
        grammar = _checked(Grammar.json_object, param="response_format")
    else:
        grammar = None
    params = _params(req, model, req.max_completion_tokens or req.max_tokens, grammar,
                     (req.top_logprobs or 0) if req.logprobs else None, False)
    return Prepared(tp.messages, tp.template_tools, params, calls=tp.grammar is not None)


def prepare_completion(req: CompletionRequest, model) -> Prepared:
    if req.best_of != 1:
        raise ApiError(400, "best_of > 1 is not supported; send one request per completion", param="best_of")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise ApiError(400, "a list of several prompts is not supported; send one request per prompt",
                           param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, list):
        prompt = _checked(model.check_ids, prompt, param="prompt")
        if not prompt:
            raise ApiError(400, "the prompt is empty", param="prompt")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens 0 generates nothing; it is for scoring the prompt with echo and logprobs",
                       param="max_tokens")
    grammar = None if req.grammar is None else _checked(Grammar.text, req.grammar, "grammar", param="grammar")
    params = _params(req, model, req.max_tokens, grammar, req.logprobs, req.echo and req.logprobs is not None)
    return Prepared(prompt, None, params, calls=False)


def _params(req: _Request, model, max_tokens: int | None, grammar, logprobs: int | None,
            prompt_logprobs: bool) -> SamplingParams:
    if req.n != 1:
        raise ApiError(400, "n > 1 is not supported; send one request per completion", param="n")
    bias = {}
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit():
            raise ApiError(400, f"logit_bias keys are token ids, got {key!r}", param="logit_bias")
        bias[int(key)] = value
    params = _checked(SamplingParams, max_tokens=model.config.context_length if max_tokens is None else max_tokens,
                      temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                      repetition_penalty=req.repetition_penalty, presence_penalty=req.presence_penalty,
                      frequency_penalty=req.frequency_penalty, logit_bias=bias, seed=req.seed,
                      stop=[req.stop] if isinstance(req.stop, str) else (req.stop or []), logprobs=logprobs,
                      prompt_logprobs=prompt_logprobs, grammar=grammar, param=None)
    _checked(params.check_vocab, model.config.vocab_size, param="logit_bias")
    return params


def _checked(fn, *args, param: str | None, **kwargs):
    """fn(...), its CfmError answered as a 400 about `param`."""
    try:
        return fn(*args, **kwargs)
    except CfmError as e:
        raise ApiError(400, str(e), param=param) from None


def message_text(m: Message) -> str:
    """A message's content as text (its text parts joined)."""
    return "".join(p.text for p in m.content) if isinstance(m.content, list) else m.content or ""


def _plain(m: Message) -> dict:
    """A message as a dict the tools module reads: content as text, tool calls as OpenAI's dicts."""
    content = message_text(m)
    if m.role == "tool" and m.tool_call_id is None:
        raise ApiError(400, "a message with role 'tool' needs tool_call_id", param="messages")
    if m.tool_calls and m.role != "assistant":
        raise ApiError(400, "only assistant messages carry tool_calls", param="messages")
    out: dict = {"role": m.role, "content": content}
    if m.tool_calls:
        out["tool_calls"] = [c.model_dump() for c in m.tool_calls]
    return out


def finish_reason(stats, calls: bool) -> str:
    if calls:
        return "tool_calls"
    return "length" if stats.finish_reason == "length" else "stop"


def usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


class Answer:
    """The response bodies of one request: a whole completion, or its stream's events (`events(chunk)` for
    each chunk, then `closing(stats)`). A chat answer that may be tool calls is read by a CallStream; once it
    repeats a call, `stopped` tells the server to stop generating."""

    def __init__(self, req: _Request, chat: bool, tokenizer, prepared: Prepared, prompt_ids: list[int]):
        self.req, self.chat, self.tokenizer = req, chat, tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.reader = toolkit.CallStream() if prepared.calls else None
        prompt_text = prepared.prompt if isinstance(prepared.prompt, str) else tokenizer.decode(prompt_ids)
        self.echo = prompt_text if getattr(req, "echo", False) else ""
        self.first_token = prompt_ids[0]
        self._offset = 0 if self.echo else len(prompt_text)  # text_offset counts from the prompt's start
        self.logprobs = prepared.params.logprobs is not None
        self.text: list[str] = []
        self.entries: list[TokenLogprob] = []
        self.prompt_entries: list[TokenLogprob] | None = None

    @property
    def stopped(self) -> bool:
        return self.reader is not None and self.reader.repeated

    # ------------------------------------------------------------ whole
    def take(self, chunk) -> None:
        """Collect a chunk of a non-streamed answer."""
        self.text.append(chunk.text)
        self.entries += chunk.logprobs
        if chunk.prompt_logprobs is not None:
            self.prompt_entries = chunk.prompt_logprobs
        if self.reader is not None and chunk.text:
            self.reader.push(chunk.text)

    def whole(self, stats) -> dict:
        text = "".join(self.text)
        calls = []
        if self.reader is not None:
            self.reader.finish()
            if self.reader.complete:
                calls = self.reader.tool_calls()
        if self.chat:
            message: dict = {"role": "assistant", "content": None if calls else text}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            choice = {"index": 0, "message": message, "logprobs": self._chat_logprobs(self.entries),
                      "finish_reason": finish_reason(stats, bool(calls))}
        else:
            choice = {"index": 0, "text": self.echo + text, "logprobs": self._completion_logprobs(self.entries, True),
                      "finish_reason": finish_reason(stats, False)}
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": [choice], "usage": usage(stats)}

    # ------------------------------------------------------------ streamed
    def opening(self, chunk) -> list[str]:
        """The first events: the assistant's role (chat); the prompt's text and scores (completions with echo)."""
        if self.chat:
            return [self._event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}])]
        if self.echo:
            self.prompt_entries = chunk.prompt_logprobs if chunk is not None else None
            return [self._event([{"index": 0, "text": self.echo, "logprobs": self._completion_logprobs([], True),
                                  "finish_reason": None}])]
        return []

    def events(self, chunk) -> list[str]:
        if not chunk.text and not chunk.logprobs:
            return []
        if not self.chat:
            return [self._event([{"index": 0, "text": chunk.text, "finish_reason": None,
                                  "logprobs": self._completion_logprobs(chunk.logprobs, False)}])]
        lp = self._chat_logprobs(chunk.logprobs)
        if self.reader is None:
            return [self._delta({"content": chunk.text}, lp)]
        out = []
        for ev in self.reader.push(chunk.text):
            out.append(self._delta(self._call_delta(ev), lp))
            lp = None  # a chunk's scores go with its first event
        if lp is not None:  # text held back (it may be a call): its scores wait for no one
            out.append(self._delta({}, lp))
        return out

    def closing(self, stats) -> list[str]:
        out = []
        calls = False
        if self.reader is not None:
            out = [self._delta(self._call_delta(ev), None) for ev in self.reader.finish()]
            calls = self.reader.complete
        out.append(self._event([{"index": 0, **({"delta": {}} if self.chat else {"text": ""}), "logprobs": None,
                                 "finish_reason": finish_reason(stats, calls)}]))
        if self.req.stream_options is not None and self.req.stream_options.include_usage:
            out.append(self._event([], usage=usage(stats)))
        return out

    @staticmethod
    def _call_delta(ev: tuple) -> dict:
        if ev[0] == "content":
            return {"content": ev[1]}
        if ev[0] == "call":
            return {"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                    "function": {"name": ev[3], "arguments": ""}}]}
        return {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}

    def _delta(self, delta: dict, logprobs) -> str:
        return self._event([{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": None}])

    def _event(self, choices: list, **extra) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.req.model, "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    # ------------------------------------------------------------ log-probabilities
    def _token(self, token: int) -> tuple[str, list[int]]:
        b = self.tokenizer.token_bytes(token)
        return b.decode("utf-8", errors="replace"), list(b)

    def _chat_logprobs(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.logprobs:
            return None
        content = []
        for e in entries:
            text, raw = self._token(e.token)
            top = [dict(zip(("token", "bytes"), self._token(t)), logprob=lp) for t, lp in e.top]
            content.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
        return {"content": content, "refusal": None}

    def _completion_logprobs(self, entries: list[TokenLogprob], with_prompt: bool) -> dict | None:
        """Completions' shape: tokens, token_logprobs, top_logprobs ({token: logprob}), text_offset. With echo
        the prompt's tokens come first; the first has no log-probability (null)."""
        if not self.logprobs:
            return None
        rows: list[tuple[str, float | None, dict | None]] = []
        if with_prompt and self.echo and self.prompt_entries is not None:
            rows.append((self._token(self.first_token)[0], None, None))
            rows += [(self._token(e.token)[0], e.logprob, self._top(e)) for e in self.prompt_entries]
        rows += [(self._token(e.token)[0], e.logprob, self._top(e)) for e in entries]
        offsets, at = [], self._offset
        for text, _, _ in rows:
            offsets.append(at)
            at += len(text)
        self._offset = at
        return {"tokens": [r[0] for r in rows], "token_logprobs": [r[1] for r in rows],
                "top_logprobs": [r[2] for r in rows], "text_offset": offsets}

    def _top(self, e: TokenLogprob) -> dict:
        return {self._token(t)[0]: lp for t, lp in e.top}
