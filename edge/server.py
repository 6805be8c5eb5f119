"""OpenAI-compatible HTTP API on the edge: /v1/chat/completions, /v1/completions, /v1/models, /health.

One model serves requests one at a time, in arrival order: a request waits for its turn in an asyncio
queue (`edge.admission`) that holds no thread, and at most `max_queue` wait (more get 429 with
`Retry-After`). The admitted request's generation runs step by step on the engine's own thread, so
waiting requests never take threads from it. The generator keeps its KV cache between requests, so a
conversation that grows turn by turn reuses its prefix, as llama.cpp's server does. A client that goes
away, streaming or not, stops its generation at the next token and frees the engine.

Before a request reaches the engine: the Host, key and content type are checked (`edge.guard`), the body
is read up to a size limit (413), parsed, checked for lone surrogates and field ranges (400), and the
prompt's length is bounded before tokenizing. Every error is OpenAI's JSON shape; a stream that fails
after it started ends with an error event and `[DONE]`. The request fields, their translation into the
runtime's prompt and sampling, and the response bodies are `edge.openai_api`'s; this module is the transport.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import logging
import time
from typing import Awaitable, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from cfm_runtime.errors import CfmError, ContextOverflowError, NonFiniteError
from cfm_runtime.generate import GenerationChunk
from cfm_runtime.protocol.net import is_loopback
from cfm_runtime.sampling import SamplingParams

from .admission import Admission, QueueFull
from .guard import LOOPBACK_NAMES, Guard
from .openai_api import (Answer, ApiError, ChatRequest, CompletionRequest, Prepared, message_text, parse_request,
                         prepare_chat, prepare_completion)

log = logging.getLogger("cfm.serve")
CLOSE = {"Connection": "close"}  # after a 413: the server reads no more of the body
MAX_BODY_BYTES = 2**20  # default request body limit; a context of prompt text is ~660 KB at most


class ClientGone(Exception):
    """The client closed its connection before the answer was ready."""


def model_id(model) -> str:
    """A short id for the base model: GGUF basename + size label, else the file or folder name."""
    meta = model.metadata if model.format == "gguf" else {}
    parts = [str(meta[k]) for k in ("general.basename", "general.size_label") if meta.get(k)]
    name = "-".join(parts) if parts else model.path.stem
    return name.lower().replace(" ", "-")


class Engine:
    """The model, its generator and the bricks a model id selects; one generation at a time.

    Model ids: the base model's, and `base+NAME` for each brick in `bricks` (the brick is put on for
    that request by the generator, and taken off for the next request that does not ask for it).
    Generation runs on the engine's one thread (`worker`); requests wait for it in `admission`."""

    def __init__(self, model, generator, model_id: str, bricks: list[str] | None = None, max_queue: int = 32):
        self.model, self.generator, self.model_id = model, generator, model_id
        self.bricks = {f"{model_id}+{name}": name for name in bricks or []}
        self.admission = Admission(max_queue)
        self.worker = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfm-engine")
        self.last_stats = None  # stats of the latest generation (telemetry, tests)
        tok = model.tokenizer
        # no token is longer than this: a prompt of more bytes than context x this cannot fit
        self.max_token_bytes = max(len(tok.token_bytes(i)) for i in range(tok.vocab_size))

    @property
    def busy(self) -> bool:
        """A request holds the engine (generating, or closing its generation)."""
        return self.admission.held

    def model_ids(self) -> list[str]:
        return [self.model_id, *self.bricks]

    def check_model(self, name: str) -> None:
        if name not in self.model_ids():
            raise ApiError(404, f"model {name!r} does not exist; available: {', '.join(self.model_ids())}",
                           code="model_not_found", param="model")

    def check_prompt_size(self, texts: list[str], param: str) -> None:
        """Refuse a prompt that cannot fit the context whatever its tokens, before tokenizing it."""
        limit = self.model.config.context_length * self.max_token_bytes
        size = sum(len(t.encode("utf-8")) for t in texts)
        if size > limit:
            raise ApiError(400, f"the prompt has {size} bytes; no prompt over {limit} bytes fits the model's "
                                f"context of {self.model.config.context_length} tokens; shorten it",
                           code="context_length_exceeded", param=param)

    async def begin(self, model_name: str, ids: list[int], params: SamplingParams) -> "Turn":
        """Wait for the engine (QueueFull when too many wait), then start a generation on its thread."""
        await self.admission.acquire()
        return Turn(self, self.run(model_name, ids, params))

    def run(self, model_name: str, ids: list[int], params: SamplingParams) -> Iterator[GenerationChunk]:
        """Sync iterator of GenerationChunks, stepped on the engine's thread; closing it cancels."""
        self.last_stats = None
        brick = self.bricks.get(model_name)
        done = False
        try:
            for chunk in self.generator.stream(ids, params, [(brick, 1.0)] if brick else None):
                self.last_stats = chunk.stats
                yield chunk
            done = True
        finally:  # closed early: the client went away
            if not done and self.last_stats is not None and self.last_stats.finish_reason is None:
                self.last_stats.finish_reason = "cancelled"


