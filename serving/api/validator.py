"""The one validator: every route's input passes here before anything is tokenized, queued or computed.

It decodes bodies into the typed schemas (which bound nesting and integer sizes), bounds text sizes
before tokenizing, checks token ids, batch shapes, `n` and request ids, and runs the engine's own
per-request checks (serving/request_checks.py) on what will be sent. Every broken rule is an
InvalidRequest: a 400 in SGLang's error shape, naming the field and the value.
"""

import asyncio
import uuid
from typing import Any, TypeVar

import msgspec

from kiln.serving.messages import GenerateRequest, RequestLimits
from kiln.serving.request_checks import check_ids, check_request
from kiln.serving.sampling_params import InvalidRequest

T = TypeVar("T")

# WordPiece turns a word of up to 100 characters it cannot split into one [UNK].
MIN_CHARS_PER_TOKEN_BOUND = 100
# Bodies larger than this are decoded in a worker thread, so the event loop keeps answering.
DECODE_INLINE_BYTES = 1 << 20


def _decode(body: bytes, schema: type[T]) -> T:
    if not body.strip():
        raise InvalidRequest("The request body is empty; send a JSON object.")
    try:
        # Lax mode: whole-number floats (2.0) are integers and "true" is a bool, as SGLang's pydantic accepts.
        return msgspec.json.decode(body, type=schema, strict=False)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"Invalid request: {exc}") from exc
    except (msgspec.DecodeError, RecursionError) as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from exc


async def decode_body(body: bytes, schema: type[T]) -> T:
    if len(body) <= DECODE_INLINE_BYTES:
        return _decode(body, schema)
    return await asyncio.to_thread(_decode, body, schema)


class Validator:
    def __init__(self, limits: RequestLimits, max_n: int, max_text_chars: int):
        self.limits = limits
        self.max_n = max_n
        # No text longer than this fits the context, whatever it tokenizes to: refused before tokenizing.
        self.max_text_chars = max_text_chars

    @classmethod
    def for_tokenizer(cls, limits: RequestLimits, max_n: int, tokenizer: Any | None) -> "Validator":
        """Text sizes bounded by the tokenizer: a token covers at most its longest vocabulary entry
        (counted twice, for normalizers that shrink text). Without a tokenizer no text is tokenized."""
        longest = max((len(t) for t in tokenizer.get_vocab()), default=1) if tokenizer is not None else 1
        return cls(limits, max_n, 2 * limits.context_length * max(longest, MIN_CHARS_PER_TOKEN_BOUND))

    def texts(self, value: str | list[str], name: str = "text", factor: int = 1) -> tuple[bool, list[str]]:
        """The texts of a single or batch input, each within the size any prompt can have (times `factor`)."""
        is_batch = isinstance(value, list)
        texts = value if is_batch else [value]
        if not texts:
            raise InvalidRequest(f"{name} must not be an empty list.")
        limit = self.max_text_chars * factor
        for text in texts:
            if len(text) > limit:
                raise InvalidRequest(
                    f"{name} holds {len(text)} characters: more than {limit}, which no tokenization fits in this "
                    f"model's context of {self.limits.context_length} tokens."
                )
        return is_batch, texts

    def token_ids(self, value: list[Any], name: str = "input_ids") -> tuple[bool, list[list[int]]]:
        """A list of token ids or a list of such lists (not a mix), every id in the vocabulary."""
        if not value:
            raise InvalidRequest(f"{name} cannot be empty.")
        is_batch = isinstance(value[0], list)
        if any(isinstance(v, list) != is_batch for v in value):
            raise InvalidRequest(f"{name} must be a list of token ids or a list of such lists, not a mix of both.")
        seqs = value if is_batch else [value]
        for ids in seqs:
            check_ids(ids, self.limits.vocab_size, name)
        return is_batch, seqs

    def n(self, n: int) -> int:
        if not 1 <= n <= self.max_n:
            raise InvalidRequest(f"n must be in [1, {self.max_n}] (--max-n), got {n}.")
        return n

    @staticmethod
    def per_input(value: Any, count: int, name: str) -> list[Any]:
        """A per-input option: one value for every input, or a list with one per input."""
        if not isinstance(value, list):
            return [value] * count
        if len(value) != count:
            raise InvalidRequest(f"{name} has {len(value)} entries for {count} inputs.")
        return value

    @staticmethod
    def rids(rid: str | list[str] | None, count: int) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != count:
            raise InvalidRequest("The specified rids length mismatch with the batch_size for batch processing.")
        return rids

    def engine_request(self, req: GenerateRequest) -> GenerateRequest:
        """The engine's own admission checks, run here first so a refusal is a 400 before anything is queued."""
        check_request(req, self.limits)
        return req
