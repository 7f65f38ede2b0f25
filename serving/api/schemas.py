"""Request bodies of the HTTP API as msgspec structs: decoded, type-checked and described (OpenAPI) from here.

Every field has a bounded shape (no free-form `Any`), so a body nested a thousand levels deep fails
decoding at the third, and integers are bounded to 64 bits before anything computes with them.
"""

import msgspec

from kiln.serving.messages import PauseMode
from kiln.serving.sampling_params import Int64, SamplingParams

# Token ids, or a batch of them: homogeneity and the vocabulary are checked by the validator.
TokenIds = list[int | list[int]]


class GenerateReqInput(msgspec.Struct):
    text: str | list[str] | None = None
    input_ids: TokenIds | None = None
    sampling_params: SamplingParams | list[SamplingParams] | None = None
    rid: str | list[str] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] = False
    logprob_start_len: Int64 | list[Int64] = -1
    top_logprobs_num: Int64 | list[Int64] = 0
    token_ids_logprob: TokenIds | None = None
    return_text_in_logprobs: bool = False
    model: str | None = None


class AbortReqInput(msgspec.Struct):
    rid: str | None = None
    abort_all: bool = False


class UpdateWeightFromDiskReqInput(msgspec.Struct):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    flush_cache: bool = True  # False keeps the radix cache, whose K/V came from the old weights
    # SGLang's other fields are accepted and have nothing to do here: CUDA graphs hold the parameters'
    # storage, which the update writes into, so they never need re-capturing.
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: Int64 = 0


class UpdateWeightVersionReqInput(msgspec.Struct):
    new_version: str
    abort_all_requests: bool = True


class PauseGenerationReqInput(msgspec.Struct):
    mode: PauseMode = "abort"


class ContinueGenerationReqInput(msgspec.Struct):
    torch_empty_cache: bool = True


class TokenizeReqInput(msgspec.Struct, forbid_unknown_fields=True):
    prompt: str | list[str]
    add_special_tokens: bool = True
    model: str | None = None


class DetokenizeReqInput(msgspec.Struct, forbid_unknown_fields=True):
    tokens: TokenIds
    skip_special_tokens: bool = True
    model: str | None = None


class JsonSchemaFormat(msgspec.Struct):
    name: str | None = None
    # Kept as the raw JSON text (never decoded here): xgrammar compiles it in the engine.
    schema: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    strict: bool = False
    description: str | None = None


class ResponseFormat(msgspec.Struct):
    type: str
    json_schema: JsonSchemaFormat | None = None


class StreamOptions(msgspec.Struct):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class OpenAISampling(msgspec.Struct, kw_only=True):
    """The sampling fields /v1/completions and /v1/chat/completions share (with SGLang's extras)."""

    model: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = -1
    min_p: float = 0.0
    n: Int64 = 1
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    user: str | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    # SGLang's extras (sent through the SDK's extra_body).
    regex: str | None = None
    ebnf: str | None = None
    json_schema: str | None = None
    stop_token_ids: list[Int64] | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False


class CompletionRequest(OpenAISampling, kw_only=True):
    """The subset of OpenAI's /v1/completions that maps onto /generate."""

    prompt: str | list[str | int | list[int]]
    max_tokens: Int64 | None = 16
    echo: bool = False
    logprobs: Int64 | None = None


class ImageUrl(msgspec.Struct):
    url: str
    detail: str | None = None


class ContentPart(msgspec.Struct, omit_defaults=True):
    """One part of a chat message's content; the chat template sees it as a dict."""

    type: str
    text: str | None = None
    image_url: ImageUrl | None = None


class ChatMessage(msgspec.Struct, omit_defaults=True):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(OpenAISampling, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Int64 | None = None
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    continue_final_message: bool = False  # the last (assistant) message is a prefix to continue, not a finished turn


class ResponseInputContent(msgspec.Struct):
    type: str  # input_text, output_text
    text: str | None = None


class ResponseInputItem(msgspec.Struct):
    role: str
    content: str | list[ResponseInputContent]
    type: str = "message"


class ResponseTextFormat(msgspec.Struct):
    type: str = "text"  # text, json_object, json_schema
    name: str | None = None
    schema: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b""))
    strict: bool = False
    description: str | None = None


class ResponseTextConfig(msgspec.Struct):
    format: ResponseTextFormat | None = None


class ResponsesRequest(msgspec.Struct, kw_only=True):
    """OpenAI's /v1/responses, for text in and text out."""

    input: str | list[ResponseInputItem]
    model: str | None = None
    instructions: str | None = None
    max_output_tokens: Int64 | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = None
    text: ResponseTextConfig | None = None
    user: str | None = None
    metadata: dict[str, str] | None = None


class EncodeReqInput(msgspec.Struct):
    """/encode and /classify: like /generate's input, without sampling."""

    text: str | list[str] | None = None
    input_ids: TokenIds | None = None
    rid: str | list[str] | None = None
    model: str | None = None


class EmbeddingRequest(msgspec.Struct):
    """OpenAI's /v1/embeddings: `input` is a string, a list of strings, token ids, or a list of token-id lists."""

    input: str | list[str | int | list[int]]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: Int64 | None = None
    user: str | None = None


class RerankRequest(msgspec.Struct):
    query: str
    documents: list[str]
    instruct: str | None = None
    top_n: Int64 | None = None
    return_documents: bool = True
    model: str | None = None


class ScoreRequest(msgspec.Struct):
    """/v1/score: next-token probabilities of `label_token_ids` after query + item (or item + query)."""

    label_token_ids: list[int]
    query: str | list[int] | None = None
    items: str | list[str | list[int]] | None = None  # a text, a list of texts, or a list of token-id lists
    apply_softmax: bool = False
    item_first: bool = False
    model: str | None = None