class Turn:
    """One admitted request's generation: `next()` runs one step on the engine's thread; `close()` ends it
    (after the step in flight) and hands the engine to the next request."""

    def __init__(self, engine: Engine, chunks: Iterator[GenerationChunk]):
        self.engine, self.chunks, self.closed = engine, chunks, False

    async def next(self) -> GenerationChunk | None:
        """The next chunk, or None after the last one."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.engine.worker, next, self.chunks, None)

    def close(self) -> None:
        """Stop the generation and release the engine; safe to call more than once, from any coroutine."""
        if not self.closed:
            self.closed = True
            self.engine.worker.submit(self._finish)

    def _finish(self) -> None:
        try:
            self.chunks.close()
        finally:
            self.engine.admission.release()


class _ClosingStream(StreamingResponse):
    """Closes the body iterator however the response ends: a client that went away stops generation."""

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()


def error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


def api_error(exc: Exception, param: str | None = None) -> ApiError:
    """Any exception of a request -> the ApiError it is answered with."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, QueueFull):
        return ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": str(exc.retry_after)})
    if isinstance(exc, ContextOverflowError):
        return ApiError(400, str(exc), code="context_length_exceeded", param=param)
    if isinstance(exc, NonFiniteError):
        return ApiError(500, str(exc), type="server_error", code="non_finite_logits")
    if isinstance(exc, CfmError):
        return ApiError(400, str(exc))
    log.error("request failed", exc_info=exc)
    return ApiError(500, f"internal error ({type(exc).__name__}: {exc}); see the server's log", type="server_error")


