"""Every failure leaves the server as an OpenAI error object, with the right 4xx/5xx status.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}

Routes raise `APIError` subclasses; `exception_handlers()` also translates what Litestar and
msgspec raise themselves (bad JSON, wrong field types, unknown routes, oversize bodies), and turns
anything unexpected into a 500 whose message hides internals: the traceback goes to the log only.
The `openai` SDK maps these statuses to its own exceptions (401 -> AuthenticationError, 404 ->
NotFoundError, 429 -> RateLimitError, ...), so clients can catch them by type.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from server.schemas.common import ErrorBody, ErrorDetail
from server.settings import MIB

log = logging.getLogger("loraforge.errors")
T = TypeVar("T")


class APIError(Exception):
    """An error the client should see, as OpenAI shapes it; subclasses fix the status and type."""

    status_code: int = 400
    type: str = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status_code: int | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type
        self.headers = dict(headers or {})

    def to_body(self) -> ErrorBody:
        return ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code))


class BadRequestError(APIError):
    status_code = 400


class AuthenticationError(APIError):
    # OpenAI answers a bad key with type invalid_request_error and code invalid_api_key.
    status_code = 401

    def __init__(self, message: str, *, code: str = "invalid_api_key") -> None:
        super().__init__(message, code=code, headers={"WWW-Authenticate": "Bearer"})


class NotFoundError(APIError):
    status_code = 404


class ConflictError(APIError):
    status_code = 409

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        # The openai SDK retries 409s unless told not to; a conflict here needs the user to act
        # (cancel a job, pick another name), so retrying would only delay the error.
        super().__init__(message, param=param, code=code, headers={"x-should-retry": "false"})


class RequestTooLargeError(APIError):
    status_code = 413


class UnsupportedMediaTypeError(APIError):
    status_code = 415

    def __init__(self, message: str, *, code: str = "unsupported_media_type") -> None:
        super().__init__(message, code=code)


class RateLimitError(APIError):
    status_code = 429
    type = "rate_limit_error"

    def __init__(self, message: str, *, retry_after_s: int = 1, code: str = "rate_limit_exceeded"):
        super().__init__(message, code=code, headers={"Retry-After": str(retry_after_s)})


class ServerError(APIError):
    status_code = 500
    type = "server_error"


class ServiceUnavailableError(APIError):
    status_code = 503
    type = "server_error"

    def __init__(self, message: str, *, retry_after_s: int | None = None, code: str | None = None):
        headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
        super().__init__(message, code=code, headers=headers)


def error_response(error: APIError) -> Response[ErrorBody]:
    return Response(error.to_body(), status_code=error.status_code, headers=error.headers)


# -- translating what the framework raises ----------------------------------------------------

# msgspec: "Expected `int`, got `str` - at `$.data.max_tokens`" (Litestar wraps the body as
# `data`); the part before " - at" is the problem, the path names the field.
_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_FIELD_IN_MESSAGE = re.compile(r"field `(?P<name>[^`]+)`")


def _param_path(path: str) -> str:
    path = path.removeprefix(".data").removeprefix(".")
    return path


def validation_error(exc: msgspec.ValidationError | str, source: str = "body") -> APIError:
    """The 400 for a request that decoded but does not fit its schema, naming the field.

    `param` is the JSON path of the offending field ("max_tokens", "messages[0].content");
    unknown and missing fields are named even though msgspec reports them at their parent.
    """
    match = _AT.match(str(exc))
    what, path = (match["what"], _param_path(match["path"] or "")) if match else (str(exc), "")
    named = _FIELD_IN_MESSAGE.search(what)
    if named and ("unknown field" in what or "missing required field" in what):
        path = f"{path}.{named['name']}" if path else named["name"]
    if "unknown field" in what:
        message = (
            f"Unrecognized request argument supplied: {path}. Remove it: loraforge accepts the "
            "OpenAI API's fields (see /openapi.json for this server's list)."
        )
    elif "missing required field" in what:
        message = f"Missing required parameter: '{path}'. Add it to the request {source}."
    else:
        where = f" for '{path}'" if path else ""
        message = f"Invalid value{where}: {what}. Fix it and send the request again."
    return BadRequestError(message, param=path or None)


def decode_body(body: bytes, type_: type[T]) -> T:
    """Decode a JSON request body into `type_` (a Struct), raising the same 400s as a route's
    `data` parameter would: for routes that must read the body themselves."""
    if not body.strip():
        raise BadRequestError(
            "The request body is empty: send a JSON object with Content-Type: application/json."
        )
    try:
        # In two steps, because JSON Schema counts 1.0 as an integer and msgspec's strict decoding
        # does not: a generated client (or JavaScript) may send `"n": 1.0`.
        return msgspec.convert(_integral_floats_as_ints(msgspec.json.decode(body)), type=type_)
    except msgspec.ValidationError as e:
        raise validation_error(e) from None
    except msgspec.DecodeError as e:
        raise BadRequestError(
            f"We could not parse the JSON body of your request ({e}). Send valid JSON with "
            "Content-Type: application/json.",
            code="invalid_json",
        ) from None


def _integral_floats_as_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        return int(value)
    if isinstance(value, list):
        return [_integral_floats_as_ints(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral_floats_as_ints(v) for k, v in value.items()}
    return value


def _litestar_validation(exc: ValidationException) -> APIError:
    cause = exc.__cause__
    if isinstance(cause, msgspec.ValidationError):
        if str(cause).startswith("Object missing required field `data`"):
            return BadRequestError(
                "The request body is empty: send a JSON object with Content-Type: application/json."
            )
        return validation_error(cause)
    # Query or path parameters: Litestar lists them in `extra` as {"message", "key", "source"}.
    extra = exc.extra[0] if isinstance(exc.extra, list) and exc.extra else None
    if isinstance(extra, dict):
        key, source = extra.get("key"), extra.get("source", "request")
        return BadRequestError(
            f"Invalid {source} parameter '{key}': {extra.get('message')}. Fix it and retry.",
            param=key,
        )
    return BadRequestError(f"Invalid request: {exc.detail}. Fix it and retry.")


def _is_bad_json(exc: BaseException) -> bool:
    # Litestar re-raises msgspec's DecodeError as a plain ClientException; the cause tells.
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, msgspec.DecodeError) and not isinstance(seen, msgspec.ValidationError):
            return True
        if "JSON is malformed" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> APIError:
    status = exc.status_code
    where = f"{request.method} {request.url.path}"
    if status == 404:
        return NotFoundError(
            f"Invalid URL ({where}): no such route. See /openapi.json for the routes this "
            "server has (OpenAI clients need base_url ending in /v1)."
        )
    if status == 405:
        return APIError(
            f"Invalid method for URL ({where}). See /openapi.json for the methods it accepts.",
            status_code=405,
        )
    if status == 413:  # Litestar's limit: only JSON bodies have one (uploads count their own)
        limit = request.route_handler.resolve_request_max_body_size() or 0
        return RequestTooLargeError(
            f"The request body is larger than this server's limit of {limit / MIB:g} MB for "
            "JSON bodies. Send less (e.g. split a batch of prompts over several requests), or "
            "restart the server with a larger --max-body-mb (env LORAFORGE_MAX_BODY_MB).",
            code="request_too_large",
        )
    if status == 400 and _is_bad_json(exc):
        detail = str(exc.detail).removeprefix("JSON is malformed: ")
        return BadRequestError(
            f"We could not parse the JSON body of your request ({detail}). Send valid JSON "
            "with Content-Type: application/json.",
            code="invalid_json",
        )
    if status >= 500:
        log.error("%s %s failed: %s", request.method, request.url.path, exc.detail, exc_info=exc)
        return ServerError("The server had an error while processing your request. Retry it.")
    return APIError(f"{exc.detail}. Fix the request and retry.", status_code=status)


def handle_api_error(_: Request[Any, Any, Any], exc: APIError) -> Response[ErrorBody]:
    if exc.status_code == 503:  # loading or shutting down: expected, the client retries
        log.info("%s: %s", type(exc).__name__, exc.message)
    elif exc.status_code >= 500:
        log.error("%s: %s", type(exc).__name__, exc.message, exc_info=exc)
    return error_response(exc)


def handle_validation(_: Request[Any, Any, Any], exc: ValidationException) -> Response[ErrorBody]:
    return error_response(_litestar_validation(exc))


def handle_http_exception(
    request: Request[Any, Any, Any], exc: HTTPException
) -> Response[ErrorBody]:
    error = _http_exception(request, exc)
    if exc.headers:
        error.headers = {**exc.headers, **error.headers}
    return error_response(error)


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    if isinstance(exc, RecursionError):  # msgspec decoding a body nested thousands deep
        return error_response(
            BadRequestError(
                "The JSON body is nested too deeply to decode: flatten it (OpenAI requests nest "
                "a few levels at most).",
                code="invalid_json",
            )
        )
    # The traceback is for the operator's log only: it can name files, settings and data.
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(
        ServerError(
            "The server had an error while processing your request. Retry it; if it keeps "
            "failing, the server log has the details."
        )
    )


def exception_handlers() -> dict[type[Exception], Callable[..., Response[ErrorBody]]]:
    """The app's exception handlers: our APIError, Litestar's errors, then everything else."""
    return {
        APIError: handle_api_error,
        ValidationException: handle_validation,
        HTTPException: handle_http_exception,
        Exception: handle_unexpected,
    }
