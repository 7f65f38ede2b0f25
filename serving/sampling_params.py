"""Per-request sampling parameters, with SGLang's defaults and validation rules."""

import msgspec

_EPS = 1e-6


class SamplingParamsError(ValueError):
    """A broken rule; the message names the parameter and its value."""


class SamplingParams(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
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
        if self.temperature < 0:
            raise SamplingParamsError(f"temperature must be non-negative, got {self.temperature}.")
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
        for tid in self.stop_token_ids or []:
            if not 0 <= tid < vocab_size:
                raise SamplingParamsError(f"stop_token_ids must be token ids in [0, {vocab_size}), got {tid}.")
        for key in self.logit_bias or {}:
            if not key.lstrip("-").isdigit() or not 0 <= int(key) < vocab_size:
                raise SamplingParamsError(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}.")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise SamplingParamsError("stop strings must not be empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature < _EPS or self.top_k == 1

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def has_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0 or self.logit_bias)