async def _wait_disconnect(request: Request) -> None:
    """Returns when the client closes its connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work: Awaitable):
    """The result of `work`; if the client goes away first, `work` is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 past `limit` bytes (by its Content-Length, or while reading)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body has {int(declared)} bytes; the limit is {limit} "
                            "(cfm serve --max-body-kb)", code="request_too_large", headers=CLOSE)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes (cfm serve --max-body-kb)",
                           code="request_too_large", headers=CLOSE)
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> dict:
    """A JSON object whose strings are all valid Unicode (a lone surrogate like "\\ud800" is not)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, an integer of over 4300 digits, deep nesting
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"the request body holds a lone UTF-16 surrogate ({e.object[e.start:e.end]!r}), "
                            "which is not a character; send valid Unicode text") from None
    return body


def create_app(engine: Engine, api_key: str | None = None, allowed_hosts: list[str] | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app. `api_key`: required on every route but /health (docs included); `allowed_hosts`: the
    Host names answered (None: any); `max_body_bytes`: larger request bodies get 413."""
    if max_body_bytes < 1024:
        raise CfmError(f"the request body limit must be at least 1 KiB, got {max_body_bytes} bytes")
    app = FastAPI(title="cfm-runtime edge API", version="1")
    app.add_middleware(Guard, api_key=api_key, allowed_hosts=allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError):
        return error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException):
        return error_response(ApiError(exc.status_code, str(exc.detail),
                                       code="not_found" if exc.status_code == 404 else None, headers=exc.headers))

    @app.exception_handler(Exception)
    async def _internal(_request, exc: Exception):
        return error_response(api_error(exc))

    async def parse(request: Request, cls):
        req = parse_request(parse_json(await read_body(request, max_body_bytes)), cls)
        engine.check_model(req.model)
        return req

    @app.get("/health")
    async def health():
        a = engine.admission
        return {"status": "ok", "model": engine.model_id, "busy": a.held, "waiting": a.waiting,
                "max_queue": a.max_waiting}

    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        return {"object": "list", "data": [{"id": m, "object": "model", "created": now, "owned_by": "cfm-runtime"}
                                           for m in engine.model_ids()]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        req = await parse(request, ChatRequest)
        engine.check_prompt_size([message_text(m) for m in req.messages], "messages")
        prepared = await run_in_threadpool(prepare_chat, req, engine.model)  # a grammar may take a while
        return await complete(request, req, prepared, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        req = await parse(request, CompletionRequest)
        prepared = await run_in_threadpool(prepare_completion, req, engine.model)
        if isinstance(prepared.prompt, str):
            engine.check_prompt_size([prepared.prompt], "prompt")
        return await complete(request, req, prepared, chat=False)

    async def complete(request: Request, req, prepared: Prepared, chat: bool):
        param = "messages" if chat else "prompt"
        try:
            ids = prepared.prompt if isinstance(prepared.prompt, list) and chat is False else \
                await run_in_threadpool(engine.model.encode_prompt, prepared.prompt, prepared.tools)
            if len(ids) >= engine.model.config.context_length:
                raise ContextOverflowError(f"the prompt has {len(ids)} tokens but the model's context holds "
                                           f"{engine.model.config.context_length}; shorten the prompt")
            answer = Answer(req, chat, engine.model.tokenizer, prepared, ids)
            if req.stream:
                return await stream(request, answer, ids, prepared.params)
            return await unless_disconnected(request, whole(answer, ids, prepared.params))
        except ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it
        except Exception as e:
            raise api_error(e, param) from None

    async def whole(answer: Answer, ids: list[int], params: SamplingParams) -> dict:
        turn = await engine.begin(answer.req.model, ids, params)
        try:
            stats = None
            while not answer.stopped and (chunk := await turn.next()) is not None:
                answer.take(chunk)
                stats = chunk.stats
            return answer.whole(stats)
        finally:
            turn.close()

    async def stream(request: Request, answer: Answer, ids: list[int], params: SamplingParams):
        """Headers go out once the request holds the engine and its prompt ran: errors until then are statuses."""
        turn = await unless_disconnected(request, engine.begin(answer.req.model, ids, params))
        try:
            first = await unless_disconnected(request, turn.next())
        except BaseException:
            turn.close()
            raise
        return _ClosingStream(events(answer, turn, first), media_type="text/event-stream")

    async def events(answer: Answer, turn: Turn, chunk: GenerationChunk | None):
        stats = chunk.stats if chunk is not None else None
        try:
            for event in answer.opening(chunk):
                yield event
            while chunk is not None:
                for event in answer.events(chunk):
                    yield event
                stats = chunk.stats
                chunk = None if answer.stopped else await turn.next()
            for event in answer.closing(stats):
                yield event
        except Exception as e:
            yield f"data: {json.dumps(api_error(e).body())}\n\n"
        finally:
            turn.close()
        yield "data: [DONE]\n\n"

    return app


def build_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
                 allow_hosts: list[str] | None = None, max_body_bytes: int = MAX_BODY_BYTES):
    """-> (uvicorn.Server, bound socket); port 0 picks a free port (read it from the socket).

    On a loopback bind only loopback Host names and `allow_hosts` are answered; elsewhere an API key is
    required, and `allow_hosts`, if given, lists the names answered."""
    import socket

    import uvicorn

    if not is_loopback(host) and not api_key:
        raise CfmError(f"listening on {host} exposes the model beyond this machine; pass --api-key KEY")
    if is_loopback(host):
        allowed = [*LOOPBACK_NAMES, *(allow_hosts or [])]
    else:
        allowed = list(allow_hosts) if allow_hosts else None
    app = create_app(engine, api_key, allowed, max_body_bytes)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # connections made once the port is announced wait here until uvicorn accepts them
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    return server, sock


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          ready: Callable[[int], None] | None = None, allow_hosts: list[str] | None = None,
          max_body_bytes: int = MAX_BODY_BYTES) -> None:
    """Run the API until interrupted; `ready(port)` is called once the socket listens."""
    server, sock = build_server(engine, host, port, api_key, allow_hosts, max_body_bytes)
    if ready:
        ready(sock.getsockname()[1])
    server.run(sockets=[sock])
