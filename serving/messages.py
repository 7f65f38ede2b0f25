"""What the HTTP process and the engine process say to each other (msgpack over a pipe)."""

from typing import Any

import msgspec

from kiln.serving.sampling_params import SamplingParams


class GenerateRequest(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams


class AbortRequest(msgspec.Struct, tag=True):
    rid: str  # "" aborts every request


class InfoRequest(msgspec.Struct, tag=True):
    pass


class Shutdown(msgspec.Struct, tag=True):
    pass


class FlushCache(msgspec.Struct, tag=True):
    pass


class FlushReply(msgspec.Struct, tag=True):
    success: bool


class TokenOutput(msgspec.Struct):
    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: dict[str, Any] | None = None
    retractions: int = 0


class StepOutput(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]


class InfoReply(msgspec.Struct, tag=True):
    info: dict[str, Any]


class EngineError(msgspec.Struct, tag=True):
    message: str


ToEngine = GenerateRequest | AbortRequest | InfoRequest | FlushCache | Shutdown
FromEngine = StepOutput | InfoReply | FlushReply | EngineError
