"""The tokenizer side of /generate: validate, tokenize, submit, detokenize, shape the response."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import msgspec

from kiln.serving.api.detokenizer import IncrementalDetokenizer, trim_stop
from kiln.serving.api.engine_client import EngineUnavailable
from kiln.serving.api.engine_group import EngineGroup
from kiln.serving.api.generation_gate import GenerationGate
from kiln.serving.api.metrics import ServingMetrics
from kiln.serving.api.served_model import ServedModel
from kiln.serving.api.schemas import GenerateReqInput
from kiln.serving.api.validator import Validator
from kiln.serving.messages import FinishAbort, FinishStop, GenerateRequest, LogprobRequest, TokenOutput
from kiln.serving.sampling_params import SEED_RANGE, InvalidRequest, SamplingParams

T = TypeVar("T")

LOGPROB_KEYS = (
    "input_token_logprobs",
    "output_token_logprobs",
    "input_top_logprobs",
    "output_top_logprobs",
    "input_token_ids_logprobs",
    "output_token_ids_logprobs",
)


@dataclass
class SingleRequest:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    logprob: LogprobRequest | None = None
    logprob_text: bool = False


async def gather_or_cancel(work: Iterable[Awaitable[T]]) -> list[T]:
    """Like asyncio.gather, but the first failure cancels the rest (their requests are aborted)."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        for t in tasks:
            t.cancel()


def _raise_if_refused(out: TokenOutput) -> None:
    """A request the engine refused (400) or lost (503) is an error for its client, not a response."""
    reason = out.finish_reason
    if isinstance(reason, FinishAbort) and reason.status_code == 400:
        raise InvalidRequest(reason.message)
    if isinstance(reason, FinishAbort) and reason.status_code == 503:
        raise EngineUnavailable(reason.message)


