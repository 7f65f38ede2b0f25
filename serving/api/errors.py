"""Error answers in SGLang's shapes, whatever went wrong: the native routes' `{"error": {"message"}}` and
the OpenAI routes' flat error object. An unexpected exception is a 500 in the same shape, its traceback logged."""

import logging
from http import HTTPStatus

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException

from kiln.serving.api.engine_client import EngineUnavailable
from kiln.serving.sampling_params import InvalidRequest

log = logging.getLogger(__name__)

_OPENAI_TYPES = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError", 503: "ServiceUnavailableError"}


def json_response(content: object, status: int = 200) -> Response:
    return Response(content=msgspec.json.encode(content), status_code=status, media_type="application/json")


def error_body(path: str, message: str, status: int) -> dict[str, object]:
    if path.startswith("/v1/"):
        kind = _OPENAI_TYPES.get(status) or HTTPStatus(status).phrase.replace(" ", "") + "Error"
        return {"object": "error", "message": message, "type": kind, "param": None, "code": status}
    return {"error": {"message": message}}


def error_response(request: Request, message: str, status: int = 400) -> Response:
    return json_response(error_body(request.url.path, message, status), status)


def on_invalid(request: Request, exc: InvalidRequest) -> Response:
    return error_response(request, str(exc), 400)


def on_unavailable(request: Request, exc: EngineUnavailable) -> Response:
    return error_response(request, str(exc), 503)


def on_http_error(request: Request, exc: HTTPException) -> Response:
    return error_response(request, exc.detail, exc.status_code)


def on_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("%s %s failed", request.method, request.url.path)
    return error_response(request, f"Internal server error: {type(exc).__name__}: {exc}", 500)


EXCEPTION_HANDLERS = {
    InvalidRequest: on_invalid,
    EngineUnavailable: on_unavailable,
    HTTPException: on_http_error,
    Exception: on_unexpected,
}
