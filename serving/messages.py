"""What the HTTP process and the engine process say to each other (msgpack over a pipe).

This module is the whole contract between the two sides: both import it, and it imports neither
(nor torch), so the HTTP side stays free of the engine's dependencies.
"""

from typing import Any, Literal

import msgspec

from kiln.serving.sampling_params import SamplingParams

ModelKind = Literal["generation", "embedding", "cross-encoder", "reward"]


class RequestLimits(msgspec.Struct, frozen=True):
    """What every request is checked against (serving/request_checks.py), on both sides."""

    kind: ModelKind
    vocab_size: int  # rows of the embedding: every input id must be below it
    context_length: int
    max_total_tokens: int  # KV pool slots
    max_pooled_tokens: int  # models without generation compute a prompt in one forward
    has_tokenizer: bool = True  # False with --skip-tokenizer-init: nothing that needs text is accepted


class FinishStop(msgspec.Struct, tag_field="type", tag="stop"):
    matched: int | str | None = None  # the stop token id, or the stop string


class FinishLength(msgspec.Struct, tag_field="type", tag="length"):
    length: int


class FinishAbort(msgspec.Struct, tag_field="type", tag="abort", omit_defaults=True):
    message: str
    # 400: the request itself was refused (the client sees a 400 before any output); else None.
    status_code: int | None = None


FinishReason = FinishStop | FinishLength | FinishAbort


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
    message: str | None = None  # the abort finish reason's message (default: where the request was)


class StatsRequest(msgspec.Struct, tag=True):
    pass


class Shutdown(msgspec.Struct, tag=True):
    pass


class FlushCache(msgspec.Struct, tag=True):
    pass


class UpdateWeights(msgspec.Struct, tag=True):
    """Copy a checkpoint's tensors into the served parameters (between steps; running requests are retracted)."""

    model_path: str
    load_format: str | None = None
    flush_cache: bool = True


PauseMode = Literal["abort", "retract", "in_place"]


class PauseGeneration(msgspec.Struct, tag=True):
    """Stop stepping: abort every request, retract the running ones (their K/V freed), or keep them in place."""

    mode: PauseMode = "abort"


class ContinueGeneration(msgspec.Struct, tag=True):
    pass


class ExpertDistribution(msgspec.Struct, tag=True):
    """The expert distribution recorder: start (from zero), stop, or dump (to a file, then from zero)."""

    action: Literal["start", "stop", "dump"]


class ControlReply(msgspec.Struct, tag=True):
    """The engine's answer to FlushCache, UpdateWeights, PauseGeneration, ContinueGeneration and ExpertDistribution."""

    success: bool
    message: str = ""


class TokenOutput(msgspec.Struct):
    rid: str
    new_ids: list[int]
    prompt_tokens: int
    cached_tokens: int
    finish_reason: FinishReason | None = None
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
    queue_time: float | None = None  # with the first output: seconds between arrival and admission


class StepOutput(msgspec.Struct, tag=True):
    outputs: list[TokenOutput]


class CheckpointLocated(msgspec.Struct, tag=True):
    """Sent first, once the engine has found its checkpoint and before it loads weights and compiles: the
    HTTP side loads the tokenizer from `checkpoint` meanwhile (unless has_tokenizer is false)."""

    checkpoint: str
    has_tokenizer: bool


class EngineInfo(msgspec.Struct, tag=True):
    """Sent once when the engine is ready: what the HTTP side needs to validate and describe requests."""

    model_kind: ModelKind
    model_type: str
    architectures: list[str]
    checkpoint: str  # the folder holding the tokenizer files (a converted GGUF's cache folder)
    limits: RequestLimits
    max_running_requests: int
    max_req_input_len: int
    chunked_prefill_size: int
    dtype_resolved: str
    device_resolved: str
    startup_seconds: dict[str, float]  # convert, load, pool_sizing, compile, warm_up, total
    quantization: dict[str, Any]  # --torchao-config in effect ("none" or a mode) and the linears per format


class EngineStats(msgspec.Struct, tag=True):
    """The engine's figures now, for /get_server_info and /get_load."""

    num_running_reqs: int
    num_waiting_reqs: int
    free_slots: int
    available_slots: int
    cached_tokens_in_tree: int
    total_retractions: int
    num_used_tokens: int  # KV slots held by requests (not counting cached prefixes nobody holds)
    token_usage: float  # num_used_tokens over the pool's size
    cache_hit_rate: float  # share of admitted prompt tokens found in the radix cache, since start
    gen_throughput: float  # output tokens per second over the last few seconds
    num_retracted_reqs: int  # waiting requests that were retracted and will be recomputed
    paused: bool
    compile: dict[str, Any]


class EngineError(msgspec.Struct, tag=True):
    message: str


ToEngine = (
    GenerateRequest | AbortRequest | StatsRequest | FlushCache | UpdateWeights | PauseGeneration | ContinueGeneration
    | ExpertDistribution | Shutdown
)  # fmt: skip
FromEngine = StepOutput | CheckpointLocated | EngineInfo | EngineStats | ControlReply | EngineError
