"""The tokenizer side of /generate: validate, tokenize, submit, detokenize, shape the response."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import msgspec
from transformers import PreTrainedTokenizerBase

from kiln.serving.engine_client import EngineClient
from kiln.serving.grammar import check_grammar, grammar_key
from kiln.serving.messages import GenerateRequest, LogprobRequest
from kiln.serving.protocol import GenerateReqInput
from kiln.serving.sampling_params import SamplingParams
from kiln.serving.tokenizer import IncrementalDetokenizer, trim_stop


LOGPROB_KEYS = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
    "input_token_ids_logprobs",
    "output_token_ids_logprobs",
)


class BadRequest(ValueError):
    """Invalid input: answered with a 400 and this message."""


@dataclass
class SingleRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    logprob: LogprobRequest | None = None
    logprob_text: bool = False


class TokenizerManager:
    def __init__(self, engine: EngineClient, tokenizer: PreTrainedTokenizerBase, weight_version: str):
        self.engine = engine
        self.tokenizer = tokenizer
        self.weight_version = weight_version
        self.context_len: int = engine.info["context_length"]
        self.pool_size: int = engine.info["max_total_num_tokens"]
        self.vocab_size = len(tokenizer)

    # ---- turning a request body into single requests ----

    def parse(self, obj: GenerateReqInput) -> tuple[list[SingleRequest], bool]:
        """Returns the single requests and whether the input was a batch."""
        if obj.text is None and obj.input_ids is None:
            raise BadRequest("Either text, input_ids or input_embeds should be provided.")
        if obj.text is not None and obj.input_ids is not None:
            raise BadRequest("Either text or input_ids should be provided.")
        if obj.text is not None:
            is_batch = isinstance(obj.text, list)
            texts = obj.text if is_batch else [obj.text]
            if not texts:
                raise BadRequest("text must not be an empty list.")
            prompts = [self.tokenizer(t).input_ids for t in texts]
        else:
            is_batch, prompts = self._check_ids(obj.input_ids)
        n_params = self._param_list(obj.sampling_params, len(prompts))
        rids = self._rids(obj.rid, len(prompts), is_batch)
        logprobs = self._logprob_list(obj, len(prompts))
        singles = []
        for i, (ids, params) in enumerate(zip(prompts, n_params)):
            self.check_length(ids, params)
            copies = params.n
            params = msgspec.structs.replace(params, n=1)
            for j in range(copies):
                rid = rids[i] if copies == 1 else f"{rids[i]}-{j}"
                # Each of n samples needs its own stream of randomness, reproducible from the one seed.
                seeded = params if params.sampling_seed is None or j == 0 else msgspec.structs.replace(params, sampling_seed=params.sampling_seed + j)
                singles.append(SingleRequest(rid, ids, seeded, logprobs[i], obj.return_text_in_logprobs))
        return singles, is_batch or len(singles) > 1

    def _logprob_list(self, obj: GenerateReqInput, count: int) -> list[LogprobRequest | None]:
        def per_input(value: Any, name: str) -> list[Any]:
            if not isinstance(value, list):
                return [value] * count
            if len(value) != count:
                raise BadRequest(f"{name} has {len(value)} entries for {count} inputs.")
            return value

        flags = per_input(obj.return_logprob, "return_logprob")
        starts = per_input(obj.logprob_start_len, "logprob_start_len")
        tops = per_input(obj.top_logprobs_num, "top_logprobs_num")
        wanted = obj.token_ids_logprob
        if wanted is None or (wanted and not isinstance(wanted[0], list)):
            wanted = [wanted] * count
        elif len(wanted) != count:
            raise BadRequest(f"token_ids_logprob has {len(wanted)} entries for {count} inputs.")
        out: list[LogprobRequest | None] = []
        for flag, start, top, ids in zip(flags, starts, tops, wanted):
            if not flag:
                out.append(None)
                continue
            if start is None or start < -1:
                raise BadRequest(f"logprob_start_len must be -1 (no input logprobs) or a prompt position, got {start}.")
            if top is None or top < 0 or top > self.vocab_size:
                raise BadRequest(f"top_logprobs_num must be in [0, {self.vocab_size}], got {top}.")
            if ids is not None and not all(type(t) is int and 0 <= t < self.vocab_size for t in ids):
                raise BadRequest(f"token_ids_logprob must hold token ids in [0, {self.vocab_size}).")
            out.append(LogprobRequest(top, ids, start))
        return out

    def _check_ids(self, input_ids: list[Any]) -> tuple[bool, list[list[int]]]:
        if not input_ids:
            raise BadRequest("input_ids must not be empty.")
        is_batch = isinstance(input_ids[0], list)
        prompts = input_ids if is_batch else [input_ids]
        for ids in prompts:
            if not isinstance(ids, list) or not all(type(t) is int for t in ids):
                raise BadRequest("input_ids must be a list of token ids (integers) or a list of such lists.")
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise BadRequest(f"input_ids holds token id {bad[0]}, outside the vocabulary [0, {self.vocab_size}).")
        return is_batch, prompts

    def _param_list(self, raw: Any, count: int) -> list[SamplingParams]:
        raws = raw if isinstance(raw, list) else [raw or {}] * count
        if len(raws) != count:
            raise BadRequest(f"sampling_params has {len(raws)} entries for {count} inputs.")
        return [self.sampling_params(r) for r in raws]

    def sampling_params(self, raw: Any) -> SamplingParams:
        try:
            params = msgspec.convert(raw, SamplingParams)
            params.validate(self.vocab_size)
            key = grammar_key(params)
            if key is not None:
                check_grammar(*key)  # a GrammarError is a ValueError: the compiler's message as a 400
        except msgspec.ValidationError as exc:
            raise BadRequest(f"Invalid sampling_params: {exc}") from exc
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        return params

    def _rids(self, rid: Any, count: int, is_batch: bool) -> list[str]:
        if rid is None:
            return [uuid.uuid4().hex for _ in range(count)]
        rids = rid if isinstance(rid, list) else [rid]
        if len(rids) != count:
            raise BadRequest(f"rid has {len(rids)} entries for {count} inputs.")
        if len(set(rids)) != len(rids):
            raise BadRequest("rid values must be unique.")
        return rids

    def check_length(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise BadRequest("The input is empty: it tokenizes to no tokens.")
        if len(ids) >= self.context_len:
            raise BadRequest(f"The input ({len(ids)} tokens) is longer than the model's context length ({self.context_len} tokens).")
        total = len(ids) + params.max_new_tokens
        if total > self.context_len:
            raise BadRequest(
                f"Requested token count exceeds the model's maximum context length of {self.context_len} tokens. "
                f"You requested a total of {total} tokens: {len(ids)} tokens from the input messages and "
                f"{params.max_new_tokens} tokens for the completion. Please reduce the number of tokens in the input "
                "messages or the completion to fit within the limit."
            )
        if total > self.pool_size:
            raise BadRequest(f"The request needs {total} KV cache tokens but the server holds only {self.pool_size} (--max-total-tokens).")

    # ---- running them ----

    async def stream_one(self, req: SingleRequest, partial: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Yields the response object after every engine output (cumulative text and ids), or only the last."""
        start = time.monotonic()
        p = req.params
        detok = IncrementalDetokenizer(self.tokenizer, req.input_ids, p.skip_special_tokens, p.spaces_between_special_tokens)
        hold = max((len(s) for s in p.stop_strings), default=1) - 1
        output_ids: list[int] = []
        lp: dict[str, list[Any]] = {k: [] for k in LOGPROB_KEYS}
        async for out in self.engine.generate(GenerateRequest(req.rid, req.input_ids, p, req.logprob)):
            output_ids += out.new_ids
            if req.logprob:
                self._add_logprobs(lp, out, req)
            finish = out.finish_reason
            new = out.new_ids
            if finish is not None and isinstance(finish.get("matched"), int) and not p.no_stop_trim and new:
                new = new[:-1]  # the matched stop token is not part of the text
            detok.add(new, final=finish is not None)
            text = detok.text if finish is not None else detok.text[: len(detok.text) - hold]
            if finish is None and not partial:
                continue
            if finish is not None:
                text = trim_stop(text, finish, p.no_stop_trim)
            meta = self._logprob_meta(req, lp) if req.logprob else {}
            yield {
                "text": text,
                "output_ids": list(output_ids),
                "meta_info": meta | {
                    "id": req.rid,
                    "finish_reason": finish,
                    "prompt_tokens": out.prompt_tokens or len(req.input_ids),
                    "weight_version": self.weight_version,
                    "total_retractions": out.retractions,
                    "completion_tokens": len(output_ids),
                    "cached_tokens": out.cached_tokens,
                    "cached_tokens_details": None,
                    "e2e_latency": time.monotonic() - start,
                    "response_sent_to_client_ts": time.time(),
                },
            }

    def _add_logprobs(self, lp: dict[str, list[Any]], out: Any, req: SingleRequest) -> None:
        text = (lambda t: self.tokenizer.decode([t])) if req.logprob_text else (lambda t: None)
        triples = lambda pairs: [[v, t, text(t)] for v, t in pairs]  # noqa: E731
        lp["output_token_logprobs"] += triples(zip(out.token_logprobs, out.new_ids))
        lp["output_top_logprobs"] += [triples(top) for top in out.top_logprobs]
        lp["output_token_ids_logprobs"] += [triples(ids) for ids in out.ids_logprobs]
        if out.input_logprobs is not None:
            lp["input_token_logprobs"] = triples(zip(out.input_logprobs, req.input_ids[req.logprob.start_len :]))
            lp["input_top_logprobs"] = [triples(top) for top in out.input_top_logprobs]
            lp["input_token_ids_logprobs"] = [triples(ids) for ids in out.input_ids_logprobs]

    @staticmethod
    def _logprob_meta(req: SingleRequest, lp: dict[str, list[Any]]) -> dict[str, Any]:
        meta = {k: list(v) for k, v in lp.items()}
        if req.logprob.token_ids is None:
            meta["input_token_ids_logprobs"] = meta["output_token_ids_logprobs"] = None
        return meta

    async def run_one(self, req: SingleRequest) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for last in self.stream_one(req, partial=False):
            pass
        return last

    async def run_all(self, reqs: list[SingleRequest]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.run_one(r) for r in reqs)))

    async def stream_all(self, reqs: list[SingleRequest], is_batch: bool) -> AsyncIterator[dict[str, Any]]:
        """Interleaves the streams of several requests; batch chunks carry their `index`."""
        if not is_batch:
            async for chunk in self.stream_one(reqs[0]):
                yield chunk
            return
        queue: asyncio.Queue[tuple[int, dict[str, Any] | None]] = asyncio.Queue()

        async def pump(i: int, req: SingleRequest) -> None:
            try:
                async for chunk in self.stream_one(req):
                    await queue.put((i, chunk))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(reqs)]
        try:
            remaining = len(tasks)
            while remaining:
                i, chunk = await queue.get()
                if chunk is None:
                    remaining -= 1
                    continue
                chunk["index"] = i
                yield chunk
        finally:
            for t in tasks:
                t.cancel()
