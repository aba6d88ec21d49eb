"""Every error the server answers, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``.

``ApiError`` is raised by the HTTP layer; ``api_error`` maps anything else a
request raised (the library's ``OptionError`` with its ``param``, a bad value, a
failure) onto one; ``add_error_handlers`` installs the handlers, down to a
catch-all, so that no request gets a plain-text ``Internal Server Error``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt2lite.errors import ContextLengthError, OptionError

__all__ = ["KINDS", "TOO_LONG", "ApiError", "add_error_handlers", "api_error", "error_response", "unknown_model"]

log = logging.getLogger("gpt2lite.serve")

KINDS = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error", 429: "rate_limit_error",
         500: "server_error", 503: "server_error"}
TOO_LONG = "context_length_exceeded"  # OpenAI's code for a prompt that does not fit


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict[str, Any]:
        """``{"error": {...}}``."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def error_response(status: int, message: str, param: str | None = None,
                   kind: str = "invalid_request_error") -> JSONResponse:
    """An error response that is not raised (the ASGI gate answers before any route runs)."""
    return JSONResponse(ApiError(status, message, param, kind).body(), status)


def unknown_model(name: str, served: str) -> ApiError:
    """The 404 for a request naming another model than the one served."""
    return ApiError(404, f"the model {name!r} does not exist here; this server serves {served!r}", "model",
                    KINDS[404])


def api_error(exc: BaseException, params: Mapping[str, str] | None = None) -> ApiError:
    """A failed request's error: bad input is a 400 naming its field, anything else a 500.

    ``params`` maps the library's option names onto the request's field names
    (``max_new_tokens`` -> ``max_tokens``).
    """
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, OptionError):
        param = (params or {}).get(exc.param, exc.param)
        return ApiError(400, str(exc), param, code=TOO_LONG if isinstance(exc, ContextLengthError) else None)
    if isinstance(exc, (ValueError, TypeError)):
        return ApiError(400, str(exc))
    if isinstance(exc, ImportError):  # an extra the server was installed without (structured output)
        return ApiError(400, str(exc))
    return ApiError(500, f"generation failed: {type(exc).__name__}: {exc}", kind=KINDS[500])


def add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's JSON shape, with a message that names the problem."""

    @app.exception_handler(ApiError)
    async def known(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"no such endpoint: {request.method} {request.url.path}" if exc.status_code in (404, 405) \
            else str(exc.detail)
        return error_response(exc.status_code, message, kind=KINDS.get(exc.status_code, "invalid_request_error"))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', 'error')}")
        unknown = [str(e["loc"][-1]) for e in errors if e.get("type") == "extra_forbidden"]
        if unknown:
            return error_response(400, f"unknown field(s) {unknown}", unknown[0])
        param = _field(first.get("loc", ()))
        if param is None and first.get("type") == "missing":
            return error_response(400, "the request has no body: send a JSON object")
        if param is None:
            return error_response(400, "the body must be a JSON object, sent as content-type: application/json")
        if param == "prompt":  # pydantic reports the union's first branch, which says little
            return error_response(400, "prompt must be a string, a list of strings, a list of token ids (ints) or a "
                                       "list of lists of token ids", param)
        return error_response(400, f"invalid {param or 'request'}: {first.get('msg', 'bad value')}", param)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not bad input: logged with its traceback, answered in the same shape as every other error.
        log.exception("%s %s failed", request.method, request.url.path)
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", kind=KINDS[500])


def _field(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """The request field an error is about, as the client wrote it: ``messages.0.content``.

    pydantic appends the branch of a union it tried (``prompt.str``,
    ``prompt.list[int]``, ``messages.0.content.function-after[...]``): a type,
    not a field of the request.
    """
    parts = [str(x) for x in loc if x != "body"]
    while parts and (parts[-1] in _TYPE_NAMES or "[" in parts[-1]):
        parts.pop()
    return ".".join(parts) or None


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "dict", "list", "none", "tuple"})
