"""/v1/score on a generation model: the next-token probabilities of chosen label ids after query + item.

Each item is one greedy one-token request asking for the logprobs of `label_token_ids`
(the model's own distribution, before any sampling transform).
"""

import math
import uuid
from typing import Any

from kiln.serving.api.schemas import ScoreRequest
from kiln.serving.api.tokenizer_manager import TokenizerManager
from kiln.serving.messages import LogprobRequest
from kiln.serving.sampling_params import InvalidRequest, SamplingParams


async def _sequences(tm: TokenizerManager, obj: ScoreRequest) -> list[list[int]]:
    """Joins the query to each item: as text when both are text, as ids when both are ids (no items: none)."""
    if obj.query is None or obj.items is None:
        raise InvalidRequest("query and items are both required.")
    items = obj.items if isinstance(obj.items, list) else [obj.items]
    if not items:
        return []
    if isinstance(obj.query, str):
        if not all(isinstance(i, str) for i in items):
            raise InvalidRequest("With a text query, items must be text too.")
        texts = [f"{i}{obj.query}" if obj.item_first else f"{obj.query}{i}" for i in items]
        return await tm.encode(tm.validator.texts(texts, "query and items")[1])
    if not all(isinstance(i, list) for i in items):
        raise InvalidRequest("With a token-id query, items must be lists of token ids.")
    seqs = [i + obj.query if obj.item_first else obj.query + i for i in items]
    return tm.validator.token_ids(seqs, "query and items")[1]


async def score(tm: TokenizerManager, obj: ScoreRequest) -> dict[str, Any]:
    labels = obj.label_token_ids
    if not labels:
        raise InvalidRequest("label_token_ids must be a non-empty list of token ids.")
    for t in labels:
        if not 0 <= t < tm.vocab_size:
            raise InvalidRequest(f"Token ID {t} is out of vocabulary (vocab size: {tm.vocab_size})")
    params = SamplingParams(max_new_tokens=1, temperature=0.0)
    reqs = [tm.single(uuid.uuid4().hex, ids, params, LogprobRequest(token_ids=labels)) for ids in await _sequences(tm, obj)]
    results = await tm.run_all(reqs)
    scores = []
    for r in results:
        finish = r["meta_info"]["finish_reason"]
        if finish and finish.get("type") == "abort":
            raise RuntimeError(f"The request was aborted: {finish.get('message')}")
        logprobs = [lp for lp, _, _ in r["meta_info"]["output_token_ids_logprobs"][0]]
        if obj.apply_softmax:
            top = max(logprobs)
            exps = [math.exp(lp - top) for lp in logprobs]
            scores.append([e / sum(exps) for e in exps])
        else:
            scores.append([math.exp(lp) for lp in logprobs])
    tokens = sum(len(q.input_ids) for q in reqs)
    usage = {"prompt_tokens": tokens, "completion_tokens": 0, "total_tokens": tokens, "prompt_tokens_details": None}
    return {"scores": scores, "model": obj.model or tm.served.name, "usage": usage, "object": "scoring"}
