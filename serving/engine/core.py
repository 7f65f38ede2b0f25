"""The model loop's owner: loads the model, sizes the KV pool, steps the scheduler."""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
import torch

from kiln.models.bert import BertModel
from kiln.models.dummy import has_tokenizer
from kiln.models.loader import read_config
from kiln.models.pooling import PoolingConfig, pool, read_pooling_config
from kiln.models.registry import EMBEDDING, GENERATION, model_class, model_kind
from kiln.ops.tensor_parallel import TensorParallel
from kiln.serving.engine.device import resolve_device
from kiln.serving.engine.expert_recorder import DISABLED as EXPERT_RECORDER_DISABLED
from kiln.serving.engine.expert_recorder import ExpertRecorder
from kiln.serving.engine.grammar import GrammarCompiler, grammar_key, grammar_matcher
from kiln.serving.engine.grammar_mask import GrammarMask
from kiln.serving.engine.logprobs import record_input_logprobs, record_logprobs
from kiln.serving.engine.model_runner import ModelRunner
from kiln.serving.engine.output import token_output
from kiln.serving.engine.overlap import InFlight, OverlapWorker
from kiln.serving.engine.radix_cache import RadixCache
from kiln.serving.engine.rank_model import build_rank_model, locate_checkpoint
from kiln.serving.engine.request import Req
from kiln.serving.engine.sampler import apply_penalties, edits_logits, sample
from kiln.serving.engine.scheduler import ScheduledBatch, Scheduler
from kiln.serving.engine.step_channel import StepChannel
from kiln.serving.engine.weight_update import WeightUpdater
from kiln.serving.messages import (
    ControlReply,
    EngineInfo,
    EngineStats,
    ExpertDistribution,
    FinishAbort,
    GenerateRequest,
    PauseMode,
    RequestLimits,
    TokenOutput,
    UpdateWeights,
)
from kiln.serving.request_checks import InvalidRequest, check_request
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer

if TYPE_CHECKING:  # imported with the first grammar (grammar.py)
    import xgrammar as xgr

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 10.0


