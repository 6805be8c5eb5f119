"""OpenAI-compatible HTTP API on the edge: /v1/chat/completions, /v1/completions, /v1/models, /health.

One model serves requests one at a time (a lock held by the generating iterator queues them, so a
cancelled stream still finishes its current step before the next request starts); the generator keeps
its KV cache between requests, so a conversation that grows turn by turn reuses its prefix, as
llama.cpp's server does. A streaming client that disconnects stops its generation.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
import uuid
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from cfm_runtime.errors import CfmError, ContextOverflowError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)  # not in OpenAI's API; llama.cpp's server accepts it too
    repetition_penalty: float = Field(default=1.0, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = 1


class ChatRequest(_Request):
    messages: list[dict[str, Any]]


class CompletionRequest(_Request):
    prompt: str | list[str]


def _message_text(content) -> str:
    """OpenAI content is a string or a list of parts; text parts are joined."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if not isinstance(p, dict) or p.get("type") != "text":
                raise ApiError(400, "only text content parts are supported", param="messages")
            parts.append(str(p.get("text", "")))
        return "".join(parts)
    if content is None:
        return ""
    raise ApiError(400, f"message content must be a string or a list of text parts, got {type(content).__name__}",
                   param="messages")


def model_id(model) -> str:
    """A short id for the base model: GGUF basename + size label, else the file or folder name."""
    meta = model.metadata if model.format == "gguf" else {}
    parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
    name = "-".join(parts) if parts else model.path.stem
    return name.lower().replace(" ", "-")


class Engine:
    """The model, its generator and the bricks a model id selects; used by one request at a time.

    Model ids: the base model's, and `base+NAME` for each brick in `bricks` (the brick is put on for
    that request by the generator, and taken off for the next request that does not ask for it)."""

    def __init__(self, model, generator, model_id: str, bricks: list[str] | None = None):
        self.model, self.generator, self.model_id = model, generator, model_id
        self.bricks = {f"{model_id}+{name}": name for name in bricks or []}
        self.busy = threading.Lock()
        self.last_stats = None  # stats of the latest generation (telemetry, tests)

    def model_ids(self) -> list[str]:
        return [self.model_id, *self.bricks]

    def check_model(self, name: str) -> None:
        if name not in self.model_ids():
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(self.model_ids())}",
                           code="model_not_found", param="model")

    def run(self, model_name: str, prompt, sampling: dict, cancel: threading.Event) -> Iterator:
        """Sync iterator of GenerationChunks; stops early when `cancel` is set or when closed."""
        self.last_stats = None
        brick = self.bricks.get(model_name)
        with self.busy:
            done = False
            try:
                for chunk in self.model.stream(prompt, generator=self.generator,
                                               bricks=[(brick, 1.0)] if brick else None, **sampling):
                    self.last_stats = chunk.stats
                    yield chunk
                    if cancel.is_set():
                        break
                else:
                    done = True
            finally:  # closed early (client gone) or cancelled
                if not done and self.last_stats is not None:
                    self.last_stats.finish_reason = "cancelled"


class _ClosingStream(StreamingResponse):
    """Closes the body iterator however the response ends: a client that went away stops generation."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def _sampling(req: _Request, model) -> dict:
    if req.n != 1:
        raise ApiError(400, "n > 1 is not supported; send one request per completion", param="n")
    max_tokens = req.max_completion_tokens or req.max_tokens or model.config.context_length
    return dict(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                repetition_penalty=req.repetition_penalty, seed=req.seed,
                stop=[req.stop] if isinstance(req.stop, str) else (req.stop or []))


def _usage(stats) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens}


def _finish(stats) -> str:
    return "length" if stats.finish_reason == "length" else "stop"


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="cfm-runtime edge API", version="1")

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return exc.response()

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return ApiError(401, "invalid API key; send 'Authorization: Bearer <key>'",
                                code="invalid_api_key").response()
        return await call_next(request)

    async def parse(request: Request, cls):
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        try:
            req = cls.model_validate(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where or None) from None
        engine.check_model(req.model)
        return req

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "cfm-runtime"}
                                           for m in engine.model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        messages = [{"role": str(m.get("role", "")), "content": _message_text(m.get("content"))} for m in req.messages]
        return await complete(request, req, messages, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prompt = req.prompt if isinstance(req.prompt, str) else ("".join(req.prompt) if len(req.prompt) == 1 else None)
        if prompt is None:
            raise ApiError(400, "a list of several prompts is not supported; send one request per prompt",
                           param="prompt")
        return await complete(request, req, prompt, chat=False)

    async def complete(request: Request, req: _Request, prompt, chat: bool):
        sampling = _sampling(req, engine.model)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        try:
            await run_in_threadpool(engine.model.encode_prompt, prompt)  # fail before streaming starts
        except ContextOverflowError as e:
            raise ApiError(400, str(e), code="context_length_exceeded", param="messages" if chat else "prompt") from None
        except CfmError as e:
            raise ApiError(400, str(e)) from None
        if req.stream:
            return _ClosingStream(stream(request, req, prompt, chat, sampling, rid, created),
                                  media_type="text/event-stream")
        cancel = threading.Event()
        try:
            chunks = await run_in_threadpool(lambda: list(engine.run(req.model, prompt, sampling, cancel)))
        except ContextOverflowError as e:
            raise ApiError(400, str(e), code="context_length_exceeded") from None
        except CfmError as e:
            raise ApiError(400, str(e)) from None
        text, stats = "".join(c.text for c in chunks), chunks[-1].stats
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": _finish(stats)}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": _finish(stats)}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": req.model, "choices": [choice], "usage": _usage(stats)}

    async def stream(request: Request, req: _Request, prompt, chat: bool, sampling: dict, rid: str, created: int):
        obj = "chat.completion.chunk" if chat else "text_completion"

        def event(delta_text: str | None, finish: str | None, first: bool = False, usage=None) -> str:
            if chat:
                delta = {"role": "assistant", "content": ""} if first else ({"content": delta_text} if delta_text else {})
                choice = {"index": 0, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_text or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": obj, "created": created, "model": req.model,
                    "choices": [choice] if usage is None else []}
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        cancel = threading.Event()
        it = engine.run(req.model, prompt, sampling, cancel)
        stats = None
        try:
            if chat:
                yield event(None, None, first=True)
            async for chunk in iterate_in_threadpool(it):
                stats = chunk.stats
                if chunk.text:
                    yield event(chunk.text, None)
                if await request.is_disconnected():
                    cancel.set()
            yield event(None, _finish(stats))
            if (req.stream_options or {}).get("include_usage"):
                yield event(None, None, usage=_usage(stats))
            yield "data: [DONE]\n\n"
        except CfmError as e:
            err = {"error": {"message": str(e), "type": "invalid_request_error", "param": None, "code": None}}
            yield f"data: {json.dumps(err)}\n\n"
        finally:
            cancel.set()
            try:
                it.close()
            except ValueError:  # a worker thread is inside its current step; it stops at the next token
                pass

    return app


def build_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None):
    """-> (uvicorn.Server, bound socket); port 0 picks a free port (read it from the socket)."""
    import socket

    import uvicorn

    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        raise CfmError(f"listening on {host} exposes the model beyond this machine; pass --api-key KEY")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, api_key), log_level="warning"))
    return server, sock


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          ready: Callable[[int], None] | None = None) -> None:
    """Run the API until interrupted; `ready(port)` is called once the socket is bound."""
    server, sock = build_server(engine, host, port, api_key)
    if ready:
        ready(sock.getsockname()[1])
    server.run(sockets=[sock])
