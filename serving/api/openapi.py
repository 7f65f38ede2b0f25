"""The OpenAPI document, built from the routes themselves: each route's `opt["body"]` struct is its request body.

msgspec writes the JSON Schema of those structs (with their bounds), so schema-driven clients and fuzzers
see exactly what the validator decodes.
"""

from typing import Any

import msgspec
from litestar import Litestar
from litestar.routes import HTTPRoute

from kiln import __version__

ERROR = {"description": "Invalid input, or the server cannot take it: SGLang's error body"}


def openapi_document(app: Litestar) -> dict[str, Any]:
    operations: list[tuple[str, str, str, type | None]] = []
    for route in app.routes:
        if not isinstance(route, HTTPRoute):
            continue
        for handler in route.route_handlers:
            if handler.opt.get("openapi") is False:
                continue
            for method in sorted(handler.http_methods):
                operations.append((route.path, method.lower(), handler.handler_name, handler.opt.get("body")))
    bodies = sorted({body for *_, body in operations if body is not None}, key=lambda t: t.__name__)
    refs, components = msgspec.json.schema_components(bodies, ref_template="#/components/schemas/{name}")
    ref_of = dict(zip(bodies, refs))
    paths: dict[str, dict[str, Any]] = {}
    for path, method, name, body in operations:
        op: dict[str, Any] = {"operationId": f"{name}_{method}", "responses": {"200": {"description": "OK"}, "400": ERROR, "503": ERROR}}
        if body is not None:
            op["requestBody"] = {"required": True, "content": {"application/json": {"schema": ref_of[body]}}}
        paths.setdefault(path, {})[method] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kiln", "version": __version__},
        "paths": paths,
        "components": {"schemas": components},
    }
