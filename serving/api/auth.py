"""API keys, as SGLang checks them: `--api-key` for every route, `--admin-api-key` for the routes that change
server state (marked `opt={"auth": ADMIN}`); /health* and /metrics stay open for probes and scrapers.

A key comes as `Authorization: Bearer <key>` (what the OpenAI SDK sends for `api_key=`) or as `x-api-key`.
With an admin key set, only it opens the admin routes; without one they take the API key. The admin key
does not open the other routes. Keys are compared in constant time and never echoed.
"""

import secrets
from typing import Any

from litestar import Request, Response

from kiln.serving.api.errors import json_response

ADMIN = "admin"
OPEN_PREFIXES = ("/health", "/metrics")


def _presented(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token:
        return token
    return request.headers.get("x-api-key")


def _matches(presented: str | None, key: str) -> bool:
    return presented is not None and secrets.compare_digest(presented.encode(), key.encode())


def auth_guard(api_key: str | None, admin_api_key: str | None) -> Any:
    """A before_request hook answering 401 for a missing or wrong key; None lets the request through."""

    async def guard(request: Request) -> Response | None:
        if request.method == "OPTIONS" or request.url.path.startswith(OPEN_PREFIXES):
            return None
        admin = request.route_handler.opt.get("auth") == ADMIN
        key = admin_api_key if admin and admin_api_key else api_key
        if key is None or _matches(_presented(request), key):
            return None
        return json_response({"error": "Unauthorized"}, 401)

    return guard