class EngineCore:
    """Rank 0's engine. With tensor parallelism, `channel` carries each step to the other ranks, which
    process.py started, and names the group they share the model over. `on_located` hears the checkpoint
    folder and whether a tokenizer is used, before the weights load."""

    def __init__(self, args: ServerArgs, channel: StepChannel | None = None, on_located: Callable[[Path, bool], None] | None = None):
        tp = channel.tp if channel else TensorParallel()
        if args.tp_size != tp.size:
            raise ValueError(f"--tp-size {args.tp_size} runs in `kiln serve` or kiln.Engine, which start the ranks")
        self.args = args
        self.device = resolve_device(args.device)
        t0 = time.monotonic()
        self.checkpoint = locate_checkpoint(args)
        t_convert = time.monotonic()
        self.cfg = read_config(self.checkpoint)
        # A dummy model's folder may hold only config.json: then it serves ids, as with --skip-tokenizer-init.
        untokenized = args.load_format == "dummy" and not args.tokenizer_path and not has_tokenizer(self.checkpoint)
        if untokenized and not args.skip_tokenizer_init:
            log.info("no tokenizer in %s: requests must send input_ids (as with --skip-tokenizer-init)", self.checkpoint)
        tokenized = not (args.skip_tokenizer_init or untokenized)
        if on_located is not None:
            on_located(self.checkpoint, tokenized)
        self.tokenizer = load_tokenizer(args.tokenizer_path or str(self.checkpoint)) if tokenized else None
        self.kind = model_kind(self.cfg, args.is_embedding)
        if tp.size > 1 and self.kind != GENERATION:
            raise ValueError(f"--tp-size > 1 serves generation models only; this one is a {self.kind} model")
        if self.kind != GENERATION and self.tokenizer is not None:
            # BERT derives a text pair's token types from its first separator, which only the tokenizer knows.
            self.cfg.raw.setdefault("sep_token_id", self.tokenizer.sep_token_id)
        t_build = time.monotonic()
        built = build_rank_model(args, self.device, tp, self.checkpoint, self.cfg, zeroed_pool=self.device.type == "cpu" and self._overlaps())
        self.model, self.dtype, self.pool, self.compiled = built.model, built.dtype, built.pool, built.compiled
        self.quantization, self.quantized_layers, self.quantized_dense_from_rows = built.quantization, built.quantized_layers, built.quantized_dense_from_rows
        self.context_len, self.max_running, self.graph_reserve = built.context_len, built.max_running, built.graph_reserve
        self.expert_recorder = None
        if args.expert_distribution_recorder_mode:
            out_dir = Path(args.expert_distribution_recorder_dir or Path(args.cache_dir) / "expert_distribution")
            self.expert_recorder = ExpertRecorder(self.model, out_dir)
        self.pooling = self._pooling_config() if self.kind == EMBEDDING else None
        self.eos_ids = set(self.cfg.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        chunk = args.chunked_prefill_size or built.profile.chunked_prefill_size
        self.scheduler = Scheduler(
            # Pooled outputs need every token computed in one forward (encoders see both ways): no reuse, no chunks.
            self.pool, None if args.disable_radix_cache or self.kind != GENERATION else RadixCache(), self.max_running, chunk,
            args.schedule_policy, min(1.0, 0.5 * args.schedule_conservativeness), self.eos_ids, self.context_len,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), split_prompts=self.kind == GENERATION,
        )  # fmt: skip
        self.limits = RequestLimits(
            self.kind, self.cfg.vocab_size, self.context_len, self.pool.size, min(self.context_len, self.scheduler.chunk_size),
            has_tokenizer=self.tokenizer is not None,
        )  # fmt: skip
        # Where start-up went, in seconds: the GGUF conversion (0 once cached), tokenizer and weights,
        # KV pool sizing (with the CUDA graph memory probe), Inductor compiling or loading pieces, and the rest
        # of warm-up (the trace and its forward, CUDA graph capture).
        self.startup = {"convert": t_convert - t0, **built.seconds, "total": time.monotonic() - t0}
        self.startup["load"] += t_build - t_convert
        self.startup = {k: round(v, 2) for k, v in self.startup.items()}
        log.info("start-up: %s", ", ".join(f"{k} {v:.1f}s" for k, v in self.startup.items()))
        self.runner = ModelRunner(self.compiled or self.model, self.model, self.pool, self.device, channel)
        self._seeds = torch.Generator().manual_seed(args.random_seed)
        # Only generation has grammars (and a stop token for xgrammar to end on).
        self.grammars = (
            GrammarCompiler(self.tokenizer, self.cfg.vocab_size, self.eos_ids, not args.constrained_json_disable_any_whitespace)
            if self.kind == GENERATION and self.tokenizer is not None
            else None
        )
        self.masks = GrammarMask(self.cfg.vocab_size, self.max_running)
        self.compiling: list[tuple[Req, Future[xgr.CompiledGrammar]]] = []  # constrained requests whose grammar is not ready
        self.weights = WeightUpdater(
            self.model, self.checkpoint, Path(args.cache_dir), args.is_embedding, self.quantization, built.dummy_seed, channel
        )  # fmt: skip
        self.overlap = OverlapWorker(self.runner, self.eos_ids, self.max_running) if self._overlaps() else None
        self.inflight: InFlight | None = None  # the launched step whose tokens the host has not read
        self._held: list[TokenOutput] = []  # outputs of a step finished outside step(), sent by the next one
        self.paused = False
        self._generated: deque[tuple[float, int]] = deque()  # (time, output tokens) per step, for gen_throughput

    def _overlaps(self) -> bool:
        # Pooled models finish in the step that computes them: nothing to overlap.
        return self.args.enable_overlap_schedule and not self.args.disable_overlap_schedule and self.kind == GENERATION

    def _pooling_config(self) -> PoolingConfig:
        default = PoolingConfig("cls" if model_class(self.cfg) is BertModel else "last", True)
        normalize = None if self.args.normalize_embeddings is None else self.args.normalize_embeddings == "true"
        return read_pooling_config(self.checkpoint, default, self.args.pooling_method, normalize)

    def engine_info(self) -> EngineInfo:
        """What the HTTP side is told once, when the engine is ready."""
        return EngineInfo(
            model_kind=self.kind,
            model_type=self.cfg.model_type,
            architectures=self.cfg.architectures,
            checkpoint=str(self.checkpoint),
            limits=self.limits,
            max_running_requests=self.max_running,
            max_req_input_len=self.context_len - 1,
            chunked_prefill_size=self.scheduler.chunk_size,
            dtype_resolved=str(self.dtype).removeprefix("torch."),
            device_resolved=str(self.device),
            startup_seconds=self.startup,
            quantization={"mode": self.quantization, "layers": self.quantized_layers, "dense_from_rows": self.quantized_dense_from_rows},
        )

    def stats(self) -> EngineStats:
        """The figures /get_server_info, /get_load and /metrics report."""
        compiled = {**self.compiled.counters(), "cuda_graph_reserved_mb": round(self.graph_reserve / 1e6, 1)} if self.compiled else {"enabled": False}
        sched, cache = self.scheduler, self.scheduler.cache
        used = self.pool.size - self.pool.free_slots - (cache.evictable_size() if cache else 0)
        self._trim_generated()
        span = max(time.monotonic() - self._generated[0][0], 1.0) if self._generated else 1.0
        return EngineStats(
            num_running_reqs=len(sched.running),
            num_waiting_reqs=len(sched.waiting) + len(self.compiling),
            free_slots=self.pool.free_slots,
            available_slots=sched.available(),
            cached_tokens_in_tree=cache.total_size() if cache else 0,
            total_retractions=sched.total_retractions,
            num_used_tokens=used,
            token_usage=used / self.pool.size,
            cache_hit_rate=sched.admitted_cached_tokens / sched.admitted_tokens if sched.admitted_tokens else 0.0,
            gen_throughput=sum(n for _, n in self._generated) / span,
            num_retracted_reqs=sum(1 for r in sched.waiting if r.retractions),
            paused=self.paused,
            compile=compiled,
        )

    def _trim_generated(self) -> None:
        horizon = time.monotonic() - THROUGHPUT_WINDOW_S
        while self._generated and self._generated[0][0] < horizon:
            self._generated.popleft()

    def add(self, msg: GenerateRequest) -> list[TokenOutput]:
        """Queues a request, or refuses it (a 400 for its client) when it breaks a rule: defence in depth,
        so that no id outside the vocabulary or length past the context ever reaches a kernel."""
        seed = int(torch.randint(0, 2**62, (), generator=self._seeds))
        params = msg.params if self.kind == GENERATION else msgspec.structs.replace(msg.params, max_new_tokens=0)
        try:
            check_request(msgspec.structs.replace(msg, params=params), self.limits)
            req = Req(msg.rid, msg.input_ids, params, seed, msg.logprob)
        except (InvalidRequest, ValueError, TypeError, OverflowError) as exc:
            log.warning("refused request %s: %s", msg.rid, exc)
            return [TokenOutput(msg.rid, [], len(msg.input_ids), 0, FinishAbort(str(exc), 400))]
        key = grammar_key(msg.params) if self.grammars else None
        if key is None:
            self.scheduler.add(req)
        else:
            self.compiling.append((req, self.grammars.compile(key)))
        return []

    def _admit_compiled(self) -> list[TokenOutput]:
        """Hands requests whose grammar is compiled to the scheduler; a grammar that failed refuses its request."""
        if self.compiling and not self.scheduler.has_work:
            wait([f for _, f in self.compiling], timeout=0.05, return_when=FIRST_COMPLETED)  # rather than spin
        outputs, still = [], []
        for req, future in self.compiling:
            if not future.done():
                still.append((req, future))
            elif future.exception() is not None:
                req.finish_reason = FinishAbort(str(future.exception()), 400)
                outputs.append(token_output(req))
            else:
                req.grammar = grammar_matcher(future.result())
                self.scheduler.add(req)
        self.compiling = still
        return outputs

    def flush_cache(self) -> bool:
        self._held += self._drain()
        return self.scheduler.flush_cache()

    def pause(self, mode: PauseMode) -> list[TokenOutput]:
        """Stops stepping; `abort` ends every request, `retract` frees the running ones' K/V, `in_place` keeps it."""
        outputs = self.abort("") if mode == "abort" else self._drain()
        if mode == "retract":
            self.scheduler.retract_all()
        self.paused = True
        return outputs

    def resume(self) -> None:
        self.paused = False

    def update_weights(self, msg: UpdateWeights) -> ControlReply:
        """Copies a checkpoint into the served parameters. Requests still running (paused in place) are
        retracted, and the cache flushed, since their K/V came from the old weights."""
        self._held += self._drain()
        ok, message = self.weights.update(msg.model_path, msg.load_format)
        if ok:
            self.checkpoint = self.weights.checkpoint
            self.scheduler.retract_all()
            if msg.flush_cache:
                self.scheduler.reset_cache()
        return ControlReply(ok, message)

    def expert_distribution(self, msg: ExpertDistribution) -> ControlReply:
        if self.expert_recorder is None:
            return ControlReply(False, EXPERT_RECORDER_DISABLED)
        if msg.action == "start":
            self.expert_recorder.start()
        elif msg.action == "stop":
            self.expert_recorder.stop()
        else:
            return ControlReply(True, str(self.expert_recorder.dump()))
        return ControlReply(True)

    def abort(self, rid: str, message: str | None = None) -> list[TokenOutput]:
        # The step in flight first, so that no aborted request keeps a placeholder; its outputs for the aborted
        # requests go before their abort, the others wait for the next step.
        self._held += self._drain()
        outputs = [o for o in self._held if not rid or o.rid == rid]
        self._held = [o for o in self._held if rid and o.rid != rid]
        hit = [r for r, _ in self.compiling if not rid or r.rid == rid]
        self.compiling = [(r, f) for r, f in self.compiling if r not in hit]
        for req in hit:
            req.finish_reason = FinishAbort(message or "Abort before prefill")
        return outputs + [token_output(r) for r in hit + self.scheduler.abort(rid, message)]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.compiling) or self.inflight is not None or bool(self._held)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        """Schedule, run, sample, process outputs; finished requests are released by the scheduler.

        With overlap, the step scheduled here is launched on the worker, and the previous one's tokens are
        processed while it runs; a step that cannot overlap first waits for the one in flight."""
        outputs, self._held = self._held + self._admit_compiled(), []
        if self.inflight is not None and self.scheduler.must_retract():
            outputs += self._drain()  # a retracted request keeps its tokens: they must be known
        batch = self.scheduler.schedule()
        if batch is None:
            return outputs + self._drain()
        if self.kind != GENERATION:
            return outputs + self._pooled_step(batch)
        if self.overlap is None or not self._can_overlap(batch):
            outputs += self._drain()
            return outputs + self._sync_step(_without_finished(batch))
        previous, self.inflight = self.inflight, self.overlap.launch(batch, self.scheduler)
        return outputs + (self._finish(previous) if previous else [])

    def _can_overlap(self, batch: ScheduledBatch) -> bool:
        """Whether the batch may run before the previous step's tokens are on the host. Not when a row needs
        them or needs the host during sampling: a grammar (the next mask needs this token accepted),
        repetition, frequency or presence penalties (they count the tokens' values), prompt logprobs (scored
        on the host per chunk), max_new_tokens = 0 (it ends without a token, so the next step has nothing to
        feed), and logit_bias (checked on the host while sampling: a bad one must end its request alone)."""
        for req, ids in zip(batch.reqs, batch.extends):
            p = req.params
            if req.grammar is not None or p.repetition_penalty != 1.0 or p.frequency_penalty or p.presence_penalty:
                return False
            if p.logit_bias or p.max_new_tokens == 0:
                return False
            lo, hi = req.input_rows(len(ids))
            if hi > lo:
                return False
        return True

    def _drain(self) -> list[TokenOutput]:
        """Waits for the step in flight and processes its tokens."""
        inflight, self.inflight = self.inflight, None
        return self._finish(inflight) if inflight else []

    def _finish(self, step: InFlight) -> list[TokenOutput]:
        """Reads an overlapped step's tokens: each replaces its placeholder and the finish rules run. A request
        found finished here had a token computed for it by the step launched since: that token is dropped."""
        try:
            ids, logprobs = step.result.result()
            tokens = ids.tolist()
        except Exception as exc:
            return self._overlap_failed(exc)
        outputs = []
        for j, (req, at) in enumerate(zip(step.reqs, step.at)):
            if req.finished:
                continue
            later = req.output_ids[at + 1 :]  # the placeholder of the step in flight, if it has one
            del req.output_ids[at:]
            self.scheduler.record(req, tokens[j])
            if logprobs is not None and req.logprob:
                self._per_request(req, record_logprobs, req, logprobs[j], tokens[j])
            outputs.append(token_output(req))
            if not req.finished:
                req.output_ids += later
        self._generated.append((time.monotonic(), len(step.reqs)))
        return outputs

    def _overlap_failed(self, exc: Exception) -> list[TokenOutput]:
        """A failed forward or sampling. The steps launched after it read its placeholders, and its prompt
        chunks entered the cache at launch: every running request ends and the cache is emptied."""
        log.error("forward failed: %s", traceback.format_exc())
        if self.inflight is not None:
            self.inflight.result.exception()  # let the step in flight end before its requests are released
            self.inflight = None
        running = list(self.scheduler.running)
        for req in running:
            known = next((i for i, t in enumerate(req.output_ids) if t < 0), len(req.output_ids))
            del req.output_ids[known:]
        outputs = self._fail(running, FinishAbort(f"engine error: {type(exc).__name__}: {exc}"))
        self.scheduler.reset_cache()
        return outputs

    def _sync_step(self, batch: ScheduledBatch) -> list[TokenOutput]:
        """Runs the batch and processes its tokens before returning."""
        if not batch.reqs:
            return []
        # Rows still mid-prefill have no next token to sample.
        ready = [i for i, (r, ids) in enumerate(zip(batch.reqs, batch.extends)) if r.kv_len + len(ids) == r.num_tokens]
        mask = self.masks.start([batch.reqs[i] for i in ready])
        try:
            logits, prompt_logits = self.runner.forward(batch)
        except Exception as exc:
            # Nothing per request runs inside the forward (admission checked every input), so this is the
            # engine's own failure: the batch's requests end, waiting ones and the engine carry on.
            log.error("forward failed: %s", traceback.format_exc())
            if mask is not None:
                mask.result()  # the matchers must be idle before the requests are dropped
            return self._fail(batch.reqs, FinishAbort(f"engine error: {type(exc).__name__}: {exc}"))
        for i, rows in prompt_logits.items():
            self._per_request(batch.reqs[i], record_input_logprobs, batch.reqs[i], torch.log_softmax(rows, dim=-1), len(batch.extends[i]))
        next_ids = [-1] * len(batch.reqs)
        logprobs = self._sample(logits, ready, [batch.reqs[i] for i in ready], mask, next_ids)
        before = [len(r.output_ids) for r in batch.reqs]
        self.scheduler.process(batch, next_ids)
        self._generated.append((time.monotonic(), len(ready)))
        for j, i in enumerate(ready):
            req = batch.reqs[i]
            if logprobs is not None and req.logprob and len(req.output_ids) > before[i]:
                self._per_request(req, record_logprobs, req, logprobs[j], next_ids[i])
        return [token_output(r) for r in batch.reqs if r.kv_len == r.num_tokens - 1 or r.finished]

    def _sample(self, logits: torch.Tensor, ready: list[int], reqs: list[Req], mask: Any, next_ids: list[int]) -> torch.Tensor | None:
        """Fills next_ids[ready]; returns the rows' logprobs when a request asked for them.

        Penalties, grammar masks and sampling run batched; if that fails, each row runs alone and only
        the requests whose own parameters fail are ended (a finished request samples nothing).
        """
        if not ready:
            return None
        # The rows are edited in place below; a batch whose rows all sample and that nothing edits (greedy or
        # plain sampling, the common case) skips the copy, a [B, vocab] float32 one.
        rows = logits if len(ready) == len(logits) and mask is None and not any(edits_logits(r) for r in reqs) else logits[ready]
        # Logprobs of the model's own distribution: before penalties, grammar, temperature and filtering.
        logprobs = torch.log_softmax(rows, dim=-1) if any(r.logprob for r in reqs) else None
        try:
            apply_penalties(rows, reqs, self.eos_ids)
            if mask is not None:
                self.masks.apply(rows, mask)
            for i, tok in zip(ready, sample(rows, reqs)):
                next_ids[i] = tok
        except Exception:
            log.warning("batched sampling failed; sampling each request alone: %s", traceback.format_exc())
            for j, (i, req) in enumerate(zip(ready, reqs)):
                next_ids[i] = self._per_request(req, self._sample_row, logits[i : i + 1], req, mask, j)
        return logprobs

    def _sample_row(self, row: torch.Tensor, req: Req, mask: Any, j: int) -> int:
        apply_penalties(row, [req], self.eos_ids)
        if mask is not None:
            self.masks.apply(row, mask, only=j)
        return sample(row, [req])[0]

    def _per_request(self, req: Req, fn: Any, *args: Any) -> Any:
        """Runs one request's own work; a failure ends that request alone."""
        try:
            return fn(*args)
        except Exception as exc:
            log.error("request %s failed: %s", req.rid, traceback.format_exc())
            self.scheduler.fail(req, FinishAbort(f"request failed: {type(exc).__name__}: {exc}"))
            return -1

    def _fail(self, reqs: list[Req], reason: FinishAbort) -> list[TokenOutput]:
        for req in reqs:
            self.scheduler.fail(req, reason)
        return [token_output(r) for r in reqs]

    def _pooled_step(self, batch: ScheduledBatch) -> list[TokenOutput]:
        """Models without generation: one vector per request (all computed whole), and they are done."""
        try:
            hidden, lens = self.runner.hidden_states(batch)
            vectors = pool(hidden, lens, self.pooling) if self.pooling else self.model.classify(hidden, lens)
        except Exception as exc:
            log.error("forward failed: %s", traceback.format_exc())
            return self._fail(batch.reqs, FinishAbort(f"engine error: {type(exc).__name__}: {exc}"))
        self.scheduler.process(batch, [-1] * len(batch.reqs))
        outputs = [token_output(r) for r in batch.reqs]
        for out, row in zip(outputs, vectors.tolist()):
            out.embedding = row
        return outputs


def _without_finished(batch: ScheduledBatch) -> ScheduledBatch:
    """A batch planned while a step was in flight, once that step's tokens are known: requests that step
    finished are gone (their slots already freed), and the others' placeholders become the tokens."""
    reqs = [r for r in batch.reqs if not r.finished]
    extends = [r.ids_between(r.kv_len, r.kv_len + len(ids)) for r, ids in zip(batch.reqs, batch.extends) if not r.finished]
    return ScheduledBatch(reqs, extends)
