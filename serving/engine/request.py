"""One request's state inside the engine, and the rules that finish it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from kiln.serving.engine.noise import as_int64
from kiln.serving.messages import FinishAbort, FinishLength, FinishReason, FinishStop, LogprobRequest
from kiln.serving.sampling_params import SamplingParams

if TYPE_CHECKING:  # imported with the first grammar (grammar.py)
    import xgrammar as xgr


# A stop_regex is searched in the text of this many newest output tokens, so each step costs the same.
STOP_REGEX_TAIL_TOKENS = 32


class Req:
    def __init__(self, rid: str, input_ids: list[int], params: SamplingParams, seed: int, logprob: LogprobRequest | None = None):
        self.rid = rid
        self.input_ids = input_ids
        self.params = params
        self.output_ids: list[int] = []
        self.row = -1  # row of the request-to-slots table, -1 while waiting
        self.kv_len = 0  # tokens whose K/V are in the pool
        self.alloc_len = 0  # slots the row holds: kv_len plus the step in flight
        self.cached_tokens = 0  # prompt tokens found in the radix cache at first admission
        self.prefix_len = 0  # leading slots of the row that belong to the radix cache (locked)
        self.prefix_node = None  # the radix node locked for those slots
        self.retractions = 0
        self.logprob = logprob
        self.token_logprobs: list[float] = []  # aligned with output_ids, when logprob is asked
        self.top_logprobs: list[list[tuple[float, int]]] = []
        self.ids_logprobs: list[list[tuple[float, int]]] = []
        # Input logprobs: the logits at position p score prompt token p + 1.
        start = logprob.start_len if logprob else -1
        self.input_lp_pos = max(start, 1) - 1 if start >= 0 else len(input_ids)  # next position to score
        self.input_logprobs: list[float | None] = [None] if start == 0 else []
        self.input_top_logprobs: list[list[tuple[float, int]]] = [[]] if start == 0 else []
        self.input_ids_logprobs: list[list[tuple[float, int]]] = [[]] if start == 0 else []
        self.admitted = False
        self.arrival = time.monotonic()
        self.queue_time: float | None = None  # seconds from arrival to first admission
        self.finish_reason: FinishReason | None = None
        self.sent = 0  # output ids already reported to the client
        # The sampler's noise key (noise.py); the n samples of one request come with seeds seed + i.
        self.seed = as_int64(params.sampling_seed if params.sampling_seed is not None else seed)
        self.stop_ids = set(params.stop_token_ids or [])
        self.stop_strs = params.stop_strings
        self.max_stop_len = max((len(s) for s in self.stop_strs), default=0)
        self.stop_regexes = [re.compile(p) for p in params.stop_regexes]
        self.grammar: xgr.GrammarMatcher | None = None  # set by the engine for json_schema, regex, ebnf

    @property
    def all_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    def ids_between(self, start: int, end: int) -> list[int]:
        """all_ids[start:end] without building all_ids (decode asks for one token, every step)."""
        p = len(self.input_ids)
        if start >= p:
            return self.output_ids[start - p : end - p]
        return self.input_ids[start:end] + self.output_ids[: max(end - p, 0)]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def remaining_tokens(self) -> int:
        """Upper bound on slots this request may still take."""
        return len(self.input_ids) + self.params.max_new_tokens - self.kv_len

    def input_rows(self, n: int) -> tuple[int, int]:
        """Positions of this step's n new tokens whose logits score a prompt token: [lo, hi)."""
        lo = max(self.kv_len, self.input_lp_pos)
        return lo, max(lo, min(self.kv_len + n, len(self.input_ids) - 1))

    def max_prefix(self) -> int:
        """Longest cached prefix usable: two tokens are always computed (a prompt's positions never go
        through decode attention: see scheduler._chunk), and so is every position still to score."""
        return max(0, min(self.num_tokens - 2, self.input_lp_pos))

    @property
    def prefilling(self) -> bool:
        """Whether K/V are still missing for more than the newest token (a prompt, or a recompute)."""
        return self.num_tokens - self.kv_len > 1

    def append_output(self, token: int) -> None:
        """Records a sampled token; a grammar advances with it (so a recomputed request never replays it)."""
        self.output_ids.append(token)
        if self.grammar is not None and not self.grammar.accept_token(token):
            self.finish_reason = FinishAbort(f"token {token} is not allowed by the request's grammar")

    def check_finished(self, eos_ids: set[int], context_len: int, decode: Callable[[list[int]], str]) -> None:
        """Applies SGLang's order: length, then a completed grammar, then stop tokens, then stop strings."""
        p = self.params
        if self.finished:
            return
        if len(self.output_ids) >= p.max_new_tokens or len(self.input_ids) + len(self.output_ids) >= context_len:
            self.finish_reason = FinishLength(len(self.output_ids))
            return
        if self.grammar is not None and self.grammar.is_terminated():
            self.finish_reason = FinishStop(self.output_ids[-1])
            return
        if len(self.output_ids) < p.min_new_tokens:
            return
        last = self.output_ids[-1]
        if last in self.stop_ids or (not p.ignore_eos and last in eos_ids):
            self.finish_reason = FinishStop(last)
            return
        if self.stop_strs:
            tail = decode(self.output_ids[-(self.max_stop_len + 1) :])
            for s in self.stop_strs:
                if s in tail:
                    self.finish_reason = FinishStop(s)
                    return
        if self.stop_regexes:
            tail = decode(self.output_ids[-STOP_REGEX_TAIL_TOKENS:])
            for pattern in self.stop_regexes:
                m = pattern.search(tail)
                if m:
                    self.finish_reason = FinishStop(m.group(0))
                    return
