"""Request bodies of the non-generating endpoints (/encode, /classify, /v1/embeddings, /v1/rerank) and /v1/score."""

from typing import Any

import msgspec


class EncodeReqInput(msgspec.Struct):
    """/encode and /classify: like /generate's input, without sampling."""

    text: str | list[str] | None = None
    input_ids: list[Any] | None = None  # list[int] or list[list[int]]; checked by hand
    rid: str | list[str] | None = None
    model: str | None = None


class EmbeddingRequest(msgspec.Struct):
    """OpenAI's /v1/embeddings: `input` is a string, a list of strings, token ids, or a list of token-id lists."""

    input: str | list[Any]
    model: str | None = None
    encoding_format: str = "float"
    dimensions: int | None = None
    user: str | None = None


class RerankRequest(msgspec.Struct):
    query: str
    documents: list[str]
    instruct: str | None = None
    top_n: int | None = None
    return_documents: bool = True
    model: str | None = None


class ScoreRequest(msgspec.Struct):
    """/v1/score: next-token probabilities of `label_token_ids` after query + item (or item + query)."""

    label_token_ids: list[int]
    query: str | list[int] | None = None
    items: str | list[Any] | None = None  # a text, a list of texts, or a list of token-id lists
    apply_softmax: bool = False
    item_first: bool = False
    model: str | None = None
