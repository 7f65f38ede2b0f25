"""The non-generating endpoints: /encode, /classify, /v1/embeddings and /v1/rerank.

Each input becomes one engine request with no output tokens; the engine answers with the pooled
embedding (embedding models) or the classifier's scores (cross-encoders, reward models).
"""

import base64
import struct
import time
from typing import Any

from kiln.serving.api.schemas import EmbeddingRequest, EncodeReqInput, RerankRequest
from kiln.serving.api.tokenizer_manager import SingleRequest, TokenizerManager
from kiln.serving.messages import ModelKind
from kiln.serving.sampling_params import InvalidRequest, SamplingParams

POOLED: tuple[ModelKind, ...] = ("embedding", "cross-encoder", "reward")
CLASSIFIERS: tuple[ModelKind, ...] = ("cross-encoder", "reward")


def require_kind(endpoint: str, kind: str, allowed: tuple[str, ...]) -> None:
    """400 naming the loaded kind when `endpoint` needs a head the model lacks."""
    if kind not in allowed:
        wanted = " or ".join(allowed)
        raise InvalidRequest(f"{endpoint} needs {_a(wanted)} {wanted} model; the loaded model is {_a(kind)} {kind} model.")


def _a(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class EmbeddingServing:
    def __init__(self, tm: TokenizerManager, kind: str):
        self.tm = tm
        self.kind = kind

    async def _ids_of(self, text: str | list[str] | None, input_ids: list[Any] | None) -> tuple[list[list[int]], bool]:
        if (text is None) == (input_ids is None):
            raise InvalidRequest("Either text or input_ids should be provided.")
        if text is not None:
            is_batch, texts = self.tm.validator.texts(text)
            return await self.tm.encode(texts), is_batch
        is_batch, seqs = self.tm.validator.token_ids(input_ids)
        return seqs, is_batch

    async def run_all(self, prompts: list[list[int]], rids: list[str]) -> list[dict[str, Any]]:
        """Inputs through the engine, every one checked before any runs: {"embedding", "meta_info"} as /encode answers."""
        reqs = [self.tm.single(rid, ids, SamplingParams(max_new_tokens=0)) for rid, ids in zip(rids, prompts)]
        start = time.monotonic()
        results = await self.tm.run_all(reqs)
        return [self._result(req, r, start) for req, r in zip(reqs, results)]

    def _result(self, req: SingleRequest, result: dict[str, Any], start: float) -> dict[str, Any]:
        meta = result["meta_info"]
        if result.get("embedding") is None:
            raise RuntimeError(f"The request was aborted: {(meta['finish_reason'] or {}).get('message', 'no output')}")
        keep = {"id": req.rid, "finish_reason": meta["finish_reason"], "prompt_tokens": len(req.input_ids), "weight_version": self.tm.served.weight_version}
        return {"embedding": result["embedding"], "meta_info": keep | {"e2e_latency": time.monotonic() - start}}

    # ---- endpoints ----

    async def encode(self, obj: EncodeReqInput, endpoint: str) -> Any:
        require_kind(endpoint, self.kind, CLASSIFIERS if endpoint == "/classify" else POOLED)
        prompts, is_batch = await self._ids_of(obj.text, obj.input_ids)
        results = await self.run_all(prompts, self.tm.validator.rids(obj.rid, len(prompts)))
        return results if is_batch else results[0]

    async def embeddings(self, obj: EmbeddingRequest) -> dict[str, Any]:
        require_kind("/v1/embeddings", self.kind, POOLED)
        if obj.encoding_format not in ("float", "base64"):
            raise InvalidRequest(f"encoding_format must be 'float' or 'base64', got {obj.encoding_format!r}.")
        if obj.dimensions is not None:
            raise InvalidRequest("dimensions is not supported: this server returns the model's full embedding.")
        inp = obj.input
        if not inp:
            raise InvalidRequest("Input cannot be empty.")
        if isinstance(inp, str) or (inp and all(isinstance(x, str) for x in inp)):
            prompts = await self.tm.encode(self.tm.validator.texts(inp, "input")[1])
        elif inp and (all(isinstance(x, int) for x in inp) or all(isinstance(x, list) for x in inp)):
            prompts = self.tm.validator.token_ids(inp, "input")[1]
        else:
            raise InvalidRequest("input must be a non-empty string, list of strings, list of token ids, or list of such lists.")
        results = await self.run_all(prompts, self.tm.validator.rids(None, len(prompts)))
        data = [{"object": "embedding", "embedding": self._encoded(r["embedding"], obj.encoding_format), "index": i} for i, r in enumerate(results)]
        tokens = sum(len(p) for p in prompts)
        usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens, "prompt_tokens_details": None}
        return {"object": "list", "data": data, "model": obj.model or self.tm.served.name, "usage": usage}

    @staticmethod
    def _encoded(vector: list[float], encoding_format: str) -> list[float] | str:
        if encoding_format == "float":
            return vector
        return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()

    async def rerank(self, obj: RerankRequest) -> list[dict[str, Any]]:
        require_kind("/v1/rerank", self.kind, ("cross-encoder",))
        if not obj.documents:
            raise InvalidRequest("documents must not be empty.")
        if obj.top_n is not None and obj.top_n < 1:
            raise InvalidRequest(f"top_n must be at least 1, got {obj.top_n}.")
        if obj.instruct is not None:
            raise InvalidRequest("instruct is for decoder rerankers; a cross-encoder scores the query and document as they are.")
        # The tokenizer lays out each pair as the model was trained on it (e.g. [CLS] q [SEP] d [SEP]).
        self.tm.validator.texts([obj.query, *obj.documents], "query and documents")
        prompts = await self.tm.encode_pairs(obj.query, obj.documents)
        results = await self.run_all(prompts, self.tm.validator.rids(None, len(prompts)))
        ranked = [
            {"score": r["embedding"][0], "document": doc if obj.return_documents else None, "index": i, "meta_info": r["meta_info"]}
            for i, (doc, r) in enumerate(zip(obj.documents, results))
        ]
        ranked.sort(key=lambda item: -item["score"])
        return ranked[: obj.top_n] if obj.top_n is not None else ranked
