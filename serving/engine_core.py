"""The model loop's owner: loads the model, sizes the KV pool, steps the scheduler."""

import logging
import os
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

import msgspec
import torch
import xgrammar as xgr

from kiln.compiler.cache import cache_key, use_cache_dir
from kiln.compiler.compiled_model import CompiledModel
from kiln.compiler.cuda_graphs import probe_graph_memory
from kiln.compiler.profile import Profile
from kiln.models.bert import BertModel
from kiln.models.loader import load_model, read_config, resolve_checkpoint
from kiln.models.pooling import PoolingConfig, pool, read_pooling_config
from kiln.models.registry import EMBEDDING, GENERATION, model_class, model_kind
from kiln.serving.grammar import GrammarCompiler, grammar_key
from kiln.serving.grammar_mask import GrammarMask
from kiln.serving.kv_pool import KVPool
from kiln.serving.messages import GenerateRequest, TokenOutput
from kiln.serving.model_runner import ModelRunner
from kiln.serving.radix_cache import RadixCache
from kiln.serving.request import Req
from kiln.serving.sampler import apply_penalties, sample
from kiln.serving.scheduler import ScheduledBatch, Scheduler
from kiln.serving.server_args import ServerArgs
from kiln.serving.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class EngineCore:
    def __init__(self, args: ServerArgs):
        self.args = args
        self.device = resolve_device(args.device)
        self.dtype = resolve_dtype(args.dtype, self.device)
        t0 = time.monotonic()
        self.checkpoint = resolve_checkpoint(args.model_path, Path(args.cache_dir))
        self.cfg = read_config(self.checkpoint)
        self.tokenizer = load_tokenizer(args.tokenizer_path or str(self.checkpoint))
        self.kind = model_kind(self.cfg, args.is_embedding)
        if self.kind != GENERATION:
            # BERT derives a text pair's token types from its first separator, which only the tokenizer knows.
            self.cfg.raw.setdefault("sep_token_id", self.tokenizer.sep_token_id)
        free_before = available_memory(self.device)
        self.model = load_model(self.checkpoint, self.cfg, self.dtype, self.device, args.is_embedding)
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        log.info("loaded %s (%.0f MB, %s on %s) in %.1fs", self.cfg.architectures[0], weights / 1e6, self.dtype, self.device, time.monotonic() - t0)

        self.pooling = self._pooling_config() if self.kind == EMBEDDING else None
        self.context_len = args.context_length or getattr(self.model, "max_tokens", self.cfg.max_position_embeddings)
        profile = Profile.for_device(self.device.type, args.profile).narrowed(args.cuda_graph_max_bs)
        self.graph_reserve = 0
        if self.device.type == "cuda" and not args.disable_compile and not args.disable_cuda_graph:
            # The decode graphs share one memory pool, which the largest bucket sizes; a
            # quarter more covers the compiled pieces' own buffers.
            kv_shape = (self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim)
            self.graph_reserve = int(1.25 * probe_graph_memory(self.model, kv_shape, self.dtype, max(profile.decode_batch_sizes)))
            log.info("reserved %.0f MB for decode CUDA graphs before sizing the KV pool", self.graph_reserve / 1e6)
        per_token = KVPool.bytes_per_token(self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim, self.dtype)
        num_slots = args.max_total_tokens
        if num_slots is None:
            fraction = args.mem_fraction_static or (0.85 if self.device.type == "cuda" else 0.3)
            num_slots = int((free_before * fraction - weights - self.graph_reserve) // per_token)
        if num_slots < 16:
            raise RuntimeError(f"KV pool would hold only {num_slots} tokens; raise --mem-fraction-static or --max-total-tokens")
        self.max_running = args.max_running_requests or (256 if self.device.type == "cuda" else 64)
        self.pool = KVPool(
            num_slots, self.cfg.num_hidden_layers, self.cfg.num_key_value_heads, self.cfg.head_dim,
            self.dtype, self.device, self.max_running, self.context_len,
        )  # fmt: skip
        log.info("KV pool: %d tokens, %.2f GB", num_slots, num_slots * per_token / 1e9)
        self.eos_ids = set(self.cfg.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)
        chunk = args.chunked_prefill_size or profile.chunked_prefill_size
        self.scheduler = Scheduler(
            # Pooled outputs need every token computed in one forward (encoders see both ways): no reuse, no chunks.
            self.pool, None if args.disable_radix_cache or self.kind != GENERATION else RadixCache(), self.max_running, chunk,
            args.schedule_policy, min(1.0, 0.5 * args.schedule_conservativeness), self.eos_ids, self.context_len,
            lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), split_prompts=self.kind == GENERATION,
        )  # fmt: skip
        self.compiled = None if args.disable_compile else self._compile(profile)
        self.runner = ModelRunner(self.compiled or self.model, self.model, self.pool, self.device)
        self._seeds = torch.Generator().manual_seed(args.random_seed)
        # Only generation has grammars (and a stop token for xgrammar to end on).
        self.grammars = (
            GrammarCompiler(self.tokenizer, self.cfg.vocab_size, self.eos_ids, not args.constrained_json_disable_any_whitespace)
            if self.kind == GENERATION
            else None
        )
        self.masks = GrammarMask(self.cfg.vocab_size, self.max_running)
        self.compiling: list[tuple[Req, Future[xgr.CompiledGrammar]]] = []  # constrained requests whose grammar is not ready

    def _pooling_config(self) -> PoolingConfig:
        default = PoolingConfig("cls" if model_class(self.cfg) is BertModel else "last", True)
        normalize = None if self.args.normalize_embeddings is None else self.args.normalize_embeddings == "true"
        return read_pooling_config(self.checkpoint, default, self.args.pooling_method, normalize)

    def _compile(self, profile: Profile) -> CompiledModel:
        key = cache_key(self.cfg.raw, self.dtype, self.device, profile)
        cache = Path(self.args.compile_cache_dir or Path(self.args.cache_dir) / "compile") / key
        use_cache_dir(cache)
        compiled = CompiledModel(self.model, profile, cuda_graphs=not self.args.disable_cuda_graph)
        log.info("compiling %d buckets %s (cache %s)", len(compiled.buckets), compiled.buckets, cache)
        compiled.warm_up((self.pool.k, self.pool.v), self.pool.req_to_token)
        return compiled

    def info(self) -> dict[str, Any]:
        """The figures /get_server_info and the tokenizer side need."""
        return {
            "max_total_num_tokens": self.pool.size,
            "max_running_requests": self.max_running,
            "max_req_input_len": self.context_len - 1,
            "context_length": self.context_len,
            "dtype_resolved": str(self.dtype).removeprefix("torch."),
            "device_resolved": str(self.device),
            "checkpoint": str(self.checkpoint),
            "model_type": self.cfg.model_type,
            "architectures": self.cfg.architectures,
            "model_kind": self.kind,
            "num_running_reqs": len(self.scheduler.running),
            "num_waiting_reqs": len(self.scheduler.waiting) + len(self.compiling),
            "free_slots": self.pool.free_slots,
            "available_slots": self.scheduler.available(),
            "cached_tokens_in_tree": self.scheduler.cache.total_size() if self.scheduler.cache else 0,
            "total_retractions": self.scheduler.total_retractions,
            "chunked_prefill_size": self.scheduler.chunk_size,
            "compile": {**self.compiled.counters(), "cuda_graph_reserved_mb": round(self.graph_reserve / 1e6, 1)} if self.compiled else {"enabled": False},
        }

    def add(self, msg: GenerateRequest) -> list[TokenOutput]:
        seed = int(torch.randint(0, 2**62, (), generator=self._seeds))
        params = msg.params if self.kind == GENERATION else msgspec.structs.replace(msg.params, max_new_tokens=0)
        req = Req(msg.rid, msg.input_ids, params, seed, msg.logprob)
        if req.remaining_tokens() > self.pool.size:
            req.finish_reason = {"type": "abort", "message": f"request needs {req.remaining_tokens()} KV slots; the pool has {self.pool.size}"}
            return [self._output(req)]
        key = grammar_key(msg.params) if self.grammars else None
        if key is None:
            self.scheduler.add(req)
        else:
            self.compiling.append((req, self.grammars.compile(key)))
        return []

    def _admit_compiled(self) -> list[TokenOutput]:
        """Hands requests whose grammar is compiled to the scheduler; a grammar that failed finishes its request."""
        if self.compiling and not self.scheduler.has_work:
            wait([f for _, f in self.compiling], timeout=0.05, return_when=FIRST_COMPLETED)  # rather than spin
        outputs, still = [], []
        for req, future in self.compiling:
            if not future.done():
                still.append((req, future))
            elif future.exception() is not None:
                req.finish_reason = {"type": "abort", "message": f"Invalid grammar: {future.exception()}"}
                outputs.append(self._output(req))
            else:
                req.grammar = xgr.GrammarMatcher(future.result())
                self.scheduler.add(req)
        self.compiling = still
        return outputs

    def flush_cache(self) -> bool:
        return self.scheduler.flush_cache()

    def abort(self, rid: str) -> list[TokenOutput]:
        hit = [r for r, _ in self.compiling if not rid or r.rid == rid]
        self.compiling = [(r, f) for r, f in self.compiling if r not in hit]
        for req in hit:
            req.finish_reason = {"type": "abort", "message": "Abort before prefill"}
        return [self._output(r) for r in hit + self.scheduler.abort(rid)]

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work or bool(self.compiling)

    @torch.inference_mode()
    def step(self) -> list[TokenOutput]:
        failed = self._admit_compiled()
        batch = self.scheduler.schedule()
        if batch is None:
            return failed
        if self.kind != GENERATION:
            return failed + self._pooled_step(batch)
        # Rows still mid-prefill sample nothing (and must not advance a seeded generator).
        ready = [i for i, (r, ids) in enumerate(zip(batch.reqs, batch.extends)) if r.kv_len + len(ids) == r.num_tokens]
        reqs = [batch.reqs[i] for i in ready]
        mask = self.masks.start(reqs)
        logits, prompt_logits = self.runner.forward(batch)
        for i, rows in prompt_logits.items():
            record_input_logprobs(batch.reqs[i], torch.log_softmax(rows, dim=-1), len(batch.extends[i]))
        next_ids = [-1] * len(batch.reqs)
        logprobs = None
        if ready:
            rows = logits[ready]
            if any(r.logprob for r in reqs):
                # Logprobs of the model's own distribution: before penalties, grammar, temperature and filtering.
                logprobs = torch.log_softmax(rows, dim=-1)
            apply_penalties(rows, reqs, self.eos_ids)
            if mask is not None:
                self.masks.apply(rows, mask)
            for i, tok in zip(ready, sample(rows, reqs)):
                next_ids[i] = tok
        before = [len(r.output_ids) for r in batch.reqs] if logprobs is not None else []
        self.scheduler.process(batch, next_ids)
        if logprobs is not None:
            for j, i in enumerate(ready):
                req = batch.reqs[i]
                if req.logprob and len(req.output_ids) > before[i]:
                    record_logprobs(req, logprobs[j], next_ids[i])
        return failed + [self._output(r) for r in batch.reqs if r.kv_len == r.num_tokens - 1 or r.finished]

    def _pooled_step(self, batch: ScheduledBatch) -> list[TokenOutput]:
        """Models without generation: one vector per request (all computed whole), and they are done."""
        hidden, lens = self.runner.hidden_states(batch)
        vectors = pool(hidden, lens, self.pooling) if self.pooling else self.model.classify(hidden, lens)
        self.scheduler.process(batch, [-1] * len(batch.reqs))
        outputs = [self._output(r) for r in batch.reqs]
        for out, row in zip(outputs, vectors.tolist()):
            out.embedding = row
        return outputs

    @staticmethod
    def _output(req: Req) -> TokenOutput:
        start, req.sent = req.sent, len(req.output_ids)
        out = TokenOutput(req.rid, req.output_ids[start:], len(req.input_ids), req.cached_tokens, req.finish_reason, req.retractions)
        if req.logprob and start == 0 and (req.output_ids or req.finished):
            out.input_logprobs = req.input_logprobs
            out.input_top_logprobs = req.input_top_logprobs
            out.input_ids_logprobs = req.input_ids_logprobs
        if req.logprob:
            out.token_logprobs = req.token_logprobs[start:]
            out.top_logprobs = req.top_logprobs[start:]
            out.ids_logprobs = req.ids_logprobs[start:]
        return out