class TokenizerManager:
    def __init__(
        self, engine: EngineGroup, tokenizer: Any | None, validator: Validator, served: ServedModel, metrics: ServingMetrics | None,
        incremental_ids: bool = False, workers: int = 2,
    ):  # fmt: skip
        self.engine = engine
        self.tokenizer = tokenizer  # None with --skip-tokenizer-init: ids in, ids out
        self.incremental_ids = incremental_ids
        self.validator = validator
        self.served = served
        self.metrics = metrics
        self.gate = GenerationGate()
        self.context_len = engine.info.limits.context_length
        self.vocab_size = engine.info.limits.vocab_size
        # Tokenizing a long text takes seconds; the tokenizers library releases the GIL, so threads keep the loop free.
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="kiln-tokenize")

    # ---- off the event loop ----

    def require_tokenizer(self, what: str) -> Any:
        if self.tokenizer is None:
            raise InvalidRequest(f"{what} needs the tokenizer, which this server skips (--skip-tokenizer-init): send input_ids.")
        return self.tokenizer

    async def encode(self, texts: list[str], **kwargs: Any) -> list[list[int]]:
        self.require_tokenizer("Text input")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: [self.tokenizer(t, **kwargs).input_ids for t in texts])

    async def encode_pairs(self, first: str, seconds: list[str]) -> list[list[int]]:
        self.require_tokenizer("Text input")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: [self.tokenizer(first, s).input_ids for s in seconds])

    async def decode(self, seqs: list[list[int]], **kwargs: Any) -> list[str]:
        self.require_tokenizer("Text output")
        return await asyncio.get_running_loop().run_in_executor(self._pool, lambda: [self.tokenizer.decode(s, **kwargs) for s in seqs])

    # ---- turning a request body into single requests ----

    async def parse(self, obj: GenerateReqInput) -> tuple[list[SingleRequest], bool]:
        """Returns the single requests (validated as the engine will check them) and whether the input was a batch."""
        v = self.validator
        if (obj.text is None) == (obj.input_ids is None):
            raise InvalidRequest("Either text, input_ids or input_embeds should be provided.")
        if obj.text is not None:
            is_batch, texts = v.texts(obj.text)
            prompts = await self.encode(texts)
        else:
            is_batch, prompts = v.token_ids(obj.input_ids)
        count = len(prompts)
        raw_params = obj.sampling_params if isinstance(obj.sampling_params, list) else [obj.sampling_params or SamplingParams()] * count
        params_list = v.per_input(raw_params, count, "sampling_params")
        rids = v.rids(obj.rid, count)
        logprobs = self._logprob_list(obj, count)
        singles = []
        for i, (ids, params) in enumerate(zip(prompts, params_list)):
            copies = v.n(params.n)
            params = msgspec.structs.replace(params, n=1)
            for j in range(copies):
                rid = rids[i] if copies == 1 else f"{rids[i]}-{j}"
                singles.append(self.single(rid, ids, self._seeded(params, j), logprobs[i], obj.return_text_in_logprobs))
        return singles, is_batch or len(singles) > 1

    @staticmethod
    def _seeded(params: SamplingParams, j: int) -> SamplingParams:
        """Each of n samples needs its own stream of randomness, reproducible from the one seed."""
        if params.sampling_seed is None or j == 0:
            return params
        seed = params.sampling_seed + j
        return msgspec.structs.replace(params, sampling_seed=seed if seed < SEED_RANGE[1] else seed - SEED_RANGE[1] + SEED_RANGE[0])

    def single(self, rid: str, ids: list[int], params: SamplingParams, logprob: LogprobRequest | None = None, logprob_text: bool = False) -> SingleRequest:
        """One engine request, checked as the engine's admission will check it."""
        self.validator.engine_request(GenerateRequest(rid, ids, params, logprob))
        return SingleRequest(rid, ids, params, logprob, logprob_text)

    def _logprob_list(self, obj: GenerateReqInput, count: int) -> list[LogprobRequest | None]:
        v = self.validator
        flags = v.per_input(obj.return_logprob, count, "return_logprob")
        starts = v.per_input(obj.logprob_start_len, count, "logprob_start_len")
        tops = v.per_input(obj.top_logprobs_num, count, "top_logprobs_num")
        wanted: list[Any] = [None] * count
        if obj.token_ids_logprob:
            is_batch, seqs = v.token_ids(obj.token_ids_logprob, "token_ids_logprob")
            wanted = v.per_input(seqs, count, "token_ids_logprob") if is_batch else seqs * count
        return [LogprobRequest(top, ids, start) if flag else None for flag, start, top, ids in zip(flags, starts, tops, wanted)]

    # ---- running them ----

    async def stream_one(self, req: SingleRequest, partial: bool = True) -> AsyncIterator[dict[str, Any]]:
        """Yields the response object after every engine output (cumulative text and ids), or only the last.

        The request's id must be open in the engine group (run_all and stream_all open it)."""
        start = time.monotonic()
        p = req.params
        detok = IncrementalDetokenizer(self.tokenizer, req.input_ids, p.skip_special_tokens, p.spaces_between_special_tokens) if self.tokenizer else None
        hold = max((len(s) for s in p.stop_strings), default=1) - 1
        output_ids: list[int] = []
        lp: dict[str, list[Any]] = {k: [] for k in LOGPROB_KEYS}
        timer = self.metrics.timer(streaming=partial) if self.metrics else None
        async for out in self.engine.generate(GenerateRequest(req.rid, req.input_ids, p, req.logprob)):
            _raise_if_refused(out)
            if timer:
                timer.output(out)
            output_ids += out.new_ids
            if req.logprob:
                self._add_logprobs(lp, out, req)
            finish = out.finish_reason
            new = out.new_ids
            if isinstance(finish, FinishStop) and isinstance(finish.matched, int) and not p.no_stop_trim and new:
                new = new[:-1]  # the matched stop token is not part of the text
            if detok is not None:
                detok.add(new, final=finish is not None)
            if finish is None and not partial:
                continue
            body: dict[str, Any] = {} if out.embedding is None else {"embedding": out.embedding}
            if detok is not None:
                text = detok.text if finish is not None else detok.text[: len(detok.text) - hold]
                body["text"] = trim_stop(text, finish, p.no_stop_trim) if finish is not None else text
            meta = self._logprob_meta(req, lp) if req.logprob else {}
            yield body | {
                "output_ids": list(out.new_ids) if partial and self.incremental_ids else list(output_ids),
                "meta_info": meta | {
                    "id": req.rid,
                    "finish_reason": None if finish is None else msgspec.to_builtins(finish),
                    "prompt_tokens": out.prompt_tokens or len(req.input_ids),
                    "weight_version": self.served.weight_version,
                    "total_retractions": out.retractions,
                    "completion_tokens": len(output_ids),
                    "cached_tokens": out.cached_tokens,
                    "cached_tokens_details": None,
                    "e2e_latency": time.monotonic() - start,
                    "response_sent_to_client_ts": time.time(),
                },
            }

    def _add_logprobs(self, lp: dict[str, list[Any]], out: TokenOutput, req: SingleRequest) -> None:
        text = (lambda t: self.tokenizer.decode([t])) if req.logprob_text and self.tokenizer else (lambda t: None)
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
        return (await self.run_all([req]))[0]

    async def _last(self, req: SingleRequest) -> dict[str, Any]:
        last: dict[str, Any] = {}
        async for last in self.stream_one(req, partial=False):
            pass
        return last

    async def run_all(self, reqs: list[SingleRequest]) -> list[dict[str, Any]]:
        rids = [r.rid for r in reqs]
        async with self.gate.request():
            queues = self.engine.open(rids, [r.input_ids for r in reqs])
            try:
                return await gather_or_cancel(self._last(r) for r in reqs)
            finally:
                self.engine.close(rids, queues)

    async def stream_all(self, reqs: list[SingleRequest], is_batch: bool) -> AsyncIterator[dict[str, Any]]:
        """Interleaves the streams of several requests; batch chunks carry their `index`."""
        rids = [r.rid for r in reqs]
        async with self.gate.request():
            queues = self.engine.open(rids, [r.input_ids for r in reqs])
            try:
                if not is_batch:
                    async for chunk in self.stream_one(reqs[0]):
                        yield chunk
                    return
                async for chunk in self._merged(reqs):
                    yield chunk
            finally:
                self.engine.close(rids, queues)

    async def _merged(self, reqs: list[SingleRequest]) -> AsyncIterator[dict[str, Any]]:
        queue: asyncio.Queue[tuple[int, dict[str, Any] | BaseException | None]] = asyncio.Queue()

        async def pump(i: int, req: SingleRequest) -> None:
            try:
                async for chunk in self.stream_one(req):
                    await queue.put((i, chunk))
            except Exception as exc:  # handed to the consumer, which raises it
                await queue.put((i, exc))
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
                if isinstance(chunk, BaseException):
                    raise chunk
                chunk["index"] = i
                yield chunk
        finally:
            for t in tasks:
                t.cancel()
