"""Per-request sampling parameters, with SGLang's defaults and validation rules."""

import math
import re
from typing import Annotated

import msgspec

_EPS = 1e-6
# torch.Generator takes seeds in [-2**63, 2**64); the n samples of a request use seed + i.
SEED_RANGE = (-(2**63), 2**64 - 2**16)


# Every integer a request carries fits 64 bits (a larger one is a 400 before anything computes with it).
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class InvalidRequest(ValueError):
    """A request that breaks a rule; answered with a 400 and this message."""


class SamplingParamsError(InvalidRequest):
    """A broken sampling rule; the message names the parameter and its value."""


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    max_new_tokens: Int64 = 128
    min_new_tokens: Int64 = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: Int64 = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_regex: str | list[str] | None = None  # finish when the output's tail matches; `matched` is the matched text
    stop_token_ids: list[Int64] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: Int64 = 1
    json_schema: str | None = None
    regex: str | None = None
    ebnf: str | None = None
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None

    def validate(self, vocab_size: int) -> None:
        if self.max_new_tokens < 0:
            raise SamplingParamsError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise SamplingParamsError(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}.")
        if not 0 <= self.temperature < math.inf:
            raise SamplingParamsError(f"temperature must be non-negative and finite, got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise SamplingParamsError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k != -1 and self.top_k < 1:
            raise SamplingParamsError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamsError(f"min_p must be in [0, 1], got {self.min_p}.")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingParamsError(f"{name} must be in [-2, 2], got {getattr(self, name)}.")
        if not 0 <= self.repetition_penalty <= 2:
            raise SamplingParamsError(f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.")
        if self.n < 1:
            raise SamplingParamsError(f"n must be at least 1, got {self.n}.")
        if sum(x is not None for x in (self.json_schema, self.regex, self.ebnf)) > 1:
            raise SamplingParamsError("Only one of regex, json_schema, or ebnf can be set.")
        for key, bias in (self.logit_bias or {}).items():
            if not (key.isascii() and key.isdigit() and len(key) < 12) or not int(key) < vocab_size:
                raise SamplingParamsError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}.")
            if not math.isfinite(bias):
                raise SamplingParamsError(f"logit_bias values must be finite numbers, got {bias} for token {key}.")
        if self.sampling_seed is not None and not SEED_RANGE[0] <= self.sampling_seed < SEED_RANGE[1]:
            raise SamplingParamsError(f"sampling_seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1]}), got {self.sampling_seed}.")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise SamplingParamsError("stop strings must not be empty.")
        for pattern in self.stop_regexes:
            try:
                if re.compile(pattern).match(""):
                    raise SamplingParamsError(f"stop_regex must not match the empty string, got {pattern!r}.")
            except re.error as exc:
                raise SamplingParamsError(f"Invalid stop_regex {pattern!r}: {exc}.") from exc

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS or self.top_k == 1

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def stop_regexes(self) -> list[str]:
        if self.stop_regex is None:
            return []
        return [self.stop_regex] if isinstance(self.stop_regex, str) else list(self.stop_regex)

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias)
