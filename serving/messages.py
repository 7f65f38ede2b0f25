"""What the HTTP process and the engine process say to each other (msgpack over a pipe)."""

from typing import Any

import msgspec

from kiln.serving.sampling_params import SamplingParams


class LogprobRequest(msgspec.Struct):
    top_n: int = 0
    token_ids: list[int] | None = None
    start_len: int = -1  # first prompt position with an input logprob; -1: none


class GenerateRequest(msgspec.Struct, tag=True):
    rid: str
    input_ids: list[int]
    params: SamplingParams
    logprob: LogprobRequest | None = None


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
    # With LogprobRequest, one entry per id of new_ids: its logprob, the top ones, the asked-for ones.
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[float, int]]] | None = None
    ids_logprobs: list[list[tuple[float, int]]] | None = None
    # Prompt positions from start_len on, sent once with the first output token.
    input_logprobs: list[float | None] | None = None
    input_top_logprobs: list[list[tuple[float, int]]] | None = None
    input_ids_logprobs: list[list[tuple[float, int]]] | None = None
    # Models without generation: the pooled embedding, or the classifier's scores, once the prompt is computed.
    embedding: list[float] | None = None


class StepOutput(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]


class InfoReply(msgspec.Struct, tag=True):
    info: dict[str, Any]


class EngineError(msgspec.Struct, tag=True):
    message: str


ToEngine = GenerateRequest | AbortRequest | InfoRequest | FlushCache | Shutdown
FromEngine = StepOutput | InfoReply | FlushReply | EngineError
