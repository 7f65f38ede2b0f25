"""The non-generating endpoints: /encode, /classify, /v1/embeddings and /v1/rerank.

Each input becomes one engine request with no output tokens; the engine answers with the pooled
embedding (embedding models) or the classifier's scores (cross-encoders, reward models).
"""

import asyncio
import base64
import struct
import time
import uuid
from typing import Any

from litestar.exceptions import HTTPException

from kiln.models.registry import CROSS_ENCODER, EMBEDDING, REWARD
from kiln.serving.embedding_protocol import EmbeddingRequest, EncodeReqInput, RerankRequest
from kiln.serving.messages import GenerateRequest
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.tokenizer_manager import BadRequest, TokenizerManager

POOLED = (EMBEDDING, CROSS_ENCODER, REWARD)
CLASSIFIERS = (CROSS_ENCODER, REWARD)


def require_kind(endpoint: str, kind: str, allowed: tuple[str, ...]) -> None:
    """400 naming the loaded kind when `endpoint` needs a head the model lacks."""
    if kind not in allowed:
        wanted = " or ".join(allowed)
        raise BadRequest(f"{endpoint} needs {_a(wanted)} {wanted} model; the loaded model is {_a(kind)} {kind} model.")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class EmbeddingServing:
    def __init__(self, tm: TokenizerManager, kind: str, served_name: str, max_input_tokens: int):
        self.tm = tm
        self.kind = kind
        self.served_name = served_name
        # Pooled inputs run in one forward: at most the context and the chunked-prefill budget.
        self.max_input_tokens = max_input_tokens

    # ---- inputs ----

    def _ids_of(self, text: Any, input_ids: Any) -> tuple[list[list[int]], bool]:
        if (text is None) == (input_ids is None):
            raise BadRequest("Either text or input_ids should be provided.")
        if text is not None:
            is_batch = isinstance(text, list)
            texts = text if is_batch else [text]
            if not texts:
                raise BadRequest("text must not be an empty list.")
            return [self.tm.tokenizer(t).input_ids for t in texts], is_batch
        if not input_ids:
            raise BadRequest("input_ids must not be empty.")
        is_batch = isinstance(input_ids[0], list)
        return [self._checked_ids(ids) for ids in (input_ids if is_batch else [input_ids])], is_batch

    def _checked_ids(self, ids: Any) -> list[int]:
        vocab = self.tm.vocab_size
        if not isinstance(ids, list) or not all(type(t) is int for t in ids):
            raise BadRequest("input_ids must be a list of token ids (integers) or a list of such lists.")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise BadRequest(f"input_ids holds token id {bad[0]}, outside the vocabulary [0, {vocab}).")
        return ids

    def _check_length(self, ids: list[int]) -> None:
        if not ids:
            raise BadRequest("The input is empty: it tokenizes to no tokens.")
        if len(ids) > self.max_input_tokens:
            raise BadRequest(
                f"The input ({len(ids)} tokens) is longer than the {self.max_input_tokens} tokens this server embeds in one "
                "forward (the model's context length, and --chunked-prefill-size)."
            )
        if len(ids) > self.tm.pool_size:
            raise BadRequest(f"The input needs {len(ids)} KV cache tokens but the server holds only {self.tm.pool_size} (--max-total-tokens).")

    @staticmethod
    def _rids(rid: Any, count: int) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != count or len(set(rids)) != count:
            raise BadRequest(f"rid must hold {count} distinct values, one per input.")
        return rids

    # ---- running ----

    async def run_one(self, rid: str, ids: list[int]) -> dict[str, Any]:
        """One input (already length-checked) through the engine: {"embedding", "meta_info"} as /encode answers."""
        start = time.monotonic()
        out = None
        async for out in self.tm.engine.generate(GenerateRequest(rid, ids, SamplingParams(max_new_tokens=0))):
            pass
        if out is None or out.embedding is None:
            reason = (out.finish_reason or {}).get("message", "no output") if out else "no output"
            raise HTTPException(status_code=500, detail=f"The request was aborted: {reason}")
        meta = {
            "id": rid,
            "finish_reason": out.finish_reason,
            "prompt_tokens": len(ids),
            "weight_version": self.tm.weight_version,
            "e2e_latency": time.monotonic() - start,
        }
        return {"embedding": out.embedding, "meta_info": meta}

    async def run_all(self, prompts: list[list[int]], rids: list[str]) -> list[dict[str, Any]]:
        for ids in prompts:
            self._check_length(ids)  # every input before any runs
        return list(await asyncio.gather(*(self.run_one(r, ids) for r, ids in zip(rids, prompts))))

    # ---- endpoints ----

    async def encode(self, obj: EncodeReqInput, endpoint: str) -> Any:
        require_kind(endpoint, self.kind, CLASSIFIERS if endpoint == "/classify" else POOLED)
        prompts, is_batch = self._ids_of(obj.text, obj.input_ids)
        results = await self.run_all(prompts, self._rids(obj.rid, len(prompts)))
        return results if is_batch else results[0]

    async def embeddings(self, obj: EmbeddingRequest) -> dict[str, Any]:
        require_kind("/v1/embeddings", self.kind, POOLED)
        if obj.encoding_format not in ("float", "base64"):
            raise BadRequest(f"encoding_format must be 'float' or 'base64', got {obj.encoding_format!r}.")
        if obj.dimensions is not None:
            raise BadRequest("dimensions is not supported: this server returns the model's full embedding.")
        inp = obj.input
        if isinstance(inp, str):
            prompts = [self.tm.tokenizer(inp).input_ids]
        elif not inp:
            raise BadRequest("input must not be empty.")
        elif all(isinstance(x, str) for x in inp):
            prompts = [self.tm.tokenizer(t).input_ids for t in inp]
        elif isinstance(inp[0], list):
            prompts = [self._checked_ids(ids) for ids in inp]
        else:
            prompts = [self._checked_ids(inp)]
        results = await self.run_all(prompts, self._rids(None, len(prompts)))
        data = [{"object": "embedding", "embedding": self._encoded(r["embedding"], obj.encoding_format), "index": i} for i, r in enumerate(results)]
        tokens = sum(len(p) for p in prompts)
        usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens, "prompt_tokens_details": None}
        return {"object": "list", "data": data, "model": obj.model or self.served_name, "usage": usage}

    @staticmethod
    def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
        if encoding_format == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    async def rerank(self, obj: RerankRequest) -> list[dict[str, Any]]:
        require_kind("/v1/rerank", self.kind, (CROSS_ENCODER,))
        if not obj.documents:
            raise BadRequest("documents must not be empty.")
        if obj.top_n is not None and obj.top_n < 1:
            raise BadRequest(f"top_n must be at least 1, got {obj.top_n}.")
        if obj.instruct is not None:
            raise BadRequest("instruct is for decoder rerankers; a cross-encoder scores the query and document as they are.")
        # The tokenizer lays out each pair as the model was trained on it (e.g. [CLS] q [SEP] d [SEP]).
        prompts = [self.tm.tokenizer(obj.query, doc).input_ids for doc in obj.documents]
        results = await self.run_all(prompts, self._rids(None, len(prompts)))
        ranked = [
            {"score": r["embedding"][0], "document": doc if obj.return_documents else None, "index": i, "meta_info": r["meta_info"]}
            for i, (doc, r) in enumerate(zip(obj.documents, results))
        ]
        ranked.sort(key=lambda item: -item["score"])
        return ranked[: obj.top_n] if obj.top_n is not None else ranked
