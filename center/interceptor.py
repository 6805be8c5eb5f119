"""The one place where requests are authenticated and exceptions become gRPC statuses."""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import traceback
from pathlib import Path

import grpc

from cfm_runtime.errors import CfmError

from cfm_runtime.protocol.errors import InvalidArgument, Unauthenticated, status_for

log = logging.getLogger("cfm.center")
EXEMPT = ("/grpc.health.v1.Health/", "/grpc.reflection.")  # standard clients and probes carry no token


class Tokens:
    """Bearer tokens accepted by the center; a caller's identity is a hash of its token."""

    def __init__(self, tokens: list[str]):
        self.digests = {hashlib.sha256(t.encode()).hexdigest() for t in tokens}

    @classmethod
    def load(cls, path: str | None = None, env: str = "CFM_CENTER_TOKENS") -> "Tokens | None":
        """Tokens from a file (one per line, # comments) and/or the env var (comma-separated); None = no auth."""
        tokens = [t.strip() for t in os.environ.get(env, "").split(",") if t.strip()]
        if path:
            p = Path(path)
            if not p.is_file():
                raise CfmError(f"token file {path} does not exist; give a file with one token per line")
            tokens += [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            if not tokens:
                raise CfmError(f"token file {path} holds no tokens")
        return cls(tokens) if tokens else None

    def caller(self, metadata) -> str:
        """The caller id for request metadata, or Unauthenticated."""
        values = [v for k, v in metadata or () if k == "authorization"]
        if not values:
            raise Unauthenticated("this center requires a token: send metadata 'authorization: Bearer <token>'")
        scheme, _, token = values[0].partition(" ")
        digest = hashlib.sha256(token.strip().encode()).hexdigest()
        if scheme.lower() != "bearer" or not any(secrets.compare_digest(digest, d) for d in self.digests):
            raise Unauthenticated("the bearer token is not accepted by this center")
        return digest


def caller_id(context, tokens: Tokens | None) -> str:
    """Identity a session is bound to: the token's hash, or '' when the center runs without auth."""
    return tokens.caller(context.invocation_metadata()) if tokens else ""


class _Garbage:
    """A request whose bytes did not parse as the expected message."""

    def __init__(self, error: Exception):
        self.error = error


def _safe(deserializer):
    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:  # protobuf's DecodeError and friends
            return _Garbage(e)
    return parse


def _check(request):
    if isinstance(request, _Garbage):
        raise InvalidArgument(f"the request bytes are not a valid protobuf message ({request.error}); "
                              "use the cfm.v1 stubs")
    return request


async def _requests(iterator):
    async for r in iterator:
        yield _check(r)


async def _abort(context, exc: Exception, method: str):
    code, message = status_for(exc)
    if code == grpc.StatusCode.INTERNAL:
        log.exception("%s failed", method)
    else:
        log.info("%s: %s: %s", method, code.name, message)
    # the failed call's frames hold its messages (MBs of hidden states) in a reference cycle with this
    # exception: free them now rather than at the next full garbage collection
    traceback.clear_frames(exc.__traceback__)
    await context.abort(code, message)


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Checks the bearer token (when configured), refuses unparsable bytes with INVALID_ARGUMENT and
    turns any exception a handler raises into its gRPC status (see errors.status_for)."""

    def __init__(self, tokens: Tokens | None):
        self.tokens = tokens

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(EXEMPT):
            return handler
        method = details.method
        if handler.request_streaming and handler.response_streaming:
            return handler._replace(stream_stream=self._stream(handler.stream_stream, method),
                                    request_deserializer=_safe(handler.request_deserializer))
        if not handler.request_streaming and not handler.response_streaming:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, method),
                                    request_deserializer=_safe(handler.request_deserializer))
        return handler

    def _authenticate(self, context):
        if self.tokens:
            self.tokens.caller(context.invocation_metadata())

    def _unary(self, behavior, method):
        async def call(request, context):
            try:
                self._authenticate(context)
                return await behavior(_check(request), context)
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort(context, e, method)
        return call

    def _stream(self, behavior, method):
        async def call(requests, context):
            try:
                self._authenticate(context)
                async for response in behavior(_requests(requests), context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as e:
                await _abort(context, e, method)
        return call