def _scores(req: Req, logprobs: torch.Tensor, tokens: list[int]) -> tuple[list[float], list[list], list[list]]:
    """For rows of logprobs [n, vocab] and the token each row chose: its logprob, the top ones, the asked-for ones."""
    picked = logprobs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
    tops: list[list] = [[] for _ in tokens]
    if req.logprob.top_n:
        values, ids = logprobs.topk(req.logprob.top_n, dim=-1)
        tops = [list(zip(v, t)) for v, t in zip(values.tolist(), ids.tolist())]
    wanted = req.logprob.token_ids or []
    asked = [list(zip(row, wanted)) for row in logprobs[:, wanted].tolist()] if wanted else [[] for _ in tokens]
    return picked, tops, asked


def record_logprobs(req: Req, logprobs: torch.Tensor, token: int) -> None:
    """Appends the logprobs of the request's newest output token (logprobs: [vocab])."""
    picked, tops, asked = _scores(req, logprobs[None], [token])
    req.token_logprobs += picked
    req.top_logprobs += tops
    req.ids_logprobs += asked


def record_input_logprobs(req: Req, logprobs: torch.Tensor, n: int) -> None:
    """Scores the prompt tokens that this step's rows (Req.input_rows, before kv_len advances) predict."""
    lo, hi = req.input_rows(n)
    picked, tops, asked = _scores(req, logprobs, req.input_ids[lo + 1 : hi + 1])
    req.input_logprobs += picked
    req.input_top_logprobs += tops
    req.input_ids_logprobs += asked
    req.input_lp_pos = hi
