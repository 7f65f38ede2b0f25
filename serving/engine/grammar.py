"""Structured output: json_schema, regex and ebnf grammars, through xgrammar.

The engine compiles a grammar against the vocabulary once per (kind, text), in a worker thread so
that a large schema does not stall the batch, and gives each request its own matcher over the
result. A grammar xgrammar refuses refuses its request with a 400 and the compiler's message.

xgrammar is imported, and given the vocabulary, when the first grammar is compiled (in the worker): about
half a second (0.2-0.3 s the import, 0.25-0.35 s the vocabulary on two cores) that no start pays.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING

from transformers import PreTrainedTokenizerBase

from kiln.serving.sampling_params import SamplingParams

if TYPE_CHECKING:
    import xgrammar as xgr

KINDS = ("json_schema", "regex", "ebnf")
ANY_JSON = "$$ANY$$"  # SGLang's json_schema for "any JSON value"
CACHE_SIZE = 256  # compiled grammars kept, least recently used dropped first
# Between JSON tokens any whitespace is allowed (as in SGLang), but a run is capped: small models
# otherwise fall into emitting whitespace until max_new_tokens.
MAX_JSON_WHITESPACE = 16

# xgrammar's C++ errors start with a timestamp, a source location and sometimes a failed check.
_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: .*? is false: )?")

GrammarKey = tuple[str, str]


class GrammarError(ValueError):
    """A grammar xgrammar refuses; the message is the compiler's."""


def grammar_key(params: SamplingParams) -> GrammarKey | None:
    """The request's (kind, text), or None when it is unconstrained (validation allows at most one)."""
    return next(((k, getattr(params, k)) for k in KINDS if getattr(params, k) is not None), None)


class GrammarCompiler:
    """Compiles grammars against the model's vocabulary, each (kind, text) once."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, stop_ids: set[int], any_whitespace: bool):
        self.tokenizer, self.vocab_size, self.stop_ids = tokenizer, vocab_size, stop_ids
        self.any_whitespace = any_whitespace
        self.compiler: xgr.GrammarCompiler | None = None  # made by the worker, which alone uses it
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="grammar")
        self.compiled: OrderedDict[GrammarKey, Future[xgr.CompiledGrammar]] = OrderedDict()

    def compile(self, key: GrammarKey) -> Future[xgr.CompiledGrammar]:
        """The compiled grammar, now or later; a failure is the future's exception."""
        future = self.compiled.get(key)
        if future is None or (future.done() and future.exception() is not None):
            future = self.worker.submit(self._compile, *key)
        self.compiled[key] = future
        self.compiled.move_to_end(key)
        if len(self.compiled) > CACHE_SIZE:
            self.compiled.popitem(last=False)
        return future

    def _compile(self, kind: str, text: str) -> xgr.CompiledGrammar:
        if self.compiler is None:
            import xgrammar as xgr

            # vocab_size is the logits' width, which may exceed the tokenizer's; the extra ids are never allowed.
            info = xgr.TokenizerInfo.from_huggingface(self.tokenizer, vocab_size=self.vocab_size, stop_token_ids=sorted(self.stop_ids))
            self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        try:
            return self._compile_raw(self.compiler, kind, text)
        except Exception as exc:  # xgrammar raises RuntimeError for most broken grammars, others for a few
            message = _LOCATION.sub("", str(exc).strip())
            raise GrammarError(f"Invalid {kind}: {message}") from exc

    def _compile_raw(self, compiler: xgr.GrammarCompiler, kind: str, text: str) -> xgr.CompiledGrammar:
        if kind == "json_schema":
            if text == ANY_JSON:
                return compiler.compile_builtin_json_grammar()
            if not self.any_whitespace:
                return compiler.compile_json_schema(text, any_whitespace=False)
            return compiler.compile_json_schema(text, any_whitespace=True, max_whitespace_cnt=MAX_JSON_WHITESPACE)
        if kind == "regex":
            return compiler.compile_regex(text)
        return compiler.compile_grammar(text)


def grammar_matcher(compiled: xgr.CompiledGrammar) -> xgr.GrammarMatcher:
    """One request's matcher over a compiled grammar (whose compiling imported xgrammar)."""
    import xgrammar as xgr

    return xgr.GrammarMatcher(compiled)
