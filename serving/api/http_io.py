"""What every route does with HTTP itself: read the declared body, answer JSON or server-sent events, notice a client leaving."""

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.response import Stream

from kiln.serving.api.engine_client import EngineUnavailable
from kiln.serving.api.errors import error_body, json_response
from kiln.serving.api.validator import decode_body
from kiln.serving.sampling_params import InvalidRequest


async def read_body(request: Request) -> Any:
    """The body decoded into the struct the route declares as `opt={"body": Struct}` (which the OpenAPI schema shows);
    routes with `opt={"empty_body": True}` take no body as the struct's defaults."""
    opt = request.route_handler.opt
    body = await request.body()
    if not body.strip() and opt.get("empty_body"):
        body = b"{}"
    return await decode_body(body, opt["body"])


async def sse(request: Request, chunks: AsyncIterator[dict[str, Any]]) -> Response | Stream:
    """An event stream; a refusal before the first chunk is a plain error answer (400, 503) instead."""
    try:
        first = await anext(chunks, None)
    except (InvalidRequest, EngineUnavailable):
        await chunks.aclose()
        raise

    async def events() -> AsyncIterator[bytes]:
        try:
            if first is not None:
                yield b"data: " + msgspec.json.encode(first) + b"\n\n"
            async for chunk in chunks:
                yield b"data: " + msgspec.json.encode(chunk) + b"\n\n"
        except (InvalidRequest, EngineUnavailable) as exc:
            body = error_body(request.url.path, str(exc), 400 if isinstance(exc, InvalidRequest) else 503)
            yield b"data: " + msgspec.json.encode(body if "error" in body else {"error": body}) + b"\n\n"
        finally:
            await chunks.aclose()
        yield b"data: [DONE]\n\n"

    # The header, not media_type: Litestar lets the handler's JSON default override media_type.
    return Stream(events(), status_code=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})


async def _until_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def answer(request: Request, work: Awaitable[Any]) -> Response:
    """Runs `work` and answers its JSON; a client that hangs up first cancels it (which aborts its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_until_disconnect(request))
    await asyncio.wait([task, watch], return_when=asyncio.FIRST_COMPLETED)
    watch.cancel()
    if not task.done():
        task.cancel()
        return Response(content=b"", status_code=499)
    return json_response(task.result())
