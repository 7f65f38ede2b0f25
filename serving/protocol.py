"""Request bodies of the HTTP API, decoded and type-checked by msgspec."""

from typing import Any

import msgspec


class GenerateReqInput(msgspec.Struct):
    text: str | list[str] | None = None
    input_ids: list[Any] | None = None  # list[int] or list[list[int]]; checked by hand
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] = -1
    top_logprobs_num: int | list[int] = 0
    token_ids_logprob: list[Any] | None = None
    return_text_in_logprobs: bool = False
    model: str | None = None


class AbortReqInput(msgspec.Struct):
    rid: str | None = None
    abort_all: bool = False


class TokenizeReqInput(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeReqInput(msgspec.Struct, forbid_unknown_fields=True):
    tokens: list[Any]  # list[int] or list[list[int]]
    skip_special_tokens: bool = True
    model: str | None = None


class CompletionRequest(msgspec.Struct):
    """The subset of OpenAI's /v1/completions that maps onto /generate."""

    prompt: str | list[Any]
    model: str | None = None
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    echo: bool = False
    logprobs: int | None = None
    user: str | None = None


class ChatMessage(msgspec.Struct):
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(msgspec.Struct):
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    n: int = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: bool = False
    top_logprobs: int | None = None
    user: str | None = None
